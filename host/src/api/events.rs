//! `GET /api/v1/events`: the event bus as Server-Sent Events. A new stream starts with a snapshot;
//! a stream resumed with `Last-Event-ID` gets what it missed, or a fresh snapshot if the ring no
//! longer holds it.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::AppState;
use crate::events::{Envelope, EventBus, Follower, Since};
use crate::registry::Registry;

pub async fn stream(
    State(app): State<AppState>,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let reader = Reader {
        events: resume.map(|cursor| Follower::new(app.registry.bus().clone(), cursor)),
        registry: app.registry.clone(),
        pending: VecDeque::new(),
        cancel: app.cancel.clone(),
    };
    let events = futures_util::stream::unfold(reader, |mut r| async move {
        let event = r.next().await?;
        Some((Ok(event), r))
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(app.sse_keep_alive))
}

struct Reader {
    registry: Arc<Registry>,
    /// Where this client is in the registry's events; `None`: it needs a snapshot.
    events: Option<Follower<EventBus>>,
    pending: VecDeque<Arc<Envelope>>,
    cancel: CancellationToken,
}

impl Reader {
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(env) = self.pending.pop_front() {
                return Some(
                    SseEvent::default()
                        .id(env.id.to_string())
                        .event(env.event.kind())
                        .data(env.json()),
                );
            }
            let Some(events) = &mut self.events else {
                let snap = self.registry.snapshot();
                let bus = self.registry.bus().clone();
                self.events = Some(Follower::new(bus, snap.last_event_id));
                let data = json!({
                    "type": "snapshot",
                    "services": snap.services,
                    "route_errors": snap.route_errors,
                    "state": snap.state,
                });
                return Some(
                    SseEvent::default()
                        .id(snap.last_event_id.to_string())
                        .event("snapshot")
                        .data(data.to_string()),
                );
            };
            match events.next(&self.cancel).await? {
                Since::Events(events) => self.pending.extend(events),
                Since::Gap => self.events = None,
            }
        }
    }
}
