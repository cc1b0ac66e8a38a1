//! A tiny authoritative DNS responder on loopback that answers `SRV` queries for
//! `<service>.svc.harbor.` with the service's live, healthy instances. Caddy's
//! `dynamic_upstreams` asks it, so an instance coming, going or failing its health check changes
//! where Caddy proxies without a config reload.
//!
//! Only what Caddy's resolver needs is implemented: one question per query; `SRV` answers whose
//! targets are short names for IPv4 addresses (`i7f000001.` for 127.0.0.1), and `A` answers for
//! those names (Caddy dials SRV targets by name, through the same resolver); `NXDOMAIN` for
//! unknown names, `NODATA` for other types.
//!
//! SRV targets are never compressed (RFC 2782; Go rejects them), so about 40 records fit the
//! 1,232 bytes Go's resolver accepts, and Caddy dials its resolver over the configured network
//! only: a truncated answer makes the lookup fail instead of retrying over TCP. Services with
//! more instances are therefore split into partitions: `_<i>-<k>.<service>.svc.harbor.` answers
//! with every `k`-th instance starting at the `i`-th, and the Caddy adapter lists the `k` partitions
//! as one `multi` upstream source. An answer that still does not fit (a service that just grew,
//! before the adapter re-partitions it) carries the records that fit rather than none.
//!
//! `_a<n>.<service>.svc.harbor.` answers with a window of `n` instances that moves on by `n`
//! with every query, so successive answers tile the service and each instance is named equally
//! often: Caddy 2.6 provisions and releases every upstream of an answer on every request, so a
//! service of fifty instances costs it fifty times what one costs. The adapter asks for windows
//! for policies without affinity (round-robin, least-connections, random), where naming a
//! rotating subset on each refresh spreads requests as evenly as naming them all.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::events::Event;
use crate::model::{Protocol, ServiceView};
use crate::registry::Registry;
use crate::routing::RoutingTable;

/// The zone Harbor answers for.
pub const ZONE: &str = "svc.harbor.";

const TYPE_A: u16 = 1;
const TYPE_SRV: u16 = 33;
const CLASS_IN: u16 = 1;
/// Largest answer without EDNS (RFC 1035).
const PLAIN_UDP: usize = 512;

/// One SRV record: the instance's address and weight.
type Record = (std::net::Ipv4Addr, u16, u16);

/// The instances of each service that the responder can name: those with an IPv4 address that
/// no health check holds out, sorted so that partitions are stable.
#[derive(Default)]
pub struct Zone {
    table: ArcSwap<HashMap<String, Arc<Entry>>>,
}

/// One service's records, and the order its windows go round them in.
struct Entry {
    /// Sorted, so that partitions are stable.
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

    /// The records for `name`: a service, one partition of it (`_<i>-<k>.<service>...`) or its
    /// next window (`_a<n>.<service>...`).
    fn lookup(&self, name: &str) -> Option<Vec<Record>> {
        let table = self.table.load();
        if let Some(entry) = table.get(name) {
            return Some(entry.records.clone());
        }
        let (part, service) = name.split_once('.')?;
        let part = part.strip_prefix('_')?;
        let entry = table.get(service)?;
        let records = &entry.records;
        if let Some(n) = part.strip_prefix('a') {
            let n: usize = n.parse().ok().filter(|&n| n > 0)?;
            if records.len() <= n {
                return Some(records.clone());
            }
            let ring = &entry.ring;
            let start = entry.turn.fetch_add(n, Ordering::Relaxed) % ring.len();
            return Some(ring.iter().cycle().skip(start).take(n).copied().collect());
        }
        let (i, k) = part.split_once('-')?;
        let (i, k): (usize, usize) = (i.parse().ok()?, k.parse().ok()?);
        if i >= k {
            return None;
        }
        Some(records.iter().skip(i).step_by(k).copied().collect())
    }
}

