//! The `Tokenizer`: mergeable ranks + split pattern + special tokens, with encode/decode and the
//! on-disk format (`tokenizer.tiktoken` + `tokenizer.json`).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::bpe::{self, RankMap};
use crate::pretokenize::{Splitter, CL100K_PATTERN, NANOCHAT_PATTERN, O200K_PATTERN, R50K_PATTERN};
use crate::Error;

/// nanochat's special tokens, in id order; they take the ids right after the mergeable ranks.
pub const NANOCHAT_SPECIALS: [&str; 9] = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
];

/// File name of the ranks inside a tokenizer directory.
pub const RANKS_FILE: &str = "tokenizer.tiktoken";
/// File name of the JSON sidecar inside a tokenizer directory.
pub const SIDECAR_FILE: &str = "tokenizer.json";

/// OpenAI's published encodings, loadable from their `.tiktoken` files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenAiEncoding {
    /// GPT-2 / GPT-3 (`r50k_base`).
    R50kBase,
    /// GPT-3.5 / GPT-4 (`cl100k_base`).
    Cl100kBase,
    /// GPT-4o (`o200k_base`).
    O200kBase,
}

impl OpenAiEncoding {
    /// tiktoken's name for the encoding (also the file stem of its ranks file).
    pub fn name(self) -> &'static str {
        match self {
            OpenAiEncoding::R50kBase => "r50k_base",
            OpenAiEncoding::Cl100kBase => "cl100k_base",
            OpenAiEncoding::O200kBase => "o200k_base",
        }
    }

    /// tiktoken's split pattern for the encoding.
    pub fn pattern(self) -> &'static str {
        match self {
            OpenAiEncoding::R50kBase => R50K_PATTERN,
            OpenAiEncoding::Cl100kBase => CL100K_PATTERN,
            OpenAiEncoding::O200kBase => O200K_PATTERN,
        }
    }

    /// tiktoken's special tokens for the encoding, with their ids.
    pub fn specials(self) -> Vec<(String, u32)> {
        let list: &[(&str, u32)] = match self {
            OpenAiEncoding::R50kBase => &[("<|endoftext|>", 50256)],
            OpenAiEncoding::Cl100kBase => &[
                ("<|endoftext|>", 100257),
                ("<|fim_prefix|>", 100258),
                ("<|fim_middle|>", 100259),
                ("<|fim_suffix|>", 100260),
                ("<|endofprompt|>", 100276),
            ],
            OpenAiEncoding::O200kBase => &[("<|endoftext|>", 199999), ("<|endofprompt|>", 200018)],
        };
        list.iter().map(|&(s, id)| (s.to_string(), id)).collect()
    }
}

/// The JSON sidecar stored next to the ranks.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct Sidecar {
    /// Format marker so a future layout can be told apart.
    format: String,
    name: String,
    pattern: String,
    /// Special tokens in id order.
    special_tokens: Vec<SpecialToken>,
    vocab_size: u32,
    /// UTF-8 byte length of every id (0 for specials and unused ids).
    token_bytes: Vec<u32>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct SpecialToken {
    token: String,
    id: u32,
}

const SIDECAR_FORMAT: &str = "nanochat-tokenizer/1";

/// A byte-level BPE tokenizer (tiktoken semantics) with special tokens.
///
/// Cheap to share across threads (`&Tokenizer` is `Sync`); wrap it in an `Arc` to share owners.
#[derive(Clone)]
pub struct Tokenizer {
    name: String,
    splitter: Splitter,
    ranks: RankMap,
    /// Bytes of every id laid end to end: id i is `bytes[offsets[i]..offsets[i + 1]]`.
    /// Specials hold their text; unused ids are empty.
    bytes: Vec<u8>,
    offsets: Vec<u32>,
    specials: Vec<(String, u32)>,
    special_ids: FxHashMap<String, u32>,
    token_bytes: Vec<u32>,
    bos: u32,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("name", &self.name)
            .field("vocab_size", &self.vocab_size())
            .field("pattern", &self.splitter.pattern())
            .field("specials", &self.specials)
            .finish()
    }
}

