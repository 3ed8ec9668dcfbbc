//! Access logs: one line per request, written off the request path by one writer task.
//!
//! A line goes to one [`Sink`]: the snapshot's (a VirtualNode's or VirtualGateway's
//! `logging.accessLog`: a file and an Envoy-style format) while it has one, else the
//! `--access-log` flag's (Trellis's JSON line). Formats are compiled with the snapshot: the
//! request path only copies the values a format names (its headers among them) and the writer
//! renders the line.

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Version};
use serde_json::{Map, Value};
use tokio::{io::AsyncWriteExt, sync::mpsc};

use crate::metrics::ProxyMetrics;

/// Lines queued for the writer; more are dropped (and counted) rather than slowing requests.
const QUEUE: usize = 16 * 1024;

/// Open files the writer keeps; the least recently written is closed beyond that.
const MAX_FILES: usize = 16;

/// Envoy's default format, which App Mesh's access logs used when a manifest names no format.
pub const ENVOY_DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// The `--access-log` flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Off,
    Stdout,
    File(PathBuf),
}

impl std::str::FromStr for AccessLogTarget {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "off" | "" => Self::Off,
            "stdout" | "-" => Self::Stdout,
            path => Self::File(path.into()),
        })
    }
}

/// Where a sink's lines go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    Stdout,
    Stderr,
    File(PathBuf),
}

impl Destination {
    /// A path from a manifest: `/dev/stdout` and `/dev/stderr` are the proxy's own streams.
    fn from_path(path: &str) -> Self {
        match path {
            "/dev/stdout" => Self::Stdout,
            "/dev/stderr" => Self::Stderr,
            path => Self::File(path.into()),
        }
    }
}

/// A compiled access log: where its lines go and what they say.
#[derive(Debug)]
pub struct Sink {
    destination: Destination,
    format: Format,
    /// The request and response headers the format names, copied per request.
    request_headers: Box<[HeaderName]>,
    response_headers: Box<[HeaderName]>,
}

#[derive(Debug)]
enum Format {
    /// Trellis's JSON line (the `--access-log` flag's).
    Trellis,
    Text(Vec<Piece>),
    /// Keys with their values, in the manifest's order.
    Json(Vec<(String, Vec<Piece>)>),
}

#[derive(Debug, PartialEq)]
enum Piece {
    Literal(String),
    Command(Command, Option<usize>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Command {
    StartTime,
    Request(Field, Option<Field>),
    Response(usize, Option<usize>),
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    BytesReceived,
    BytesSent,
    Duration,
    Protocol,
    UpstreamHost,
    UpstreamCluster,
    RouteName,
    AttemptCount,
    DownstreamRemote { port: bool },
    DownstreamLocal { port: bool },
    RequestedServerName,
    Hostname,
}

/// A request value `%REQ(...)%` names: a pseudo-header or the index of a copied header.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Field {
    Method,
    Path,
    Authority,
    Scheme,
    Header(usize),
}

/// The commands Trellis renders, as Envoy names them (listed in refusals).
const COMMANDS: &str = "START_TIME, REQ(H?ALT):N, RESP(H?ALT):N, RESPONSE_CODE, RESPONSE_FLAGS, RESPONSE_CODE_DETAILS, BYTES_RECEIVED, BYTES_SENT, DURATION, PROTOCOL, UPSTREAM_HOST, UPSTREAM_CLUSTER, ROUTE_NAME, UPSTREAM_REQUEST_ATTEMPT_COUNT, DOWNSTREAM_REMOTE_ADDRESS, DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT, DOWNSTREAM_LOCAL_ADDRESS, DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT, REQUESTED_SERVER_NAME, HOSTNAME";

/// A format a manifest asked for.
#[derive(Debug, Clone, Copy)]
pub enum FormatSpec<'a> {
    /// None given: Envoy's default text format.
    Default,
    Text(&'a str),
    Json(&'a [(String, String)]),
}

/// Why a format cannot be compiled: the JSON field (if any) and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError {
    pub json_field: Option<usize>,
    pub reason: String,
}

impl Sink {
    /// The flag's sink, None when off.
    pub fn from_flag(target: &AccessLogTarget) -> Option<Self> {
        let destination = match target {
            AccessLogTarget::Off => return None,
            AccessLogTarget::Stdout => Destination::Stdout,
            AccessLogTarget::File(path) => Destination::File(path.clone()),
        };
        Some(Self {
            destination,
            format: Format::Trellis,
            request_headers: Box::new([]),
            response_headers: Box::new([]),
        })
    }