/// The answer to one DNS query, or `None` for a packet that is not one.
pub fn answer(query: &[u8], zone: &Zone) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let qdcount = u16::from_be_bytes([query[4], query[5]]);
    if qdcount != 1 {
        return None;
    }
    // The question: labels, then type and class.
    let mut pos = 12;
    let mut name = String::new();
    loop {
        let len = *query.get(pos)? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        let label = query.get(pos..pos + len)?;
        name.push_str(&String::from_utf8_lossy(label).to_ascii_lowercase());
        name.push('.');
        pos += len;
    }
    let qtype = u16::from_be_bytes([*query.get(pos)?, *query.get(pos + 1)?]);
    let question_end = pos + 4;
    query.get(..question_end)?;
    let limit = edns_size(query, question_end).unwrap_or(PLAIN_UDP);

    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&query[0..2]);
    let rd = query[2] & 0x01;
    let host = host_ip(&name);
    let records = zone.lookup(&name);
    let known = records.is_some() || host.is_some();
    // NXDOMAIN inside the zone, REFUSED outside it.
    let rcode = match (known, name.ends_with(ZONE) || host.is_some()) {
        (true, _) => 0,
        (false, true) => 3,
        (false, false) => 5,
    };
    out.push(0x84 | rd); // QR, AA
    out.push(rcode);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // an, ns, ar: filled below
    out.extend_from_slice(&query[12..question_end]);
    let mut count = 0u16;
    if let (Some(ip), TYPE_A) = (host, qtype) {
        out.extend_from_slice(&[0xC0, 0x0C]);
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
        count = 1;
    }
    if let (Some(records), TYPE_SRV) = (records, qtype) {
        for (ip, port, weight) in records {
            let mut rr = Vec::with_capacity(32);
            rr.extend_from_slice(&[0xC0, 0x0C]); // the question's name
            rr.extend_from_slice(&TYPE_SRV.to_be_bytes());
            rr.extend_from_slice(&CLASS_IN.to_be_bytes());
            rr.extend_from_slice(&0u32.to_be_bytes()); // TTL 0: Caddy's refresh decides
            let label = host_label(ip);
            let mut target = vec![label.len() as u8];
            target.extend_from_slice(label.as_bytes());
            target.push(0);
            rr.extend_from_slice(&((6 + target.len()) as u16).to_be_bytes());
            rr.extend_from_slice(&0u16.to_be_bytes()); // priority
            rr.extend_from_slice(&weight.max(1).to_be_bytes());
            rr.extend_from_slice(&port.to_be_bytes());
            rr.extend_from_slice(&target);
            if out.len() + rr.len() > limit {
                // No TC bit: Caddy cannot retry over TCP (see the module's notes).
                break;
            }
            out.extend_from_slice(&rr);
            count += 1;
        }
    }
    out[6..8].copy_from_slice(&count.to_be_bytes());
    Some(out)
}

/// The name standing for `ip`: `i` and its eight hex digits (127.0.0.1 is `i7f000001`).
fn host_label(ip: std::net::Ipv4Addr) -> String {
    format!("i{:08x}", u32::from(ip))
}

/// The address an `i7f000001.` name stands for.
fn host_ip(name: &str) -> Option<std::net::Ipv4Addr> {
    let hex = name.strip_suffix('.')?.strip_prefix('i')?;
    if hex.len() != 8 {
        return None;
    }
    u32::from_str_radix(hex, 16)
        .ok()
        .map(std::net::Ipv4Addr::from)
}

/// The UDP size the client advertises in an EDNS OPT record, if it sent one.
fn edns_size(query: &[u8], question_end: usize) -> Option<usize> {
    let arcount = u16::from_be_bytes([query[10], query[11]]);
    if arcount == 0 {
        return None;
    }
    // An OPT record: root name (0), type 41, class = UDP size.
    let rest = query.get(question_end..)?;
    if rest.len() >= 5 && rest[0] == 0 && u16::from_be_bytes([rest[1], rest[2]]) == 41 {
        let size = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        return Some(size.clamp(PLAIN_UDP, 4096));
    }
    None
}

/// Answers queries on `socket` until cancelled.
pub async fn serve_udp(zone: Arc<Zone>, socket: UdpSocket, cancel: CancellationToken) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, from) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "DNS receive failed");
                    continue;
                }
            },
            () = cancel.cancelled() => return,
        };
        if let Some(reply) = answer(&buf[..len], &zone) {
            let _ = socket.send_to(&reply, from).await;
        }
    }
}

/// Where the responder listened last, in the state directory: Caddy's configuration names the
/// address, so a restart that binds the same one rewrites nothing.
const LAST_ADDRESS: &str = "dns-listen";