impl Tokenizer {
    /// Builds a tokenizer from mergeable ranks (token bytes with their id), a split pattern and
    /// special tokens with explicit ids.
    ///
    /// The ranks must contain all 256 single bytes (so every input can be encoded), and no id
    /// or token may appear twice. The beginning-of-sequence token is `<|bos|>`, or
    /// `<|endoftext|>` for OpenAI's vocabularies; one of them must be among the specials.
    pub fn from_ranks(
        name: &str,
        ranks: Vec<(Vec<u8>, u32)>,
        pattern: &str,
        specials: Vec<(String, u32)>,
    ) -> Result<Self, Error> {
        let splitter = Splitter::new(pattern)?;
        let max_rank = ranks.iter().map(|r| r.1).max();
        let max_special = specials.iter().map(|s| s.1).max();
        let vocab = match (max_rank, max_special) {
            (None, _) => return Err(Error::Vocab("no mergeable ranks".into())),
            (Some(a), None) => a,
            (Some(a), Some(b)) => a.max(b),
        } as usize
            + 1;
        let mut per_id: Vec<Option<&[u8]>> = vec![None; vocab];
        let mut map = RankMap::default();
        map.reserve(ranks.len());
        for (bytes, id) in &ranks {
            if bytes.is_empty() {
                return Err(Error::Vocab(format!("id {id} has an empty token")));
            }
            if per_id[*id as usize].is_some() {
                return Err(Error::Vocab(format!("id {id} is assigned twice")));
            }
            per_id[*id as usize] = Some(bytes);
            if map.insert(bytes, *id).is_some() {
                return Err(Error::Vocab(format!(
                    "token {:?} appears twice",
                    String::from_utf8_lossy(bytes)
                )));
            }
        }
        if let Some(b) = (0..=255u8).find(|b| map.get(&[*b]).is_none()) {
            return Err(Error::Vocab(format!(
                "the single byte 0x{b:02x} has no rank; byte-level BPE needs all 256"
            )));
        }
        let mut special_ids = FxHashMap::default();
        for (s, id) in &specials {
            if s.is_empty() {
                return Err(Error::Vocab("empty special token".into()));
            }
            if per_id[*id as usize].is_some() {
                return Err(Error::Vocab(format!(
                    "special token {s:?} reuses id {id}, which is already taken"
                )));
            }
            per_id[*id as usize] = Some(s.as_bytes());
            if special_ids.insert(s.clone(), *id).is_some() {
                return Err(Error::Vocab(format!("special token {s:?} appears twice")));
            }
        }
        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(vocab + 1);
        let mut token_bytes = vec![0u32; vocab];
        offsets.push(0u32);
        for (id, slot) in per_id.iter().enumerate() {
            if let Some(b) = slot {
                bytes.extend_from_slice(b);
            }
            offsets.push(
                u32::try_from(bytes.len())
                    .map_err(|_| Error::Vocab("token bytes exceed 4 GiB in total".into()))?,
            );
            token_bytes[id] = slot.map_or(0, |b| b.len() as u32);
        }
        for (_, id) in &specials {
            token_bytes[*id as usize] = 0;
        }
        let bos = special_ids
            .get("<|bos|>")
            .or_else(|| special_ids.get("<|endoftext|>"))
            .copied()
            .ok_or_else(|| {
                Error::Vocab(
                    "no beginning-of-sequence token: add <|bos|> (or <|endoftext|>) to the specials"
                        .into(),
                )
            })?;
        let mut specials = specials;
        specials.sort_by_key(|s| s.1);
        Ok(Tokenizer {
            name: name.to_string(),
            splitter,
            ranks: map,
            bytes,
            offsets,
            specials,
            special_ids,
            token_bytes,
            bos,
        })
    }

    /// A nanochat tokenizer: ranks `0..n` given as token bytes in id order, nanochat's split
    /// pattern, and its 9 special tokens appended as ids `n..n+9`.
    pub fn nanochat(name: &str, tokens: Vec<Vec<u8>>) -> Result<Self, Error> {
        Self::with_appended_specials(name, tokens, NANOCHAT_PATTERN, &NANOCHAT_SPECIALS)
    }

    /// Ranks `0..n` in id order, `pattern`, and `specials` appended as ids `n..`.
    pub fn with_appended_specials(
        name: &str,
        tokens: Vec<Vec<u8>>,
        pattern: &str,
        specials: &[&str],
    ) -> Result<Self, Error> {
        let n = tokens.len() as u32;
        let ranks = tokens.into_iter().zip(0u32..).collect();
        let specials = specials
            .iter()
            .zip(n..)
            .map(|(s, id)| (s.to_string(), id))
            .collect();
        Self::from_ranks(name, ranks, pattern, specials)
    }

