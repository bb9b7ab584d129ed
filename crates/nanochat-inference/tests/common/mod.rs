//! A minimal raw HTTP/1.1 client over loopback for the integration tests: no client library
//! sits between the tests and the bytes the server writes.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nanochat_inference::fake::FakeModel;
use nanochat_inference::{AppState, Server, ServerConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub struct TestServer {
    pub addr: SocketAddr,
    pub state: actix_web::web::Data<AppState>,
    pub model: FakeModel,
    pub handle: actix_web::dev::ServerHandle,
}

/// Start a server on 127.0.0.1:<free port> serving a fake model with this step time.
pub fn start(mut cfg: ServerConfig, step: Duration) -> TestServer {
    cfg.host = "127.0.0.1".into();
    cfg.port = 0;
    let model = FakeModel::new(step);
    let server = Server::bind(cfg, Arc::new(model.clone())).expect("server starts");
    let (addr, state, handle) = server.spawn();
    TestServer {
        addr,
        state,
        model,
        handle,
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// An open response whose body is read incrementally (for streams).
pub struct Streaming {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    reader: BufReader<TcpStream>,
    chunked: bool,
    remaining_in_chunk: usize,
    done: bool,
}

/// Write a request and return the open socket without reading the answer (for disconnects).
pub async fn send_only(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream.write_all(body).await.expect("write body");
    stream
}

pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Streaming {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        && !body.is_empty()
    {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.expect("write head");
    // The server may answer (413) before reading a big body; ignore a reset while writing it.
    let _ = stream.write_all(body).await;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await.expect("status line");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).await.expect("header line");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    Streaming {
        status,
        headers,
        reader,
        chunked,
        remaining_in_chunk: 0,
        done: false,
    }
}

impl Streaming {
    /// Next piece of the body (None at the end).
    pub async fn next_bytes(&mut self) -> Option<Vec<u8>> {
        if self.done {
            return None;
        }
        if !self.chunked {
            let mut buf = vec![0u8; 8192];
            let n = self.reader.read(&mut buf).await.ok()?;
            if n == 0 {
                self.done = true;
                return None;
            }
            buf.truncate(n);
            return Some(buf);
        }
        if self.remaining_in_chunk == 0 {
            let mut line = String::new();
            self.reader.read_line(&mut line).await.ok()?;
            let size =
                usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16).ok()?;
            if size == 0 {
                self.done = true;
                return None;
            }
            self.remaining_in_chunk = size;
        }
        let mut buf = vec![0u8; self.remaining_in_chunk];
        self.reader.read_exact(&mut buf).await.ok()?;
        self.remaining_in_chunk = 0;
        let mut crlf = [0u8; 2];
        self.reader.read_exact(&mut crlf).await.ok()?;
        Some(buf)
    }

    pub async fn read_all(mut self) -> Response {
        let mut body = Vec::new();
        while let Some(b) = self.next_bytes().await {
            body.extend_from_slice(&b);
        }
        Response {
            status: self.status,
            headers: self.headers,
            body,
        }
    }
}

pub async fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> Response {
    send(addr, method, path, &[], body.as_bytes())
        .await
        .read_all()
        .await
}

pub async fn post_json(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Response {
    request(addr, "POST", path, &body.to_string()).await
}

/// Split an SSE body into its `data:` payloads.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| ev.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// Concatenate the streamed content of each choice of a chat stream; also returns finish reasons.
pub fn chat_stream_text(body: &str) -> (Vec<String>, Vec<Option<String>>) {
    let mut texts: Vec<String> = Vec::new();
    let mut finishes: Vec<Option<String>> = Vec::new();
    for data in sse_data(body) {
        if data == "[DONE]" {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&data).expect("chunk is JSON");
        for c in v["choices"].as_array().expect("choices") {
            let i = c["index"].as_u64().expect("index") as usize;
            if texts.len() <= i {
                texts.resize(i + 1, String::new());
                finishes.resize(i + 1, None);
            }
            if let Some(t) = c["delta"]["content"].as_str() {
                texts[i].push_str(t);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finishes[i] = Some(f.to_string());
            }
        }
    }
    (texts, finishes)
}

pub fn user(text: &str) -> serde_json::Value {
    serde_json::json!([{"role": "user", "content": text}])
}
