//! The operations data-parallel training needs, as one trait over host memory.
//!
//! Every implementation must leave every rank with **bit-identical** results: a reduction is
//! computed once, in a fixed order, and its bits are then copied to every rank (the TCP ring
//! reduces each chunk along the ring and all-gathers it; NCCL's ring and tree algorithms do the
//! same). Replicas that each summed in their own order would drift apart one rounding at a time.
//!
//! The operations mirror NCCL's so that an NCCL communicator can implement the trait for CUDA
//! ranks (its buffers then live on the device behind the compute backend; the unique id travels
//! through [`Collective::broadcast_bytes`] of the TCP rendezvous): in-place `all_reduce` (sum or
//! average), in-place `reduce_scatter` / `all_gather` over equal shards (`len` divisible by the
//! world size; rank `r` owns elements `r·len/world .. (r+1)·len/world`, see [`shard_range`]),
//! `broadcast`, and `barrier`. Calls are collective: every rank makes the same calls in the same
//! order with the same sizes; implementations check this where they can.

use std::ops::Range;

use crate::DistError;

/// How values from the ranks combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// The sum over ranks.
    Sum,
    /// The sum over ranks divided by the world size (computed once, so still bit-identical).
    Avg,
}

/// Collective communication among the ranks of one job.
pub trait Collective: Send {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// What implements it (`local`, `tcp`, `nccl`), for logs.
    fn backend(&self) -> &'static str;

    /// Combines `buf` across ranks in place; every rank ends with the same bits.
    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), DistError>;
    /// [`Collective::all_reduce`] of a few `f64` values (losses, byte counts, flags).
    fn all_reduce_f64(&mut self, buf: &mut [f64], op: ReduceOp) -> Result<(), DistError>;
    /// Combines `buf` across ranks, leaving only this rank's shard ([`shard_range`]) reduced;
    /// the rest of `buf` is unspecified afterwards. `buf.len()` must be divisible by the world
    /// size. Returns the shard's range.
    fn reduce_scatter(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<Range<usize>, DistError>;
    /// Every rank contributes its shard of `buf` ([`shard_range`]) and receives all the others:
    /// the inverse of [`Collective::reduce_scatter`]. `buf.len()` must be divisible by the
    /// world size.
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), DistError>;
    /// Copies `root`'s `buf` to every rank (all ranks pass the same length).
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), DistError>;
    /// Copies `root`'s bytes to every rank; the other ranks' `buf` is resized to match.
    fn broadcast_bytes(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), DistError>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), DistError>;
    /// Tells the other ranks that this one is failing (`reason` reaches their errors), so they
    /// stop now rather than at their next collective. Later calls fail.
    fn abort(&mut self, reason: &str) {
        let _ = reason;
    }
}

/// Rank `rank`'s shard of a buffer of `len` elements split over `world` ranks: equal shards,
/// `len` divisible by `world` (as NCCL's reduce-scatter and all-gather require).
pub fn shard_range(len: usize, world: usize, rank: usize) -> Result<Range<usize>, DistError> {
    if world == 0 || rank >= world {
        return Err(DistError::Usage(format!(
            "rank {rank} is not in a world of {world}"
        )));
    }
    if !len.is_multiple_of(world) {
        return Err(DistError::Usage(format!(
            "a buffer of {len} elements cannot be split into {world} equal shards; pad it to a multiple of the world size"
        )));
    }
    let n = len / world;
    Ok(rank * n..(rank + 1) * n)
}

pub(crate) fn check_root(root: usize, world: usize) -> Result<(), DistError> {
    if root >= world {
        return Err(DistError::Usage(format!(
            "broadcast root {root} is not a rank of a world of {world}"
        )));
    }
    Ok(())
}

/// A world of one: every operation is the identity (sum and average of one value are the
/// value).
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalCollective;

impl Collective for LocalCollective {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "local"
    }
    fn all_reduce(&mut self, _buf: &mut [f32], _op: ReduceOp) -> Result<(), DistError> {
        Ok(())
    }
    fn all_reduce_f64(&mut self, _buf: &mut [f64], _op: ReduceOp) -> Result<(), DistError> {
        Ok(())
    }
    fn reduce_scatter(
        &mut self,
        buf: &mut [f32],
        _op: ReduceOp,
    ) -> Result<Range<usize>, DistError> {
        shard_range(buf.len(), 1, 0)
    }
    fn all_gather(&mut self, _buf: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }
    fn broadcast(&mut self, _buf: &mut [f32], root: usize) -> Result<(), DistError> {
        check_root(root, 1)
    }
    fn broadcast_bytes(&mut self, _buf: &mut Vec<u8>, root: usize) -> Result<(), DistError> {
        check_root(root, 1)
    }
    fn barrier(&mut self) -> Result<(), DistError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_equal_and_cover_the_buffer() {
        assert_eq!(shard_range(12, 4, 0).unwrap(), 0..3);
        assert_eq!(shard_range(12, 4, 3).unwrap(), 9..12);
        assert!(shard_range(10, 4, 0)
            .unwrap_err()
            .to_string()
            .contains("pad it"));
        assert!(shard_range(8, 4, 4).is_err());
    }

    #[test]
    fn local_is_the_identity() {
        let mut c = LocalCollective;
        let mut v = vec![1.5f32, -2.0];
        c.all_reduce(&mut v, ReduceOp::Avg).unwrap();
        assert_eq!(v, [1.5, -2.0]);
        assert_eq!(c.reduce_scatter(&mut v, ReduceOp::Sum).unwrap(), 0..2);
        let mut b = b"id".to_vec();
        c.broadcast_bytes(&mut b, 0).unwrap();
        assert_eq!(b, b"id");
        assert!(c.broadcast(&mut v, 1).is_err());
        c.barrier().unwrap();
    }
}
