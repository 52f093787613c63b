//! Leader reputation from the committed chain: scores, exclusions from the
//! leader rotation, quarantine on committed proof of misbehaviour. Pure and
//! deterministic: every validator that executed the same blocks computes
//! the same figures (the checkpoint's application digest covers them).

use crate::protocol::consensus::pbft::{Rid, View};

/// Leader reputation, computed from the committed chain alone (so every
/// validator computes the same): in thousandths, from 1000. A view that ended
/// in a view change costs its leader 200; each committed block earns its
/// proposer 20 and everyone 10 (so an excluded validator is readmitted after
/// a while). Leaders under the floor are excluded from the rotation (at most
/// f, lowest first), from each replica's next view change.
#[derive(Debug, Clone)]
pub struct Reputation {
    scores: Vec<u32>,
    /// `None`: reputation disabled (CONSENSUS_ENABLE_REPUTATION=false).
    floor: Option<u32>,
    /// Validators with committed proof of misbehaviour (never readmitted
    /// without an operator); excluded before low scores.
    quarantined: std::collections::BTreeSet<Rid>,
    quarantine: bool,
    f: usize,
    excluded: Vec<Rid>,
}

impl Reputation {
    pub const FULL: u32 = 1000;
    const FAILED_VIEW: u32 = 200;
    const PROPOSED: u32 = 20;
    const PER_BLOCK: u32 = 10;

    /// `quarantine`: CONSENSUS_ENABLE_QUARANTINE.
    pub fn new(n: usize, floor: Option<f64>, quarantine: bool) -> Self {
        let floor = floor.map(|f| (f.clamp(0.0, 1.0) * Self::FULL as f64).round() as u32);
        Reputation {
            scores: vec![Self::FULL; n],
            floor,
            quarantined: Default::default(),
            quarantine,
            f: n.saturating_sub(1) / 3,
            excluded: vec![],
        }
    }

    /// Scores (thousandths) and quarantined validators: what a snapshot
    /// carries and the checkpoint's application digest covers.
    pub fn scores(&self) -> &[u32] {
        &self.scores
    }
    pub fn quarantined(&self) -> impl Iterator<Item = Rid> + '_ {
        self.quarantined.iter().copied()
    }

    /// Reputation as a snapshot recorded it (`None` if it does not fit `n`).
    pub fn restored(
        n: usize,
        floor: Option<f64>,
        quarantine: bool,
        scores: &[u32],
        quarantined: &[u32],
    ) -> Option<Self> {
        let mut r = Reputation::new(n, floor, quarantine);
        if scores.len() != n || scores.iter().any(|&s| s > Self::FULL) || quarantined.iter().any(|&q| q as usize >= n) {
            return None;
        }
        r.scores = scores.to_vec();
        r.quarantined = quarantined.iter().map(|&q| q as Rid).collect();
        r.recompute();
        Some(r)
    }

    pub fn quarantine_enabled(&self) -> bool {
        self.quarantine
    }

    pub fn is_quarantined(&self, r: Rid) -> bool {
        self.quarantined.contains(&r)
    }

    /// Committed proof against `r`. Returns true if the exclusions changed.
    pub fn quarantine(&mut self, r: Rid) -> bool {
        if !self.quarantine || r >= self.scores.len() || !self.quarantined.insert(r) {
            return false;
        }
        self.recompute()
    }

    pub fn score(&self, r: Rid) -> f64 {
        self.scores[r] as f64 / Self::FULL as f64
    }

    /// Validators currently kept from leading.
    pub fn excluded(&self) -> &[Rid] {
        &self.excluded
    }

    /// Leader of `view` under the exclusions in force (round-robin over the rest).
    pub(crate) fn leader_of(&self, view: View) -> Rid {
        let eligible: Vec<Rid> = (0..self.scores.len()).filter(|r| !self.excluded.contains(r)).collect();
        eligible[(view % eligible.len() as u64) as usize]
    }

    /// Block `h` committed after `prev` (None at height 1); `proposer` is its
    /// proposer's replica id, if a validator's key. Returns true if the
    /// exclusions changed.
    pub fn on_block(&mut self, prev_view: View, view: View, proposer: Option<Rid>) -> bool {
        for w in prev_view..view {
            let l = self.leader_of(w);
            self.scores[l] = self.scores[l].saturating_sub(Self::FAILED_VIEW);
        }
        if let Some(p) = proposer.filter(|&p| p < self.scores.len()) {
            self.scores[p] = (self.scores[p] + Self::PROPOSED).min(Self::FULL);
        }
        for s in &mut self.scores {
            *s = (*s + Self::PER_BLOCK).min(Self::FULL);
        }
        self.recompute()
    }

    /// The same scores and quarantines for a new validator set's replica
    /// ids, carried by validator id (`old`, `new`: the ids in replica
    /// order); a validator new to the set starts with a full score.
    pub fn for_set(&self, old: &[u32], new: &[u32]) -> Reputation {
        let mut r = Reputation::new(new.len(), None, self.quarantine);
        r.floor = self.floor;
        for (rid, id) in new.iter().enumerate() {
            if let Some(o) = old.iter().position(|x| x == id) {
                r.scores[rid] = self.scores[o];
                if self.quarantined.contains(&o) {
                    r.quarantined.insert(rid);
                }
            }
        }
        r.recompute();
        r
    }

    fn recompute(&mut self) -> bool {
        let mut out: Vec<Rid> = self.quarantined.iter().copied().collect();
        if let Some(floor) = self.floor {
            let mut low: Vec<Rid> =
                (0..self.scores.len()).filter(|&r| self.scores[r] < floor && !self.quarantined.contains(&r)).collect();
            low.sort_by_key(|&r| (self.scores[r], r));
            out.extend(low);
        }
        out.truncate(self.f);
        out.sort();
        if out != self.excluded {
            self.excluded = out;
            return true;
        }
        false
    }
}
