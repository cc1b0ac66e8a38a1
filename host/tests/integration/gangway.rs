//! Gangway end to end: the page in a real headless Chromium against a real daemon, and the public
//! data it reads (snapshot, event stream, status), checked directly as well.
//!
//! Browser tests take one lock so that only one Chromium runs at a time: they are timed (a row
//! within a second, a filter within 100 ms), and several browsers on a small machine would measure
//! the machine, not the page.

#[path = "common/browser.rs"]
mod browser;
use crate::common;

use std::time::{Duration, Instant};

use browser::Browser;
use common::{SseEvent, SseReader, TestHarbor, start, start_with};
use futures_util::StreamExt;
use serde_json::{Value, json};

static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ROW_COUNT: &str = "return document.querySelectorAll('#rows tr').length";

/// Script: the row of service `name` exists (visible or filtered out).
fn row_exists(name: &str) -> String {
    format!("return document.querySelector('#rows tr[data-name=\"{name}\"]') !== null")
}

/// Opens the page and waits for its first snapshot.
async fn open_page(b: &Browser, h: &TestHarbor) {
    b.goto(&h.url("/")).await;
    b.wait_for(
        Duration::from_secs(10),
        "the first snapshot",
        "return document.documentElement.dataset.snapshot === '1' \
         && document.getElementById('conn').dataset.state === 'live'",
    )
    .await;
}

async fn names_on_page(b: &Browser) -> Vec<String> {
    let v = b
        .value("[...document.querySelectorAll('#rows tr')].map(r => r.dataset.name)")
        .await;
    serde_json::from_value(v).expect("names")
}

/// Reads public events until one satisfies `done`, returning every event read on the way.
async fn read_until(
    stream: &mut SseReader,
    what: &str,
    done: impl Fn(&SseEvent) -> bool,
) -> Vec<SseEvent> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = stream
            .next_within(left)
            .await
            .unwrap_or_else(|| panic!("no {what} within 5 s; saw {seen:?}"));
        let stop = done(&e);
        seen.push(e);
        if stop {
            return seen;
        }
    }
}

fn is_service(e: &SseEvent, name: &str) -> bool {
    e.event == "service" && e.data["service"]["name"] == name
}

