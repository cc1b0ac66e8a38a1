//! Which of Harbor's listeners and clusters Envoy runs, read from its configuration dump
//! (pure, unit-tested natively).
//!
//! `/config_dump?resource=dynamic_listeners` gives one entry per listener name: `active_state`
//! once Envoy serves it (an update of it may be warming or failed beside), `warming_state`
//! while a new one waits for its routes, `error_state` alone when Envoy refused it (a port it
//! cannot bind). A nameless entry repeats each error. `dynamic_active_clusters` and
//! `dynamic_warming_clusters` list clusters under `cluster.name`; Envoy keeps no state of a
//! cluster it refused. `dynamic_active_secrets` lists the secrets it took, by `name`, each with
//! the `version_info` of the file it read last, and `dynamic_route_configs` the route
//! configurations likewise, under `route_config.name`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// How Envoy holds one of Harbor's resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    Active,
    /// Taken, and not serving yet: a listener waiting for its routes, a cluster for its
    /// endpoints or first health checks.
    Warming,
    /// Not held at all, with Envoy's reason when it gave one.
    Missing(Option<String>),
}

/// A resource Harbor wrote that Envoy does not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// `listener` or `cluster`.
    pub what: &'static str,
    pub name: String,
    pub standing: Standing,
}

impl Gap {
    pub fn describe(&self) -> String {
        let Gap { what, name, .. } = self;
        match &self.standing {
            Standing::Active => format!("Envoy runs {what} {name}"),
            Standing::Warming => format!("Envoy is still warming {what} {name}"),
            Standing::Missing(None) => format!("Envoy does not run {what} {name} yet"),
            Standing::Missing(Some(why)) => {
                format!("Envoy does not run {what} {name} yet: {why}")
            }
        }
    }
}

