//! The Envoy backend adapter. Harbor's services become Envoy dynamic configuration files in one
//! directory: listeners (LDS), clusters (CDS), a route configuration per HTTP listener (RDS),
//! one endpoint file per cluster (EDS) and one secret file per certificate (SDS), each replaced
//! atomically through the host's file capability. Envoy obtains no certificates: the host gives
//! them in the desired state. The host's HTTP capability is bound to Envoy's admin address,
//! which `probe` reads.
//!
//! - [`xds`]: the desired state as xDS JSON (pure, unit-tested natively).
//! - [`tls`]: certificates as SDS secrets, the HTTPS listener, TLS for tcp services (pure).
//! - [`sync`]: writing only the files that changed, and reading Envoy's verdict back.
//! - [`live`]: which listeners and clusters Envoy runs, from its configuration dump (pure).

mod live;
mod sync;
pub mod tls;
pub mod xds;

use std::cell::RefCell;

use harbor_adapter_common::bindings::exports::harbor::backend::adapter::{
    AdapterError, Applied, Description, DesiredState, Document, Guest, ProbeReport,
};

use sync::Files;
use xds::Settings;

const VERSION: &str = harbor_adapter_common::version!();

thread_local! {
    static FILES: RefCell<Option<Files>> = const { RefCell::new(None) };
}

struct Envoy;

fn with_files<R>(f: impl FnOnce(&mut Files) -> Result<R, AdapterError>) -> Result<R, AdapterError> {
    FILES.with(|cell| match cell.borrow_mut().as_mut() {
        Some(files) => f(files),
        None => Err(AdapterError::Rejected(
            "the Envoy adapter is not configured".into(),
        )),
    })
}

impl Guest for Envoy {
    fn describe() -> Description {
        Description {
            name: "envoy".into(),
            version: VERSION.into(),
            supports_tcp: true,
            obtains_certificates: false,
        }
    }

    fn configure(config: String) -> Result<(), String> {
        let settings = Settings::parse(&config)?;
        FILES.with(|cell| *cell.borrow_mut() = Some(Files::new(settings)));
        Ok(())
    }

    fn apply(state: DesiredState) -> Result<Applied, AdapterError> {
        with_files(|f| f.apply(&state))
    }

    fn render(state: DesiredState) -> Result<Vec<Document>, AdapterError> {
        with_files(|f| f.render(&state))
    }

    fn probe() -> Result<ProbeReport, AdapterError> {
        with_files(|f| f.probe())
    }

    fn release() -> Result<(), AdapterError> {
        with_files(|f| f.release())
    }
}

harbor_adapter_common::bindings::export!(Envoy);
