//! Upstream health: active checks per route (a TCP connect, or `GET path` expecting a status)
//! with rise / fall thresholds, and the passive cooldown after a failed connect. Either takes an
//! upstream out of its balancer's healthy set; every change is an event and a gauge.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::events::Event;
use crate::model::{HealthCheck, ServiceName};
use crate::routing::ServiceRoute;

use super::Shared;

/// Publishes an upstream's new health.
pub fn changed(shared: &Shared, route: &ServiceRoute, address: &str, healthy: bool) {
    let set = route.balancer.refresh_health();
    let now_healthy = set
        .backends
        .iter()
        .find(|b| b.address == address)
        .is_some_and(|b| b.healthy);
    shared
        .metrics
        .upstream(route.name.as_str(), address)
        .healthy
        .set(i64::from(now_healthy));
    if healthy {
        tracing::info!(service = %route.name, upstream = address, "upstream is back");
    } else {
        tracing::warn!(service = %route.name, upstream = address, "upstream taken out");
    }
    shared.bus.publish(Event::UpstreamHealth {
        name: route.name.clone(),
        upstream: address.to_owned(),
        healthy: now_healthy,
    });
}

/// An upstream refused a connection: it is out for the cooldown, then back unless a health check
/// still holds it out.
pub fn cooling(shared: &Arc<Shared>, route: &ServiceRoute, address: &str) {
    changed(shared, route, address, false);
    let (shared, address) = (shared.clone(), address.to_owned());
    let cooldown = shared.settings.cooldown;
    let name = route.name.clone();
    tokio::spawn(async move {
        tokio::time::sleep(cooldown + Duration::from_millis(1)).await;
        // The route may have changed meanwhile; act on the one in force now.
        let Some(route) = shared.routing.snapshot().services.get(&name).cloned() else {
            return;
        };
        let set = route.balancer.backends();
        let Some(i) = set.backends.iter().position(|b| b.address == address) else {
            return;
        };
        let up = set.loads.get(i).is_some_and(|l| l.is_up());
        if up && !set.backends[i].healthy {
            changed(&shared, &route, &address, true);
        }
    });
}

/// Keeps one checker task per (service, upstream) of every route that has a health check.
pub async fn supervise(shared: Arc<Shared>, stop: CancellationToken) {
    let mut changes = shared.routing.subscribe();
    let mut running: HashMap<(ServiceName, String), (HealthCheck, CancellationToken)> =
        HashMap::new();
    loop {
        changes.borrow_and_update();
        let snapshot = shared.routing.snapshot();
        let mut wanted = HashMap::new();
        for route in snapshot.services.values() {
            let Some(check) = &route.options.health else {
                continue;
            };
            for backend in &route.balancer.backends().backends {
                wanted.insert((route.name.clone(), backend.address.clone()), check.clone());
            }
        }
        running.retain(|key, (check, token)| {
            let keep = wanted.get(key) == Some(check);
            if !keep {
                token.cancel();
            }
            keep
        });
        for (key, check) in wanted {
            if running.contains_key(&key) {
                continue;
            }
            let token = stop.child_token();
            tokio::spawn(check_loop(
                shared.clone(),
                key.0.clone(),
                key.1.clone(),
                check.clone(),
                token.clone(),
            ));
            running.insert(key, (check, token));
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            () = stop.cancelled() => break,
        }
    }
    for (_, token) in running.into_values() {
        token.cancel();
    }
}

async fn check_loop(
    shared: Arc<Shared>,
    name: ServiceName,
    address: String,
    check: HealthCheck,
    stop: CancellationToken,
) {
    let (mut passes, mut fails) = (0u32, 0u32);
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        let verdict = probe(&address, &check).await;
        let Some(route) = shared.routing.snapshot().services.get(&name).cloned() else {
            return;
        };
        let set = route.balancer.backends();
        let Some(load) = set
            .backends
            .iter()
            .position(|b| b.address == address)
            .and_then(|i| set.loads.get(i).cloned())
        else {
            return;
        };
        match verdict {
            Ok(()) => {
                fails = 0;
                passes = passes.saturating_add(1);
                if passes >= check.rise && load.set_checked(true) {
                    changed(&shared, &route, &address, true);
                }
            }
            Err(why) => {
                passes = 0;
                fails = fails.saturating_add(1);
                tracing::debug!(service = %name, upstream = %address, error = %why, "health check failed");
                if fails >= check.fall && load.set_checked(false) {
                    tracing::warn!(service = %name, upstream = %address, error = %why, "health check failed {fails} times");
                    changed(&shared, &route, &address, false);
                }
            }
        }
    }
}

/// One check of one upstream.
pub async fn probe(address: &str, check: &HealthCheck) -> Result<(), String> {
    let attempt = async {
        let stream = TcpStream::connect(address)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let Some(path) = &check.path else {
            return Ok(());
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let request = http::Request::get(path.as_str())
            .header(http::header::HOST, address)
            .header(http::header::USER_AGENT, "harbor-health-check")
            .header(http::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status().as_u16();
        let ok = match check.status {
            Some(want) => status == want,
            None => (200..400).contains(&status),
        };
        if ok {
            Ok(())
        } else {
            Err(format!("GET {path} answered {status}"))
        }
    };
    tokio::time::timeout(check.timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer within {}",
                humantime::format_duration(check.timeout)
            ))
        })
}
