//! `/api/v1/backend`: the active backend adapter and whether the proxy is in step (`GET`), and
//! swapping the adapter at runtime (`PUT`), either for a built-in one by name with settings
//! (`{"adapter": "caddy", "config": {...}}`) or for an uploaded component
//! (`Content-Type: application/wasm`, `?proxy=caddy|envoy` naming the capabilities it gets);
//! `?dry_run=true` shows what the new adapter would write instead, writing nothing.
//! `/api/v1/backend/config`: what Harbor pushed to the proxy for the state it last applied.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::json::{QueryOf, Upload, parse};
use crate::config::BackendKind;
use crate::dispatch::SwapError;

pub async fn status(State(app): State<AppState>) -> impl IntoResponse {
    match &app.dispatcher {
        Some(d) => {
            let mut body = serde_json::to_value(d.status()).unwrap_or_default();
            body["backend"] = json!(d.proxy_in_force());
            Json(body)
        }
        None => Json(json!({"backend": "embedded", "adapter": null, "in_sync": true})),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwapBody {
    /// A built-in adapter: `caddy` or `envoy`.
    adapter: BackendKind,
    /// Settings replacing the defaults key by key.
    #[serde(default)]
    config: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwapQuery {
    proxy: Option<BackendKind>,
    #[serde(default)]
    dry_run: bool,
}

/// What the adapter in force wrote for the state it last applied: Caddy's route JSON, Envoy's
/// files.
pub async fn config(
    State(app): State<AppState>,
    caller: Caller,
) -> Result<impl IntoResponse, ApiError> {
    // Every service's route is in it, whoever may see or change it.
    caller.unrestricted()?;
    let dispatcher = driven(&app)?;
    let pushed = dispatcher.pushed().await.map_err(swap_error)?;
    Ok(Json(pushed))
}

fn driven(app: &AppState) -> Result<&Arc<crate::dispatch::Dispatcher>, ApiError> {
    app.dispatcher.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "Harbor runs the embedded proxy (--backend embedded); no adapter writes a configuration",
        )
    })
}

/// The answer for a swap, or a render, that did not happen.
pub fn swap_error(e: SwapError) -> ApiError {
    match e {
        e @ SwapError::Load(_) => ApiError::bad_request(
            Some("component".into()),
            format!("the adapter was refused: {e}"),
        ),
        e @ (SwapError::Apply(_) | SwapError::Render(_)) => {
            ApiError::new(StatusCode::BAD_GATEWAY, e.to_string())
        }
        e @ (SwapError::NoAdapter | SwapError::Stopped) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

fn is_component(headers: &HeaderMap) -> bool {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/wasm")
}

pub async fn swap(
    State(app): State<AppState>,
    caller: Caller,
    QueryOf(query): QueryOf<SwapQuery>,
    headers: HeaderMap,
    Upload(body): Upload,
) -> Result<impl IntoResponse, ApiError> {
    caller.unrestricted()?;
    let dispatcher = driven(&app)?;
    let spec = if is_component(&headers) {
        let kind = query.proxy.unwrap_or(dispatcher.kind());
        dispatcher
            .spec_for(kind, Arc::from(&body[..]), "upload".into(), None)
            .await
    } else {
        let request: SwapBody = parse(&headers, &body)?;
        if request.adapter == BackendKind::Embedded {
            return Err(ApiError::bad_request(
                Some("adapter".into()),
                "the embedded proxy has no adapter; name caddy or envoy",
            ));
        }
        if request.config.as_ref().is_some_and(|c| !c.is_object()) {
            return Err(ApiError::bad_request(
                Some("config".into()),
                "config must be a JSON object of the adapter's settings",
            ));
        }
        dispatcher
            .builtin_spec(request.adapter, request.config.as_ref())
            .await
    }
    .map_err(|e| ApiError::bad_request(None, format!("{e:#}")))?;
    if query.dry_run {
        let rendered = dispatcher.dry_swap(spec).await.map_err(swap_error)?;
        let mut body = serde_json::to_value(rendered).unwrap_or_default();
        body["dry_run"] = json!(true);
        return Ok(Json(body));
    }
    let status = dispatcher.swap(spec).await.map_err(swap_error)?;
    Ok(Json(serde_json::to_value(status).unwrap_or_default()))
}
