//! A real tonic gRPC echo server and client (unary and bidi streaming) for tests.

use std::{net::SocketAddr, pin::Pin};

use futures_util::{Stream, StreamExt as _};
use tokio::{net::TcpListener, task::JoinHandle};
use tonic::{Request, Response, Status, Streaming};

pub mod pb {
    tonic::include_proto!("trellis.testing");
}

pub use pb::{EchoReply, EchoRequest, echo_client::EchoClient};

#[derive(Debug)]
struct Echo {
    name: String,
}

#[tonic::async_trait]
impl pb::echo_server::Echo for Echo {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let message = req.into_inner().message;
        if let Some(code) = message.strip_prefix("fail:") {
            let code = code.parse::<i32>().unwrap_or(2);
            return Err(Status::new(tonic::Code::from(code), "asked to fail"));
        }
        Ok(Response::new(EchoReply {
            message,
            server: self.name.clone(),
        }))
    }

    type BidiStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

    async fn bidi(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let name = self.name.clone();
        let out = req.into_inner().map(move |m| {
            m.map(|m| EchoReply {
                message: m.message,
                server: name.clone(),
            })
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// A gRPC echo server on 127.0.0.1:0.
#[derive(Debug)]
pub struct GrpcServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GrpcServer {
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = pb::echo_server::EchoServer::new(Echo { name: name.into() });
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
        });
        Self { addr, task }
    }
}

/// A client whose requests go to `proxy` (a proxy socket) with `:authority` = `authority`.
pub async fn client_via(
    proxy: SocketAddr,
    authority: &str,
) -> Result<EchoClient<tonic::transport::Channel>, tonic::transport::Error> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{proxy}"))?
        .origin(format!("http://{authority}").parse().unwrap())
        .connect()
        .await?;
    Ok(EchoClient::new(channel))
}
