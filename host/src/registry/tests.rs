use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::events::Since;
use crate::model::{RouteInput, UpstreamAddr};

fn registry() -> Arc<Registry> {
    let metrics = Arc::new(Metrics::new().unwrap());
    Arc::new(Registry::new(
        Arc::new(EventBus::new(1024)),
        metrics,
        LeaseLimits::default(),
    ))
}

fn name(n: &str) -> ServiceName {
    ServiceName::parse(n).unwrap()
}

pub(crate) fn reg(service: &str, upstream: &str, ttl_secs: u64) -> Registration {
    let name = name(service);
    let route = RouteInput::new(&name).validate().unwrap();
    reg_route(name, route, upstream, ttl_secs)
}

/// A registration of `route` for `name`, one instance at `upstream`.
pub(crate) fn reg_route(
    name: ServiceName,
    route: crate::model::Route,
    upstream: &str,
    ttl_secs: u64,
) -> Registration {
    Registration {
        route,
        name,
        upstream: Upstream {
            addr: UpstreamAddr::parse(upstream).unwrap(),
            weight: 1,
            labels: Default::default(),
        },
        ttl: Some(Duration::from_secs(ttl_secs)),
        meta: Meta::new(),
    }
}

fn event_kinds(r: &Registry, since: u64) -> Vec<&'static str> {
    match r.bus().since(since) {
        Since::Events(v) => v.iter().map(|e| e.event.kind()).collect(),
        Since::Gap => panic!("gap"),
    }
}

fn static_file(file: &str, text: &str) -> RouteFile {
    let stem = file.trim_end_matches(".route");
    let name = ServiceName::parse(stem).unwrap();
    RouteFile {
        file: file.to_owned(),
        parsed: crate::routes::parse_route(file, &name, text),
        name: Some(name),
    }
}