    /// Compiles a manifest's access log: `path` and its format.
    pub fn compile(path: &str, format: FormatSpec<'_>) -> Result<Self, FormatError> {
        let mut headers = Headers::default();
        let format = match format {
            FormatSpec::Default => {
                Format::Text(parse(ENVOY_DEFAULT_FORMAT, &mut headers).map_err(|reason| {
                    FormatError {
                        json_field: None,
                        reason,
                    }
                })?)
            }
            FormatSpec::Text(text) => {
                let mut pieces = parse(text, &mut headers).map_err(|reason| FormatError {
                    json_field: None,
                    reason,
                })?;
                // Lines end with a newline, whether or not the format writes one.
                if !text.ends_with('\n') {
                    pieces.push(Piece::Literal("\n".into()));
                }
                Format::Text(pieces)
            }
            FormatSpec::Json(fields) => {
                let mut keys = std::collections::HashSet::new();
                let mut out = Vec::with_capacity(fields.len());
                for (i, (key, value)) in fields.iter().enumerate() {
                    let err = |reason| FormatError {
                        json_field: Some(i),
                        reason,
                    };
                    if !keys.insert(key.as_str()) {
                        return Err(err(format!("duplicate key {key:?}")));
                    }
                    out.push((key.clone(), parse(value, &mut headers).map_err(err)?));
                }
                Format::Json(out)
            }
        };
        Ok(Self {
            destination: Destination::from_path(path),
            format,
            request_headers: headers.request.into(),
            response_headers: headers.response.into(),
        })
    }
}

/// Header names a format copies, each once.
#[derive(Default)]
struct Headers {
    request: Vec<HeaderName>,
    response: Vec<HeaderName>,
}

fn index_of(list: &mut Vec<HeaderName>, name: HeaderName) -> usize {
    list.iter().position(|h| *h == name).unwrap_or_else(|| {
        list.push(name);
        list.len() - 1
    })
}

/// Parses an Envoy format string: literal text and `%COMMAND%`, `%COMMAND(ARG)%`,
/// `%COMMAND(ARG):MAX_LENGTH%` operators.
fn parse(format: &str, headers: &mut Headers) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut rest = format;
    while let Some(start) = rest.find('%') {
        literal.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let name_len = after
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..name_len];
        let mut tail = &after[name_len..];
        if name.is_empty() {
            return Err(format!(
                "a % at byte {start} does not start a command (write %COMMAND%; a literal % is not supported)"
            ));
        }
        let arg = if let Some(t) = tail.strip_prefix('(') {
            let close = t
                .find(')')
                .ok_or_else(|| format!("%{name}( has no closing parenthesis"))?;
            tail = &t[close + 1..];
            Some(&t[..close])
        } else {
            None
        };
        let max = if let Some(t) = tail.strip_prefix(':') {
            let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let n = t[..digits]
                .parse::<usize>()
                .map_err(|_| format!("%{name}: the maximum length after ':' must be a number"))?;
            tail = &t[digits..];
            Some(n)
        } else {
            None
        };
        let Some(t) = tail.strip_prefix('%') else {
            return Err(format!("%{name} is not closed by %"));
        };
        rest = t;
        if !literal.is_empty() {
            pieces.push(Piece::Literal(std::mem::take(&mut literal)));
        }
        pieces.push(Piece::Command(command(name, arg, headers)?, max));
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        pieces.push(Piece::Literal(literal));
    }
    Ok(pieces)
}

