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
//! | [`events`] | typed events and the bus (a ring read from per-subscriber cursors) |
//! | [`store`]  | ephemeral registrations saved across restarts |
//! | [`api`]    | the HTTP API: services, catalog, events, health, metrics |
//! | [`metrics`] | Prometheus metrics |
//! | [`daemon`] | starting and stopping a whole daemon in-process |

pub mod api;
pub mod config;
pub mod daemon;
pub mod events;
pub mod metrics;
pub mod model;
pub mod registry;
pub mod routes;
pub mod store;

pub use config::Config;
pub use daemon::{Harbor, start};
