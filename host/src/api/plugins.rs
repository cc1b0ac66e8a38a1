//! `/api/v1/plugins`: list strategies, upload a custom one (checked before it serves), remove
//! one; and `PUT /api/v1/services/{name}/strategy` to switch a service's strategy at runtime.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::json::{JsonBody, Upload};
use crate::model::{ServiceName, StrategyName};
use crate::plugins::Source;

pub async fn list(State(app): State<AppState>) -> impl IntoResponse {
    Json(json!({ "plugins": app.strategies.list() }))
}

fn is_component(headers: &HeaderMap) -> bool {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/wasm")
        || essence.eq_ignore_ascii_case("application/octet-stream")
}

/// Uploads a component. It is checked off the request's thread; if it passes it serves at once
/// under its name, otherwise the version in force (if any) keeps serving.
pub async fn upload(
    State(app): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    Upload(body): Upload,
) -> Result<impl IntoResponse, ApiError> {
    caller.unrestricted()?;
    let name = StrategyName::parse(&name)?;
    if !is_component(&headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "upload the component with Content-Type: application/wasm",
        ));
    }
    let existed = app.strategies.knows(name.as_str());
    let strategies = app.strategies.clone();
    let installed = tokio::task::spawn_blocking(move || {
        strategies.install(&body, Source::Api, Some(name.as_str()))
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the check did not finish: {e}"),
        )
    })?;
    match installed {
        Ok(info) => {
            let status = if existed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            Ok((status, Json(info)))
        }
        Err(rejected) => Err(ApiError::bad_request(Some("component".into()), rejected.0)),
    }
}

pub async fn remove(
    State(app): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.unrestricted()?;
    let name = StrategyName::parse(&name)?;
    if app.strategies.remove(name.as_str()) {
        return Ok(StatusCode::NO_CONTENT);
    }
    if app.strategies.knows(name.as_str()) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{name:?} is a built-in strategy and cannot be removed"),
        ));
    }
    Err(ApiError::not_found(format!(
        "no custom strategy named {name:?} is loaded"
    )))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategyChange {
    strategy: String,
}

pub async fn set_strategy(
    State(app): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(change): JsonBody<StrategyChange>,
) -> Result<impl IntoResponse, ApiError> {
    let name = ServiceName::parse(&name)?;
    caller.may_change(&name)?;
    let strategy = StrategyName::parse(&change.strategy)?;
    let service = app.registry.set_strategy(&name, strategy).await?;
    Ok(Json(service))
}
