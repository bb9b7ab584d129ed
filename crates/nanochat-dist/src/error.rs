//! The one error type of the crate.

use std::net::SocketAddr;
use std::time::Duration;

/// Errors of the launch environment and of the collectives.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// The environment describes an impossible job (missing, unparsable or inconsistent values).
    #[error("distributed environment: {0}")]
    Env(String),
    /// A rank could not reach the rendezvous of rank 0.
    #[error(
        "rank {rank}: could not reach the rendezvous at {addr}:{port} for {waited:.0?} (last error: {last}); \
         is rank 0 running, and do all ranks have the same MASTER_ADDR and MASTER_PORT? \
         (NANOCHAT_DIST_CONNECT_TIMEOUT sets how long to wait, in seconds)"
    )]
    Unreachable {
        /// This rank.
        rank: usize,
        /// `MASTER_ADDR` as given.
        addr: String,
        /// `MASTER_PORT`.
        port: u16,
        /// How long it tried.
        waited: Duration,
        /// The last connection error.
        last: String,
    },
    /// Rank 0 could not gather every rank in time, or a rank was turned away.
    #[error("rendezvous on {listen}: {reason}")]
    Rendezvous {
        /// The address rank 0 listened on.
        listen: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// A peer died, closed its connections, stopped answering, or the job was aborted.
    #[error("rank {rank} of {world}: collective failed: {reason}")]
    Peer {
        /// This rank.
        rank: usize,
        /// World size.
        world: usize,
        /// What happened, naming the peer where known.
        reason: String,
    },
    /// Arguments that cannot work (a buffer not divisible by the world size, a bad root).
    #[error("collective misuse: {0}")]
    Usage(String),
    /// Ranks called different collectives (or the same with different sizes): a program bug.
    #[error("rank {rank}: collective mismatch: {detail}")]
    Mismatch {
        /// This rank.
        rank: usize,
        /// Both calls.
        detail: String,
    },
}
