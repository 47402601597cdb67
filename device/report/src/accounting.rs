//! The device's fence accounting.

use serde::{Deserialize, Serialize};

/// Fence counts for one timeline, or all of them. Every fence the device
/// accepted is in exactly one of `completed`, `hung`, `pending` or
/// `abandoned`: `submitted == completed + hung + pending + abandoned`.
/// A key the device did not write reads as 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Accounting {
    pub submitted: u64,
    /// Returned to the guest (with an OK or an injected error response).
    pub completed: u64,
    /// Of `completed`, answered with an error response.
    pub errored: u64,
    /// Of `completed`, returned early because the queue stopped or the
    /// device reset: before their due time, while held behind their
    /// timeline's order or reorder block, or while completions were paused.
    /// The guest driver resetting the device usually signals these itself
    /// (with an error) first.
    pub flushed: u64,
    /// Hung now (forever or until released).
    pub hung: u64,
    /// Scheduled, not yet due or waiting on their timeline.
    pub pending: u64,
    /// Hung fences dropped by a device reset.
    pub abandoned: u64,
    /// Hung fences released over the control plane (now in `completed`).
    pub released: u64,
    /// Completions whose interrupt was dropped.
    pub irq_dropped: u64,
    /// Notifies with nothing new (spurious and storms).
    pub irq_spurious: u64,
    pub deadline_hints: u64,
    pub deadline_boosts: u64,
}

impl Accounting {
    /// `completed + hung + pending + abandoned`: must equal `submitted`.
    pub fn accounted(&self) -> u64 {
        self.completed + self.hung + self.pending + self.abandoned
    }

    /// `N submitted, M completed`, then only the counts that are not 0.
    pub fn one_line(&self) -> String {
        let mut s = format!("{} submitted, {} completed", self.submitted, self.completed);
        for (n, what) in [
            (self.errored, "errored"),
            (self.flushed, "flushed early (queue stop/reset)"),
            (self.hung, "hung"),
            (self.pending, "pending"),
            (self.abandoned, "abandoned"),
            (self.released, "released"),
            (self.irq_dropped, "irq dropped"),
            (self.irq_spurious, "irq spurious"),
            (self.deadline_hints, "deadline hints"),
            (self.deadline_boosts, "deadline boosts"),
        ] {
            if n != 0 {
                s.push_str(&format!(", {n} {what}"));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_name_only_what_happened() {
        let a = Accounting {
            submitted: 10,
            completed: 8,
            hung: 2,
            irq_dropped: 1,
            ..Accounting::default()
        };
        assert_eq!(a.accounted(), 10);
        assert_eq!(
            a.one_line(),
            "10 submitted, 8 completed, 2 hung, 1 irq dropped"
        );
        let flushed = Accounting {
            submitted: 10,
            completed: 10,
            flushed: 9,
            ..Accounting::default()
        };
        assert_eq!(
            flushed.one_line(),
            "10 submitted, 10 completed, 9 flushed early (queue stop/reset)"
        );
    }
}
