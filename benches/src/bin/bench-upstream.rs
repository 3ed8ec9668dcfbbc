//! The benchmark's upstream: a small fixed response over HTTP/1.1 keep-alive or h2c, on one
//! thread. `bench-upstream 127.0.0.1:0` prints the bound address on stdout.

#![allow(clippy::print_stdout)]

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};

const BODY: &[u8] = b"hello from the upstream\n";

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        println!("{}", listener.local_addr()?);
        let server = auto::Builder::new(TokioExecutor::new());
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let server = server.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(BODY))))
                });
                let _ = server.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    })
}
