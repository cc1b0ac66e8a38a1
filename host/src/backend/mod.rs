//! Proxy backend adapters: WebAssembly components implementing `wit/backend` that turn the
//! registry's desired state into a real proxy's configuration, and the sandbox they run in.
//!
//! | module | owns |
//! |---|---|
//! | `bindings` | the adapter world's generated bindings, the store's state, the linker |
//! | `http` | the HTTP capability: one base URL, a deadline per request |
//! | `files` | the file capability: plain names in one directory, atomic replacement |
//! | `adapter` | one loaded adapter on its own thread: calls, deadlines, faults, re-instantiation |
//! | `builtin` | the adapters compiled into the binary (Caddy, Envoy) |

mod adapter;
mod bindings;
mod builtin;
pub mod caddy;
mod files;
mod http;

pub use adapter::{Adapter, AdapterSpec, CallError, Capabilities, FaultSink};
pub use bindings::{
    AdapterError, Applied, CONTRACT, Certificate, CertificateSource, Description, DesiredState,
    Document, HashKey, HealthCheck, HttpService, Https, ProbeReport, RefusedService, TcpService,
    TcpTls, TlsSettings, Upstream,
};
pub use builtin::{builtin, builtin_names};
pub use files::ConfinedDir;
pub use http::{BaseUrl, BoundHttp};