    /// Loads one of OpenAI's encodings from its `.tiktoken` file (gzip-compressed or plain).
    pub fn from_openai_file(path: &Path, encoding: OpenAiEncoding) -> Result<Self, Error> {
        let ranks = read_tiktoken(path)?;
        Self::from_ranks(
            encoding.name(),
            ranks,
            encoding.pattern(),
            encoding.specials(),
        )
    }

    /// Loads a tokenizer directory written by [`Tokenizer::save`].
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let sidecar_path = dir.join(SIDECAR_FILE);
        let text =
            std::fs::read_to_string(&sidecar_path).map_err(|e| Error::io(&sidecar_path, e))?;
        let sidecar: Sidecar = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: sidecar_path.clone(),
            source: e,
        })?;
        if sidecar.format != SIDECAR_FORMAT {
            return Err(Error::Format {
                path: sidecar_path,
                line: 0,
                msg: format!(
                    "unsupported format {:?} (expected {SIDECAR_FORMAT:?})",
                    sidecar.format
                ),
            });
        }
        let ranks = read_tiktoken(&dir.join(RANKS_FILE))?;
        let specials = sidecar
            .special_tokens
            .iter()
            .map(|s| (s.token.clone(), s.id))
            .collect();
        let tok = Self::from_ranks(&sidecar.name, ranks, &sidecar.pattern, specials)?;
        if tok.token_bytes != sidecar.token_bytes || tok.vocab_size() != sidecar.vocab_size {
            return Err(Error::Format {
                path: sidecar_path,
                line: 0,
                msg: format!(
                    "vocab_size/token_bytes disagree with {RANKS_FILE}: the files do not belong together"
                ),
            });
        }
        Ok(tok)
    }

    /// Writes `tokenizer.tiktoken` and `tokenizer.json` into `dir` (created if missing). Each
    /// file is written to a temporary name and renamed, so a crash never leaves a torn file.
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut ranks_text = String::new();
        for id in 0..self.vocab_size() {
            let bytes = self.id_bytes(id);
            if bytes.is_empty() || self.is_special(id) {
                continue;
            }
            ranks_text.push_str(&BASE64.encode(bytes));
            ranks_text.push(' ');
            ranks_text.push_str(&id.to_string());
            ranks_text.push('\n');
        }
        nanochat_artifacts::write_atomic(&dir.join(RANKS_FILE), ranks_text.as_bytes())?;
        let sidecar = Sidecar {
            format: SIDECAR_FORMAT.to_string(),
            name: self.name.clone(),
            pattern: self.splitter.pattern().to_string(),
            special_tokens: self
                .specials
                .iter()
                .map(|(token, id)| SpecialToken {
                    token: token.clone(),
                    id: *id,
                })
                .collect(),
            vocab_size: self.vocab_size(),
            token_bytes: self.token_bytes.clone(),
        };
        let json = serde_json::to_vec(&sidecar).map_err(|e| Error::Json {
            path: dir.join(SIDECAR_FILE),
            source: e,
        })?;
        Ok(nanochat_artifacts::write_atomic(
            &dir.join(SIDECAR_FILE),
            &json,
        )?)
    }

    /// Name of the tokenizer (e.g. `cl100k_base`, or what training called it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The split pattern.
    pub fn pattern(&self) -> &str {
        self.splitter.pattern()
    }

    /// The pre-tokenizer in use.
    pub fn splitter(&self) -> &Splitter {
        &self.splitter
    }

    /// Number of ids (one more than the largest id, specials included).
    pub fn vocab_size(&self) -> u32 {
        self.token_bytes.len() as u32
    }

    /// Number of mergeable (non-special) tokens.
    pub fn num_ranks(&self) -> usize {
        self.ranks.len()
    }

    /// UTF-8 byte length of every id; 0 for special tokens and unused ids (bits-per-byte).
    pub fn token_bytes(&self) -> &[u32] {
        &self.token_bytes
    }

    /// Special tokens with their ids, in id order.
    pub fn specials(&self) -> &[(String, u32)] {
        &self.specials
    }

    /// Id of a special token, by its exact text.
    pub fn special_id(&self, token: &str) -> Option<u32> {
        self.special_ids.get(token).copied()
    }

    /// Whether `id` is a special token.
    pub fn is_special(&self, id: u32) -> bool {
        self.specials.binary_search_by_key(&id, |s| s.1).is_ok()
    }

    /// The beginning-of-sequence id (`<|bos|>`, or `<|endoftext|>` for OpenAI vocabularies).
    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    /// Id of a mergeable token given its bytes.
    pub fn token_id(&self, bytes: &[u8]) -> Option<u32> {
        self.ranks.get(bytes)
    }

    /// Bytes of one id (specials give their text; unknown ids give nothing).
    pub fn id_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        if i + 1 >= self.offsets.len() {
            return &[];
        }
        &self.bytes[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }

    /// Encodes text; special-token strings in it are treated as plain text.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.encode_into(text, &mut out);
        out
    }

    /// Encodes text, appending the ids to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        let ranks = &self.ranks;
        self.splitter.for_each_piece(text, |piece| {
            bpe::encode_piece(ranks, piece.as_bytes(), out)
        });
    }

    /// Encodes many texts in parallel (rayon's global pool); output order matches input order.
    pub fn encode_batch<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Vec<Vec<u32>> {
        texts.par_iter().map(|t| self.encode(t.as_ref())).collect()
    }

    /// Encodes text, recognising the given special-token strings (all of them when `allowed` is
    /// `None`) as their ids; everything else is encoded as plain text.
    pub fn encode_with_specials(&self, text: &str, allowed: Option<&[&str]>) -> Vec<u32> {
        let candidates: Vec<(&str, u32)> = self
            .specials
            .iter()
            .filter(|(s, _)| allowed.is_none_or(|a| a.contains(&s.as_str())))
            .map(|(s, id)| (s.as_str(), *id))
            .collect();
        let mut out = Vec::new();
        let mut rest = text;
        loop {
            // Earliest special occurrence; the longest one wins at equal positions.
            let found = candidates
                .iter()
                .filter_map(|&(s, id)| rest.find(s).map(|p| (p, std::cmp::Reverse(s.len()), id)))
                .min();
            match found {
                Some((p, std::cmp::Reverse(len), id)) => {
                    self.encode_into(&rest[..p], &mut out);
                    out.push(id);
                    rest = &rest[p + len..];
                }
                None => {
                    self.encode_into(rest, &mut out);
                    return out;
                }
            }
        }
    }

    /// The exact bytes of a sequence of ids. Ids outside the vocabulary contribute nothing;
    /// use [`Tokenizer::try_decode_bytes`] to reject them.
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            out.extend_from_slice(self.id_bytes(id));
        }
        out
    }

    /// Like [`Tokenizer::decode_bytes`], but an id outside the vocabulary is an error.
    pub fn try_decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, Error> {
        if let Some(&bad) = ids
            .iter()
            .find(|&&id| id >= self.vocab_size() || self.id_bytes(id).is_empty())
        {
            return Err(Error::UnknownId(bad));
        }
        Ok(self.decode_bytes(ids))
    }

    /// Decodes to text; invalid UTF-8 becomes U+FFFD (like tiktoken's `errors="replace"`).
    /// Never panics, whatever the ids.
    pub fn decode(&self, ids: &[u32]) -> String {
        match String::from_utf8(self.decode_bytes(ids)) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }
}

