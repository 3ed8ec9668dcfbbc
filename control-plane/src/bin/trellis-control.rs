//! trellis-control: serves the mesh API and the config stream on one address.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use clap::Parser as _;
use trellis_control::{controller::Controller, server, store::embedded::EmbeddedStore};

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
    /// Address of the HTTP API and the gRPC config stream.
    #[arg(long, env = "TRELLIS_CONTROL_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "TRELLIS_CONTROL_LOG", default_value = "info")]
    log: String,
}

fn main() -> std::process::ExitCode {
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        let store = EmbeddedStore::open(&args.data_dir)
            .with_context(|| format!("cannot open the store in {}", args.data_dir.display()))?;
        let controller = Controller::start(Arc::new(store))
            .await
            .context("cannot load the store")?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        tracing::info!(listener = %"api", addr = %listener.local_addr()?, "listening");
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
        server::serve(listener, controller, shutdown).await;
        tracing::info!("stopped");
        Ok(())
    })
}
