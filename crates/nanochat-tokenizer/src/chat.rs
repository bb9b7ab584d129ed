//! Chat conversations (SmolTalk / nanochat JSON) and their rendering into token ids with a
//! training mask, following nanochat's `render_conversation` / `render_for_completion`.

use serde::{Deserialize, Serialize};

use crate::{Error, Tokenizer};

/// The truncation length nanochat uses when none is given (also used by
/// [`Tokenizer::render_for_completion`]).
pub const DEFAULT_MAX_TOKENS: usize = 2048;

/// A conversation: `{"messages": [...]}`. Other top-level keys in the JSON are ignored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Conversation {
    /// The turns, in order.
    pub messages: Vec<Message>,
}

/// One turn of a conversation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What is said: a string, or (for the assistant) a list of typed parts.
    pub content: Content,
}

/// Speaker of a message.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions; only allowed as the first message, merged into the first user message.
    System,
    /// The human.
    User,
    /// The model.
    Assistant,
}

/// Message content: plain text, or parts (text, python tool calls and their outputs).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum Content {
    /// `"content": "..."`
    Text(String),
    /// `"content": [{"type": "text", "text": "..."}, ...]`
    Parts(Vec<Part>),
}

/// A typed piece of assistant content.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// `"type"` in the JSON.
    #[serde(rename = "type")]
    pub kind: PartKind,
    /// The text of the part.
    pub text: String,
}

/// Kind of a content part.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum PartKind {
    /// Ordinary assistant text (trained on).
    Text,
    /// A python tool call written by the assistant (trained on).
    Python,
    /// The tool's output, produced at run time (not trained on).
    PythonOutput,
}

impl Message {
    /// A message with plain-text content.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Message {
            role,
            content: Content::Text(text.into()),
        }
    }
}

impl Part {
    /// A part of the given kind.
    pub fn new(kind: PartKind, text: impl Into<String>) -> Self {
        Part {
            kind,
            text: text.into(),
        }
    }
}

impl Conversation {
    /// Parses one JSON object (e.g. a line of a `.jsonl` file).
    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }
}

impl Content {
    fn is_empty(&self) -> bool {
        match self {
            Content::Text(t) => t.is_empty(),
            Content::Parts(p) => p.is_empty(),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        })
    }
}

/// Ids of the chat special tokens, looked up once per render.
struct ChatIds {
    bos: u32,
    user_start: u32,
    user_end: u32,
    assistant_start: u32,
    assistant_end: u32,
    python_start: u32,
    python_end: u32,
    output_start: u32,
    output_end: u32,
}

impl ChatIds {
    fn of(tok: &Tokenizer) -> Result<Self, Error> {
        let id = |s: &str| {
            tok.special_id(s)
                .ok_or_else(|| Error::UnknownSpecial(s.to_string()))
        };
        Ok(ChatIds {
            bos: tok.bos_id(),
            user_start: id("<|user_start|>")?,
            user_end: id("<|user_end|>")?,
            assistant_start: id("<|assistant_start|>")?,
            assistant_end: id("<|assistant_end|>")?,
            python_start: id("<|python_start|>")?,
            python_end: id("<|python_end|>")?,
            output_start: id("<|output_start|>")?,
            output_end: id("<|output_end|>")?,
        })
    }
}

fn malformed(msg: String) -> Error {
    Error::Conversation(msg)
}