/// The `name` of each resource in a file's resources.
pub fn names(resources: &Value) -> Vec<String> {
    resources
        .as_array()
        .map(|all| {
            all.iter()
                .filter_map(|r| r["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// How Envoy holds the listener `name`, from its `dynamic_listeners` dump.
pub fn listener(dump: &Value, name: &str) -> Standing {
    let entries: Vec<&Value> = dump["configs"]
        .as_array()
        .map(|all| all.iter().filter(|c| c["name"] == name).collect())
        .unwrap_or_default();
    if entries.iter().any(|c| !c["active_state"].is_null()) {
        Standing::Active
    } else if entries.iter().any(|c| !c["warming_state"].is_null()) {
        Standing::Warming
    } else {
        Standing::Missing(
            entries
                .iter()
                .find_map(|c| c["error_state"]["details"].as_str())
                .map(str::to_owned),
        )
    }
}

/// The cluster names in a `dynamic_active_clusters` or `dynamic_warming_clusters` dump.
pub fn clusters(dump: &Value) -> BTreeSet<String> {
    dump["configs"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter_map(|c| c["cluster"]["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The gaps among `listeners` (all that Harbor wrote) in a `dynamic_listeners` dump.
pub fn listener_gaps(names: &[String], dump: &Value) -> Vec<Gap> {
    names
        .iter()
        .map(|name| Gap {
            what: "listener",
            name: name.clone(),
            standing: listener(dump, name),
        })
        .filter(|g| g.standing != Standing::Active)
        .collect()
}

/// The gaps among the clusters `names`, given the clusters Envoy runs and warms.
pub fn cluster_gaps(
    names: &[String],
    active: &BTreeSet<String>,
    warming: &BTreeSet<String>,
) -> Vec<Gap> {
    names
        .iter()
        .filter(|name| !active.contains(*name))
        .map(|name| Gap {
            what: "cluster",
            name: name.clone(),
            standing: if warming.contains(name) {
                Standing::Warming
            } else {
                Standing::Missing(None)
            },
        })
        .collect()
}

/// The versions of the resources in a `dynamic_route_configs` or `dynamic_active_secrets`
/// dump, by name.
pub fn versions(dump: &Value) -> BTreeMap<String, u64> {
    dump["configs"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter_map(|c| {
                    let name = c["name"].as_str().or(c["route_config"]["name"].as_str())?;
                    let version = c["version_info"].as_str()?.parse().ok()?;
                    Some((name.to_owned(), version))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// How the resources Harbor wrote, by name with the version written, stand against the
/// versions Envoy runs: a sentence for the first that differs.
pub fn lag<'n>(
    what: &str,
    written: impl IntoIterator<Item = (&'n str, u64)>,
    running: &BTreeMap<String, u64>,
) -> Option<String> {
    written
        .into_iter()
        .find_map(|(name, wrote)| match running.get(name) {
            Some(runs) if *runs == wrote => None,
            Some(runs) => Some(format!(
                "Envoy runs {what} {name} version {runs}, Harbor wrote {wrote}"
            )),
            None => Some(format!("Envoy has not loaded {what} {name}")),
        })
}

/// The gaps told in a sentence, the first few by name.
pub fn summary(gaps: &[Gap]) -> String {
    const NAMED: usize = 3;
    let mut text = gaps
        .iter()
        .take(NAMED)
        .map(Gap::describe)
        .collect::<Vec<_>>()
        .join("; ");
    if gaps.len() > NAMED {
        text.push_str(&format!(" (and {} more)", gaps.len() - NAMED));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The shapes Envoy 1.40 gives: an active listener, one refused at start (with the
    /// nameless repeat of its error), and one warming beside nothing active.
    fn dump() -> Value {
        let bound = json!({"name": "harbor_tcp_db", "address": {}});
        json!({"configs": [
            {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump.DynamicListener",
             "name": "harbor_http",
             "active_state": {"version_info": "1", "listener": {"name": "harbor_http"}}},
            {"name": "harbor_tcp_db",
             "error_state": {"failed_configuration": bound,
                 "details": "cannot bind '127.0.0.1:1': Address already in use"}},
            {"error_state": {"failed_configuration": bound, "details": "cannot bind '127.0.0.1:1': Address already in use"}},
            {"name": "harbor_tcp_new", "warming_state": {"version_info": "2"}},
            {"name": "harbor_tcp_old",
             "active_state": {"version_info": "1"},
             "error_state": {"details": "cannot bind '127.0.0.1:2': Address already in use"}},
        ]})
    }

    #[test]
    fn only_listeners_with_an_active_state_are_live() {
        let d = dump();
        assert_eq!(listener(&d, "harbor_http"), Standing::Active);
        // A failed update of a listener Envoy runs leaves the one it runs.
        assert_eq!(listener(&d, "harbor_tcp_old"), Standing::Active);
        assert_eq!(listener(&d, "harbor_tcp_new"), Standing::Warming);
        assert_eq!(
            listener(&d, "harbor_tcp_db"),
            Standing::Missing(Some(
                "cannot bind '127.0.0.1:1': Address already in use".into()
            ))
        );
        assert_eq!(listener(&d, "harbor_tcp_gone"), Standing::Missing(None));
        assert_eq!(listener(&json!({}), "harbor_http"), Standing::Missing(None));
    }

    #[test]
    fn every_written_listener_is_compared_by_name() {
        let written =
            json!([{"name": "harbor_http"}, {"name": "harbor_tcp_db"}, {"name": "harbor_tcp_new"}]);
        let gaps = listener_gaps(&names(&written), &dump());
        let named: Vec<&str> = gaps.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(named, ["harbor_tcp_db", "harbor_tcp_new"]);
        assert_eq!(
            summary(&gaps),
            "Envoy does not run listener harbor_tcp_db yet: cannot bind '127.0.0.1:1': \
             Address already in use; Envoy is still warming listener harbor_tcp_new"
        );
        assert!(listener_gaps(&names(&json!([{"name": "harbor_http"}])), &dump()).is_empty());
    }

    #[test]
    fn every_written_cluster_is_looked_for_among_the_active() {
        let active = clusters(&json!({"configs": [
            {"version_info": "1", "cluster": {"name": "harbor_web"}},
            {"version_info": "1", "cluster": {"name": "harbor_db"}},
        ]}));
        let warming = clusters(&json!({"configs": [{"cluster": {"name": "harbor_named"}}]}));
        assert!(clusters(&json!({})).is_empty());
        let written = names(
            &json!([{"name": "harbor_web"}, {"name": "harbor_named"}, {"name": "harbor_late"}]),
        );
        let gaps = cluster_gaps(&written, &active, &warming);
        assert_eq!(
            gaps.iter().map(Gap::describe).collect::<Vec<_>>(),
            [
                "Envoy is still warming cluster harbor_named",
                "Envoy does not run cluster harbor_late yet"
            ]
        );
        let many: Vec<Gap> = (0..5)
            .map(|i| Gap {
                what: "cluster",
                name: format!("c{i}"),
                standing: Standing::Missing(None),
            })
            .collect();
        assert!(summary(&many).ends_with("cluster c2 yet (and 2 more)"));
    }

    #[test]
    fn secrets_and_routes_are_compared_by_version() {
        let secrets = versions(&json!({"configs": [
            {"name": "harbor_cert_a.test", "version_info": "4", "secret": {}},
            {"name": "harbor_cert_*.b.test", "version_info": "2", "secret": {}},
        ]}));
        let routes = versions(&json!({"configs": [
            {"version_info": "5", "route_config": {"name": "harbor_routes"}},
        ]}));
        assert_eq!(routes.get("harbor_routes"), Some(&5));
        assert_eq!(lag("secret", [("harbor_cert_a.test", 4)], &secrets), None);
        assert_eq!(
            lag(
                "secret",
                [("harbor_cert_a.test", 4), ("harbor_cert_*.b.test", 3)],
                &secrets
            )
            .as_deref(),
            Some("Envoy runs secret harbor_cert_*.b.test version 2, Harbor wrote 3")
        );
        assert_eq!(
            lag("routes", [("harbor_routes_tls", 5)], &routes).as_deref(),
            Some("Envoy has not loaded routes harbor_routes_tls")
        );
    }
}
