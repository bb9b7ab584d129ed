//! The HTTP layer: routes, request flow (validate → cache → schedule → respond) and SSE.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::body::{BodySize, MessageBody};
use actix_web::http::header::{self, ContentEncoding};
use actix_web::http::StatusCode;
use actix_web::middleware::Compress;
use actix_web::web::{self, Bytes};
use actix_web::{App, HttpRequest, HttpResponse, HttpServer};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::backend::{Finish, Sampling, ServedModel};
use crate::cache::{cache_key, CacheStats, CachedChoice, CachedResponse, ResponseCache};
use crate::config::{Limits, SamplingDefaults, ServerConfig};
use crate::error::{ApiError, InferenceError, Result};
use crate::openai::{
    self, AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    ChunkChoice, CompletionRequest, Delta, ModelCard, ModelList, PromptInput, TextChoice,
    TextCompletion, Usage, ValidRequest,
};
use crate::scheduler::{
    Event, EventReceiver, Job, JobFailure, Scheduler, SchedulerStats, SubmitError,
};

const UI_HTML: &str = include_str!("ui.html");

/// Which OpenAI endpoint a generation answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Endpoint {
    Chat,
    Completion,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    chat: AtomicU64,
    completions: AtomicU64,
    streamed: AtomicU64,
    ok: AtomicU64,
    bad_request: AtomicU64,
    not_found: AtomicU64,
    too_large: AtomicU64,
    overloaded: AtomicU64,
    timeouts: AtomicU64,
    server_errors: AtomicU64,
    other_errors: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

/// State shared by every HTTP worker.
pub struct AppState {
    cfg: ServerConfig,
    model: Arc<dyn ServedModel>,
    model_name: String,
    fingerprint: String,
    scheduler: Scheduler,
    cache: ResponseCache,
    counters: Counters,
    started: Instant,
    created: u64,
    next_id: AtomicU64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AppState {
    /// Start the decode workers and build the shared state.
    pub fn new(cfg: ServerConfig, model: Arc<dyn ServedModel>) -> Result<Self> {
        cfg.validate()?;
        let scheduler = Scheduler::start(
            model.clone(),
            cfg.workers,
            cfg.max_batch,
            cfg.queue_capacity,
        )?;
        let model_name = cfg
            .model_name
            .clone()
            .unwrap_or_else(|| model.default_name().to_string());
        let fingerprint = format!(
            "fp_{}",
            &crate::cache::hex_digest(model.artifact_id().as_bytes())[..10]
        );
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Ok(Self {
            cache: ResponseCache::new(cfg.cache.clone()),
            cfg,
            model,
            model_name,
            fingerprint,
            scheduler,
            counters: Counters::default(),
            started: Instant::now(),
            created: unix_now(),
            next_id: AtomicU64::new(seed),
        })
    }

    /// The name clients must use in `model`.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// Where the served model runs (its backend's description).
    pub fn device(&self) -> &str {
        self.model.device()
    }

    fn new_id(&self, prefix: &str) -> String {
        let n = self
            .next_id
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        format!(
            "{prefix}-{}",
            &crate::cache::hex_digest(&n.to_le_bytes())[..24]
        )
    }

    /// Snapshot for `/stats`.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            model: self.model_name.clone(),
            artifact_id: self.model.artifact_id().to_string(),
            device: self.model.device().to_string(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            requests: RequestStats {
                total: get(&c.requests),
                chat: get(&c.chat),
                completions: get(&c.completions),
                streamed: get(&c.streamed),
                ok: get(&c.ok),
                bad_request: get(&c.bad_request),
                not_found: get(&c.not_found),
                too_large: get(&c.too_large),
                overloaded: get(&c.overloaded),
                timeouts: get(&c.timeouts),
                server_errors: get(&c.server_errors),
                other_errors: get(&c.other_errors),
            },
            tokens: TokenStats {
                prompt: get(&c.prompt_tokens),
                completion: get(&c.completion_tokens),
            },
            cache: self.cache.stats(),
            scheduler: self.scheduler.stats(),
        }
    }

