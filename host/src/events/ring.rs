//! A bounded ring of numbered entries, which readers resume from by number, and the feed that
//! publishes into one and wakes its readers: the registry's events and Gangway's public events
//! are both kept this way.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::lock;

/// What a reader at some cursor gets next.
pub enum Since<T> {
    /// Every entry after the cursor, in order (possibly none yet).
    Events(Vec<Arc<T>>),
    /// The cursor is older than the ring, or from an earlier run: start over from a snapshot.
    Gap,
}

/// The newest `capacity` entries, numbered one after another from a starting number.
pub struct Ring<T> {
    last_id: u64,
    capacity: usize,
    entries: VecDeque<Arc<T>>,
}

impl<T> Ring<T> {
    /// A ring whose first entry will be numbered `start + 1`.
    pub fn new(start: u64, capacity: usize) -> Self {
        Self {
            last_id: start,
            capacity: capacity.max(1),
            entries: VecDeque::with_capacity(capacity.clamp(1, 4096)),
        }
    }

    /// The number of the newest entry (the start, before any).
    pub fn last_id(&self) -> u64 {
        self.last_id
    }

    /// Appends the entry `make` builds for the next number, dropping the oldest when full;
    /// returns that number.
    pub fn push(&mut self, make: impl FnOnce(u64) -> T) -> u64 {
        self.last_id += 1;
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back(Arc::new(make(self.last_id)));
        self.last_id
    }

    /// Every entry after `cursor`, or a gap when the ring no longer reaches back to it.
    pub fn since(&self, cursor: u64) -> Since<T> {
        if cursor == self.last_id {
            return Since::Events(Vec::new());
        }
        // Numbers are consecutive: the oldest kept is the newest less the count, plus one.
        let oldest = self.last_id + 1 - self.entries.len() as u64;
        if self.entries.is_empty() || cursor > self.last_id || cursor + 1 < oldest {
            return Since::Gap;
        }
        let skip = (cursor + 1 - oldest) as usize;
        Since::Events(self.entries.iter().skip(skip).cloned().collect())
    }
}

/// A ring that readers follow: each entry published wakes them.
pub struct Feed<T> {
    ring: Mutex<Ring<T>>,
    latest: watch::Sender<u64>,
}

impl<T> Feed<T> {
    /// A feed whose first entry will be numbered `start + 1`.
    pub fn new(start: u64, capacity: usize) -> Self {
        Self {
            ring: Mutex::new(Ring::new(start, capacity)),
            latest: watch::channel(start).0,
        }
    }

    /// Publishes the entry `make` builds for the next number; returns that number.
    pub fn push(&self, make: impl FnOnce(u64) -> T) -> u64 {
        let id = lock(&self.ring).push(make);
        self.latest.send_replace(id);
        id
    }

    pub fn since(&self, cursor: u64) -> Since<T> {
        lock(&self.ring).since(cursor)
    }

    pub fn last_id(&self) -> u64 {
        lock(&self.ring).last_id()
    }

    /// A receiver that wakes when something is published.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbers(since: Since<u64>) -> Option<Vec<u64>> {
        match since {
            Since::Events(v) => Some(v.iter().map(|n| **n).collect()),
            Since::Gap => None,
        }
    }

    #[test]
    fn readers_resume_from_any_number_the_ring_still_holds() {
        let mut ring = Ring::new(100, 2);
        assert_eq!(numbers(ring.since(100)), Some(vec![]), "nothing yet");
        assert_eq!(numbers(ring.since(99)), None, "before the start");
        for _ in 0..3 {
            ring.push(|n| n);
        }
        assert_eq!(ring.last_id(), 103);
        assert_eq!(numbers(ring.since(100)), None, "101 was dropped");
        assert_eq!(numbers(ring.since(101)), Some(vec![102, 103]));
        assert_eq!(numbers(ring.since(103)), Some(vec![]));
        assert_eq!(numbers(ring.since(104)), None, "from the future");
    }
}
