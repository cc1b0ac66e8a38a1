//! HTTPS through a real Envoy: Harbor obtains the certificates and hands them to Envoy as
//! file-based SDS secrets, an HTTPS listener on `--tls-listen` picks them by SNI, a renewal
//! rewrites only the secret file, TLS passthrough routes by SNI, and a swap between Caddy and
//! Envoy keeps HTTPS serving with the same root.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::common::certs::{
    Pebble, TestCa, curl_https, free_port, route_with_files, served_certificate,
    tcp_tls_is_terminated, tls_says, tls_upstream,
};
use crate::common::proxies::{Caddy, Envoy, Release, Upstream, plain_get};
use crate::common::{self, TestHarbor, eventually};
use harbor::config::BackendKind;

/// An Envoy driven by a Harbor with HTTPS, and the HTTPS port; none when Envoy is not
/// installed and not required.
async fn envoy_with_https() -> Option<(Envoy, TestHarbor, u16)> {
    let mut envoy = Envoy::prepare()?;
    let tls_port = free_port();
    let tls = SocketAddr::from(([127, 0, 0, 1], tls_port));
    let h = harbor_then_envoy_with(&mut envoy, tls, |_| {}).await;
    Some((envoy, h, tls_port))
}

/// A Harbor driving `envoy` with HTTPS on `tls` and `more` settings, and Envoy started once
/// Harbor has written its first files.
async fn harbor_then_envoy_with(
    envoy: &mut Envoy,
    tls: SocketAddr,
    more: impl Fn(&mut harbor::config::Config) + Send + Sync + 'static,
) -> TestHarbor {
    let admin: harbor::config::BaseUrl = envoy.admin_url().parse().unwrap();
    let (dir, listen) = (envoy.xds.clone(), envoy.listen_addr());
    let h = common::start_with(move |c| {
        c.backend = BackendKind::Envoy;
        c.envoy_admin = admin.clone();
        c.envoy_dir = dir.clone();
        c.proxy_listen = listen;
        c.tls_listen = Some(tls);
        c.rescan_interval = Some(Duration::from_millis(200));
        more(c);
    })
    .await;
    eventually(Duration::from_secs(3), "the first xDS files", || async {
        envoy.xds.join("lds.json").exists().then_some(())
    })
    .await;
    envoy.start_process().await;
    h
}

/// Waits until `https://host:port/` answers `want`, verified against `ca`.
async fn until_https(port: u16, ca: &Path, host: &str, want: &str) {
    eventually(
        Duration::from_secs(15),
        &format!("{host} over HTTPS"),
        || async {
            let (status, _, body) = curl_https(port, Some(ca), host, "/").await.ok()?;
            (status == 200 && body == want).then_some(())
        },
    )
    .await;
}

/// Harbor's local CA root, written to `dir`.
async fn harbor_root(h: &TestHarbor, dir: &Path) -> std::path::PathBuf {
    let pem = h.get_text("/api/v1/tls/ca.pem").await;
    let path = dir.join("harbor-root.pem");
    std::fs::write(&path, pem).unwrap();
    path
}

