//! The one error type of the wire protocol.
//!
//! Every failed request is answered with the micro-service error headers
//! (`Nats-Service-Error`, `Nats-Service-Error-Code`) *and* a JSON body
//! `{"error":{"code","message","details"}}`. `code` is one of the stable
//! [`ErrorCode`] strings documented in `docs/protocol.md`; callers branch on it,
//! never on the message text.
//!
//! A failure that comes from elsewhere (a NATS call, a decoder) keeps that
//! error as its [`std::error::Error::source`], for logs and for callers that
//! need the cause; only code, message and details go on the wire
//! ([`Error::to_body`]).

use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::id::IdError;

/// Stable error codes. New codes may be added; existing ones never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is not valid JSON or does not match the schema.
    BadRequest,
    /// An id is not a subject-safe token (`^[A-Za-z0-9_-]{1,64}$`).
    InvalidId,
    /// The payload exceeds the size limit.
    PayloadTooLarge,
    /// The named flow, task, agent, allocation or document does not exist.
    NotFound,
    /// A compare-and-set lost against a newer revision; re-read and retry.
    Conflict,
    /// The request is well-formed but describes something invalid (e.g. a cycle).
    ValidationFailed,
    /// No agent can take the requirements now; `details` says what is short.
    NoCapacity,
    /// The allocation would take its owner beyond a quota; `details` names the
    /// quota's owner, the resource, the limit, what is in use and what was asked.
    QuotaExceeded,
    /// The caller sends faster than it may (e.g. one agent's state writes);
    /// retry later.
    RateLimited,
    /// A report for an attempt or agent that no longer holds the task.
    Fenced,
    /// A request on one agent's own subject (`coord.agents.{id}.…`) whose body
    /// names another agent: an agent acts only for itself.
    Forbidden,
    /// A service this one depends on did not answer.
    Unavailable,
    /// The request timed out.
    Timeout,
    /// A bug or storage failure; the request may be retried.
    Internal,
    /// A code this build does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The numeric code sent in the `Nats-Service-Error-Code` header (HTTP-like).
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::InvalidId => 400,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict | ErrorCode::Fenced => 409,
            ErrorCode::QuotaExceeded | ErrorCode::RateLimited => 429,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::ValidationFailed => 422,
            ErrorCode::Internal | ErrorCode::Unknown => 500,
            ErrorCode::NoCapacity | ErrorCode::Unavailable => 503,
            ErrorCode::Timeout => 504,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidId => "invalid_id",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::ValidationFailed => "validation_failed",
            ErrorCode::NoCapacity => "no_capacity",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Fenced => "fenced",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// Whether an error reply with this code is a failure of the service
    /// (it could not do what it should have), as opposed to an expected
    /// refusal (`no_capacity`, `conflict`, `not_found`, `fenced`,
    /// `quota_exceeded`, …) or the caller's mistake (`bad_request`, …). Only
    /// failures count in `$SRV.STATS` `num_errors` and against health.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            ErrorCode::Internal | ErrorCode::Unavailable | ErrorCode::Timeout | ErrorCode::Unknown
        )
    }

    /// Every code, for docs and tests.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::BadRequest,
        ErrorCode::InvalidId,
        ErrorCode::PayloadTooLarge,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::ValidationFailed,
        ErrorCode::NoCapacity,
        ErrorCode::QuotaExceeded,
        ErrorCode::RateLimited,
        ErrorCode::Fenced,
        ErrorCode::Forbidden,
        ErrorCode::Unavailable,
        ErrorCode::Timeout,
        ErrorCode::Internal,
    ];
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What caused an [`Error`], shared so the error stays cheap to clone.
pub type Source = Arc<dyn std::error::Error + Send + Sync>;

/// Any error a cause may be given as: a typed error, one already boxed (as
/// async-nats returns some), or a message.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A failed request: what callers match on ([`ErrorCode`]) plus a human message
/// and structured details (e.g. every validation problem, the current revision).
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize, JsonSchema)]
#[error("{code}: {message}")]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
    /// Structured context; `null` when there is none.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub details: Value,
    /// The failure this one reports, already spelled out in `message`; never
    /// sent, so a decoded error has none.
    #[serde(skip)]
    #[schemars(skip)]
    #[source]
    source: Option<Source>,
}

