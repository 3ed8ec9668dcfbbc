//! The benchmark's upstream: a small fixed response over HTTP/1.1 keep-alive or h2c, on one
//! thread. `bench-upstream 127.0.0.1:0` prints the bound address on stdout;
//! `bench-upstream 127.0.0.1:0 N` serves N sockets (N endpoints, as the health check benchmark
//! needs) and prints each address on a line of its own.

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
    let sockets: usize = std::env::args()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    rt.block_on(async move {
        let mut listeners = Vec::with_capacity(sockets);
        for _ in 0..sockets {
            let listener = tokio::net::TcpListener::bind(&addr).await?;
            println!("{}", listener.local_addr()?);
            listeners.push(listener);
        }
        let mut accepting = Vec::new();
        for listener in listeners {
            accepting.push(tokio::spawn(serve(listener)));
        }
        for task in accepting {
            task.await.map_err(std::io::Error::other)??;
        }
        Ok(())
    })
}

async fn serve(listener: tokio::net::TcpListener) -> std::io::Result<()> {
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
}
