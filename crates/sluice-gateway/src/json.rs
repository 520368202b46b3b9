//! JSON in and out: bodies are read with a size cap, parsed with the path of
//! the failing field, and answered with `application/json`.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The largest request body accepted (1 MiB); larger gets 413.
pub const MAX_BODY: usize = 1 << 20;

/// A JSON response body with its content type.
pub fn body<T: Serialize>(value: &T) -> impl IntoResponse + use<T> {
    let bytes = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        bytes,
    )
}

/// `status` with a JSON body.
pub fn reply<T: Serialize>(status: StatusCode, value: &T) -> Response {
    (status, body(value)).into_response()
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("request body is larger than {MAX_BODY} bytes"),
    )
}

/// Read a request body, at most [`MAX_BODY`] bytes.
pub async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > MAX_BODY as u64 {
            return Err(too_large());
        }
    }
    // Read before judging the content type, so the connection can be reused.
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| too_large())?;
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
        // curl sends form-urlencoded unless told otherwise: its body is still parsed as JSON.
        let accepted = ct.is_empty()
            || ct.starts_with("application/json")
            || ct.contains("+json")
            || ct.starts_with("application/x-www-form-urlencoded");
        if !accepted {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("expected Content-Type: application/json, got {ct:?}"),
            )
            .field("Content-Type"));
        }
    }
    Ok(bytes)
}

/// Parse JSON, naming the failing field.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "request body is empty; expected a JSON object",
        ));
    }
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                Ok(_) => ApiError::bad_request("request body must be a JSON object"),
                Err(e) => ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    format!("malformed JSON: {e}"),
                ),
            },
        );
    }
    // Fast path: plain serde_json. Only a failure is parsed again to find
    // the path of the failing field.
    if let Ok(value) = serde_json::from_slice::<T>(bytes) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        match inner.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    format!("malformed JSON: {message}"),
                )
            }
            _ => {
                let field = field_of(&path, &message);
                let e = ApiError::bad_request(message);
                match field {
                    Some(f) => e.field(f),
                    None => e,
                }
            }
        }
    })?;
    de.end().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("malformed JSON: {e}"),
        )
    })?;
    Ok(value)
}

/// The field path for a data error: serde names unknown and missing fields in
/// the message, relative to the path where it stopped.
fn field_of(path: &str, message: &str) -> Option<String> {
    let base = if path == "." || path == "?" { "" } else { path };
    let named = ["unknown field `", "missing field `"]
        .iter()
        .find_map(|p| message.strip_prefix(p))
        .and_then(|rest| rest.split('`').next());
    match (base, named) {
        ("", Some(n)) => Some(n.to_owned()),
        (b, Some(n)) if !b.ends_with(n) => Some(format!("{b}.{n}")),
        ("", None) => None,
        (b, _) => Some(b.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        a: u64,
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        items: Vec<Inner>,
    }

    #[test]
    fn errors_name_the_field() {
        let field = |s: &str| parse::<Outer>(s.as_bytes()).unwrap_err().field;
        assert_eq!(
            field(r#"{"items": [{"a": 1}, {"a": "x"}]}"#).as_deref(),
            Some("items[1].a")
        );
        assert_eq!(
            field(r#"{"items": [{"a": 1, "b": 2}]}"#).as_deref(),
            Some("items[0].b")
        );
        assert_eq!(field(r#"{"items": [{}]}"#).as_deref(), Some("items[0].a"));
        assert_eq!(field(r#"{}"#).as_deref(), Some("items"));
        assert_eq!(
            field(r#"{"items": [{"a": -1}]}"#).as_deref(),
            Some("items[0].a")
        );
        let e = parse::<Outer>(b"{\"items\": [").unwrap_err();
        assert_eq!(e.kind, "invalid_json");
        let e = parse::<Outer>(br#"{"items": []} x"#).unwrap_err();
        assert_eq!(e.kind, "invalid_json");
    }
}
