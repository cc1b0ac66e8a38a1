//! HTTPS in the embedded proxy: certificates by SNI from files (exact names and a wildcard),
//! ALPN, files replaced while serving, the redirect from plain HTTP, HSTS, the local CA, and
//! bad certificate files refused with the reason while the last good certificate serves. The
//! test certificates are made here with rcgen; clients are rustls and curl.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;

use crate::common::certs::{Pebble, TestCa, connector, free_port, tls_says, tls_upstream};
use crate::common::{self, TestHarbor, eventually};

async fn with_tls() -> TestHarbor {
    common::start_with(|c| {
        c.tls_listen = Some("127.0.0.1:0".parse().expect("addr"));
        c.rescan_interval = Some(Duration::from_millis(200));
    })
    .await
}

/// The certificate served for `name` and the protocol ALPN chose, or the handshake's error.
async fn handshake(
    h: &TestHarbor,
    roots: &[CertificateDer<'static>],
    name: &str,
) -> Result<(CertificateDer<'static>, Option<Vec<u8>>), String> {
    let addr = h.harbor().tls_addr().expect("the HTTPS listener");
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let server = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let tls = connector(roots)
        .connect(server, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, session) = tls.get_ref();
    let served = session
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .ok_or("no certificate")?;
    Ok((served, session.alpn_protocol().map(<[u8]>::to_vec)))
}

/// `curl` over HTTPS to `host` on the TLS listener, trusting `ca`: status and body.
async fn curl(h: &TestHarbor, ca: &Path, host: &str, extra: &[&str]) -> (u16, String) {
    let port = h.harbor().tls_addr().expect("the HTTPS listener").port();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "5", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
        .args(["-w", "\n%{http_code}"])
        .args(extra)
        .arg(format!("https://{host}:{port}/"))
        .output()
        .await
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        format!("{body}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

fn file_route(host: &str, upstream: std::net::SocketAddr, cert: &Path, key: &Path) -> String {
    format!(
        "host = \"{host}\"\nupstreams = [\"{upstream}\"]\ntls = {{ cert = \"{}\", key = \"{}\" }}\nhsts = true\n",
        cert.display(),
        key.display()
    )
}

#[tokio::test]
async fn files_are_chosen_by_sni_negotiate_h2_follow_replacement_and_redirect_plain_http() {
    let h = with_tls().await;
    let certs = tempfile::tempdir().expect("a directory");
    let ca = TestCa::new();
    let ca_file = certs.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.root_pem).expect("the CA file");
    let (a_der, a_cert, a_key) = ca.valid(certs.path(), "a", &["a.test"]);
    let (b_der, b_cert, b_key) = ca.valid(certs.path(), "b", &["b.test"]);
    let (w_der, w_cert, w_key) = ca.valid(certs.path(), "w", &["*.w.test"]);
    let upstreams = [
        common::proxies::Upstream::start("a").await,
        common::proxies::Upstream::start("b").await,
        common::proxies::Upstream::start("w").await,
    ];
    h.write_route(
        "a.route",
        &file_route("a.test", upstreams[0].addr, &a_cert, &a_key),
    );
    h.write_route(
        "b.route",
        &file_route("b.test", upstreams[1].addr, &b_cert, &b_key),
    );
    h.write_route(
        "w.route",
        &file_route("*.w.test", upstreams[2].addr, &w_cert, &w_key),
    );
    let roots = [ca.root.clone()];
    let served = eventually(Duration::from_secs(10), "certificates by SNI", || async {
        let a = handshake(&h, &roots, "a.test").await.ok()?;
        let b = handshake(&h, &roots, "b.test").await.ok()?;
        let w = handshake(&h, &roots, "x.w.test").await.ok()?;
        Some((a, b, w))
    })
    .await;
    assert_eq!(served.0.0, a_der);
    assert_eq!(served.1.0, b_der);
    assert_eq!(served.2.0, w_der);
    assert_eq!(served.0.1.as_deref(), Some(&b"h2"[..]), "ALPN chose h2");
    assert!(
        handshake(&h, &roots, "nothing.test").await.is_err(),
        "no certificate for a name no route has"
    );

    // Requests over HTTPS reach the route, over h2 and HTTP/1.1, with HSTS.
    for version in ["--http2", "--http1.1"] {
        let (status, body) = curl(&h, &ca_file, "x.w.test", &[version]).await;
        assert_eq!((status, body.as_str()), (200, "w"), "{version}");
    }
    // HTTP/1.1 takes the direct path, h2 the full stack: both add HSTS and tell the upstream
    // the request came over HTTPS.
    let echo = common::upstreams::Backend::echo().await;
    h.write_route(
        "e.route",
        &file_route("e.w.test", echo.addr, &w_cert, &w_key),
    );
    for version in ["--http2", "--http1.1"] {
        let (status, headers) = curl(
            &h,
            &ca_file,
            "a.test",
            &[version, "-D", "-", "-o", "/dev/null"],
        )
        .await;
        assert_eq!(status, 200, "{version}: {headers}");
        assert!(
            headers
                .to_ascii_lowercase()
                .contains("strict-transport-security: max-age=31536000"),
            "{version}: {headers}"
        );
        let echoed = eventually(Duration::from_secs(5), "the echo route", || async {
            let (status, body) = curl(&h, &ca_file, "e.w.test", &[version]).await;
            // Until the route is in force the wildcard route answers for the name.
            (status == 200 && body.contains("x-forwarded-")).then_some(body)
        })
        .await;
        assert!(
            echoed
                .to_ascii_lowercase()
                .contains("x-forwarded-proto: https"),
            "{version}: {echoed}"
        );
    }

    // Plain HTTP is redirected to the same place on the HTTPS listener.
    let port = h.harbor().tls_addr().expect("TLS").port();
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("a client");
    let proxy = h.harbor().proxy_addr().expect("the proxy");
    for direct in [true, false] {
        // The direct HTTP/1.1 path and the full stack (which an h2c prior-knowledge client or a
        // request the direct path hands over reaches) redirect alike.
        let mut request = plain
            .get(format!("http://{proxy}/path?q=1"))
            .header("host", "a.test");
        if !direct {
            request = request.header("expect", "100-continue");
        }
        let resp = request.send().await.expect("an answer");
        assert_eq!(resp.status().as_u16(), 308);
        assert_eq!(
            resp.headers()["location"],
            format!("https://a.test:{port}/path?q=1").as_str()
        );
    }

    // A name the framing policy lets through but a Location would mangle is served as it is,
    // never sent back.
    let resp = plain
        .get(format!("http://{proxy}/"))
        .header("host", "x%2Fevil.w.test")
        .send()
        .await
        .expect("an answer");
    assert_eq!(resp.status().as_u16(), 200, "not redirected");

    // A replaced certificate is served without a restart.
    let (fresh, _, _) = ca.valid(certs.path(), "a", &["a.test"]);
    eventually(
        Duration::from_secs(10),
        "the replaced certificate",
        || async {
            let (served, _) = handshake(&h, &roots, "a.test").await.ok()?;
            (served == fresh).then_some(())
        },
    )
    .await;
    h.shutdown().await;
}

#[tokio::test]
async fn the_local_ca_serves_local_names_and_its_root_verifies_them() {
    let h = with_tls().await;
    let upstream = common::proxies::Upstream::start("local").await;
    // A local name gets the local CA by default, once a TLS listener is configured.
    h.write_route(
        "local.route",
        &format!("host = \"nas.lan\"\nupstreams = [\"{}\"]\n", upstream.addr),
    );
    let resp = h
        .client
        .get(h.url("/api/v1/tls/ca.pem"))
        .send()
        .await
        .expect("the API answers");
    assert_eq!(resp.status().as_u16(), 200);
    let pem = resp.text().await.expect("the root");
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let dir = tempfile::tempdir().expect("a directory");
    let ca = dir.path().join("harbor-ca.pem");
    std::fs::write(&ca, &pem).expect("written");
    let (status, body) = eventually(Duration::from_secs(10), "served over HTTPS", || async {
        let got = curl(&h, &ca, "nas.lan", &[]).await;
        (got.0 == 200).then_some(got)
    })
    .await;
    assert_eq!((status, body.as_str()), (200, "local"));
    // The root is kept in the state directory, for the next start, and its key is private.
    let key = h.state.path().join("tls/ca.key");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key)
        .expect("the CA key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let h = h.restart().await;
    let resp = h
        .client
        .get(h.url("/api/v1/tls/ca.pem"))
        .send()
        .await
        .expect("the API answers");
    assert_eq!(
        resp.text().await.expect("the root"),
        pem,
        "the same root after a restart"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn bad_certificate_files_are_refused_with_the_reason_and_the_last_good_one_serves() {
    let h = with_tls().await;
    let certs = tempfile::tempdir().expect("a directory");
    let ca = TestCa::new();
    let upstream = common::proxies::Upstream::start("good").await;
    let (good_der, cert, key) = ca.valid(certs.path(), "good", &["good.test"]);
    let (_, _, other_key) = ca.valid(certs.path(), "other", &["other.test"]);
    let now = SystemTime::now();
    let (_, expired, expired_key) = ca.issue(
        certs.path(),
        "expired",
        &["good.test"],
        (
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        ),
    );
    let missing = certs.path().join("missing.pem");
    let route = |cert: &Path, key: &Path| file_route("good.test", upstream.addr, cert, key);

    for (cert, key, needle) in [
        (&cert, &other_key, "does not go with the certificate"),
        (&expired, &expired_key, "expired at"),
        (&missing, &key, "cannot read the certificate"),
    ] {
        h.write_route("bad.route", &route(cert, key));
        let errors = eventually(Duration::from_secs(10), needle, || async {
            let (_, body) = h.get("/api/v1/route-errors").await;
            body["errors"]
                .as_array()
                .filter(|e| {
                    e.iter()
                        .any(|e| e["reason"].as_str().is_some_and(|r| r.contains(needle)))
                })
                .cloned()
        })
        .await;
        assert_eq!(errors[0]["field"], "tls", "{errors:?}");
    }
    h.write_route(
        "bad.route",
        "host = \"x.test\"\nupstreams = [\"127.0.0.1:9\"]\ntls = \"on\"\n",
    );
    eventually(Duration::from_secs(10), "an unknown tls value", || async {
        let (_, body) = h.get("/api/v1/route-errors").await;
        body.to_string()
            .contains("tls \\\"on\\\" is not a mode")
            .then_some(())
    })
    .await;
    std::fs::remove_file(h.routes.path().join("bad.route")).expect("removed");

    // A registration naming files is checked the same way.
    let register = json!({"name": "reg", "upstream": upstream.addr.to_string(), "host": "reg.test",
                          "tls": {"cert": cert.display().to_string(), "key": other_key.display().to_string()}});
    let (status, body) = h.post("/api/v1/services", register).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "tls");

    // Serving, then the key is replaced by one that does not fit: the last good certificate
    // goes on serving and the problem is reported.
    h.write_route("good.route", &route(&cert, &key));
    let roots = [ca.root.clone()];
    eventually(Duration::from_secs(10), "the good certificate", || async {
        handshake(&h, &roots, "good.test").await.ok()
    })
    .await;
    let mut events = h.events(None).await;
    std::fs::copy(&other_key, &key).expect("the wrong key in place");
    let problem = events.next_of("tls_problem").await;
    assert_eq!(problem.data["service"], "good", "{:?}", problem.data);
    let reason = problem.data["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("does not go with")
            && reason.contains("last good certificate keeps serving"),
        "{reason}"
    );
    let (served, _) = handshake(&h, &roots, "good.test")
        .await
        .expect("still served");
    assert_eq!(served, good_der);
    let (_, status) = h.get("/api/v1/status").await;
    assert_eq!(status["tls"]["problems"][0]["service"], "good", "{status}");
    h.shutdown().await;
}

/// A token file in `dir` with a full-access token and `scoped-token-0123456789abcdef` scoped
/// as `scope` says (a prefix and its claims).
fn token_file(dir: &Path, scope: &str) -> PathBuf {
    let tokens = dir.join("tokens");
    std::fs::write(
        &tokens,
        format!("admin-token-0123456789abcdef\nscoped-token-0123456789abcdef {scope}\n"),
    )
    .expect("tokens");
    tokens
}

/// Certificate files are read with Harbor's permissions, so only a full-access token may name
/// them.
#[tokio::test]
async fn a_scoped_token_may_not_name_certificate_files() {
    let dir = tempfile::tempdir().expect("a directory");
    let tokens = token_file(dir.path(), "app- hosts=app.test,app.lan");
    let h = common::start_with(move |c| {
        c.token_file = Some(tokens.clone());
        c.tls_listen = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    let body = json!({"name": "app-1", "upstream": "127.0.0.1:9", "host": "app.test",
                      "tls": {"cert": "/etc/ssl/certs/x.pem", "key": "/etc/ssl/private/x.key"}});
    let resp = h
        .client
        .post(h.url("/api/v1/services"))
        .bearer_auth("scoped-token-0123456789abcdef")
        .json(&body)
        .send()
        .await
        .expect("the API answers");
    assert_eq!(resp.status().as_u16(), 403);
    let answer: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(answer["field"], "tls", "{answer}");
    // The same token may ask for the local CA.
    let internal =
        json!({"name": "app-2", "upstream": "127.0.0.1:9", "host": "app.lan", "tls": "internal"});
    let resp = h
        .client
        .post(h.url("/api/v1/services"))
        .bearer_auth("scoped-token-0123456789abcdef")
        .json(&internal)
        .send()
        .await
        .expect("the API answers");
    assert_eq!(resp.status().as_u16(), 201);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_issues_serves_renews_and_reports_failures_against_pebble() {
    let (http_port, tls_port) = (free_port(), free_port());
    let Some(pebble) = Pebble::start(http_port, tls_port) else {
        return;
    };
    // Read at every start, so that a restart can renew early.
    let renew_before = Arc::new(std::sync::Mutex::new(Duration::from_secs(30 * 86_400)));
    let settings = {
        let (acme, renew_before) = (pebble.settings(tls_port), renew_before.clone());
        move |c: &mut harbor::config::Config| {
            acme(c);
            c.proxy_listen = format!("127.0.0.1:{http_port}").parse().expect("addr");
            c.acme_renew_before = *renew_before.lock().expect("the window");
        }
    };
    pebble.ready().await;
    let h = common::start_with(settings).await;
    let shop = common::proxies::Upstream::start("shop").await;
    let broken = common::proxies::Upstream::start("broken").await;
    pebble.misdirect("broken.example.net").await;
    // Public names: `auto` by default once a TLS listener is configured.
    h.write_route(
        "shop.route",
        &format!(
            "host = \"shop.example.com\"\nupstreams = [\"{}\"]\n",
            shop.addr
        ),
    );
    h.write_route(
        "broken.route",
        &format!(
            "host = \"broken.example.net\"\nupstreams = [\"{}\"]\n",
            broken.addr
        ),
    );
    let mut events = h.events(None).await;

    // Issued through HTTP-01 on the plain listener, and served by SNI.
    let issued = eventually(
        Duration::from_secs(60),
        "a certificate from Pebble",
        || async { handshake_unverified(&h, "shop.example.com").await },
    )
    .await;
    assert_issued_by_pebble(&issued);
    let key = h.state.path().join("tls/acme/shop.example.com.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key)
            .expect("the key")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // A host whose challenges cannot succeed: reported, and still served over plain HTTP.
    let problem = loop {
        let event = events.next_of("tls_problem").await;
        if event.data["service"] == "broken"
            && event.data["reason"]
                .as_str()
                .is_some_and(|r| r.contains("ACME order for broken.example.net failed"))
        {
            break event;
        }
    };
    assert!(
        problem.data["reason"]
            .as_str()
            .is_some_and(|r| r.len() > 40),
        "{:?}",
        problem.data
    );
    let proxy = h.harbor().proxy_addr().expect("the proxy");
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("a client");
    let resp = client
        .get(format!("http://{proxy}/"))
        .header("host", "broken.example.net")
        .send()
        .await
        .expect("an answer");
    assert_eq!(
        resp.status().as_u16(),
        200,
        "served over plain HTTP, not redirected"
    );
    let resp = client
        .get(format!("http://{proxy}/"))
        .header("host", "shop.example.com")
        .send()
        .await
        .expect("an answer");
    assert_eq!(
        resp.status().as_u16(),
        308,
        "a host with its certificate is redirected"
    );
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("harbor_acme_orders_total{result=\"failed\"}"),
        "{metrics}"
    );

    // A restart keeps the certificate: nothing is ordered again.
    let h = h.restart().await;
    let again = eventually(Duration::from_secs(10), "the kept certificate", || async {
        handshake_unverified(&h, "shop.example.com").await
    })
    .await;
    assert_eq!(again, issued);
    assert!(
        !h.metrics()
            .await
            .contains("harbor_acme_orders_total{result=\"issued\"}"),
        "ordered again after a restart"
    );

    // Renewal: with a window longer than the certificate's life, it is due at once, and the
    // new certificate replaces the old one while serving.
    *renew_before.lock().expect("the window") = Duration::from_secs(100 * 365 * 86_400);
    let h = h.restart().await;
    eventually(Duration::from_secs(60), "a renewed certificate", || async {
        let served = handshake_unverified(&h, "shop.example.com").await?;
        (served != issued).then_some(())
    })
    .await;
    h.shutdown().await;
}

fn assert_issued_by_pebble(der: &CertificateDer<'_>) {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("a certificate");
    assert!(
        cert.issuer().to_string().to_lowercase().contains("pebble"),
        "issued by {}",
        cert.issuer()
    );
}

/// The certificate served for `name`, whoever issued it (the test reads the issuer itself).
async fn handshake_unverified(h: &TestHarbor, name: &str) -> Option<CertificateDer<'static>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(h.harbor().tls_addr()?)
        .await
        .ok()?;
    let server = ServerName::try_from(name.to_owned()).ok()?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server, tcp)
        .await
        .ok()?;
    tls.get_ref().1.peer_certificates()?.first().cloned()
}

/// Accepts any certificate, checking only that the handshake's signatures are sound.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// With `--acme-challenge tls-alpn-01` the CA is answered on the TLS listener alone: Pebble
/// validates here against a port where nothing answers plain HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_answers_tls_alpn_01_on_the_tls_listener() {
    let (nowhere, tls_port) = (free_port(), free_port());
    let Some(pebble) = Pebble::start(nowhere, tls_port) else {
        return;
    };
    pebble.ready().await;
    let acme = pebble.settings(tls_port);
    let h = common::start_with(move |c| {
        acme(c);
        c.acme_challenge = harbor::tls::acme::Challenge::TlsAlpn01;
    })
    .await;
    let upstream = common::proxies::Upstream::start("alpn").await;
    h.write_route(
        "alpn.route",
        &format!(
            "host = \"alpn.example.org\"\ntls = \"auto\"\nupstreams = [\"{}\"]\n",
            upstream.addr
        ),
    );
    let issued = eventually(
        Duration::from_secs(60),
        "a certificate from Pebble",
        || async { handshake_unverified(&h, "alpn.example.org").await },
    )
    .await;
    assert_issued_by_pebble(&issued);
    h.shutdown().await;
}

/// A tcp service whose TLS Harbor terminates, with its certificate from files: a client asking
/// for its name gets it, and so does one asking for none (connecting by address); the upstream
/// gets the plain bytes.
#[tokio::test]
async fn a_tcp_service_terminates_tls_with_its_own_certificate() {
    let h = with_tls().await;
    let dir = tempfile::tempdir().expect("a directory");
    let ca = TestCa::new();
    let (_, cert, key) = ca.valid(dir.path(), "db", &["db.test"]);
    let upstream = common::proxies::Upstream::start("db").await;
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    h.write_route(
        "db.route",
        &format!(
            "protocol = \"tcp\"\nlisten = \"{listen}\"\nhost = \"db.test\"\nupstreams = [\"{}\"]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
            upstream.addr,
            cert.display(),
            key.display()
        ),
    );
    let roots = [ca.root.clone()];
    // HTTP inside, since the test upstream speaks it; to Harbor these are a tcp service's bytes.
    let tls_client = connector(&roots);
    let ask = |server: &'static str| {
        let tls_client = tls_client.clone();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let tcp = tokio::net::TcpStream::connect(listen).await.ok()?;
            let mut tls = tls_client
                .connect(ServerName::try_from(server).ok()?, tcp)
                .await
                .ok()?;
            tls.write_all(b"GET / HTTP/1.1\r\nHost: db\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut answer = String::new();
            tls.read_to_string(&mut answer).await.ok()?;
            answer.ends_with("db").then_some(())
        }
    };
    eventually(Duration::from_secs(10), "db.test over TLS", || {
        ask("db.test")
    })
    .await;
    // No SNI at all: rustls sends none for an address. The certificate is db.test's, which the
    // client then refuses to take for 127.0.0.1: the handshake reached the service's own key.
    let by_address = tokio::net::TcpStream::connect(listen)
        .await
        .expect("connect");
    let refused = connector(&roots)
        .connect(
            ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            by_address,
        )
        .await
        .expect_err("db.test's certificate is not 127.0.0.1's");
    assert!(
        refused.to_string().contains("not valid for name"),
        "{refused}"
    );
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("harbor_proxy_tls_handshakes_total{result=\"ok\"}"),
        "{metrics}"
    );
    h.shutdown().await;
}

/// Without Harbor's certificates (no --tls-listen), a tcp service asking for TLS is a route
/// error that says so, and its address is not listened on.
#[tokio::test]
async fn tls_on_a_tcp_service_without_a_tls_listener_is_a_route_error() {
    let h = common::start().await;
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    h.write_route(
        "db.route",
        &format!(
            "protocol = \"tcp\"\nlisten = \"{listen}\"\nhost = \"db.lan\"\nupstreams = [\"127.0.0.1:9\"]\ntls = \"internal\"\n",
        ),
    );
    let errors = eventually(Duration::from_secs(5), "the route error", || async {
        let (_, errors) = h.get("/api/v1/route-errors").await;
        errors
            .to_string()
            .contains("--tls-listen")
            .then_some(errors)
    })
    .await;
    assert!(errors.to_string().contains("db"), "{errors}");
    assert!(tokio::net::TcpStream::connect(listen).await.is_err());
    // A tcp service asking for TLS names what its certificate is for.
    h.write_route(
        "nameless.route",
        "protocol = \"tcp\"\nlisten = \"127.0.0.1:9\"\nupstreams = [\"127.0.0.1:9\"]\ntls = \"internal\"\n",
    );
    eventually(
        Duration::from_secs(5),
        "the nameless route refused",
        || async {
            let (_, errors) = h.get("/api/v1/route-errors").await;
            errors
                .to_string()
                .contains("needs host or hosts: the names its certificate is for")
                .then_some(())
        },
    )
    .await;
    h.shutdown().await;
}

/// TLS passthrough: two services share one listen address, each reached by the name its
/// clients ask for, their TLS untouched (each client verifies its own upstream's certificate).
/// A name no service has gets no upstream; a plain tcp service may not take the address; a
/// scoped token claims only the names its patterns allow.
#[tokio::test]
async fn passthrough_routes_by_sni_between_services_on_one_address() {
    let dir = tempfile::tempdir().expect("a directory");
    let tokens = token_file(dir.path(), "pt- hosts=*.mine.test listen=127.0.0.1:1-65535");
    let h = common::start_with(move |c| c.token_file = Some(tokens.clone())).await;
    let ca = TestCa::new();
    let (_, a_cert, a_key) = ca.valid(dir.path(), "a", &["a.test"]);
    let (_, b_cert, b_key) = ca.valid(dir.path(), "b", &["b.test", "x.wild.test"]);
    let a = tls_upstream("a", &a_cert, &a_key).await;
    let b = tls_upstream("b", &b_cert, &b_key).await;
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let passthrough = |hosts: &str, upstream: std::net::SocketAddr| {
        format!(
            "protocol = \"tls-passthrough\"\nlisten = \"{listen}\"\nhosts = [{hosts}]\nupstreams = [\"{upstream}\"]\n"
        )
    };
    h.write_route("a.route", &passthrough("\"a.test\"", a));
    h.write_route("b.route", &passthrough("\"b.test\", \"*.wild.test\"", b));
    let roots = [ca.root.clone()];
    for (name, want) in [("a.test", "a"), ("b.test", "b"), ("x.wild.test", "b")] {
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

    // The address is shared by SNI: a plain tcp service cannot have it, nor a name twice.
    h.write_route(
        "plain.route",
        &format!("protocol = \"tcp\"\nlisten = \"{listen}\"\nupstreams = [\"{a}\"]\n"),
    );
    h.write_route("again.route", &passthrough("\"a.test\"", b));
    let errors = eventually(Duration::from_secs(5), "both refused", || async {
        let (_, errors) = h.get("/api/v1/route-errors").await;
        let text = errors.to_string();
        (text.contains("plain.route") && text.contains("again.route")).then_some(errors)
    })
    .await;
    assert!(errors.to_string().contains("SNI name a.test"), "{errors}");
    assert_eq!(
        tls_says(listen, &roots, "a.test").await.as_deref(),
        Some("a")
    );

    // A scoped token: names inside its patterns only.
    let register = |name: &str, host: &str| {
        h.client
            .post(h.url("/api/v1/services"))
            .bearer_auth("scoped-token-0123456789abcdef")
            .json(
                &json!({"name": name, "upstream": b.to_string(), "protocol": "tls-passthrough",
                          "listen": listen.to_string(), "host": host, "ttl_secs": 60}),
            )
            .send()
    };
    let refused = register("pt-1", "a.test").await.expect("the API answers");
    assert_eq!(refused.status().as_u16(), 403);
    let granted = register("pt-2", "db.mine.test")
        .await
        .expect("the API answers");
    assert_eq!(granted.status().as_u16(), 201);
    eventually(Duration::from_secs(5), "db.mine.test", || async {
        // b's certificate has no db.mine.test: the handshake reaching b and failing its name
        // check is the proof it went there; a.test still reaches a.
        (tls_says(listen, &roots, "db.mine.test").await.is_none()
            && tls_says(listen, &roots, "a.test").await.as_deref() == Some("a"))
        .then_some(())
    })
    .await;
    h.shutdown().await;
}
