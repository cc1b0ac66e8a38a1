//! Reading JSON request bodies with errors a client can act on: `415` for a body that is not
//! JSON, `413` past the size limit, and `400` naming the field for anything else; and query
//! strings, as strictly, so that a misspelt `dry_run` is an error rather than a real change.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A JSON body, deserialized strictly.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let headers = req.headers().clone();
        let body = read_body(req, state).await?;
        parse(&headers, &body).map(JsonBody)
    }
}

/// A query string, deserialized strictly; a `400` in Harbor's JSON error shape when it does not
/// fit.
pub struct QueryOf<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for QueryOf<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        serde_urlencoded::from_str(query)
            .map(QueryOf)
            .map_err(|e| ApiError::bad_request(None, format!("the query string: {e}")))
    }
}

/// A component upload's bytes, up to [`crate::plugins::MAX_COMPONENT_BYTES`]; past it, a JSON
/// `413` that names the limit.
pub struct Upload(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Upload {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let limit = crate::plugins::MAX_COMPONENT_BYTES as usize;
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the upload is larger than the limit for a component, {limit} bytes (32 MiB)"
                ),
            )
        };
        // Refused before a byte of the body is read when its length says so.
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        axum::body::to_bytes(req.into_body(), limit)
            .await
            .map(Upload)
            .map_err(|_| too_large())
    }
}

/// A body that may be empty; when present it must be JSON.
pub struct OptionalJsonBody<T>(pub Option<T>);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let headers = req.headers().clone();
        let body = read_body(req, state).await?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(None));
        }
        parse(&headers, &body).map(|v| OptionalJsonBody(Some(v)))
    }
}

/// The body limit in force for a request and what sets it, put beside axum's own on the router
/// for the `413` to name.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize, pub &'static str);

async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    let limit = req.extensions().get::<BodyLimit>().copied();
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                match limit {
                    Some(BodyLimit(n, set_by)) => {
                        format!("the request body is larger than the limit, {n} bytes ({set_by})")
                    }
                    None => "the request body is larger than the limit".to_owned(),
                },
            )
        } else {
            ApiError::bad_request(None, format!("cannot read the request body: {rejection}"))
        }
    })
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

pub(super) fn parse<T: DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, ApiError> {
    if !is_json(headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be JSON with Content-Type: application/json",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        let field = field_from_message(&message).or((path != ".").then_some(path));
        ApiError::bad_request(field, format!("invalid JSON body: {message}"))
    })?;
    // One value and nothing after it but whitespace: `{...}xyz` is not JSON.
    de.end()
        .map_err(|e| ApiError::bad_request(None, format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// serde reports unknown and missing fields at the parent's path; the name is in the message.
fn field_from_message(message: &str) -> Option<String> {
    for prefix in ["unknown field `", "missing field `"] {
        if let Some(rest) = message.strip_prefix(prefix) {
            return rest.split('`').next().map(str::to_owned);
        }
    }
    None
}
