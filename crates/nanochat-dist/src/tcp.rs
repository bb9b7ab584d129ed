//! [`TcpCollective`]: the CPU ranks' collectives over TCP.
//!
//! **Rendezvous.** Rank 0 listens on `MASTER_ADDR:MASTER_PORT` (only on the loopback interface
//! when `MASTER_ADDR` is a loopback address, on every interface otherwise); every other rank
//! connects, retrying until `connect_timeout`, and introduces itself (protocol version, rank,
//! world size, job tag, byte order, the port of its own data listener). Rank 0 turns away a
//! connection that does not belong (another world size or job tag, a rank already present),
//! and once all ranks are in, sends everyone the table of data addresses. These control
//! connections stay open for the life of the job: they carry heartbeats and aborts.
//!
//! **Data.** The ranks form a ring: rank `r` sends to `r + 1` and receives from `r - 1` on
//! connections of their own. `all_reduce` is a ring reduce-scatter (each chunk is summed along
//! the ring in one fixed order, so the result does not depend on timing) followed by a ring
//! all-gather (the reduced bits are copied, never recomputed): every rank ends bit-identical.
//! Each rank sends `2·(W−1)/W` of the buffer, the bandwidth optimum. Sends and receives of a
//! ring step run at the same time (non-blocking sockets and `poll`), and received chunks are
//! added as they arrive. Every operation starts with a small header exchanged along the ring
//! (sequence number, operation, sizes), so ranks that call different collectives fail with a
//! [`DistError::Mismatch`] instead of exchanging garbage.
//!
//! **Faults.** No call waits forever:
//! - a peer that exits, crashes or is killed closes its sockets; the ranks next to it see EOF
//!   at once, and whoever notices first tells rank 0 over the control connection, which tells
//!   everyone: every rank's current or next collective fails within milliseconds, naming the
//!   rank and what it said ([`Collective::abort`] carries a failing rank's own error);
//! - a peer that stops answering (machine gone, network cut, process stopped) misses its
//!   heartbeats (one a second): after `heartbeat_timeout` it is declared lost, same path;
//! - a live peer that never reaches the collective (a program bug, a hang) fails it after
//!   `op_timeout` without any progress.
//!
//! Timeouts come from the environment: `NANOCHAT_DIST_CONNECT_TIMEOUT` (seconds, default
//! 300), `NANOCHAT_DIST_HEARTBEAT_TIMEOUT` (default 15), `NANOCHAT_DIST_OP_TIMEOUT` (default
//! 1800: rank 0 writing a large checkpoint keeps the others waiting in a barrier).

use std::io::{ErrorKind, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs,
};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::collective::{check_root, shard_range, Collective, ReduceOp};
use crate::{DistEnv, DistError};

const MAGIC: &[u8; 8] = b"NCDIST1\n";
const PROTOCOL: u32 = 1;
/// Written in native byte order: a peer of the other endianness reads it swapped.
const ENDIAN_PROBE: u32 = 0x0102_0304;

/// Control-connection messages.
const MSG_HEARTBEAT: u8 = b'H';
const MSG_BYE: u8 = b'B';
const MSG_ABORT: u8 = b'A';
/// Rendezvous replies.
const REPLY_WELCOME: u8 = b'Y';
const REPLY_REFUSED: u8 = b'N';

/// Timeouts of a [`TcpCollective`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpOptions {
    /// How long a rank retries reaching rank 0, and rank 0 waits for all ranks.
    pub connect_timeout: Duration,
    /// How often each rank sends a heartbeat on its control connections.
    pub heartbeat_interval: Duration,
    /// Silence after which a peer is declared lost.
    pub heartbeat_timeout: Duration,
    /// How long a collective may make no progress while every peer is alive.
    pub op_timeout: Duration,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            connect_timeout: Duration::from_secs(300),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(15),
            op_timeout: Duration::from_secs(1800),
        }
    }
}

impl TcpOptions {
    /// The defaults, overridden by `NANOCHAT_DIST_CONNECT_TIMEOUT`,
    /// `NANOCHAT_DIST_HEARTBEAT_TIMEOUT` and `NANOCHAT_DIST_OP_TIMEOUT` (seconds, fractions
    /// allowed).
    pub fn from_env() -> Result<TcpOptions, DistError> {
        let mut o = TcpOptions::default();
        for (name, slot) in [
            ("NANOCHAT_DIST_CONNECT_TIMEOUT", &mut o.connect_timeout),
            ("NANOCHAT_DIST_HEARTBEAT_TIMEOUT", &mut o.heartbeat_timeout),
            ("NANOCHAT_DIST_OP_TIMEOUT", &mut o.op_timeout),
        ] {
            if let Ok(v) = std::env::var(name) {
                match v.trim().parse::<f64>() {
                    Ok(s) if s > 0.0 && s.is_finite() => *slot = Duration::from_secs_f64(s),
                    _ => {
                        return Err(DistError::Env(format!(
                            "{name} = {v:?} is not a positive number of seconds"
                        )))
                    }
                }
            }
        }
        o.heartbeat_interval = o.heartbeat_interval.min(o.heartbeat_timeout / 3);
        Ok(o)
    }
}

