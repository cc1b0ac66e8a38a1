//! The Caddy backend adapter. Harbor owns one container route in one Caddy server, marked with
//! an `@id`, and keeps its services inside it as `reverse_proxy` routes; nothing else in Caddy's
//! configuration is touched.
//!
//! - [`routes`]: the desired state as Caddy route JSON (pure, unit-tested natively).
//! - [`tls`]: HTTPS for Harbor's hosts through Caddy's automatic HTTPS (pure, unit-tested).
//! - [`admin`]: the admin API through the host's bound HTTP client: reads with `ETag`, writes
//!   with `If-Match`, the container route found or created.

mod admin;
pub mod routes;
pub mod tls;

use std::cell::RefCell;

use harbor_adapter_common::bindings::exports::harbor::backend::adapter::{
    AdapterError, Applied, Description, DesiredState, Document, Guest, ProbeReport,
};

use admin::Admin;
use routes::Settings;

const VERSION: &str = harbor_adapter_common::version!();

thread_local! {
    static ADMIN: RefCell<Admin> = RefCell::new(Admin::new(Settings::default()));
}

struct Caddy;

impl Guest for Caddy {
    fn describe() -> Description {
        Description {
            name: "caddy".into(),
            version: VERSION.into(),
            supports_tcp: false,
            obtains_certificates: true,
        }
    }

    fn configure(config: String) -> Result<(), String> {
        let settings = Settings::parse(&config)?;
        ADMIN.with(|a| *a.borrow_mut() = Admin::new(settings));
        Ok(())
    }

    fn apply(state: DesiredState) -> Result<Applied, AdapterError> {
        ADMIN.with(|a| a.borrow_mut().apply(&state))
    }

    fn render(state: DesiredState) -> Result<Vec<Document>, AdapterError> {
        ADMIN.with(|a| a.borrow().render(&state))
    }

    fn probe() -> Result<ProbeReport, AdapterError> {
        ADMIN.with(|a| a.borrow_mut().probe())
    }

    fn release() -> Result<(), AdapterError> {
        ADMIN.with(|a| a.borrow_mut().release())
    }
}

harbor_adapter_common::bindings::export!(Caddy);
