//! The tests that drive a real Caddy and a real Envoy, in a binary of their own: their deadlines
//! (a route within seconds, no request lost across a restart) hold only when the machine is not
//! also running the rest of the suite, and test binaries run one after another. The tests
//! themselves live beside the others, in `../integration/`.

#[path = "../integration/common/mod.rs"]
mod common;

#[path = "../integration/caddy.rs"]
mod caddy;
#[path = "../integration/caddy_https.rs"]
mod caddy_https;
#[path = "../integration/envoy.rs"]
mod envoy;
#[path = "../integration/envoy_https.rs"]
mod envoy_https;