#[tokio::test(start_paused = true)]
async fn reaper_expires_at_the_deadline_and_renewal_postpones_it() {
    let r = registry();
    let cancel = CancellationToken::new();
    tokio::spawn(reaper(r.clone(), cancel.clone()));

    let short = r.register(reg("api", "127.0.0.1:9001", 2)).unwrap();
    let long = r.register(reg("api", "127.0.0.1:9002", 5)).unwrap();
    assert!(short.created && long.created);

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    r.renew(short.id, None).unwrap(); // now due at 3.5 s
    tokio::time::sleep(Duration::from_millis(1_999)).await;
    assert_eq!(r.counts().instances, 2, "renewed lease expired early");
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert_eq!(r.counts().instances, 1, "lease outlived its deadline");
    assert!(matches!(
        r.renew(short.id, None),
        Err(RegistryError::UnknownInstance(_))
    ));

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(r.counts().instances, 0);
    assert!(
        r.service(&name("api")).is_none(),
        "empty service not removed"
    );
    assert_eq!(r.live_leases(), 0);
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn an_earlier_deadline_wakes_the_sleeping_reaper() {
    let r = registry();
    tokio::spawn(reaper(r.clone(), CancellationToken::new()));
    r.register(reg("slow", "127.0.0.1:9001", 100)).unwrap();
    tokio::task::yield_now().await; // the reaper now sleeps until 100 s
    r.register(reg("fast", "127.0.0.1:9002", 1)).unwrap();
    tokio::time::sleep(Duration::from_millis(1_001)).await;
    assert!(r.service(&name("fast")).is_none());
    assert!(r.service(&name("slow")).is_some());
}

#[tokio::test]
async fn same_name_and_upstream_is_idempotent() {
    let r = registry();
    let first = r.register(reg("api", "127.0.0.1:9001", 10)).unwrap();
    let again = r.register(reg("api", "127.0.0.1:9001", 20)).unwrap();
    assert_eq!(first.id, again.id);
    assert!(!again.created);
    assert_eq!(again.ttl, Duration::from_secs(20));
    assert_eq!(r.counts().instances, 1);
    assert_eq!(r.live_leases(), 1);
}

#[tokio::test]
async fn events_describe_each_change() {
    let r = registry();
    let start = r.bus().last_id();
    let a = r.register(reg("api", "127.0.0.1:9001", 10)).unwrap();
    let b = r.register(reg("api", "127.0.0.1:9002", 10)).unwrap();
    r.renew(a.id, None).unwrap();
    r.deregister(a.id).unwrap();
    r.deregister(b.id).unwrap();
    assert_eq!(
        event_kinds(&r, start),
        [
            "service_added",
            "instance_registered",
            "instance_registered",
            "instance_renewed",
            "instance_deregistered",
            "instance_deregistered",
            "service_removed"
        ]
    );
}

#[tokio::test]
async fn ttl_bounds_and_conflicts_are_refused_without_change() {
    let r = registry();
    assert!(matches!(
        r.register(reg("api", "127.0.0.1:9001", 0)),
        Err(RegistryError::TtlOutOfBounds { .. })
    ));
    assert!(matches!(
        r.register(reg("api", "127.0.0.1:9001", 100_000)),
        Err(RegistryError::TtlOutOfBounds { .. })
    ));
    r.register(reg("api", "127.0.0.1:9001", 10)).unwrap();

    // Another service may not take api.localhost at path /.
    let mut thief = reg("thief", "127.0.0.1:9002", 10);
    thief.route = r
        .service(&name("api"))
        .map(|_| {
            let n = name("thief");
            RouteInput {
                host: Some("api.localhost"),
                ..RouteInput::new(&n)
            }
            .validate()
            .unwrap()
        })
        .unwrap();
    let err = r.register(thief).unwrap_err();
    assert!(matches!(err, RegistryError::Claimed { .. }), "{err}");
    assert_eq!(err.field(), Some("host"));

    // A second instance must share the service's routing.
    let mut odd = reg("api", "127.0.0.1:9003", 10);
    odd.route.public = true;
    let err = r.register(odd).unwrap_err();
    assert!(
        matches!(
            err,
            RegistryError::RouteMismatch {
                field: "public",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(r.counts().instances, 1);
    assert!(r.service(&name("thief")).is_none());
}

#[tokio::test]
async fn a_bad_route_file_keeps_the_last_good_version() {
    let r = registry();
    r.apply_routes(vec![static_file(
        "web.route",
        "upstreams = [\"127.0.0.1:3000\"]\n",
    )]);
    let good = r.service(&name("web")).unwrap();
    assert_eq!(good.upstreams[0].addr.as_str(), "127.0.0.1:3000");

    r.apply_routes(vec![static_file(
        "web.route",
        "upstreams = [\"127.0.0.1:3000\"\n",
    )]);
    let kept = r.service(&name("web")).unwrap();
    assert_eq!(kept.upstreams, good.upstreams);
    let errors = r.route_errors();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].file, "web.route");
    assert!(errors[0].line.is_some());

    r.apply_routes(vec![static_file(
        "web.route",
        "upstreams = [\"127.0.0.1:3001\"]\n",
    )]);
    assert_eq!(
        r.service(&name("web")).unwrap().upstreams[0].addr.as_str(),
        "127.0.0.1:3001"
    );
    assert!(r.route_errors().is_empty());

    r.apply_routes(vec![]);
    assert!(r.service(&name("web")).is_none());
}

#[tokio::test]
async fn a_contested_port_goes_to_the_file_that_sorts_first_whatever_came_first() {
    let r = registry();
    let tcp = |port: u16| {
        format!(
            "protocol = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nupstreams = [\"127.0.0.1:5432\"]\n"
        )
    };
    let both = || {
        vec![
            static_file("a-pg.route", &tcp(15432)),
            static_file("pg.route", &tcp(15432)),
        ]
    };
    r.apply_routes(vec![static_file("pg.route", &tcp(15432))]);
    assert!(r.service(&name("pg")).is_some());
    // A file that sorts first asks for the same port: it gets it, as it would at a start, so a
    // restart never changes which service holds a port.
    r.apply_routes(both());
    assert!(r.service(&name("a-pg")).is_some());
    assert!(r.service(&name("pg")).is_none());
    let errors = r.route_errors();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].file, "pg.route");
    assert_eq!(errors[0].line, Some(2));
    assert_eq!(errors[0].field.as_deref(), Some("listen"));
    let restarted = registry();
    restarted.apply_routes(both());
    assert!(restarted.service(&name("a-pg")).is_some());
    assert!(restarted.service(&name("pg")).is_none());

    // Once the winner moves, the other file gets the port on the next scan.
    r.apply_routes(vec![
        static_file("a-pg.route", &tcp(15433)),
        static_file("pg.route", &tcp(15432)),
    ]);
    assert!(r.service(&name("pg")).is_some());
    assert!(r.route_errors().is_empty());
}

#[tokio::test]
async fn a_contested_host_goes_to_the_file_that_sorts_first_whatever_came_first() {
    let r = registry();
    let shop =
        |port: u16| format!("host = \"shop.localhost\"\nupstreams = [\"127.0.0.1:{port}\"]\n");
    let both = || {
        vec![
            static_file("a-shop.route", &shop(3001)),
            static_file("shop.route", &shop(3002)),
        ]
    };
    r.apply_routes(vec![static_file("shop.route", &shop(3002))]);
    assert!(r.service(&name("shop")).is_some());
    r.apply_routes(both());
    assert!(r.service(&name("a-shop")).is_some());
    assert!(r.service(&name("shop")).is_none());
    let errors = r.route_errors();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].file, "shop.route");
    assert_eq!(errors[0].line, Some(1));
    assert_eq!(errors[0].field.as_deref(), Some("host"));
    let restarted = registry();
    restarted.apply_routes(both());
    assert!(restarted.service(&name("a-shop")).is_some());
    assert!(restarted.service(&name("shop")).is_none());
}

