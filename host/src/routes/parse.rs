//! Parsing one `.route` file: TOML, one service per file, named by the file. Every error names the
//! file, the line and column, and the field.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};
use toml::Spanned;

use crate::events::RouteFileError;
use crate::model::{
    FieldError, HashKey, HealthInput, HostName, HstsInput, Meta, Protocol, Route, RouteInput,
    RouteOptions, ServiceName, StrategySettings, Tls, TlsInput, Upstream, UpstreamAddr, check_meta,
    check_weight,
};
use crate::registry::{ParsedRoute, StaticSpec};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    host: Option<Spanned<String>>,
    hosts: Option<Spanned<Vec<String>>>,
    path: Option<Spanned<String>>,
    upstreams: Option<Spanned<Vec<Spanned<RawUpstream>>>>,
    public: Option<Spanned<bool>>,
    strategy: Option<Spanned<String>>,
    strategy_settings: Option<Spanned<toml::Table>>,
    protocol: Option<Spanned<Protocol>>,
    listen: Option<Spanned<String>>,
    meta: Option<Spanned<Meta>>,
    upstream_host: Option<Spanned<String>>,
    health: Option<Spanned<HealthInput>>,
    max_connections: Option<Spanned<u32>>,
    hash_key: Option<Spanned<String>>,
    tls: Option<Spanned<TlsInput>>,
    redirect_http: Option<Spanned<bool>>,
    hsts: Option<Spanned<HstsInput>>,
}

/// An upstream is either `"host:port"` or `{ addr = "host:port", weight = 2, labels = { … } }`.
struct RawUpstream {
    addr: String,
    weight: Option<u32>,
    labels: Option<Meta>,
}

impl<'de> Deserialize<'de> for RawUpstream {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            addr: String,
            weight: Option<u32>,
            labels: Option<Meta>,
        }
        struct UpstreamVisitor;
        impl<'de> Visitor<'de> for UpstreamVisitor {
            type Value = RawUpstream;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#""host:port" or { addr = "host:port", weight = N, labels = { … } }"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawUpstream, E> {
                Ok(RawUpstream {
                    addr: v.to_owned(),
                    weight: None,
                    labels: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawUpstream, A::Error> {
                let t = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawUpstream {
                    addr: t.addr,
                    weight: t.weight,
                    labels: t.labels,
                })
            }
        }
        d.deserialize_any(UpstreamVisitor)
    }
}

/// The TLS settings of a route file, checked against its protocol.
fn tls_of(raw: &RawRoute, route: &Route) -> Result<Tls, FieldError> {
    let tls = Tls::parse(
        raw.tls.as_ref().map(Spanned::get_ref),
        raw.redirect_http.as_ref().map(|r| *r.get_ref()),
        raw.hsts.as_ref().map(Spanned::get_ref),
    )?;
    Route {
        tls: tls.clone(),
        ..route.clone()
    }
    .check_tls()?;
    Ok(tls)
}

/// The proxy options of a route file, checked against its protocol.
fn options(raw: &RawRoute, route: &Route) -> Result<RouteOptions, FieldError> {
    let tcp = route.protocol() != Protocol::Http;
    let upstream_host = match &raw.upstream_host {
        Some(_) if tcp => {
            return Err(FieldError::new(
                "upstream_host",
                "upstream_host sets the Host header of HTTP requests; a tcp route has none",
            ));
        }
        Some(h) => Some(
            HostName::parse(h.get_ref()).map_err(|e| FieldError::new("upstream_host", e.reason))?,
        ),
        None => None,
    };
    let max_connections = match &raw.max_connections {
        Some(_) if !tcp => {
            return Err(FieldError::new(
                "max_connections",
                "max_connections caps a tcp route's connections; set protocol = \"tcp\" or remove it",
            ));
        }
        Some(_) if route.protocol() == Protocol::TlsPassthrough => {
            return Err(FieldError::new(
                "max_connections",
                "max_connections caps one service's listener; tls-passthrough services share theirs, under --max-connections",
            ));
        }
        Some(n) if *n.get_ref() == 0 => {
            return Err(FieldError::new(
                "max_connections",
                "max_connections must be at least 1",
            ));
        }
        Some(n) => Some(*n.get_ref()),
        None => None,
    };
    let health = raw
        .health
        .as_ref()
        .map(|h| h.get_ref().validate())
        .transpose()?;
    let hash_key = match &raw.hash_key {
        Some(key) => match HashKey::parse(key.get_ref())? {
            HashKey::ClientIp => HashKey::ClientIp,
            _ if tcp => {
                return Err(FieldError::new(
                    "hash_key",
                    "a tcp route has no headers or cookies; its hash key is the client's address",
                ));
            }
            key => key,
        },
        None => HashKey::ClientIp,
    };
    Ok(RouteOptions {
        upstream_host,
        health,
        max_connections,
        hash_key,
    })
}