/// Element types the ring can reduce (plain numbers: every bit pattern is a value).
trait Elem: Copy + Send + 'static {
    fn add(self, other: Self) -> Self;
    fn div(self, n: usize) -> Self;
    fn from_ne(bytes: &[u8]) -> Self;
}

impl Elem for f32 {
    fn add(self, other: Self) -> Self {
        self + other
    }
    fn div(self, n: usize) -> Self {
        self / n as f32
    }
    fn from_ne(b: &[u8]) -> Self {
        f32::from_ne_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl Elem for f64 {
    fn add(self, other: Self) -> Self {
        self + other
    }
    fn div(self, n: usize) -> Self {
        self / n as f64
    }
    fn from_ne(b: &[u8]) -> Self {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        f64::from_ne_bytes(a)
    }
}

fn bytes_of<T: Elem>(s: &[T]) -> &[u8] {
    // SAFETY: T is f32 or f64 (the sealed `Elem`): no padding, alignment ≥ u8's, and the
    // byte view covers exactly the slice's memory for the borrow's lifetime.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

fn bytes_of_mut<T: Elem>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `bytes_of`; in addition every byte pattern is a valid f32/f64, so writes
    // through the view cannot create an invalid value.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// `(&buf[a], &mut buf[b])` for disjoint ranges.
fn split_pair<T>(buf: &mut [T], a: Range<usize>, b: Range<usize>) -> (&[T], &mut [T]) {
    debug_assert!(a.end <= b.start || b.end <= a.start);
    if a.start < b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&hi[..a.end - a.start], &mut lo[b])
    }
}

/// Chunk `i` of `len` elements split into `world` nearly equal parts (the first `len % world`
/// one longer): the all-reduce's partition, which works for any length.
fn balanced(len: usize, world: usize, i: usize) -> Range<usize> {
    let base = len / world;
    let extra = len % world;
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

/// State shared with the heartbeat and monitor threads.
struct Shared {
    rank: usize,
    world: usize,
    failure: Mutex<Option<String>>,
    closing: AtomicBool,
    /// Clones of the ring sockets, shut down to wake a blocked collective when the job fails.
    data: Mutex<Vec<TcpStream>>,
    control: Vec<Control>,
}

/// One control connection (rank 0 holds one per other rank; the others one to rank 0).
struct Control {
    peer: usize,
    writer: Mutex<TcpStream>,
    /// The peer said goodbye: its EOF is a clean exit, not a failure.
    left: AtomicBool,
}

impl Shared {
    fn failure(&self) -> Option<String> {
        self.failure.lock().map(|f| f.clone()).unwrap_or(None)
    }

    /// Records the job's failure (the first reason wins), tells the peers, and shuts the ring
    /// sockets down so that a collective blocked on them returns at once.
    fn fail(&self, reason: String) -> String {
        {
            let Ok(mut f) = self.failure.lock() else {
                return reason;
            };
            if let Some(first) = f.as_ref() {
                return first.clone();
            }
            *f = Some(reason.clone());
        }
        if !self.closing.load(Ordering::SeqCst) {
            tracing::error!(rank = self.rank, "distributed job failing: {reason}");
        }
        for c in &self.control {
            if let Ok(mut w) = c.writer.lock() {
                let msg = reason.as_bytes();
                let mut frame = Vec::with_capacity(5 + msg.len());
                frame.push(MSG_ABORT);
                frame.extend_from_slice(&(msg.len() as u32).to_le_bytes());
                frame.extend_from_slice(msg);
                let _ = w.write_all(&frame);
            }
        }
        if let Ok(data) = self.data.lock() {
            for s in data.iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        reason
    }

    fn error(&self, reason: String) -> DistError {
        DistError::Peer {
            rank: self.rank,
            world: self.world,
            reason,
        }
    }
}

/// Reads one control connection until it closes: heartbeats, goodbyes and aborts.
fn monitor(shared: Arc<Shared>, idx: usize, mut reader: TcpStream, timeout: Duration) {
    let peer = shared.control[idx].peer;
    let mut last_seen = Instant::now();
    let _ = reader.set_read_timeout(Some(Duration::from_millis(250)));
    let mut byte = [0u8; 1];
    loop {
        if shared.closing.load(Ordering::SeqCst) || shared.failure().is_some() {
            return;
        }
        match reader.read(&mut byte) {
            Ok(0) => {
                if !shared.control[idx].left.load(Ordering::SeqCst) {
                    shared.fail(format!(
                        "rank {peer} closed its connection without leaving the job (it exited, crashed or was killed: see its log)"
                    ));
                }
                return;
            }
            Ok(_) => {
                last_seen = Instant::now();
                match byte[0] {
                    MSG_HEARTBEAT => {}
                    MSG_BYE => shared.control[idx].left.store(true, Ordering::SeqCst),
                    MSG_ABORT => {
                        let _ = reader.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut len = [0u8; 4];
                        let reason = if reader.read_exact(&mut len).is_ok() {
                            let n = u32::from_le_bytes(len).min(1 << 16) as usize;
                            let mut msg = vec![0u8; n];
                            match reader.read_exact(&mut msg) {
                                Ok(()) => String::from_utf8_lossy(&msg).into_owned(),
                                Err(_) => format!("rank {peer} aborted the job"),
                            }
                        } else {
                            format!("rank {peer} aborted the job")
                        };
                        shared.fail(reason);
                        return;
                    }
                    other => {
                        shared.fail(format!(
                            "rank {peer} sent an unknown control message {other:#04x}"
                        ));
                        return;
                    }
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if shared.control[idx].left.load(Ordering::SeqCst) {
                    continue;
                }
                if last_seen.elapsed() > timeout {
                    shared.fail(format!(
                        "no heartbeat from rank {peer} for {:.0?} (its machine or network is gone, or the process is stopped)",
                        last_seen.elapsed()
                    ));
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                if !shared.control[idx].left.load(Ordering::SeqCst) {
                    shared.fail(format!(
                        "lost the connection to rank {peer} ({e}): it exited, crashed or was killed"
                    ));
                }
                return;
            }
        }
    }
}

fn heartbeat(shared: Arc<Shared>, interval: Duration) {
    while !shared.closing.load(Ordering::SeqCst) && shared.failure().is_none() {
        for c in &shared.control {
            if c.left.load(Ordering::SeqCst) {
                continue;
            }
            if let Ok(mut w) = c.writer.lock() {
                // A dead peer is the monitor's to report; a failed write here says nothing new.
                let _ = w.write_all(&[MSG_HEARTBEAT]);
            }
        }
        std::thread::sleep(interval);
    }
}

/// Collectives over TCP among CPU ranks (see the module docs).
pub struct TcpCollective {
    rank: usize,
    world: usize,
    /// Socket to rank `rank + 1`.
    next: TcpStream,
    /// Socket from rank `rank − 1`.
    prev: TcpStream,
    shared: Arc<Shared>,
    opts: TcpOptions,
    seq: u64,
    scratch: Vec<u8>,
}

/// What an operation header describes, checked against the previous rank's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    seq: u64,
    op: u32,
    elem: u32,
    len: u64,
    root: u64,
}

const OP_ALL_REDUCE: u32 = 1;
const OP_REDUCE_SCATTER: u32 = 2;
const OP_ALL_GATHER: u32 = 3;
const OP_BROADCAST: u32 = 4;
const OP_BROADCAST_BYTES: u32 = 5;
const OP_BARRIER: u32 = 6;

impl Header {
    fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..12].copy_from_slice(&self.op.to_le_bytes());
        b[12..16].copy_from_slice(&self.elem.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..32].copy_from_slice(&self.root.to_le_bytes());
        b
    }
    fn decode(b: &[u8; 32]) -> Header {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        Header {
            seq: u64_at(0),
            op: u32_at(8),
            elem: u32_at(12),
            len: u64_at(16),
            root: u64_at(24),
        }
    }
    fn describe(&self) -> String {
        let op = match self.op {
            OP_ALL_REDUCE => "all_reduce",
            OP_REDUCE_SCATTER => "reduce_scatter",
            OP_ALL_GATHER => "all_gather",
            OP_BROADCAST => "broadcast",
            OP_BROADCAST_BYTES => "broadcast_bytes",
            OP_BARRIER => "barrier",
            _ => "unknown",
        };
        let elem = match self.elem {
            4 => "f32",
            8 => "f64",
            _ => "bytes",
        };
        format!(
            "call #{} {op}({} {elem}, root {})",
            self.seq, self.len, self.root
        )
    }
}

fn resolve(addr: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    (addr, port).to_socket_addrs().map(|a| a.collect())
}

fn read_u32(s: &mut TcpStream) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_string(s: &mut TcpStream) -> std::io::Result<String> {
    let n = read_u32(s)?.min(1 << 16) as usize;
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}

fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// A rank's introduction to rank 0.
struct Hello {
    rank: usize,
    world: usize,
    tag: String,
    endian: u32,
    data_port: u16,
}

impl Hello {
    fn encode(&self) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&PROTOCOL.to_le_bytes());
        b.extend_from_slice(&(self.rank as u32).to_le_bytes());
        b.extend_from_slice(&(self.world as u32).to_le_bytes());
        b.extend_from_slice(&self.endian.to_ne_bytes());
        b.extend_from_slice(&self.data_port.to_le_bytes());
        put_string(&mut b, &self.tag);
        b
    }

