//! Who carries the `tcp` routes: Harbor's own TCP proxy, or the proxy Harbor drives when that
//! one carries them itself (Envoy). It changes with a backend swap, at runtime, and two
//! processes must never listen on one port: the swap asks Harbor to let go of its listeners and
//! waits until every one is closed before the new proxy binds, and takes them back only after
//! the old proxy has let go.

use std::time::Duration;

use tokio::sync::watch;

/// The switch a swap turns, and what the TCP proxy's supervisor reports back.
#[derive(Clone)]
pub struct TcpCarriage {
    want: watch::Sender<bool>,
    /// What the supervisor has reached: `Some(true)` once every tcp route listens,
    /// `Some(false)` once none does; `None` while it is on its way.
    reached: watch::Receiver<Option<bool>>,
    /// The supervisor's side of `reached`.
    report: watch::Sender<Option<bool>>,
}

impl TcpCarriage {
    /// A switch that starts `carrying` (or not).
    pub fn new(carrying: bool) -> Self {
        let (want, _) = watch::channel(carrying);
        let (report, reached) = watch::channel(None);
        Self {
            want,
            reached,
            report,
        }
    }

    /// Whether Harbor is to carry the tcp routes now.
    pub fn carrying(&self) -> bool {
        *self.want.borrow()
    }

    /// Closes Harbor's tcp listeners (open connections keep going) and waits until each is
    /// closed, at most `within`.
    pub async fn release(&self, within: Duration) -> Result<(), String> {
        self.turn(false, within)
            .await
            .map_err(|()| format!("Harbor's tcp listeners did not close within {within:?}"))
    }

    /// Opens Harbor's tcp listeners again and waits until each listens, at most `within`; the
    /// supervisor keeps trying after that.
    pub async fn carry(&self, within: Duration) -> Result<(), String> {
        self.turn(true, within).await.map_err(|()| {
            format!("Harbor's tcp listeners could not all bind within {within:?} (is the port still held?)")
        })
    }

    async fn turn(&self, carrying: bool, within: Duration) -> Result<(), ()> {
        let mut reached = self.reached.clone();
        // Whatever was reached before is stale once the switch moves.
        self.report.send_replace(None);
        self.want.send_replace(carrying);
        let arrived = reached.wait_for(|r| *r == Some(carrying));
        match tokio::time::timeout(within, arrived).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(()),
        }
    }

    /// The supervisor's view: what is wanted, followed.
    pub(super) fn wanted(&self) -> watch::Receiver<bool> {
        self.want.subscribe()
    }

    /// The supervisor reports what it has reached.
    pub(super) fn reached(&self, state: Option<bool>) {
        self.report.send_replace(state);
    }
}