/// Two errors are equal when they say the same on the wire; the source is
/// left out (it is not comparable, and never sent).
impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        self.code == other.code && self.message == other.message && self.details == other.details
    }
}

/// The JSON body of an error reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    pub error: Error,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
            details: Value::Null,
            source: None,
        }
    }

    /// An error caused by `source`: the message is `"{what}: {source}"`, and
    /// `source` stays reachable through [`std::error::Error::source`].
    pub fn from_source(
        code: ErrorCode,
        what: impl std::fmt::Display,
        source: impl Into<BoxError>,
    ) -> Self {
        let source = source.into();
        let mut e = Self::new(code, format!("{what}: {source}"));
        e.source = Some(Source::from(source));
        e
    }

    /// A bus, store or peer failure while doing `what`: `unavailable`, the
    /// request may be retried.
    pub fn unavailable(what: impl std::fmt::Display, source: impl Into<BoxError>) -> Self {
        Self::from_source(ErrorCode::Unavailable, what, source)
    }

    /// A failure of this service's own doing (encoding, stored data it cannot
    /// read) while doing `what`.
    pub fn internal_from(what: impl std::fmt::Display, source: impl Into<BoxError>) -> Self {
        Self::from_source(ErrorCode::Internal, what, source)
    }

    pub fn with_details(mut self, details: impl Serialize) -> Self {
        self.details = serde_json::to_value(details).unwrap_or(Value::Null);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    /// Classifies a JSON decoding failure: a bad id gets its own code, since
    /// clients usually need to fix the id rather than the shape of the request.
    pub fn decode(err: &serde_json::Error) -> Self {
        let msg = err.to_string();
        if msg.starts_with("invalid id") {
            Self::new(ErrorCode::InvalidId, msg)
        } else {
            Self::new(ErrorCode::BadRequest, format!("malformed request: {msg}"))
        }
    }

    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(&ErrorBody {
            error: self.clone(),
        })
        .unwrap_or_else(|_| br#"{"error":{"code":"internal","message":"error body"}}"#.to_vec())
    }
}

impl From<IdError> for Error {
    fn from(e: IdError) -> Self {
        Error::new(ErrorCode::InvalidId, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_strings() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            let back: ErrorCode = serde_json::from_str(&json).unwrap();
            assert_eq!(back, code);
            assert!(code.status() >= 400);
        }
        let unknown: ErrorCode = serde_json::from_str("\"from_the_future\"").unwrap();
        assert_eq!(unknown, ErrorCode::Unknown);
    }

    #[test]
    fn body_has_the_documented_shape() {
        let e = Error::new(ErrorCode::Conflict, "stale revision")
            .with_details(serde_json::json!({"revision": 7}));
        let v: Value = serde_json::from_slice(&e.to_body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {"code": "conflict", "message": "stale revision", "details": {"revision": 7}}})
        );
        let back: ErrorBody = serde_json::from_value(v).unwrap();
        assert_eq!(back.error, e);
    }

    #[test]
    fn a_source_is_kept_for_logs_and_left_off_the_wire() {
        use std::error::Error as _;
        let io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "pipe closed");
        let e = Error::unavailable("kv write k", io);
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert_eq!(e.message, "kv write k: pipe closed");
        assert_eq!(e.to_string(), "unavailable: kv write k: pipe closed");
        assert_eq!(e.source().unwrap().to_string(), "pipe closed");
        let back: ErrorBody = serde_json::from_slice(&e.to_body()).unwrap();
        assert!(back.error.source().is_none());
        assert_eq!(back.error, e, "equal on what is sent");
        assert_eq!(e.clone().source().unwrap().to_string(), "pipe closed");
    }

    #[test]
    fn decode_errors_are_classified() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct R {
            agent: crate::AgentId,
        }
        let e = serde_json::from_str::<R>(r#"{"agent":"a b"}"#).unwrap_err();
        assert_eq!(Error::decode(&e).code, ErrorCode::InvalidId);
        let e = serde_json::from_str::<R>("nope").unwrap_err();
        assert_eq!(Error::decode(&e).code, ErrorCode::BadRequest);
    }
}
