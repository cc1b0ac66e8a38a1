//! The API's error type: a status and a stable JSON body `{"error": "...", "field": "..."}` that
//! names what was wrong without leaking internals.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::model::FieldError;
use crate::registry::RegistryError;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: String,
    field: Option<String>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            error: error.into(),
            field: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn bad_request(field: Option<String>, error: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            error: error.into(),
            field,
        }
    }

    pub fn not_found(error: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, error)
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        Self::bad_request(Some(e.field), e.reason)
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match e {
            RegistryError::UnknownInstance(_) | RegistryError::UnknownService(_) => {
                StatusCode::NOT_FOUND
            }
            RegistryError::UnknownStrategy(_) => StatusCode::BAD_REQUEST,
            RegistryError::StaticName(_)
            | RegistryError::Claimed { .. }
            | RegistryError::RouteMismatch { .. } => StatusCode::CONFLICT,
            RegistryError::TtlOutOfBounds { .. } => StatusCode::BAD_REQUEST,
            RegistryError::NotSaved(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        let field = e.field();
        let err = Self::new(status, e.to_string());
        match field {
            Some(f) => err.with_field(f),
            None => err,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: &self.error,
            field: self.field.as_deref(),
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
