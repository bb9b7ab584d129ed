//! Streaming pretraining documents out of a directory of shards.
//!
//! A shard is one file: `*.jsonl` / `*.jsonl.gz` (one `{"text": ...}` object per line),
//! `*.txt` / `*.txt.gz` (documents separated by blank lines), or `*.parquet` (nanochat's
//! format: a `text` column, zstd pages, row groups). Shards are taken in file-name order; like
//! nanochat, the last one is the validation split and the others are training.
//!
//! Reading is streaming: one shard is open at a time and one unit (a parquet row group or a line
//! of text) is decoded at a time, so memory does not grow with the dataset. A [`DocPosition`]
//! names the next document exactly (shard, unit, offset inside the unit, epoch), which is what a
//! checkpoint stores to resume without skipping or repeating a document.
//!
//! Data parallelism: rank `r` of `w` reads units `r, r + w, r + 2w, …` of every shard (nanochat
//! distributes parquet row groups the same way).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::parquet::ParquetTextReader;
use crate::DataError;

/// On-disk format of a shard, from its file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardFormat {
    /// `{"text": ...}` per line, optionally gzip-compressed.
    Jsonl,
    /// Plain UTF-8 text, documents separated by blank lines, optionally gzip-compressed.
    Text,
    /// Parquet with a `text` column (nanochat / FineWeb shards).
    Parquet,
}

impl ShardFormat {
    /// Format of a path, or `None` for files that are not shards.
    pub fn of(path: &Path) -> Option<ShardFormat> {
        let name = path.file_name()?.to_str()?;
        let base = name.strip_suffix(".gz").unwrap_or(name);
        if base.ends_with(".jsonl") || base.ends_with(".json") {
            Some(ShardFormat::Jsonl)
        } else if base.ends_with(".txt") {
            Some(ShardFormat::Text)
        } else if name.ends_with(".parquet") {
            Some(ShardFormat::Parquet)
        } else {
            None
        }
    }
}

/// Which part of a shard directory to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Every shard but the last.
    Train,
    /// The last shard.
    Val,
}

/// Lists the shards of `dir` (sorted by file name) and picks the split. A directory with a
/// single shard serves it as both splits (tiny setups), with a warning.
pub fn list_shards(dir: &Path, split: Split) -> Result<Vec<PathBuf>, DataError> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut shards = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| DataError::io(dir, e))?.path();
        if path.is_file() && ShardFormat::of(&path).is_some() {
            shards.push(path);
        }
    }
    shards.sort();
    match shards.len() {
        0 => Err(DataError::Invalid {
            path: dir.to_path_buf(),
            detail: "no shards (*.jsonl[.gz], *.txt[.gz], *.parquet) in this directory".into(),
        }),
        1 => {
            tracing::warn!(dir = %dir.display(), "only one shard: using it for both train and val");
            Ok(shards)
        }
        n => Ok(match split {
            Split::Train => shards[..n - 1].to_vec(),
            Split::Val => shards[n - 1..].to_vec(),
        }),
    }
}

/// Exact position of the next document of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DocPosition {
    /// Passes completed over all shards.
    pub epoch: u64,
    /// Index into the shard list.
    pub shard: usize,
    /// Unit inside the shard: parquet row group, or line (jsonl) / document (text).
    pub unit: u64,
    /// Document inside the unit (always 0 for jsonl and text).
    pub offset: u64,
}

/// A source of documents for one shard, read unit by unit.
enum ShardReader {
    Lines {
        lines: Box<dyn BufRead + Send>,
        /// Next unit index the reader will produce.
        next_unit: u64,
        text_mode: bool,
    },
    Parquet(Box<ParquetTextReader>),
}

fn open_maybe_gz(path: &Path) -> Result<Box<dyn BufRead + Send>, DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let inner: Box<dyn Read + Send> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(
            1 << 16,
            file,
        )))
    } else {
        Box::new(file)
    };
    Ok(Box::new(BufReader::with_capacity(1 << 16, inner)))
}

impl ShardReader {
    fn open(path: &Path) -> Result<ShardReader, DataError> {
        match ShardFormat::of(path) {
            Some(ShardFormat::Parquet) => Ok(ShardReader::Parquet(Box::new(
                ParquetTextReader::open(path, "text")?,
            ))),
            Some(fmt) => Ok(ShardReader::Lines {
                lines: open_maybe_gz(path)?,
                next_unit: 0,
                text_mode: fmt == ShardFormat::Text,
            }),
            None => Err(DataError::Invalid {
                path: path.to_path_buf(),
                detail: "not a shard (expected .jsonl[.gz], .txt[.gz] or .parquet)".into(),
            }),
        }
    }

