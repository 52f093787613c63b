//! Time as the sans-I/O core sees it: the two clocks its host passes in
//! with every input, and named timers in one table.
//!
//! Timers (as quinn-proto's `TimerTable`): one slot per kind of timer, each
//! holding its deadline in the owner's monotonic milliseconds. The owner's
//! `poll_timeout_ms` is the earliest deadline of the timers that apply in
//! its current state, so a host wakes it exactly when something is due.

use std::marker::PhantomData;

/// The host's two clocks at one input. Timers, intervals and waits run on
/// `mono_ms` (never steps, restarts near zero with the process, means
/// nothing to another validator); block timestamps and the skew checks of
/// client and block timestamps use `wall_ms` (Unix ms; may step backwards
/// or differ between validators, which the checks' bounds absorb).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Now {
    pub mono_ms: u64,
    pub wall_ms: u64,
}

/// A kind of timer: an enum whose variants index the table.
pub trait TimerName: Copy + std::fmt::Debug + 'static {
    /// Every variant, in index order.
    const ALL: &'static [Self];
    fn index(self) -> usize;
}

/// Deadlines (monotonic ms) of the `N` timers named by `T`.
#[derive(Clone, Debug)]
pub struct TimerTable<T: TimerName, const N: usize> {
    deadline_ms: [Option<u64>; N],
    names: PhantomData<T>,
}

impl<T: TimerName, const N: usize> Default for TimerTable<T, N> {
    fn default() -> Self {
        assert_eq!(T::ALL.len(), N, "one slot per timer");
        debug_assert!(T::ALL.iter().enumerate().all(|(i, t)| t.index() == i), "ALL is in index order");
        TimerTable { deadline_ms: [None; N], names: PhantomData }
    }
}

impl<T: TimerName, const N: usize> TimerTable<T, N> {
    pub fn set(&mut self, timer: T, at_ms: u64) {
        self.deadline_ms[timer.index()] = Some(at_ms);
    }

    pub fn stop(&mut self, timer: T) {
        self.deadline_ms[timer.index()] = None;
    }

    pub fn get(&self, timer: T) -> Option<u64> {
        self.deadline_ms[timer.index()]
    }

    pub fn is_set(&self, timer: T) -> bool {
        self.get(timer).is_some()
    }

    /// Set and due at `now_ms`.
    pub fn is_expired(&self, timer: T, now_ms: u64) -> bool {
        self.get(timer).is_some_and(|at| now_ms >= at)
    }

    /// Every timer with its deadline, in index order (for logs).
    pub fn iter(&self) -> impl Iterator<Item = (T, Option<u64>)> + '_ {
        T::ALL.iter().map(|&t| (t, self.get(t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum T {
        A,
        B,
    }
    impl TimerName for T {
        const ALL: &'static [T] = &[T::A, T::B];
        fn index(self) -> usize {
            self as usize
        }
    }

    #[test]
    fn timers_are_set_stopped_and_expire_at_their_deadline() {
        let mut t: TimerTable<T, 2> = TimerTable::default();
        assert_eq!(t.iter().filter(|(_, d)| d.is_some()).count(), 0);
        t.set(T::B, 100);
        assert!(!t.is_expired(T::B, 99));
        assert!(t.is_expired(T::B, 100));
        assert!(!t.is_expired(T::A, u64::MAX), "an unset timer never expires");
        t.set(T::A, 5);
        assert_eq!(t.iter().collect::<Vec<_>>(), vec![(T::A, Some(5)), (T::B, Some(100))]);
        t.stop(T::B);
        assert_eq!(t.get(T::B), None);
        assert!(t.is_set(T::A));
    }
}
