//! `trellis`: the kubectl-like CLI for a Trellis control plane.

#![allow(clippy::print_stdout)]

mod client;
mod demo;
mod import;
mod manifests;

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use serde::{Deserialize as _, Serialize};
use serde_json::Value;
use trellis_control::{
    controller::Usage,
    model::{Kind, Manifest},
    registry::{Instance, InstanceStatus, Registration},
    server::{ErrorBody, Items, Results},
    status::Status,
    validate::{self, State, parse_documents},
};

use client::{ApiClient, ClientError};

/// An API response as its type.
fn typed<T: serde::de::DeserializeOwned>(value: Value) -> anyhow::Result<T> {
    serde_json::from_value(value).context("unexpected response from the control plane")
}

#[derive(Debug, Parser)]
#[command(name = "trellis", version, about = "Trellis service mesh CLI")]
struct Cli {
    /// Control plane URL (default: `trellis login`'s, else http://127.0.0.1:7070).
    #[arg(long, global = true, env = "TRELLIS_SERVER")]
    server: Option<String>,
    /// The CA certificate (PEM file) of an https control plane (default: `trellis login`'s).
    #[arg(long, global = true, env = "TRELLIS_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// An operator token (default: `trellis login`'s), for a control plane run with --auth.
    #[arg(long, global = true, env = "TRELLIS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CrdGroup {
    Trellis,
    Appmesh,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Output {
    Table,
    Yaml,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update resources from files, a directory, or - (stdin); all or nothing.
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
        /// Check the files as an apply would and say what it would do, storing nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// What applying the files would change, storing nothing: each resource's action, and for
    /// each VirtualNode and VirtualGateway whose proxies' config would change, every changed
    /// field (routes, weights, clusters, endpoints, policies), through the same validation and
    /// translation as an apply. Exits 1 when something would change.
    Diff {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
    },
    /// Every resource (Namespaces too), as manifests `trellis apply -f` restores: a backup, or
    /// a mesh to move. With --instances, the registry too (`Instance` documents).
    Export {
        /// Also the registered instances (those with a TTL expire again unless their
        /// heartbeats resume).
        #[arg(long)]
        instances: bool,
    },
    /// Delete the resources in a file, or one resource by kind and name.
    Delete {
        #[arg(short = 'f', long = "filename")]
        files: Vec<String>,
        kind: Option<String>,
        name: Option<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// List resources of a kind, or show one.
    Get {
        kind: String,
        name: Option<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Show one resource with the proxies using it.
    Describe {
        kind: String,
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// The registry of service instances.
    Instances {
        #[command(subcommand)]
        command: InstancesCommand,
    },
    /// Remember a control plane and an operator token (in ~/.config/trellis/config.json).
    Login {
        /// The operator token (`trellis operator create`, or the control plane's first
        /// admin token in its data dir's admin-token).
        #[arg(long = "with-token")]
        with_token: String,
    },
    /// Operators of the API (with --auth): admins write, viewers read.
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
    /// The writes made through the API: who, what, when.
    Audit {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Join tokens proxies prove who they are with, to get their workload certificates.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Workload identities of nodes: revoke one when its key may be in other hands.
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
    },
    /// Canaries: where each stands (step, weight, the step's measurements against its gates,
    /// every decision), and an operator's say over one.
    Canary {
        #[command(subcommand)]
        command: CanaryCommand,
    },
    /// Bootstraps for proxies driven by the control plane (offline).
    Bootstrap {
        #[command(subcommand)]
        command: BootstrapCommand,
    },
    /// The mesh's root certificates: where a rotation stands, and its steps.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Connected proxies with their config versions and ACK/NACK, and per-resource convergence
    /// (of every control plane sharing the store).
    Status {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
        /// Only the proxies connected to this control plane.
        #[arg(long)]
        local: bool,
    },
    /// Check manifests offline (schema, ranges, references among the given files).
    Validate {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
    },
    /// Turn App Mesh configuration from CloudFormation, Terraform or App Mesh API exports into
    /// Trellis manifests (stdout), reporting what could not be carried over (stderr).
    Import(import::Args),
    /// Print the CustomResourceDefinitions of the mesh kinds for Kubernetes (offline).
    Crds {
        /// `trellis` (mesh.trellis.dev/v1beta1) or `appmesh` (appmesh.k8s.aws/v1beta2).
        #[arg(long, value_enum, default_value = "trellis")]
        group: CrdGroup,
    },
    /// Run the colorapp demo on 127.0.0.1: control plane, sidecars, apps, a live traffic split.
    Demo {
        /// Seconds to hold each weight step.
        #[arg(long, default_value_t = 3)]
        step_seconds: u64,
        /// Instead of weight steps: a Canary promoted from blue to green on the sidecars'
        /// measurements, then one to a failing red rolled back by itself.
        #[arg(long)]
        canary: bool,
    },
}

/// Which registered instance.
#[derive(Debug, clap::Args)]
struct InstanceRef {
    #[arg(long)]
    namespace: String,
    #[arg(long)]
    service: String,
    #[arg(long)]
    id: String,
}

impl InstanceRef {
    /// The instance's API path.
    fn path(&self) -> String {
        format!(
            "/v1/instances/{}/{}/{}",
            self.namespace, self.service, self.id
        )
    }
}

impl std::fmt::Display for InstanceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "instance {}/{}/{}",
            self.namespace, self.service, self.id
        )
    }
}

#[derive(Debug, Subcommand)]
enum OperatorCommand {
    /// A token for a new operator: printed once, kept only as a hash.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        role: trellis_control::auth::Role,
    },
    /// The operators, by id (the start of their token's hash).
    List,
    /// Revokes an operator's token (never the last admin's).
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// A token for the proxies of one node (or gateway): printed once, kept only as a hash.
    Create {
        /// NAMESPACE/NAME of the VirtualNode (or, with --gateway, the VirtualGateway).
        #[arg(long)]
        node: String,
        #[arg(long)]
        gateway: bool,
        /// How long it admits proxies.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// How many proxies it admits (each stream's hello); unset: any number until it expires.
        #[arg(long)]
        uses: Option<u32>,
    },
    /// The join tokens kept, by id (the start of their hash; the tokens are not kept).
    List,
    /// Revokes a join token: proxies it has not admitted yet are refused.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
enum IdentityCommand {
    /// Revokes a node's (or gateway's) identity: its certificates issued until now no longer
    /// admit a proxy nor renew, its proxies' open config streams close; they need a new join
    /// token (trellis token create).
    Revoke {
        /// NAMESPACE/NAME of the VirtualNode (or, with --gateway, the VirtualGateway).
        #[arg(long)]
        node: String,
        #[arg(long)]
        gateway: bool,
    },
}

#[derive(Debug, Subcommand)]
enum BootstrapCommand {
    /// A stock Envoy's bootstrap: its node, its admin listener, and ADS (xDS v3, state of the
    /// world) to this control plane (`--server`) for everything else.
    Envoy {
        /// NAMESPACE/NAME of its VirtualNode.
        #[arg(long)]
        node: String,
        /// The node is a VirtualGateway.
        #[arg(long)]
        gateway: bool,
        /// Where it serves the node's listeners' callers (App Mesh's 15000).
        #[arg(long, default_value = "0.0.0.0:15000")]
        ingress: std::net::SocketAddr,
        /// Where the local app's requests go (App Mesh's 15001).
        #[arg(long, default_value = "127.0.0.1:15001")]
        egress: std::net::SocketAddr,
        /// Envoy's admin listener (App Mesh's 9901).
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: std::net::SocketAddr,
        /// A join token for the node (`trellis token create --node NS/NAME`, without --uses:
        /// Envoy presents it on every ADS stream) — its workload certificate for mTLS, and
        /// required where the control plane requires identities. In the bootstrap as written.
        #[arg(long, env = "TRELLIS_JOIN_TOKEN")]
        join_token: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum CanaryCommand {
    /// Every canary (of a namespace, or all), or one with its history.
    Status {
        name: Option<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// All traffic to the canary now, whatever the gates say.
    Promote(CanaryName),
    /// All traffic back to the stable node now.
    Abort(CanaryName),
    /// Hold the weights where they are; the gates are not checked.
    Pause(CanaryName),
    /// Judge the paused step again from now (its weights set again).
    Resume(CanaryName),
}

#[derive(Debug, clap::Args)]
struct CanaryName {
    name: String,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// The roots (current, next, previous) and, per proxy with an identity, the root of its
    /// certificate and the roots it trusts.
    Status {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Begins a root rotation: a new root joins every proxy's trust bundle (it signs nothing
    /// yet).
    Rotate,
    /// Makes the new root sign, and asks every proxy for a certificate from it; refused until
    /// every connected proxy trusts it (--force skips the wait).
    Promote {
        #[arg(long)]
        force: bool,
    },
    /// Ends the rotation: the previous root leaves the trust bundle; refused until every
    /// connected proxy has a certificate from the new root (--force skips the wait).
    Finish {
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum InstancesCommand {
    Register {
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        service: String,
        #[arg(long)]
        id: String,
        #[arg(long)]
        address: String,
        #[arg(long)]
        port: u16,
        /// KEY=VALUE, repeatable.
        #[arg(long = "attr")]
        attrs: Vec<String>,
        /// Remove the instance unless a heartbeat comes within this long (e.g. 30s).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
    Deregister(InstanceRef),
    /// Stop sending new requests to an instance; in-flight ones finish.
    Drain(InstanceRef),
    /// Renew an instance's TTL.
    Heartbeat(InstanceRef),
    List {
        #[arg(long)]
        namespace: Option<String>,
        #[arg(long)]
        service: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `diff` says "changes" with 1, so its failures are 2 (as `kubectl diff`).
    let failure = match cli.command {
        Command::Diff { .. } => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("trellis: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis: {e:#}");
            failure
        }
    }
}

/// One input file's text, with its name for messages.
struct Source {
    name: String,
    text: String,
}

fn read_sources(files: &[String]) -> anyhow::Result<Vec<Source>> {
    let mut out = Vec::new();
    for f in files {
        if f == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read stdin")?;
            out.push(Source {
                name: "<stdin>".into(),
                text,
            });
            continue;
        }
        let path = Path::new(f);
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("cannot read {f}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
                })
                .collect();
            entries.sort();
            for p in entries {
                let text = std::fs::read_to_string(&p)
                    .with_context(|| format!("cannot read {}", p.display()))?;
                out.push(Source {
                    name: p.display().to_string(),
                    text,
                });
            }
        } else {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {f}"))?;
            out.push(Source {
                name: f.clone(),
                text,
            });
        }
    }
    Ok(out)
}

/// Joins the sources into one stream and remembers which file each document came from.
fn join(sources: &[Source]) -> anyhow::Result<(String, Vec<(String, usize)>)> {
    let mut text = String::new();
    let mut origin = Vec::new();
    for s in sources {
        let docs = parse_documents(&s.text).map_err(|problems| {
            let lines: Vec<String> = problems
                .iter()
                .map(|p| format!("{}: {p}", s.name))
                .collect();
            anyhow::anyhow!("invalid manifests:\n  {}", lines.join("\n  "))
        })?;
        for (i, doc) in docs.iter().enumerate() {
            text.push_str("---\n");
            text.push_str(&serde_json::to_string(doc)?);
            text.push('\n');
            origin.push((s.name.clone(), i));
        }
    }
    Ok((text, origin))
}

fn explain(err: ClientError, origin: &[(String, usize)]) -> anyhow::Error {
    if let ClientError::Api { body, .. } = &err {
        let problems = ErrorBody::deserialize(body)
            .map(|b| b.problems)
            .unwrap_or_default();
        if !problems.is_empty() {
            let lines = problem_lines(&problems, origin);
            return anyhow::anyhow!("rejected, nothing changed:\n  {}", lines.join("\n  "));
        }
    }
    err.into()
}

fn kind_of(s: &str) -> anyhow::Result<Kind> {
    Kind::parse(s).with_context(|| {
        let kinds: Vec<String> = Kind::ALL.iter().map(|k| k.lower()).collect();
        format!("unknown kind {s:?} (one of {})", kinds.join(", "))
    })
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("   ").trim_end());
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn print_value(output: Output, value: &impl Serialize) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        _ => print!("{}", serde_yaml_ng::to_string(value)?),
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Validate { files } = &cli.command {
        return validate_offline(files);
    }
    if let Command::Import(args) = &cli.command {
        return import::run(args);
    }
    if let Command::Bootstrap {
        command:
            BootstrapCommand::Envoy {
                node,
                gateway,
                ingress,
                egress,
                admin,
                join_token,
            },
    } = &cli.command
    {
        let server = cli
            .server
            .clone()
            .or_else(|| Login::read().server)
            .unwrap_or_else(|| "http://127.0.0.1:7070".into());
        let bootstrap = trellis_control::envoy::Bootstrap {
            node: node.clone(),
            gateway: *gateway,
            control_plane: server,
            control_plane_ca: cli.ca_file.as_ref().map(|p| p.display().to_string()),
            addresses: trellis_control::envoy::Addresses {
                ingress: *ingress,
                egress: *egress,
            },
            admin: *admin,
            join_token: join_token.clone(),
        };
        print!("{}", bootstrap.yaml().map_err(anyhow::Error::msg)?);
        return Ok(());
    }
    if let Command::Crds { group } = &cli.command {
        use trellis_control::compat::crd::{Group, crds_yaml};
        print!(
            "{}",
            crds_yaml(match group {
                CrdGroup::Trellis => Group::Trellis,
                CrdGroup::Appmesh => Group::AppMesh,
            })
        );
        return Ok(());
    }
    if let Command::Demo {
        step_seconds,
        canary,
    } = &cli.command
    {
        return demo::run(std::time::Duration::from_secs(*step_seconds), *canary).await;
    }
    let login = Login::read();
    let server = cli
        .server
        .clone()
        .or_else(|| login.server.clone())
        .unwrap_or_else(|| "http://127.0.0.1:7070".into());
    let ca_file = cli.ca_file.clone().or(login.ca_file.clone());
    let ca = ca_file
        .as_ref()
        .map(|f| std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display())))
        .transpose()?;
    if let Command::Login { with_token } = &cli.command {
        ApiClient::new(&server)?.with_ca(ca.as_deref())?;
        refuse_token_in_clear(&server)?;
        let path = Login {
            server: Some(server.clone()),
            token: Some(with_token.clone()),
            ca_file: ca_file.map(|f| std::fs::canonicalize(&f).unwrap_or(f)),
        }
        .write()?;
        eprintln!("logged in to {server} (saved in {})", path.display());
        return Ok(());
    }
    // The token saved at login goes to the server it was saved for, and to no other.
    let saved = login.token.filter(|_| {
        login
            .server
            .as_deref()
            .is_some_and(|s| same_server(s, &server))
    });
    let token = cli.token.clone().or(saved);
    if token.is_some() {
        refuse_token_in_clear(&server)?;
    }
    let api = ApiClient::new(&server)?
        .with_token(token)
        .with_ca(ca.as_deref())?;
    match cli.command {
        Command::Apply { files, dry_run } => apply(&api, files, dry_run).await?,
        Command::Diff { files } => {
            if diff(&api, files).await? {
                std::process::exit(1);
            }
        }
        Command::Export { instances } => export(&api, instances).await?,
        Command::Delete {
            files,
            kind,
            name,
            namespace,
        } => delete(&api, files, kind, name, namespace).await?,
        Command::Get {
            kind,
            name,
            namespace,
            all_namespaces,
            output,
        } => get(&api, kind, name, namespace, all_namespaces, output).await?,
        Command::Describe {
            kind,
            name,
            namespace,
        } => describe(&api, kind, name, namespace).await?,
        Command::Instances { command } => instances(&api, command).await?,
        Command::Token {
            command:
                TokenCommand::Create {
                    node,
                    gateway,
                    ttl,
                    uses,
                },
        } => {
            let body = serde_json::json!({
                "node": node,
                "gateway": gateway,
                "ttlSeconds": ttl.as_secs().max(1),
                "uses": uses,
            });
            let created = api
                .post("/v1/tokens", serde_json::to_vec(&body)?)
                .await
                .map_err(|e| explain(e, &[]))?;
            let created: trellis_control::server::TokenCreated = typed(created)?;
            eprintln!(
                "token for {} {} until {}{} (shown once):",
                if created.gateway { "gateway" } else { "node" },
                created.node,
                created.expires,
                created
                    .uses
                    .map(|n| format!(", {n} use{}", if n == 1 { "" } else { "s" }))
                    .unwrap_or_default()
            );
            println!("{}", created.token);
        }
        Command::Status { output, local } => status(&api, output, local).await?,
        Command::Operator {
            command: OperatorCommand::Create { name, role },
        } => {
            let body = serde_json::json!({ "name": name, "role": role });
            let created = api
                .post("/v1/operators", serde_json::to_vec(&body)?)
                .await
                .map_err(|e| explain(e, &[]))?;
            let created: trellis_control::server::OperatorCreated = typed(created)?;
            eprintln!(
                "token for operator {} ({:?}, shown once):",
                created.name, created.role
            );
            println!("{}", created.token);
        }
        Command::Operator {
            command: OperatorCommand::List,
        } => {
            let list = api
                .get("/v1/operators")
                .await
                .map_err(|e| explain(e, &[]))?;
            let list: Vec<trellis_control::auth::ListedOperator> = typed(list)?;
            println!("{:<14} {:<20} {:<8} CREATED", "ID", "NAME", "ROLE");
            for o in list {
                let role = if o.operator.role == trellis_control::auth::Role::Admin {
                    "admin"
                } else {
                    "viewer"
                };
                println!(
                    "{:<14} {:<20} {:<8} {}",
                    o.id, o.operator.name, role, o.operator.created
                );
            }
        }
        Command::Operator {
            command: OperatorCommand::Revoke { id },
        } => {
            let out = api
                .delete(&format!("/v1/operators/{id}"))
                .await
                .map_err(|e| explain(e, &[]))?;
            println!(
                "revoked operator {}",
                out["revoked"].as_str().unwrap_or("?")
            );
        }
        Command::Token {
            command: TokenCommand::List,
        } => {
            let list = api.get("/v1/tokens").await.map_err(|e| explain(e, &[]))?;
            let list: Vec<trellis_control::identity::ListedToken> = typed(list)?;
            println!(
                "{:<14} {:<8} {:<32} {:<21} USES LEFT",
                "ID", "KIND", "NODE", "EXPIRES"
            );
            for t in list {
                let expires = humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.token.expires),
                );
                let kind = if t.token.gateway { "gateway" } else { "node" };
                let uses = t
                    .token
                    .uses_left
                    .map_or("any".to_string(), |n| n.to_string());
                println!(
                    "{:<14} {:<8} {:<32} {:<21} {uses}",
                    t.id,
                    kind,
                    t.token.node,
                    expires.to_string()
                );
            }
        }
        Command::Ca { command } => ca_command(&api, command).await?,
        Command::Canary { command } => canary_command(&api, command).await?,
        Command::Identity {
            command: IdentityCommand::Revoke { node, gateway },
        } => {
            let body = trellis_control::server::RevocationRequest { node, gateway };
            let out = api
                .post("/v1/revocations", serde_json::to_vec(&body)?)
                .await
                .map_err(|e| explain(e, &[]))?;
            let out: trellis_control::server::Revoked = typed(out)?;
            println!(
                "revoked the identity of {} at {}: its proxies need a new join token",
                out.revoked, out.revoked_at
            );
        }
        Command::Token {
            command: TokenCommand::Revoke { id },
        } => {
            let out = api
                .delete(&format!("/v1/tokens/{id}"))
                .await
                .map_err(|e| explain(e, &[]))?;
            println!(
                "revoked the join token for {}",
                out["revoked"].as_str().unwrap_or("?")
            );
        }
        Command::Audit { limit, output } => {
            let entries = api
                .get(&format!("/v1/audit?limit={limit}"))
                .await
                .map_err(|e| explain(e, &[]))?;
            match output {
                Output::Table => {
                    let entries: Vec<trellis_control::auth::AuditEntry> = typed(entries)?;
                    println!(
                        "{:<21} {:<16} {:<28} {:<6} WHAT",
                        "TIME", "WHO", "ACTION", "STATUS"
                    );
                    for e in entries {
                        println!(
                            "{:<21} {:<16} {:<28} {:<6} {}",
                            e.time, e.who, e.action, e.status, e.what
                        );
                    }
                }
                Output::Json => println!("{}", serde_json::to_string_pretty(&entries)?),
                Output::Yaml => print!("{}", serde_yaml_ng::to_string(&entries)?),
            }
        }
        Command::Validate { .. }
        | Command::Demo { .. }
        | Command::Bootstrap { .. }
        | Command::Import(_)
        | Command::Crds { .. }
        | Command::Login { .. } => {}
    }
    Ok(())
}

