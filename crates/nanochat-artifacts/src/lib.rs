//! Content-addressed artifact store shared by every nanochat stage, and the stage CLI contract.
//!
//! - [`stage`]: what every stage binary parses (`--config --input --out --work`), config
//!   loading with precise errors, SIGINT/SIGTERM handling, atomic writes.
//! - The store (objects addressed by the sha256 of a canonical manifest, atomic publish,
//!   verification, action cache, refs, gc) is specified in docs/artifacts.md.
#![warn(missing_docs)]

mod error;
mod fsutil;
pub mod stage;

pub use error::{Error, Result};
pub use fsutil::{fsync_dir, write_atomic};

use sha2::{Digest, Sha256};

/// Hex sha256 of a byte slice; the address function of the store.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_abc_matches_fips_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
