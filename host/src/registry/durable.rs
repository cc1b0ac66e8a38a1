//! What makes the registry's changes durable: each change to an ephemeral instance is handed, in
//! the order it was made, to a [`Journal`]; the API answers only once its [`Ticket`] says the
//! change is on disk. The registry does not know how the journal writes; `crate::store` does.

use serde::Serialize;
use tokio::sync::oneshot;

use crate::model::InstanceId;

use super::RestoredInstance;

/// One change, as the journal keeps it: an instance as it now stands, or its removal.
#[derive(Debug, Clone)]
pub enum Change {
    Put(Box<RestoredInstance>),
    Remove(InstanceId),
}

/// Where the registry's changes go to be made durable.
pub trait Journal: Send + Sync {
    /// Why changes cannot be saved now, if they cannot: a change is then refused before it is
    /// made.
    fn refuses(&self) -> Option<String>;
    /// Queues `change` behind every change queued before it. Called while the registry is
    /// locked, so it must not block.
    fn append(&self, change: Change) -> Ticket;
    /// How the saved state stands, for the status and for new event-stream subscribers.
    fn condition(&self) -> StateCondition;
}

/// How the saved state stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StateCondition {
    /// Why registrations cannot be saved now; none while they can.
    pub write_error: Option<String>,
    /// The state file found unusable at start, and where it was moved.
    pub set_aside: Option<SetAside>,
}

/// A state file that could not be read, moved aside so that the next start is clean.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SetAside {
    pub file: String,
    pub moved_to: Option<String>,
    pub reason: String,
}

/// Resolves once a change is on disk, or with the reason it could not be saved.
#[must_use = "a change is durable only once its ticket resolves"]
pub struct Ticket(Option<oneshot::Receiver<Result<(), String>>>);

impl Ticket {
    /// A ticket for a change with nowhere to go (no journal): nothing to wait for.
    pub fn done() -> Self {
        Self(None)
    }

    pub fn pending(rx: oneshot::Receiver<Result<(), String>>) -> Self {
        Self(Some(rx))
    }

    /// Waits until the change is on disk.
    pub async fn saved(self) -> Result<(), String> {
        match self.0 {
            None => Ok(()),
            Some(rx) => rx
                .await
                .unwrap_or_else(|_| Err("the state writer has stopped".into())),
        }
    }
}
