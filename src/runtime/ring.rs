//! Bounded lock-free rings between stages, with a wake-up that costs nothing
//! while the consumer is busy.
//!
//! A consumer that finds all its rings empty either spins (`IdlePolicy::Spin`)
//! or parks on its `Doorbell` (`Park`, the default). Producers ring the
//! doorbell after a push only when someone is waiting on it (one atomic load
//! otherwise). A full ring makes the producer wait: that is the backpressure.

use crossbeam_queue::ArrayQueue;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Wakes a parked thread, or a task of an event loop ([`Doorbell::rung`]).
/// Cheap to ring when nobody sleeps.
#[derive(Default)]
pub struct Doorbell {
    waiters: AtomicUsize,
    rung: Mutex<bool>,
    cv: Condvar,
    /// The one task waiting in [`Doorbell::rung`], if any (a glommio
    /// executor's: its wakers may be woken from other threads).
    task: Mutex<Option<Waker>>,
}

impl Doorbell {
    pub fn ring(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            *self.rung.lock().unwrap() = true;
            self.cv.notify_all();
            if let Some(w) = self.task.lock().unwrap().take() {
                w.wake();
            }
        }
    }

    /// Resolves once `ready()` holds, checked at the first poll and after
    /// each ring: the async form of [`Doorbell::wait`], for one task.
    pub fn rung<F: Fn() -> bool + Unpin>(&self, ready: F) -> Rung<'_, F> {
        Rung { bell: self, ready, registered: false }
    }

    /// Waits until rung or `timeout`, unless `ready()` already holds once the
    /// waiter is registered (closes the lost-wake-up window).
    pub fn wait(&self, timeout: Duration, ready: impl Fn() -> bool) {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        if !ready() {
            let mut rung = self.rung.lock().unwrap();
            if !*rung {
                rung = self.cv.wait_timeout(rung, timeout).unwrap().0;
            }
            *rung = false;
        }
        self.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

/// See [`Doorbell::rung`].
pub struct Rung<'a, F> {
    bell: &'a Doorbell,
    ready: F,
    registered: bool,
}

impl<F: Fn() -> bool + Unpin> Future for Rung<'_, F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if !this.registered {
            this.bell.waiters.fetch_add(1, Ordering::SeqCst);
            this.registered = true;
        }
        // The waker is in place before the check, so a push after the check
        // finds it (the ring sees `waiters` > 0): no lost wake-up.
        *this.bell.task.lock().unwrap() = Some(cx.waker().clone());
        if (this.ready)() {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl<F> Drop for Rung<'_, F> {
    fn drop(&mut self) {
        if self.registered {
            // No later ring wakes a task that stopped waiting.
            self.bell.task.lock().unwrap().take();
            self.bell.waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Waits for `ready()` according to the idle policy, at most `timeout`.
pub fn idle_wait(policy: IdlePolicy, bell: &Doorbell, timeout: Duration, ready: impl Fn() -> bool) {
    match policy {
        IdlePolicy::Spin => {
            for _ in 0..256 {
                if ready() {
                    return;
                }
                std::hint::spin_loop();
            }
            std::thread::yield_now();
        }
        IdlePolicy::Park => bell.wait(timeout, ready),
    }
}

/// A bounded multi-producer ring whose consumer parks on `consumer_bell`.
pub struct Ring<T> {
    q: ArrayQueue<T>,
    consumer_bell: Arc<Doorbell>,
    producer_bell: Doorbell,
}

impl<T> Ring<T> {
    pub fn new(capacity: usize, consumer_bell: Arc<Doorbell>) -> Self {
        Ring { q: ArrayQueue::new(capacity), consumer_bell, producer_bell: Doorbell::default() }
    }

    /// Pushes, waiting while the ring is full. Returns the item back if
    /// `stop` is raised while waiting.
    pub fn push(&self, mut item: T, idle: IdlePolicy, stop: &AtomicBool) -> Result<(), T> {
        loop {
            match self.q.push(item) {
                Ok(()) => {
                    self.consumer_bell.ring();
                    return Ok(());
                }
                Err(back) => {
                    item = back;
                    if stop.load(Ordering::Relaxed) {
                        return Err(item);
                    }
                    idle_wait(idle, &self.producer_bell, Duration::from_millis(50), || !self.q.is_full());
                }
            }
        }
    }

    /// Pushes if there is room, else hands the item back at once.
    pub fn try_push(&self, item: T) -> Result<(), T> {
        self.q.push(item)?;
        self.consumer_bell.ring();
        Ok(())
    }

    pub fn pop(&self) -> Option<T> {
        let v = self.q.pop();
        if v.is_some() {
            self.producer_bell.ring();
        }
        v
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }
    pub fn len(&self) -> usize {
        self.q.len()
    }
    pub fn capacity(&self) -> usize {
        self.q.capacity()
    }
}

/// What a thread with nothing to do does (RUNTIME_IDLE).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum IdlePolicy {
    /// Sleep when there is no work (default; many validators share a machine).
    Park,
    /// Busy-poll (bare metal with isolated cores).
    Spin,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_ring_blocks_producer_until_consumer_pops() {
        let bell = Arc::new(Doorbell::default());
        let ring = Arc::new(Ring::new(2, bell.clone()));
        let stop = Arc::new(AtomicBool::new(false));
        ring.push(1, IdlePolicy::Park, &stop).unwrap();
        ring.push(2, IdlePolicy::Park, &stop).unwrap();
        let (r2, s2) = (ring.clone(), stop.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            r2.push(3, IdlePolicy::Park, &s2).unwrap();
            tx.send(()).unwrap();
        });
        // The producer cannot finish while the ring is full.
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        assert_eq!(ring.pop(), Some(1));
        rx.recv().unwrap();
        h.join().unwrap();
        let mut got = vec![];
        while let Some(v) = ring.pop() {
            got.push(v);
        }
        assert_eq!(got, vec![2, 3]);
    }

    #[test]
    fn parked_consumer_wakes_on_push() {
        let bell = Arc::new(Doorbell::default());
        let ring = Arc::new(Ring::new(8, bell.clone()));
        let r2 = ring.clone();
        let h = std::thread::spawn(move || {
            let mut got = vec![];
            while got.len() < 100 {
                match r2.pop() {
                    Some(v) => got.push(v),
                    // Long timeout: a lost wake-up would make the test hang, not pass.
                    None => bell.wait(Duration::from_secs(30), || !r2.is_empty()),
                }
            }
            got
        });
        let stop = AtomicBool::new(false);
        for i in 0..100 {
            ring.push(i, IdlePolicy::Park, &stop).unwrap();
        }
        assert_eq!(h.join().unwrap(), (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn a_task_waiting_for_the_bell_wakes_on_push_from_another_thread() {
        let bell = Arc::new(Doorbell::default());
        let ring = Arc::new(Ring::new(8, bell.clone()));
        let r2 = ring.clone();
        let producer = std::thread::spawn(move || {
            let stop = AtomicBool::new(false);
            for i in 0..1000 {
                r2.push(i, IdlePolicy::Park, &stop).unwrap();
            }
        });
        let got = futures_lite::future::block_on(async {
            let mut got = vec![];
            while got.len() < 1000 {
                match ring.pop() {
                    Some(v) => got.push(v),
                    // No timeout: a lost wake-up hangs the test, never passes it.
                    None => bell.rung(|| !ring.is_empty()).await,
                }
            }
            got
        });
        producer.join().unwrap();
        assert_eq!(got, (0..1000).collect::<Vec<_>>());
        assert_eq!(bell.waiters.load(Ordering::SeqCst), 0, "a finished wait left its registration");
    }
}