/// Reads a `.tiktoken` ranks file (`base64(token) rank` per line), gzip-compressed or plain.
pub fn read_tiktoken(path: &Path) -> Result<Vec<(Vec<u8>, u32)>, Error> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(file);
    let is_gzip = reader
        .fill_buf()
        .map_err(|e| Error::io(path, e))?
        .starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn Read> = if is_gzip {
        Box::new(flate2::read::GzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    parse_tiktoken(BufReader::new(reader), path)
}

/// Parses `.tiktoken` text from any reader; `origin` names it in errors.
pub fn parse_tiktoken(reader: impl BufRead, origin: &Path) -> Result<Vec<(Vec<u8>, u32)>, Error> {
    let mut ranks = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| Error::io(origin, e))?;
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        let bad = |msg: String| Error::Format {
            path: origin.to_path_buf(),
            line: i + 1,
            msg,
        };
        let (token, rank) = line
            .split_once(' ')
            .ok_or_else(|| bad("expected `<base64 token> <rank>`".into()))?;
        let bytes = BASE64
            .decode(token)
            .map_err(|e| bad(format!("bad base64 {token:?}: {e}")))?;
        let rank: u32 = rank
            .trim()
            .parse()
            .map_err(|e| bad(format!("bad rank {rank:?}: {e}")))?;
        ranks.push((bytes, rank));
    }
    Ok(ranks)
}
