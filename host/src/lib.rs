//! Harbor: a single-host service registry and proxy controller.
//!
//! The registry holds the desired state; everything else converges a consumer towards it.
//!
//! | module     | owns |
//! |------------|------|
//! | [`config`] | flags, environment and config file → one validated [`Config`] |
//! | [`model`]  | validated names and addresses, routes, the views shared by API, SSE and Gangway |
//! | [`registry`] | services, instances, leases (one deadline queue, one reaper), claims |
//! | [`routes`] | `.route` parsing and following the routes directory |
//! | [`dirwatch`] | following a directory: debounced change events plus periodic rescans |
//! | [`plugins`] | the WebAssembly runtime: strategies, sandboxing, hot swap |
//! | [`routing`] | the routing snapshot: host/path and listen-address indexes, one load balancer per service |
//! | [`descriptors`] | the file-descriptor table divided: a reserve, pooled sockets, one door per listener |
//! | [`public`] | the public view Gangway reads: public services only, in a ring of its own |
//! | [`proxy`]  | the embedded HTTP reverse proxy and L4 TCP proxy, health checks, upstream pools |
//! | [`echo`]   | demo backends (`harbor echo`) |
//! | `rewind`   | a socket with bytes already read put back in front |
//! | [`backend`] | proxy backend adapters (Caddy, Envoy) as sandboxed components |
//! | [`backoff`] | waiting longer after each failure in a row |
//! | [`dispatch`] | keeping the active adapter's proxy in step with the registry |
//! | [`dns`] | a loopback SRV responder feeding Caddy's dynamic upstreams |
//! | [`events`] | typed events and the bus (a ring read from per-subscriber cursors) |
//! | [`store`]  | ephemeral registrations saved across restarts |
//! | [`api`]    | the HTTP API: services, catalog, events, health, metrics; Gangway and its public view |
//! | [`metrics`] | Prometheus metrics |
//! | [`daemon`] | starting and stopping a whole daemon in-process |
//!
//! The data flow, where each concern lives and the house words (lane, door, shard, plan,
//! fallback, …) are in `host/ARCHITECTURE.md`.

// Module notes link the private modules and items they describe: they are read by developers,
// with `cargo doc --document-private-items`, where every such link resolves.
#![allow(rustdoc::private_intra_doc_links)]

pub mod api;
pub mod backend;
pub mod backoff;
pub mod config;
pub mod daemon;
pub mod descriptors;
pub mod dirwatch;
pub mod dispatch;
pub mod dns;
pub mod echo;
pub mod events;
pub mod metrics;
pub mod model;
pub mod plugins;
pub mod proxy;
pub mod public;
pub mod registry;
mod rewind;
pub mod routes;
pub mod routing;
pub mod store;
pub mod tls;

pub use config::Config;
pub use daemon::{Harbor, start};
