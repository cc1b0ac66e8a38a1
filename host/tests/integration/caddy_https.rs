//! HTTPS for Harbor's hosts through a real Caddy (each test on both supported releases): Caddy
//! sees Harbor's hosts, obtains their certificates from the issuer Harbor names (its internal
//! issuer with Harbor's local CA, an ACME CA, files) and redirects plain HTTP itself.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::certs::{Pebble, TestCa, curl_https, route_with_files, tcp_tls_is_terminated};
use crate::common::proxies::{Caddy, Release, Upstream, plain_get};
use crate::common::{self, TestHarbor, eventually};
use harbor::config::BackendKind;

/// A Harbor driving `caddy`, attached to its HTTPS site; `more` adds settings.
async fn harbor_for(
    caddy: &Caddy,
    more: impl Fn(&mut harbor::config::Config) + Send + Sync + 'static,
) -> TestHarbor {
    let admin: harbor::config::BaseUrl = caddy.admin_url().parse().unwrap();
    let listen = caddy.listen_addr();
    let tls = SocketAddr::from(([127, 0, 0, 1], caddy.tls_listen.unwrap()));
    common::start_with(move |c| {
        c.backend = BackendKind::Caddy;
        c.caddy_admin = admin.clone();
        c.caddy_listen = listen;
        c.caddy_tls_listen = Some(tls);
        c.rescan_interval = Some(Duration::from_millis(200));
        more(c);
    })
    .await
}

/// `curl` to `https://host:port/path` through Caddy's HTTPS site (see [`curl_https`]).
async fn curl(
    caddy: &Caddy,
    ca: Option<&Path>,
    url_host: &str,
    path: &str,
) -> Result<(u16, String, String), String> {
    curl_https(caddy.tls_listen.unwrap(), ca, url_host, path).await
}

/// The root of Caddy's CA `id`, as its admin API gives it, written to `dir`; none while Caddy
/// has no such CA.
async fn caddy_root(caddy: &Caddy, id: &str, dir: &Path) -> Option<std::path::PathBuf> {
    let url = format!("{}/pki/ca/{id}", caddy.admin_url());
    let ca: Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
    let pem = ca["root_certificate"].as_str()?.to_owned();
    let path = dir.join(format!("{id}-root.pem"));
    std::fs::write(&path, pem).unwrap();
    Some(path)
}

/// The `@id`s of the routes in Caddy's servers; none when the admin API could not answer
/// (it closes its connections while it reloads).
async fn harbor_routes_in(caddy: &Caddy) -> Option<Vec<String>> {
    let url = format!("{}/config/apps/http/servers", caddy.admin_url());
    let servers: Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
    let ids = servers
        .as_object()
        .into_iter()
        .flat_map(|s| s.values())
        .flat_map(|s| s["routes"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r["@id"].as_str().map(str::to_owned))
        .collect();
    Some(ids)
}

/// A `.localhost` host is served over HTTPS by Caddy with a certificate from Harbor's local CA,
/// which Caddy's `pki` app holds as CA `harbor`; plain HTTP is redirected by Caddy, HSTS is
/// sent, the user's own HTTPS site is untouched, and a release leaves nothing of Harbor's.
async fn local_hosts_get_https_from_caddy_with_harbors_root(release: Release) {
    let _turn = common::MACHINE.read().await;
    let Some(mut caddy) = Caddy::start_https(release).await else {
        return;
    };
    let h = harbor_for(&caddy, |_| {}).await;
    let app = Upstream::start("app").await;
    let grant = h
        .register(
            json!({"name": "app", "upstream": app.addr.to_string(), "ttl_secs": 60,
                         "host": "app.localhost", "hsts": true}),
        )
        .await;
    let id = grant["id"].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let (status, head, body) = eventually(
        Duration::from_secs(15),
        "app.localhost over HTTPS",
        || async {
            // Caddy's root for Harbor's hosts, as Caddy gives it.
            let root = caddy_root(&caddy, "harbor", dir.path()).await?;
            let got = curl(&caddy, Some(&root), "app.localhost", "/").await.ok()?;
            (got.2 == "app").then_some(got)
        },
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "app"), "{head}");
    assert!(
        head.to_lowercase()
            .contains("strict-transport-security: max-age=31536000"),
        "{head}"
    );
    // One root in every mode: Caddy's is Harbor's own.
    let harbor_root = h.get_text("/api/v1/tls/ca.pem").await;
    let served_root =
        std::fs::read_to_string(caddy_root(&caddy, "harbor", dir.path()).await.unwrap()).unwrap();
    assert_eq!(served_root.trim(), harbor_root.trim());

    // Plain HTTP to the host is redirected by Caddy, to its HTTPS port.
    let resp = plain_get(caddy.listen_addr(), "app.localhost", "/x?y=1").await;
    assert_eq!(resp.status().as_u16(), 308);
    assert_eq!(
        resp.headers()["location"],
        format!("https://app.localhost:{}/x?y=1", caddy.tls_listen.unwrap()).as_str()
    );
    // A host that asks for no redirect is served over plain HTTP too (and over HTTPS).
    let open = Upstream::start("open").await;
    let open_grant = h
        .register(json!({"name": "open", "upstream": open.addr.to_string(),
                         "ttl_secs": 60, "host": "open.localhost", "redirect_http": false}))
        .await;
    let open_id = open_grant["id"].as_str().unwrap().to_owned();
    let root = caddy_root(&caddy, "harbor", dir.path()).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "open.localhost over HTTPS",
        || async {
            let got = curl(&caddy, Some(&root), "open.localhost", "/")
                .await
                .ok()?;
            (got.0 == 200 && got.2 == "open").then_some(())
        },
    )
    .await;
    let resp = plain_get(caddy.listen_addr(), "open.localhost", "/").await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.text().await.unwrap(), "open");

    // Caddy started again from its Caddyfile has none of it: Harbor puts it back.
    caddy.start_again().await;
    eventually(
        Duration::from_secs(15),
        "HTTPS back after Caddy's restart",
        || async {
            let root = caddy_root(&caddy, "harbor", dir.path()).await?;
            let got = curl(&caddy, Some(&root), "app.localhost", "/").await.ok()?;
            (got.0 == 200 && got.2 == "app").then_some(())
        },
    )
    .await;

    // The user's own site keeps its certificate and its route.
    let local = caddy_root(&caddy, "local", dir.path()).await.unwrap();
    let (status, _, body) = curl(&caddy, Some(&local), "localhost", "/user")
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "user https route"));

    // Gone from Harbor, gone from Caddy: no container, no policy, no CA of Harbor's.
    for id in [id, open_id] {
        assert_eq!(h.delete(&format!("/api/v1/services/{id}")).await, 204);
    }
    eventually(
        Duration::from_secs(5),
        "Harbor's routes removed",
        || async {
            let ids = harbor_routes_in(&caddy).await?;
            (!ids.iter().any(|id| id.starts_with("harbor-"))).then_some(())
        },
    )
    .await;
    let apps: Value = reqwest::get(format!("{}/config/apps", caddy.admin_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        apps["pki"]["certificate_authorities"]["harbor"].is_null(),
        "{apps}"
    );
    let policies = apps["tls"]["automation"]["policies"].to_string();
    assert!(!policies.contains("harbor-"), "{policies}");
    let (status, _, _) = curl(&caddy, Some(&local), "localhost", "/user")
        .await
        .unwrap();
    assert_eq!(status, 200);
    h.shutdown().await;
}

