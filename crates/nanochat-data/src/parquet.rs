//! A minimal, pure-Rust parquet reader for one UTF-8 (`BYTE_ARRAY`) column of a flat schema —
//! exactly what nanochat's pretraining shards need (a `text` column written by pyarrow).
//!
//! Why not the `parquet` crate: its zstd codec links the C zstd library, and the rest of it is far
//! more than reading one string column. This module decodes the thrift compact footer and page
//! headers itself, decompresses pages with `ruzstd` (pure Rust; gzip through `flate2`), and
//! handles PLAIN and dictionary (RLE_DICTIONARY / PLAIN_DICTIONARY) encodings with optional
//! definition levels, for data pages v1 and v2. Anything else is a clear error, not a guess.
//!
//! One row group is decoded at a time, so memory is bounded by a row group (nanochat: 1000 docs).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::DataError;

/// Reader of one string column, row group by row group.
pub struct ParquetTextReader {
    path: PathBuf,
    file: File,
    /// Per row group: where the column chunk starts, its compressed length, codec, value count.
    chunks: Vec<ChunkMeta>,
    max_def_level: u8,
}

#[derive(Debug, Clone)]
struct ChunkMeta {
    start: u64,
    len: u64,
    codec: i64,
    num_values: i64,
}

impl ParquetTextReader {
    /// Opens `path` and locates column `column` (a top-level BYTE_ARRAY field).
    pub fn open(path: &Path, column: &str) -> Result<Self, DataError> {
        let bad = |detail: String| DataError::Invalid {
            path: path.to_path_buf(),
            detail,
        };
        let mut file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| DataError::io(path, e))?;
        if size < 12 {
            return Err(bad("too short to be a parquet file".into()));
        }
        let mut tail = [0u8; 8];
        file.seek(SeekFrom::End(-8))
            .map_err(|e| DataError::io(path, e))?;
        file.read_exact(&mut tail)
            .map_err(|e| DataError::io(path, e))?;
        if &tail[4..] != b"PAR1" {
            return Err(bad(
                "missing the PAR1 footer magic (not parquet, or truncated)".into(),
            ));
        }
        let meta_len = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]) as u64;
        if meta_len + 12 > size {
            return Err(bad(format!(
                "footer length {meta_len} exceeds the file size {size}"
            )));
        }
        let mut meta = vec![0u8; meta_len as usize];
        file.seek(SeekFrom::Start(size - 8 - meta_len))
            .map_err(|e| DataError::io(path, e))?;
        file.read_exact(&mut meta)
            .map_err(|e| DataError::io(path, e))?;
        let fmd = thrift::Reader::new(&meta)
            .read_struct()
            .map_err(|e| bad(format!("footer: {e}")))?;

        // Schema: element 0 is the root; columns follow. Only flat schemas are supported.
        let schema = fmd
            .list(2)
            .ok_or_else(|| bad("footer has no schema".into()))?;
        let mut leaf_index = None;
        let mut max_def_level = 0u8;
        for (leaf, el) in schema.iter().skip(1).enumerate() {
            let el = el
                .as_struct()
                .ok_or_else(|| bad("malformed schema element".into()))?;
            if el.int(5).unwrap_or(0) > 0 {
                return Err(bad("nested schemas are not supported".into()));
            }
            if el.bytes(4) == Some(column.as_bytes()) {
                if el.int(1) != Some(6) {
                    return Err(bad(format!(
                        "column `{column}` is not a BYTE_ARRAY (string)"
                    )));
                }
                max_def_level = match el.int(3) {
                    Some(1) => 1,
                    Some(2) => return Err(bad(format!("column `{column}` is repeated"))),
                    _ => 0,
                };
                leaf_index = Some(leaf);
            }
        }
        let leaf_index = leaf_index.ok_or_else(|| bad(format!("no column named `{column}`")))?;
        let mut chunks = Vec::new();
        for rg in fmd.list(4).unwrap_or(&[]) {
            let rg = rg
                .as_struct()
                .ok_or_else(|| bad("malformed row group".into()))?;
            let cols = rg
                .list(1)
                .ok_or_else(|| bad("row group without columns".into()))?;
            let cc = cols
                .get(leaf_index)
                .and_then(|c| c.as_struct())
                .ok_or_else(|| bad("row group lacks the text column".into()))?;
            let md = cc
                .field(3)
                .and_then(|v| v.as_struct())
                .ok_or_else(|| bad("column chunk without metadata".into()))?;
            let data_off = md.int(9).ok_or_else(|| bad("no data_page_offset".into()))?;
            let start = match md.int(11) {
                Some(d) if d > 0 && d < data_off => d,
                _ => data_off,
            };
            let len = md
                .int(7)
                .ok_or_else(|| bad("no total_compressed_size".into()))?;
            if start < 0 || len < 0 || (start + len) as u64 > size {
                return Err(bad(format!(
                    "column chunk [{start}, +{len}) is outside the file"
                )));
            }
            chunks.push(ChunkMeta {
                start: start as u64,
                len: len as u64,
                codec: md.int(4).unwrap_or(0),
                num_values: md.int(5).unwrap_or(0),
            });
        }
        Ok(ParquetTextReader {
            path: path.to_path_buf(),
            file,
            chunks,
            max_def_level,
        })
    }

    /// Number of row groups.
    pub fn num_row_groups(&self) -> usize {
        self.chunks.len()
    }

    /// The column's non-null values in row group `index`.
    pub fn read_row_group(&mut self, index: usize) -> Result<Vec<String>, DataError> {
        let path = self.path.clone();
        let bad = |detail: String| DataError::Invalid {
            path: path.clone(),
            detail: format!("row group {index}: {detail}"),
        };
        let chunk = self
            .chunks
            .get(index)
            .cloned()
            .ok_or_else(|| bad("no such row group".into()))?;
        let mut buf = vec![0u8; chunk.len as usize];
        self.file
            .seek(SeekFrom::Start(chunk.start))
            .map_err(|e| DataError::io(&path, e))?;
        self.file
            .read_exact(&mut buf)
            .map_err(|e| DataError::io(&path, e))?;
        decode_chunk(&buf, chunk.codec, chunk.num_values, self.max_def_level).map_err(bad)
    }
}

