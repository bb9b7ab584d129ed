//! Errors: the library's own error enum, and the OpenAI-shaped HTTP error every endpoint returns.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

/// Everything that can go wrong inside the server library (outside a single HTTP exchange).
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// The configuration file or a flag is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Loading the model, tokenizer or decoder failed.
    #[error("model: {0}")]
    Model(String),
    /// The decode backend failed while generating.
    #[error("decode backend: {0}")]
    Backend(String),
    /// The prompt could not be rendered into tokens.
    #[error("prompt: {0}")]
    Prompt(String),
}

/// Result alias for the library.
pub type Result<T, E = InferenceError> = std::result::Result<T, E>;

/// The OpenAI error envelope: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    /// The error object.
    pub error: ErrorDetail,
}

/// The inner OpenAI error object.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorDetail {
    /// Human-readable explanation: what was wrong and how to fix it.
    pub message: String,
    /// Error class, e.g. `invalid_request_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// A machine-readable code, e.g. `model_not_found`.
    pub code: Option<String>,
}

/// An HTTP error answered in the OpenAI shape with the matching status.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Body.
    pub body: ErrorBody,
}

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &str,
        message: String,
        param: Option<&str>,
        code: Option<&str>,
    ) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: ErrorDetail {
                    message,
                    kind: kind.to_string(),
                    param: param.map(str::to_string),
                    code: code.map(str::to_string),
                },
            },
        }
    }

    /// 400: a request field has a bad value.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            message.into(),
            Some(param),
            Some("invalid_value"),
        )
    }

    /// 400: the body is not valid JSON for this endpoint.
    pub fn bad_json(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            message.into(),
            None,
            Some("invalid_json"),
        )
    }

    /// 400: the request asks for a feature this server does not implement.
    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            message.into(),
            Some(param),
            Some("unsupported_parameter"),
        )
    }

    /// 400: the prompt does not fit the model's context window.
    pub fn context_length(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            message.into(),
            Some("messages"),
            Some("context_length_exceeded"),
        )
    }

    /// 401: admin endpoint called without the right token.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing or wrong admin token: send `Authorization: Bearer <admin token>`".into(),
            None,
            Some("invalid_api_key"),
        )
    }

    /// 404: the requested model is not served here.
    pub fn model_not_found(requested: &str, served: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{requested}` does not exist on this server; it serves `{served}` (see GET /v1/models)"),
            Some("model"),
            Some("model_not_found"),
        )
    }

    /// 404: unknown route.
    pub fn route_not_found(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Unknown request URL: {method} {path}. Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /stats, GET /"),
            None,
            Some("unknown_url"),
        )
    }

    /// 405: known route, wrong method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("{method} is not allowed on {path}"),
            None,
            Some("method_not_allowed"),
        )
    }

    /// 413: the body is over the configured cap.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("Request body is larger than the server's limit of {limit} bytes"),
            None,
            Some("request_too_large"),
        )
    }

    /// 429: the queue is full.
    pub fn overloaded(capacity: usize) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("The server is overloaded: {capacity} requests are already waiting. Retry after a short delay."),
            None,
            Some("queue_full"),
        )
    }

    /// 504: the request ran past the per-request time limit.
    pub fn timeout(secs: f64) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            format!("The request did not finish within the server's limit of {secs} s"),
            None,
            Some("timeout"),
        )
    }

    /// 500: something broke inside the server.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            message.into(),
            None,
            Some("internal_error"),
        )
    }

    /// The JSON body as a string (used inside SSE error events).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.body).unwrap_or_else(|_| "{}".to_string())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.body.error.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status).json(&self.body)
    }
}
