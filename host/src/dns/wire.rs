//! DNS answers in wire format (RFC 1035, SRV from RFC 2782): just what Caddy's resolver asks.

use super::{ZONE, Zone};

const TYPE_A: u16 = 1;
const TYPE_SRV: u16 = 33;
const CLASS_IN: u16 = 1;
/// Largest answer without EDNS (RFC 1035).
const PLAIN_UDP: usize = 512;

/// Which transport a query came over: it bounds the answer's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    Udp,
    Tcp,
}

/// The answer to one DNS query, or `None` for a packet that is not one.
pub fn answer(query: &[u8], zone: &Zone, over: Over) -> Option<Vec<u8>> {
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
    let limit = match over {
        Over::Udp => edns_size(query, question_end).unwrap_or(PLAIN_UDP),
        Over::Tcp => usize::from(u16::MAX),
    };

    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&query[0..2]);
    let rd = query[2] & 0x01;
    let host = host_ip(&name);
    let records = zone.lookup(&name);
    let known = records.is_some() || host.is_some();
    let draining = zone.draining() && qtype == TYPE_SRV;
    // NXDOMAIN inside the zone, REFUSED outside it; SERVFAIL for services while draining.
    let rcode = match (known, name.ends_with(ZONE) || host.is_some()) {
        _ if draining => 2,
        (true, _) => 0,
        (false, true) => 3,
        (false, false) => 5,
    };
    let records = records.filter(|_| !draining);
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
        for (order, (ip, port, weight)) in records.into_iter().enumerate() {
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
            // Each record a priority of its own: Go sorts SRV answers by priority and shuffles
            // records of equal priority by weight, so equal priorities would reorder every
            // answer, and Caddy's round-robin, retrying after a refresh, could land on the
            // same dead instance again.
            rr.extend_from_slice(&u16::try_from(order).unwrap_or(u16::MAX).to_be_bytes());
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

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use super::*;

    pub(crate) fn query(name: &str, qtype: u16) -> Vec<u8> {
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

    pub(crate) fn zone_with(records: Vec<(u16, u16)>) -> Zone {
        let records = records
            .into_iter()
            .map(|(port, weight)| (std::net::Ipv4Addr::LOCALHOST, port, weight))
            .collect();
        let zone = Zone::default();
        zone.install(HashMap::from([(format!("web.{ZONE}"), records)]));
        zone
    }

    pub(crate) fn answer_udp(query: &[u8], zone: &Zone) -> Option<Vec<u8>> {
        answer(query, zone, Over::Udp)
    }

    pub(crate) fn ports(a: &[u8]) -> Vec<u16> {
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
    fn srv_answers_name_each_instance_port() {
        let zone = zone_with(vec![(9001, 1), (9002, 3)]);
        let a = answer_udp(&query("web.svc.harbor.", TYPE_SRV), &zone).unwrap();
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
        let a = answer_udp(&query("nope.svc.harbor.", TYPE_SRV), &zone).unwrap();
        assert_eq!(a[3] & 0x0f, 3, "NXDOMAIN");
        let a = answer_udp(&query("web.svc.harbor.", 1), &zone).unwrap();
        assert_eq!(a[3] & 0x0f, 0);
        assert_eq!(u16::from_be_bytes([a[6], a[7]]), 0, "NODATA");
        let a = answer_udp(&query("i0a010203.", TYPE_A), &zone).unwrap();
        assert_eq!(u16::from_be_bytes([a[6], a[7]]), 1);
        assert_eq!(&a[a.len() - 4..], &[10, 1, 2, 3]);
        let a = answer_udp(&query("example.com.", TYPE_A), &zone).unwrap();
        assert_eq!(a[3] & 0x0f, 5, "REFUSED");
        assert!(answer_udp(&[1, 2, 3], &zone).is_none());
    }

    #[test]
    fn big_answers_carry_what_fits_the_udp_size() {
        let zone = zone_with((0..100).map(|i| (9000 + i, 1)).collect());
        let a = answer_udp(&query("web.svc.harbor.", TYPE_SRV), &zone).unwrap();
        assert!(a.len() <= PLAIN_UDP);
        assert_eq!(a[2] & 0x02, 0, "no TC: Caddy cannot retry over TCP");
        assert_eq!(ports(&a), (9000..9000 + 16).collect::<Vec<_>>());
        let whole = answer(&query("web.svc.harbor.", TYPE_SRV), &zone, Over::Tcp).unwrap();
        assert_eq!(
            ports(&whole),
            (9000..9100).collect::<Vec<_>>(),
            "TCP holds them all"
        );
    }

    #[test]
    fn a_draining_zone_fails_service_lookups_but_still_names_hosts() {
        let zone = zone_with(vec![(9001, 1)]);
        zone.drain();
        for name in ["web.svc.harbor.", "_a4.web.svc.harbor."] {
            let a = answer_udp(&query(name, TYPE_SRV), &zone).unwrap();
            assert_eq!(a[3] & 0x0f, 2, "{name}: SERVFAIL");
            assert_eq!(u16::from_be_bytes([a[6], a[7]]), 0);
        }
        let a = answer_udp(&query("i7f000001.", TYPE_A), &zone).unwrap();
        assert_eq!(a[3] & 0x0f, 0);
        assert_eq!(&a[a.len() - 4..], &[127, 0, 0, 1]);
    }
}
