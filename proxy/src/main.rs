use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let config = trellis_proxy::config::ProxyConfig::parse();
    match trellis_proxy::run(config) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-proxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
