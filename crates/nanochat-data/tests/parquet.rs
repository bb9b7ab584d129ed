//! The pure-Rust parquet reader against files written by pyarrow 26 (zstd pages): dictionary
//! encoding with data page v1 and a null, and PLAIN encoding with data page v2.

use std::path::{Path, PathBuf};

use nanochat_data::parquet::ParquetTextReader;
use nanochat_data::{DocPosition, DocStream};
use serde::Deserialize;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

#[derive(Deserialize)]
struct Row {
    text: Option<String>,
}

fn expected() -> Vec<Option<String>> {
    let rows: Vec<Row> = nanochat_data::tasks::read_jsonl(&data("docs_expected.jsonl.gz")).unwrap();
    rows.into_iter().map(|r| r.text).collect()
}

#[test]
fn dictionary_v1_with_null_reads_every_row_group() {
    let mut r = ParquetTextReader::open(&data("docs_dict_v1.parquet"), "text").unwrap();
    assert_eq!(r.num_row_groups(), 3);
    let mut got = Vec::new();
    for g in 0..3 {
        got.extend(r.read_row_group(g).unwrap());
    }
    let want: Vec<String> = expected().into_iter().flatten().collect();
    assert_eq!(got.len(), 239);
    assert_eq!(got, want);
}

#[test]
fn plain_v2_matches_and_streams_in_row_group_order() {
    let mut r = ParquetTextReader::open(&data("docs_plain_v2.parquet"), "text").unwrap();
    assert_eq!(r.num_row_groups(), 4);
    let first = r.read_row_group(0).unwrap();
    assert_eq!(first.len(), 64);
    // The v2 file has no null: row 7 holds the original text.
    let mut s = DocStream::new(
        vec![data("docs_plain_v2.parquet")],
        0,
        1,
        DocPosition::default(),
    )
    .unwrap();
    let docs: Vec<String> = (0..240).map(|_| s.next_doc().unwrap().1).collect();
    let exp = expected();
    for (i, d) in docs.iter().enumerate() {
        if let Some(e) = &exp[i] {
            assert_eq!(d, e, "row {i}");
        }
    }
    assert_eq!(docs[..64], first[..]);
}

#[test]
fn stream_position_names_row_group_and_offset() {
    let p = data("docs_dict_v1.parquet");
    let mut s = DocStream::new(vec![p.clone()], 0, 1, DocPosition::default()).unwrap();
    for _ in 0..150 {
        s.next_doc().unwrap();
    }
    let pos = s.position();
    // 99 non-null docs in row group 0 (one null), so doc 150 is row group 1, offset 51.
    assert_eq!((pos.shard, pos.unit, pos.offset), (0, 1, 51));
    let next = s.next_doc().unwrap().1;
    let mut resumed = DocStream::new(vec![p], 0, 1, pos).unwrap();
    assert_eq!(resumed.next_doc().unwrap().1, next);
}

#[test]
fn missing_column_and_truncated_file_are_clear_errors() {
    let err = ParquetTextReader::open(&data("docs_dict_v1.parquet"), "body")
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("docs_dict_v1.parquet") && err.contains("body"),
        "{err}"
    );
    let d = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(data("docs_dict_v1.parquet")).unwrap();
    let cut = d.path().join("cut.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = ParquetTextReader::open(&cut, "text")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("cut.parquet"), "{err}");
}