fn command(name: &str, arg: Option<&str>, headers: &mut Headers) -> Result<Command, String> {
    let no_arg = |c| match arg {
        None => Ok(c),
        Some(_) => Err(format!("%{name}% takes no argument")),
    };
    match name {
        "START_TIME" => match arg {
            None => Ok(Command::StartTime),
            Some(_) => Err("%START_TIME(...)% with a time format is not supported by Trellis: %START_TIME% is written in RFC 3339, UTC, with milliseconds".into()),
        },
        "REQ" | "RESP" => {
            let arg = arg.ok_or_else(|| format!("%{name}(HEADER)% needs a header name"))?;
            let (first, alt) = match arg.split_once('?') {
                Some((a, b)) => (a, Some(b)),
                None => (arg, None),
            };
            if name == "REQ" {
                let mut field = |h: &str| request_field(h, headers);
                Ok(Command::Request(field(first)?, alt.map(field).transpose()?))
            } else {
                let mut field = |h: &str| -> Result<usize, String> {
                    let name = HeaderName::from_bytes(h.as_bytes())
                        .map_err(|_| format!("%RESP({h})%: not a header name"))?;
                    Ok(index_of(&mut headers.response, name))
                };
                Ok(Command::Response(field(first)?, alt.map(field).transpose()?))
            }
        }
        "RESPONSE_CODE" => no_arg(Command::ResponseCode),
        "RESPONSE_FLAGS" => no_arg(Command::ResponseFlags),
        "RESPONSE_CODE_DETAILS" => no_arg(Command::ResponseCodeDetails),
        "BYTES_RECEIVED" => no_arg(Command::BytesReceived),
        "BYTES_SENT" => no_arg(Command::BytesSent),
        "DURATION" => no_arg(Command::Duration),
        "PROTOCOL" => no_arg(Command::Protocol),
        "UPSTREAM_HOST" => no_arg(Command::UpstreamHost),
        "UPSTREAM_CLUSTER" => no_arg(Command::UpstreamCluster),
        "ROUTE_NAME" => no_arg(Command::RouteName),
        "UPSTREAM_REQUEST_ATTEMPT_COUNT" => no_arg(Command::AttemptCount),
        "DOWNSTREAM_REMOTE_ADDRESS" | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => {
            no_arg(Command::DownstreamRemote { port: true })
        }
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => {
            no_arg(Command::DownstreamRemote { port: false })
        }
        "DOWNSTREAM_LOCAL_ADDRESS" => no_arg(Command::DownstreamLocal { port: true }),
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => no_arg(Command::DownstreamLocal { port: false }),
        "REQUESTED_SERVER_NAME" => no_arg(Command::RequestedServerName),
        "HOSTNAME" => no_arg(Command::Hostname),
        other => Err(format!(
            "%{other}% is not supported by Trellis (supported: {COMMANDS})"
        )),
    }
}

fn request_field(h: &str, headers: &mut Headers) -> Result<Field, String> {
    Ok(match h.to_ascii_lowercase().as_str() {
        ":method" => Field::Method,
        ":path" => Field::Path,
        ":authority" | "host" => Field::Authority,
        ":scheme" => Field::Scheme,
        p if p.starts_with(':') => {
            return Err(format!(
                "%REQ({h})%: the pseudo-header {h} is not supported by Trellis (:METHOD, :PATH, :AUTHORITY, :SCHEME are)"
            ));
        }
        _ => {
            let name = HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| format!("%REQ({h})%: not a header name"))?;
            Field::Header(index_of(&mut headers.request, name))
        }
    })
}

/// What one request's line says; built only when a log is on.
#[derive(Debug)]
pub struct LogRecord {
    sink: Arc<Sink>,
    pub time: SystemTime,
    pub listener: Box<str>,
    /// A TCP listener's connection, not an HTTP request.
    pub tcp: bool,
    pub method: Method,
    pub authority: Box<str>,
    pub path: Box<str>,
    pub scheme: Option<Box<str>>,
    pub protocol: Version,
    pub status: u16,
    pub duration: Duration,
    pub route: Option<Arc<str>>,
    pub cluster: Option<Arc<str>>,
    pub endpoint: Option<Arc<str>>,
    pub retries: u32,
    pub error: Option<&'static str>,
    pub peer: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    request_headers: Box<[Option<HeaderValue>]>,
    response_headers: Box<[Option<HeaderValue>]>,
}

