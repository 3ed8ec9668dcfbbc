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
        From::Terraform => read.extend(import::terraform::read(&files)?),
        From::Cloudformation => {
            for (name, text) in &files {
                read.extend(import::cloudformation::read(text, name)?);
            }
        }
        From::AppmeshJson => {
            for (name, text) in &files {
                read.extend(import::api_json::read(text, name)?);
            }
        }
    }
    if read.resources.is_empty() && read.tasks.is_empty() {
        anyhow::bail!("no App Mesh resource or ECS task definition found in the input");
    }
    let ecs = EcsOptions {
        image: args.proxy_image.clone(),
        control_plane: args.control_plane.clone(),
    };
    let converted = import::convert(read, &args.namespace, &ecs);
    match args.output {
        Format::Yaml => {
            for m in &converted.manifests {
                print!("---\n{}", yaml11_safe(&serde_yaml_ng::to_string(m)?));
            }
        }
        Format::Json => println!("{}", serde_json::to_string_pretty(&converted.manifests)?),
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
            "# ECS {}: replace container {:?} (App Mesh's Envoy) with this trellis-proxy container; it runs as {} and keeps the task's proxyConfiguration (ports 15000/15001, user) working:\n{}",
            r.source,
            r.container,
            r.runs_as,
            serde_json::to_string_pretty(&r.container_definition)?
        );
    }
    Ok(())
}

/// (name, text) of each file: given ones as they are, directories' by extension, sorted.
fn collect(paths: &[String], extensions: &[&str]) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for p in paths {
        let path = Path::new(p);
        let files: Vec<PathBuf> = if path.is_dir() {
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
            entries
        } else {
            vec![path.to_path_buf()]
        };
        for f in files {
            let text = std::fs::read_to_string(&f)
                .with_context(|| format!("cannot read {}", f.display()))?;
            out.push((f.display().to_string(), text));
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
    let mut out = String::with_capacity(yaml.len());
    for line in yaml.lines() {
        let value_at = line.find(": ").map(|i| i + 2).or_else(|| {
            let trimmed = line.trim_start();
            trimmed
                .starts_with("- ")
                .then(|| line.len() - trimmed.len() + 2)
        });
        match value_at {
            Some(i) if BOOLEANS.contains(&&line[i..]) => {
                out.push_str(&line[..i]);
                out.push('\'');
                out.push_str(&line[i..]);
                out.push('\'');
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
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
    }
}