    fn record(&self, status: StatusCode) {
        let c = &self.counters;
        let counter = match status.as_u16() {
            200..=299 => &c.ok,
            400 => &c.bad_request,
            404 => &c.not_found,
            413 => &c.too_large,
            429 => &c.overloaded,
            504 => &c.timeouts,
            500..=599 => &c.server_errors,
            _ => &c.other_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// `/stats` body.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Served model name.
    pub model: String,
    /// Weights identity.
    pub artifact_id: String,
    /// Where the model runs (its backend's description).
    pub device: String,
    /// Seconds since start.
    pub uptime_secs: f64,
    /// Request counts by outcome.
    pub requests: RequestStats,
    /// Token counts.
    pub tokens: TokenStats,
    /// Response cache.
    pub cache: CacheStats,
    /// Queue and workers.
    pub scheduler: SchedulerStats,
}

/// Request counters.
#[derive(Debug, Clone, Serialize)]
pub struct RequestStats {
    /// Generation requests received (chat + completions).
    pub total: u64,
    /// Chat requests.
    pub chat: u64,
    /// Text-completion requests.
    pub completions: u64,
    /// Streaming requests.
    pub streamed: u64,
    /// Answered 2xx.
    pub ok: u64,
    /// Answered 400.
    pub bad_request: u64,
    /// Answered 404.
    pub not_found: u64,
    /// Answered 413.
    pub too_large: u64,
    /// Answered 429.
    pub overloaded: u64,
    /// Answered 504 (or ended by the deadline mid-stream).
    pub timeouts: u64,
    /// Answered 5xx.
    pub server_errors: u64,
    /// Any other status.
    pub other_errors: u64,
}

/// Token counters.
#[derive(Debug, Clone, Serialize)]
pub struct TokenStats {
    /// Prompt tokens of admitted requests.
    pub prompt: u64,
    /// Tokens generated (cache hits excluded).
    pub completion: u64,
}

fn respond(state: &AppState, result: std::result::Result<HttpResponse, ApiError>) -> HttpResponse {
    let resp = result.unwrap_or_else(|e| {
        tracing::debug!(status = e.status.as_u16(), message = %e.body.error.message, "request rejected");
        HttpResponse::build(e.status).json(&e.body)
    });
    state.record(resp.status());
    resp
}

fn parse_body<T: serde::de::DeserializeOwned>(
    body: std::result::Result<Bytes, actix_web::Error>,
    limit: usize,
) -> std::result::Result<T, ApiError> {
    let body = body.map_err(|e| {
        if e.as_response_error().status_code() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(limit)
        } else {
            ApiError::bad_json(format!("could not read the request body: {e}"))
        }
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_json(format!(
            "The request body is not valid JSON for this endpoint: {e}"
        ))
    })
}

/// A validator of one endpoint's request body.
type Validate<T> =
    fn(&T, &Limits, &SamplingDefaults) -> std::result::Result<ValidRequest, ApiError>;

async fn chat_completions(
    body: std::result::Result<Bytes, actix_web::Error>,
    state: web::Data<AppState>,
) -> HttpResponse {
    serve_generation::<ChatCompletionRequest>(body, state, Endpoint::Chat, openai::validate_chat)
        .await
}

async fn completions(
    body: std::result::Result<Bytes, actix_web::Error>,
    state: web::Data<AppState>,
) -> HttpResponse {
    serve_generation::<CompletionRequest>(
        body,
        state,
        Endpoint::Completion,
        openai::validate_completion,
    )
    .await
}

/// Count, parse, validate, generate, and answer (errors in OpenAI's shape).
async fn serve_generation<T: serde::de::DeserializeOwned>(
    body: std::result::Result<Bytes, actix_web::Error>,
    state: web::Data<AppState>,
    endpoint: Endpoint,
    validate: Validate<T>,
) -> HttpResponse {
    let c = &state.counters;
    c.requests.fetch_add(1, Ordering::Relaxed);
    match endpoint {
        Endpoint::Chat => &c.chat,
        Endpoint::Completion => &c.completions,
    }
    .fetch_add(1, Ordering::Relaxed);
    let result = async {
        let parsed: T = parse_body(body, state.cfg.max_body_bytes)?;
        let valid = validate(&parsed, &state.cfg.limits, &state.cfg.defaults)?;
        generate(state.clone().into_inner(), valid, endpoint).await
    }
    .await;
    respond(&state, result)
}

/// The cache key's view of a request: endpoint plus the normalized generation.
#[derive(Serialize)]
struct KeyView<'a> {
    endpoint: Endpoint,
    spec: &'a openai::GenerationSpec,
}