fn decompress(codec: i64, data: &[u8], uncompressed: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(uncompressed);
    match codec {
        0 => out.extend_from_slice(data),
        2 => {
            flate2::read::GzDecoder::new(data)
                .read_to_end(&mut out)
                .map_err(|e| format!("gzip page: {e}"))?;
        }
        6 => {
            let mut src = data;
            let mut dec = ruzstd::decoding::StreamingDecoder::new(&mut src)
                .map_err(|e| format!("zstd page: {e}"))?;
            dec.read_to_end(&mut out)
                .map_err(|e| format!("zstd page: {e}"))?;
        }
        1 => return Err("SNAPPY pages are not supported; rewrite the shard with zstd".into()),
        c => return Err(format!("compression codec {c} is not supported (use zstd)")),
    }
    if out.len() != uncompressed {
        return Err(format!(
            "page decompressed to {} bytes, header says {uncompressed}",
            out.len()
        ));
    }
    Ok(out)
}

fn decode_chunk(
    buf: &[u8],
    codec: i64,
    num_values: i64,
    max_def: u8,
) -> Result<Vec<String>, String> {
    let mut pos = 0usize;
    let mut dict: Vec<String> = Vec::new();
    let mut out = Vec::new();
    let mut seen: i64 = 0;
    while seen < num_values && pos < buf.len() {
        let mut r = thrift::Reader::new(&buf[pos..]);
        let header = r.read_struct().map_err(|e| format!("page header: {e}"))?;
        pos += r.pos();
        let page_type = header.int(1).ok_or("page header without type")?;
        let uncompressed = header.int(2).ok_or("page header without size")? as usize;
        let compressed = header.int(3).ok_or("page header without compressed size")? as usize;
        let body = buf
            .get(pos..pos + compressed)
            .ok_or("page runs past the end of its column chunk")?;
        pos += compressed;
        match page_type {
            2 => {
                let dh = header
                    .field(7)
                    .and_then(|v| v.as_struct())
                    .ok_or("dictionary page without its header")?;
                let n = dh.int(1).unwrap_or(0) as usize;
                let data = decompress(codec, body, uncompressed)?;
                dict = decode_plain(&data, n)?;
            }
            0 => {
                let dh = header
                    .field(5)
                    .and_then(|v| v.as_struct())
                    .ok_or("data page without its header")?;
                let n = dh.int(1).unwrap_or(0) as usize;
                let encoding = dh.int(2).unwrap_or(0);
                let data = decompress(codec, body, uncompressed)?;
                let mut p = 0usize;
                let present = if max_def > 0 {
                    let len = data
                        .get(0..4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                        .ok_or("truncated definition levels")?;
                    let levels = data.get(4..4 + len).ok_or("truncated definition levels")?;
                    p = 4 + len;
                    let defs = decode_rle_hybrid(levels, 1, n)?;
                    defs.iter().filter(|&&d| d as u8 == max_def).count()
                } else {
                    n
                };
                decode_values(&data[p..], encoding, present, &dict, &mut out)?;
                seen += n as i64;
            }
            3 => {
                let dh = header
                    .field(8)
                    .and_then(|v| v.as_struct())
                    .ok_or("data page v2 without its header")?;
                let n = dh.int(1).unwrap_or(0) as usize;
                let nulls = dh.int(2).unwrap_or(0) as usize;
                let encoding = dh.int(4).unwrap_or(0);
                let def_len = dh.int(5).unwrap_or(0) as usize;
                let rep_len = dh.int(6).unwrap_or(0) as usize;
                let is_compressed = dh.bool(7).unwrap_or(true);
                let levels = def_len + rep_len;
                let values = body.get(levels..).ok_or("truncated v2 page levels")?;
                let data = if is_compressed {
                    decompress(codec, values, uncompressed.saturating_sub(levels))?
                } else {
                    values.to_vec()
                };
                decode_values(&data, encoding, n - nulls.min(n), &dict, &mut out)?;
                seen += n as i64;
            }
            _ => {} // index pages and unknown pages carry no values
        }
    }
    Ok(out)
}

fn decode_values(
    data: &[u8],
    encoding: i64,
    count: usize,
    dict: &[String],
    out: &mut Vec<String>,
) -> Result<(), String> {
    match encoding {
        0 => out.extend(decode_plain(data, count)?),
        2 | 8 => {
            let width = *data.first().ok_or("empty dictionary-index page")?;
            let idx = decode_rle_hybrid(&data[1..], width, count)?;
            for i in idx {
                out.push(
                    dict.get(i as usize)
                        .ok_or_else(|| format!("dictionary index {i} out of range"))?
                        .clone(),
                );
            }
        }
        e => return Err(format!("value encoding {e} is not supported")),
    }
    Ok(())
}

fn decode_plain(data: &[u8], count: usize) -> Result<Vec<String>, String> {
    let mut out = Vec::with_capacity(count);
    let mut p = 0usize;
    for _ in 0..count {
        let len = data
            .get(p..p + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or("truncated PLAIN byte array")?;
        let bytes = data
            .get(p + 4..p + 4 + len)
            .ok_or("truncated PLAIN byte array")?;
        out.push(String::from_utf8_lossy(bytes).into_owned());
        p += 4 + len;
    }
    Ok(out)
}

/// Decodes `count` values of the RLE / bit-packed hybrid encoding at `bit_width`.
fn decode_rle_hybrid(data: &[u8], bit_width: u8, count: usize) -> Result<Vec<u32>, String> {
    if bit_width > 32 {
        return Err(format!("bit width {bit_width} is too large"));
    }
    let mut out = Vec::with_capacity(count);
    let mut p = 0usize;
    let byte_width = (bit_width as usize).div_ceil(8);
    while out.len() < count {
        let before = out.len();
        let (header, n) =
            thrift::varint(data.get(p..).unwrap_or(&[])).ok_or("truncated RLE header")?;
        p += n;
        if header & 1 == 0 {
            let run = (header >> 1) as usize;
            let mut v = 0u32;
            for i in 0..byte_width {
                v |= u32::from(*data.get(p + i).ok_or("truncated RLE value")?) << (8 * i);
            }
            p += byte_width;
            out.extend(std::iter::repeat_n(v, run.min(count - out.len())));
        } else {
            let groups = (header >> 1) as usize;
            let nbytes = groups * bit_width as usize;
            let bytes = data.get(p..p + nbytes).ok_or("truncated bit-packed run")?;
            p += nbytes;
            let total = groups * 8;
            let mask = if bit_width == 32 {
                u32::MAX
            } else {
                (1u32 << bit_width) - 1
            };
            for i in 0..total {
                if out.len() == count {
                    break;
                }
                let bit = i * bit_width as usize;
                let mut v: u64 = 0;
                for k in 0..(bit_width as usize).div_ceil(8) + 1 {
                    if let Some(&b) = bytes.get(bit / 8 + k) {
                        v |= u64::from(b) << (8 * k);
                    }
                }
                out.push(((v >> (bit % 8)) as u32) & mask);
            }
        }
        if out.len() == before {
            return Err("empty RLE run".into());
        }
    }
    if out.len() < count {
        return Err(format!("RLE data holds {} of {count} values", out.len()));
    }
    Ok(out)
}

/// Thrift compact protocol, read into a generic tree (the footer and page headers are small).
mod thrift {
    /// A decoded thrift value.
    #[derive(Debug)]
    pub enum Value {
        Bool(bool),
        Int(i64),
        Double,
        Binary(Vec<u8>),
        List(Vec<Value>),
        Struct(Struct),
        Map,
    }

    /// A struct: its fields by id.
    #[derive(Debug, Default)]
    pub struct Struct(Vec<(i16, Value)>);

    impl Value {
        pub fn as_struct(&self) -> Option<&Struct> {
            match self {
                Value::Struct(s) => Some(s),
                _ => None,
            }
        }
    }

    impl Struct {
        pub fn field(&self, id: i16) -> Option<&Value> {
            self.0.iter().find(|(i, _)| *i == id).map(|(_, v)| v)
        }
        pub fn int(&self, id: i16) -> Option<i64> {
            match self.field(id)? {
                Value::Int(v) => Some(*v),
                _ => None,
            }
        }
        pub fn bool(&self, id: i16) -> Option<bool> {
            match self.field(id)? {
                Value::Bool(v) => Some(*v),
                _ => None,
            }
        }
        pub fn bytes(&self, id: i16) -> Option<&[u8]> {
            match self.field(id)? {
                Value::Binary(v) => Some(v),
                _ => None,
            }
        }
        pub fn list(&self, id: i16) -> Option<&[Value]> {
            match self.field(id)? {
                Value::List(v) => Some(v),
                _ => None,
            }
        }
    }

    pub fn varint(data: &[u8]) -> Option<(u64, usize)> {
        let mut v = 0u64;
        for (i, &b) in data.iter().enumerate().take(10) {
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Some((v, i + 1));
            }
        }
        None
    }

    pub struct Reader<'a> {
        data: &'a [u8],
        pos: usize,
        depth: usize,
    }

    impl<'a> Reader<'a> {
        pub fn new(data: &'a [u8]) -> Self {
            Reader {
                data,
                pos: 0,
                depth: 0,
            }
        }

        pub fn pos(&self) -> usize {
            self.pos
        }

        fn byte(&mut self) -> Result<u8, String> {
            let b = *self.data.get(self.pos).ok_or("truncated thrift data")?;
            self.pos += 1;
            Ok(b)
        }

        fn uvarint(&mut self) -> Result<u64, String> {
            let (v, n) = varint(&self.data[self.pos..]).ok_or("truncated thrift varint")?;
            self.pos += n;
            Ok(v)
        }

        fn zigzag(&mut self) -> Result<i64, String> {
            let v = self.uvarint()?;
            Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
        }

        fn value(&mut self, ty: u8) -> Result<Value, String> {
            Ok(match ty {
                1 => Value::Bool(true),
                2 => Value::Bool(false),
                3 => Value::Int(i64::from(self.byte()? as i8)),
                4..=6 => Value::Int(self.zigzag()?),
                7 => {
                    self.pos += 8;
                    if self.pos > self.data.len() {
                        return Err("truncated thrift double".into());
                    }
                    Value::Double
                }
                8 => {
                    let len = self.uvarint()? as usize;
                    let b = self
                        .data
                        .get(self.pos..self.pos + len)
                        .ok_or("truncated thrift binary")?;
                    self.pos += len;
                    Value::Binary(b.to_vec())
                }
                9 | 10 => {
                    let h = self.byte()?;
                    let mut n = usize::from(h >> 4);
                    if n == 15 {
                        n = self.uvarint()? as usize;
                    }
                    let et = h & 0x0f;
                    if n > self.data.len() {
                        return Err("thrift list longer than its data".into());
                    }
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(if et == 1 || et == 2 {
                            Value::Bool(self.byte()? == 1)
                        } else {
                            self.value(et)?
                        });
                    }
                    Value::List(items)
                }
                11 => {
                    let n = self.uvarint()? as usize;
                    if n > 0 {
                        let kv = self.byte()?;
                        for _ in 0..n {
                            self.value(kv >> 4)?;
                            self.value(kv & 0x0f)?;
                        }
                    }
                    Value::Map
                }
                12 => Value::Struct(self.read_struct()?),
                t => return Err(format!("unknown thrift type {t}")),
            })
        }

        pub fn read_struct(&mut self) -> Result<Struct, String> {
            self.depth += 1;
            if self.depth > 64 {
                return Err("thrift nesting too deep".into());
            }
            let mut fields = Vec::new();
            let mut last: i16 = 0;
            loop {
                let h = self.byte()?;
                if h == 0 {
                    break;
                }
                let delta = h >> 4;
                let id = if delta == 0 {
                    self.zigzag()? as i16
                } else {
                    last + i16::from(delta)
                };
                last = id;
                fields.push((id, self.value(h & 0x0f)?));
            }
            self.depth -= 1;
            Ok(Struct(fields))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rle_hybrid_decodes_runs_and_bitpacked_groups() {
        // RLE run of 3 × value 5 (width 3 → 1 byte), then a bit-packed group of 8 values 0..8.
        let mut data = vec![3 << 1, 5];
        data.push((1 << 1) | 1);
        // values 0..8 at 3 bits, LSB first: 0b_010_001_000, ...
        let vals: Vec<u32> = (0..8).collect();
        let mut bits: u64 = 0;
        for (i, v) in vals.iter().enumerate() {
            bits |= u64::from(*v) << (3 * i);
        }
        data.extend_from_slice(&bits.to_le_bytes()[..3]);
        let got = decode_rle_hybrid(&data, 3, 11).unwrap();
        assert_eq!(got, [5, 5, 5, 0, 1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn plain_byte_arrays() {
        let mut d = Vec::new();
        for s in ["ab", "", "héllo"] {
            d.extend_from_slice(&(s.len() as u32).to_le_bytes());
            d.extend_from_slice(s.as_bytes());
        }
        assert_eq!(decode_plain(&d, 3).unwrap(), ["ab", "", "héllo"]);
        assert!(decode_plain(&d[..5], 2).is_err());
    }

    #[test]
    fn non_parquet_file_is_rejected_with_its_name() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.parquet");
        std::fs::write(&p, b"definitely not a parquet file").unwrap();
        let err = ParquetTextReader::open(&p, "text")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("x.parquet") && err.contains("PAR1"), "{err}");
    }
}
