//! trellis-control: serves the mesh API and the config stream on one address.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use clap::Parser as _;
use trellis_control::{
    controller::Controller,
    registry::{AddressPolicy, Cidr},
    server,
    store::embedded::EmbeddedStore,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Source {
    Embedded,
    Kubernetes,
}

#[derive(Debug, clap::Parser)]
#[command(name = "trellis-control", version, about = "Trellis control plane")]
struct Args {
    /// Directory of the embedded store.
    #[arg(
        long,
        env = "TRELLIS_CONTROL_DATA_DIR",
        default_value = "./trellis-data"
    )]
    data_dir: PathBuf,
    /// Where the mesh and the registry are kept: the embedded store in --data-dir (default), or
    /// `etcd://HOST:PORT[,HOST:PORT...]` (`etcds://` for TLS), which several control planes
    /// share. --data-dir keeps local files either way (the CA bundle file, the first admin's
    /// token).
    #[arg(long, env = "TRELLIS_CONTROL_STORE")]
    store: Option<String>,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Address of the HTTP API and the gRPC config stream.
    #[arg(long, env = "TRELLIS_CONTROL_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// The SPIFFE trust domain of workload identities.
    #[arg(long, env = "TRELLIS_CONTROL_TRUST_DOMAIN", default_value = trellis_control::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// The root CA's certificate (PEM) to issue with; without it (and --ca-key) a root is
    /// created at first start and kept in the store.
    #[arg(long, env = "TRELLIS_CONTROL_CA_CERT", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The root CA's private key (PEM).
    #[arg(long, env = "TRELLIS_CONTROL_CA_KEY", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// How long workload certificates live (proxies renew them at half-life); at least 10
    /// minutes.
    #[arg(long, env = "TRELLIS_CONTROL_WORKLOAD_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    workload_ttl: std::time::Duration,
    /// Operators authenticate with a bearer token (admins write, viewers read); at first start
    /// the first admin's token is written to DATA_DIR/admin-token. Implies --require-identity:
    /// proxies bring a join token or a workload certificate.
    #[arg(long, env = "TRELLIS_CONTROL_AUTH")]
    auth: bool,
    /// Serve the API and the config stream over TLS, with a certificate from the mesh's CA
    /// for --tls-name (the CA's certificate is written to DATA_DIR/ca.pem for clients to trust).
    #[arg(long, env = "TRELLIS_CONTROL_TLS")]
    tls: bool,
    /// A name (DNS or IP) clients reach this control plane by, for its TLS certificate
    /// (repeatable; default: localhost, 127.0.0.1, ::1 and the --listen IP).
    #[arg(
        long = "tls-name",
        env = "TRELLIS_CONTROL_TLS_NAMES",
        value_delimiter = ','
    )]
    tls_names: Vec<String>,
    /// Listen on a non-loopback address without both --tls and --auth.
    #[arg(long, env = "TRELLIS_CONTROL_INSECURE")]
    insecure: bool,
    /// Serve the sidecar injection webhook (POST /v1/webhooks/inject, AdmissionReview v1),
    /// injecting this trellis-proxy image.
    #[arg(long, env = "TRELLIS_CONTROL_INJECT_IMAGE")]
    inject_image: Option<String>,
    /// The control plane URL injected proxies follow (default: this one's, by --tls-name).
    #[arg(
        long,
        env = "TRELLIS_CONTROL_INJECT_CONTROL_PLANE",
        requires = "inject_image"
    )]
    inject_control_plane: Option<String>,
    /// The lease of the leader among the control planes sharing the store (renewed every
    /// third of it): how long its duties wait when it dies (a clean stop hands over at once).
    #[arg(long, env = "TRELLIS_CONTROL_LEADER_LEASE", default_value = "10s", value_parser = humantime::parse_duration)]
    leader_lease: std::time::Duration,
    /// Audit entries older than this are forgotten (checked hourly by the leader among the
    /// control planes sharing the store, and when one becomes leader).
    #[arg(long, env = "TRELLIS_CONTROL_AUDIT_RETENTION", default_value = "90d", value_parser = humantime::parse_duration)]
    audit_retention: std::time::Duration,
    /// At most this many audit entries are kept (the oldest go first).
    #[arg(
        long,
        env = "TRELLIS_CONTROL_AUDIT_MAX_ENTRIES",
        default_value_t = 100_000
    )]
    audit_max_entries: usize,
    /// Proxies must present a join token or a workload certificate naming their node to get
    /// its snapshot (always so with --auth).
    #[arg(long, env = "TRELLIS_CONTROL_REQUIRE_IDENTITY")]
    require_identity: bool,
    /// Permits registering instances at addresses in this range (CIDR, or one address) that are
    /// otherwise refused: link-local, multicast, unspecified, broadcast, metadata services.
    /// Repeatable; the environment variable takes a comma-separated list.
    #[arg(
        long = "allow-registration-cidr",
        value_name = "CIDR",
        env = "TRELLIS_CONTROL_ALLOW_REGISTRATION_CIDR",
        value_delimiter = ','
    )]
    allow_registration_cidr: Vec<Cidr>,
    /// Where the mesh resources and the registry come from: `embedded` (the API writes them to
    /// the store) or `kubernetes` (the cluster's custom resources, Namespaces, Pods and
    /// Services; the API is read-only for them). The store under --data-dir keeps identities
    /// either way.
    #[arg(
        long,
        env = "TRELLIS_CONTROL_SOURCE",
        value_enum,
        default_value = "embedded"
    )]
    source: Source,
    /// With `--source kubernetes`: the kubeconfig to use (default: in-cluster configuration,
    /// else $KUBECONFIG or ~/.kube/config).
    #[arg(long, env = "TRELLIS_CONTROL_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// With `--source kubernetes`: the namespace of the leader-election Lease (replicas of one
    /// control plane share it; only the holder writes statuses).
    #[arg(long, env = "POD_NAMESPACE", default_value = "trellis-system")]
    lease_namespace: String,
    /// With `--source kubernetes`: how long the Lease is held after each renewal (how long
    /// statuses may go unwritten when the leader dies).
    #[arg(long, env = "TRELLIS_CONTROL_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: std::time::Duration,
    /// With `--source kubernetes`: this replica's name in the Lease.
    #[arg(long, env = "POD_NAME")]
    lease_identity: Option<String>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "TRELLIS_CONTROL_LOG", default_value = "info")]
    log: String,
}