impl Tokenizer {
    /// Renders a conversation for supervised training: `(ids, mask)` of equal length, where
    /// mask 1 marks the tokens the assistant is trained to produce (its text, its python calls
    /// with their delimiters, and `<|assistant_end|>`); bos, user turns, `<|assistant_start|>`
    /// and tool outputs are 0. A leading system message is merged into the first user message
    /// (`system + "\n\n" + user`). The result is cut to `max_tokens`.
    ///
    /// Errors: no messages, a system message not followed by a user message, roles not
    /// alternating user/assistant, a user (or system) message that is not plain text, empty
    /// message content, or a tokenizer without nanochat's chat specials.
    pub fn render_conversation(
        &self,
        conversation: &Conversation,
        max_tokens: usize,
    ) -> Result<(Vec<u32>, Vec<u8>), Error> {
        let ids = ChatIds::of(self)?;
        let all = &conversation.messages;
        if all.is_empty() {
            return Err(malformed("the conversation has no messages".into()));
        }

        // A system prompt is folded into the first user turn.
        let merged_first: Option<String>;
        let messages: &[Message] = if all[0].role == Role::System {
            let Content::Text(system) = &all[0].content else {
                return Err(malformed("message 0 (system) must be plain text".into()));
            };
            match all.get(1) {
                Some(Message {
                    role: Role::User,
                    content: Content::Text(user),
                }) => {
                    merged_first = Some(format!("{system}\n\n{user}"));
                    &all[1..]
                }
                Some(Message {
                    role: Role::User, ..
                }) => return Err(malformed("message 1 (user) must be plain text".into())),
                _ => {
                    return Err(malformed(
                        "a system message must be followed by a user message".into(),
                    ))
                }
            }
        } else {
            merged_first = None;
            all
        };
        let offset = all.len() - messages.len();

        let mut out = Vec::new();
        let mut mask = Vec::new();
        let push = |out: &mut Vec<u32>, mask: &mut Vec<u8>, tokens: &[u32], m: u8| {
            out.extend_from_slice(tokens);
            mask.extend(std::iter::repeat_n(m, tokens.len()));
        };
        push(&mut out, &mut mask, &[ids.bos], 0);
        let mut scratch = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            let index = i + offset;
            let expected = if i % 2 == 0 {
                Role::User
            } else {
                Role::Assistant
            };
            if message.role != expected {
                return Err(malformed(format!(
                    "message {index} is from {} but should be from {expected} \
                     (turns must alternate user/assistant, starting with user)",
                    message.role
                )));
            }
            if message.content.is_empty() {
                return Err(malformed(format!("message {index} ({expected}) is empty")));
            }
            match message.role {
                Role::User => {
                    let text = match (&message.content, i, &merged_first) {
                        (_, 0, Some(merged)) => merged.as_str(),
                        (Content::Text(t), _, _) => t.as_str(),
                        (Content::Parts(_), _, _) => {
                            return Err(malformed(format!(
                                "message {index} (user) must be plain text, not parts"
                            )))
                        }
                    };
                    scratch.clear();
                    self.encode_into(text, &mut scratch);
                    push(&mut out, &mut mask, &[ids.user_start], 0);
                    push(&mut out, &mut mask, &scratch, 0);
                    push(&mut out, &mut mask, &[ids.user_end], 0);
                }
                Role::Assistant => {
                    push(&mut out, &mut mask, &[ids.assistant_start], 0);
                    match &message.content {
                        Content::Text(t) => {
                            scratch.clear();
                            self.encode_into(t, &mut scratch);
                            push(&mut out, &mut mask, &scratch, 1);
                        }
                        Content::Parts(parts) => {
                            for part in parts {
                                scratch.clear();
                                self.encode_into(&part.text, &mut scratch);
                                match part.kind {
                                    PartKind::Text => push(&mut out, &mut mask, &scratch, 1),
                                    PartKind::Python => {
                                        push(&mut out, &mut mask, &[ids.python_start], 1);
                                        push(&mut out, &mut mask, &scratch, 1);
                                        push(&mut out, &mut mask, &[ids.python_end], 1);
                                    }
                                    PartKind::PythonOutput => {
                                        push(&mut out, &mut mask, &[ids.output_start], 0);
                                        push(&mut out, &mut mask, &scratch, 0);
                                        push(&mut out, &mut mask, &[ids.output_end], 0);
                                    }
                                }
                            }
                        }
                    }
                    push(&mut out, &mut mask, &[ids.assistant_end], 1);
                }
                Role::System => unreachable!("roles were checked above"),
            }
        }
        out.truncate(max_tokens);
        mask.truncate(max_tokens);
        Ok((out, mask))
    }

    /// Renders a conversation that ends with an assistant message as a prompt for the model to
    /// answer: the last message is dropped, the rest rendered as in
    /// [`Tokenizer::render_conversation`] (cut to [`DEFAULT_MAX_TOKENS`], as nanochat does) and
    /// `<|assistant_start|>` appended.
    pub fn render_for_completion(&self, conversation: &Conversation) -> Result<Vec<u32>, Error> {
        let Some((last, rest)) = conversation.messages.split_last() else {
            return Err(malformed("the conversation has no messages".into()));
        };
        if last.role != Role::Assistant {
            return Err(malformed(format!(
                "the last message must be from the assistant, not the {}",
                last.role
            )));
        }
        let prompt = Conversation {
            messages: rest.to_vec(),
        };
        let (mut ids, _) = self.render_conversation(&prompt, DEFAULT_MAX_TOKENS)?;
        let assistant_start = self
            .special_id("<|assistant_start|>")
            .ok_or_else(|| Error::UnknownSpecial("<|assistant_start|>".into()))?;
        ids.push(assistant_start);
        Ok(ids)
    }
}
