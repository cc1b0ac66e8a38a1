//! `/api/v1/services` and `/api/v1/catalog`: registration with leases, renewal, deregistration,
//! and the read views.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::json::{JsonBody, OptionalJsonBody, QueryOf};
use crate::model::{
    CatalogEntry, HstsInput, InstanceId, LeaseView, Meta, Protocol, Route, RouteInput,
    SETTINGS_FIELD, ServiceName, StrategyName, StrategySettings, Tls, TlsInput, Upstream,
    UpstreamAddr, check_meta, check_weight,
};
use crate::registry::{Grant, Registration, RegistryError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    name: String,
    upstream: String,
    weight: Option<u32>,
    host: Option<String>,
    hosts: Option<Vec<String>>,
    path: Option<String>,
    protocol: Option<Protocol>,
    listen: Option<String>,
    ttl_secs: Option<u64>,
    public: Option<bool>,
    strategy: Option<String>,
    strategy_settings: Option<serde_json::Value>,
    tls: Option<TlsInput>,
    redirect_http: Option<bool>,
    hsts: Option<HstsInput>,
    meta: Option<Meta>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    ttl_secs: Option<u64>,
}

#[derive(Serialize)]
pub struct GrantBody {
    id: InstanceId,
    name: ServiceName,
    lease: LeaseView,
}

impl From<Grant> for GrantBody {
    fn from(g: Grant) -> Self {
        Self {
            id: g.id,
            name: g.name,
            lease: LeaseView::new(g.ttl, g.expires_at),
        }
    }
}

impl RegisterRequest {
    fn into_registration(self) -> Result<Registration, ApiError> {
        let name = ServiceName::parse(&self.name)?;
        let mut route = RouteInput {
            host: self.host.as_deref(),
            hosts: self.hosts.as_deref(),
            path: self.path.as_deref(),
            protocol: self.protocol,
            listen: self.listen.as_deref(),
            strategy: self.strategy.as_deref(),
            public: self.public,
            ..RouteInput::new(&name)
        }
        .validate()?;
        if let Some(settings) = &self.strategy_settings {
            route.strategy_settings = StrategySettings::from_json(settings)?;
        }
        route.tls = Tls::parse(self.tls.as_ref(), self.redirect_http, self.hsts.as_ref())?;
        route.check_tls()?;
        let upstream = Upstream {
            addr: UpstreamAddr::parse(&self.upstream)?,
            weight: check_weight(self.weight.unwrap_or(1))?,
            labels: Meta::new(),
        };
        let meta = self.meta.unwrap_or_default();
        check_meta(&meta)?;
        Ok(Registration {
            name,
            upstream,
            route,
            ttl: self.ttl_secs.map(Duration::from_secs),
            meta,
        })
    }
}

fn parse_name(raw: &str) -> Result<ServiceName, ApiError> {
    Ok(ServiceName::parse(raw)?)
}

/// The live instance `raw` names, if the caller may change its service.
fn authorized_instance(app: &AppState, caller: &Caller, raw: &str) -> Result<InstanceId, ApiError> {
    let id: InstanceId = raw.parse().map_err(|_| {
        ApiError::bad_request(Some("id".into()), format!("{raw:?} is not an instance id"))
    })?;
    let name = app
        .registry
        .instance_service(id)
        .ok_or(RegistryError::UnknownInstance(id))?;
    caller.may_change(&name)?;
    Ok(id)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterQuery {
    /// Check the registration and show what it would make the proxy run, changing nothing.
    #[serde(default)]
    dry_run: bool,
}

pub async fn register(
    State(app): State<AppState>,
    caller: Caller,
    QueryOf(query): QueryOf<RegisterQuery>,
    JsonBody(req): JsonBody<RegisterRequest>,
) -> Result<axum::response::Response, ApiError> {
    let reg = req.into_registration()?;
    caller.may_register(&reg.name, &reg.route)?;
    if reg.route.tls.names_files() {
        // Files are read with Harbor's permissions: only whoever may do anything may name them.
        caller.unrestricted().map_err(|e| e.with_field("tls"))?;
    }
    check_listen(&app, &reg)?;
    check_settings(&app, &reg.route).await?;
    check_certificate_files(&reg.route).await?;
    if query.dry_run {
        return Ok(Json(dry_run(&app, reg).await?).into_response());
    }
    let grant = app.registry.register_saved(reg).await?;
    let status = if grant.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(GrantBody::from(grant))).into_response())
}

/// Reads and checks the certificate files a registration names, off the runtime's threads.
async fn check_certificate_files(route: &Route) -> Result<(), ApiError> {
    let Some(crate::model::TlsMode::Files { cert, key }) = route.tls.mode.clone() else {
        return Ok(());
    };
    tokio::task::spawn_blocking(move || crate::tls::files::load(&cert, &key).map(|_| ()))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the certificate check stopped: {e}"),
            )
        })?
        .map_err(|reason| ApiError::bad_request(Some("tls".into()), reason))
}

