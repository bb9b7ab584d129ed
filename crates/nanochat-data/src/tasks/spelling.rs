//! Synthetic spelling tasks (nanochat's `SpellingBee` and `SimpleSpelling`): item `i` is drawn
//! from its own seeded generator, so any item can be produced on demand in any order.
//!
//! The generator is SplitMix64 rather than CPython's Mersenne Twister, so the words drawn differ
//! from the reference's; the templates, the answer format and the python tool call are the same.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use nanochat_tokenizer::chat::{Content, Conversation, Message, Part, PartKind, Role};

use super::{out_of_range, EvalType, Example, SplitMix64, Task};
use crate::DataError;

const LETTERS: &str = "abcdefghijklmnopqrstuvwxyz";

/// Seeds of test items start here, far above any train size, so the splits never overlap.
const TEST_SEED_OFFSET: u64 = 10_000_000;

/// Which split of a synthetic task (different seeds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpellingSplit {
    /// Seeds `0..size`.
    Train,
    /// Seeds from 10,000,000.
    Test,
}

/// Question templates (English and a few other languages), as in nanochat.
const TEMPLATES: &[&str] = &[
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "Count the number of {letter} in {word}",
    "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}",
    "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}",
    "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}",
    "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}",
    "Can you count the {letter} letters in {word}",
    "What is the frequency of {letter} in {word}",
    "How many {letter}s are in {word}",
    "How many {letter}'s are in {word}",
    "Count all the {letter} in {word}",
    "How many times is {letter} in {word}",
    "Number of {letter} in {word}",
    "Total count of {letter} in {word}",
    "How many {letter} does {word} have",
    "How many {letter} does {word} contain",
    "What's the number of {letter} in {word}",
    "{word} has how many {letter}",
    "In {word}, count the {letter}",
    "How many {letter} appear in {word}",
    "Count the {letter} in {word}",
    "Give me the count of {letter} in {word}",
    "How many instances of {letter} in {word}",
    "Show me how many {letter} are in {word}",
    "Calculate the number of {letter} in {word}",
    "¿Cuántas {letter} hay en {word}?",
    "¿Cuántas veces aparece {letter} en {word}?",
    "Cuenta las {letter} en {word}",
    "¿Cuántas letras {letter} tiene {word}?",
    "{word}中有多少个{letter}",
    "{word}里有几个{letter}",
    "数一下{word}中的{letter}",
    "{word}这个词里有多少{letter}",
    "{word}에 {letter}가 몇 개 있나요",
    "{word}에서 {letter}의 개수는",
    "{word}에 {letter}가 몇 번 나오나요",
    "{word}라는 단어에 {letter}가 몇 개",
    "Combien de {letter} dans {word}",
    "Combien de fois {letter} apparaît dans {word}",
    "Compte les {letter} dans {word}",
    "Wie viele {letter} sind in {word}",
    "Wie oft kommt {letter} in {word} vor",
    "Zähle die {letter} in {word}",
    "{word}に{letter}は何個ありますか",
    "{word}の中に{letter}がいくつ",
    "{word}に{letter}が何回出てくる",
];

fn load_words(path: &Path) -> Result<Vec<String>, DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(file)))
    } else {
        Box::new(file)
    };
    let mut words = Vec::new();
    for line in BufReader::new(reader).lines() {
        let line = line.map_err(|e| DataError::io(path, e))?;
        let w = line.trim();
        if !w.is_empty() {
            words.push(w.to_string());
        }
    }
    if words.is_empty() {
        return Err(DataError::Invalid {
            path: path.to_path_buf(),
            detail: "the word list is empty".into(),
        });
    }
    Ok(words)
}

fn seed_of(split: SpellingSplit, index: usize) -> u64 {
    match split {
        SpellingSplit::Train => index as u64,
        SpellingSplit::Test => TEST_SEED_OFFSET + index as u64,
    }
}

fn pick<'a, T>(rng: &mut SplitMix64, items: &'a [T]) -> &'a T {
    &items[rng.below(items.len() as u64) as usize]
}

/// "How many `r` are in `strawberry`?" answered by spelling it out, then checking with python.
pub struct SpellingBee {
    words: Vec<String>,
    size: usize,
    split: SpellingSplit,
}

impl SpellingBee {
    /// `size` items over the word list at `words` (one word per line, `.gz` ok).
    pub fn load(words: &Path, size: usize, split: SpellingSplit) -> Result<Self, DataError> {
        Ok(SpellingBee {
            words: load_words(words)?,
            size,
            split,
        })
    }
}

