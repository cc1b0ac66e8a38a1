//! A tiny authoritative DNS responder on loopback that answers `SRV` queries for
//! `<service>.svc.harbor.` with the service's live, healthy instances. Caddy's
//! `dynamic_upstreams` asks it, so an instance coming, going or failing its health check changes
//! where Caddy proxies without a config reload.
//!
//! - [`wire`]: the answers, in DNS's wire format;
//! - [`listen`]: the UDP and TCP listeners on one port, kept across restarts, and the drain at
//!   shutdown.
//!
//! Only what Caddy's resolver needs is implemented: one question per query; `SRV` answers whose
//! targets are short names for IPv4 addresses (`i7f000001.` for 127.0.0.1), and `A` answers for
//! those names (Caddy dials SRV targets by name, through the same resolver); `NXDOMAIN` for
//! unknown names, `NODATA` for other types.
//!
//! SRV targets are never compressed (RFC 2782; Go rejects them), so about 40 records fit the
//! 1,232 bytes Go's resolver accepts over UDP. Caddy dials its resolver over the configured
//! network only, so a truncated answer fails instead of retrying over TCP: services that need
//! every instance in one answer (hashing, first) are looked up over TCP, where an answer holds
//! about two thousand.
//!
//! `_a<n>.<service>.svc.harbor.` answers with a window of `n` instances that moves on by `n`
//! with every query, so successive answers tile the service and each instance is named equally
//! often: Caddy 2.6 provisions and releases every upstream of an answer on every request, so a
//! service of fifty instances costs it fifty times what one costs. The adapter asks for windows
//! for policies without affinity (round-robin, least-connections, random), where naming a
//! rotating subset on each refresh spreads requests as evenly as naming them all.
//!
//! While Harbor is down the lookups fail, and Caddy serves each service from the static list of
//! instances the adapter writes beside its dynamic source. At shutdown the responder first
//! answers every `SRV` query with `SERVFAIL` while still answering `A` queries for a moment, so
//! that Caddy's cached answers run out while the names in them still resolve.

mod listen;
mod wire;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::events::Event;
use crate::model::{Protocol, ServiceView};
use crate::registry::Registry;
use crate::routing::RoutingTable;

pub use listen::{Bound, bind, serve};
pub use wire::answer;

/// The zone Harbor answers for.
pub const ZONE: &str = "svc.harbor.";

/// One SRV record: the instance's address and weight.
type Record = (std::net::Ipv4Addr, u16, u16);

/// The instances of each service that the responder can name: those with an IPv4 address that
/// no health check holds out, sorted so that answers are stable.
#[derive(Default)]
pub struct Zone {
    table: ArcSwap<HashMap<String, Arc<Entry>>>,
    /// Set at shutdown: service lookups fail, so that Caddy turns to its static lists.
    draining: AtomicBool,
}

/// One service's records, and the order its windows go round them in.
struct Entry {
    /// Sorted, so that answers are stable.
    records: Vec<Record>,
    /// The same records in window order, starting where the next window starts: instances
    /// that just registered come first, so a window names a new instance in its next answer
    /// however big the service is; the rest keep the order they had.
    ring: Vec<Record>,
    /// How far the windows have gone round `ring`.
    turn: AtomicUsize,
}

impl Entry {
    /// The entry for `records`, going on from `old` (under churn the table is rebuilt more
    /// often than it is asked: windows that started over would name the first instances only).
    fn after(old: Option<&Entry>, records: Vec<Record>) -> Self {
        let ring = match old {
            None => records.clone(),
            Some(old) => {
                let had: std::collections::HashSet<&Record> = old.ring.iter().collect();
                let live: std::collections::HashSet<&Record> = records.iter().collect();
                let start = match old.ring.len() {
                    0 => 0,
                    len => old.turn.load(Ordering::Relaxed) % len,
                };
                let mut ring: Vec<Record> = records
                    .iter()
                    .filter(|r| !had.contains(r))
                    .copied()
                    .collect();
                let (done, next) = old.ring.split_at(start);
                ring.extend(next.iter().chain(done).filter(|r| live.contains(r)));
                ring
            }
        };
        Self {
            records,
            ring,
            turn: AtomicUsize::new(0),
        }
    }
}

impl Zone {
    /// Rebuilds the table from the registry's services, leaving out the upstreams that `routing`
    /// knows to be unhealthy (Caddy cannot run active checks on dynamic upstreams; Harbor does).
    pub fn sync(&self, services: &[ServiceView], routing: &RoutingTable) {
        let mut table = HashMap::with_capacity(services.len());
        for s in services {
            if s.route.protocol != Protocol::Http {
                continue;
            }
            let upstreams = s.upstream_addresses();
            let out: std::collections::HashSet<String> = routing
                .upstream_states(&s.name)
                .into_iter()
                .filter(|u| !u.healthy)
                .map(|u| u.address)
                .collect();
            let mut records: Vec<Record> = upstreams
                .iter()
                .filter(|(addr, _)| !out.contains(addr))
                .filter_map(|(addr, weight)| {
                    let addr: std::net::SocketAddrV4 = addr.parse().ok()?;
                    Some((
                        *addr.ip(),
                        addr.port(),
                        (*weight).min(u16::MAX as u32) as u16,
                    ))
                })
                .collect();
            records.sort_unstable();
            table.insert(format!("{}.{ZONE}", s.name), records);
        }
        self.install(table);
    }

