//! Synthetic spelling tasks (nanochat's `SpellingBee` and `SimpleSpelling`): item `i` is drawn
//! from its own seeded generator, so any item can be produced on demand in any order.
//!
//! The generator is CPython's `random.Random` ([`PyRandom`]), seeded and consumed in the
//! reference's order, so with the same word list (dwyl's `words_alpha.txt`) item `i` is the
//! reference's item `i`, character for character. With another list (the shared stand-in),
//! only the words differ.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use nanochat_tokenizer::chat::{Content, Conversation, Message, Part, PartKind, Role};

use super::pyrandom::PyRandom;
use super::{out_of_range, EvalType, Example, Task};
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

/// `rng.choice(items)` on a list that is known not to be empty (word lists are checked on
/// load; words, templates and quotes are never empty).
fn pick<'a, T>(rng: &mut PyRandom, items: &'a [T]) -> &'a T {
    &items[rng.randbelow(items.len())]
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
        // The draws happen in the reference's order: word, letter (random() first), template,
        // lowercase?, the two quotes, question mark?
        let mut rng = PyRandom::new(seed_of(self.split, index));
        let word = pick(&mut rng, &self.words).clone();
        let chars: Vec<char> = word.chars().collect();
        let letter = if rng.random() < 0.9 {
            *pick(&mut rng, &chars)
        } else {
            let l: Vec<char> = LETTERS.chars().collect();
            *pick(&mut rng, &l)
        };
        let count = chars.iter().filter(|&&c| c == letter).count();
        let mut template = pick(&mut rng, TEMPLATES).to_string();
        if rng.random() < 0.3 {
            template = template.to_lowercase();
        }
        let quotes = ["", "'", "\""];
        let lq = *pick(&mut rng, &quotes);
        let wq = *pick(&mut rng, &quotes);
        let mut user = template
            .replace("{letter}", &format!("{lq}{letter}{lq}"))
            .replace("{word}", &format!("{wq}{word}{wq}"));
        if rng.random() < 0.5 {
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
    /// `size` items over the word list at `words` (shuffled with `Random(42)`, as the
    /// reference, so the word order differs from [`SpellingBee`]'s).
    pub fn load(words: &Path, size: usize, split: SpellingSplit) -> Result<Self, DataError> {
        let mut words = load_words(words)?;
        PyRandom::new(42).shuffle(&mut words);
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
        let mut rng = PyRandom::new(seed_of(self.split, index));
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

    /// Items rendered by nanochat's own `tasks/spellingbee.py` on a 10-word list
    /// (`testdata/make_spelling_goldens.py`): every message of every item must be identical.
    #[test]
    fn items_match_the_reference_goldens() {
        let golden: serde_json::Value =
            serde_json::from_str(include_str!("../../testdata/spelling_goldens.json")).unwrap();
        let d = tempfile::tempdir().unwrap();
        let words: Vec<&str> = golden["words"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_str().unwrap())
            .collect();
        let path = d.path().join("words.txt");
        std::fs::write(&path, words.join("\n") + "\n").unwrap();
        for (key, split) in [
            ("train", SpellingSplit::Train),
            ("test", SpellingSplit::Test),
        ] {
            let bee = SpellingBee::load(&path, 12, split).unwrap();
            let simple = SimpleSpelling::load(&path, 5, split).unwrap();
            for (task, name) in [
                (&bee as &dyn Task, format!("bee_{key}")),
                (&simple as &dyn Task, format!("simple_{key}")),
            ] {
                let want = golden[&name].as_array().unwrap();
                assert_eq!(want.len(), task.len());
                for (i, w) in want.iter().enumerate() {
                    let want: Vec<Message> = serde_json::from_value(w.clone()).unwrap();
                    let got = task.get(i).unwrap().conversation.messages;
                    assert_eq!(got, want, "{name} item {i}");
                }
            }
        }
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
