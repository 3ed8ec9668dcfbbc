//! `trellis import`: App Mesh configuration from CloudFormation, Terraform or App Mesh API
//! exports, printed as App Mesh-shaped Trellis manifests (stdout, ready for `trellis apply -f -`),
//! with what could not be carried over and the ECS replacements on stderr.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use trellis_control::import::{self, EcsOptions, Read};

/// The formats `--from` takes.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum From {
    Cloudformation,
    Terraform,
    AppmeshJson,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum Format {
    Yaml,
    Json,
}

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// What the files are.
    #[arg(long = "from", value_enum)]
    from: From,
    /// Files or directories (a directory: its .yaml/.yml/.json/.template files, or its .tf
    /// files, read together as one Terraform module).
    #[arg(required = true)]
    paths: Vec<String>,
    /// A CloudFormation parameter's value, in place of its default (repeatable).
    #[arg(long = "parameter", value_name = "NAME=VALUE", value_parser = pair)]
    parameters: Vec<(String, String)>,
    /// A Terraform variable's value, in place of its default (repeatable).
    #[arg(long = "var", value_name = "NAME=VALUE", value_parser = pair)]
    vars: Vec<(String, String)>,
    /// The namespace of the resources written.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    #[arg(short = 'o', long, value_enum, default_value = "yaml")]
    output: Format,
    /// The trellis-proxy image of the containers replacing ECS tasks' Envoy.
    #[arg(long, default_value = concat!("trellis-proxy:", env!("CARGO_PKG_VERSION")))]
    proxy_image: String,
    /// The control plane those proxies connect to.
    #[arg(long, default_value = "http://trellis-control:7070")]
    control_plane: String,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let extensions: &[&str] = match args.from {
        From::Terraform => &["tf"],
        From::Cloudformation => &["yaml", "yml", "json", "template"],
        From::AppmeshJson => &["json"],
    };
    let files = collect(&args.paths, extensions)?;
    let mut read = Read::default();
    match args.from {
        From::Terraform => {
            let texts: Vec<(String, String)> =
                files.into_iter().map(|f| (f.name, f.text)).collect();
            read.extend(import::terraform::read_with(&texts, &args.vars)?);
        }
        From::Cloudformation | From::AppmeshJson => {
            for f in files {
                let result = match args.from {
                    From::Cloudformation => {
                        import::cloudformation::read_with(&f.text, &f.name, &args.parameters)
                    }
                    _ => import::api_json::read(&f.text, &f.name),
                };
                match result {
                    Ok(r) => read.extend(r),
                    // A file a directory holds besides its templates (a parameters file, say)
                    // is reported, not fatal; a file named on the command line is.
                    Err(e) if f.in_directory => read.notes.push(import::Note {
                        source: f.name.clone(),
                        field: String::new(),
                        reason: format!("skipped: {}", e.reason),
                    }),
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    if !args.parameters.is_empty() && !matches!(args.from, From::Cloudformation) {
        anyhow::bail!("--parameter is for CloudFormation templates (Terraform takes --var)");
    }
    if !args.vars.is_empty() && !matches!(args.from, From::Terraform) {
        anyhow::bail!("--var is for Terraform (CloudFormation takes --parameter)");
    }
    let ecs = EcsOptions {
        image: args.proxy_image.clone(),
        control_plane: args.control_plane.clone(),
    };
    let converted = import::convert(read, &args.namespace, &ecs);
    let nothing = converted.manifests.is_empty() && converted.ecs.is_empty();
    if !nothing {
        match args.output {
            Format::Yaml => {
                for m in &converted.manifests {
                    print!("---\n{}", yaml11_safe(&serde_yaml_ng::to_string(m)?));
                }
            }
            // One JSON document each, in a YAML stream (what `trellis apply` and kubectl read).
            Format::Json => {
                for m in &converted.manifests {
                    println!("---\n{}", serde_json::to_string_pretty(m)?);
                }
            }
        }
    }
    eprintln!(
        "# {} resources written; {} fields or resources not carried over{}",
        converted.manifests.len(),
        converted.notes.len(),
        if converted.notes.is_empty() { "" } else { ":" }
    );
    for note in &converted.notes {
        eprintln!("#   {note}");
    }
    for r in &converted.ecs {
        eprintln!(
            "# ECS {}: replace container {:?} (App Mesh's Envoy) with this trellis-proxy container; it runs as {} and keeps the task's proxyConfiguration (ports, user) working:\n{}",
            r.source,
            r.container,
            r.runs_as,
            serde_json::to_string_pretty(&r.container_definition)?
        );
    }
    if nothing {
        anyhow::bail!(
            "nothing could be carried over from the input (see the report above: an unresolved parameter or variable is given with --parameter or --var)"
        );
    }
    Ok(())
}

/// An input file.
struct File {
    name: String,
    text: String,
    /// Found in a directory given, rather than named.
    in_directory: bool,
}

/// Each file: given ones as they are, directories' by extension, sorted.
fn collect(paths: &[String], extensions: &[&str]) -> anyhow::Result<Vec<File>> {
    let mut out = Vec::new();
    for p in paths {
        let path = Path::new(p);
        let (files, in_directory): (Vec<PathBuf>, bool) = if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("cannot read {p}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| extensions.contains(&e))
                })
                .collect();
            entries.sort();
            (entries, true)
        } else {
            (vec![path.to_path_buf()], false)
        };
        for f in files {
            let text = std::fs::read_to_string(&f)
                .with_context(|| format!("cannot read {}", f.display()))?;
            out.push(File {
                name: f.display().to_string(),
                text,
                in_directory,
            });
        }
    }
    Ok(out)
}

/// YAML 1.2 (what `trellis apply` reads) writes `on`, `yes`, `n` as plain strings; YAML 1.1
/// readers (kubectl's among them) take them for booleans. Such values are quoted.
fn yaml11_safe(yaml: &str) -> String {
    const BOOLEANS: [&str; 16] = [
        "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off",
        "OFF",
    ];
    let indent = |line: &str| line.len() - line.trim_start().len();
    let mut out = String::with_capacity(yaml.len());
    // The indentation a block scalar's (`|`, `>`) lines are deeper than, while in one.
    let mut block: Option<usize> = None;
    for line in yaml.lines() {
        if let Some(at) = block {
            if line.trim().is_empty() || indent(line) > at {
                out.push_str(line);
                out.push('\n');
                continue;
            }
            block = None;
        }
        let value_at = line.find(": ").map(|i| i + 2).or_else(|| {
            let trimmed = line.trim_start();
            trimmed.starts_with("- ").then(|| indent(line) + 2)
        });
        let value = value_at.map(|i| &line[i..]);
        if value.is_some_and(|v| v.starts_with('|') || v.starts_with('>')) {
            block = Some(indent(line));
        }
        match (value_at, value) {
            (Some(i), Some(v)) if BOOLEANS.contains(&v) => {
                out.push_str(&line[..i]);
                out.push('\'');
                out.push_str(v);
                out.push('\'');
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// `NAME=VALUE`.
fn pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?}: expected NAME=VALUE"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn yaml_1_1_booleans_are_quoted() {
        let yaml = "a: on\nb:\n- no\n- maybe\nc: 'off'\nkey: yes please\n";
        let safe = super::yaml11_safe(yaml);
        assert_eq!(
            safe,
            "a: 'on'\nb:\n- 'no'\n- maybe\nc: 'off'\nkey: yes please\n"
        );
        let back: serde_json::Value = serde_yaml_ng::from_str(&safe).unwrap();
        assert_eq!(back["a"], "on");
        // Block scalars' lines are text, kept as they are.
        let value = serde_json::json!({ "text": "start\nmode: on\n- no\n", "after": "on" });
        let yaml = serde_yaml_ng::to_string(&value).unwrap();
        let back: serde_json::Value = serde_yaml_ng::from_str(&super::yaml11_safe(&yaml)).unwrap();
        assert_eq!(back, value, "{yaml}");
    }
}