impl LogRecord {
    pub fn new<B>(sink: Arc<Sink>, listener: &str, req: &Request<B>) -> Self {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or_default();
        let request_headers = sink
            .request_headers
            .iter()
            .map(|h| req.headers().get(h).cloned())
            .collect();
        let response_headers = vec![None; sink.response_headers.len()].into();
        Self {
            sink,
            time: SystemTime::now(),
            listener: listener.into(),
            tcp: false,
            method: req.method().clone(),
            authority: authority.into(),
            path: req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .into(),
            scheme: req.uri().scheme_str().map(Into::into),
            protocol: req.version(),
            status: 0,
            duration: Duration::ZERO,
            route: None,
            cluster: None,
            endpoint: None,
            retries: 0,
            error: None,
            peer: None,
            local: None,
            bytes_received: 0,
            bytes_sent: 0,
            request_headers,
            response_headers,
        }
    }

    /// A TCP listener's connection: no request, no status (Envoy writes `-` and 0).
    pub fn tcp(sink: Arc<Sink>, listener: &str) -> Self {
        let request_headers = vec![None; sink.request_headers.len()].into();
        let response_headers = vec![None; sink.response_headers.len()].into();
        Self {
            sink,
            time: SystemTime::now(),
            listener: listener.into(),
            tcp: true,
            method: Method::CONNECT,
            authority: "".into(),
            path: "".into(),
            scheme: None,
            protocol: Version::HTTP_11,
            status: 0,
            duration: Duration::ZERO,
            route: None,
            cluster: None,
            endpoint: None,
            retries: 0,
            error: None,
            peer: None,
            local: None,
            bytes_received: 0,
            bytes_sent: 0,
            request_headers,
            response_headers,
        }
    }

    /// Copies the response headers the format names.
    pub fn response_headers(&mut self, headers: &HeaderMap) {
        for (slot, name) in self
            .response_headers
            .iter_mut()
            .zip(&*self.sink.response_headers)
        {
            *slot = headers.get(name).cloned();
        }
    }

    /// The line, newline included.
    fn render(&self) -> Vec<u8> {
        match &self.sink.format {
            Format::Trellis => {
                let mut line = serde_json::to_vec(&self.trellis_json()).unwrap_or_default();
                line.push(b'\n');
                line
            }
            Format::Text(pieces) => {
                let mut out = String::with_capacity(256);
                for p in pieces {
                    self.render_piece(p, &mut out);
                }
                out.into_bytes()
            }
            Format::Json(fields) => {
                let mut map = Map::with_capacity(fields.len());
                for (key, pieces) in fields {
                    map.insert(key.clone(), self.json_value(pieces));
                }
                let mut line = serde_json::to_vec(&map).unwrap_or_default();
                line.push(b'\n');
                line
            }
        }
    }

    fn trellis_json(&self) -> Value {
        if self.tcp {
            return serde_json::json!({
                "time": humantime::format_rfc3339_millis(self.time).to_string(),
                "listener": &*self.listener,
                "protocol": "TCP",
                "duration_ms": (self.duration.as_secs_f64() * 1e6).round() / 1e3,
                "cluster": self.cluster.as_deref(),
                "endpoint": self.endpoint.as_deref(),
                "bytes_received": self.bytes_received,
                "bytes_sent": self.bytes_sent,
                "error": self.error,
            });
        }
        serde_json::json!({
            "time": humantime::format_rfc3339_millis(self.time).to_string(),
            "listener": &*self.listener,
            "method": self.method.as_str(),
            "authority": &*self.authority,
            "path": &*self.path,
            "protocol": format!("{:?}", self.protocol),
            "status": self.status,
            "duration_ms": (self.duration.as_secs_f64() * 1e6).round() / 1e3,
            "route": self.route.as_deref(),
            "cluster": self.cluster.as_deref(),
            "endpoint": self.endpoint.as_deref(),
            "retries": self.retries,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "error": self.error,
        })
    }

