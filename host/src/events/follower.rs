//! Following a feed (the registry's events, Gangway's public events) from a cursor: each read
//! yields what came after it, or a gap that asks the follower to rebuild from a full view. The
//! routing table, the backend driver, the public view, the DNS zone and every event stream
//! follow the same way.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::ring::{Feed, Since};

/// Something that publishes through a [`Feed`]: the event bus, the public view.
pub trait Publishes {
    type Entry;
    fn feed(&self) -> &Feed<Self::Entry>;
}

/// A place in a feed; see the module notes.
pub struct Follower<F: Publishes> {
    feed: Arc<F>,
    cursor: u64,
    wake: watch::Receiver<u64>,
}

impl<F: Publishes> Follower<F> {
    /// A follower that has seen everything up to `cursor`.
    pub fn new(feed: Arc<F>, cursor: u64) -> Self {
        let wake = feed.feed().watch();
        Self { feed, cursor, wake }
    }

    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Starts again from `cursor` (after a rebuild from a snapshot as of it).
    pub fn reset(&mut self, cursor: u64) {
        self.cursor = cursor;
    }

    /// What came after the cursor, now, the cursor moved past it. A gap moves it to the newest
    /// entry: the follower rebuilds from a full view taken after this call.
    pub fn read(&mut self) -> Since<F::Entry> {
        // Marked seen before reading, so that a publish after the read wakes the next wait;
        // reading first also catches what was published before the follower existed.
        self.wake.borrow_and_update();
        let feed = self.feed.feed();
        let since = feed.since(self.cursor);
        match &since {
            Since::Events(entries) if !entries.is_empty() => {
                self.cursor += entries.len() as u64;
            }
            Since::Events(_) => {}
            Since::Gap => self.cursor = feed.last_id(),
        }
        since
    }

    /// Waits until something is published after the last read; `false` once the feed is gone.
    pub async fn changed(&mut self) -> bool {
        self.wake.changed().await.is_ok()
    }

    /// The next entries after the cursor (or a gap), waiting for some if there are none yet;
    /// `None` once cancelled or the feed is gone.
    pub async fn next(&mut self, cancel: &CancellationToken) -> Option<Since<F::Entry>> {
        loop {
            match self.read() {
                Since::Events(entries) if entries.is_empty() => {}
                since => return Some(since),
            }
            tokio::select! {
                changed = self.changed() => if !changed { return None },
                () = cancel.cancelled() => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Event, EventBus};
    use crate::model::ServiceName;

    fn removed(bus: &EventBus, name: &str) -> u64 {
        bus.publish(Event::ServiceRemoved {
            name: ServiceName::parse(name).expect("a name"),
        })
    }

    #[tokio::test]
    async fn a_follower_reads_in_order_waits_for_more_and_is_told_of_gaps() {
        let bus = Arc::new(EventBus::new(2));
        let mut follower = Follower::new(bus.clone(), bus.last_id());
        let cancel = CancellationToken::new();
        let a = removed(&bus, "a");
        let Some(Since::Events(read)) = follower.next(&cancel).await else {
            panic!("events")
        };
        assert_eq!(read.iter().map(|e| e.id).collect::<Vec<_>>(), [a]);
        assert_eq!(follower.cursor(), a);

        let waiting = tokio::spawn(async move {
            let next = follower.next(&CancellationToken::new()).await;
            (next, follower)
        });
        let b = removed(&bus, "b");
        let (next, mut follower) = waiting.await.expect("the follower");
        let Some(Since::Events(read)) = next else {
            panic!("events")
        };
        assert_eq!(read[0].id, b, "woken by the publish");

        for name in ["c", "d", "e"] {
            removed(&bus, name);
        }
        assert!(matches!(follower.read(), Since::Gap), "the ring moved on");
        assert_eq!(
            follower.cursor(),
            bus.last_id(),
            "a gap moves to the newest"
        );
        cancel.cancel();
        assert!(follower.next(&cancel).await.is_none(), "cancelled");
    }
}
