//! Content-addressed artifact store shared by every nanochat stage, and the stage CLI contract.
//!
//! - [`stage`]: what every stage binary parses (`--config --input --out --work`), config
//!   loading with precise errors, SIGINT/SIGTERM handling, atomic writes, the run directory.
//! - [`layout`]: the artifact layout contract and the one resolver of a model reference.
//! - The store (objects addressed by the sha256 of a canonical manifest, atomic publish,
//!   verification, action cache, refs, gc) is specified in docs/artifacts.md.
#![warn(missing_docs)]

mod error;
mod fingerprint;
mod fsutil;
mod ids;
pub mod layout;
mod manifest;
pub mod stage;
mod store;

pub use error::{Error, Result};
pub use fingerprint::{StageFingerprint, FINGERPRINT_SCHEMA};
pub use fsutil::{fsync_dir, write_atomic};
pub use ids::{canonical_json, ObjectId, StageKey};
pub use manifest::{Manifest, ManifestEntry, MANIFEST_VERSION};
pub use store::{
    validate_ref_name, ArtifactStore, CacheEntry, GcOptions, GcReport, MachineInfo, Problem,
    ProducerRecord, RunRecord, StageRecord, Staging, VerifyMode, WorkLock, DATA_DIR, MANIFEST_FILE,
    RUN_DIR, RUN_RECORD_FILE,
};

/// Streams a file through sha256; returns (lowercase hex digest, size in bytes).
pub fn sha256_file(path: &std::path::Path) -> Result<(String, u64)> {
    manifest::hash_file(path, false)
}

/// Formats a time as RFC 3339 UTC with second precision (`2026-01-02T03:04:05Z`).
pub fn rfc3339_utc(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm), valid for all dates after 1970.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

use sha2::{Digest, Sha256};

/// Hex sha256 of a byte slice; the address function of the store.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        use std::time::{Duration, UNIX_EPOCH};
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_661); // 2000-02-29 01:01:01
        assert_eq!(rfc3339_utc(t), "2000-02-29T01:01:01Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_798_761_599); // last second of 2026
        assert_eq!(rfc3339_utc(t), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn sha256_file_matches_bytes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(sha256_file(&p).unwrap(), (sha256_hex(b"abc"), 3));
    }

    #[test]
    fn sha256_of_abc_matches_fips_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