async fn generate(
    state: Arc<AppState>,
    valid: ValidRequest,
    endpoint: Endpoint,
) -> std::result::Result<HttpResponse, ApiError> {
    if let Some(m) = valid.model.as_deref().filter(|m| !m.is_empty()) {
        if m != state.model_name {
            return Err(ApiError::model_not_found(m, &state.model_name));
        }
    }
    let spec = valid.spec;
    let prompt = match &spec.input {
        PromptInput::Chat(turns) => state.model.render_chat(turns),
        PromptInput::Text(text) => state.model.render_completion(text),
    }
    .map_err(|e| match e {
        InferenceError::Prompt(m) => ApiError::invalid(
            if endpoint == Endpoint::Chat {
                "messages"
            } else {
                "prompt"
            },
            m,
        ),
        other => ApiError::internal(other.to_string()),
    })?;
    let ctx = state.model.context_len();
    if prompt.len() >= ctx {
        return Err(ApiError::context_length(format!(
            "The prompt is {} tokens but the model's context window is {ctx}; shorten the conversation",
            prompt.len()
        )));
    }
    let max_tokens = spec.max_tokens.min(ctx - prompt.len());
    let render = Renderer {
        endpoint,
        model: state.model_name.clone(),
        fingerprint: state.fingerprint.clone(),
    };

    let key = (state.cache.enabled() && spec.is_deterministic()).then(|| {
        cache_key(
            state.model.artifact_id(),
            &KeyView {
                endpoint,
                spec: &spec,
            },
        )
    });
    if let Some(key) = &key {
        if let Some(hit) = state.cache.get(key) {
            if valid.stream {
                state.counters.streamed.fetch_add(1, Ordering::Relaxed);
            }
            let resp = if valid.stream {
                let mut out = Vec::new();
                render.replay(&hit, valid.include_usage, &mut out);
                sse_response(Bytes::from(out.concat()))
            } else {
                render.body(&hit)
            };
            return Ok(with_cache_header(resp, "hit"));
        }
    }

    let deadline = Instant::now() + Duration::from_secs_f64(state.cfg.request_timeout_secs);
    let job = Job {
        first_choice: 0,
        n: spec.n,
        prompt: prompt.clone(),
        sampling: Sampling {
            temperature: spec.temperature,
            top_k: spec.top_k,
            top_p: spec.top_p,
            min_p: spec.min_p,
            seed: spec.seed,
            max_tokens,
        },
        stop: spec.stop.clone(),
        deadline,
    };
    let rx = state.scheduler.submit(job).map_err(|e| match e {
        SubmitError::QueueFull { capacity } => ApiError::overloaded(capacity),
        SubmitError::ShuttingDown => ApiError::internal("the server is shutting down"),
    })?;
    state
        .counters
        .prompt_tokens
        .fetch_add(prompt.len() as u64, Ordering::Relaxed);
    let pending = Pending {
        id: state.new_id(if endpoint == Endpoint::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        created: unix_now(),
        n: spec.n,
        prompt_tokens: prompt.len(),
        key,
        deadline,
    };
    let cache_tag = if pending.key.is_some() {
        "miss"
    } else {
        "bypass"
    };
    if valid.stream {
        state.counters.streamed.fetch_add(1, Ordering::Relaxed);
        let (tx, body_rx) = mpsc::channel::<Bytes>(256);
        actix_web::rt::spawn(relay_stream(
            state.clone(),
            render,
            pending,
            rx,
            tx,
            valid.include_usage,
        ));
        Ok(with_cache_header(
            sse_response(ChannelBody(body_rx)),
            cache_tag,
        ))
    } else {
        let generation = collect(&state, &pending, rx).await?;
        let resp = render.body(&generation);
        if let Some(key) = pending.key {
            state.cache.put(key, generation);
        }
        Ok(with_cache_header(resp, cache_tag))
    }
}

fn with_cache_header(mut resp: HttpResponse, tag: &'static str) -> HttpResponse {
    resp.headers_mut().insert(
        header::HeaderName::from_static("x-cache"),
        header::HeaderValue::from_static(tag),
    );
    resp
}

fn sse_response(body: impl MessageBody + 'static) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        // Compression would buffer events; keep the stream live.
        .insert_header(ContentEncoding::Identity)
        .insert_header(("x-accel-buffering", "no"))
        .body(body)
}

struct Pending {
    id: String,
    created: u64,
    n: usize,
    prompt_tokens: usize,
    key: Option<[u8; 32]>,
    deadline: Instant,
}

impl Pending {
    fn empty_generation(&self) -> CachedResponse {
        CachedResponse {
            id: self.id.clone(),
            created: self.created,
            choices: (0..self.n)
                .map(|_| CachedChoice {
                    deltas: Vec::new(),
                    finish: Finish::Cancelled,
                })
                .collect(),
            prompt_tokens: self.prompt_tokens,
            completion_tokens: 0,
        }
    }
}

fn failure_to_error(state: &AppState, f: JobFailure) -> ApiError {
    match f {
        JobFailure::Timeout => ApiError::timeout(state.cfg.request_timeout_secs),
        JobFailure::Rejected(m) => {
            ApiError::invalid("messages", format!("the model rejected the prompt: {m}"))
        }
        JobFailure::Backend(m) => ApiError::internal(format!("generation failed: {m}")),
    }
}

/// Apply one event to the generation; returns true once every choice is done.
fn apply(
    state: &AppState,
    generation: &mut CachedResponse,
    done: &mut usize,
    choice: usize,
    event: &Event,
) -> std::result::Result<bool, ApiError> {
    match event {
        Event::Delta(text) => generation.choices[choice].deltas.push(text.clone()),
        Event::Done {
            finish,
            completion_tokens,
        } => {
            generation.choices[choice].finish = *finish;
            generation.completion_tokens += completion_tokens;
            state
                .counters
                .completion_tokens
                .fetch_add(*completion_tokens as u64, Ordering::Relaxed);
            *done += 1;
        }
        Event::Failed(f) => return Err(failure_to_error(state, f.clone())),
    }
    Ok(*done == generation.choices.len())
}

async fn collect(
    state: &AppState,
    pending: &Pending,
    mut rx: EventReceiver,
) -> std::result::Result<CachedResponse, ApiError> {
    let mut generation = pending.empty_generation();
    let mut done = 0;
    let deadline = tokio::time::Instant::from_std(pending.deadline);
    loop {
        let next = tokio::time::timeout_at(deadline, rx.recv()).await;
        let (choice, event) = match next {
            Err(_) => return Err(ApiError::timeout(state.cfg.request_timeout_secs)),
            Ok(None) => {
                return Err(ApiError::internal(
                    "the decode worker stopped before finishing",
                ))
            }
            Ok(Some(x)) => x,
        };
        if apply(state, &mut generation, &mut done, choice, &event)? {
            return Ok(generation);
        }
    }
}

async fn relay_stream(
    state: Arc<AppState>,
    render: Renderer,
    pending: Pending,
    mut rx: EventReceiver,
    tx: mpsc::Sender<Bytes>,
    include_usage: bool,
) {
    let mut generation = pending.empty_generation();
    let mut done = 0;
    let deadline = tokio::time::Instant::from_std(pending.deadline);
    let mut out = Vec::new();
    for i in 0..pending.n {
        render.opening(&generation, i, &mut out);
    }
    for chunk in out.drain(..) {
        if tx.send(chunk).await.is_err() {
            return;
        }
    }
    loop {
        let (choice, event) = tokio::select! {
            // Client gone: returning drops `rx`, and the worker frees the slot before its next step.
            _ = tx.closed() => return,
            _ = tokio::time::sleep_until(deadline) => {
                state.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(sse_event(&ApiError::timeout(state.cfg.request_timeout_secs).to_json())).await;
                return;
            }
            next = rx.recv() => match next {
                Some(x) => x,
                None => {
                    let _ = tx.send(sse_event(&ApiError::internal("the decode worker stopped before finishing").to_json())).await;
                    return;
                }
            },
        };
        match apply(&state, &mut generation, &mut done, choice, &event) {
            Err(e) => {
                if e.status == StatusCode::GATEWAY_TIMEOUT {
                    state.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                }
                let _ = tx.send(sse_event(&e.to_json())).await;
                return;
            }
            Ok(all_done) => {
                match &event {
                    Event::Delta(text) => render.delta(&generation, choice, text, &mut out),
                    Event::Done { finish, .. } => {
                        render.closing(&generation, choice, *finish, &mut out)
                    }
                    Event::Failed(_) => {}
                }
                if all_done {
                    render.trailer(&generation, include_usage, &mut out);
                    // Fill the cache before the last bytes leave: a client that reads `[DONE]`
                    // and at once repeats the request must get the hit.
                    if let Some(key) = pending.key {
                        state.cache.put(key, generation.clone());
                    }
                }
                for chunk in out.drain(..) {
                    if tx.send(chunk).await.is_err() {
                        return;
                    }
                }
                if all_done {
                    return;
                }
            }
        }
    }
}

fn sse_event(json: &str) -> Bytes {
    Bytes::from(format!("data: {json}\n\n"))
}

fn sse_json(v: &impl Serialize) -> Bytes {
    sse_event(&serde_json::to_string(v).unwrap_or_default())
}

/// Renders a generation (live or cached) as a body or as stream chunks.
struct Renderer {
    endpoint: Endpoint,
    model: String,
    fingerprint: String,
}

impl Renderer {
    fn body(&self, g: &CachedResponse) -> HttpResponse {
        let usage = Usage::new(g.prompt_tokens, g.completion_tokens);
        match self.endpoint {
            Endpoint::Chat => HttpResponse::Ok().json(ChatCompletion {
                id: g.id.clone(),
                object: "chat.completion".into(),
                created: g.created,
                model: self.model.clone(),
                choices: g
                    .choices
                    .iter()
                    .enumerate()
                    .map(|(index, c)| ChatChoice {
                        index,
                        message: AssistantMessage {
                            role: "assistant".into(),
                            content: c.deltas.concat(),
                        },
                        logprobs: None,
                        finish_reason: c.finish.as_openai().into(),
                    })
                    .collect(),
                usage,
                system_fingerprint: self.fingerprint.clone(),
            }),
            Endpoint::Completion => HttpResponse::Ok().json(TextCompletion {
                id: g.id.clone(),
                object: "text_completion".into(),
                created: g.created,
                model: self.model.clone(),
                choices: g
                    .choices
                    .iter()
                    .enumerate()
                    .map(|(index, c)| TextChoice {
                        index,
                        text: c.deltas.concat(),
                        logprobs: None,
                        finish_reason: Some(c.finish.as_openai().into()),
                    })
                    .collect(),
                usage: Some(usage),
                system_fingerprint: self.fingerprint.clone(),
            }),
        }
    }

    fn chat_chunk(
        &self,
        g: &CachedResponse,
        choices: Vec<ChunkChoice>,
        usage: Option<Usage>,
    ) -> Bytes {
        sse_json(&ChatCompletionChunk {
            id: g.id.clone(),
            object: "chat.completion.chunk".into(),
            created: g.created,
            model: self.model.clone(),
            choices,
            usage,
            system_fingerprint: self.fingerprint.clone(),
        })
    }

    fn text_chunk(
        &self,
        g: &CachedResponse,
        choices: Vec<TextChoice>,
        usage: Option<Usage>,
    ) -> Bytes {
        sse_json(&TextCompletion {
            id: g.id.clone(),
            object: "text_completion".into(),
            created: g.created,
            model: self.model.clone(),
            choices,
            usage,
            system_fingerprint: self.fingerprint.clone(),
        })
    }

    /// One stream event carrying a piece of one choice: `delta` for chat, its text for a
    /// completion.
    fn choice_chunk(
        &self,
        g: &CachedResponse,
        index: usize,
        delta: Delta,
        finish_reason: Option<String>,
    ) -> Bytes {
        match self.endpoint {
            Endpoint::Chat => self.chat_chunk(
                g,
                vec![ChunkChoice {
                    index,
                    delta,
                    logprobs: None,
                    finish_reason,
                }],
                None,
            ),
            Endpoint::Completion => self.text_chunk(
                g,
                vec![TextChoice {
                    index,
                    text: delta.content.unwrap_or_default(),
                    logprobs: None,
                    finish_reason,
                }],
                None,
            ),
        }
    }

    /// Chat streams open each choice with a role delta.
    fn opening(&self, g: &CachedResponse, index: usize, out: &mut Vec<Bytes>) {
        if self.endpoint == Endpoint::Chat {
            let delta = Delta {
                role: Some("assistant".into()),
                content: Some(String::new()),
            };
            out.push(self.choice_chunk(g, index, delta, None));
        }
    }

    fn delta(&self, g: &CachedResponse, index: usize, text: &str, out: &mut Vec<Bytes>) {
        let delta = Delta {
            role: None,
            content: Some(text.to_string()),
        };
        out.push(self.choice_chunk(g, index, delta, None));
    }

    fn closing(&self, g: &CachedResponse, index: usize, finish: Finish, out: &mut Vec<Bytes>) {
        let reason = Some(finish.as_openai().to_string());
        out.push(self.choice_chunk(g, index, Delta::default(), reason));
    }

    fn trailer(&self, g: &CachedResponse, include_usage: bool, out: &mut Vec<Bytes>) {
        if include_usage {
            let usage = Some(Usage::new(g.prompt_tokens, g.completion_tokens));
            out.push(match self.endpoint {
                Endpoint::Chat => self.chat_chunk(g, Vec::new(), usage),
                Endpoint::Completion => self.text_chunk(g, Vec::new(), usage),
            });
        }
        out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    }

    /// A cached generation as the same stream a live one produces (choices one after another).
    fn replay(&self, g: &CachedResponse, include_usage: bool, out: &mut Vec<Bytes>) {
        for (i, c) in g.choices.iter().enumerate() {
            self.opening(g, i, out);
            for d in &c.deltas {
                self.delta(g, i, d, out);
            }
            self.closing(g, i, c.finish, out);
        }
        self.trailer(g, include_usage, out);
    }
}

/// A streaming body fed by the relay task; dropping it (client gone) closes the channel.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl MessageBody for ChannelBody {
    type Error = std::convert::Infallible;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Bytes, Self::Error>>> {
        self.get_mut().0.poll_recv(cx).map(|o| o.map(Ok))
    }
}

