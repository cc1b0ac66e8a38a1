//! Gangway's files, built into the binary so that the daemon needs nothing beside it, served with
//! validators (`ETag`, revalidated on each load) and a strict content security policy; and the
//! router of the separate Gangway listener, which serves the page and the public data only.

use std::sync::OnceLock;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use super::{ApiError, AppState};

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../../../gangway/index.html"),
    },
    Asset {
        path: "/gangway/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../../gangway/app.js"),
    },
    Asset {
        path: "/gangway/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../../gangway/style.css"),
    },
    Asset {
        path: "/gangway/favicon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../../../gangway/favicon.svg"),
    },
];

/// Everything the page needs comes from Harbor itself; nothing may load from elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn etags() -> &'static [String] {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let digest = Sha256::digest(a.body);
                let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
                format!("\"{hex}\"")
            })
            .collect()
    })
}

/// The page and its files, for merging into a router.
pub fn files() -> Router<AppState> {
    let mut router = Router::new();
    for (i, asset) in ASSETS.iter().enumerate() {
        router = router.route(
            asset.path,
            get(move |headers: HeaderMap| async move { serve(i, &headers) }),
        );
    }
    router.route(
        "/index.html",
        get(|headers: HeaderMap| async move { serve(0, &headers) }),
    )
}

fn serve(i: usize, headers: &HeaderMap) -> Response {
    let (asset, etag) = (&ASSETS[i], &etags()[i]);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        asset.body.into_response()
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    // Revalidate on every load: a new Harbor binary must never run with an old script.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    response
}

/// The router of `--gangway-listen`: the page, the public catalog, its event stream and the
/// status. Nothing here changes state, and nothing private is reachable.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(files())
        .route("/api/v1/catalog", get(super::services::catalog))
        .route("/api/v1/catalog/events", get(super::public::stream))
        .route("/api/v1/status", get(super::public::status))
        .fallback(not_here)
        .method_not_allowed_fallback(super::method_not_allowed)
        .with_state(state)
}

async fn not_here(State(_): State<AppState>, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!(
        "{} is not served here: this listener serves only Gangway and the public catalog",
        uri.path()
    ))
}
