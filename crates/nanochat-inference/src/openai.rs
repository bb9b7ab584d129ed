//! OpenAI wire format: request bodies, their validation into a normalized generation request,
//! and the response / stream-chunk bodies.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backend::{ChatTurn, Role};
use crate::config::{Limits, SamplingDefaults};
use crate::error::ApiError;

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a final chunk carrying `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by chat and text completions. Unknown fields are ignored, like OpenAI does
/// for forward compatibility; known-but-unsupported ones are rejected with a clear 400.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonFields {
    /// Model name; must be the served one when given.
    pub model: Option<String>,
    /// Softmax temperature, 0..=limits.max_temperature.
    pub temperature: Option<f64>,
    /// Nucleus sampling mass, (0, 1].
    pub top_p: Option<f64>,
    /// Extension: top-k filter, 0 (off) ..= limits.max_top_k.
    pub top_k: Option<i64>,
    /// Extension: min-p filter, [0, 1).
    pub min_p: Option<f64>,
    /// Most tokens to generate.
    pub max_tokens: Option<i64>,
    /// Newer name for max_tokens (wins when both are given).
    pub max_completion_tokens: Option<i64>,
    /// Number of choices.
    pub n: Option<i64>,
    /// A stop string or a list of them.
    pub stop: Option<Value>,
    /// Sampling seed; makes the request deterministic (and cacheable).
    pub seed: Option<i64>,
    /// Stream server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Only 0 is supported.
    pub presence_penalty: Option<f64>,
    /// Only 0 is supported.
    pub frequency_penalty: Option<f64>,
    /// Unsupported when non-null (and not false/empty).
    pub logprobs: Option<Value>,
    /// Unsupported.
    pub top_logprobs: Option<Value>,
    /// Unsupported when non-empty.
    pub logit_bias: Option<Value>,
    /// Unsupported.
    pub tools: Option<Value>,
    /// Unsupported.
    pub tool_choice: Option<Value>,
    /// Unsupported.
    pub functions: Option<Value>,
    /// Unsupported.
    pub function_call: Option<Value>,
    /// Only `{"type":"text"}` is supported.
    pub response_format: Option<Value>,
    /// Completions only: unsupported when true.
    pub echo: Option<bool>,
    /// Completions only: unsupported.
    pub suffix: Option<Value>,
    /// Completions only: only 1 is supported.
    pub best_of: Option<i64>,
    /// End-user id; accepted and ignored.
    pub user: Option<String>,
}

/// `POST /v1/chat/completions` body.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    /// The conversation; validated by hand for precise errors.
    pub messages: Option<Value>,
    /// Everything else.
    #[serde(flatten)]
    pub common: CommonFields,
}

/// `POST /v1/completions` body.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// A string, or a list holding exactly one string.
    pub prompt: Option<Value>,
    /// Everything else.
    #[serde(flatten)]
    pub common: CommonFields,
}

/// What to generate, after validation and defaulting. Serialized (in this field order) into
/// the cache key, so two requests meaning the same thing share an entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerationSpec {
    /// Chat turns or a raw prompt.
    pub input: PromptInput,
    /// Temperature.
    pub temperature: f32,
    /// top-k (0: off).
    pub top_k: usize,
    /// top-p (1: off).
    pub top_p: f32,
    /// min-p (0: off).
    pub min_p: f32,
    /// Seed.
    pub seed: Option<u64>,
    /// Most tokens per choice.
    pub max_tokens: usize,
    /// Choices.
    pub n: usize,
    /// Stop strings.
    pub stop: Vec<String>,
}

impl GenerationSpec {
    /// Same request, same answer: greedy, or sampled from an explicit seed.
    pub fn is_deterministic(&self) -> bool {
        self.temperature == 0.0 || self.seed.is_some()
    }
}

/// The input of a generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum PromptInput {
    /// Chat messages.
    Chat(Vec<ChatTurn>),
    /// Raw text.
    Text(String),
}

/// A validated request: what to generate and how to deliver it.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    /// Model named by the client, if any.
    pub model: Option<String>,
    /// The generation.
    pub spec: GenerationSpec,
    /// Stream SSE.
    pub stream: bool,
    /// Add a usage chunk at the end of a stream.
    pub include_usage: bool,
}

fn reject_if_set(v: &Option<Value>, param: &str, what: &str) -> Result<(), ApiError> {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(()),
        Some(Value::Array(a)) if a.is_empty() => Ok(()),
        Some(Value::Object(o)) if o.is_empty() => Ok(()),
        Some(_) => Err(ApiError::unsupported(
            param,
            format!("`{param}` is not supported by this server: {what}"),
        )),
    }
}

fn check_range(
    param: &str,
    v: Option<f64>,
    lo: f64,
    hi: f64,
    lo_open: bool,
) -> Result<Option<f64>, ApiError> {
    let Some(x) = v else { return Ok(None) };
    let ok = x.is_finite() && (if lo_open { x > lo } else { x >= lo }) && x <= hi;
    if !ok {
        let open = if lo_open { "(" } else { "[" };
        return Err(ApiError::invalid(
            param,
            format!("{param} must be in {open}{lo}, {hi}], got {x}"),
        ));
    }
    Ok(Some(x))
}

fn check_int(param: &str, v: Option<i64>, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => Err(ApiError::invalid(
            param,
            format!("{param} must be between {lo} and {hi}, got {x}"),
        )),
        other => Ok(other),
    }
}

fn parse_stop(v: &Option<Value>, limits: &Limits) -> Result<Vec<String>, ApiError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::invalid("stop", "stop must be a string or a list of strings")
            })?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "stop must be a string or a list of strings",
            ))
        }
    };
    if list.len() > limits.max_stop_sequences {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "at most {} stop sequences are allowed, got {}",
                limits.max_stop_sequences,
                list.len()
            ),
        ));
    }
    if list.iter().any(|s| s.is_empty() || s.chars().count() > 256) {
        return Err(ApiError::invalid(
            "stop",
            "each stop sequence must be 1 to 256 characters",
        ));
    }
    Ok(list)
}

/// Validate the sampling fields and fold in defaults.
fn sampling_fields(
    c: &CommonFields,
    input: PromptInput,
    limits: &Limits,
    defaults: &SamplingDefaults,
    completions: bool,
) -> Result<ValidRequest, ApiError> {
    reject_if_set(
        &c.logprobs,
        "logprobs",
        "token log-probabilities are not computed",
    )?;
    reject_if_set(
        &c.top_logprobs,
        "top_logprobs",
        "token log-probabilities are not computed",
    )?;
    reject_if_set(
        &c.logit_bias,
        "logit_bias",
        "logit biasing is not implemented",
    )?;
    reject_if_set(&c.tools, "tools", "the model has no tool calling")?;
    reject_if_set(
        &c.tool_choice,
        "tool_choice",
        "the model has no tool calling",
    )?;
    reject_if_set(
        &c.functions,
        "functions",
        "the model has no function calling",
    )?;
    reject_if_set(
        &c.function_call,
        "function_call",
        "the model has no function calling",
    )?;
    reject_if_set(&c.suffix, "suffix", "insertion (suffix) is not implemented")?;
    if let Some(rf) = &c.response_format {
        let kind = rf.get("type").and_then(Value::as_str);
        if !rf.is_null() && kind != Some("text") {
            return Err(ApiError::unsupported(
                "response_format",
                "only response_format {\"type\": \"text\"} is supported",
            ));
        }
    }
    if c.echo == Some(true) {
        return Err(ApiError::unsupported(
            "echo",
            "echo is not supported; prepend the prompt yourself",
        ));
    }
    if c.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::unsupported("best_of", "best_of must be 1"));
    }
    for (param, v) in [
        ("presence_penalty", c.presence_penalty),
        ("frequency_penalty", c.frequency_penalty),
    ] {
        if let Some(x) = v {
            if !(-2.0..=2.0).contains(&x) {
                return Err(ApiError::invalid(
                    param,
                    format!("{param} must be between -2 and 2, got {x}"),
                ));
            }
            if x != 0.0 {
                return Err(ApiError::unsupported(
                    param,
                    format!("{param} is not supported (only 0)"),
                ));
            }
        }
    }
    let temperature = check_range(
        "temperature",
        c.temperature,
        0.0,
        limits.max_temperature,
        false,
    )?
    .unwrap_or(defaults.temperature);
    let top_p = check_range("top_p", c.top_p, 0.0, 1.0, true)?.unwrap_or(1.0);
    let min_p = check_range("min_p", c.min_p, 0.0, 1.0, false)?.unwrap_or(0.0);
    if min_p >= 1.0 {
        return Err(ApiError::invalid("min_p", "min_p must be below 1"));
    }
    let top_k = check_int("top_k", c.top_k, 0, limits.max_top_k)?.unwrap_or(defaults.top_k);
    let (mt_param, mt) = match (c.max_completion_tokens, c.max_tokens) {
        (Some(x), _) => ("max_completion_tokens", Some(x)),
        (None, x) => ("max_tokens", x),
    };
    let max_tokens = check_int(mt_param, mt, 1, limits.max_tokens)?.unwrap_or(defaults.max_tokens);
    let n = check_int("n", c.n, 1, limits.max_n)?.unwrap_or(1);
    let stop = parse_stop(&c.stop, limits)?;
    let stream = c.stream.unwrap_or(false);
    if c.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "stream_options is only allowed when stream is true",
        ));
    }
    let _ = completions;
    Ok(ValidRequest {
        model: c.model.clone(),
        spec: GenerationSpec {
            input,
            temperature: temperature as f32,
            top_k: top_k as usize,
            top_p: top_p as f32,
            min_p: min_p as f32,
            // Negative seeds are valid in OpenAI's API; reinterpret the bits.
            seed: c.seed.map(|s| s as u64),
            max_tokens: max_tokens as usize,
            n: n as usize,
            stop,
        },
        stream,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

fn message_text(i: usize, content: Option<&Value>) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match content {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str);
                match (kind, part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (Some("text"), None) => {
                        return Err(ApiError::invalid(&param, format!("messages[{i}].content[{j}] is a text part without a string `text`")))
                    }
                    (Some(other), _) => {
                        return Err(ApiError::unsupported(&param, format!("messages[{i}].content[{j}] has type `{other}`; only text parts are supported")))
                    }
                    (None, _) => return Err(ApiError::invalid(&param, format!("messages[{i}].content[{j}] needs a `type`"))),
                }
            }
            Ok(text)
        }
        None | Some(Value::Null) => Err(ApiError::invalid(
            &param,
            format!("Message {i} has empty content"),
        )),
        Some(_) => Err(ApiError::invalid(
            &param,
            format!("messages[{i}].content must be a string or a list of content parts"),
        )),
    }
}

/// Validate a chat request against the limits (nanochat's abuse rules plus OpenAI's types).
pub fn validate_chat(
    req: &ChatCompletionRequest,
    limits: &Limits,
    defaults: &SamplingDefaults,
) -> Result<ValidRequest, ApiError> {
    let messages = match &req.messages {
        Some(Value::Array(m)) => m,
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("messages", "messages is required"))
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "messages",
                "messages must be a list of message objects",
            ))
        }
    };
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "At least one message is required",
        ));
    }
    if messages.len() > limits.max_messages {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "Too many messages: {} given, at most {} allowed per request",
                messages.len(),
                limits.max_messages
            ),
        ));
    }
    let mut turns = Vec::with_capacity(messages.len());
    let mut total = 0usize;
    for (i, m) in messages.iter().enumerate() {
        if !m.is_object() {
            return Err(ApiError::invalid(
                &format!("messages[{i}]"),
                format!("messages[{i}] must be an object with `role` and `content`"),
            ));
        }
        let role = match m.get("role").and_then(Value::as_str) {
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some("system") | Some("developer") => Role::System,
            Some(other) => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!(
                    "Message {i} has role `{other}`; allowed roles are system, user and assistant"
                ),
                ))
            }
            None => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!("Message {i} needs a string `role`"),
                ))
            }
        };
        let content = message_text(i, m.get("content"))?;
        if content.is_empty() {
            return Err(ApiError::invalid(
                &format!("messages[{i}].content"),
                format!("Message {i} has empty content"),
            ));
        }
        let chars = content.chars().count();
        if chars > limits.max_message_chars {
            return Err(ApiError::invalid(
                &format!("messages[{i}].content"),
                format!(
                    "Message {i} is too long: {chars} characters, at most {} allowed per message",
                    limits.max_message_chars
                ),
            ));
        }
        total += chars;
        turns.push(ChatTurn { role, content });
    }
    if total > limits.max_total_chars {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "The conversation is too long: {total} characters, at most {} allowed in total",
                limits.max_total_chars
            ),
        ));
    }
    for (i, pair) in turns.windows(2).enumerate() {
        if pair[0].role == Role::System && pair[1].role != Role::User {
            return Err(ApiError::invalid(
                &format!("messages[{i}]"),
                format!("Message {i} is a system message; it must be followed by a user message (it is merged into it)"),
            ));
        }
    }
    if turns.last().map(|t| t.role) != Some(Role::User) {
        return Err(ApiError::invalid(
            "messages",
            "The last message must come from the user",
        ));
    }
    sampling_fields(
        &req.common,
        PromptInput::Chat(turns),
        limits,
        defaults,
        false,
    )
}

/// Validate a text-completion request.
pub fn validate_completion(
    req: &CompletionRequest,
    limits: &Limits,
    defaults: &SamplingDefaults,
) -> Result<ValidRequest, ApiError> {
    let prompt = match &req.prompt {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        None | Some(Value::Null) => return Err(ApiError::invalid("prompt", "prompt is required")),
        Some(_) => {
            return Err(ApiError::invalid(
                "prompt",
                "prompt must be a string (or a list holding exactly one string)",
            ))
        }
    };
    let chars = prompt.chars().count();
    if chars > limits.max_total_chars {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "prompt is too long: {chars} characters, at most {} allowed",
                limits.max_total_chars
            ),
        ));
    }
    sampling_fields(
        &req.common,
        PromptInput::Text(prompt),
        limits,
        defaults,
        true,
    )
}

/// Token counts.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    /// Prompt tokens (per choice, as OpenAI counts them once).
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
    /// Sum.
    pub total_tokens: usize,
}

impl Usage {
    /// From the two counts.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// An assistant message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: String,
    /// The reply.
    pub content: String,
}

/// One choice of a chat completion.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatChoice {
    /// Choice index.
    pub index: usize,
    /// The reply.
    pub message: AssistantMessage,
    /// Always null.
    pub logprobs: Option<Value>,
    /// `stop` or `length`.
    pub finish_reason: String,
}

/// `chat.completion` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatCompletion {
    /// `chatcmpl-…`.
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Choices.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
    /// Identifies the serving configuration.
    pub system_fingerprint: String,
}

/// Delta of a streamed chat choice.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Delta {
    /// Present on the first chunk of a choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice inside a `chat.completion.chunk`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChunkChoice {
    /// Choice index.
    pub index: usize,
    /// New content.
    pub delta: Delta,
    /// Always null.
    pub logprobs: Option<Value>,
    /// Null until the choice's last chunk.
    pub finish_reason: Option<String>,
}

/// `chat.completion.chunk` event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatCompletionChunk {
    /// Same for every chunk of a response.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Zero or one choice.
    pub choices: Vec<ChunkChoice>,
    /// Only on the final usage chunk (when requested).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Identifies the serving configuration.
    pub system_fingerprint: String,
}

/// One choice of a text completion (also used in its stream chunks).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TextChoice {
    /// Choice index.
    pub index: usize,
    /// Text (whole or delta).
    pub text: String,
    /// Always null.
    pub logprobs: Option<Value>,
    /// Null until done.
    pub finish_reason: Option<String>,
}

/// `text_completion` body or stream chunk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TextCompletion {
    /// `cmpl-…`.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Choices.
    pub choices: Vec<TextChoice>,
    /// Token counts (absent on stream chunks except the usage one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Identifies the serving configuration.
    pub system_fingerprint: String,
}

/// One entry of `/v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelCard {
    /// Model name.
    pub id: String,
    /// `model`.
    pub object: String,
    /// Unix seconds when the server started.
    pub created: u64,
    /// `nanochat-rs`.
    pub owned_by: String,
}