    fn render_piece(&self, piece: &Piece, out: &mut String) {
        match piece {
            Piece::Literal(s) => out.push_str(s),
            Piece::Command(c, max) => {
                let start = out.len();
                if !self.value(*c, out) {
                    out.truncate(start);
                    out.push('-');
                } else if let Some(max) = max {
                    let mut end = (start + max).min(out.len());
                    while !out.is_char_boundary(end) {
                        end -= 1;
                    }
                    out.truncate(end);
                }
            }
        }
    }

    /// A JSON field: a number for one numeric command, null for an absent value, else a string.
    fn json_value(&self, pieces: &[Piece]) -> Value {
        if let [Piece::Command(c, None)] = pieces {
            let number = match c {
                Command::ResponseCode => Some(u64::from(self.status)),
                Command::BytesReceived => Some(self.bytes_received),
                Command::BytesSent => Some(self.bytes_sent),
                Command::Duration => Some(self.duration_ms()),
                Command::AttemptCount => self.attempts(),
                _ => None,
            };
            if let Some(n) = number {
                return n.into();
            }
            let mut s = String::new();
            return if self.value(*c, &mut s) {
                s.into()
            } else {
                Value::Null
            };
        }
        let mut s = String::new();
        for p in pieces {
            self.render_piece(p, &mut s);
        }
        s.into()
    }

    fn duration_ms(&self) -> u64 {
        u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX)
    }

    fn attempts(&self) -> Option<u64> {
        self.endpoint.is_some().then(|| u64::from(self.retries) + 1)
    }

    /// Writes a command's value; false when the request has none (written as `-`).
    fn value(&self, c: Command, out: &mut String) -> bool {
        let text = |out: &mut String, v: Option<&str>| v.map(|v| out.push_str(v)).is_some();
        let header = |out: &mut String, v: &Option<HeaderValue>| {
            text(out, v.as_ref().and_then(|v| v.to_str().ok()))
        };
        match c {
            Command::StartTime => {
                let _ = write!(out, "{}", humantime::format_rfc3339_millis(self.time));
                true
            }
            Command::Request(first, alt) => {
                self.request_value(first, out) || alt.is_some_and(|f| self.request_value(f, out))
            }
            Command::Response(first, alt) => {
                header(out, &self.response_headers[first])
                    || alt.is_some_and(|i| header(out, &self.response_headers[i]))
            }
            Command::ResponseCode => {
                let _ = write!(out, "{}", self.status);
                true
            }
            Command::ResponseFlags => {
                out.push_str(self.error.map_or("-", envoy_flag));
                true
            }
            Command::ResponseCodeDetails => text(out, self.error),
            Command::BytesReceived => {
                let _ = write!(out, "{}", self.bytes_received);
                true
            }
            Command::BytesSent => {
                let _ = write!(out, "{}", self.bytes_sent);
                true
            }
            Command::Duration => {
                let _ = write!(out, "{}", self.duration_ms());
                true
            }
            Command::Protocol => text(out, (!self.tcp).then(|| protocol(self.protocol))),
            Command::UpstreamHost => text(out, self.endpoint.as_deref()),
            Command::UpstreamCluster => text(out, self.cluster.as_deref()),
            Command::RouteName => text(out, self.route.as_deref()),
            Command::AttemptCount => self.attempts().map(|n| write!(out, "{n}")).is_some(),
            Command::DownstreamRemote { port } => address(out, self.peer, port),
            Command::DownstreamLocal { port } => address(out, self.local, port),
            Command::RequestedServerName => false,
            Command::Hostname => text(out, hostname()),
        }
    }

    fn request_value(&self, f: Field, out: &mut String) -> bool {
        if self.tcp {
            return false;
        }
        match f {
            Field::Method => out.push_str(self.method.as_str()),
            Field::Path => out.push_str(&self.path),
            Field::Authority if self.authority.is_empty() => return false,
            Field::Authority => out.push_str(&self.authority),
            Field::Scheme => out.push_str(self.scheme.as_deref().unwrap_or("http")),
            Field::Header(i) => {
                let Some(v) = self.request_headers[i]
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                else {
                    return false;
                };
                out.push_str(v);
            }
        }
        true
    }
}