/// Every file in `dir` with its contents.
fn files_in(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().to_string_lossy().into_owned();
            Some((name, std::fs::read_to_string(e.path()).ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_serves_sds_certificates_and_a_renewal_rewrites_only_the_secret_file() {
    let _turn = common::MACHINE.read().await;
    let Some((envoy, h, tls_port)) = envoy_with_https().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();

    // A local name: a certificate from Harbor's local CA, by default.
    let app = Upstream::start("app").await;
    h.register(
        json!({"name": "app", "upstream": app.addr.to_string(), "ttl_secs": 60,
                      "host": "app.localhost", "hsts": true}),
    )
    .await;
    let root = harbor_root(&h, dir.path()).await;
    until_https(tls_port, &root, "app.localhost", "app").await;
    // Plain HTTP is redirected to the HTTPS listener.
    let resp = plain_get(envoy.listen_addr(), "app.localhost", "/x").await;
    assert!(resp.status().is_redirection(), "{}", resp.status());
    assert_eq!(
        resp.headers()["location"],
        format!("https://app.localhost:{tls_port}/x").as_str()
    );

    // Certificate files, then the same files replaced: a renewal.
    let ca = TestCa::new();
    let (_, cert, key) = ca.valid(dir.path(), "files", &["files.example.com"]);
    let ca_file = ca.root_file(dir.path());
    let web = Upstream::start("files").await;
    let head = "host = \"files.example.com\"\n";
    h.write_route(
        "files.route",
        &route_with_files(head, web.addr, &cert, &key),
    );
    until_https(tls_port, &ca_file, "files.example.com", "files").await;
    let before_serial = served_certificate(tls_port, "files.example.com", "-serial").await;
    let before = files_in(&envoy.xds);
    ca.valid(dir.path(), "files", &["files.example.com"]);
    eventually(
        Duration::from_secs(10),
        "the renewed certificate served",
        || async {
            let now = served_certificate(tls_port, "files.example.com", "-serial").await;
            (!now.is_empty() && now != before_serial).then_some(())
        },
    )
    .await;
    let after = files_in(&envoy.xds);
    let changed: Vec<&String> = after
        .iter()
        .filter(|(name, text)| before.get(*name) != Some(text))
        .map(|(name, _)| name)
        .collect();
    assert_eq!(changed.len(), 1, "only one file rewritten: {changed:?}");
    assert!(changed[0].starts_with("sds-"), "{changed:?}");
    until_https(tls_port, &ca_file, "files.example.com", "files").await;
    // What Harbor shows it pushed names the secrets, and never shows a key.
    let (status, pushed) = h.get("/api/v1/backend/config").await;
    assert_eq!(status, 200);
    let pushed = pushed.to_string();
    assert!(pushed.contains("sds-files.example.com.json"), "{pushed}");
    assert!(!pushed.contains("PRIVATE KEY"), "a key in {pushed}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_routes_tls_passthrough_by_sni() {
    let _turn = common::MACHINE.read().await;
    let Some((_envoy, h, _)) = envoy_with_https().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (_, a_cert, a_key) = ca.valid(dir.path(), "a", &["a.test"]);
    let (_, b_cert, b_key) = ca.valid(dir.path(), "b", &["b.test"]);
    let a = tls_upstream("a", &a_cert, &a_key).await;
    let b = tls_upstream("b", &b_cert, &b_key).await;
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let passthrough = |host: &str, upstream: SocketAddr| {
        format!(
            "protocol = \"tls-passthrough\"\nlisten = \"{listen}\"\nhosts = [\"{host}\"]\nupstreams = [\"{upstream}\"]\n"
        )
    };
    h.write_route("a.route", &passthrough("a.test", a));
    h.write_route("b.route", &passthrough("b.test", b));
    let roots = [ca.root.clone()];
    for (name, want) in [("a.test", "a"), ("b.test", "b")] {
        eventually(Duration::from_secs(10), name, || async {
            (tls_says(listen, &roots, name).await.as_deref() == Some(want)).then_some(())
        })
        .await;
    }
    assert_eq!(
        tls_says(listen, &roots, "c.test").await,
        None,
        "no service has c.test"
    );
    // Envoy, not Harbor, holds the address.
    let status = h.get("/api/v1/backend").await.1;
    assert_eq!(status["in_sync"], true, "{status}");

    // A tcp service whose TLS Envoy terminates, with the certificate Harbor hands it.
    tcp_tls_is_terminated(&h, &ca, dir.path(), "Envoy").await;
    h.shutdown().await;
}

/// A public name gets a certificate from Harbor's ACME client (Pebble here), whose HTTP-01
/// challenge Envoy's plain listener forwards to Harbor; Envoy then serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_serves_a_certificate_harbor_ordered_over_acme() {
    let _turn = common::MACHINE.read().await;
    let Some(mut envoy) = Envoy::prepare() else {
        return;
    };
    let tls_port = free_port();
    let Some(pebble) = Pebble::start(envoy.listen, tls_port) else {
        return;
    };
    pebble.ready().await;
    let tls = SocketAddr::from(([127, 0, 0, 1], tls_port));
    let h = harbor_then_envoy_with(&mut envoy, tls, pebble.directory_settings()).await;
    let shop = Upstream::start("shop").await;
    h.register(
        json!({"name": "shop", "upstream": shop.addr.to_string(), "ttl_secs": 60,
                      "host": "shop.example.com"}),
    )
    .await;
    pebble.until_issued(tls_port, "shop.example.com").await;
    h.shutdown().await;
}

/// Caddy → Envoy → Caddy with a `.localhost` host: HTTPS serves on each proxy's HTTPS port
/// after each swap, verified against the one root Harbor hands out.
async fn https_keeps_serving_across_swaps_between_caddy_and_envoy(release: Release) {
    let _turn = common::MACHINE.read().await;
    let Some(caddy) = Caddy::start_https(release).await else {
        return;
    };
    let Some(mut envoy) = Envoy::prepare() else {
        return;
    };
    envoy.write_empty_bootstrap_files();
    envoy.start_process().await;
    let envoy_tls = free_port();
    let admin: harbor::config::BaseUrl = caddy.admin_url().parse().unwrap();
    let envoy_admin: harbor::config::BaseUrl = envoy.admin_url().parse().unwrap();
    let (listen, caddy_tls) = (caddy.listen_addr(), caddy.tls_listen.unwrap());
    let (xds, envoy_listen) = (envoy.xds.clone(), envoy.listen_addr());
    let h = common::start_with(move |c| {
        c.backend = BackendKind::Caddy;
        c.caddy_admin = admin.clone();
        c.caddy_listen = listen;
        c.caddy_tls_listen = Some(SocketAddr::from(([127, 0, 0, 1], caddy_tls)));
        c.envoy_admin = envoy_admin.clone();
        c.envoy_dir = xds.clone();
        c.proxy_listen = envoy_listen;
        c.tls_listen = Some(SocketAddr::from(([127, 0, 0, 1], envoy_tls)));
    })
    .await;
    let app = Upstream::start("app").await;
    h.register(
        json!({"name": "app", "upstream": app.addr.to_string(), "ttl_secs": 60,
                      "host": "app.localhost"}),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let root = harbor_root(&h, dir.path()).await;
    until_https(caddy_tls, &root, "app.localhost", "app").await;
    for (adapter, port) in [("envoy", envoy_tls), ("caddy", caddy_tls)] {
        let r = h
            .client
            .put(h.url("/api/v1/backend"))
            .json(&json!({"adapter": adapter}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        until_https(port, &root, "app.localhost", "app").await;
    }
    h.shutdown().await;
}

common::on_each_caddy!(https_keeps_serving_across_swaps_between_caddy_and_envoy);