#[tokio::test]
async fn the_page_renders_the_static_services() {
    let Some(tools) = browser::tools() else {
        return;
    };
    let _one = ONE_BROWSER.lock().await;
    let h = start().await;
    h.write_route(
        "whoami.route",
        "host = \"whoami.localhost\"\npath = \"/\"\nupstreams = [\"127.0.0.1:9001\", { addr = \"127.0.0.1:9002\", weight = 2 }]\npublic = true\n",
    );
    h.write_route(
        "postgres.route",
        "protocol = \"tcp\"\nlisten = \"127.0.0.1:15432\"\nupstreams = [\"127.0.0.1:5432\"]\nstrategy = \"least-connections\"\npublic = true\n",
    );
    h.write_route(
        "grafana.route",
        "host = \"grafana.localhost\"\nupstreams = [\"127.0.0.1:3000\"]\npublic = false\n",
    );
    common::eventually(Duration::from_secs(3), "routes loaded", || async {
        (h.get("/api/v1/services").await.1["services"]
            .as_array()?
            .len()
            == 3)
            .then_some(())
    })
    .await;

    let b = Browser::launch(&tools).await;
    open_page(&b, &h).await;
    assert_eq!(names_on_page(&b).await, ["postgres", "whoami"]);

    let row = b
        .eval(
            "const r = document.querySelector('#rows tr[data-name=whoami]');
             return {
               link: r.querySelector('a').getAttribute('href'),
               text: r.innerText,
               kind: r.querySelector('.kind').textContent,
               ups: r.querySelectorAll('.ups li').length,
               tcp: document.querySelector('#rows tr[data-name=postgres] .addr').textContent,
               strategy: document.querySelector('#rows tr[data-name=postgres]').cells[4].textContent,
             }",
            json!([]),
        )
        .await;
    let port = h.harbor().proxy_addr().expect("the embedded proxy").port();
    assert_eq!(row["link"], format!("http://whoami.localhost:{port}/"));
    assert_eq!(row["kind"], "static");
    assert_eq!(row["ups"], 2);
    assert!(row["text"].as_str().unwrap().contains("127.0.0.1:9002"));
    assert!(row["text"].as_str().unwrap().contains("up"), "{row}");
    assert_eq!(row["tcp"], "tcp 127.0.0.1:15432");
    assert_eq!(row["strategy"], "least-connections");

    let strip = b
        .value(
            "['st-backend','st-sync','st-plugins','st-version','st-uptime','st-https']
               .map(id => document.getElementById(id).textContent)",
        )
        .await;
    assert_eq!(strip[0], "embedded");
    assert_eq!(strip[1], "built in");
    assert!(strip[2].as_str().unwrap().parse::<u32>().unwrap() >= 8);
    assert_eq!(strip[3], env!("CARGO_PKG_VERSION"));
    assert_eq!(strip[5], "off", "no TLS listener");

    // Everything came from Harbor itself: no request left for another origin.
    let foreign = b
        .value(
            "performance.getEntriesByType('resource')
               .map(e => e.name).filter(u => !u.startsWith(location.origin))",
        )
        .await;
    assert_eq!(foreign, json!([]));

    // Keyboard: `/` jumps to the filter, typing filters, Escape clears.
    b.press("/").await;
    let focused = b.value("document.activeElement.id").await;
    assert_eq!(focused, "filter");
    b.type_into("#filter", "whoami.loc").await;
    let count = b
        .value("document.getElementById('count').textContent")
        .await;
    assert_eq!(count, "1 of 2 services");
    b.press("\u{E00C}").await;
    let count = b
        .value("document.getElementById('count').textContent")
        .await;
    assert_eq!(count, "2 public services");

    assert_contrast(&b, "light").await;
    b.screenshot("static-light.png").await;
    b.color_scheme("dark").await;
    assert_contrast(&b, "dark").await;
    let bg = b
        .value("getComputedStyle(document.body).backgroundColor")
        .await;
    assert_eq!(bg, "rgb(15, 19, 23)", "the dark theme follows the system");
    b.screenshot("static-dark.png").await;
    b.color_scheme("light").await;
    b.set_window(390, 844).await;
    let overflow = b
        .value("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        .await;
    assert_eq!(overflow, 0, "no sideways scrolling on a phone");
    b.screenshot("static-phone.png").await;
    b.close().await;
    h.shutdown().await;
}

/// Every piece of text on the page against what is behind it: at least 4.5:1 (WCAG AA).
async fn assert_contrast(b: &Browser, theme: &str) {
    let low = b
        .eval(
            "const rgb = (c) => (c.match(/[\\d.]+/g) || []).map(Number);
             const lum = ([r, g, b]) => {
               const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
               return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
             };
             const behind = (el) => {
               for (let e = el; e; e = e.parentElement) {
                 const c = rgb(getComputedStyle(e).backgroundColor);
                 if (c.length === 3 || (c.length === 4 && c[3] > 0)) return c.slice(0, 3);
               }
               return [255, 255, 255];
             };
             const low = [];
             const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
             while (walker.nextNode()) {
               const el = walker.currentNode.parentElement;
               if (!walker.currentNode.textContent.trim() || el.closest('[hidden], .sr-only, .skip')) continue;
               const fg = lum(rgb(getComputedStyle(el).color));
               const bg = lum(behind(el));
               const ratio = (Math.max(fg, bg) + 0.05) / (Math.min(fg, bg) + 0.05);
               if (ratio < 4.5) low.push(`${el.tagName}.${el.className}: ${ratio.toFixed(2)} '${walker.currentNode.textContent.trim()}'`);
             }
             return low",
            json!([]),
        )
        .await;
    assert_eq!(low, json!([]), "text below 4.5:1 in the {theme} theme");
}

#[tokio::test]
async fn a_registration_appears_without_reload_within_a_second_and_an_expiry_removes_it() {
    let Some(tools) = browser::tools() else {
        return;
    };
    let _one = ONE_BROWSER.lock().await;
    let h = start().await;
    let b = Browser::launch(&tools).await;
    open_page(&b, &h).await;
    // The empty state teaches how to add a first service.
    let empty = b
        .eval(
            "const e = document.getElementById('empty');
             return e.hidden ? null : e.innerText",
            json!([]),
        )
        .await;
    let empty = empty.as_str().expect("the empty state shows");
    assert!(
        empty.contains(".route") && empty.contains("curl"),
        "{empty}"
    );
    b.screenshot("empty.png").await;
    // A marker that a reload would wipe.
    b.eval("window.__stayed = true", json!([])).await;

    let start = Instant::now();
    h.register(json!({
        "name": "preview-42", "upstream": "127.0.0.1:9042", "ttl_secs": 2, "public": true,
        "host": "pr42.preview.localhost",
    }))
    .await;
    let (_, _) = b
        .wait_for(
            Duration::from_secs(1).saturating_sub(start.elapsed()),
            "the new row within 1 s of registering",
            &row_exists("preview-42"),
        )
        .await;
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");
    eprintln!("registration → row: {took:?}");
    assert_eq!(b.value("window.__stayed").await, true);

    // The lease counts down, and near its end it warns.
    let (lease, _) = b
        .wait_for(
            Duration::from_secs(2),
            "the lease warning",
            "const l = document.querySelector('#rows tr[data-name=\"preview-42\"] .lease');
             return l && (l.classList.contains('warn') || l.classList.contains('gone'))
               ? l.textContent : null",
        )
        .await;
    assert!(
        lease.as_str().unwrap().ends_with('s') || lease == "expiring…",
        "{lease}"
    );
    let kind = b
        .value("document.querySelector('#rows tr[data-name=\"preview-42\"] .kind').textContent")
        .await;
    assert_eq!(kind, "ephemeral");
    b.screenshot("ephemeral.png").await;

    // No renewal: the lease runs out and the row goes.
    b.wait_for(
        Duration::from_secs(4),
        "the row to go when the lease expires",
        "return document.querySelector('#rows tr[data-name=\"preview-42\"]') === null",
    )
    .await;
    assert_eq!(b.value("window.__stayed").await, true);
    b.close().await;
    h.shutdown().await;
}

#[tokio::test]
async fn a_private_service_never_reaches_the_page_or_the_public_stream() {
    let Some(tools) = browser::tools() else {
        return;
    };
    let _one = ONE_BROWSER.lock().await;
    let h = start().await;
    h.write_route(
        "turncoat.route",
        "upstreams = [\"127.0.0.1:9100\"]\npublic = true\nmeta = { owner = \"ops\" }\n",
    );
    common::eventually(Duration::from_secs(3), "route loaded", || async {
        h.service("turncoat").await
    })
    .await;
    let b = Browser::launch(&tools).await;
    open_page(&b, &h).await;
    assert_eq!(names_on_page(&b).await, ["turncoat"]);

    let mut public = h.sse("/api/v1/catalog/events", None).await;
    let snapshot = public.next().await;
    assert_eq!(snapshot.event, "snapshot");
    assert_eq!(snapshot.data["services"][0]["name"], "turncoat");
    let snapshot_text = snapshot.data.to_string();
    assert!(!snapshot_text.contains("owner"), "metadata leaked");
    assert!(
        !snapshot_text.contains(h.routes.path().to_str().unwrap()),
        "a file path leaked"
    );

    // Everything a private service can go through.
    let grant = h
        .register(json!({"name": "secret-db", "upstream": "127.0.0.1:9200", "meta": {"k": "v"}}))
        .await;
    let id = grant["id"].as_str().unwrap().to_owned();
    h.put(&format!("/api/v1/services/{id}/lease")).await;
    let (status, body) = h
        .client
        .put(h.url("/api/v1/services/secret-db/strategy"))
        .json(&json!({"strategy": "random"}))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .unwrap();
    assert_eq!(status, 200, "{:?}", body.text().await);
    h.harbor()
        .registry()
        .bus()
        .publish(harbor::events::Event::UpstreamHealth {
            name: harbor::model::ServiceName::parse("secret-db").unwrap(),
            upstream: "127.0.0.1:9200".into(),
            healthy: false,
        });
    h.write_route(
        "backroom.route",
        "upstreams = [\"127.0.0.1:9300\"]\npublic = false\n",
    );
    // A public service turns private: it must leave the page and the stream.
    h.write_route(
        "turncoat.route",
        "upstreams = [\"127.0.0.1:9100\"]\npublic = false\n",
    );
    assert_eq!(h.delete(&format!("/api/v1/services/{id}")).await, 204);
    common::eventually(
        Duration::from_secs(3),
        "the route files taken in",
        || async {
            let turned = h.service("turncoat").await?["public"] == false;
            (turned && h.service("backroom").await.is_some()).then_some(())
        },
    )
    .await;
    // The marker: once it is seen, everything before it has been through the public view.
    h.register(json!({"name": "marker", "upstream": "127.0.0.1:9400", "public": true}))
        .await;

    let seen = read_until(&mut public, "the marker", |e| is_service(e, "marker")).await;
    assert!(
        seen.iter()
            .any(|e| e.event == "service_removed" && e.data["name"] == "turncoat"),
        "a service that turned private is removed: {seen:?}"
    );
    for e in &seen {
        let text = e.data.to_string();
        for secret in ["secret-db", "backroom", "9200", "9300"] {
            assert!(
                !text.contains(secret),
                "{secret} reached the public stream: {e:?}"
            );
        }
        assert!(
            ["service", "service_removed"].contains(&e.event.as_str()),
            "{e:?}"
        );
        assert!(e.data["service"].get("instances").is_none());
        assert!(e.data["service"].get("meta").is_none());
        assert!(e.data["service"].get("public").is_none());
    }

    b.wait_for(
        Duration::from_secs(2),
        "the marker row",
        &row_exists("marker"),
    )
    .await;
    assert_eq!(names_on_page(&b).await, ["marker"]);
    let html = b.value("document.documentElement.outerHTML").await;
    for secret in ["secret-db", "backroom", "turncoat"] {
        assert!(
            !html.as_str().unwrap().contains(secret),
            "{secret} on the page"
        );
    }

    // Health of a public upstream does reach the page.
    h.harbor()
        .registry()
        .bus()
        .publish(harbor::events::Event::UpstreamHealth {
            name: harbor::model::ServiceName::parse("marker").unwrap(),
            upstream: "127.0.0.1:9400".into(),
            healthy: false,
        });
    b.wait_for(
        Duration::from_secs(1),
        "the upstream shown down",
        "return document.querySelector('#rows tr[data-name=marker] .health.down') !== null",
    )
    .await;

    // Load changes without events; it is sampled and reaches the stream and the page.
    let balancer = h
        .harbor()
        .routing()
        .balancer(&harbor::model::ServiceName::parse("marker").unwrap())
        .expect("marker is routed");
    let picked: Vec<_> = (0..3)
        .map(|_| balancer.pick(None, &[]).expect("a backend"))
        .collect();
    let _in_flight: Vec<_> = picked.iter().map(|p| p.start().expect("a load")).collect();
    let loads = read_until(&mut public, "a load event", |e| e.event == "load").await;
    let load = loads.last().unwrap();
    assert_eq!(load.data["services"][0]["name"], "marker");
    assert_eq!(load.data["services"][0]["upstreams"][0]["in_flight"], 3);
    b.wait_for(
        Duration::from_secs(2),
        "the load shown",
        "const l = document.querySelector('#rows tr[data-name=marker] .load');
         return l && l.textContent === '3 in flight'",
    )
    .await;

    // The one-shot catalog agrees.
    let (_, catalog) = h.get("/api/v1/catalog").await;
    assert_eq!(catalog["services"].as_array().unwrap().len(), 1);
    b.close().await;
    h.shutdown().await;
}

fn fixed_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

#[tokio::test]
async fn after_a_restart_the_page_reconnects_and_shows_the_current_state() {
    let Some(tools) = browser::tools() else {
        return;
    };
    let _one = ONE_BROWSER.lock().await;
    let addr = fixed_port();
    // The directory is not followed, so that changes made now only show after the restart.
    let h = start_with(move |c| {
        c.api = vec![harbor::config::ListenAddr::Tcp(addr)];
        c.watch = false;
        c.rescan_interval = None;
    })
    .await;
    h.write_route(
        "docs.route",
        "upstreams = [\"127.0.0.1:3000\"]\npublic = true\n",
    );
    h.harbor().rescan();
    common::eventually(Duration::from_secs(3), "docs loaded", || async {
        h.service("docs").await
    })
    .await;
    h.register(
        json!({"name": "api", "upstream": "127.0.0.1:9001", "ttl_secs": 3600, "public": true}),
    )
    .await;
    let b = Browser::launch(&tools).await;
    open_page(&b, &h).await;
    assert_eq!(names_on_page(&b).await, ["api", "docs"]);

    // Every state the connection indicator goes through from now on.
    b.eval(
        "window.__states = [];
         const conn = document.getElementById('conn');
         new MutationObserver(() => window.__states.push(conn.dataset.state))
           .observe(conn, { attributes: true, attributeFilter: ['data-state'] });",
        json!([]),
    )
    .await;
    std::fs::remove_file(h.routes.path().join("docs.route")).unwrap();
    h.write_route(
        "fresh.route",
        "upstreams = [\"127.0.0.1:3001\"]\npublic = true\n",
    );
    let h = h.restart().await;
    assert_eq!(h.base, format!("http://{addr}"));

    b.wait_for(
        Duration::from_secs(10),
        "a new snapshot after the restart",
        "return document.documentElement.dataset.snapshot === '2' \
         && document.getElementById('conn').dataset.state === 'live'",
    )
    .await;
    let states = b.value("window.__states").await;
    assert_eq!(
        states,
        json!(["reconnecting", "live"]),
        "the indicator said so"
    );
    // The saved registration is back once, the deleted file's service is gone, the new one is
    // there.
    assert_eq!(names_on_page(&b).await, ["api", "fresh"]);
    let count = b
        .value("document.getElementById('count').textContent")
        .await;
    assert_eq!(count, "2 public services");

    // And the stream is live again.
    h.register(json!({"name": "after", "upstream": "127.0.0.1:9002", "public": true}))
        .await;
    b.wait_for(
        Duration::from_secs(1),
        "a row after the restart",
        &row_exists("after"),
    )
    .await;
    assert_eq!(names_on_page(&b).await, ["after", "api", "fresh"]);
    b.close().await;
    h.shutdown().await;
}

#[tokio::test]
async fn five_hundred_services_render_and_filter_within_100_ms() {
    let Some(tools) = browser::tools() else {
        return;
    };
    let _one = ONE_BROWSER.lock().await;
    let h = start().await;
    let hr = &h;
    futures_util::stream::iter(0..500)
        .map(|n| async move {
            hr.register(json!({
                "name": format!("svc-{n:03}"),
                "upstream": format!("127.0.0.1:{}", 20000 + n),
                "ttl_secs": 3600,
                "public": true,
                "host": format!("app{n}.team{}.localhost", n % 7),
            }))
            .await
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;

    let b = Browser::launch(&tools).await;
    let opened = Instant::now();
    open_page(&b, &h).await;
    assert_eq!(b.eval(ROW_COUNT, json!([])).await, 500);
    eprintln!(
        "500 services on screen {:?} after opening",
        opened.elapsed()
    );

    let mut times = Vec::new();
    for (query, expect) in [
        ("svc-123", 1),
        ("team3", 71),
        ("svc-4", 100),
        ("nothing-like-this", 0),
        ("", 500),
        ("APP42.", 1),
        ("svc-0", 100),
        ("", 500),
    ] {
        let m = b
            .eval(
                "const input = document.getElementById('filter');
                 const t0 = performance.now();
                 input.value = arguments[0];
                 input.dispatchEvent(new Event('input', { bubbles: true }));
                 void document.getElementById('services').offsetHeight;
                 const ms = performance.now() - t0;
                 const shown = [...document.querySelectorAll('#rows tr')].filter(r => !r.hidden).length;
                 return { ms, shown }",
                json!([query]),
            )
            .await;
        assert_eq!(m["shown"], expect, "filter {query:?}");
        times.push(m["ms"].as_f64().unwrap());
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = (sorted[3] + sorted[4]) / 2.0;
    eprintln!("filtering 500 rows (ms, filter + layout): {times:?}; median {median:.2} ms");
    assert!(
        times.iter().all(|&t| t < 100.0),
        "every filter must answer in under 100 ms: {times:?}"
    );

    // Real typing goes through the same path.
    b.type_into("#filter", "svc-49").await;
    let shown = b
        .value("[...document.querySelectorAll('#rows tr')].filter(r => !r.hidden).length")
        .await;
    assert_eq!(shown, 10);
    let count = b
        .value("document.getElementById('count').textContent")
        .await;
    assert_eq!(count, "10 of 500 services");
    let compact = b.value("document.body.classList.contains('compact')").await;
    assert_eq!(compact, true, "hundreds of services start compact");

    // Sorting by the address puts team0 hosts first.
    b.eval(
        "document.getElementById('filter').value = '';
         document.getElementById('filter').dispatchEvent(new Event('input'));
         document.querySelector('th[data-sort=address] button').click()",
        json!([]),
    )
    .await;
    let first = b
        .value("document.querySelector('#rows tr').dataset.name")
        .await;
    assert_eq!(first, "svc-000");
    let sorted_attr = b
        .value("document.querySelector('th[data-sort=address]').getAttribute('aria-sort')")
        .await;
    assert_eq!(sorted_attr, "ascending");
    b.screenshot("five-hundred-compact.png").await;
    b.close().await;
    h.shutdown().await;
}

#[tokio::test]
async fn the_public_stream_resumes_with_last_event_id_and_refuses_bad_input() {
    let h = start().await;
    let mut stream = h.sse("/api/v1/catalog/events", None).await;
    let snapshot = stream.next().await;
    assert_eq!(snapshot.event, "snapshot");
    assert_eq!(snapshot.data["status"]["backend"], "embedded");
    assert_eq!(snapshot.data["status"]["in_sync"], Value::Null);
    h.register(json!({"name": "one", "upstream": "127.0.0.1:9001", "public": true}))
        .await;
    let seen = stream.next_of("service").await;
    drop(stream);

    h.register(json!({"name": "two", "upstream": "127.0.0.1:9002", "public": true}))
        .await;
    h.register(json!({"name": "hush", "upstream": "127.0.0.1:9003"}))
        .await;
    h.register(json!({"name": "one", "upstream": "127.0.0.1:9004", "public": true}))
        .await;

    let mut resumed = h.sse("/api/v1/catalog/events", seen.id.as_deref()).await;
    let two = resumed.next().await;
    assert!(is_service(&two, "two"), "{two:?}");
    let one = resumed.next().await;
    assert!(is_service(&one, "one"), "{one:?}");
    assert_eq!(
        one.data["service"]["upstreams"].as_array().unwrap().len(),
        2
    );
    assert!(
        resumed
            .next_within(Duration::from_millis(200))
            .await
            .is_none()
    );

    // The same resumption through the query, for a page that had to open a new EventSource.
    let mut by_query = h
        .sse(
            &format!("/api/v1/catalog/events?last_event_id={}", two.id.unwrap()),
            None,
        )
        .await;
    assert!(is_service(&by_query.next().await, "one"));

    // An id from another run gets a snapshot.
    let mut stranger = h.sse("/api/v1/catalog/events", Some("12")).await;
    assert_eq!(stranger.next().await.event, "snapshot");

    for bad in ["last_event_id=soon", "since=3"] {
        let resp = h
            .client
            .get(h.url(&format!("/api/v1/catalog/events?{bad}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{bad}");
        let body: Value = resp.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().len() > 10, "{body}");
    }

    let (status, body) = h.get("/api/v1/status").await;
    assert_eq!(status, 200);
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert!(body["plugins"].as_u64().unwrap() >= 8);
    assert!(body["uptime_secs"].is_u64());
    h.shutdown().await;
}

#[tokio::test]
async fn the_gangway_listener_serves_the_page_and_public_data_only() {
    let h = start_with(|c| c.gangway_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let gangway = format!("http://{}", h.harbor().gangway_addr().expect("bound"));
    let get = |path: &str| h.client.get(format!("{gangway}{path}")).send();

    let page = get("/").await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let etag = page.headers()["etag"].to_str().unwrap().to_owned();
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );
    let again = h
        .client
        .get(format!("{gangway}/"))
        .header("If-None-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    for (path, ty) in [
        ("/gangway/app.js", "text/javascript; charset=utf-8"),
        ("/gangway/style.css", "text/css; charset=utf-8"),
        ("/gangway/favicon.svg", "image/svg+xml"),
    ] {
        let resp = get(path).await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()["content-type"], ty, "{path}");
    }
    assert_eq!(get("/api/v1/catalog").await.unwrap().status(), 200);
    assert_eq!(get("/api/v1/status").await.unwrap().status(), 200);

    // Nothing private and nothing that changes state.
    for path in [
        "/api/v1/services",
        "/api/v1/events",
        "/metrics",
        "/api/v1/plugins",
    ] {
        let resp = get(path).await.unwrap();
        assert_eq!(resp.status(), 404, "{path}");
        let body: Value = resp.json().await.unwrap();
        assert!(body["error"].is_string(), "{path}: {body}");
    }
    let post = h
        .client
        .post(format!("{gangway}/api/v1/services"))
        .json(&json!({"name": "x", "upstream": "127.0.0.1:1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 404);
    assert!(h.service("x").await.is_none());

    // The API listener serves the page too.
    let (status, _) = h.get("/api/v1/status").await;
    assert_eq!(status, 200);
    let page = h.client.get(h.url("/")).send().await.unwrap();
    assert_eq!(page.headers()["etag"].to_str().unwrap(), etag);
    h.shutdown().await;
}

#[tokio::test]
async fn plugin_events_reach_the_public_stream_as_name_and_state_only() {
    let h = start().await;
    let mut stream = h.sse("/api/v1/catalog/events", None).await;
    let snapshot = stream.next().await;
    let plugins = snapshot.data["status"]["plugins"].as_u64().unwrap();
    let bus = h.harbor().registry().bus();
    bus.publish(harbor::events::Event::RouteFileError {
        error: harbor::events::RouteFileError {
            file: "/etc/harbor/routes.d/private-thing.route".into(),
            line: Some(1),
            column: None,
            field: None,
            reason: "bad".into(),
        },
    });
    bus.publish(harbor::events::Event::PluginFault {
        name: "canary".into(),
        fault: harbor::plugins::FaultKind::Trap,
        message: "wasm trap at /home/someone/src/lib.rs:12".into(),
    });
    let e = stream.next().await;
    assert_eq!(e.event, "plugin");
    assert_eq!(
        e.data,
        json!({"type": "plugin", "name": "canary", "state": "fault", "plugins": plugins})
    );
    assert!(
        stream
            .next_within(Duration::from_millis(200))
            .await
            .is_none()
    );
    h.shutdown().await;
}

/// A public service with a shadow strategy shows on the page how often the shadow agrees with
/// the live strategy, updated as traffic flows.
#[tokio::test]
async fn a_shadows_agreement_shows_on_the_page() {
    let Some(tools) = browser::tools() else {
        return;
    };
    let _one = ONE_BROWSER.lock().await;
    let h = start().await;
    let upstreams = [
        common::proxies::Upstream::start("a").await,
        common::proxies::Upstream::start("b").await,
        common::proxies::Upstream::start("c").await,
    ];
    let list: Vec<String> = upstreams
        .iter()
        .map(|u| format!("\"{}\"", u.addr))
        .collect();
    h.write_route(
        "web.route",
        &format!(
            "host = \"web.localhost\"\npublic = true\nupstreams = [{}]\n",
            list.join(", ")
        ),
    );
    common::eventually(Duration::from_secs(5), "the route loaded", || async {
        let routing = h.harbor().routing().clone();
        let name = harbor::model::ServiceName::parse("web").ok()?;
        routing
            .balancer(&name)
            .filter(|b| b.backends().backends.len() == 3)
    })
    .await;
    let b = Browser::launch(&tools).await;
    open_page(&b, &h).await;
    let resp = h
        .client
        .put(h.url("/api/v1/services/web/strategy"))
        .json(&json!({"shadow": "first"}))
        .send()
        .await
        .expect("the API answers");
    assert_eq!(resp.status().as_u16(), 200);
    let proxy = h.harbor().proxy_addr().expect("the proxy");
    let client = reqwest::Client::new();
    for _ in 0..30 {
        let got = common::proxies::through(&client, proxy, "web.localhost", "/").await;
        assert!(matches!(got, Some((200, _))), "{got:?}");
    }
    // Round-robin over three, `first` always the first: one pick in three agrees.
    b.wait_for(
        Duration::from_secs(5),
        "the shadow's agreement on the page",
        "const s = document.querySelector('#rows tr[data-name=web] .shadow');
         return s !== null && s.textContent === 'shadow first: 33 % agree'",
    )
    .await;
    h.shutdown().await;
}

/// The status strip says how many services lack the certificate they ask for, live: a public
/// name whose ACME CA cannot be reached has none, and the count goes back to nothing when its
/// route goes. Which service and why stay on the operator's API.
#[tokio::test]
async fn the_https_line_counts_services_without_their_certificate() {
    let Some(tools) = browser::tools() else {
        return;
    };
    let _one = ONE_BROWSER.lock().await;
    let h = start_with(|c| {
        c.tls_listen = Some("127.0.0.1:0".parse().expect("addr"));
        // Nothing listens there: every order fails.
        c.acme_directory = "https://127.0.0.1:9/dir".to_owned();
        c.rescan_interval = Some(Duration::from_millis(200));
    })
    .await;
    let b = Browser::launch(&tools).await;
    open_page(&b, &h).await;
    b.wait_for(
        Duration::from_secs(5),
        "HTTPS ok",
        "return document.getElementById('st-https').textContent === 'ok'",
    )
    .await;
    h.write_route(
        "shop.route",
        "host = \"shop.example.com\"\npublic = true\nupstreams = [\"127.0.0.1:9\"]\n",
    );
    b.wait_for(
        Duration::from_secs(10),
        "one service without its certificate",
        "const s = document.getElementById('st-https');
         return s.textContent === '1 without certificate' && s.className === 'bad'",
    )
    .await;
    let (_, status) = h.get("/api/v1/status").await;
    let reason = status["tls"]["problems"][0]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("shop.example.com"), "{status}");
    std::fs::remove_file(h.routes.path().join("shop.route")).expect("removed");
    b.wait_for(
        Duration::from_secs(10),
        "HTTPS ok again",
        "return document.getElementById('st-https').textContent === 'ok'",
    )
    .await;
    h.shutdown().await;
}
