//! The one error type, and the one table that maps it to the public `code`,
//! the HTTP status and the gRPC status.
//!
//! Nothing else in the gateway writes error JSON: the HTTP façade renders
//! [`Error`] through [`Error::into_response`], the gRPC core through
//! [`Error::to_status`], and a status coming back from the core through the
//! generated service trait is turned into an [`Error`] again by
//! [`Error::from_status`], so both surfaces always agree.
//!
//! Upstream failures are classified here, once, as [`UpstreamError`]: whether
//! a failed attempt may be retried on another provider or is the client's own
//! fault. Messages built from upstream failures never include provider
//! secrets or upstream bodies of authentication failures.

use std::{fmt, time::Duration};

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};
use serde::Serialize;
use tonic::metadata::MetadataValue;

/// Metadata keys carrying the public error code and param on gRPC statuses.
pub const META_ERROR_CODE: &str = "switchyard-error-code";
pub const META_ERROR_PARAM: &str = "switchyard-error-param";
/// Attempts made before the response (or error) began.
pub const META_ATTEMPTS: &str = "x-switchyard-attempts";
const META_RETRY_AFTER: &str = "retry-after";
const ERROR_DOMAIN: &str = "switchyard.dev";

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("{message}")]
    InvalidInput {
        message: String,
        param: Option<String>,
    },
    #[error("method {method} is not allowed on this route")]
    MethodNotAllowed { method: String },
    #[error("request body is over the limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    InsufficientQuota(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{message}")]
    NotFound {
        message: String,
        param: Option<String>,
    },
    #[error("rate limit exceeded; retry after {retry_after_secs}s")]
    RateLimited { retry_after_secs: u64 },
    #[error("{0}")]
    Internal(String),
    #[error("{message}")]
    ProviderUnavailable { message: String, attempts: u32 },
    #[error("{message}")]
    Timeout { message: String, attempts: u32 },
}

/// The public code of an error response, in its extensions.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

/// One row of the table: what a client sees for an error.
struct Row {
    code: &'static str,
    http: StatusCode,
    grpc: tonic::Code,
    kind: &'static str,
}

impl Error {
    /// The table. Every mapping of an error to the outside world reads it.
    /// `kind` is the OpenAI-style `type` also put in the envelope, so the
    /// official SDKs classify our errors as they classify OpenAI's.
    fn row(&self) -> Row {
        use tonic::Code as G;
        use StatusCode as H;
        let (code, http, grpc, kind) = match self {
            Error::InvalidInput { .. } => ("invalid_input", H::BAD_REQUEST, G::InvalidArgument, "invalid_request_error"),
            Error::MethodNotAllowed { .. } => ("invalid_input", H::METHOD_NOT_ALLOWED, G::Unimplemented, "invalid_request_error"),
            Error::PayloadTooLarge { .. } => ("invalid_input", H::PAYLOAD_TOO_LARGE, G::InvalidArgument, "invalid_request_error"),
            Error::Unauthenticated(_) => ("unauthenticated", H::UNAUTHORIZED, G::Unauthenticated, "authentication_error"),
            Error::InsufficientQuota(_) => ("insufficient_quota", H::PAYMENT_REQUIRED, G::ResourceExhausted, "insufficient_quota"),
            Error::PermissionDenied(_) => ("permission_denied", H::FORBIDDEN, G::PermissionDenied, "permission_error"),
            Error::NotFound { .. } => ("not_found", H::NOT_FOUND, G::NotFound, "not_found_error"),
            Error::RateLimited { .. } => ("rate_limited", H::TOO_MANY_REQUESTS, G::ResourceExhausted, "rate_limit_error"),
            Error::Internal(_) => ("internal_error", H::INTERNAL_SERVER_ERROR, G::Internal, "server_error"),
            Error::ProviderUnavailable { .. } => ("provider_unavailable", H::BAD_GATEWAY, G::Unavailable, "server_error"),
            Error::Timeout { .. } => ("timeout", H::GATEWAY_TIMEOUT, G::DeadlineExceeded, "timeout_error"),
        };
        Row { code, http, grpc, kind }
    }

