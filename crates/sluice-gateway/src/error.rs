//! API errors: every failure is JSON `{"error": {"type", "message", "field"?}}`
//! with a 4xx for the caller's mistakes and a 5xx only for ours.

use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable type, e.g. `invalid_request`.
    pub kind: &'static str,
    /// What went wrong, for a human.
    pub message: String,
    /// The request field at fault (`limits[0].window`, `subjects[1]`, a header or path part).
    pub field: Option<String>,
    /// More members of the `error` object.
    pub extra: Map<String, Value>,
    /// Extra headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    /// An error with this status and type.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
            field: None,
            extra: Map::new(),
            headers: Vec::new(),
        }
    }

    /// Naming the field at fault.
    #[must_use]
    pub fn field(mut self, field: impl Into<String>) -> ApiError {
        self.field = Some(field.into());
        self
    }

    /// With one more header.
    #[must_use]
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> ApiError {
        self.headers.push((name, value));
        self
    }

    /// With one more member in the error object.
    #[must_use]
    pub fn with(mut self, key: &str, value: Value) -> ApiError {
        self.extra.insert(key.to_owned(), value);
        self
    }

    /// 400: the request's shape is wrong (JSON syntax, types, unknown or missing fields).
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 422: well-formed, but a value is not acceptable.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_value", message).field(field)
    }

    /// 401.
    pub fn unauthenticated(message: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", message);
        e.headers.push((
            axum::http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        ));
        e
    }

    /// 403.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 500, logged; the caller gets no internals.
    pub fn internal(context: &str, err: impl std::fmt::Display) -> ApiError {
        tracing::error!("{context}: {err}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("internal error while {context}; see the server log"),
        )
    }
}

impl From<crate::engine::Unavailable> for ApiError {
    fn from(e: crate::engine::Unavailable) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("{e}; retry shortly"),
        )
        .with_header(
            axum::http::header::RETRY_AFTER,
            HeaderValue::from_static("1"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = Map::new();
        error.insert("type".into(), Value::from(self.kind));
        error.insert("message".into(), Value::from(self.message));
        if let Some(field) = self.field {
            error.insert("field".into(), Value::from(field));
        }
        error.extend(self.extra);
        let mut response =
            (self.status, crate::json::body(&json!({ "error": error }))).into_response();
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response
    }
}