async fn apply(api: &ApiClient, files: Vec<String>, dry_run: bool) -> anyhow::Result<()> {
    let (text, origin) = join(&read_sources(&files)?)?;
    if origin.is_empty() {
        bail!("no manifests in {}", files.join(", "));
    }
    let path = if dry_run {
        "/v1/apply?dryRun=true"
    } else {
        "/v1/apply"
    };
    let result = api
        .post(path, text.into_bytes())
        .await
        .map_err(|e| explain(e, &origin))?;
    let results = if dry_run {
        typed::<trellis_control::controller::Preview>(result)?.results
    } else {
        typed::<Results>(result)?.results
    };
    print_results(&results, if dry_run { " (dry run)" } else { "" });
    Ok(())
}

fn print_results(results: &[trellis_control::controller::Applied], suffix: &str) {
    for r in results {
        let ns = Some(r.namespace.as_str())
            .filter(|n| !n.is_empty())
            .map(|n| format!("{n}/"))
            .unwrap_or_default();
        println!(
            "{}/{ns}{} {}{suffix}",
            r.kind.to_ascii_lowercase(),
            r.name,
            r.action.as_str()
        );
    }
}

/// `trellis diff -f`: what the files would change, per resource and per proxy; whether
/// anything would.
async fn diff(api: &ApiClient, files: Vec<String>) -> anyhow::Result<bool> {
    let (text, origin) = join(&read_sources(&files)?)?;
    if origin.is_empty() {
        bail!("no manifests in {}", files.join(", "));
    }
    let result = api
        .post("/v1/diff", text.into_bytes())
        .await
        .map_err(|e| explain(e, &origin))?;
    let preview = typed::<trellis_control::controller::Preview>(result)?;
    print_results(&preview.results, "");
    if preview.proxies.is_empty() {
        println!("no proxy's config changes");
    }
    let value = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    for p in &preview.proxies {
        let proxies = match p.connected {
            1 => "1 proxy connected".to_string(),
            n => format!("{n} proxies connected"),
        };
        println!("\n{} ({proxies}):", p.node);
        if let Some(why) = &p.withheld {
            println!("  ! withheld: its proxies would keep their config: {why}");
        }
        for l in &p.left_out {
            println!("  ! left out: {l}");
        }
        for c in &p.changes {
            let path = if c.path.is_empty() {
                "snapshot"
            } else {
                &c.path
            };
            match (&c.before, &c.after) {
                (None, Some(a)) => println!("  + {path}: {}", value(a)),
                (Some(b), None) => println!("  - {path}: {}", value(b)),
                (Some(b), Some(a)) => println!("  ~ {path}: {} -> {}", value(b), value(a)),
                (None, None) => {}
            }
        }
    }
    let changes = preview
        .results
        .iter()
        .any(|r| r.action != trellis_control::controller::Action::Unchanged);
    Ok(changes || !preview.proxies.is_empty())
}

