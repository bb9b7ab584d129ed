//! Loopback load generator for nanochat-inference: N concurrent streaming chat clients, each
//! sending a bounded number of requests; reports first-token latency p50/p95 and per-stream
//! decode speed. Refuses any address that is not loopback.
//!
//! cargo run --release -p nanochat-inference --example loadgen -- --addr 127.0.0.1:8000 \
//!     --clients 1,10,32 --requests 3 --max-tokens 64

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Debug, Parser)]
struct Args {
    /// Server address (must be loopback).
    #[arg(long, default_value = "127.0.0.1:8000")]
    addr: SocketAddr,
    /// Comma-separated client counts to run one after another.
    #[arg(long, default_value = "1,10,32", value_delimiter = ',')]
    clients: Vec<usize>,
    /// Requests each client sends (sequentially).
    #[arg(long, default_value_t = 3)]
    requests: usize,
    /// max_tokens per request.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Hard cap on one level's wall time, seconds.
    #[arg(long, default_value_t = 300)]
    max_secs: u64,
    /// Model name to send (None: omit).
    #[arg(long)]
    model: Option<String>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    first_token: Duration,
    tokens: usize,
    decode: Duration,
}

async fn one_request(addr: SocketAddr, body: &str) -> Result<Sample> {
    let start = Instant::now();
    let mut stream = TcpStream::connect(addr).await?;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    if !line.contains(" 200 ") {
        let mut rest = String::new();
        let _ = reader.read_to_string(&mut rest).await;
        bail!("server answered {}: {rest}", line.trim());
    }
    loop {
        line.clear();
        reader.read_line(&mut line).await?;
        if line.trim().is_empty() {
            break;
        }
    }
    // Chunked SSE body; only the `data:` lines matter, so read line by line and skip sizes.
    let (mut first, mut last, mut tokens) = (None, None, 0usize);
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            break;
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data).context("chunk is not JSON")?;
        if let Some(e) = v.get("error") {
            bail!("stream error: {e}");
        }
        if let Some(u) = v
            .get("usage")
            .and_then(|u| u.get("completion_tokens"))
            .and_then(|t| t.as_u64())
        {
            tokens = u as usize;
        }
        let has_content = v["choices"]
            .get(0)
            .and_then(|c| c["delta"]["content"].as_str())
            .is_some_and(|s| !s.is_empty());
        if has_content {
            let now = start.elapsed();
            first.get_or_insert(now);
            last = Some(now);
        }
    }
    let first = first.context("no content streamed")?;
    let last = last.unwrap_or(first);
    Ok(Sample {
        first_token: first,
        tokens,
        decode: last - first,
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if !args.addr.ip().is_loopback() {
        bail!(
            "{} is not a loopback address; this tool only loads a local server",
            args.addr
        );
    }
    println!("| clients | requests | first token p50 (ms) | first token p95 (ms) | tokens/s per stream p50 | tokens/s per stream p5 | aggregate tokens/s |");
    println!("|---|---|---|---|---|---|---|");
    for &clients in &args.clients {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(args.max_secs);
        let mut handles = Vec::new();
        for c in 0..clients {
            let body = serde_json::json!({
                "model": args.model,
                "messages": [{"role": "user", "content": format!("Client {c}: tell me about the weather and the sea.")}],
                // Sampled and unseeded: never served from the response cache.
                "temperature": 0.8,
                "max_tokens": args.max_tokens,
                "stream": true,
                "stream_options": {"include_usage": true},
            })
            .to_string();
            let (addr, n) = (args.addr, args.requests);
            handles.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for _ in 0..n {
                    if Instant::now() > deadline {
                        break;
                    }
                    out.push(one_request(addr, &body).await);
                }
                out
            }));
        }
        let mut samples = Vec::new();
        let mut errors = 0;
        for h in handles {
            for r in h.await? {
                match r {
                    Ok(s) => samples.push(s),
                    Err(e) => {
                        errors += 1;
                        eprintln!("request failed: {e:#}");
                    }
                }
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        let mut ttft: Vec<f64> = samples
            .iter()
            .map(|s| s.first_token.as_secs_f64() * 1e3)
            .collect();
        ttft.sort_by(f64::total_cmp);
        let mut speed: Vec<f64> = samples
            .iter()
            .filter(|s| s.tokens > 1 && !s.decode.is_zero())
            .map(|s| (s.tokens - 1) as f64 / s.decode.as_secs_f64())
            .collect();
        speed.sort_by(f64::total_cmp);
        let total_tokens: usize = samples.iter().map(|s| s.tokens).sum();
        println!(
            "| {clients} | {}{} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} |",
            samples.len(),
            if errors > 0 {
                format!(" ({errors} failed)")
            } else {
                String::new()
            },
            percentile(&ttft, 0.5),
            percentile(&ttft, 0.95),
            percentile(&speed, 0.5),
            percentile(&speed, 0.05),
            total_tokens as f64 / wall,
        );
    }
    Ok(())
}