impl Task for SpellingBee {
    fn name(&self) -> &str {
        "SpellingBee"
    }
    fn len(&self) -> usize {
        self.size
    }
    fn get(&self, index: usize) -> Result<Example, DataError> {
        if index >= self.size {
            return Err(out_of_range(self.name(), index, self.size));
        }
        let mut rng = SplitMix64::new(seed_of(self.split, index) ^ 0x5bee);
        let word = pick(&mut rng, &self.words).clone();
        let chars: Vec<char> = word.chars().collect();
        let letter = if rng.unit() < 0.9 {
            *pick(&mut rng, &chars)
        } else {
            let l: Vec<char> = LETTERS.chars().collect();
            *pick(&mut rng, &l)
        };
        let count = chars.iter().filter(|&&c| c == letter).count();
        let mut template = pick(&mut rng, TEMPLATES).to_string();
        if rng.unit() < 0.3 {
            template = template.to_lowercase();
        }
        let quotes = ["", "'", "\""];
        let lq = *pick(&mut rng, &quotes);
        let wq = *pick(&mut rng, &quotes);
        let mut user = template
            .replace("{letter}", &format!("{lq}{letter}{lq}"))
            .replace("{word}", &format!("{wq}{word}{wq}"));
        if rng.unit() < 0.5 {
            user.push('?');
        }
        let spelled: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        let mut manual = format!(
            "We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach first.\n\nFirst spell the word out:\n{word}:{}\n\nThen count the occurrences of '{letter}':\n",
            spelled.join(",")
        );
        let mut running = 0;
        for (i, &c) in chars.iter().enumerate() {
            if c == letter {
                running += 1;
                manual.push_str(&format!("{}:{c} hit! count={running}\n", i + 1));
            } else {
                manual.push_str(&format!("{}:{c}\n", i + 1));
            }
        }
        manual.push_str(&format!("\nThis gives us {running}."));
        let parts = vec![
            Part::new(PartKind::Text, manual),
            Part::new(
                PartKind::Text,
                "\n\nLet me double check this using Python:\n\n",
            ),
            Part::new(PartKind::Python, format!("'{word}'.count('{letter}')")),
            Part::new(PartKind::PythonOutput, count.to_string()),
            Part::new(
                PartKind::Text,
                format!("\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"),
            ),
        ];
        Ok(Example {
            conversation: Conversation {
                messages: vec![
                    Message::text(Role::User, user),
                    Message {
                        role: Role::Assistant,
                        content: Content::Parts(parts),
                    },
                ],
            },
            letters: None,
            answer: Some(count.to_string()),
        })
    }
    fn eval_type(&self) -> EvalType {
        EvalType::Generative
    }
}

/// "Spell the word: apple" → "apple:a,p,p,l,e".
pub struct SimpleSpelling {
    words: Vec<String>,
    size: usize,
    split: SpellingSplit,
}

impl SimpleSpelling {
    /// `size` items over the word list at `words` (shuffled with a fixed seed so the word order
    /// differs from [`SpellingBee`]'s).
    pub fn load(words: &Path, size: usize, split: SpellingSplit) -> Result<Self, DataError> {
        let mut words = load_words(words)?;
        let mut rng = SplitMix64::new(42);
        for i in (1..words.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            words.swap(i, j);
        }
        Ok(SimpleSpelling { words, size, split })
    }
}

impl Task for SimpleSpelling {
    fn name(&self) -> &str {
        "SimpleSpelling"
    }
    fn len(&self) -> usize {
        self.size
    }
    fn get(&self, index: usize) -> Result<Example, DataError> {
        if index >= self.size {
            return Err(out_of_range(self.name(), index, self.size));
        }
        let mut rng = SplitMix64::new(seed_of(self.split, index));
        let word = pick(&mut rng, &self.words).clone();
        let spelled: Vec<String> = word.chars().map(|c| c.to_string()).collect();
        Ok(Example {
            conversation: Conversation {
                messages: vec![
                    Message::text(Role::User, format!("Spell the word: {word}")),
                    Message::text(Role::Assistant, format!("{word}:{}", spelled.join(","))),
                ],
            },
            letters: None,
            answer: Some(spelled.join(",")),
        })
    }
    fn eval_type(&self) -> EvalType {
        EvalType::Generative
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words_file(dir: &Path) -> std::path::PathBuf {
        let p = dir.join("words.txt");
        std::fs::write(&p, "apple\nbanana\nstrawberry\n").unwrap();
        p
    }

    #[test]
    fn spelling_bee_answer_counts_the_letter() {
        let d = tempfile::tempdir().unwrap();
        let t = SpellingBee::load(&words_file(d.path()), 50, SpellingSplit::Train).unwrap();
        for i in 0..50 {
            let ex = t.get(i).unwrap();
            let Content::Parts(parts) = &ex.conversation.messages[1].content else {
                panic!("parts expected")
            };
            // python call `'word'.count('x')` and its output agree with a recount.
            let call = &parts[2].text;
            let word = call.split('\'').nth(1).unwrap();
            let letter = call.split('\'').nth(3).unwrap().chars().next().unwrap();
            let n = word.chars().filter(|&c| c == letter).count();
            assert_eq!(parts[3].text, n.to_string());
            assert_eq!(ex.answer, Some(n.to_string()));
            assert!(parts[4].text.ends_with(&format!("#### {n}")));
        }
        // deterministic per index, different across splits
        assert_eq!(t.get(3).unwrap(), t.get(3).unwrap());
        let test = SpellingBee::load(&words_file(d.path()), 50, SpellingSplit::Test).unwrap();
        assert!((0..50).any(|i| test.get(i).unwrap() != t.get(i).unwrap()));
    }

    #[test]
    fn simple_spelling_spells() {
        let d = tempfile::tempdir().unwrap();
        let t = SimpleSpelling::load(&words_file(d.path()), 5, SpellingSplit::Train).unwrap();
        let ex = t.get(0).unwrap();
        let Content::Text(a) = &ex.conversation.messages[1].content else {
            panic!()
        };
        let (w, s) = a.split_once(':').unwrap();
        assert_eq!(s.replace(',', ""), w);
        assert!(t.get(5).is_err());
    }
}