/// Where in the text a byte offset stands, 1-based.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// Parses a route file's text. `name` comes from the file name.
pub fn parse_route(
    file: &str,
    name: &ServiceName,
    text: &str,
) -> Result<ParsedRoute, RouteFileError> {
    let error_at = |span: Option<Range<usize>>, field: Option<&str>, reason: String| {
        let (line, column) = span.map(|s| line_col(text, s.start)).unzip();
        RouteFileError {
            file: file.to_owned(),
            line,
            column,
            field: field.map(str::to_owned),
            reason,
        }
    };
    let raw: RawRoute = toml::from_str(text)
        .map_err(|e| error_at(e.span(), None, e.message().trim_end().to_owned()))?;

    let mut positions = HashMap::new();
    let mut spans: HashMap<&'static str, Range<usize>> = HashMap::new();
    macro_rules! note {
        ($($field:ident),*) => {$(
            if let Some(v) = &raw.$field {
                spans.insert(stringify!($field), v.span());
                positions.insert(stringify!($field), line_col(text, v.span().start));
            }
        )*};
    }
    note!(
        host,
        hosts,
        path,
        upstreams,
        public,
        strategy,
        strategy_settings,
        protocol,
        listen,
        meta,
        upstream_host,
        health,
        max_connections,
        hash_key,
        tls,
        redirect_http,
        hsts
    );
    let at_field = |e: FieldError| {
        let span = spans.get(e.field.as_str()).cloned();
        error_at(span, Some(&e.field), e.reason)
    };

    let mut route = RouteInput {
        name,
        host: raw.host.as_ref().map(|s| s.get_ref().as_str()),
        hosts: raw.hosts.as_ref().map(|s| s.get_ref().as_slice()),
        path: raw.path.as_ref().map(|s| s.get_ref().as_str()),
        protocol: raw.protocol.as_ref().map(|s| *s.get_ref()),
        listen: raw.listen.as_ref().map(|s| s.get_ref().as_str()),
        strategy: raw.strategy.as_ref().map(|s| s.get_ref().as_str()),
        public: raw.public.as_ref().map(|s| *s.get_ref()),
    }
    .validate()
    .map_err(at_field)?;
    route.options = options(&raw, &route).map_err(at_field)?;
    route.tls = tls_of(&raw, &route).map_err(at_field)?;
    if let Some(table) = &raw.strategy_settings {
        route.strategy_settings = StrategySettings::from_toml(table.get_ref()).map_err(at_field)?;
    }

    let Some(list) = raw.upstreams else {
        return Err(error_at(
            None,
            Some("upstreams"),
            "a route needs upstreams, e.g. upstreams = [\"127.0.0.1:3000\"]".to_owned(),
        ));
    };
    let list_span = list.span();
    let list = list.into_inner();
    if list.is_empty() {
        return Err(error_at(
            Some(list_span),
            Some("upstreams"),
            "upstreams is empty; a route needs at least one".to_owned(),
        ));
    }
    let mut seen = HashSet::new();
    let mut upstreams = Vec::with_capacity(list.len());
    for item in list {
        let span = item.span();
        let raw = item.into_inner();
        let addr = UpstreamAddr::parse(&raw.addr)
            .map_err(|e| error_at(Some(span.clone()), Some("upstreams"), e.reason))?;
        let weight = check_weight(raw.weight.unwrap_or(1))
            .map_err(|e| error_at(Some(span.clone()), Some("upstreams"), e.reason))?;
        let labels = raw.labels.unwrap_or_default();
        check_meta(&labels).map_err(|e| {
            let reason = e.reason.replacen("meta", "labels", 1);
            error_at(Some(span.clone()), Some("upstreams"), reason)
        })?;
        if !seen.insert(addr.clone()) {
            return Err(error_at(
                Some(span),
                Some("upstreams"),
                format!("upstream {addr} is listed twice"),
            ));
        }
        upstreams.push(Upstream {
            addr,
            weight,
            labels,
        });
    }

    let meta: BTreeMap<String, String> = raw.meta.map(Spanned::into_inner).unwrap_or_default();
    check_meta(&meta).map_err(at_field)?;
    Ok(ParsedRoute {
        spec: StaticSpec {
            route,
            upstreams,
            meta,
        },
        positions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Match;

    fn parse(text: &str) -> Result<ParsedRoute, RouteFileError> {
        parse_route("web.route", &ServiceName::parse("web").unwrap(), text)
    }

    #[test]
    fn full_http_route() {
        let p = parse(
            r#"
host = "grafana.localhost"
path = "/app"
upstreams = ["127.0.0.1:3000", { addr = "127.0.0.1:3001", weight = 3, labels = { zone = "b" } }]
public = true
strategy = "least-connections"
meta = { team = "ops" }
"#,
        )
        .unwrap();
        let Match::Http { hosts, path } = &p.spec.route.matcher else {
            panic!("not http")
        };
        assert_eq!(hosts[0].as_str(), "grafana.localhost");
        assert_eq!(path.as_str(), "/app");
        assert_eq!(p.spec.upstreams[1].weight, 3);
        assert!(p.spec.upstreams[0].labels.is_empty());
        assert_eq!(p.spec.upstreams[1].labels["zone"], "b");
        assert!(p.spec.route.public);
        assert_eq!(p.spec.route.strategy.as_str(), "least-connections");
        assert_eq!(p.spec.meta["team"], "ops");
        assert_eq!(p.positions["path"], (3, 8));
    }

    #[test]
    fn tcp_route() {
        let p = parse(
            "protocol = \"tcp\"\nlisten = \"127.0.0.1:15432\"\nupstreams = [\"127.0.0.1:5432\"]\n",
        )
        .unwrap();
        assert_eq!(
            p.spec.route.matcher,
            Match::Tcp {
                listen: "127.0.0.1:15432".parse().unwrap(),
                hosts: Vec::new(),
                passthrough: false,
            }
        );
        let p = parse(
            "protocol = \"tls-passthrough\"\nlisten = \"127.0.0.1:8443\"\nhost = \"a.test\"\nupstreams = [\"127.0.0.1:9443\"]\n",
        )
        .unwrap();
        assert_eq!(p.spec.route.protocol(), Protocol::TlsPassthrough);
        // Passthrough leaves TLS to the upstream: it takes no tls setting.
        let err = parse(
            "protocol = \"tls-passthrough\"\nlisten = \"127.0.0.1:8443\"\nhost = \"a.test\"\nupstreams = [\"127.0.0.1:9443\"]\ntls = \"internal\"\n",
        )
        .unwrap_err();
        assert_eq!(err.field.as_deref(), Some("tls"), "{err:?}");
    }

    #[test]
    fn errors_name_line_and_field() {
        let cases = [
            ("upstreams = [\"127.0.0.1:1\"]\nhost = \n", 2, None),
            ("upstreams = [\"127.0.0.1:1\"]\ncolour = \"red\"\n", 2, None),
            (
                "host = \"a.com\"\n\nupstreams = [\"127.0.0.1\"]\n",
                3,
                Some("upstreams"),
            ),
            (
                "upstreams = [\"127.0.0.1:1\"]\nhost = \"bad host\"\n",
                2,
                Some("host"),
            ),
            (
                "upstreams = [\"127.0.0.1:1\"]\nprotocol = \"udp\"\n",
                2,
                None,
            ),
            (
                "upstreams = [{ addr = \"127.0.0.1:1\", labels = { \"\" = \"a\" } }]\n",
                1,
                Some("upstreams"),
            ),
            (
                "upstreams = [{ addr = \"127.0.0.1:1\", weight = 0 }]\n",
                1,
                Some("upstreams"),
            ),
            (
                "upstreams = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n",
                1,
                Some("upstreams"),
            ),
            (
                "protocol = \"tcp\"\nlisten = \"nowhere\"\nupstreams = [\"127.0.0.1:1\"]\n",
                2,
                Some("listen"),
            ),
            (
                "protocol = \"tcp\"\nlisten = \"127.0.0.1:9\"\nupstreams = [\"127.0.0.1:1\"]\nhash_key = \"header:x\"\n",
                4,
                Some("hash_key"),
            ),
            (
                "upstreams = [\"127.0.0.1:1\"]\nhash_key = \"ip\"\n",
                2,
                Some("hash_key"),
            ),
        ];
        for (text, line, field) in cases {
            let err = parse(text).unwrap_err();
            assert_eq!(err.line, Some(line), "{text:?}: {err}");
            assert_eq!(err.field.as_deref(), field, "{text:?}: {err}");
            assert_eq!(err.file, "web.route");
            assert!(!err.reason.is_empty());
        }
        let missing = parse("host = \"a.com\"\n").unwrap_err();
        assert_eq!(missing.field.as_deref(), Some("upstreams"));
    }

    #[test]
    fn unknown_field_is_named() {
        let err = parse("upstreams = [\"127.0.0.1:1\"]\ncolour = \"red\"\n").unwrap_err();
        assert!(err.reason.contains("colour"), "{err}");
    }
}
