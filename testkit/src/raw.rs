//! [`RawHttpServer`]: an HTTP/1.1 upstream that answers with scripted bytes, for the framing
//! cases a well-behaved server library never produces (chunk extensions, trailers, interim
//! responses, close-delimited bodies, connections closed after a keep-alive response,
//! malformed heads). It records every request exactly as it arrived.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// One scripted answer: the bytes to write, then whether to close the connection.
#[derive(Debug, Clone)]
pub struct RawReply {
    pub bytes: Vec<u8>,
    pub close: bool,
}

impl RawReply {
    pub fn keep(bytes: impl Into<Vec<u8>>) -> Self {
        Self {
            bytes: bytes.into(),
            close: false,
        }
    }

    pub fn close(bytes: impl Into<Vec<u8>>) -> Self {
        Self {
            bytes: bytes.into(),
            close: true,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    replies: Mutex<Vec<RawReply>>,
    requests: Mutex<Vec<Vec<u8>>>,
    connections: AtomicUsize,
}

#[derive(Debug)]
pub struct RawHttpServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for RawHttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawHttpServer {
    /// Serves `replies` in order, one per request across connections; the last one repeats.
    pub async fn start(replies: Vec<RawReply>) -> Self {
        assert!(!replies.is_empty());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            replies: Mutex::new(replies.into_iter().rev().collect()),
            ..State::default()
        });
        let s = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                s.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(s.clone(), stream));
            }
        });
        Self { addr, state, task }
    }

    /// Every request received so far, head and body as they came on the wire.
    pub fn requests(&self) -> Vec<String> {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect()
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one request (head, then a content-length or chunked body) from `buf` + the stream.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut chunk = [0u8; 4096];
    let complete = |buf: &[u8]| -> Option<usize> {
        let head_end = find(buf, b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        if head.contains("transfer-encoding: chunked") {
            // The last chunk, then trailers (if any) up to an empty line.
            let body = &buf[head_end..];
            let zero = if body.starts_with(b"0\r\n") {
                0
            } else {
                find(body, b"\r\n0\r\n")? + 2
            };
            return find(&body[zero + 1..], b"\r\n\r\n").map(|i| head_end + zero + 1 + i + 4);
        }
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
        (buf.len() >= head_end + length).then_some(head_end + length)
    };
    loop {
        if let Some(end) = complete(buf) {
            return Some(buf.drain(..end).collect());
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn serve(state: Arc<State>, mut stream: TcpStream) {
    let mut buf = Vec::new();
    while let Some(request) = read_request(&mut stream, &mut buf).await {
        state.requests.lock().unwrap().push(request);
        let reply = {
            let mut replies = state.replies.lock().unwrap();
            if replies.len() > 1 {
                replies.pop().unwrap()
            } else {
                replies[0].clone()
            }
        };
        if stream.write_all(&reply.bytes).await.is_err() || reply.close {
            return;
        }
    }
}

/// A response read from a raw socket.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Names lowercased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response (head, then a content-length body, else everything until the close) from
/// `stream`; `None` when the connection ends before a whole head. Panics after 10 s.
pub async fn read_response(stream: &mut TcpStream) -> Option<RawResponse> {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok());
        let mut body = buf.split_off(head_end);
        let bodiless = status < 200 || status == 204 || status == 304;
        match length.or(bodiless.then_some(0)) {
            Some(len) => {
                while body.len() < len {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => body.extend_from_slice(&chunk[..n]),
                    }
                }
                body.truncate(len);
            }
            None => {
                let _ = stream.read_to_end(&mut body).await;
            }
        }
        Some(RawResponse {
            status,
            headers,
            body,
        })
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("a response in time")
}

/// Connects to `addr`, writes `request` and reads one response.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> Option<RawResponse> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_response(&mut stream).await
}
