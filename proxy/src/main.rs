use clap::Parser as _;

fn main() -> std::process::ExitCode {
    // `trellis-proxy init ...`: the traffic capture rules (an init container's job).
    if std::env::args().nth(1).as_deref() == Some("init") {
        return match trellis_proxy::capture::main(std::env::args().skip(1)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("trellis-proxy init: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    // `trellis-proxy ready [--admin-addr ADDR]`: a health check command for runtimes that run
    // one in the container (ECS `healthCheck`, Docker HEALTHCHECK): exits 0 once the proxy
    // serves.
    if std::env::args().nth(1).as_deref() == Some("ready") {
        return match trellis_proxy::admin::probe_ready(std::env::args().skip(2)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("trellis-proxy ready: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let config = trellis_proxy::config::ProxyConfig::parse();
    match trellis_proxy::run(config) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-proxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