impl AppState {
    fn model_card(&self) -> ModelCard {
        ModelCard {
            id: self.model_name.clone(),
            object: "model".into(),
            created: self.created,
            owned_by: "nanochat-rs".into(),
        }
    }
}

async fn list_models(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(ModelList {
        object: "list".into(),
        data: vec![state.model_card()],
    })
}

async fn get_model(path: web::Path<String>, state: web::Data<AppState>) -> HttpResponse {
    let name = path.into_inner();
    if name != state.model_name {
        return respond(
            &state,
            Err(ApiError::model_not_found(&name, &state.model_name)),
        );
    }
    HttpResponse::Ok().json(state.model_card())
}

async fn health(state: web::Data<AppState>) -> HttpResponse {
    let s = state.scheduler.stats();
    let ready = s.workers.iter().all(|w| w.ready);
    HttpResponse::Ok().json(serde_json::json!({
        "status": if ready { "ok" } else { "starting" },
        "ready": ready,
        "model": state.model_name,
        "device": state.model.device(),
        "workers": s.workers.len(),
        "active": state.scheduler.active(),
        "queue_depth": s.queue_depth,
    }))
}

async fn stats(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(state.stats())
}

async fn ui() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(UI_HTML)
}

/// Constant-time comparison so the admin token cannot be guessed byte by byte from timings.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn clear_cache(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let result = match &state.cfg.admin_token {
        None => Err(ApiError::route_not_found(req.method().as_str(), req.path())),
        Some(token) => {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if token_matches(given.as_bytes(), token.as_bytes()) {
                let cleared = state.cache.clear();
                tracing::info!(cleared, "response cache cleared");
                Ok(HttpResponse::Ok().json(serde_json::json!({ "cleared": cleared })))
            } else {
                Err(ApiError::unauthorized())
            }
        }
    };
    respond(&state, result)
}

