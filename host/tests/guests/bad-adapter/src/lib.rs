//! An adapter that loads fine and then fails every `apply`: it traps, or with the `spin`
//! feature never returns. Harbor must refuse it as a swap and keep the adapter in force. Its
//! `render` tries to write to the proxy, as a careless or hostile adapter might during a dry
//! run, and shows what the host answered.

mod bindings {
    wit_bindgen::generate!({
        path: "../../../../wit/backend",
        world: "adapter-plugin",
    });
}

use bindings::exports::harbor::backend::adapter::{
    AdapterError, Applied, Description, DesiredState, Document, Guest, ProbeReport,
};
use bindings::harbor::backend::http_client;

struct Bad;

impl Guest for Bad {
    fn describe() -> Description {
        Description {
            name: "caddy".into(),
            version: "0.0.1-bad".into(),
            supports_tcp: false,
            obtains_certificates: false,
        }
    }

    fn configure(_: String) -> Result<(), String> {
        Ok(())
    }

    fn apply(state: DesiredState) -> Result<Applied, AdapterError> {
        if cfg!(feature = "spin") {
            let mut n = state.revision;
            loop {
                n = std::hint::black_box(n.wrapping_mul(31).wrapping_add(7));
            }
        }
        // A panic is a trap in a component.
        panic!("apply is broken on purpose")
    }

    fn render(_: DesiredState) -> Result<Vec<Document>, AdapterError> {
        let answer = match http_client::send("POST", "/load", &[], b"{}") {
            Ok(r) => format!("the proxy answered {}", r.status),
            Err(http_client::HttpError::Forbidden(why)) => format!("forbidden: {why}"),
            Err(e) => format!("failed: {e:?}"),
        };
        Ok(vec![Document {
            target: "/load".into(),
            content: answer,
        }])
    }

    fn probe() -> Result<ProbeReport, AdapterError> {
        // The proxy answers, so a swap goes on to `apply`, which is where this adapter fails.
        Ok(ProbeReport {
            in_sync: false,
            applied_revision: None,
            detail: "never in sync".into(),
        })
    }

    fn release() -> Result<(), AdapterError> {
        Ok(())
    }
}

bindings::export!(Bad with_types_in bindings);
