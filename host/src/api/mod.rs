//! The HTTP API: services, catalog, events (SSE), health and metrics, served on every configured
//! listener (TCP or unix socket) from one router.

mod auth;
mod backend;
mod error;
mod events;
pub mod gangway;
mod json;
mod plugins;
pub mod public;
mod services;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use tokio_util::sync::CancellationToken;

pub use auth::Tokens;
pub use error::ApiError;

use crate::metrics::Metrics;
use crate::registry::Registry;

/// What the API's handlers share (the proxy's tasks share a `proxy::Shared`).
pub struct App {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub tokens: Option<Tokens>,
    /// Cancelled at shutdown, so that long-lived event streams end and the server can stop.
    pub cancel: CancellationToken,
    pub sse_keep_alive: std::time::Duration,
    pub strategies: Arc<crate::plugins::Strategies>,
    /// The live routing state: per-upstream health and load, for views that show them.
    pub routing: Arc<crate::routing::RoutingTable>,
    pub backend: crate::config::BackendKind,
    /// Drives Caddy or Envoy; `None` in embedded mode.
    pub dispatcher: Option<Arc<crate::dispatch::Dispatcher>>,
    pub started_at: std::time::SystemTime,
    /// What Gangway and anyone else may see: public services, safe fields only.
    pub public: Arc<crate::public::PublicView>,
    /// Reads need a token too (`--protect-reads`).
    pub protect_reads: bool,
    /// Whether Harbor's own TCP proxy carries tcp services (and so must bind their addresses).
    pub tcp: crate::proxy::TcpCarriage,
    /// The certificates HTTPS is served with, where a TLS listener is configured.
    pub certificates: Option<Arc<crate::tls::Certificates>>,
}

pub type AppState = Arc<App>;

pub fn router(state: AppState, max_body: usize) -> Router {
    // What anyone may read, whatever `--protect-reads` says: the liveness check and Gangway's
    // public view.
    let public = Router::new()
        .route("/healthz", get(healthz))
        .route("/api/v1/catalog", get(services::catalog))
        .route("/api/v1/catalog/events", get(public::stream))
        .route(
            "/.well-known/acme-challenge/{token}",
            get(public::acme_challenge),
        )
        .merge(gangway::files());
    let operator = Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/api/v1/services",
            get(services::list).post(services::register),
        )
        .route(
            "/api/v1/services/{key}",
            get(services::get_one).delete(services::deregister),
        )
        .route("/api/v1/services/{key}/lease", put(services::renew))
        .route(
            "/api/v1/services/{key}/strategy",
            put(plugins::set_strategy),
        )
        .route("/api/v1/plugins", get(plugins::list))
        .route(
            "/api/v1/plugins/{name}",
            put(plugins::upload)
                .delete(plugins::remove)
                .layer(DefaultBodyLimit::max(
                    crate::plugins::MAX_COMPONENT_BYTES as usize,
                )),
        )
        .route(
            "/api/v1/backend",
            get(backend::status)
                .put(backend::swap)
                .layer::<_, std::convert::Infallible>(DefaultBodyLimit::max(
                    crate::plugins::MAX_COMPONENT_BYTES as usize,
                ))
                .layer(axum::Extension(json::BodyLimit(
                    crate::plugins::MAX_COMPONENT_BYTES as usize,
                    "a swap may carry an adapter component",
                ))),
        )
        .route("/api/v1/backend/config", get(backend::config))
        .route("/api/v1/route-errors", get(services::route_errors))
        .route("/api/v1/events", get(events::stream))
        .route("/api/v1/status", get(public::operator_status))
        .route("/api/v1/tls/ca.pem", get(public::ca_pem))
        .route_layer(middleware::from_fn_with_state(state.clone(), guard_reads));
    public
        .merge(operator)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::Extension(json::BodyLimit(max_body, "--max-body")))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// With `--protect-reads`, a read of anything but the public view needs a valid token (of any
/// scope); changes need one whatever it says.
async fn guard_reads(
    State(app): State<AppState>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    let read = matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    if app.protect_reads
        && read
        && let Some(tokens) = &app.tokens
        && let Err(e) = tokens.admits(request.headers())
    {
        return e.into_response();
    }
    next.run(request).await
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(app.registry.counts()),
    )
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

async fn count_requests(State(app): State<AppState>, req: Request, next: Next) -> Response {
    // Only standard methods become label values, so clients cannot grow the series without bound.
    let method = match *req.method() {
        Method::GET
        | Method::HEAD
        | Method::POST
        | Method::PUT
        | Method::DELETE
        | Method::PATCH => req.method().as_str().to_owned(),
        _ => "other".to_owned(),
    };
    let response = next.run(req).await;
    app.metrics
        .api_requests
        .with_label_values(&[method.as_str(), response.status().as_str()])
        .inc();
    response
}