async fn not_found(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    respond(
        &state,
        Err(ApiError::route_not_found(req.method().as_str(), req.path())),
    )
}

async fn wrong_method(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    respond(
        &state,
        Err(ApiError::method_not_allowed(
            req.method().as_str(),
            req.path(),
        )),
    )
}

/// Register every route on an actix `ServiceConfig` (used by [`Server`] and usable in tests).
pub fn configure(cfg: &mut web::ServiceConfig, state: web::Data<AppState>) {
    let limit = state.cfg.max_body_bytes;
    // Each resource answers other methods with a 405 in OpenAI's error shape.
    let resource = |path: &str, route: actix_web::Route| {
        web::resource(path)
            .route(route)
            .default_service(web::to(wrong_method))
    };
    cfg.app_data(state)
        .app_data(web::PayloadConfig::new(limit))
        .service(resource(
            "/v1/chat/completions",
            web::post().to(chat_completions),
        ))
        .service(resource("/v1/completions", web::post().to(completions)))
        .service(resource("/v1/models", web::get().to(list_models)))
        .service(resource("/v1/models/{name}", web::get().to(get_model)))
        .service(resource("/health", web::get().to(health)))
        .service(resource("/stats", web::get().to(stats)))
        .service(web::resource("/admin/cache/clear").route(web::post().to(clear_cache)))
        .service(resource("/", web::get().to(ui)));
}