/// `/v1/models` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    /// The served model.
    pub data: Vec<ModelCard>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(body: Value) -> Result<ValidRequest, ApiError> {
        let req: ChatCompletionRequest = serde_json::from_value(body).unwrap();
        validate_chat(&req, &Limits::default(), &SamplingDefaults::default())
    }

    #[test]
    fn defaults_fill_in_and_parts_are_joined() {
        let v = chat(json!({"messages":[{"role":"system","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}))
        .unwrap();
        assert_eq!(v.spec.temperature, 0.8);
        assert_eq!(v.spec.top_k, 50);
        assert_eq!(v.spec.max_tokens, 512);
        assert!(!v.spec.is_deterministic());
        match v.spec.input {
            PromptInput::Chat(t) => assert_eq!(t[1].content, "ab"),
            PromptInput::Text(_) => panic!("chat expected"),
        }
    }

    #[test]
    fn each_limit_names_its_param() {
        let user = json!([{"role":"user","content":"hi"}]);
        let cases = [
            (json!({"messages":[]}), "messages"),
            (json!({"messages":user,"temperature":2.5}), "temperature"),
            (json!({"messages":user,"top_k":201}), "top_k"),
            (json!({"messages":user,"max_tokens":0}), "max_tokens"),
            (
                json!({"messages":user,"max_completion_tokens":5000}),
                "max_completion_tokens",
            ),
            (json!({"messages":user,"top_p":0}), "top_p"),
            (json!({"messages":user,"n":9}), "n"),
            (json!({"messages":user,"stop":[1]}), "stop"),
            (
                json!({"messages":user,"presence_penalty":0.5}),
                "presence_penalty",
            ),
            (
                json!({"messages":user,"tools":[{"type":"function"}]}),
                "tools",
            ),
            (
                json!({"messages":[{"role":"tool","content":"x"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages":[{"role":"user","content":""}]}),
                "messages[0].content",
            ),
            (
                json!({"messages":[{"role":"user","content":"x".repeat(8001)}]}),
                "messages[0].content",
            ),
            (
                json!({"messages":[{"role":"user","content":[{"type":"image_url"}]}]}),
                "messages[0].content",
            ),
            (
                json!({"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}),
                "messages",
            ),
        ];
        for (body, param) in cases {
            let err = chat(body.clone()).unwrap_err();
            assert_eq!(err.status.as_u16(), 400, "{body}");
            assert_eq!(
                err.body.error.param.as_deref(),
                Some(param),
                "{body}: {}",
                err.body.error.message
            );
        }
    }

    #[test]
    fn seed_or_zero_temperature_is_deterministic() {
        let user = json!([{"role":"user","content":"hi"}]);
        assert!(chat(json!({"messages":user,"temperature":0}))
            .unwrap()
            .spec
            .is_deterministic());
        assert!(chat(json!({"messages":user,"seed":-3}))
            .unwrap()
            .spec
            .is_deterministic());
    }
}