/// Binds the responder on `wanted` (`--dns-listen`; an address that cannot be bound is an
/// error), else where it listened last (kept in `state_dir`), else on a free loopback port. A
/// remembered address that is taken now is given up for a free port, with a warning: Caddy's
/// configuration is then rewritten once.
pub async fn bind(
    wanted: Option<SocketAddr>,
    state_dir: &Path,
) -> anyhow::Result<(UdpSocket, SocketAddr)> {
    let remembered = state_dir.join(LAST_ADDRESS);
    let socket = match wanted {
        Some(addr) => UdpSocket::bind(addr)
            .await
            .with_context(|| format!("cannot listen for DNS on {addr} (--dns-listen)"))?,
        None => {
            let last = std::fs::read_to_string(&remembered)
                .ok()
                .and_then(|text| text.trim().parse::<SocketAddr>().ok());
            match last {
                Some(addr) => match UdpSocket::bind(addr).await {
                    Ok(socket) => socket,
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "the DNS responder's last address is taken; Caddy's configuration will name a new one");
                        UdpSocket::bind("127.0.0.1:0").await?
                    }
                },
                None => UdpSocket::bind("127.0.0.1:0").await?,
            }
        }
    };
    let addr = socket.local_addr()?;
    remember(&remembered, addr)
        .with_context(|| format!("cannot keep the DNS address in {}", remembered.display()))?;
    Ok((socket, addr))
}