    pub fn invalid(message: impl Into<String>, param: impl Into<Option<String>>) -> Self {
        Error::InvalidInput {
            message: message.into(),
            param: param.into(),
        }
    }

    pub fn invalid_param(message: impl Into<String>, param: &str) -> Self {
        Self::invalid(message, Some(param.to_owned()))
    }

    pub fn not_found(message: impl Into<String>, param: Option<&str>) -> Self {
        Error::NotFound {
            message: message.into(),
            param: param.map(str::to_owned),
        }
    }

    /// The public `code` string clients branch on.
    pub fn code(&self) -> &'static str {
        self.row().code
    }

    pub fn http_status(&self) -> StatusCode {
        self.row().http
    }

    pub fn param(&self) -> Option<&str> {
        match self {
            Error::InvalidInput { param, .. } | Error::NotFound { param, .. } => param.as_deref(),
            _ => None,
        }
    }

    /// Provider attempts made before this error was decided (0 if routing
    /// never started).
    pub fn attempts(&self) -> u32 {
        match self {
            Error::ProviderUnavailable { attempts, .. } | Error::Timeout { attempts, .. } => *attempts,
            _ => 0,
        }
    }

    /// The envelope as a JSON value: `{"error": {"code", "message", "param",
    /// "type"}}`.
    pub fn envelope(&self) -> serde_json::Value {
        #[derive(Serialize)]
        struct Body<'a> {
            code: &'a str,
            message: String,
            param: Option<&'a str>,
            #[serde(rename = "type")]
            kind: &'a str,
        }
        let row = self.row();
        serde_json::json!({ "error": Body { code: row.code, message: self.to_string(), param: self.param(), kind: row.kind } })
    }

    /// The envelope as bytes; used for HTTP bodies and in-band SSE errors.
    pub fn envelope_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.envelope()).unwrap_or_else(|_| b"{\"error\":{\"code\":\"internal_error\",\"message\":\"error\",\"param\":null}}".to_vec())
    }

    /// The gRPC status: code from the table, the public code and param as
    /// metadata and as a `google.rpc.ErrorInfo` detail.
    pub fn to_status(&self) -> tonic::Status {
        use tonic_types::{ErrorDetails, StatusExt};
        let row = self.row();
        let mut metadata = std::collections::HashMap::new();
        if let Some(p) = self.param() {
            metadata.insert("param".to_owned(), p.to_owned());
        }
        let details = ErrorDetails::with_error_info(row.code, ERROR_DOMAIN, metadata);
        let mut status = tonic::Status::with_error_details(row.grpc, self.to_string(), details);
        let md = status.metadata_mut();
        md.insert(META_ERROR_CODE, MetadataValue::from_static(row.code));
        if let Some(v) = self.param().and_then(|p| MetadataValue::try_from(p).ok()) {
            md.insert(META_ERROR_PARAM, v);
        }
        match self {
            Error::RateLimited { retry_after_secs } => {
                md.insert(META_RETRY_AFTER, MetadataValue::from(*retry_after_secs));
            }
            Error::ProviderUnavailable { attempts, .. } | Error::Timeout { attempts, .. } => {
                md.insert(META_ATTEMPTS, MetadataValue::from(*attempts));
            }
            _ => {}
        }
        status
    }

    /// The inverse of [`Error::to_status`], used by the HTTP façade on what
    /// the core answered. A status without our metadata (a fault in tonic
    /// itself) is mapped by its gRPC code.
    pub fn from_status(status: &tonic::Status) -> Self {
        let md = status.metadata();
        let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let message = status.message().to_owned();
        let param = get(META_ERROR_PARAM);
        let attempts = get(META_ATTEMPTS).and_then(|v| v.parse().ok()).unwrap_or(0);
        match get(META_ERROR_CODE).as_deref() {
            Some("invalid_input") => Error::InvalidInput { message, param },
            Some("unauthenticated") => Error::Unauthenticated(message),
            Some("insufficient_quota") => Error::InsufficientQuota(message),
            Some("permission_denied") => Error::PermissionDenied(message),
            Some("not_found") => Error::NotFound { message, param },
            Some("rate_limited") => Error::RateLimited {
                retry_after_secs: get(META_RETRY_AFTER).and_then(|v| v.parse().ok()).unwrap_or(1),
            },
            Some("provider_unavailable") => Error::ProviderUnavailable { message, attempts },
            Some("timeout") => Error::Timeout { message, attempts },
            Some("internal_error") => Error::Internal(message),
            _ => match status.code() {
                tonic::Code::InvalidArgument => Error::InvalidInput { message, param },
                tonic::Code::Unauthenticated => Error::Unauthenticated(message),
                tonic::Code::PermissionDenied => Error::PermissionDenied(message),
                tonic::Code::NotFound => Error::NotFound { message, param },
                tonic::Code::DeadlineExceeded => Error::Timeout { message, attempts },
                tonic::Code::Unavailable => Error::ProviderUnavailable { message, attempts },
                _ => Error::Internal(message),
            },
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::from_status(&status)
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        e.to_status()
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let mut resp = (
            self.http_status(),
            [(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            self.envelope_bytes(),
        )
            .into_response();
        // For the request metrics (the trace layer reads it back).
        resp.extensions_mut().insert(ErrorCode(self.code()));
        let headers = resp.headers_mut();
        match &self {
            Error::RateLimited { retry_after_secs } => {
                headers.insert(http::header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            Error::ProviderUnavailable { attempts, .. } | Error::Timeout { attempts, .. } => {
                headers.insert("x-switchyard-attempts", HeaderValue::from(*attempts));
            }
            _ => {}
        }
        resp
    }
}

/// Why one provider attempt failed. Decides whether the next provider may be
/// tried, and what the client is told when none is left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// Could not connect, or the connection was refused or reset.
    Connect,
    /// No first content within the provider's `timeout`.
    Timeout,
    /// No event within the provider's `idle_timeout` once streaming.
    Stall,
    /// The connection broke mid-response.
    Reset,
    /// A body or event that does not parse.
    Malformed,
    /// Upstream 429, or 503 with `Retry-After`.
    RateLimited { retry_after: Option<Duration> },
    /// Upstream 5xx (other than the above), or an error event mid-stream.
    Server { status: u16 },
    /// The provider cannot do what the request asks (audio input to a model
    /// without it, `n` > 1 where unsupported). Another provider may.
    Unsupported,
    /// Upstream 401/403: our credentials for that provider are wrong. Not the
    /// client's fault; another provider may serve.
    Auth { status: u16 },
    /// Upstream 400/404/413/422: the request itself is bad. Returned to the
    /// client, never retried (every provider would refuse it too).
    ClientFault { status: u16 },
}

#[derive(Debug, Clone)]
pub struct UpstreamError {
    pub provider: String,
    pub kind: UpstreamErrorKind,
    /// A short, secret-free description (never an upstream body for auth
    /// failures; other bodies are truncated and scrubbed).
    pub detail: String,
}

impl UpstreamError {
    pub fn new(provider: &str, kind: UpstreamErrorKind, detail: impl Into<String>) -> Self {
        UpstreamError {
            provider: provider.to_owned(),
            kind,
            detail: detail.into(),
        }
    }

    /// Classifies an upstream HTTP error status. `body_message` is the
    /// provider's own error message, already scrubbed of secrets.
    pub fn from_status(provider: &str, status: u16, retry_after: Option<Duration>, body_message: &str) -> Self {
        use UpstreamErrorKind as K;
        let kind = match status {
            429 => K::RateLimited { retry_after },
            503 if retry_after.is_some() => K::RateLimited { retry_after },
            401 | 403 => K::Auth { status },
            400 | 404 | 413 | 422 => K::ClientFault { status },
            _ => K::Server { status },
        };
        let detail = match kind {
            // What the provider says about our credentials stays with us.
            K::Auth { .. } => format!("upstream {status}"),
            _ if body_message.is_empty() => format!("upstream {status}"),
            _ => format!("upstream {status}: {}", truncate(body_message, 300)),
        };
        UpstreamError::new(provider, kind, detail)
    }

    /// May the next provider be tried after this failure?
    pub fn is_retryable(&self) -> bool {
        !matches!(self.kind, UpstreamErrorKind::ClientFault { .. })
    }

    pub fn class(&self) -> &'static str {
        use UpstreamErrorKind as K;
        match self.kind {
            K::Connect => "connect",
            K::Timeout => "timeout",
            K::Stall => "stall",
            K::Reset => "reset",
            K::Malformed => "malformed",
            K::RateLimited { .. } => "rate_limited",
            K::Server { .. } => "server_error",
            K::Auth { .. } => "auth",
            K::Unsupported => "unsupported",
            K::ClientFault { .. } => "client_fault",
        }
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.provider, self.class(), self.detail)
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Every failed attempt of one request, turned into the client's error when
/// no provider is left.
#[derive(Debug, Default)]
pub struct Attempts {
    pub failures: Vec<UpstreamError>,
}

impl Attempts {
    pub fn push(&mut self, e: UpstreamError) {
        self.failures.push(e);
    }

    /// `attempt 1: <provider> (<class>): <detail>; attempt 2: ...`
    pub fn summary(&self) -> String {
        self.failures
            .iter()
            .enumerate()
            .map(|(i, e)| format!("attempt {}: {e}", i + 1))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The error for a request on which every attempt failed (`timeout` if
    /// the request's own deadline ran out). `attempts` counts every attempt
    /// made, including one the deadline cut short.
    pub fn exhausted(&self, attempts: u32, deadline_passed: bool, model: &str) -> Error {
        let list = self.summary();
        if deadline_passed {
            let message = if list.is_empty() {
                format!("the request's deadline passed before a provider for {model} answered")
            } else {
                format!("the request's deadline passed before a provider for {model} answered ({list})")
            };
            return Error::Timeout { message, attempts };
        }
        let message = if list.is_empty() {
            format!("no provider is available for {model}")
        } else {
            format!("every provider for {model} failed: {list}")
        };
        Error::ProviderUnavailable { message, attempts }
    }
}

/// A client-fault upstream error becomes the client's own `invalid_input`.
impl From<UpstreamError> for Error {
    fn from(e: UpstreamError) -> Self {
        match e.kind {
            UpstreamErrorKind::ClientFault { .. } => Error::invalid(format!("the provider rejected the request: {}", e.detail), None),
            _ => Error::ProviderUnavailable {
                message: format!("attempt 1: {e}"),
                attempts: 1,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trip_keeps_code_param_and_attempts() {
        let cases = vec![
            Error::invalid_param("bad", "messages"),
            Error::Unauthenticated("no key".into()),
            Error::InsufficientQuota("spent".into()),
            Error::PermissionDenied("no".into()),
            Error::not_found("no such model", Some("model")),
            Error::RateLimited { retry_after_secs: 7 },
            Error::Internal("oops".into()),
            Error::ProviderUnavailable { message: "all failed".into(), attempts: 3 },
            Error::Timeout { message: "late".into(), attempts: 2 },
        ];
        for e in cases {
            let back = Error::from_status(&e.to_status());
            assert_eq!(back.code(), e.code());
            assert_eq!(back.http_status(), e.http_status());
            assert_eq!(back.param(), e.param());
            assert_eq!(back.attempts(), e.attempts());
            assert_eq!(back.to_string(), e.to_string());
        }
    }

    #[test]
    fn table_matches_api_md() {
        let s = Error::RateLimited { retry_after_secs: 1 }.to_status();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(s.metadata().get("retry-after").unwrap(), "1");
        assert_eq!(Error::Timeout { message: String::new(), attempts: 0 }.to_status().code(), tonic::Code::DeadlineExceeded);
        assert_eq!(Error::PayloadTooLarge { limit: 1 }.http_status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(Error::PayloadTooLarge { limit: 1 }.code(), "invalid_input");
    }

    #[test]
    fn upstream_auth_failures_hide_the_body() {
        let e = UpstreamError::from_status("p", 401, None, "Incorrect API key provided: sk-abc");
        assert!(!e.to_string().contains("sk-abc"));
        assert!(e.is_retryable());
        assert!(!UpstreamError::from_status("p", 400, None, "bad").is_retryable());
        assert!(matches!(
            UpstreamError::from_status("p", 503, Some(Duration::from_secs(2)), "").kind,
            UpstreamErrorKind::RateLimited { .. }
        ));
    }
}
