//! The integration tests, one binary: each module drives a real daemon (in-process or the built
//! `harbor` binary) over real sockets on 127.0.0.1, and the real Caddy, Envoy and Chromium where a
//! module says so. One binary rather than one per file, because each links all of wasmtime: a
//! binary per file multiplied a clean build's link time and disk by the number of files. The
//! Caddy and Envoy tests, whose deadlines need the machine to themselves, are compiled into a
//! binary of their own (`../proxies/`).

mod common;

mod access;
mod bad_input;
mod binary;
mod durability;
mod events;
mod example_js;
mod example_py;
mod framing_properties;
mod gangway;
mod http_framing;
mod leases;
mod metrics_format;
mod plugins_api;
mod proxy_http;
mod proxy_limits;
mod proxy_tcp;
mod route_files;
mod strategies;
mod strategy_settings;
mod tls;