    fn install(&self, records: HashMap<String, Vec<Record>>) {
        let old = self.table.load();
        let table = records
            .into_iter()
            .map(|(name, records)| {
                let entry = match old.get(&name) {
                    // Most services did not change: their windows go on as they were.
                    Some(e) if e.records == records => e.clone(),
                    e => Arc::new(Entry::after(e.map(|e| &**e), records)),
                };
                (name, entry)
            })
            .collect();
        self.table.store(Arc::new(table));
    }

    /// The records for `name`: a service, or its next window (`_a<n>.<service>...`).
    fn lookup(&self, name: &str) -> Option<Vec<Record>> {
        let table = self.table.load();
        if let Some(entry) = table.get(name) {
            return Some(entry.records.clone());
        }
        let (part, service) = name.split_once('.')?;
        let n: usize = part.strip_prefix("_a")?.parse().ok().filter(|&n| n > 0)?;
        let entry = table.get(service)?;
        if entry.records.len() <= n {
            return Some(entry.records.clone());
        }
        let ring = &entry.ring;
        let start = entry.turn.fetch_add(n, Ordering::Relaxed) % ring.len();
        Some(ring.iter().cycle().skip(start).take(n).copied().collect())
    }

    /// From now on service lookups fail (see the module's notes on shutdown).
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// Keeps the zone in step with the registry and with upstream health from event `cursor` on.
/// Unlike the proxy's configuration, instance changes are applied at once: they cost nothing
/// here.
pub async fn follow(
    zone: Arc<Zone>,
    registry: Arc<Registry>,
    routing: Arc<RoutingTable>,
    cursor: u64,
    cancel: CancellationToken,
) {
    let relevant = |e: &Event| e.changes_routing() || matches!(e, Event::UpstreamHealth { .. });
    crate::routing::on_changes(&registry, cursor, &cancel, relevant, |services| {
        zone.sync(services, &routing);
    })
    .await;
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::wire::tests::{answer_udp, ports, query, zone_with};
    use super::*;

    #[test]
    fn windows_rotate_through_a_service_evenly() {
        let zone = zone_with((0..30).map(|i| (9000 + i, 1)).collect());
        let mut named = HashMap::<u16, usize>::new();
        // Fifteen windows of eight cover the thirty instances four times over.
        for _ in 0..15 {
            let a = answer_udp(&query("_a8.web.svc.harbor.", 33), &zone).unwrap();
            let p = ports(&a);
            assert_eq!(p.len(), 8);
            for port in p {
                *named.entry(port).or_default() += 1;
            }
        }
        assert_eq!(named.len(), 30);
        assert!(named.values().all(|&n| n == 4), "{named:?}");

        // A rebuilt table (churn) goes on from where the window was, not from the first
        // instance, and names the instances that just came first.
        let window = || ports(&answer_udp(&query("_a8.web.svc.harbor.", 33), &zone).unwrap());
        let before = window();
        assert_eq!(before, (9000..9008).collect::<Vec<_>>());
        let rebuild = |ports: &mut dyn Iterator<Item = u16>| {
            let records = ports
                .map(|p| (std::net::Ipv4Addr::LOCALHOST, p, 1))
                .collect();
            zone.install(HashMap::from([(format!("web.{ZONE}"), records)]));
        };
        // 9008 and 9009 leave, 9100 comes.
        rebuild(&mut (9000..9008).chain(9010..9030).chain([9100]));
        assert_eq!(window(), [9100, 9010, 9011, 9012, 9013, 9014, 9015, 9016]);
        rebuild(&mut (9000..9008).chain(9010..9030).chain([9100]));
        assert_eq!(window(), [9017, 9018, 9019, 9020, 9021, 9022, 9023, 9024]);

        // A service no bigger than the window is named whole, every time.
        let small = zone_with((0..5).map(|i| (9000 + i, 1)).collect());
        for _ in 0..3 {
            let a = answer_udp(&query("_a8.web.svc.harbor.", 33), &small).unwrap();
            assert_eq!(ports(&a), (9000..9005).collect::<Vec<_>>());
        }
        for bad in [
            "_a0.web.svc.harbor.",
            "_ax.web.svc.harbor.",
            "_a8.nope.svc.harbor.",
        ] {
            let a = answer_udp(&query(bad, 33), &zone).unwrap();
            assert_eq!(a[3] & 0x0f, 3, "{bad}: NXDOMAIN");
        }
    }
}