/// `trellis export`: every resource as the manifest it was applied as (server-set metadata
/// and status left out), as YAML documents, Namespaces and Meshes first; then, with
/// `instances`, the registry.
async fn export(api: &ApiClient, instances: bool) -> anyhow::Result<()> {
    use trellis_control::model::Kind;
    let mut docs: Vec<serde_json::Value> = Vec::new();
    for kind in [
        Kind::Namespace,
        Kind::Mesh,
        Kind::VirtualNode,
        Kind::VirtualRouter,
        Kind::VirtualService,
        Kind::VirtualGateway,
        Kind::GatewayRoute,
        Kind::Canary,
    ] {
        let path = format!("/v1/resources/{}?namespace=", kind.lower());
        for mut m in typed::<Items<Manifest>>(api.get(&path).await?)?.items {
            m.status = None;
            m.metadata.resource_version = None;
            m.metadata.generation = None;
            m.metadata.uid = None;
            m.metadata.creation_timestamp = None;
            docs.push(serde_json::to_value(&m)?);
        }
    }
    if instances {
        for i in typed::<Items<Instance>>(api.get("/v1/instances").await?)?.items {
            let mut spec = serde_json::json!({
                "service": i.service, "address": i.address, "port": i.port,
                "attributes": i.attributes, "status": i.status,
            });
            if let Some(ttl) = i.ttl_seconds {
                spec["ttlSeconds"] = serde_json::json!(ttl);
            }
            docs.push(serde_json::json!({
                "apiVersion": trellis_control::model::API_VERSION,
                "kind": "Instance",
                "metadata": { "name": i.id, "namespace": i.namespace },
                "spec": spec,
            }));
        }
    }
    for d in &docs {
        print!("---\n{}", serde_yaml_ng::to_string(d)?);
    }
    Ok(())
}