    /// Documents of unit `unit` (which must be ≥ every unit asked before), or `None` at the end.
    fn read_unit(&mut self, path: &Path, unit: u64) -> Result<Option<Vec<String>>, DataError> {
        match self {
            ShardReader::Parquet(r) => {
                if unit >= r.num_row_groups() as u64 {
                    return Ok(None);
                }
                r.read_row_group(unit as usize).map(Some)
            }
            ShardReader::Lines {
                lines,
                next_unit,
                text_mode,
            } => loop {
                let doc = if *text_mode {
                    read_paragraph(lines.as_mut(), path)?
                } else {
                    read_json_line(lines.as_mut(), path, *next_unit)?
                };
                let Some(doc) = doc else { return Ok(None) };
                let this = *next_unit;
                *next_unit += 1;
                if this == unit {
                    return Ok(Some(vec![doc]));
                }
            },
        }
    }
}

#[derive(Deserialize)]
struct TextRow {
    text: String,
}

fn read_json_line(
    lines: &mut dyn BufRead,
    path: &Path,
    index: u64,
) -> Result<Option<String>, DataError> {
    let mut line = String::new();
    loop {
        line.clear();
        let n = lines
            .read_line(&mut line)
            .map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            return Ok(None);
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let row: TextRow = serde_json::from_str(&line).map_err(|e| DataError::Invalid {
        path: path.to_path_buf(),
        detail: format!(
            "record {} is not a {{\"text\": ...}} object: {e}",
            index + 1
        ),
    })?;
    Ok(Some(row.text))
}

/// Next blank-line separated paragraph (a document of a `.txt` shard).
fn read_paragraph(lines: &mut dyn BufRead, path: &Path) -> Result<Option<String>, DataError> {
    let mut doc = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        let n = lines
            .read_line(&mut line)
            .map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        if line.trim().is_empty() {
            if doc.is_empty() {
                continue;
            }
            break;
        }
        doc.push_str(&line);
    }
    if doc.is_empty() {
        return Ok(None);
    }
    if doc.ends_with('\n') {
        doc.pop();
    }
    Ok(Some(doc))
}

/// An endless (multi-epoch) stream of documents over a list of shards, for one rank.
pub struct DocStream {
    shards: Vec<PathBuf>,
    rank: u64,
    world: u64,
    /// Position of the next document to return.
    pos: DocPosition,
    reader: Option<ShardReader>,
    /// Documents of the current unit and the unit's index.
    unit_docs: Vec<String>,
    loaded_unit: Option<u64>,
    /// Set when an epoch ends without yielding a document (all shards empty for this rank).
    empty_epoch_guard: bool,
}

impl DocStream {
    /// A stream over `shards` for `rank` of `world_size`, starting at `start` (use
    /// `DocPosition::default()` for the beginning; a saved position must come from the same
    /// shard list and world size).
    pub fn new(
        shards: Vec<PathBuf>,
        rank: usize,
        world_size: usize,
        start: DocPosition,
    ) -> Result<DocStream, DataError> {
        if shards.is_empty() {
            return Err(DataError::Config(
                "a document stream needs at least one shard".into(),
            ));
        }
        if world_size == 0 || rank >= world_size {
            return Err(DataError::Config(format!(
                "rank {rank} is not in a world of size {world_size}"
            )));
        }
        let mut pos = start;
        if pos.unit % world_size as u64 != rank as u64 {
            // A fresh start: first unit of this rank.
            if pos == DocPosition::default() {
                pos.unit = rank as u64;
            } else {
                return Err(DataError::Config(format!(
                    "saved data position {pos:?} does not belong to rank {rank} of {world_size}"
                )));
            }
        }
        Ok(DocStream {
            shards,
            rank: rank as u64,
            world: world_size as u64,
            pos,
            reader: None,
            unit_docs: Vec::new(),
            loaded_unit: None,
            empty_epoch_guard: false,
        })
    }

    /// Position of the next document [`next_doc`](Self::next_doc) returns.
    pub fn position(&self) -> DocPosition {
        self.pos
    }