/// Writes `addr` to `file` whole or not at all.
fn remember(file: &Path, addr: SocketAddr) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let partial = file.with_extension("partial");
    std::fs::write(&partial, format!("{addr}\n"))?;
    std::fs::rename(&partial, file)
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
    use super::*;

    #[tokio::test]
    async fn the_responder_keeps_its_address_across_restarts_unless_it_is_taken() {
        let state = tempfile::tempdir().expect("a state dir");
        let (socket, first) = bind(None, state.path()).await.expect("bound");
        assert!(first.ip().is_loopback());
        drop(socket);
        let (socket, again) = bind(None, state.path()).await.expect("bound again");
        assert_eq!(again, first, "a restart binds where it listened last");

        // Something else holds the address now: another port, remembered in its place.
        let (_held, moved) = (socket, bind(None, state.path()).await.expect("bound"));
        let (_moved_socket, moved) = moved;
        assert_ne!(moved, first);
        let kept = std::fs::read_to_string(state.path().join(LAST_ADDRESS)).expect("kept");
        assert_eq!(kept.trim(), moved.to_string());

        // An address asked for is bound exactly, or refused with its name.
        let free = UdpSocket::bind("127.0.0.1:0").await.expect("a port");
        let wanted = free.local_addr().expect("addr");
        let err = bind(Some(wanted), state.path()).await.unwrap_err();
        assert!(format!("{err:#}").contains(&wanted.to_string()), "{err:#}");
        drop(free);
        let (_socket, got) = bind(Some(wanted), state.path()).await.expect("bound");
        assert_eq!(got, wanted);
    }

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.trim_end_matches('.').split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        q
    }

    fn zone_with(records: Vec<(u16, u16)>) -> Zone {
        let records = records
            .into_iter()
            .map(|(port, weight)| (std::net::Ipv4Addr::LOCALHOST, port, weight))
            .collect();
        let zone = Zone::default();
        zone.install(HashMap::from([(format!("web.{ZONE}"), records)]));
        zone
    }

    #[test]
    fn srv_answers_name_each_instance_port() {
        let zone = zone_with(vec![(9001, 1), (9002, 3)]);
        let a = answer(&query("web.svc.harbor.", TYPE_SRV), &zone).unwrap();
        assert_eq!(&a[0..2], &[0x12, 0x34]);
        assert_eq!(a[3] & 0x0f, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([a[6], a[7]]), 2);
        // The last record: priority, weight, port, then the uncompressed target.
        let tail = &a[a.len() - 17..];
        assert_eq!(&tail[2..4], &3u16.to_be_bytes());
        assert_eq!(&tail[4..6], &9002u16.to_be_bytes());
        assert_eq!(&tail[6..], b"\x09i7f000001\x00");
    }

    #[test]
    fn unknown_names_and_types() {
        let zone = zone_with(vec![(9001, 1)]);
        let a = answer(&query("nope.svc.harbor.", TYPE_SRV), &zone).unwrap();
        assert_eq!(a[3] & 0x0f, 3, "NXDOMAIN");
        let a = answer(&query("web.svc.harbor.", 1), &zone).unwrap();
        assert_eq!(a[3] & 0x0f, 0);
        assert_eq!(u16::from_be_bytes([a[6], a[7]]), 0, "NODATA");
        let a = answer(&query("i0a010203.", TYPE_A), &zone).unwrap();
        assert_eq!(u16::from_be_bytes([a[6], a[7]]), 1);
        assert_eq!(&a[a.len() - 4..], &[10, 1, 2, 3]);
        let a = answer(&query("example.com.", TYPE_A), &zone).unwrap();
        assert_eq!(a[3] & 0x0f, 5, "REFUSED");
        assert!(answer(&[1, 2, 3], &zone).is_none());
    }

    fn ports(a: &[u8]) -> Vec<u16> {
        // Each SRV record ends with priority, weight, port and the 11-byte target.
        let count = u16::from_be_bytes([a[6], a[7]]) as usize;
        (0..count)
            .map(|r| {
                let end = a.len() - r * 29;
                u16::from_be_bytes([a[end - 13], a[end - 12]])
            })
            .rev()
            .collect()
    }

    #[test]
    fn big_answers_carry_what_fits_the_udp_size() {
        let zone = zone_with((0..100).map(|i| (9000 + i, 1)).collect());
        let a = answer(&query("web.svc.harbor.", TYPE_SRV), &zone).unwrap();
        assert!(a.len() <= PLAIN_UDP);
        assert_eq!(a[2] & 0x02, 0, "no TC: Caddy cannot retry over TCP");
        assert_eq!(ports(&a), (9000..9000 + 16).collect::<Vec<_>>());
    }

    #[test]
    fn partitions_split_a_service() {
        let zone = zone_with((0..100).map(|i| (9000 + i, 1)).collect());
        let mut seen = Vec::new();
        for i in 0..3 {
            let a = answer(&query(&format!("_{i}-3.web.svc.harbor."), TYPE_SRV), &zone).unwrap();
            assert_eq!(a[3] & 0x0f, 0, "NOERROR");
            let p = ports(&a);
            assert!(p.len() >= 16, "partition {i}: {p:?}");
            seen.extend(p);
        }
        // Plain queries fit 16 records; each partition is a third of the service.
        let zone = zone_with((0..30).map(|i| (9000 + i, 1)).collect());
        seen.clear();
        for i in 0..3 {
            let a = answer(&query(&format!("_{i}-3.web.svc.harbor."), TYPE_SRV), &zone).unwrap();
            seen.extend(ports(&a));
        }
        seen.sort_unstable();
        assert_eq!(seen, (9000..9030).collect::<Vec<_>>());
        for bad in [
            "_3-3.web.svc.harbor.",
            "_0-0.web.svc.harbor.",
            "_0-2.nope.svc.harbor.",
        ] {
            let a = answer(&query(bad, TYPE_SRV), &zone).unwrap();
            assert_eq!(a[3] & 0x0f, 3, "{bad}: NXDOMAIN");
        }
    }

    #[test]
    fn windows_rotate_through_a_service_evenly() {
        let zone = zone_with((0..30).map(|i| (9000 + i, 1)).collect());
        let mut named = HashMap::<u16, usize>::new();
        // Fifteen windows of eight cover the thirty instances four times over.
        for _ in 0..15 {
            let a = answer(&query("_a8.web.svc.harbor.", TYPE_SRV), &zone).unwrap();
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
        let window = || ports(&answer(&query("_a8.web.svc.harbor.", TYPE_SRV), &zone).unwrap());
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
            let a = answer(&query("_a8.web.svc.harbor.", TYPE_SRV), &small).unwrap();
            assert_eq!(ports(&a), (9000..9005).collect::<Vec<_>>());
        }
        for bad in [
            "_a0.web.svc.harbor.",
            "_ax.web.svc.harbor.",
            "_a8.nope.svc.harbor.",
        ] {
            let a = answer(&query(bad, TYPE_SRV), &zone).unwrap();
            assert_eq!(a[3] & 0x0f, 3, "{bad}: NXDOMAIN");
        }
    }
}