/// The limit of "the files alone decide": a broken winner holds the host with its last good
/// version, which lives only in memory, so a restart while it is broken gives the host away.
#[tokio::test]
async fn a_broken_winner_keeps_a_contested_host_only_until_a_restart() {
    let r = registry();
    let shop = "host = \"shop.localhost\"\nupstreams = [\"127.0.0.1:3002\"]\n";
    let files = |first: &str| {
        vec![
            static_file("a-shop.route", first),
            static_file("shop.route", shop),
        ]
    };
    r.apply_routes(files(
        "host = \"shop.localhost\"\nupstreams = [\"127.0.0.1:3001\"]\n",
    ));
    let broken = || files("host = \"shop.localhost\"\nupstreams = [\n");
    r.apply_routes(broken());
    assert!(r.service(&name("a-shop")).is_some());
    assert!(r.service(&name("shop")).is_none());
    assert_eq!(r.route_errors().len(), 2);

    let restarted = registry();
    restarted.apply_routes(broken());
    assert!(restarted.service(&name("a-shop")).is_none());
    let took = restarted.service(&name("shop")).unwrap();
    assert_eq!(took.upstreams[0].addr.as_str(), "127.0.0.1:3002");
    let errors = restarted.route_errors();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].file, "a-shop.route");
}

#[tokio::test]
async fn a_route_file_takes_over_an_ephemeral_name() {
    let r = registry();
    let grant = r.register(reg("api", "127.0.0.1:9001", 60)).unwrap();
    let start = r.bus().last_id();
    r.apply_routes(vec![static_file(
        "api.route",
        "upstreams = [\"127.0.0.1:3000\"]\n",
    )]);
    let svc = r.service(&name("api")).unwrap();
    assert_eq!(svc.kind, Kind::Static);
    assert!(matches!(
        r.renew(grant.id, None),
        Err(RegistryError::UnknownInstance(_))
    ));
    assert!(matches!(
        r.register(reg("api", "127.0.0.1:9001", 60)),
        Err(RegistryError::StaticName(_))
    ));
    assert_eq!(
        event_kinds(&r, start),
        ["instance_deregistered", "service_added"]
    );
    assert_eq!(r.live_leases(), 0);
}

#[tokio::test(start_paused = true)]
async fn restore_keeps_live_leases_and_drops_expired_ones() {
    let r = registry();
    r.register(reg("api", "127.0.0.1:9001", 60)).unwrap();
    let mut saved = r.ephemeral_instances();
    assert_eq!(saved.len(), 1);
    let mut expired = saved[0].clone();
    expired.id = InstanceId::random();
    expired.registration.upstream.addr = UpstreamAddr::parse("127.0.0.1:9002").unwrap();
    expired.expires_at = SystemTime::now() - Duration::from_secs(1);
    saved.push(expired);

    let fresh = registry();
    assert_eq!(fresh.restore(saved.clone()), 1);
    let svc = fresh.service(&name("api")).unwrap();
    assert_eq!(svc.instances.len(), 1);
    assert_eq!(svc.instances[0].id, saved[0].id);
    let remaining = fresh.expire_due(Instant::now()).unwrap() - Instant::now();
    assert!(remaining <= Duration::from_secs(60) && remaining > Duration::from_secs(58));
}

#[tokio::test]
async fn a_follower_applies_a_burst_of_changes_together_and_sees_them_all() {
    let r = registry();
    let applied = Arc::new(std::sync::Mutex::new(Vec::<usize>::new()));
    let cancel = CancellationToken::new();
    let follower = {
        let (r, applied, cancel) = (r.clone(), applied.clone(), cancel.clone());
        tokio::spawn(async move {
            crate::routing::on_routing_changes(&r, 0, &cancel, |services| {
                let instances = services.iter().map(|s| s.instances.len()).sum();
                applied.lock().unwrap().push(instances);
            })
            .await;
        })
    };
    const BURST: usize = 200;
    for i in 0..BURST {
        r.register(reg("api", &format!("127.0.0.1:{}", 10_000 + i), 60))
            .unwrap();
        tokio::task::yield_now().await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while applied.lock().unwrap().last() != Some(&BURST) {
        assert!(
            Instant::now() < deadline,
            "the last registration was never applied"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let calls = applied.lock().unwrap().len();
    // One call per change would be BURST + 1 (the first, empty, call included); calls are at
    // least REBUILD_GAP apart, so these need far fewer.
    assert!(calls < BURST / 4, "{calls} calls for {BURST} changes");
    cancel.cancel();
    follower.await.unwrap();
}
