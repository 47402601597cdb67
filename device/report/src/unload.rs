//! `unload-live`'s figures: the `unload` object of its result line.

use serde::{Deserialize, Serialize};

use crate::MsPercentiles;

/// Fences still pending right before the `rmmod`s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PendingAtRmmod {
    /// `None` when no round reached its `rmmod`.
    pub min: Option<u64>,
    pub max: Option<u64>,
    pub total: u64,
}

/// fencelab_drm's debugfs totals, summed over the rounds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DriverTotals {
    pub ordering_violations: u64,
    pub timeouts: u64,
    pub hints_sent: u64,
    pub hints_dropped: u64,
}

impl DriverTotals {
    pub fn add(&mut self, other: Self) {
        self.ordering_violations += other.ordering_violations;
        self.timeouts += other.timeouts;
        self.hints_sent += other.hints_sent;
        self.hints_dropped += other.hints_dropped;
    }
}

/// The `unload` object of the result line: what happened to the fences at
/// the module unloads. `completed_before_rmmod + cut_off_enodev` fences
/// signaled (the run's `fences_signaled`); `other_errors` and
/// `unsignaled_after_rmmod` must be 0.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UnloadReport {
    /// Rounds whose `rmmod` succeeded.
    pub rounds: u64,
    pub pending_at_rmmod: PendingAtRmmod,
    /// Signaled successfully: the device completed them before the unload.
    pub completed_before_rmmod: u64,
    /// Signaled with `-ENODEV`: the unload cut them off.
    pub cut_off_enodev: u64,
    /// Signaled with another error, or their FILE_INFO failed.
    pub other_errors: u64,
    /// Not signaled after the unload.
    pub unsignaled_after_rmmod: u64,
    /// Fences given a `SYNC_IOC_SET_DEADLINE`.
    pub deadlines_set: u64,
    /// How long each successful `delete_module` call took.
    pub rmmod_ms: MsPercentiles,
    /// From `modprobe` to the first fence SUBMIT returned, for each round
    /// that loaded the module (all but the first).
    pub load_to_first_submit_ms: MsPercentiles,
    /// The driver's debugfs totals, summed over the rounds (read before each
    /// unload).
    pub driver: DriverTotals,
}

impl UnloadReport {
    /// The figures as a few lines for people.
    pub fn lines(&self) -> String {
        let p = &self.pending_at_rmmod;
        let or_dash = |x: Option<u64>| x.map_or("-".into(), |v: u64| v.to_string());
        format!(
            "{} rounds; pending at rmmod min {} · max {} · total {}\n\
             after rmmod: {} completed before it, {} cut off (-ENODEV), {} other errors, {} unsignaled\n\
             rmmod ms {}; load → first submit ms {}\n\
             driver: {} ordering violations, {} job timeouts, {} deadline hints sent ({} set), {} dropped",
            self.rounds,
            or_dash(p.min),
            or_dash(p.max),
            p.total,
            self.completed_before_rmmod,
            self.cut_off_enodev,
            self.other_errors,
            self.unsignaled_after_rmmod,
            self.rmmod_ms.one_line(),
            self.load_to_first_submit_ms.one_line(),
            self.driver.ordering_violations,
            self.driver.timeouts,
            self.driver.hints_sent,
            self.deadlines_set,
            self.driver.hints_dropped,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_totals_add_up() {
        let mut t = DriverTotals {
            ordering_violations: 1,
            timeouts: 2,
            hints_sent: 3,
            hints_dropped: 4,
        };
        t.add(t);
        assert_eq!(
            t,
            DriverTotals {
                ordering_violations: 2,
                timeouts: 4,
                hints_sent: 6,
                hints_dropped: 8,
            }
        );
    }

    #[test]
    fn lines_show_dashes_for_what_was_not_measured() {
        let r = UnloadReport {
            rounds: 2,
            pending_at_rmmod: PendingAtRmmod {
                min: Some(3),
                max: Some(5),
                total: 8,
            },
            cut_off_enodev: 8,
            rmmod_ms: MsPercentiles::from_ms(&[1.25, 9.25]),
            ..UnloadReport::default()
        };
        let lines = r.lines();
        assert!(
            lines.contains("2 rounds; pending at rmmod min 3 · max 5 · total 8"),
            "{lines}"
        );
        assert!(lines.contains("8 cut off (-ENODEV)"), "{lines}");
        assert!(
            lines.contains("rmmod ms p50 1.2 · p99 9.2 · max 9.2; load → first submit ms p50 -"),
            "{lines}"
        );
    }
}
