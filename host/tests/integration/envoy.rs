//! Harbor driving a real Envoy through the Envoy adapter and xDS files: a registration becomes
//! routable through Envoy's listener, instance churn goes through EDS, expiry removes the
//! route, a restarted Envoy comes back with Harbor's routes, TCP services become `tcp_proxy`
//! listeners, and an update Envoy rejects is reported rather than lost.

use crate::common;

use std::time::Duration;

use common::proxies::{
    Envoy, Upstream, checked_route, free_port, none_failed, steady_stream, through, until_routed,
};
use common::upstreams::{HttpBackend, health_checks_hold_out_a_failing_upstream};
use common::{TestHarbor, eventually};
use harbor::config::BackendKind;
use serde_json::{Value, json};

async fn harbor_for(envoy: &Envoy) -> TestHarbor {
    let admin: harbor::config::BaseUrl = envoy.admin_url().parse().expect("admin url");
    let dir = envoy.xds.clone();
    let listen = envoy.listen_addr();
    common::start_with(move |c| {
        c.backend = BackendKind::Envoy;
        c.envoy_admin = admin.clone();
        c.envoy_dir = dir.clone();
        c.proxy_listen = listen;
    })
    .await
}

/// A Harbor driving `envoy`, and Envoy started once Harbor has written its first files.
async fn harbor_then_envoy(envoy: &mut Envoy) -> TestHarbor {
    let h = harbor_for(envoy).await;
    eventually(Duration::from_secs(3), "the first xDS files", || async {
        envoy.xds.join("lds.json").exists().then_some(())
    })
    .await;
    // Written is not live: until Envoy serves them, Harbor says it is out of step, and why.
    let status = eventually(Duration::from_secs(3), "the apply reported", || async {
        let s = backend_status(&h).await;
        s["last_error"].is_string().then_some(s)
    })
    .await;
    assert_eq!(status["in_sync"], false, "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("not serving them yet")),
        "{status}"
    );
    envoy.start_process().await;
    eventually(
        Duration::from_secs(10),
        "in step once Envoy serves",
        || async { (backend_status(&h).await["in_sync"] == true).then_some(()) },
    )
    .await;
    h
}

/// An Envoy driven by a Harbor, routing `web.localhost` to an upstream named `a`; none when
/// Envoy is not installed and not required.
async fn envoy_routing_web() -> Option<(Envoy, TestHarbor, Upstream)> {
    let mut envoy = Envoy::prepare()?;
    let h = harbor_then_envoy(&mut envoy).await;
    let a = Upstream::start("a").await;
    h.register(json!({"name": "web", "upstream": a.addr.to_string(), "ttl_secs": 60, "host": "web.localhost"}))
        .await;
    until_routed(&envoy, "web.localhost", "a", Duration::from_secs(5)).await;
    Some((envoy, h, a))
}

/// Waits until Envoy's TCP listener at `addr` reaches the upstream named `want`.
async fn until_forwarding(addr: std::net::SocketAddr, want: &str) {
    let client = reqwest::Client::new();
    eventually(
        Duration::from_secs(5),
        "the tcp listener forwarding",
        || {
            let client = client.clone();
            async move {
                let answer = through(&client, addr, "x", "/").await;
                (answer == Some((200, want.to_owned()))).then_some(())
            }
        },
    )
    .await;
}