    fn read(s: &mut TcpStream) -> Result<Hello, String> {
        let mut magic = [0u8; 8];
        s.read_exact(&mut magic)
            .map_err(|e| format!("no introduction ({e})"))?;
        if &magic != MAGIC {
            return Err("not a nanochat rank (wrong protocol magic)".into());
        }
        let io = |e: std::io::Error| format!("truncated introduction ({e})");
        let version = read_u32(s).map_err(io)?;
        if version != PROTOCOL {
            return Err(format!(
                "protocol version {version}, this rank speaks {PROTOCOL}: run the same build on every rank"
            ));
        }
        let rank = read_u32(s).map_err(io)? as usize;
        let world = read_u32(s).map_err(io)? as usize;
        let mut e = [0u8; 4];
        s.read_exact(&mut e).map_err(io)?;
        let mut p = [0u8; 2];
        s.read_exact(&mut p).map_err(io)?;
        let tag = read_string(s).map_err(io)?;
        Ok(Hello {
            rank,
            world,
            tag,
            endian: u32::from_ne_bytes(e),
            data_port: u16::from_le_bytes(p),
        })
    }
}

/// Where rank 0 listens: the loopback address itself for a loopback `MASTER_ADDR` (a local job
/// is not reachable from the network), every interface otherwise.
fn bind_address(env: &DistEnv) -> Result<SocketAddr, DistError> {
    let addrs = resolve(&env.master_addr, env.master_port).map_err(|e| {
        DistError::Env(format!(
            "MASTER_ADDR = {:?} does not resolve: {e}",
            env.master_addr
        ))
    })?;
    let first = addrs.first().copied().ok_or_else(|| {
        DistError::Env(format!(
            "MASTER_ADDR = {:?} resolves to no address",
            env.master_addr
        ))
    })?;
    Ok(match first.ip() {
        ip if ip.is_loopback() => first,
        IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), env.master_port),
        IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), env.master_port),
    })
}