    /// The next document and the position it was read from.
    pub fn next_doc(&mut self) -> Result<(DocPosition, String), DataError> {
        loop {
            if self.pos.shard >= self.shards.len() {
                if self.empty_epoch_guard {
                    return Err(DataError::Config(format!(
                        "rank {} of {} gets no documents from {} shard(s)",
                        self.rank,
                        self.world,
                        self.shards.len()
                    )));
                }
                self.empty_epoch_guard = true;
                self.pos = DocPosition {
                    epoch: self.pos.epoch + 1,
                    shard: 0,
                    unit: self.rank,
                    offset: 0,
                };
                self.reader = None;
                self.loaded_unit = None;
                continue;
            }
            let path = self.shards[self.pos.shard].clone();
            if self.loaded_unit != Some(self.pos.unit) {
                if self.reader.is_none() {
                    self.reader = Some(ShardReader::open(&path)?);
                }
                let reader = self.reader.as_mut().ok_or_else(|| {
                    DataError::Config("internal: shard reader missing".to_string())
                })?;
                match reader.read_unit(&path, self.pos.unit)? {
                    Some(docs) => {
                        self.unit_docs = docs;
                        self.loaded_unit = Some(self.pos.unit);
                    }
                    None => {
                        self.pos = DocPosition {
                            epoch: self.pos.epoch,
                            shard: self.pos.shard + 1,
                            unit: self.rank,
                            offset: 0,
                        };
                        self.reader = None;
                        self.loaded_unit = None;
                        continue;
                    }
                }
            }
            if (self.pos.offset as usize) < self.unit_docs.len() {
                let at = self.pos;
                let doc = std::mem::take(&mut self.unit_docs[self.pos.offset as usize]);
                self.pos.offset += 1;
                self.empty_epoch_guard = false;
                return Ok((at, doc));
            }
            self.pos.unit += self.world;
            self.pos.offset = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        if name.ends_with(".gz") {
            let f = File::create(&p).unwrap();
            let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
            gz.write_all(body.as_bytes()).unwrap();
            gz.finish().unwrap();
        } else {
            std::fs::write(&p, body).unwrap();
        }
        p
    }

    fn jsonl(docs: &[&str]) -> String {
        docs.iter()
            .map(|d| serde_json::json!({ "text": d }).to_string() + "\n")
            .collect()
    }

    #[test]
    fn last_shard_is_val_and_order_is_by_name() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "b.jsonl", &jsonl(&["b"]));
        write(d.path(), "a.jsonl.gz", &jsonl(&["a"]));
        write(d.path(), "c.txt", "c\n");
        write(d.path(), "README.md", "ignored");
        let train = list_shards(d.path(), Split::Train).unwrap();
        let val = list_shards(d.path(), Split::Val).unwrap();
        let names = |v: &[PathBuf]| {
            v.iter()
                .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&train), ["a.jsonl.gz", "b.jsonl"]);
        assert_eq!(names(&val), ["c.txt"]);
    }

    #[test]
    fn streams_in_order_across_shards_and_epochs() {
        let d = tempfile::tempdir().unwrap();
        let a = write(d.path(), "a.jsonl.gz", &jsonl(&["a0", "a1"]));
        let b = write(d.path(), "b.txt", "b0 line1\nb0 line2\n\n\nb1\n");
        let mut s = DocStream::new(vec![a, b], 0, 1, DocPosition::default()).unwrap();
        let got: Vec<String> = (0..6).map(|_| s.next_doc().unwrap().1).collect();
        assert_eq!(got, ["a0", "a1", "b0 line1\nb0 line2", "b1", "a0", "a1"]);
        assert_eq!(s.position().epoch, 1);
    }

    #[test]
    fn resume_from_saved_position_continues_exactly() {
        let d = tempfile::tempdir().unwrap();
        let a = write(d.path(), "a.jsonl", &jsonl(&["0", "1", "2", "3", "4"]));
        let shards = vec![a];
        let mut s = DocStream::new(shards.clone(), 0, 1, DocPosition::default()).unwrap();
        let all: Vec<String> = (0..8).map(|_| s.next_doc().unwrap().1).collect();
        let mut s2 = DocStream::new(shards.clone(), 0, 1, DocPosition::default()).unwrap();
        for _ in 0..3 {
            s2.next_doc().unwrap();
        }
        let saved = s2.position();
        let mut s3 = DocStream::new(shards, 0, 1, saved).unwrap();
        let rest: Vec<String> = (3..8).map(|_| s3.next_doc().unwrap().1).collect();
        assert_eq!(rest, all[3..]);
    }

    #[test]
    fn ranks_partition_the_documents() {
        let d = tempfile::tempdir().unwrap();
        let a = write(d.path(), "a.jsonl", &jsonl(&["0", "1", "2", "3", "4"]));
        let mut r0 = DocStream::new(vec![a.clone()], 0, 2, DocPosition::default()).unwrap();
        let mut r1 = DocStream::new(vec![a], 1, 2, DocPosition::default()).unwrap();
        let g0: Vec<String> = (0..3).map(|_| r0.next_doc().unwrap().1).collect();
        let g1: Vec<String> = (0..2).map(|_| r1.next_doc().unwrap().1).collect();
        assert_eq!(g0, ["0", "2", "4"]);
        assert_eq!(g1, ["1", "3"]);
    }

    #[test]
    fn bad_record_names_file_and_record() {
        let d = tempfile::tempdir().unwrap();
        let a = write(d.path(), "bad.jsonl", "{\"text\": \"ok\"}\n{\"txt\": 1}\n");
        let mut s = DocStream::new(vec![a], 0, 1, DocPosition::default()).unwrap();
        s.next_doc().unwrap();
        let err = s.next_doc().unwrap_err().to_string();
        assert!(
            err.contains("bad.jsonl") && err.contains("record 2"),
            "{err}"
        );
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let err = DocStream::new(
            vec!["/nonexistent/x.jsonl".into()],
            0,
            1,
            DocPosition::default(),
        )
        .unwrap()
        .next_doc()
        .unwrap_err()
        .to_string();
        assert!(err.contains("/nonexistent/x.jsonl"), "{err}");
    }
}
