//! Turning a stream of token bytes into text deltas that are always valid UTF-8 and never show a
//! stop string, even when either is split across tokens.

/// Incremental text assembly for one sequence.
///
/// Bytes of a multi-byte character that is still incomplete are held until the rest arrives;
/// bytes that can never form a character become U+FFFD (as a lossy decode would). Text that
/// could be the start of a stop string is held back until it is clearly not one.
#[derive(Clone, Debug, Default)]
pub struct DeltaDecoder {
    partial: Vec<u8>,
    held: String,
    stops: Vec<String>,
}

/// Result of feeding one token's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delta {
    /// Text that is now safe to show.
    pub text: String,
    /// A stop string was completed; `text` ends right before it.
    pub stopped: bool,
}

impl DeltaDecoder {
    /// A decoder that stops at any of `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        DeltaDecoder {
            partial: Vec::new(),
            held: String::new(),
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
        }
    }

    /// Feeds the bytes of the next token.
    pub fn push(&mut self, bytes: &[u8]) -> Delta {
        self.partial.extend_from_slice(bytes);
        let mut consumed = 0;
        loop {
            match std::str::from_utf8(&self.partial[consumed..]) {
                Ok(s) => {
                    self.held.push_str(s);
                    consumed = self.partial.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix up to `valid` was just checked, so this cannot fail.
                    if let Ok(s) = std::str::from_utf8(&self.partial[consumed..consumed + valid]) {
                        self.held.push_str(s);
                    }
                    consumed += valid;
                    match e.error_len() {
                        // Incomplete character at the end: wait for the next token.
                        None => break,
                        Some(n) => {
                            self.held.push(char::REPLACEMENT_CHARACTER);
                            consumed += n;
                        }
                    }
                }
            }
        }
        self.partial.drain(..consumed);
        self.release()
    }

    /// Ends the stream: returns whatever was held (incomplete bytes become U+FFFD).
    pub fn finish(&mut self) -> String {
        if !self.partial.is_empty() {
            self.held
                .push_str(&String::from_utf8_lossy(&std::mem::take(&mut self.partial)));
        }
        // A stop string may still be completed by the flushed bytes.
        if let Some(at) = self.first_stop() {
            self.held.truncate(at);
        }
        std::mem::take(&mut self.held)
    }

    fn first_stop(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
    }

    fn release(&mut self) -> Delta {
        if let Some(at) = self.first_stop() {
            let text = self.held[..at].to_string();
            self.held.clear();
            self.partial.clear();
            return Delta {
                text,
                stopped: true,
            };
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let mut keep_from = self.held.len();
        for stop in &self.stops {
            let max = stop.len().saturating_sub(1).min(self.held.len());
            for len in (1..=max).rev() {
                let start = self.held.len() - len;
                if start < keep_from
                    && self.held.is_char_boundary(start)
                    && stop.starts_with(&self.held[start..])
                {
                    keep_from = start;
                    break;
                }
            }
        }
        let rest = self.held.split_off(keep_from);
        let text = std::mem::replace(&mut self.held, rest);
        Delta {
            text,
            stopped: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], chunks: &[&[u8]]) -> (Vec<String>, bool, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut d = DeltaDecoder::new(&stops);
        let mut out = Vec::new();
        for c in chunks {
            let delta = d.push(c);
            out.push(delta.text);
            if delta.stopped {
                return (out, true, String::new());
            }
        }
        let tail = d.finish();
        (out, false, tail)
    }

    #[test]
    fn multibyte_chars_split_across_tokens() {
        let snow = "☃".as_bytes(); // 3 bytes
        let (out, _, tail) = run(&[], &[b"a", &snow[..1], &snow[1..2], &snow[2..], b"b"]);
        assert_eq!(out, vec!["a", "", "", "☃", "b"]);
        assert_eq!(tail, "");
        let crab = "🦀".as_bytes();
        let (out, _, tail) = run(&[], &[&crab[..3]]);
        assert_eq!(out, vec![""]);
        assert_eq!(tail, "\u{FFFD}");
    }

    #[test]
    fn invalid_bytes_become_replacement_chars() {
        let (out, _, _) = run(&[], &[b"a\xffb"]);
        assert_eq!(out, vec!["a\u{FFFD}b"]);
    }

    #[test]
    fn stop_string_across_tokens_is_hidden() {
        let (out, stopped, _) = run(&["\nUser:"], &[b"Hi", b" there\n", b"Us", b"er:", b" more"]);
        assert!(stopped);
        assert_eq!(out.concat(), "Hi there");
        assert_eq!(out[1], " there"); // "\n" held back as a possible stop prefix
    }

    #[test]
    fn held_text_released_when_not_a_stop() {
        let (out, stopped, tail) = run(&["STOP"], &[b"ST", b"OR", b"E", b"ST"]);
        assert!(!stopped);
        assert_eq!(out, vec!["", "STOR", "E", ""]);
        assert_eq!(tail, "ST");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (out, stopped, _) = run(&["bb", "a b"], &[b"xa bb"]);
        assert!(stopped);
        assert_eq!(out.concat(), "x");
    }

    proptest::proptest! {
        #[test]
        fn concatenated_deltas_equal_lossy_decode(s in "\\PC{0,40}", cuts in proptest::collection::vec(0usize..200, 0..8)) {
            let bytes = s.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort();
            let mut d = DeltaDecoder::new(&[]);
            let mut text = String::new();
            let mut prev = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                text.push_str(&d.push(&bytes[prev..c]).text);
                prev = c;
            }
            text.push_str(&d.finish());
            proptest::prop_assert_eq!(text, s);
        }
    }
}