async fn delete(
    api: &ApiClient,
    files: Vec<String>,
    kind: Option<String>,
    name: Option<String>,
    namespace: String,
) -> anyhow::Result<()> {
    let result = match (files.is_empty(), kind, name) {
        (false, None, None) => {
            let (text, origin) = join(&read_sources(&files)?)?;
            api.post("/v1/delete", text.into_bytes())
                .await
                .map_err(|e| explain(e, &origin))?
        }
        (true, Some(kind), Some(name)) => {
            let kind = kind_of(&kind)?;
            let ns = if kind.namespaced() {
                namespace.as_str()
            } else {
                "_"
            };
            api.delete(&format!("/v1/resources/{}/{ns}/{name}", kind.lower()))
                .await
                .map_err(|e| explain(e, &[]))?
        }
        _ => bail!("give -f FILE, or KIND NAME"),
    };
    for r in typed::<Results>(result)?.results {
        println!("{}/{} deleted", r.kind.to_ascii_lowercase(), r.name);
    }
    Ok(())
}

async fn get(
    api: &ApiClient,
    kind: String,
    name: Option<String>,
    namespace: String,
    all_namespaces: bool,
    output: Output,
) -> anyhow::Result<()> {
    let kind = kind_of(&kind)?;
    let manifests: Vec<Manifest> = match &name {
        Some(name) => {
            let ns = if kind.namespaced() {
                namespace.as_str()
            } else {
                "_"
            };
            let path = format!("/v1/resources/{}/{ns}/{name}", kind.lower());
            let one: Manifest = typed(api.get(&path).await?)?;
            if !matches!(output, Output::Table) {
                return print_value(output, &one);
            }
            vec![one]
        }
        None => {
            let ns = if all_namespaces {
                String::new()
            } else {
                namespace.clone()
            };
            let path = format!("/v1/resources/{}?namespace={ns}", kind.lower());
            let items = typed::<Items<Manifest>>(api.get(&path).await?)?.items;
            if !matches!(output, Output::Table) {
                return print_value(output, &items);
            }
            items
        }
    };
    let rows: Vec<Vec<String>> = manifests
        .iter()
        .map(|m| {
            let usage = m
                .status
                .as_ref()
                .and_then(|s| Usage::deserialize(s).ok())
                .unwrap_or(Usage {
                    proxies: 0,
                    applied: 0,
                });
            vec![
                m.metadata.namespace.clone().unwrap_or_else(|| "-".into()),
                m.metadata.name.clone(),
                format!("{}/{}", usage.applied, usage.proxies),
                m.metadata
                    .creation_timestamp
                    .clone()
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    if rows.is_empty() {
        println!("No {} found.", kind.lower());
    } else {
        print_table(&["NAMESPACE", "NAME", "APPLIED/PROXIES", "CREATED"], &rows);
    }
    Ok(())
}

async fn describe(
    api: &ApiClient,
    kind: String,
    name: String,
    namespace: String,
) -> anyhow::Result<()> {
    let kind = kind_of(&kind)?;
    let ns = if kind.namespaced() {
        namespace.as_str()
    } else {
        "_"
    };
    let manifest: Manifest = typed(
        api.get(&format!("/v1/resources/{}/{ns}/{name}", kind.lower()))
            .await?,
    )?;
    print_value(Output::Yaml, &manifest)?;
    let status: Status = typed(api.get("/v1/status").await?)?;
    println!("proxies:");
    let key_ns = if kind.namespaced() {
        namespace.as_str()
    } else {
        ""
    };
    let usage = status
        .resources
        .iter()
        .find(|r| r.kind == kind.as_str() && r.name == name && r.namespace == key_ns);
    match usage {
        Some(u) => {
            println!(
                "  {} use it, {} applied their current snapshot",
                u.proxies, u.applied
            );
            for (i, p) in u.problems.iter().enumerate() {
                if i == 0 {
                    println!("problems (left out of proxies' snapshots):");
                }
                println!("  {p}");
            }
        }
        None => println!("  none"),
    }
    Ok(())
}

async fn status(api: &ApiClient, output: Output, local: bool) -> anyhow::Result<()> {
    let path = if local {
        "/v1/status?local=true"
    } else {
        "/v1/status"
    };
    let status: Status = typed(api.get(path).await?)?;
    if !matches!(output, Output::Table) {
        return print_value(output, &status);
    }
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> = status
        .proxies
        .iter()
        .map(|p| {
            let state = if p.nacked_version.is_some() && p.nacked_version == p.desired_version {
                "NACK"
            } else if p.withheld.is_some() {
                "WITHHELD"
            } else if p.desired_version.is_none() {
                "NO CONFIG"
            } else if p.in_sync() {
                "SYNCED"
            } else {
                "PENDING"
            };
            vec![
                p.node.clone(),
                p.kind.clone(),
                state.to_string(),
                dash(&p.desired_version),
                dash(&p.acked_version),
                dash(&p.certificate_expires),
                p.nack_reason
                    .clone()
                    .or_else(|| p.withheld.clone())
                    .unwrap_or_default(),
            ]
        })
        .collect();
    if rows.is_empty() {
        println!("No proxies connected.");
    } else {
        print_table(
            &[
                "NODE",
                "KIND",
                "STATE",
                "DESIRED",
                "ACKED",
                "CERT EXPIRES",
                "REASON",
            ],
            &rows,
        );
    }
    let rows: Vec<Vec<String>> = status
        .problems
        .iter()
        .map(|p| {
            let proxies: Vec<&str> = p.proxies.iter().map(String::as_str).collect();
            vec![
                p.source.clone(),
                p.effect.clone(),
                p.reason.clone(),
                proxies.join(","),
            ]
        })
        .collect();
    if !rows.is_empty() {
        println!();
        print_table(&["PROBLEM SOURCE", "LEFT OUT", "REASON", "PROXIES"], &rows);
    }
    println!();
    let rows: Vec<Vec<String>> = status
        .resources
        .iter()
        .map(|r| {
            let ns = Some(r.namespace.as_str())
                .filter(|n| !n.is_empty())
                .map(|n| format!("{n}/"))
                .unwrap_or_default();
            vec![
                format!("{}/{ns}{}", r.kind.to_ascii_lowercase(), r.name),
                format!("{}/{}", r.applied, r.proxies),
            ]
        })
        .collect();
    print_table(&["RESOURCE", "APPLIED/PROXIES"], &rows);
    if let Some(replica) = &status.replica {
        let leader = match &status.leader {
            Some(l) if l == replica => "this one".to_string(),
            Some(l) => l.clone(),
            None => "none now".to_string(),
        };
        println!();
        println!("Answered by control plane {replica}; leader: {leader}");
    }
    Ok(())
}

async fn instances(api: &ApiClient, command: InstancesCommand) -> anyhow::Result<()> {
    match command {
        InstancesCommand::Register {
            namespace,
            service,
            id,
            address,
            port,
            attrs,
            ttl,
        } => {
            let mut attributes = std::collections::BTreeMap::new();
            for a in attrs {
                let (k, v) = a
                    .split_once('=')
                    .with_context(|| format!("--attr {a:?}: give KEY=VALUE"))?;
                attributes.insert(k.to_string(), v.to_string());
            }
            let body = Registration {
                namespace: namespace.clone(),
                service: service.clone(),
                id: id.clone(),
                address,
                port: port.into(),
                attributes,
                status: InstanceStatus::Healthy,
                ttl_seconds: ttl.map(|t| t.as_secs().max(1).into()),
            };
            api.post("/v1/instances", serde_json::to_vec(&body)?)
                .await
                .map_err(|e| explain(e, &[]))?;
            println!("instance {namespace}/{service}/{id} registered");
        }
        InstancesCommand::Deregister(i) => {
            api.delete(&i.path()).await?;
            println!("{i} deregistered");
        }
        InstancesCommand::Drain(i) => {
            api.post(&format!("{}/drain", i.path()), Vec::new()).await?;
            println!("{i} draining");
        }
        InstancesCommand::Heartbeat(i) => {
            api.post(&format!("{}/heartbeat", i.path()), Vec::new())
                .await?;
        }
        InstancesCommand::List {
            namespace,
            service,
            output,
        } => {
            let path = format!(
                "/v1/instances?namespace={}&service={}",
                namespace.unwrap_or_default(),
                service.unwrap_or_default()
            );
            let items = typed::<Items<Instance>>(api.get(&path).await?)?.items;
            if !matches!(output, Output::Table) {
                return print_value(output, &items);
            }
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|i| {
                    let attrs: Vec<String> = i
                        .attributes
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    vec![
                        i.namespace.clone(),
                        i.service.clone(),
                        i.id.clone(),
                        format!("{}:{}", i.address, i.port),
                        i.status.as_str().to_ascii_uppercase(),
                        i.ttl_seconds.map_or("-".into(), |t| format!("{t}s")),
                        attrs.join(","),
                    ]
                })
                .collect();
            if rows.is_empty() {
                println!("No instances.");
            } else {
                print_table(
                    &[
                        "NAMESPACE",
                        "SERVICE",
                        "ID",
                        "ADDRESS",
                        "HEALTH",
                        "TTL",
                        "ATTRIBUTES",
                    ],
                    &rows,
                );
            }
        }
    }
    Ok(())
}

fn validate_offline(files: &[String]) -> anyhow::Result<()> {
    let sources = read_sources(files)?;
    let (text, origin) = join(&sources)?;
    let manifests = parse_documents(&text).map_err(|p| anyhow::anyhow!("{p:?}"))?;
    let mut state = State::new();
    let mut index = std::collections::HashMap::new();
    let mut refused = std::collections::HashSet::new();
    let mut problems = Vec::new();
    for (i, m) in manifests.into_iter().enumerate() {
        if !validate::is_mesh(&m) {
            println!(
                "{}/{} skipped (not a mesh resource)",
                m.kind.to_ascii_lowercase(),
                m.metadata.name
            );
            continue;
        }
        let key = validate::manifest_key(&m);
        match validate::admit(m, Some(i)) {
            Ok(r) => {
                index.insert(r.key.clone(), i);
                state.insert(r.key.clone(), r.into());
            }
            Err(p) => {
                refused.extend(key);
                problems.extend(p);
            }
        }
    }
    problems.extend(validate::check_apply(&state, &index, &refused));
    if problems.is_empty() {
        println!("{} resources valid", state.len());
        return Ok(());
    }
    let lines = problem_lines(&problems, &origin);
    bail!("invalid:\n  {}", lines.join("\n  "))
}

/// One line per problem: the file and document it came from, the resource, the field path and
/// the reason.
fn problem_lines(problems: &[validate::Problem], origin: &[(String, usize)]) -> Vec<String> {
    problems
        .iter()
        .map(|p| {
            let place = p
                .document
                .and_then(|d| origin.get(d))
                .map(|(file, i)| format!("{file} document {i}: "))
                .unwrap_or_default();
            let resource = p
                .resource
                .as_deref()
                .map(|r| format!("{r}: "))
                .unwrap_or_default();
            format!("{place}{resource}{}: {}", p.path, p.reason)
        })
        .collect()
}

/// Whether two control plane URLs are the same server (a trailing `/` aside).
fn same_server(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// An operator token is never sent in the clear beyond this machine: `http://` only to a
/// loopback address.
fn refuse_token_in_clear(server: &str) -> anyhow::Result<()> {
    let Ok(uri) = server.parse::<http::Uri>() else {
        return Ok(()); // The client names the bad URL.
    };
    if uri.scheme_str() != Some("http") {
        return Ok(());
    }
    let host = uri.host().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        return Ok(());
    }
    anyhow::bail!(
        "refusing to send an operator token to {server} in the clear: http:// is for a loopback address; use https:// (trellis-control --tls, with --ca-file)"
    )
}

/// What `trellis login` remembers.
#[derive(Debug, Default, Serialize, serde::Deserialize)]
struct Login {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    server: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    /// The server's CA (its certificate pinned for https).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_file: Option<PathBuf>,
}

impl Login {
    /// `$TRELLIS_CONFIG`, else `$XDG_CONFIG_HOME/trellis/config.json`, else
    /// `~/.config/trellis/config.json`.
    fn path() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("TRELLIS_CONFIG") {
            return Some(PathBuf::from(p));
        }
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
        Some(base.join("trellis").join("config.json"))
    }

    fn read() -> Self {
        Self::path()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Saves it, readable by its owner only (a file there already is made so first).
    fn write(&self) -> anyhow::Result<PathBuf> {
        use std::{
            io::Write as _,
            os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
        };
        let path = Self::path().context("no config directory: set TRELLIS_CONFIG or HOME")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot make {} private", path.display()))?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        Ok(path)
    }
}

/// `trellis canary ...`.
async fn canary_command(api: &client::ApiClient, command: CanaryCommand) -> anyhow::Result<()> {
    use trellis_control::canary::Status;
    let (name, verb) = match command {
        CanaryCommand::Status {
            name,
            namespace,
            all_namespaces,
            output,
        } => {
            let out = match &name {
                Some(name) => api.get(&format!("/v1/canaries/{namespace}/{name}")).await,
                None if all_namespaces => api.get("/v1/canaries").await,
                None => {
                    api.get(&format!("/v1/canaries?namespace={namespace}"))
                        .await
                }
            }
            .map_err(|e| explain(e, &[]))?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&out)?),
                Output::Yaml => print!("{}", serde_yaml_ng::to_string(&out)?),
                Output::Table if name.is_some() => print_canary(&typed::<Status>(out)?),
                Output::Table => {
                    let list: Items<Status> = typed(out)?;
                    println!(
                        "{:<28} {:<28} {:<12} {:<6} {:<7} {:<10} {:<8} P99",
                        "CANARY", "ROUTE", "PHASE", "STEP", "WEIGHT", "REQUESTS", "SUCCESS"
                    );
                    for c in list.items {
                        let w = c.window.clone().unwrap_or_default();
                        println!(
                            "{:<28} {:<28} {:<12} {:<6} {:<7} {:<10} {:<8} {}",
                            format!("{}/{}", c.namespace, c.name),
                            format!("{}/{}", c.router, c.route),
                            c.phase,
                            format!("{}/{}", c.step + 1, c.steps),
                            format!("{}%", c.weight),
                            w.requests,
                            w.success_rate.map_or("-".into(), |r| format!("{r:.2}%")),
                            w.p99_ms.map_or("-".into(), |p| format!("{p:.1}ms")),
                        );
                    }
                }
            }
            return Ok(());
        }
        CanaryCommand::Promote(n) => (n, "promote"),
        CanaryCommand::Abort(n) => (n, "abort"),
        CanaryCommand::Pause(n) => (n, "pause"),
        CanaryCommand::Resume(n) => (n, "resume"),
    };
    let path = format!("/v1/canaries/{}/{}/{verb}", name.namespace, name.name);
    let out = api
        .post(&path, Vec::new())
        .await
        .map_err(|e| explain(e, &[]))?;
    let status: Status = typed(out)?;
    println!(
        "canary {}/{}: {} at {}% to {}",
        status.namespace, status.name, status.phase, status.weight, status.canary
    );
    Ok(())
}