/// Asks the route's strategy whether it accepts the route's settings; a refusal is a `400`
/// carrying the strategy's own reason.
async fn check_settings(app: &AppState, route: &Route) -> Result<(), ApiError> {
    settings_accepted(
        app,
        &route.strategy,
        &route.strategy_settings,
        SETTINGS_FIELD,
    )
    .await
}

/// Asks `strategy` whether it accepts `settings` for a route, off the runtime's threads (it
/// runs the strategy's code); a refusal is a `400` against `field` with the strategy's reason.
pub(super) async fn settings_accepted(
    app: &AppState,
    strategy: &StrategyName,
    settings: &StrategySettings,
    field: &str,
) -> Result<(), ApiError> {
    if settings.is_empty() || !app.strategies.knows(strategy.as_str()) {
        // No settings need no check; an unknown strategy is the registry's to report.
        return Ok(());
    }
    let strategies = app.strategies.clone();
    let (name, settings) = (strategy.clone(), settings.clone());
    tokio::task::spawn_blocking(move || strategies.check_settings(name.as_str(), &settings))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the settings check stopped: {e}"),
            )
        })?
        .map_err(|reason| ApiError::bad_request(Some(field.into()), reason))
}

/// Where Harbor's own TCP proxy carries tcp services, an address it cannot bind is refused at
/// registration rather than retried in the background forever.
fn check_listen(app: &AppState, reg: &Registration) -> Result<(), ApiError> {
    let crate::model::Match::Tcp { listen, .. } = reg.route.matcher else {
        return Ok(());
    };
    if !app.tcp.carrying() {
        return Ok(());
    }
    // Held by a service already: Harbor listens there itself, and the registry tells whose it
    // is when it is another's.
    let held = app
        .registry
        .services()
        .iter()
        .any(|s| s.route.listen == Some(listen));
    if held {
        return Ok(());
    }
    crate::proxy::can_listen(listen).map_err(|e| {
        ApiError::new(
            StatusCode::CONFLICT,
            format!("cannot listen on {listen}: {e}"),
        )
        .with_field("listen")
    })
}

/// The service as `reg` would leave it, and what the proxy would be given: nothing registered,
/// nothing written.
async fn dry_run(app: &AppState, reg: Registration) -> Result<serde_json::Value, ApiError> {
    let name = reg.name.clone();
    let services = app.registry.preview_register(reg)?;
    let service = services.iter().find(|s| s.name == name).cloned();
    let backend = match &app.dispatcher {
        Some(d) => Some(
            d.render(services)
                .await
                .map_err(super::backend::swap_error)?,
        ),
        None => None,
    };
    Ok(json!({"dry_run": true, "service": service, "backend": backend}))
}

pub async fn renew(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    OptionalJsonBody(req): OptionalJsonBody<RenewRequest>,
) -> Result<Json<GrantBody>, ApiError> {
    let id = authorized_instance(&app, &caller, &id)?;
    let ttl = req.and_then(|r| r.ttl_secs).map(Duration::from_secs);
    Ok(Json(app.registry.renew_saved(id, ttl).await?.into()))
}

pub async fn deregister(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = authorized_instance(&app, &caller, &id)?;
    app.registry.deregister_saved(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list(State(app): State<AppState>) -> impl IntoResponse {
    Json(json!({ "services": app.registry.services() }))
}

pub async fn get_one(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let name = parse_name(&name)?;
    let service = app
        .registry
        .service(&name)
        .ok_or_else(|| ApiError::not_found(format!("no service named {name:?}")))?;
    Ok(Json(with_shadow(&app, service)))
}

/// A service as the API shows it, with what its shadow strategy has seen, if it has one.
pub fn with_shadow(app: &AppState, service: crate::model::ServiceView) -> serde_json::Value {
    let shadow = app
        .routing
        .balancer(&service.name)
        .and_then(|b| b.shadow())
        .map(|s| s.report());
    let mut view = serde_json::to_value(&service).unwrap_or_default();
    if let (Some(shadow), Some(fields)) = (shadow, view.as_object_mut()) {
        fields.insert("shadow".into(), json!(shadow));
    }
    view
}

pub async fn catalog(State(app): State<AppState>) -> impl IntoResponse {
    let services: Vec<CatalogEntry> = app
        .registry
        .services()
        .iter()
        .filter(|s| s.public)
        .map(CatalogEntry::from)
        .collect();
    Json(json!({ "services": services }))
}

pub async fn route_errors(State(app): State<AppState>) -> impl IntoResponse {
    // Route files Harbor could not read, and services the proxy refused to run.
    let refused = app
        .dispatcher
        .as_ref()
        .map(|d| d.status().refused)
        .unwrap_or_default();
    Json(json!({ "errors": app.registry.route_errors(), "refused": refused }))
}
