//! Gangway's endpoints over the public view ([`crate::public`]): the status strip, and the
//! public services as Server-Sent Events, snapshot first, resumable.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use serde_json::{Value, json};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use super::{App, AppState};
use crate::events::{Follower, Since};
use crate::public::{PublicEvent, PublicView};

/// How long a browser waits before reconnecting a dropped stream (the SSE `retry` field).
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// What the status strip shows, for the status endpoint and the snapshot.
pub fn status_of(app: &App) -> Value {
    let now = SystemTime::now();
    let uptime = now.duration_since(app.started_at).unwrap_or_default();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "backend": app
            .dispatcher
            .as_ref()
            .map_or_else(|| app.backend.to_string(), |d| d.proxy_in_force()),
        // Whether the driven proxy matches the desired state; `null` for the embedded
        // proxy, which is the desired state.
        "in_sync": app.dispatcher.as_ref().map(|d| d.status().in_sync),
        "plugins": app.strategies.names().len(),
        "started_at": crate::model::timestamp(app.started_at),
        "uptime_secs": uptime.as_secs(),
        "server_time_ms": now.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        // Where links to services point: the embedded proxy's port, or the driven proxy's.
        "proxy_port": app
            .dispatcher
            .as_ref()
            .map_or_else(|| app.public.proxy_port(), |d| Some(d.proxy_port())),
        // Whether registrations are being saved; why not, with paths, only on the operator's API.
        "state_writable": app.registry.state_condition().write_error.is_none(),
        // How many services lack the certificate they ask for; `null` without a TLS listener.
        // Which and why, only on the operator's API.
        "https": app.certificates.as_ref().map(|c| json!({"problems": c.problems().len()})),
    })
}

/// `GET /api/v1/status` on Gangway's listener: what the status strip shows.
pub async fn status(State(app): State<AppState>) -> impl IntoResponse {
    Json(status_of(&app))
}

/// `GET /api/v1/status` on the API: the same, and how the saved state stands (a failure to
/// save, a state file set aside at start), with reasons.
pub async fn operator_status(State(app): State<AppState>) -> impl IntoResponse {
    let mut body = status_of(&app);
    body["state"] = json!(app.registry.state_condition());
    if let Some(certificates) = &app.certificates {
        body["tls"] = json!({"problems": certificates.problems()});
    }
    Json(body)
}

/// `GET /api/v1/tls/ca.pem`: the local CA's root certificate, for clients to trust what
/// `tls = "internal"` serves.
pub async fn ca_pem(State(app): State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    match app.certificates.as_ref().and_then(|c| c.ca_pem()) {
        Some(pem) => (
            [(axum::http::header::CONTENT_TYPE, "application/x-pem-file")],
            pem.to_owned(),
        )
            .into_response(),
        None => super::error::ApiError::not_found(
            "no local CA: Harbor serves HTTPS only with --tls-listen",
        )
        .into_response(),
    }
}

/// `GET /.well-known/acme-challenge/{token}`: the key authorization of an ACME HTTP-01
/// challenge Harbor has open, for a proxy that forwards the CA's request here (Envoy). Public,
/// as the CA fetches it: it is what the plain listener would answer anyone.
pub async fn acme_challenge(
    State(app): State<AppState>,
    axum::extract::Path(token): axum::extract::Path<String>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match app
        .certificates
        .as_ref()
        .and_then(|c| c.acme_challenge(&token))
    {
        Some(answer) => (
            [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
            answer,
        )
            .into_response(),
        None => super::error::ApiError::not_found("no open ACME challenge has this token")
            .into_response(),
    }
}

/// `GET /api/v1/catalog/events`: the public view as Server-Sent Events, snapshot first. A client
/// resumes with the `Last-Event-ID` header (what `EventSource` sends by itself) or, when it had
/// to open a new `EventSource`, with `?last_event_id=`; the header wins, being the newer.
pub async fn stream(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let from_query = resume_param(query.as_deref())?;
    let from_header = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let resume = from_header.or(from_query);
    let reader = Reader {
        events: resume.map(|cursor| Follower::new(app.public.clone(), cursor)),
        pending: VecDeque::new(),
        cancel: app.cancel.clone(),
        app: app.clone(),
        retry_sent: false,
    };
    let events = futures_util::stream::unfold(reader, |mut r| async move {
        let event = r.next().await?;
        Some((Ok(event), r))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(app.sse_keep_alive)))
}

fn resume_param(query: Option<&str>) -> Result<Option<u64>, ApiError> {
    let mut resume = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != "last_event_id" {
            return Err(ApiError::bad_request(
                Some(key.to_owned()),
                format!("unknown query parameter {key:?}; this stream takes only last_event_id"),
            ));
        }
        let id = value.parse::<u64>().map_err(|_| {
            ApiError::bad_request(
                Some("last_event_id".into()),
                format!("{value:?} is not an event id (a whole number)"),
            )
        })?;
        resume = Some(id);
    }
    Ok(resume)
}

struct Reader {
    app: AppState,
    /// Where this client is in the public events; `None`: it needs a snapshot.
    events: Option<Follower<PublicView>>,
    pending: VecDeque<Arc<PublicEvent>>,
    cancel: CancellationToken,
    retry_sent: bool,
}

impl Reader {
    /// The first event of a stream tells the browser how soon to reconnect: a resumed stream
    /// may start without a snapshot, and a new `EventSource` has forgotten the old value.
    fn with_retry(&mut self, event: SseEvent) -> SseEvent {
        if std::mem::replace(&mut self.retry_sent, true) {
            event
        } else {
            event.retry(RECONNECT_AFTER)
        }
    }

    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                let sse = SseEvent::default()
                    .id(event.id.to_string())
                    .event(event.kind)
                    .data(event.data.as_str());
                return Some(self.with_retry(sse));
            }
            let Some(events) = &mut self.events else {
                let (id, services) = self.app.public.snapshot();
                self.events = Some(Follower::new(self.app.public.clone(), id));
                let data = json!({
                    "type": "snapshot",
                    "services": services,
                    "status": status_of(&self.app),
                });
                let sse = SseEvent::default()
                    .id(id.to_string())
                    .event("snapshot")
                    .data(data.to_string());
                return Some(self.with_retry(sse));
            };
            match events.next(&self.cancel).await? {
                Since::Events(events) => self.pending.extend(events),
                Since::Gap => self.events = None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resume_parameter_is_checked() {
        assert_eq!(resume_param(None).unwrap(), None);
        assert_eq!(resume_param(Some("last_event_id=42")).unwrap(), Some(42));
        let err = resume_param(Some("last_event_id=abc")).unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::BAD_REQUEST);
        assert!(resume_param(Some("since=1")).is_err());
    }
}
