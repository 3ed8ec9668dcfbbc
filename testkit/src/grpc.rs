//! A real tonic gRPC echo server and client (unary and bidi streaming) for tests. The server also
//! serves the standard health service (`grpc.health.v1.Health/Check`), SERVING until told not.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use futures_util::{Stream, StreamExt as _};
use tokio::{net::TcpListener, task::JoinHandle};
use tonic::{Request, Response, Status, Streaming};

pub mod pb {
    tonic::include_proto!("trellis.testing");
}

/// The standard gRPC health service's messages and server.
pub mod health {
    tonic::include_proto!("grpc.health.v1");
}

pub use pb::{EchoReply, EchoRequest, echo_client::EchoClient};

#[derive(Debug)]
struct Echo {
    name: String,
    /// When set, every call fails with this code.
    fail_with: Option<tonic::Code>,
    calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl pb::echo_server::Echo for Echo {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(code) = self.fail_with {
            return Err(Status::new(code, "this server always fails"));
        }
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

#[derive(Debug)]
struct Health {
    serving: Arc<AtomicBool>,
    checks: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl health::health_server::Health for Health {
    async fn check(
        &self,
        _: Request<health::HealthCheckRequest>,
    ) -> Result<Response<health::HealthCheckResponse>, Status> {
        use health::health_check_response::ServingStatus;
        self.checks.fetch_add(1, Ordering::SeqCst);
        let status = if self.serving.load(Ordering::SeqCst) {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        Ok(Response::new(health::HealthCheckResponse {
            status: status.into(),
        }))
    }
}

/// A gRPC echo server on 127.0.0.1:0.
#[derive(Debug)]
pub struct GrpcServer {
    pub addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    serving: Arc<AtomicBool>,
    checks: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GrpcServer {
    pub async fn start(name: &str) -> Self {
        Self::start_with(name, None).await
    }

    /// A server whose unary calls all fail with `code`.
    pub async fn start_failing(name: &str, code: tonic::Code) -> Self {
        Self::start_with(name, Some(code)).await
    }

    /// Unary calls received.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// What the health service answers: SERVING (true) or NOT_SERVING.
    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::SeqCst);
    }

    /// Health checks received.
    pub fn health_checks(&self) -> usize {
        self.checks.load(Ordering::SeqCst)
    }

    async fn start_with(name: &str, fail_with: Option<tonic::Code>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = pb::echo_server::EchoServer::new(Echo {
            name: name.into(),
            fail_with,
            calls: calls.clone(),
        });
        let serving = Arc::new(AtomicBool::new(true));
        let checks = Arc::new(AtomicUsize::new(0));
        let health = health::health_server::HealthServer::new(Health {
            serving: serving.clone(),
            checks: checks.clone(),
        });
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .add_service(health)
                .serve_with_incoming(incoming)
                .await;
        });
        Self {
            addr,
            calls,
            serving,
            checks,
            task,
        }
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