/// With Caddy's ACME issuer pointed at Pebble by Harbor's `--acme-directory`, a public name
/// registered with Harbor gets a certificate Pebble issued, through Caddy's own ACME client.
async fn caddy_gets_a_certificate_from_harbors_acme_directory(release: Release) {
    let _turn = common::MACHINE.read().await;
    let Some(caddy) = Caddy::start_https(release).await else {
        return;
    };
    let Some(pebble) = Pebble::start(caddy.listen, caddy.tls_listen.unwrap()) else {
        return;
    };
    pebble.ready().await;
    let h = harbor_for(&caddy, pebble.directory_settings()).await;
    let shop = Upstream::start("shop").await;
    h.register(
        json!({"name": "shop", "upstream": shop.addr.to_string(), "ttl_secs": 60,
                      "host": "shop.example.com"}),
    )
    .await;
    pebble
        .until_issued(caddy.tls_listen.unwrap(), "shop.example.com")
        .await;
    let (status, _, body) = curl(&caddy, None, "shop.example.com", "/").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "shop"));
    // Caddy ordered it: Harbor's own ACME client stayed idle, and sees nothing wrong.
    let (_, status) = h.get("/api/v1/status").await;
    assert_eq!(status["tls"]["problems"], json!([]), "{status}");
    let metrics = h.get_text("/metrics").await;
    assert!(
        !metrics.contains("harbor_acme_orders_total{"),
        "Harbor ordered certificates itself"
    );
    h.shutdown().await;
}

/// A route's certificate files are loaded into Caddy and served for its host.
async fn certificate_files_are_served_by_caddy(release: Release) {
    let _turn = common::MACHINE.read().await;
    let Some(caddy) = Caddy::start_https(release).await else {
        return;
    };
    let h = harbor_for(&caddy, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (_, cert, key) = ca.valid(dir.path(), "files", &["files.example.com"]);
    let root = ca.root_file(dir.path());
    let web = Upstream::start("files").await;
    let head = "host = \"files.example.com\"\n";
    h.write_route(
        "files.route",
        &route_with_files(head, web.addr, &cert, &key),
    );
    let (status, _, body) = eventually(
        Duration::from_secs(15),
        "the file certificate served",
        || async {
            let got = curl(&caddy, Some(&root), "files.example.com", "/")
                .await
                .ok()?;
            (got.2 == "files").then_some(got)
        },
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "files"));

    // Beside Caddy, Harbor's own tcp proxy terminates TLS for tcp services with its
    // certificates.
    tcp_tls_is_terminated(&h, &ca, dir.path(), "Harbor").await;
    h.shutdown().await;
}

common::on_each_caddy!(
    local_hosts_get_https_from_caddy_with_harbors_root,
    caddy_gets_a_certificate_from_harbors_acme_directory,
    certificate_files_are_served_by_caddy,
);