/// `trellis-control migrate`: copies a mesh from one store to an empty other one.
#[derive(Debug, clap::Parser)]
#[command(
    name = "trellis-control migrate",
    about = "Copy every key of one store into an empty other one (embedded directory or etcd://), checked by a content hash; the control planes of both must be stopped"
)]
struct MigrateArgs {
    /// The source: an embedded store's directory, or etcd://HOST:PORT[,...].
    #[arg(long)]
    from: String,
    /// The target, empty: a directory, or etcd://HOST:PORT[,...].
    #[arg(long)]
    to: String,
    #[command(flatten)]
    etcd: EtcdArgs,
}

/// How to reach etcd (for --store, or a migration's etcd side).
#[derive(Debug, Clone, clap::Args)]
struct EtcdArgs {
    /// The prefix of every key in etcd (several meshes may share one cluster).
    #[arg(long, env = "TRELLIS_CONTROL_ETCD_PREFIX", default_value = "/trellis/")]
    etcd_prefix: String,
    /// The CA (PEM file) etcd's certificates chain to.
    #[arg(long, env = "TRELLIS_CONTROL_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// This control plane's client certificate and key (PEM files) for etcd.
    #[arg(long, env = "TRELLIS_CONTROL_ETCD_CERT", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    #[arg(long, env = "TRELLIS_CONTROL_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
}

/// The store `spec` names: etcd (`etcd://`, `etcds://`) or the embedded one in a directory.
async fn open_store(
    spec: &str,
    etcd: &EtcdArgs,
) -> anyhow::Result<Arc<dyn trellis_control::store::Store>> {
    use trellis_control::store::etcd::{EtcdOptions, EtcdStore};
    if !(spec.starts_with("etcd://") || spec.starts_with("etcds://")) {
        let dir = std::path::Path::new(spec);
        return Ok(Arc::new(EmbeddedStore::open(dir).with_context(|| {
            format!("cannot open the store in {}", dir.display())
        })?));
    }
    let mut options = EtcdOptions::from_url(spec).map_err(anyhow::Error::msg)?;
    options.prefix = etcd.etcd_prefix.clone();
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
    };
    options.ca = etcd.etcd_ca.as_ref().map(read).transpose()?;
    if let (Some(cert), Some(key)) = (&etcd.etcd_cert, &etcd.etcd_key) {
        options.identity = Some((read(cert)?, read(key)?));
    }
    tracing::info!(endpoints = %options.endpoints.join(","), prefix = %options.prefix, "the store is etcd");
    Ok(Arc::new(
        EtcdStore::connect(&options)
            .await
            .with_context(|| format!("cannot reach etcd at {spec}"))?,
    ))
}

fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let from = open_store(&args.from, &args.etcd).await?;
        let to = open_store(&args.to, &args.etcd).await?;
        let done = trellis_control::store::migrate::migrate(from.as_ref(), to.as_ref())
            .await
            .context("migration failed")?;
        let said = format!(
            "migrated {} keys ({} held by leases, given new ones) from {} to {}; content hash {:016x} on both\n",
            done.keys, done.leased, args.from, args.to, done.hash
        );
        std::io::Write::write_all(&mut std::io::stdout(), said.as_bytes())?;
        Ok(())
    })
}

fn main() -> std::process::ExitCode {
    if std::env::args().nth(1).as_deref() == Some("migrate") {
        let args = MigrateArgs::parse_from(std::env::args().skip(1));
        return match migrate(args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("trellis-control migrate: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let args = Args::parse();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-control: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log).context("invalid --log")?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if args.workload_ttl < trellis_control::identity::MIN_WORKLOAD_TTL {
        anyhow::bail!(
            "--workload-ttl {}: must be at least {} (proxies renew at half-life, at most every 30s)",
            humantime::format_duration(args.workload_ttl),
            humantime::format_duration(trellis_control::identity::MIN_WORKLOAD_TTL)
        );
    }
    // Until the API is served over TLS, a non-loopback address carries tokens and mesh config
    // in the clear: only when the operator says so.
    let guarded = args.tls && args.auth;
    if !(args.listen.ip().is_loopback() || guarded || args.insecure) {
        anyhow::bail!(
            "--listen {} is not a loopback address: it needs --tls and --auth (or --insecure to serve in the clear)",
            args.listen
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        let store = match &args.store {
            None => open_store(&args.data_dir.display().to_string(), &args.etcd).await?,
            Some(url) => {
                std::fs::create_dir_all(&args.data_dir)
                    .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
                if !(url.starts_with("etcd://") || url.starts_with("etcds://")) {
                    anyhow::bail!("--store {url}: etcd://HOST:PORT[,HOST:PORT...] (without --store: the embedded store in --data-dir)");
                }
                open_store(url, &args.etcd).await?
            }
        };
        let controller = Controller::start(store)
            .await
            .context("cannot load the store")?;
        if args.store.is_some() {
            // Several control planes share the store: each publishes its proxies for the
            // others' `trellis status`.
            controller.publish_status(std::time::Duration::from_secs(2));
            // And what their proxies measured, for the leader's canaries.
            controller.publish_measurements(trellis_control::canary::MEASURE_INTERVAL);
        }
        let supplied = match (&args.ca_cert, &args.ca_key) {
            (Some(cert), Some(key)) => Some((
                std::fs::read_to_string(cert)
                    .with_context(|| format!("cannot read {}", cert.display()))?,
                std::fs::read_to_string(key)
                    .with_context(|| format!("cannot read {}", key.display()))?,
            )),
            _ => None,
        };
        let ca = trellis_control::identity::Ca::load_or_create(
            controller.store().as_ref(),
            &args.trust_domain,
            supplied,
            args.workload_ttl,
        )
        .await
        .context("cannot set up the certificate authority")?;
        let ca = Arc::new(ca);
        if args.store.is_some() {
            // Another control plane on the store may take a rotation's steps.
            ca.follow_store(controller.store().clone());
        }
        let tls = if args.tls {
            let mut names = args.tls_names.clone();
            if names.is_empty() {
                names = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
                if !args.listen.ip().is_unspecified() && !args.listen.ip().is_loopback() {
                    names.push(args.listen.ip().to_string());
                }
            }
            let ca_file = args.data_dir.join("ca.pem");
            ca.keep_bundle_file(ca_file.clone())
                .with_context(|| format!("cannot write {}", ca_file.display()))?;
            tracing::info!(names = %names.join(","), ca = %ca_file.display(), "serving over TLS; clients trust the CA in this file");
            Some(
                trellis_control::server::tls_config(ca.clone(), names)
                    .map_err(anyhow::Error::msg)?,
            )
        } else {
            None
        };
        // With operators authenticated, the config stream is not left open to anyone: a
        // proxy proves its node with a join token or a workload certificate.
        let require_identity = args.require_identity || args.auth;
        if args.auth && !args.require_identity {
            tracing::info!("--auth: proxies need a join token or a workload certificate");
        }
        controller.set_identity(ca, require_identity);
        if let Some(image) = &args.inject_image {
            let scheme = if args.tls { "https" } else { "http" };
            let host = args
                .tls_names
                .first()
                .cloned()
                .unwrap_or_else(|| args.listen.ip().to_string());
            let control_plane = args.inject_control_plane.clone().unwrap_or_else(|| {
                format!("{scheme}://{host}:{}", args.listen.port())
            });
            tracing::info!(%image, %control_plane, "serving the sidecar injection webhook");
            controller.set_injector(trellis_control::inject::Injector {
                image: image.clone(),
                control_plane,
                control_plane_ca: None,
            });
        }
        if args.auth {
            controller.require_auth();
            match trellis_control::auth::bootstrap(controller.store().as_ref(), &args.data_dir).await {
                Ok(Some(path)) => tracing::info!(path = %path.display(), "the first admin's token is in this file: trellis login --with-token \"$(cat FILE)\""),
                Ok(None) => {}
                Err(e) => anyhow::bail!("cannot create the first admin: {e}"),
            }
        }
        if !args.allow_registration_cidr.is_empty() {
            let ranges: Vec<String> = args
                .allow_registration_cidr
                .iter()
                .map(ToString::to_string)
                .collect();
            tracing::warn!(ranges = %ranges.join(","), "registrations allowed in refused ranges");
        }
        controller.set_registration_policy(AddressPolicy::allowing(args.allow_registration_cidr));
        if args.source == Source::Kubernetes {
            let client = trellis_control::kubernetes::client(args.kubeconfig.as_deref())
                .await
                .context("cannot reach Kubernetes")?;
            let identity = args.lease_identity.clone().unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_default();
                format!("{host}-{}", std::process::id())
            });
            tracing::info!(lease_namespace = %args.lease_namespace, %identity, "mesh resources and the registry come from Kubernetes");
            trellis_control::kubernetes::spawn(
                client,
                controller.clone(),
                trellis_control::kubernetes::Options {
                    lease_namespace: args.lease_namespace.clone(),
                    identity,
                    lease_duration: args.lease_duration,
                },
            );
        }
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        tracing::info!(listener = %"api", addr = %listener.local_addr()?, "listening");
        // Campaigning once nothing else can fail to start: a replica that won and then exited
        // on an error would hold the key for a lease.
        let leadership = controller.campaign(args.leader_lease);
        // Canaries: the leader's duty.
        controller.run_canaries();
        {
            // The audit log's retention: the leader's duty, when it becomes leader and hourly.
            let store = controller.store().clone();
            let (retention, keep) = (args.audit_retention, args.audit_max_entries);
            let mut leader = leadership.subscribe();
            tokio::spawn(async move {
                loop {
                    if leader.wait_for(|l| l.me).await.is_err() {
                        return;
                    }
                    let before = std::time::SystemTime::now() - retention;
                    match trellis_control::auth::prune_audit(store.as_ref(), before, keep).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(entries = n, "audit entries past their retention forgotten"),
                        Err(e) => tracing::warn!(error = %e, "cannot prune the audit log"),
                    }
                    tokio::select! {
                        () = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
                        lost = leader.wait_for(|l| !l.me) => if lost.is_err() { return },
                    }
                }
            });
        }
        let shutdown = async {
            use tokio::signal::unix::{SignalKind, signal};
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(mut t), Ok(mut i)) => {
                    tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
                }
                _ => std::future::pending::<()>().await,
            }
        };
        server::serve_tls(listener, controller, tls, shutdown).await;
        leadership.resign().await;
        tracing::info!("stopped");
        Ok(())
    })
}
