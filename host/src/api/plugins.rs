//! `/api/v1/plugins`: list strategies, upload a custom one (checked before it serves), remove
//! one; and `PUT /api/v1/services/{name}/strategy` to switch a service's strategy at runtime.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::json::{JsonBody, QueryOf, Upload};
use super::services::settings_accepted;
use crate::model::{SETTINGS_FIELD, ServiceName, StrategyName, StrategySettings};
use crate::plugins::{RequestedLimits, Shadow, Size, Source, check_shape};

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

/// How an upload is asked for: whether to wait for the check, and the plugin's limits.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    /// Answer when the component is checked (`200`/`201` or `400`) rather than at once (`202`).
    #[serde(default)]
    wait: bool,
    memory: Option<String>,
    instances: Option<u32>,
    pick_deadline: Option<String>,
    pick_budget: Option<String>,
    /// The plugin-wide settings, as JSON.
    settings: Option<String>,
}

/// Uploads a component. What can be told without compiling (the size, that it is a component
/// of this contract version, the limits asked for) is answered at once with `400`; otherwise
/// the answer is `202 Accepted` and the plugin is listed as compiling until it is checked, when
/// `plugin_loaded` or `plugin_rejected` follows. The version in force serves meanwhile.
pub async fn upload(
    State(app): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    QueryOf(query): QueryOf<UploadQuery>,
    headers: HeaderMap,
    Upload(body): Upload,
) -> Result<axum::response::Response, ApiError> {
    caller.unrestricted()?;
    let name = StrategyName::parse(&name)?;
    if !is_component(&headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "upload the component with Content-Type: application/wasm",
        ));
    }
    let settings = query
        .settings
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .map_err(|e| {
            ApiError::bad_request(
                Some("settings".into()),
                format!("settings are not JSON: {e}"),
            )
        })?;
    let setup = RequestedLimits {
        memory: query.memory.map(Size::Words),
        instances: query.instances,
        pick_deadline: query.pick_deadline,
        pick_budget: query.pick_budget,
        settings,
    }
    .resolve()
    .map_err(|e| {
        let field = if e.starts_with("settings") {
            "settings"
        } else {
            "limits"
        };
        ApiError::bad_request(Some(field.into()), e)
    })?;
    if let Err(reason) = check_shape(&body) {
        app.strategies
            .refuse(Source::Api, Some(name.as_str()), &reason);
        return Err(ApiError::bad_request(Some("component".into()), reason));
    }
    let existed = app.strategies.knows(name.as_str());
    let ticket = app
        .strategies
        .begin(&body, &Source::Api, Some(name.as_str()));
    let (strategies, expected) = (app.strategies.clone(), name.clone());
    let checked = tokio::task::spawn_blocking(move || {
        strategies.install_begun(ticket, &body, Source::Api, Some(expected.as_str()), setup)
    });
    if !query.wait {
        let listed = app
            .strategies
            .list()
            .into_iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()));
        let location = format!("/api/v1/plugins/{name}");
        return Ok((
            StatusCode::ACCEPTED,
            [(header::LOCATION, location)],
            Json(listed),
        )
            .into_response());
    }
    let installed = checked.await.map_err(|e| {
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
            Ok((status, Json(info)).into_response())
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

/// A change of a service's strategy, its settings, its shadow, or several at once.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategyChange {
    strategy: Option<String>,
    /// Absent: the settings stay as they are; `{}` removes them.
    strategy_settings: Option<serde_json::Value>,
    /// Absent: the shadow stays as it is; `null`: removed; a name: that strategy shadows.
    #[serde(default, deserialize_with = "present")]
    shadow: Option<Option<String>>,
}

/// A field that is present, even as `null`.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// `PUT /api/v1/services/{name}/strategy`: `{"strategy": "..."}` switches the live strategy;
/// `{"strategy_settings": {...}}` gives the route new settings, which reconfigure it live;
/// `{"shadow": "..."}` runs a candidate beside it on every first try, compared and never used
/// (`{"shadow": null}` removes it). The strategy and its shadow must both accept the route's
/// settings as they will stand. Everything is checked before anything is applied.
pub async fn set_strategy(
    State(app): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(change): JsonBody<StrategyChange>,
) -> Result<impl IntoResponse, ApiError> {
    let name = ServiceName::parse(&name)?;
    caller.may_change(&name)?;
    if change.strategy.is_none() && change.strategy_settings.is_none() && change.shadow.is_none() {
        return Err(ApiError::bad_request(
            None,
            "give `strategy`, `strategy_settings`, `shadow`, or several".to_owned(),
        ));
    }
    let current = app
        .registry
        .service(&name)
        .ok_or_else(|| ApiError::not_found(format!("no service named {name:?}")))?;
    let strategy = change
        .strategy
        .as_deref()
        .map(StrategyName::parse)
        .transpose()?;
    let settings = change
        .strategy_settings
        .as_ref()
        .map(StrategySettings::from_json)
        .transpose()?;
    let live = strategy.clone().unwrap_or(current.route.strategy.clone());
    let live_settings = settings
        .clone()
        .unwrap_or(current.route.strategy_settings.clone());
    if strategy.is_some() || settings.is_some() {
        app.registry.check_strategy(&live)?;
        settings_accepted(&app, &live, &live_settings, SETTINGS_FIELD).await?;
    }
    let shadow = match &change.shadow {
        Some(Some(shadow)) => {
            let slot = checked_shadow(&app, &name, shadow, &live)?;
            let shadow = StrategyName::parse(&slot.name)?;
            settings_accepted(&app, &shadow, &live_settings, "shadow").await?;
            Some(Some(slot))
        }
        Some(None) => Some(None),
        None => None,
    };
    let service = if strategy.is_some() || settings.is_some() {
        app.registry.set_strategy(&name, live, settings).await?
    } else {
        current
    };
    if let Some(shadow) = shadow {
        let balancer = app
            .routing
            .balancer(&name)
            .ok_or_else(|| ApiError::not_found(format!("{name:?} is not routed")))?;
        balancer
            .set_shadow(shadow.map(|slot| {
                Arc::new(Shadow::new(slot, name.as_str(), app.metrics.shadow.clone()))
            }));
    }
    Ok(Json(super::services::with_shadow(&app, service)))
}

/// The slot of a strategy that may shadow `name`'s: it exists and is not the live one.
fn checked_shadow(
    app: &AppState,
    name: &ServiceName,
    shadow: &str,
    live: &StrategyName,
) -> Result<Arc<crate::plugins::Slot>, ApiError> {
    let bad = |reason: String| ApiError::bad_request(Some("shadow".into()), reason);
    let shadow = StrategyName::parse(shadow).map_err(|e| bad(e.reason))?;
    if shadow == *live {
        return Err(bad(format!(
            "{shadow:?} is the live strategy of {name:?}; a shadow is another strategy to compare with it"
        )));
    }
    match app.strategies.slot(shadow.as_str()) {
        Some(slot) if app.strategies.knows(shadow.as_str()) => Ok(slot),
        _ => Err(bad(format!("no strategy named {shadow:?} is loaded"))),
    }
}