fn address(out: &mut String, addr: Option<SocketAddr>, port: bool) -> bool {
    match addr {
        Some(a) if port => write!(out, "{a}").is_ok(),
        Some(a) => write!(out, "{}", a.ip()).is_ok(),
        None => false,
    }
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// Envoy's response flag for one of Trellis's error kinds.
fn envoy_flag(kind: &str) -> &'static str {
    match kind {
        "no_route" | "egress_denied" | "not_ready" => "NR",
        "no_healthy_endpoint" => "UH",
        "overflow" => "UO",
        "connect_failure" | "connect_timeout" => "UF",
        "upstream_reset" => "UC",
        "refused_stream" => "UR",
        "request_timeout" | "per_try_timeout" => "UT",
        "upstream_protocol_error" => "UPE",
        "downstream_reset" => "DC",
        "bad_request" => "DPE",
        "idle_timeout" | "request_body_timeout" => "SI",
        "fault_injected" => "FI",
        "rate_limited" => "RL",
        _ => "-",
    }
}

fn hostname() -> Option<&'static str> {
    static NAME: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    })
    .as_deref()
}

/// The proxy's access log: the flag's sink, and the queue to the writer task.
#[derive(Debug)]
pub struct AccessLog {
    tx: mpsc::Sender<Box<LogRecord>>,
    flag: Option<Arc<Sink>>,
    metrics: ProxyMetrics,
}

impl AccessLog {
    /// The log and its writer task, to spawn (it idles until a line comes).
    pub fn new(
        target: &AccessLogTarget,
        metrics: ProxyMetrics,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let flag = Sink::from_flag(target).map(Arc::new);
        (Self { tx, flag, metrics }, writer(rx))
    }

    /// The sink a request's line goes to: the snapshot's, else the flag's.
    pub fn sink<'a>(&'a self, snapshot: Option<&'a Arc<Sink>>) -> Option<&'a Arc<Sink>> {
        snapshot.or(self.flag.as_ref())
    }

    /// Queues a finished request's line; rendered by the writer.
    pub fn write(&self, record: Box<LogRecord>) {
        if self.tx.try_send(record).is_err() {
            self.metrics.access_log_dropped();
        }
    }
}

type Output = tokio::io::BufWriter<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>;

async fn open(destination: &Destination) -> Output {
    let out: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = match destination {
        Destination::Stdout => Box::new(tokio::io::stdout()),
        Destination::Stderr => Box::new(tokio::io::stderr()),
        Destination::File(path) => {
            match tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await
            {
                Ok(f) => Box::new(f),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot open the access log; logging to stdout");
                    Box::new(tokio::io::stdout())
                }
            }
        }
    };
    tokio::io::BufWriter::new(out)
}

