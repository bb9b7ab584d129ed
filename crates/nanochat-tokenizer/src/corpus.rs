//! Streaming text documents from corpus shards for tokenizer training and evaluation.
//!
//! Supported files (optionally gzip-compressed, detected by content):
//! - `.jsonl`: one JSON object per line; the document is its `"text"` string.
//! - anything else (e.g. `.txt`): plain UTF-8 text, one document per blank-line-separated block.
//!
//! Parquet shards are read by nanochat-data, which can feed [`crate::BpeTrainer`] directly.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::Error;

/// Iterator over the documents of one file. Errors carry the file and line.
pub struct Documents {
    path: PathBuf,
    lines: std::io::Lines<BufReader<Box<dyn Read + Send>>>,
    jsonl: bool,
    line_no: usize,
    done: bool,
}

/// Opens a corpus file for streaming.
pub fn documents(path: &Path) -> Result<Documents, Error> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let is_gzip = reader
        .fill_buf()
        .map_err(|e| Error::io(path, e))?
        .starts_with(&[0x1f, 0x8b]);
    let inner: Box<dyn Read + Send> = if is_gzip {
        Box::new(flate2::read::MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let name = path.to_string_lossy();
    let stem = name.strip_suffix(".gz").unwrap_or(&name);
    Ok(Documents {
        path: path.to_path_buf(),
        lines: BufReader::with_capacity(1 << 20, inner).lines(),
        jsonl: stem.ends_with(".jsonl") || stem.ends_with(".json"),
        line_no: 0,
        done: false,
    })
}

#[derive(serde::Deserialize)]
struct TextRecord {
    text: String,
}

impl Documents {
    fn fail(&mut self, msg: String) -> Option<Result<String, Error>> {
        self.done = true;
        Some(Err(Error::Format {
            path: self.path.clone(),
            line: self.line_no,
            msg,
        }))
    }
}

impl Iterator for Documents {
    type Item = Result<String, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.jsonl {
            loop {
                let line = match self.lines.next()? {
                    Ok(l) => l,
                    Err(e) => return self.fail(format!("read error: {e}")),
                };
                self.line_no += 1;
                if line.trim().is_empty() {
                    continue;
                }
                return match serde_json::from_str::<TextRecord>(&line) {
                    Ok(r) => Some(Ok(r.text)),
                    Err(e) => self.fail(format!(
                        "expected a JSON object with a \"text\" string: {e}"
                    )),
                };
            }
        }
        // Plain text: gather lines until a blank line.
        let mut doc = String::new();
        loop {
            match self.lines.next() {
                None => {
                    self.done = true;
                    return (!doc.is_empty()).then_some(Ok(doc));
                }
                Some(Err(e)) => return self.fail(format!("read error: {e}")),
                Some(Ok(line)) => {
                    self.line_no += 1;
                    if line.trim().is_empty() {
                        if !doc.is_empty() {
                            return Some(Ok(doc));
                        }
                    } else {
                        if !doc.is_empty() {
                            doc.push('\n');
                        }
                        doc.push_str(&line);
                    }
                }
            }
        }
    }
}

/// Cuts a document to at most `max_chars` characters (Unicode scalar values, like Python's
/// `len`), as nanochat's `doc_cap` does.
pub fn cap_chars(text: &mut String, max_chars: usize) {
    if text.len() <= max_chars {
        return; // Fewer bytes than the cap means fewer characters too.
    }
    if let Some((cut, _)) = text.char_indices().nth(max_chars) {
        text.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_counts_characters() {
        let mut s = "héllo wörld".to_string();
        cap_chars(&mut s, 4);
        assert_eq!(s, "héll");
        let mut s = "abc".to_string();
        cap_chars(&mut s, 10);
        assert_eq!(s, "abc");
    }

    #[test]
    fn reads_jsonl_gz_and_text() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl.gz");
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&p).unwrap(),
            flate2::Compression::fast(),
        );
        gz.write_all(b"{\"text\":\"one\"}\n\n{\"text\":\"two\",\"id\":3}\n")
            .unwrap();
        gz.finish().unwrap();
        let docs: Vec<String> = documents(&p).unwrap().map(|d| d.unwrap()).collect();
        assert_eq!(docs, ["one", "two"]);

        let t = dir.path().join("b.txt");
        std::fs::write(&t, "para one\nline two\n\n\npara two\n").unwrap();
        let docs: Vec<String> = documents(&t).unwrap().map(|d| d.unwrap()).collect();
        assert_eq!(docs, ["para one\nline two", "para two"]);

        let bad = dir.path().join("c.jsonl");
        std::fs::write(&bad, "{\"text\":\"ok\"}\n{\"body\":1}\n").unwrap();
        let res: Vec<_> = documents(&bad).unwrap().collect();
        assert_eq!(res.len(), 2);
        assert!(res[1].as_ref().unwrap_err().to_string().contains(":2:"));
    }
}