/// Accepts one connection before `deadline`.
fn accept_until(
    listener: &TcpListener,
    deadline: Instant,
) -> std::io::Result<Option<(TcpStream, SocketAddr)>> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((s, a)) => {
                s.set_nonblocking(false)?;
                return Ok(Some((s, a)));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

impl TcpCollective {
    /// Joins the job described by `env` (which must have more than one rank): rendezvous, the
    /// ring, the heartbeat.
    pub fn connect(env: &DistEnv, opts: TcpOptions) -> Result<TcpCollective, DistError> {
        if env.world_size < 2 {
            return Err(DistError::Usage(
                "a TCP collective needs at least two ranks; use LocalCollective for one".into(),
            ));
        }
        if env.rank == 0 {
            let listen = bind_address(env)?;
            let listener = TcpListener::bind(listen).map_err(|e| DistError::Rendezvous {
                listen,
                reason: format!(
                    "cannot listen ({e}); if another job holds the port, set MASTER_PORT to a free one"
                ),
            })?;
            Self::lead(env, listener, opts)
        } else {
            Self::join(env, opts)
        }
    }

    /// Rank 0's side, on a listener it already holds (tests bind port 0 first).
    pub fn lead(
        env: &DistEnv,
        listener: TcpListener,
        opts: TcpOptions,
    ) -> Result<TcpCollective, DistError> {
        let listen = listener.local_addr().map_err(|e| DistError::Rendezvous {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), env.master_port),
            reason: e.to_string(),
        })?;
        let rdv = |reason: String| DistError::Rendezvous { listen, reason };
        let data = TcpListener::bind(SocketAddr::new(listen.ip(), 0))
            .map_err(|e| rdv(format!("cannot open the data listener: {e}")))?;
        let data_port = data.local_addr().map_err(|e| rdv(e.to_string()))?.port();
        let deadline = Instant::now() + opts.connect_timeout;
        tracing::info!(world = env.world_size, %listen, "rendezvous: waiting for the other ranks");
        // Per rank: its control stream and the address of its data listener.
        let mut peers: Vec<Option<(TcpStream, SocketAddr)>> =
            (0..env.world_size).map(|_| None).collect();
        let mut refused: Vec<String> = Vec::new();
        while peers.iter().skip(1).any(Option::is_none) {
            let accepted = accept_until(&listener, deadline)
                .map_err(|e| rdv(format!("accept failed: {e}")))?;
            let Some((mut s, from)) = accepted else {
                let missing: Vec<String> = (1..env.world_size)
                    .filter(|r| peers[*r].is_none())
                    .map(|r| r.to_string())
                    .collect();
                return Err(rdv(format!(
                    "after {:.0?} rank(s) {} of a world of {} have not joined{}; start every rank with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE",
                    opts.connect_timeout,
                    missing.join(", "),
                    env.world_size,
                    if refused.is_empty() {
                        String::new()
                    } else {
                        format!(" (turned away: {})", refused.join("; "))
                    }
                )));
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let verdict =
                Hello::read(&mut s).and_then(|h| check_hello(&h, env, &peers).map(|()| h));
            match verdict {
                Ok(h) => {
                    tracing::debug!(rank = h.rank, %from, "rendezvous: rank joined");
                    peers[h.rank] = Some((s, SocketAddr::new(from.ip(), h.data_port)));
                }
                Err(reason) => {
                    tracing::warn!(%from, "rendezvous: turned away a connection: {reason}");
                    let mut reply = vec![REPLY_REFUSED];
                    put_string(&mut reply, &reason);
                    let _ = s.write_all(&reply);
                    refused.push(format!("{from}: {reason}"));
                }
            }
        }
        // Everyone is in: each rank gets every rank's data address (rank 0's as it reached it).
        let mut controls = Vec::new();
        let mut table: Vec<SocketAddr> = peers
            .iter()
            .map(|p| p.as_ref().map_or(listen, |(_, a)| *a))
            .collect();
        for (r, peer) in peers.iter_mut().enumerate().skip(1) {
            let Some((s, _)) = peer.take() else {
                continue;
            };
            let mine = s.local_addr().map_err(|e| rdv(e.to_string()))?;
            table[0] = SocketAddr::new(mine.ip(), data_port);
            let mut reply = vec![REPLY_WELCOME];
            for a in &table {
                put_string(&mut reply, &a.to_string());
            }
            let mut s = s;
            s.write_all(&reply)
                .map_err(|e| rdv(format!("rank {r} left during the rendezvous ({e})")))?;
            controls.push((r, s));
        }
        let next = table[1];
        Self::build(env, opts, controls, data, next, deadline)
    }

    /// A rank other than 0: reach the rendezvous, introduce itself, get the table.
    fn join(env: &DistEnv, opts: TcpOptions) -> Result<TcpCollective, DistError> {
        let start = Instant::now();
        let deadline = start + opts.connect_timeout;
        let unreachable = |last: String| DistError::Unreachable {
            rank: env.rank,
            addr: env.master_addr.clone(),
            port: env.master_port,
            waited: start.elapsed(),
            last,
        };
        let mut control = loop {
            let attempt = resolve(&env.master_addr, env.master_port).and_then(|addrs| {
                let mut last = std::io::Error::new(ErrorKind::NotFound, "resolves to no address");
                for a in addrs {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let wait = left.clamp(Duration::from_millis(50), Duration::from_secs(2));
                    match TcpStream::connect_timeout(&a, wait) {
                        Ok(s) => return Ok(s),
                        Err(e) => last = std::io::Error::new(e.kind(), format!("{a}: {e}")),
                    }
                }
                Err(last)
            });
            match attempt {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(rank = env.rank, "rendezvous not reachable yet: {e}");
                    let left = deadline.saturating_duration_since(Instant::now());
                    std::thread::sleep(left.min(Duration::from_millis(200)));
                }
                Err(e) => return Err(unreachable(e.to_string())),
            }
        };
        let local = control
            .local_addr()
            .map_err(|e| unreachable(e.to_string()))?;
        let data = TcpListener::bind(SocketAddr::new(local.ip(), 0))
            .map_err(|e| unreachable(format!("cannot open the data listener: {e}")))?;
        let data_port = data
            .local_addr()
            .map_err(|e| unreachable(e.to_string()))?
            .port();
        let hello = Hello {
            rank: env.rank,
            world: env.world_size,
            tag: env.job_tag.clone(),
            endian: ENDIAN_PROBE,
            data_port,
        };
        let master = control.peer_addr().unwrap_or_else(|_| {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), env.master_port)
        });
        let rdv = |reason: String| DistError::Rendezvous {
            listen: master,
            reason: format!("rank {}: {reason}", env.rank),
        };
        control
            .write_all(&hello.encode())
            .map_err(|e| rdv(format!("rank 0 closed the connection ({e})")))?;
        // Rank 0 answers once every rank is in.
        let _ = control.set_read_timeout(Some(
            deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(10),
        ));
        let mut kind = [0u8; 1];
        control.read_exact(&mut kind).map_err(|e| {
            rdv(format!(
                "no answer from rank 0 ({e}): not every rank joined in time (see rank 0's log)"
            ))
        })?;
        match kind[0] {
            REPLY_WELCOME => {}
            REPLY_REFUSED => {
                let why = read_string(&mut control).unwrap_or_default();
                return Err(rdv(format!("rank 0 turned this rank away: {why}")));
            }
            other => return Err(rdv(format!("unexpected reply {other:#04x} from rank 0"))),
        }
        let mut table = Vec::with_capacity(env.world_size);
        for i in 0..env.world_size {
            let text = read_string(&mut control)
                .map_err(|e| rdv(format!("truncated address table ({e})")))?;
            let a: SocketAddr = text
                .parse()
                .map_err(|_| rdv(format!("bad address {text:?} for rank {i}")))?;
            table.push(a);
        }
        let next = table[(env.rank + 1) % env.world_size];
        Self::build(env, opts, vec![(0, control)], data, next, deadline)
    }

    /// Connects the ring (to `next`, from the previous rank through `data`) and starts the
    /// heartbeat and the monitors.
    fn build(
        env: &DistEnv,
        opts: TcpOptions,
        controls: Vec<(usize, TcpStream)>,
        data: TcpListener,
        next_addr: SocketAddr,
        deadline: Instant,
    ) -> Result<TcpCollective, DistError> {
        let (rank, world) = (env.rank, env.world_size);
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let peer_err = |reason: String| DistError::Peer {
            rank,
            world,
            reason,
        };
        // Connecting first cannot deadlock: the peer's listener queues the connection.
        let mut next = TcpStream::connect_timeout(&next_addr, Duration::from_secs(10))
            .map_err(|e| {
                peer_err(format!(
                    "cannot open the ring connection to rank {next_rank} at {next_addr}: {e} (a firewall between the machines?)"
                ))
            })?;
        next.write_all(&(rank as u32).to_le_bytes())
            .map_err(|e| peer_err(format!("ring connection to rank {next_rank}: {e}")))?;
        let (mut prev, _) = accept_until(
            &data,
            deadline.max(Instant::now() + Duration::from_secs(30)),
        )
        .map_err(|e| peer_err(format!("accepting the ring connection: {e}")))?
        .ok_or_else(|| {
            peer_err(format!(
                "rank {prev_rank} never opened its ring connection to this rank"
            ))
        })?;
        let _ = prev.set_read_timeout(Some(Duration::from_secs(10)));
        let from = read_u32(&mut prev)
            .map_err(|e| peer_err(format!("ring connection from rank {prev_rank}: {e}")))?;
        if from as usize != prev_rank {
            return Err(peer_err(format!(
                "ring connection came from rank {from}, expected rank {prev_rank}"
            )));
        }
        for s in [&next, &prev] {
            s.set_nodelay(true)
                .and_then(|()| s.set_read_timeout(None))
                .and_then(|()| s.set_nonblocking(true))
                .map_err(|e| peer_err(format!("configuring the ring sockets: {e}")))?;
        }
        let mut readers = Vec::new();
        let mut control = Vec::new();
        for (peer, s) in controls {
            let reader = s
                .try_clone()
                .map_err(|e| peer_err(format!("control connection to rank {peer}: {e}")))?;
            let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
            readers.push(reader);
            control.push(Control {
                peer,
                writer: Mutex::new(s),
                left: AtomicBool::new(false),
            });
        }
        let data_clones = [&next, &prev]
            .iter()
            .map(|s| s.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| peer_err(format!("ring sockets: {e}")))?;
        let shared = Arc::new(Shared {
            rank,
            world,
            failure: Mutex::new(None),
            closing: AtomicBool::new(false),
            data: Mutex::new(data_clones),
            control,
        });
        for (idx, reader) in readers.into_iter().enumerate() {
            let sh = Arc::clone(&shared);
            let timeout = opts.heartbeat_timeout;
            std::thread::Builder::new()
                .name(format!("nanochat-dist-monitor-{idx}"))
                .spawn(move || monitor(sh, idx, reader, timeout))
                .map_err(|e| peer_err(format!("starting the monitor thread: {e}")))?;
        }
        {
            let sh = Arc::clone(&shared);
            let interval = opts.heartbeat_interval;
            std::thread::Builder::new()
                .name("nanochat-dist-heartbeat".into())
                .spawn(move || heartbeat(sh, interval))
                .map_err(|e| peer_err(format!("starting the heartbeat thread: {e}")))?;
        }
        tracing::info!(rank, world, "joined the job (TCP ring)");
        Ok(TcpCollective {
            rank,
            world,
            next,
            prev,
            shared,
            opts,
            seq: 0,
            scratch: Vec::new(),
        })
    }

    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn prev_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    /// Fails the job for `reason` (or the reason already recorded) and returns the error.
    fn fail(&self, reason: String) -> DistError {
        let reason = self.shared.fail(reason);
        self.shared.error(reason)
    }

    fn check_alive(&self) -> Result<(), DistError> {
        match self.shared.failure() {
            Some(r) => Err(self.shared.error(r)),
            None => Ok(()),
        }
    }

    /// The reason to report when a ring socket closed: what the monitor learned (an abort from
    /// rank 0 names the rank that failed first), else the neighbour's exit.
    fn closed(&self, peer: usize, what: &str) -> DistError {
        // The monitor usually hears why within milliseconds of the EOF.
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            if let Some(r) = self.shared.failure() {
                return self.shared.error(r);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let left = self
            .shared
            .control
            .iter()
            .any(|c| c.peer == peer && c.left.load(Ordering::SeqCst));
        self.fail(if left {
            format!("rank {peer} has already left the job, during {what} (it finished early: every rank must make the same collective calls)")
        } else {
            format!("rank {peer} closed its connection during {what} (it exited, crashed or was killed: see its log)")
        })
    }

    /// Waits until a ring socket is ready (or the job fails, or nothing moved for
    /// `op_timeout`).
    fn wait(
        &self,
        read: bool,
        write: bool,
        idle_since: Instant,
        what: &str,
    ) -> Result<(), DistError> {
        let mut fds = Vec::with_capacity(2);
        if read {
            fds.push(libc::pollfd {
                fd: self.prev.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if write {
            fds.push(libc::pollfd {
                fd: self.next.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the call's duration,
        // and both descriptors belong to sockets this struct owns.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 200) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                return Err(self.fail(format!("poll failed during {what}: {e}")));
            }
        }
        self.check_alive()?;
        if rc == 0 && idle_since.elapsed() > self.opts.op_timeout {
            return Err(self.fail(format!(
                "no progress for {:.0?} in {what}: rank {} or rank {} is alive but not taking part (a hang, or ranks making different calls); NANOCHAT_DIST_OP_TIMEOUT sets the limit",
                self.opts.op_timeout,
                self.prev_rank(),
                self.next_rank()
            )));
        }
        Ok(())
    }

    fn try_write(&mut self, src: &[u8], what: &str) -> Result<usize, DistError> {
        match self.next.write(src) {
            Ok(n) => Ok(n),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => Ok(0),
            Err(_) => Err(self.closed(self.next_rank(), what)),
        }
    }

    fn try_read(&mut self, dst: &mut [u8], what: &str) -> Result<usize, DistError> {
        match self.prev.read(dst) {
            Ok(0) => Err(self.closed(self.prev_rank(), what)),
            Ok(n) => Ok(n),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => Ok(0),
            Err(_) => Err(self.closed(self.prev_rank(), what)),
        }
    }

    /// Sends `send` to the next rank while receiving `recv.len()` bytes from the previous one;
    /// `on_recv(recv, before, now)` sees the received bytes as they arrive.
    fn exchange(
        &mut self,
        send: &[u8],
        recv: &mut [u8],
        what: &str,
        mut on_recv: impl FnMut(&[u8], usize, usize),
    ) -> Result<(), DistError> {
        let (mut sent, mut got) = (0, 0);
        let mut idle_since = Instant::now();
        while sent < send.len() || got < recv.len() {
            let mut moved = false;
            if sent < send.len() {
                let n = self.try_write(&send[sent..], what)?;
                sent += n;
                moved |= n > 0;
            }
            if got < recv.len() {
                let n = self.try_read(&mut recv[got..], what)?;
                if n > 0 {
                    on_recv(recv, got, got + n);
                    got += n;
                    moved = true;
                }
            }
            if moved {
                idle_since = Instant::now();
            } else {
                self.wait(got < recv.len(), sent < send.len(), idle_since, what)?;
            }
        }
        Ok(())
    }

    /// Passes `buf` along the ring from `root`: receive from the previous rank (unless this is
    /// the root) and forward to the next (unless the next is the root), forwarding each piece
    /// as soon as it arrives.
    fn relay(&mut self, buf: &mut [u8], root: usize, what: &str) -> Result<(), DistError> {
        let receive = self.rank != root;
        let forward = self.next_rank() != root;
        let mut got = if receive { 0 } else { buf.len() };
        let mut sent = if forward { 0 } else { buf.len() };
        let mut idle_since = Instant::now();
        while got < buf.len() || sent < buf.len() {
            let mut moved = false;
            if got < buf.len() {
                let n = self.try_read(&mut buf[got..], what)?;
                got += n;
                moved |= n > 0;
            }
            if sent < got {
                let n = self.try_write(&buf[sent..got], what)?;
                sent += n;
                moved |= n > 0;
            }
            if moved {
                idle_since = Instant::now();
            } else {
                self.wait(got < buf.len(), sent < got, idle_since, what)?;
            }
        }
        Ok(())
    }

    /// Starts an operation: checks that the previous rank is making the same call.
    fn begin(&mut self, op: u32, elem: u32, len: usize, root: usize) -> Result<String, DistError> {
        self.check_alive()?;
        let h = Header {
            seq: self.seq,
            op,
            elem,
            len: len as u64,
            root: root as u64,
        };
        self.seq += 1;
        let what = h.describe();
        let mut theirs = [0u8; 32];
        self.exchange(&h.encode(), &mut theirs, &what, |_, _, _| {})?;
        let t = Header::decode(&theirs);
        if t != h {
            let detail = format!(
                "this rank made {what}, rank {} made {}",
                self.prev_rank(),
                t.describe()
            );
            self.shared.fail(format!("collective mismatch: {detail}"));
            return Err(DistError::Mismatch {
                rank: self.rank,
                detail,
            });
        }
        Ok(what)
    }

    /// Ring reduce-scatter over `chunk(i)`: afterwards rank `r` holds chunk `r` reduced (the
    /// sum in ring order `r+1, r+2, …, r`), divided by the world size for `Avg`.
    fn ring_reduce_scatter<T: Elem>(
        &mut self,
        buf: &mut [T],
        chunk: &dyn Fn(usize) -> Range<usize>,
        op: ReduceOp,
        what: &str,
    ) -> Result<(), DistError> {
        let w = self.world;
        let size = std::mem::size_of::<T>();
        let mut scratch = std::mem::take(&mut self.scratch);
        for k in 0..w - 1 {
            let send_c = chunk((self.rank + 2 * w - k - 1) % w);
            let recv_c = chunk((self.rank + 2 * w - k - 2) % w);
            scratch.resize(recv_c.len() * size, 0);
            let (send, acc) = split_pair(buf, send_c, recv_c);
            let mut done = 0usize;
            let res = self.exchange(bytes_of(send), &mut scratch, what, |got, _, now| {
                let complete = now / size;
                for i in done..complete {
                    acc[i] = T::from_ne(&got[i * size..]).add(acc[i]);
                }
                done = complete;
            });
            if let Err(e) = res {
                self.scratch = scratch;
                return Err(e);
            }
        }
        self.scratch = scratch;
        if op == ReduceOp::Avg {
            for x in &mut buf[chunk(self.rank)] {
                *x = x.div(w);
            }
        }
        Ok(())
    }

    /// Ring all-gather: rank `r` contributes chunk `r`, everyone ends with every chunk.
    fn ring_all_gather<T: Elem>(
        &mut self,
        buf: &mut [T],
        chunk: &dyn Fn(usize) -> Range<usize>,
        what: &str,
    ) -> Result<(), DistError> {
        let w = self.world;
        for k in 0..w - 1 {
            let send_c = chunk((self.rank + w - k) % w);
            let recv_c = chunk((self.rank + 2 * w - k - 1) % w);
            let (send, recv) = split_pair(buf, send_c, recv_c);
            self.exchange(bytes_of(send), bytes_of_mut(recv), what, |_, _, _| {})?;
        }
        Ok(())
    }

    fn all_reduce_any<T: Elem>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<(), DistError> {
        let what = self.begin(OP_ALL_REDUCE, std::mem::size_of::<T>() as u32, buf.len(), 0)?;
        let (len, w) = (buf.len(), self.world);
        let chunk = move |i: usize| balanced(len, w, i);
        self.ring_reduce_scatter(buf, &chunk, op, &what)?;
        self.ring_all_gather(buf, &chunk, &what)
    }
}

fn check_hello(
    h: &Hello,
    env: &DistEnv,
    peers: &[Option<(TcpStream, SocketAddr)>],
) -> Result<(), String> {
    if h.endian != ENDIAN_PROBE {
        return Err(format!(
            "rank {}: its byte order differs from rank 0's",
            h.rank
        ));
    }
    if h.world != env.world_size {
        return Err(format!(
            "rank {} says the world has {} ranks, rank 0 says {}",
            h.rank, h.world, env.world_size
        ));
    }
    if h.tag != env.job_tag {
        return Err(format!(
            "rank {} belongs to job {:?}, this is job {:?}",
            h.rank, h.tag, env.job_tag
        ));
    }
    if h.rank == 0 || h.rank >= env.world_size {
        return Err(format!(
            "rank {} cannot join a world of {} as a non-zero rank",
            h.rank, env.world_size
        ));
    }
    if peers[h.rank].is_some() {
        return Err(format!("rank {} joined twice", h.rank));
    }
    Ok(())
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn backend(&self) -> &'static str {
        "tcp"
    }

    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), DistError> {
        self.all_reduce_any(buf, op)
    }

    fn all_reduce_f64(&mut self, buf: &mut [f64], op: ReduceOp) -> Result<(), DistError> {
        self.all_reduce_any(buf, op)
    }

    fn reduce_scatter(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<Range<usize>, DistError> {
        let mine = shard_range(buf.len(), self.world, self.rank)?;
        let what = self.begin(OP_REDUCE_SCATTER, 4, buf.len(), 0)?;
        let (len, w) = (buf.len(), self.world);
        let chunk = move |i: usize| balanced(len, w, i);
        self.ring_reduce_scatter(buf, &chunk, op, &what)?;
        Ok(mine)
    }

    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), DistError> {
        shard_range(buf.len(), self.world, self.rank)?;
        let what = self.begin(OP_ALL_GATHER, 4, buf.len(), 0)?;
        let (len, w) = (buf.len(), self.world);
        let chunk = move |i: usize| balanced(len, w, i);
        self.ring_all_gather(buf, &chunk, &what)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), DistError> {
        check_root(root, self.world)?;
        let what = self.begin(OP_BROADCAST, 4, buf.len(), root)?;
        self.relay(bytes_of_mut(buf), root, &what)
    }

    fn broadcast_bytes(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), DistError> {
        check_root(root, self.world)?;
        // The length is only known at the root: it travels first.
        let what = self.begin(OP_BROADCAST_BYTES, 1, 0, root)?;
        let mut len = (buf.len() as u64).to_le_bytes();
        self.relay(&mut len, root, &what)?;
        let n = u64::from_le_bytes(len);
        let n = usize::try_from(n)
            .map_err(|_| self.fail(format!("broadcast of {n} bytes does not fit in memory")))?;
        if self.rank != root {
            buf.clear();
            buf.resize(n, 0);
        }
        self.relay(buf, root, &what)
    }

    fn barrier(&mut self) -> Result<(), DistError> {
        self.begin(OP_BARRIER, 0, 0, 0)?;
        // Completes only when every rank's value went round the ring.
        let mut token = [0.0f64];
        let (w, len) = (self.world, 1);
        let chunk = move |i: usize| balanced(len, w, i);
        self.ring_reduce_scatter(&mut token, &chunk, ReduceOp::Sum, "barrier")?;
        self.ring_all_gather(&mut token, &chunk, "barrier")
    }

    fn abort(&mut self, reason: &str) {
        self.shared
            .fail(format!("rank {} failed: {reason}", self.rank));
    }
}

impl Drop for TcpCollective {
    fn drop(&mut self) {
        // A clean goodbye: the peers' monitors take the coming EOF as an exit, not a crash.
        self.shared.closing.store(true, Ordering::SeqCst);
        for c in &self.shared.control {
            if let Ok(mut w) = c.writer.lock() {
                let _ = w.write_all(&[MSG_BYE]);
                let _ = w.flush();
                let _ = w.shutdown(Shutdown::Write);
            }
        }
        // Closing a socket with unread bytes (heartbeats the peer sent before our goodbye
        // reached it) sends a reset, which a peer still finishing its last collective could
        // take for a crash. The peers stop their heartbeats to us when the goodbye arrives, so
        // read what is in flight for a moment (or until they close too) before closing.
        let until = Instant::now() + Duration::from_millis(300);
        let mut sink = [0u8; 256];
        for c in &self.shared.control {
            let Ok(mut s) = c.writer.lock() else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
            while Instant::now() < until {
                match s.read(&mut sink) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        // Quiet: the goodbye has arrived (or the peer is gone).
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        let _ = self.next.shutdown(Shutdown::Both);
        let _ = self.prev.shutdown(Shutdown::Both);
    }
}