async fn writer(mut rx: mpsc::Receiver<Box<LogRecord>>) {
    let mut outputs: HashMap<Destination, (Output, u64)> = HashMap::new();
    let mut batch = 0u64;
    while let Some(first) = rx.recv().await {
        batch += 1;
        let mut next = Some(first);
        let mut ok = true;
        // Write what is queued, then flush each output written to.
        while let Some(record) = next {
            let destination = &record.sink.destination;
            if !outputs.contains_key(destination) {
                if outputs.len() >= MAX_FILES
                    && let Some(oldest) = outputs
                        .iter()
                        .min_by_key(|(_, (_, used))| *used)
                        .map(|(d, _)| d.clone())
                    && let Some((mut out, _)) = outputs.remove(&oldest)
                {
                    let _ = out.shutdown().await;
                }
                outputs.insert(destination.clone(), (open(destination).await, batch));
            }
            if let Some((out, used)) = outputs.get_mut(destination) {
                *used = batch;
                ok &= out.write_all(&record.render()).await.is_ok();
            }
            next = rx.try_recv().ok();
        }
        for (out, used) in outputs.values_mut() {
            if *used == batch {
                ok &= out.flush().await.is_ok();
            }
        }
        if !ok {
            tracing::warn!("access log write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(format: FormatSpec<'_>) -> LogRecord {
        let sink = Arc::new(Sink::compile("/dev/stdout", format).unwrap());
        let req = Request::builder()
            .method("POST")
            .uri("/colors?x=1")
            .header("host", "color.default:8080")
            .header("user-agent", "curl/8")
            .header("x-request-id", "abc")
            .body(())
            .unwrap();
        let mut r = LogRecord::new(sink, "egress", &req);
        r.time = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        r.status = 503;
        r.duration = Duration::from_micros(12_600);
        r.error = Some("overflow");
        r.bytes_received = 5;
        r.bytes_sent = 9;
        r.cluster = Some("default/blue".into());
        r.peer = Some("10.0.0.7:41000".parse().unwrap());
        let mut resp = HeaderMap::new();
        resp.insert("x-trellis-error", HeaderValue::from_static("overflow"));
        r.response_headers(&resp);
        r
    }

    fn line(format: FormatSpec<'_>) -> String {
        String::from_utf8(record(format).render()).unwrap()
    }

    #[test]
    fn envoy_default_format() {
        assert_eq!(
            line(FormatSpec::Default),
            "[2023-11-14T22:13:20.123Z] \"POST /colors?x=1 HTTP/1.1\" 503 UO 5 9 12 - \"-\" \"curl/8\" \"abc\" \"color.default:8080\" \"-\"\n"
        );
    }

    #[test]
    fn text_with_alternatives_lengths_and_addresses() {
        assert_eq!(
            line(FormatSpec::Text(
                "%REQ(X-MISSING?USER-AGENT)% %REQ(:PATH):4% %RESP(X-TRELLIS-ERROR)% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %UPSTREAM_CLUSTER% %RESPONSE_CODE_DETAILS% 100"
            )),
            "curl/8 /col overflow 10.0.0.7 default/blue overflow 100\n"
        );
    }

    #[test]
    fn json_keeps_numbers_and_nulls() {
        let fields = vec![
            ("code".to_string(), "%RESPONSE_CODE%".to_string()),
            ("path".to_string(), "%REQ(:PATH)%".to_string()),
            ("host".to_string(), "%UPSTREAM_HOST%".to_string()),
            (
                "both".to_string(),
                "%REQ(:METHOD)% %BYTES_SENT%".to_string(),
            ),
        ];
        let v: Value = serde_json::from_str(&line(FormatSpec::Json(&fields))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"code": 503, "path": "/colors?x=1", "host": null, "both": "POST 9"})
        );
    }

    #[test]
    fn refusals_name_the_problem() {
        let err = |f: &str| {
            Sink::compile("/tmp/x", FormatSpec::Text(f))
                .unwrap_err()
                .reason
        };
        assert!(err("%FILTER_STATE(x)%").contains("%FILTER_STATE% is not supported"));
        assert!(err("%START_TIME(%s)%").contains("time format"));
        assert!(err("%REQ(:PATH").contains("closing parenthesis"));
        assert!(err("100% done").contains("does not start a command"));
        assert!(err("%RESPONSE_CODE").contains("not closed"));
        assert!(err("%DURATION(x)%").contains("takes no argument"));
        let dup = vec![
            ("a".to_string(), "%DURATION%".to_string()),
            ("a".to_string(), "%PROTOCOL%".to_string()),
        ];
        let e = Sink::compile("/tmp/x", FormatSpec::Json(&dup)).unwrap_err();
        assert_eq!(e.json_field, Some(1));
    }
}