fn print_canary(c: &trellis_control::canary::Status) {
    println!("canary:  {}/{}", c.namespace, c.name);
    println!("route:   {} {:?}", c.router, c.route);
    println!("stable:  {} ({}%)", c.stable, 100 - c.weight);
    println!("canary:  {} ({}%)", c.canary, c.weight);
    println!("phase:   {} (step {} of {})", c.phase, c.step + 1, c.steps);
    if !c.message.is_empty() {
        println!("message: {}", c.message);
    }
    let g = &c.gates;
    let mut gates = vec![format!("at least {} requests", g.min_requests)];
    if let Some(r) = g.min_success_rate {
        gates.push(format!("success rate >= {r}%"));
    }
    if let Some(p) = g.max_latency_p99.and_then(|d| d.to_std()) {
        gates.push(format!("p99 <= {} ms", p.as_millis()));
    }
    println!("gates:   {}", gates.join(", "));
    let show = |w: &trellis_control::canary::Window| {
        format!(
            "{} requests, {} failed, success {}, p99 {}",
            w.requests,
            w.failures,
            w.success_rate.map_or("-".into(), |r| format!("{r:.2}%")),
            w.p99_ms.map_or("-".into(), |p| format!("{p:.1} ms"))
        )
    };
    if let Some(w) = &c.window {
        println!("this step, canary: {}", show(w));
    }
    if let Some(w) = &c.stable_window {
        println!("this step, stable: {}", show(w));
    }
    println!(
        "{:<21} {:<9} {:<7} {:<12} REASON",
        "TIME", "ACTION", "WEIGHT", "BY"
    );
    for d in &c.history {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(d.at_ms);
        let measured = d
            .window
            .as_ref()
            .map(|w| format!(" [{}]", show(w)))
            .unwrap_or_default();
        println!(
            "{:<21} {:<9} {:<7} {:<12} {}{}",
            humantime::format_rfc3339_seconds(at).to_string(),
            d.action,
            format!("{}%", d.weight),
            d.by,
            d.reason,
            measured
        );
    }
}