/// A running server.
pub struct Server {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    /// Shared state (stats, cache).
    pub state: web::Data<AppState>,
    server: actix_web::dev::Server,
}

impl Server {
    /// Start decode workers and bind the HTTP listener (no request is served until [`Server::run`]
    /// or until the returned server future is spawned). Must be called inside an actix/tokio runtime.
    pub fn bind(cfg: ServerConfig, model: Arc<dyn ServedModel>) -> Result<Self> {
        let host = cfg.host.clone();
        let port = cfg.port;
        let state = web::Data::new(AppState::new(cfg, model)?);
        let app_state = state.clone();
        let http_workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 4);
        let server = HttpServer::new(move || {
            let st = app_state.clone();
            App::new()
                .wrap(Compress::default())
                .configure(|c| configure(c, st))
                .default_service(web::to(not_found))
        })
        .workers(http_workers)
        // A client that closes its side ends the connection now: actix then drops the handler
        // future (non-streaming) or the body (streaming), which drops the scheduler's event
        // receiver, and the worker frees the slot before its next decode step. With half-closed
        // connections allowed (actix's default) a non-streaming handler would run to the end.
        .h1_allow_half_closed(false)
        .bind((host.as_str(), port))
        .map_err(|e| InferenceError::Config(format!("cannot bind {host}:{port}: {e}")))?;
        let addr = server.addrs().first().copied().ok_or_else(|| {
            InferenceError::Config(format!("binding {host}:{port} produced no address"))
        })?;
        Ok(Self {
            addr,
            state,
            server: server.run(),
        })
    }

    /// A handle that can stop the server.
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    /// Serve until stopped.
    pub async fn run(self) -> Result<()> {
        self.server.await.map_err(|e| InferenceError::Io {
            path: self.addr.to_string(),
            source: e,
        })
    }

    /// Serve in the background (on the current runtime); returns a handle to stop it.
    pub fn spawn(
        self,
    ) -> (
        SocketAddr,
        web::Data<AppState>,
        actix_web::dev::ServerHandle,
    ) {
        let handle = self.server.handle();
        let (addr, state) = (self.addr, self.state.clone());
        actix_web::rt::spawn(self.server);
        (addr, state, handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(token_matches(b"abc", b"abc"));
        assert!(!token_matches(b"abd", b"abc"));
        assert!(!token_matches(b"ab", b"abc"));
    }
}
