//! A connection's one timer for its whole life: each phase (a head to read, a body that must keep
//! arriving, a response to wait for) sets the next deadline, and setting it reads the clock and
//! no more. The timer stays armed for an earlier moment and, when it fires before the deadline,
//! re-arms for it, so a connection touches the timer wheel about once per deadline length rather
//! than once or twice per request or body chunk.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

pub struct Deadline {
    at: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Deadline {
    /// A deadline `after` from now.
    pub fn new(after: Duration) -> Self {
        let at = Instant::now() + after;
        Self {
            at,
            timer: Box::pin(tokio::time::sleep_until(at)),
        }
    }

    /// The deadline is `after` from now.
    pub fn set(&mut self, after: Duration) {
        self.at = Instant::now() + after;
        if self.at < self.timer.deadline() {
            self.timer.as_mut().reset(self.at);
        }
    }

    /// Ready once the deadline has passed.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            ready!(self.timer.as_mut().poll(cx));
            if Instant::now() >= self.at {
                return Poll::Ready(());
            }
            self.timer.as_mut().reset(self.at);
        }
    }

    /// Resolves once the deadline has passed.
    pub async fn expired(&mut self) {
        poll_fn(|cx| self.poll_expired(cx)).await;
    }

    /// Runs `work` until it ends or the deadline passes (`None`).
    pub async fn within<F: Future>(&mut self, work: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            done = work => Some(done),
            () = self.expired() => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_deadline_moved_later_or_earlier_holds_where_it_was_last_set() {
        let started = Instant::now();
        let mut deadline = Deadline::new(Duration::from_secs(10));
        deadline.set(Duration::from_secs(30));
        deadline.expired().await;
        assert_eq!(started.elapsed(), Duration::from_secs(30), "moved later");

        let started = Instant::now();
        deadline.set(Duration::from_secs(60));
        deadline.set(Duration::from_secs(5));
        deadline.expired().await;
        assert_eq!(started.elapsed(), Duration::from_secs(5), "moved earlier");

        deadline.set(Duration::from_secs(1));
        let quick = deadline.within(async { 7 }).await;
        assert_eq!(quick, Some(7), "work that ends in time gives its result");
        let slow = deadline.within(std::future::pending::<()>()).await;
        assert_eq!(slow, None, "work that outlasts the deadline is dropped");
    }
}