/// `trellis ca ...`.
async fn ca_command(api: &client::ApiClient, command: CaCommand) -> anyhow::Result<()> {
    let (step, force) = match command {
        CaCommand::Status { output } => {
            let out = api.get("/v1/ca").await.map_err(|e| explain(e, &[]))?;
            match output {
                Output::Json => {
                    println!("{}", serde_json::to_string_pretty(&out)?);
                    return Ok(());
                }
                Output::Yaml => {
                    print!("{}", serde_yaml_ng::to_string(&out)?);
                    return Ok(());
                }
                Output::Table => {}
            }
            let status: trellis_control::server::CaStatus = typed(out)?;
            let r = &status.rotation;
            println!("rotation: {}", r.stage);
            println!("current root: {}", r.current);
            if let Some(next) = &r.next {
                println!("next root:    {next} (trusted, not signing)");
            }
            for p in &r.previous {
                println!("previous root: {p} (trusted)");
            }
            println!(
                "{:<32} {:<20} {:<18} TRUSTS",
                "PROXY", "INSTANCE", "CERTIFICATE ROOT"
            );
            for p in &status.proxies {
                println!(
                    "{:<32} {:<20} {:<18} {}",
                    p.node,
                    p.instance,
                    p.certificate_root.as_deref().unwrap_or("-"),
                    p.trust_roots.join(",")
                );
            }
            return Ok(());
        }
        CaCommand::Rotate => ("rotate", false),
        CaCommand::Promote { force } => ("promote", force),
        CaCommand::Finish { force } => ("finish", force),
    };
    let path = if force {
        format!("/v1/ca/{step}?force=true")
    } else {
        format!("/v1/ca/{step}")
    };
    let out = api
        .post(&path, Vec::new())
        .await
        .map_err(|e| explain(e, &[]))?;
    let rotation: trellis_control::identity::Rotation = typed(out)?;
    println!(
        "rotation {}: root {} signs{}",
        rotation.stage,
        rotation.current,
        match (&rotation.next, rotation.previous.is_empty()) {
            (Some(next), _) => format!("; {next} is trusted and will sign once promoted"),
            (None, false) => format!(
                "; {} still trusted until finished",
                rotation.previous.join(", ")
            ),
            (None, true) => String::new(),
        }
    );
    Ok(())
}
