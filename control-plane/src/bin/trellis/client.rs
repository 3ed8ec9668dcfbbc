//! A small client for the control plane's HTTP API, for the `trellis` CLI and its demo (and,
//! included by path, the config-propagation benchmark).

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("cannot reach the control plane at {server}: {reason}")]
    Unreachable { server: String, reason: String },
    #[error("invalid server URL {0:?}: give http://HOST:PORT or https://HOST:PORT")]
    BadUrl(String),
    #[error("{0}")]
    Tls(String),
    #[error("the control plane answered {status}: {message}")]
    Api {
        status: StatusCode,
        message: String,
        body: Value,
    },
}

#[derive(Clone)]
pub(crate) struct ApiClient {
    server: String,
    authority: String,
    /// The operator's bearer token, when the control plane requires one.
    token: Option<String>,
    /// For an `https://` server: the connector trusting its CA, and the name it is reached by.
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    https: bool,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    pub(crate) fn new(server: &str) -> Result<Self, ClientError> {
        let uri: Uri = server
            .parse()
            .map_err(|_| ClientError::BadUrl(server.into()))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(ClientError::BadUrl(server.into())),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| ClientError::BadUrl(server.into()))?
            .to_string();
        Ok(Self {
            server: server.trim_end_matches('/').to_string(),
            authority,
            token: None,
            tls: None,
            https,
        })
    }

    /// Trusts the CA certificates in `ca_pem` for an `https://` server.
    #[allow(dead_code)]
    pub(crate) fn with_ca(mut self, ca_pem: Option<&str>) -> Result<Self, ClientError> {
        use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
        let Some(ca_pem) = ca_pem.filter(|_| self.https) else {
            return Ok(self);
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| ClientError::Tls(format!("CA file: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| ClientError::Tls(format!("CA file: {e}")))?;
        }
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let host = self
            .authority
            .rsplit_once(':')
            .map_or(self.authority.as_str(), |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let name = ServerName::try_from(host)
            .map_err(|e| ClientError::Tls(format!("server name: {e}")))?;
        self.tls = Some((
            tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)),
            name,
        ));
        Ok(self)
    }

    /// Sends `token` as the operator's bearer token.
    #[allow(dead_code)]
    pub(crate) fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// Sends a request; a non-2xx answer becomes [`ClientError::Api`] with the server's message.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Value, ClientError> {
        let unreachable = |reason: String| ClientError::Unreachable {
            server: self.server.clone(),
            reason,
        };
        let stream =
            tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&self.authority))
                .await
                .map_err(|_| unreachable("connect timed out".into()))?
                .map_err(|e| unreachable(e.to_string()))?;
        let mut sender = match (&self.tls, self.https) {
            (None, false) => {
                let (sender, conn) = http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| unreachable(e.to_string()))?;
                tokio::spawn(conn);
                sender
            }
            (Some((connector, name)), _) => {
                let tls = connector
                    .connect(name.clone(), stream)
                    .await
                    .map_err(|e| unreachable(format!("TLS: {e}")))?;
                let (sender, conn) = http1::handshake(TokioIo::new(tls))
                    .await
                    .map_err(|e| unreachable(e.to_string()))?;
                tokio::spawn(conn);
                sender
            }
            (None, true) => {
                return Err(ClientError::Tls(
                    "an https control plane needs its CA: --ca-file (trellis-control --tls writes DATA_DIR/ca.pem)".into(),
                ));
            }
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.authority)
            .header("content-type", "application/yaml");
        if let Some(token) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
        if status.is_success() {
            return Ok(value);
        }
        let message = value["error"].as_str().unwrap_or("error").to_string();
        Err(ClientError::Api {
            status,
            message,
            body: value,
        })
    }

    pub(crate) async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call(Method::GET, path, None).await
    }

    pub(crate) async fn post(&self, path: &str, body: Vec<u8>) -> Result<Value, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub(crate) async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.call(Method::DELETE, path, None).await
    }
}
