//! Reading JSONL files (plain or gzip) line by line, keeping line numbers for error reports.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::{EvalError, Result};

/// One non-empty line of a JSONL file: its 1-based line number and the parsed value or the
/// parse error (kept, so the caller can report it and move on).
#[derive(Debug)]
pub struct JsonLine {
    /// 1-based line number in the (decompressed) file.
    pub line: usize,
    /// The parsed line, or why it did not parse.
    pub value: std::result::Result<serde_json::Value, String>,
}

/// Open a file, transparently decompressing it when the name ends in `.gz`.
pub fn open_maybe_gz(path: &Path) -> Result<Box<dyn BufRead>> {
    let file = File::open(path).map_err(|e| EvalError::io(path, e))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    Ok(Box::new(BufReader::new(reader)))
}

/// Read every non-blank line of a JSONL(.gz) file. I/O errors (including a corrupt gzip stream)
/// fail the whole read; a line that is not valid JSON is returned as an error value.
pub fn read_jsonl(path: &Path) -> Result<Vec<JsonLine>> {
    let reader = open_maybe_gz(path)?;
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| EvalError::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str(&line).map_err(|e| e.to_string());
        out.push(JsonLine { line: i + 1, value });
    }
    Ok(out)
}

/// Find the first existing path among `candidates`.
pub fn first_existing(candidates: &[PathBuf]) -> Option<PathBuf> {
    candidates.iter().find(|p| p.is_file()).cloned()
}