async fn backend_status(h: &TestHarbor) -> Value {
    let (status, body) = h.get("/api/v1/backend").await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_route_expire_and_restart_through_envoy() {
    let Some(mut envoy) = Envoy::prepare() else {
        return;
    };
    let h = harbor_then_envoy(&mut envoy).await;

    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    h.register(json!({"name": "web", "upstream": a.addr.to_string(), "ttl_secs": 60, "host": "web.localhost"}))
        .await;
    until_routed(&envoy, "web.localhost", "a", Duration::from_secs(5)).await;
    let status = eventually(Duration::from_secs(3), "in sync", || async {
        let s = backend_status(&h).await;
        (s["in_sync"] == true).then_some(s)
    })
    .await;
    assert_eq!(status["adapter"], "envoy");
    assert_eq!(status["supports_tcp"], true);

    // A second instance of the same service: only its EDS file changes.
    let cds_before = std::fs::read(envoy.xds.join("cds.json")).unwrap();
    let grant = h
        .register(json!({"name": "web", "upstream": b.addr.to_string(), "ttl_secs": 1, "host": "web.localhost"}))
        .await;
    assert!(grant["id"].is_string());
    let client = reqwest::Client::new();
    eventually(Duration::from_secs(3), "both instances serving", || {
        let client = client.clone();
        let addr = envoy.listen_addr();
        async move {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..10 {
                if let Some((200, body)) = through(&client, addr, "web.localhost", "/").await {
                    seen.insert(body);
                }
            }
            (seen.len() == 2).then_some(())
        }
    })
    .await;
    assert_eq!(
        std::fs::read(envoy.xds.join("cds.json")).unwrap(),
        cds_before,
        "instance churn rewrote CDS"
    );

    // b's lease runs out: only a serves.
    eventually(Duration::from_secs(5), "b expired from Envoy", || {
        let client = client.clone();
        let addr = envoy.listen_addr();
        async move {
            for _ in 0..10 {
                match through(&client, addr, "web.localhost", "/").await {
                    Some((200, body)) if body == "a" => {}
                    _ => return None,
                }
            }
            Some(())
        }
    })
    .await;

    // Envoy goes down: a change is written, and said to be out of step until Envoy serves it.
    envoy.kill();
    let c = Upstream::start("c").await;
    h.register(json!({"name": "late", "upstream": c.addr.to_string(), "ttl_secs": 60, "host": "late.localhost"}))
        .await;
    // A probe may tell of the outage first ("unreachable"); the apply's own word follows.
    let status = eventually(Duration::from_secs(5), "the outage reported", || async {
        let s = backend_status(&h).await;
        let written = s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("not serving them yet"));
        written.then_some(s)
    })
    .await;
    assert_eq!(status["in_sync"], false, "{status}");

    // Envoy restarts: it reads Harbor's files again, the change among them.
    envoy.start_process().await;
    until_routed(&envoy, "late.localhost", "c", Duration::from_secs(5)).await;
    eventually(Duration::from_secs(5), "in step again", || async {
        (backend_status(&h).await["in_sync"] == true).then_some(())
    })
    .await;
    until_routed(&envoy, "web.localhost", "a", Duration::from_secs(5)).await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_services_become_tcp_proxy_listeners() {
    let Some(mut envoy) = Envoy::prepare() else {
        return;
    };
    let h = harbor_then_envoy(&mut envoy).await;
    let a = Upstream::start("tcp-a").await;
    let port = free_port();
    h.write_route(
        "db.route",
        &format!(
            "protocol = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nupstreams = [\"{}\"]\n",
            a.addr
        ),
    );
    // In step only once the listener is live: the first status that says so after the change
    // is one Envoy's listener already forwards for.
    let before = backend_status(&h).await["applied_revision"].clone();
    eventually(
        Duration::from_secs(5),
        "the tcp service applied and in step",
        || async {
            let s = backend_status(&h).await;
            (s["in_sync"] == true && s["applied_revision"] != before).then_some(())
        },
    )
    .await;
    let answer = through(
        &reqwest::Client::new(),
        ([127, 0, 0, 1], port).into(),
        "x",
        "/",
    )
    .await;
    assert_eq!(
        answer,
        Some((200, "tcp-a".to_owned())),
        "in step, and not forwarding"
    );
    until_forwarding(([127, 0, 0, 1], port).into(), "tcp-a").await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_envoy_refuses_is_isolated_and_reported() {
    let Some((envoy, h, a)) = envoy_routing_web().await else {
        return;
    };
    // A host name is not an endpoint address to Envoy: such a service resolves through DNS.
    let named = Upstream::start("named").await;
    h.register(
        json!({"name": "named", "upstream": format!("localhost:{}", named.addr.port()),
        "ttl_secs": 60, "host": "named.localhost"}),
    )
    .await;
    until_routed(&envoy, "named.localhost", "named", Duration::from_secs(5)).await;
    let mut events = h.events(None).await;

    // A TCP service on a port something else holds: Envoy cannot bind its listener and refuses
    // the listeners' update. The adapter finds that service, applies the rest, and names it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port to hold");
    let port = taken.local_addr().expect("its address").port();
    h.write_route(
        "db.route",
        &format!(
            "protocol = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nupstreams = [\"{}\"]\n",
            a.addr
        ),
    );
    let late = Upstream::start("late").await;
    h.register(json!({"name": "late", "upstream": late.addr.to_string(), "ttl_secs": 60, "host": "late.localhost"}))
        .await;
    let failed = events.next_of("backend_failed").await;
    assert_eq!(failed.data["service"], "db", "{:?}", failed.data);
    assert_eq!(failed.data["retryable"], false, "{:?}", failed.data);
    until_routed(&envoy, "late.localhost", "late", Duration::from_secs(5)).await;
    let (_, errors) = h.get("/api/v1/route-errors").await;
    let refused = errors["refused"].as_array().expect("a list").clone();
    assert_eq!(refused.len(), 1, "{errors}");
    assert_eq!(refused[0]["service"], "db");
    let status = backend_status(&h).await;
    assert_eq!(
        status["in_sync"], false,
        "a refused service is not in step: {status}"
    );
    let reason = refused[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("rejected") && reason.contains(&format!("cannot bind '127.0.0.1:{port}'")),
        "Envoy's own reason, from its configuration dump: {errors}"
    );
    // What Envoy ran before keeps serving, and so does every service it took.
    until_routed(&envoy, "web.localhost", "a", Duration::from_secs(2)).await;
    until_routed(&envoy, "named.localhost", "named", Duration::from_secs(2)).await;

    // Once the port is free and the route changes, the service is offered again and taken.
    drop(taken);
    h.write_route(
        "db.route",
        &format!(
            "protocol = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nupstreams = [\"{}\"]\n",
            late.addr
        ),
    );
    until_forwarding(([127, 0, 0, 1], port).into(), "late").await;
    eventually(Duration::from_secs(5), "the refusal cleared", || async {
        let (_, errors) = h.get("/api/v1/route-errors").await;
        (errors["refused"] == json!([])).then_some(())
    })
    .await;
    let status = backend_status(&h).await;
    assert_eq!(status["in_sync"], true, "all of it live again: {status}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_health_check_becomes_envoys_own() {
    let Some(mut envoy) = Envoy::prepare() else {
        return;
    };
    let h = harbor_for(&envoy).await;
    let (a, b) = (
        HttpBackend::start(Duration::ZERO).await,
        HttpBackend::start(Duration::ZERO).await,
    );
    h.write_route(
        "checked.route",
        &checked_route("checked.localhost", &[a.addr, b.addr]),
    );
    eventually(Duration::from_secs(3), "the cluster file", || async {
        std::fs::read_to_string(envoy.xds.join("cds.json"))
            .ok()
            .filter(|c| c.contains("harbor_checked"))
            .map(|_| ())
    })
    .await;
    envoy.start_process().await;
    health_checks_hold_out_a_failing_upstream(&envoy, "checked.localhost", &a, &b).await;
    let cds = std::fs::read_to_string(envoy.xds.join("cds.json")).expect("cds");
    assert!(cds.contains("\"http_health_check\""), "{cds}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_keeps_routing_while_harbor_is_stopped_and_restarted() {
    let Some(mut envoy) = Envoy::prepare() else {
        return;
    };
    let h = harbor_then_envoy(&mut envoy).await;
    let (web, db) = (Upstream::start("web").await, Upstream::start("db").await);
    h.register(json!({"name": "web", "upstream": web.addr.to_string(), "ttl_secs": 300, "host": "web.localhost"}))
        .await;
    let port = free_port();
    h.write_route(
        "db.route",
        &format!(
            "protocol = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nupstreams = [\"{}\"]\n",
            db.addr
        ),
    );
    until_routed(&envoy, "web.localhost", "web", Duration::from_secs(5)).await;
    let tcp = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    until_forwarding(tcp, "db").await;
    let (stop, stream) = steady_stream(vec![
        (envoy.listen_addr(), "web.localhost", "web"),
        (tcp, "x", "db"),
    ]);
    let h = h.restart_after(Duration::from_secs(10)).await;
    eventually(Duration::from_secs(10), "Envoy in step again", || async {
        let status = backend_status(&h).await;
        (status["in_sync"] == true).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let (ok, failed) = stream.await.expect("the stream");
    none_failed("envoy: a stop of 10 s and a restart", ok, &failed);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pushed_config_is_the_files_envoy_reads() {
    let Some((envoy, h, _a)) = envoy_routing_web().await else {
        return;
    };
    let (status, pushed) = h.get("/api/v1/backend/config").await;
    assert_eq!(status, 200, "{pushed}");
    assert_eq!(pushed["adapter"], "envoy");
    let documents = pushed["documents"].as_array().expect("documents");
    let mut on_disk: Vec<String> = std::fs::read_dir(&envoy.xds)
        .expect("the xDS directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut shown: Vec<String> = documents
        .iter()
        .map(|d| d["target"].as_str().unwrap_or_default().to_owned())
        .collect();
    shown.sort();
    assert_eq!(shown, on_disk);
    for d in documents {
        let file = envoy.xds.join(d["target"].as_str().unwrap_or_default());
        let written: Value =
            serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("JSON");
        assert_eq!(d["content"], written, "{}", file.display());
    }
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_address_that_is_not_envoy_is_a_clear_error() {
    let Some(envoy) = Envoy::prepare() else {
        return;
    };
    // Not Envoy at all: a plain web server where Envoy's admin API should be.
    let impostor = Upstream::start("not envoy").await;
    let admin: harbor::config::BaseUrl = format!("http://{}", impostor.addr).parse().expect("url");
    let dir = envoy.xds.clone();
    let h = common::start_with(move |c| {
        c.backend = BackendKind::Envoy;
        c.envoy_admin = admin.clone();
        c.envoy_dir = dir.clone();
    })
    .await;
    common::a_lasting_backend_error(&h, "does not answer as Envoy's admin API").await;
    h.shutdown().await;
}

/// `hash_key` by header and by cookie reaches Envoy: each session stays on one upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_or_cookie_hash_key_keeps_a_session_on_one_upstream() {
    let Some(mut envoy) = Envoy::prepare() else {
        return;
    };
    let h = harbor_then_envoy(&mut envoy).await;
    common::hash_keys_keep_sessions_on_one_upstream(&h, envoy.listen_addr()).await;
    h.shutdown().await;
}

/// A tcp service written while Envoy is down, on a port something else holds by the time Envoy
/// starts: Envoy runs the rest of Harbor's files and refuses that one listener, and no write of
/// Harbor's is there to see the verdict. Harbor's routes are live all the same, which a probe
/// of the routes alone took for in step. The probe looks for every listener and cluster
/// Harbor wrote, the listener is offered again, and Envoy's refusal of it is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_listener_envoy_cannot_bind_when_it_starts_is_not_in_step() {
    let Some(mut envoy) = Envoy::prepare() else {
        return;
    };
    let h = harbor_for(&envoy).await;
    let (web, db) = (Upstream::start("web").await, Upstream::start("db").await);
    h.register(json!({"name": "web", "upstream": web.addr.to_string(), "ttl_secs": 60, "host": "web.localhost"}))
        .await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port to hold");
    let port = taken.local_addr().expect("its address").port();
    let route = |upstream: std::net::SocketAddr| {
        format!("protocol = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nupstreams = [\"{upstream}\"]\n")
    };
    h.write_route("db.route", &route(db.addr));
    eventually(Duration::from_secs(3), "both services written", || async {
        let lds = std::fs::read_to_string(envoy.xds.join("lds.json")).unwrap_or_default();
        let rds = std::fs::read_to_string(envoy.xds.join("rds.json")).unwrap_or_default();
        (lds.contains("harbor_tcp_db") && rds.contains("web.localhost")).then_some(())
    })
    .await;
    envoy.start_process().await;
    until_routed(&envoy, "web.localhost", "web", Duration::from_secs(5)).await;

    let status = eventually(Duration::from_secs(10), "the listener reported", || async {
        let s = backend_status(&h).await;
        (s["refused"] != json!([])).then_some(s)
    })
    .await;
    assert_eq!(status["in_sync"], false, "{status}");
    assert_eq!(status["refused"][0]["service"], "db", "{status}");
    let reason = status["refused"][0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("cannot bind '127.0.0.1:{port}'")),
        "Envoy's own reason: {status}"
    );
    // And it stays so: no probe takes the live routes for the whole.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let s = backend_status(&h).await;
        assert_eq!(s["in_sync"], false, "{s}");
    }
    until_routed(&envoy, "web.localhost", "web", Duration::from_secs(2)).await;

    // Once the port is free and the route changes, the listener is offered again and live.
    drop(taken);
    h.write_route("db.route", &route(web.addr));
    until_forwarding(([127, 0, 0, 1], port).into(), "web").await;
    eventually(Duration::from_secs(5), "in step again", || async {
        let s = backend_status(&h).await;
        (s["in_sync"] == true && s["refused"] == json!([])).then_some(())
    })
    .await;

    // Envoy restarts while something else takes the port. Harbor writes nothing, and Envoy's
    // count of rejected updates starts again below what Harbor last saw: only the listener's
    // absence tells, and the probe finds it.
    let mut events = h.events(None).await;
    envoy.kill();
    let taken = eventually(Duration::from_secs(3), "the port held again", || async {
        std::net::TcpListener::bind(("127.0.0.1", port)).ok()
    })
    .await;
    envoy.start_process().await;
    until_routed(&envoy, "web.localhost", "web", Duration::from_secs(5)).await;
    let mut drifts = Vec::new();
    let status = eventually(
        Duration::from_secs(10),
        "the listener reported again",
        || {
            let h = &h;
            async move {
                let s = backend_status(h).await;
                (s["refused"] != json!([])).then_some(s)
            }
        },
    )
    .await;
    while let Some(e) = events.next_within(Duration::from_millis(100)).await {
        if e.event == "backend_drift" {
            drifts.push(e.data["detail"].as_str().unwrap_or_default().to_owned());
        }
    }
    assert!(
        !drifts.is_empty(),
        "nothing changed but Envoy: a probe found it"
    );
    assert_eq!(status["in_sync"], false, "{status}");
    assert_eq!(status["refused"][0]["service"], "db", "{status}");
    drop(taken);
    h.shutdown().await;
}
