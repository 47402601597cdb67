//! The per-workload objects of the result line beyond `unload`: what
//! `deadline-race`, `callback-vs-release`, `array-order` and `reset`
//! measured. Each is absent from the line of the other workloads.

use serde::{Deserialize, Serialize};

use crate::{DriverTotals, RttUs};

/// `deadline-race`: `SYNC_IOC_SET_DEADLINE` in a tight loop on every
/// in-flight fence, racing its signaling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeadlineRaceReport {
    /// Successful `SYNC_IOC_SET_DEADLINE` calls.
    pub deadlines_set: u64,
    /// Of those, the submitter's one call on each fence right after its
    /// submission.
    pub set_at_submit: u64,
    /// Of those, calls on a fence already seen signaled before the call.
    pub set_after_signal: u64,
    /// `SYNC_IOC_SET_DEADLINE` calls that failed.
    pub set_errors: u64,
    /// fencelab_drm's own counters at the end of the run (`None` on
    /// virtio_gpu, which has no such file).
    pub driver: Option<DriverTotals>,
}

impl DeadlineRaceReport {
    /// One line for people.
    pub fn one_line(&self) -> String {
        let mut line = format!(
            "{} deadlines set ({} at submission, {} on signaled fences), {} ioctl errors",
            self.deadlines_set, self.set_at_submit, self.set_after_signal, self.set_errors
        );
        if let Some(d) = self.driver {
            line.push_str(&format!(
                "; fencelab_drm sent {} deadline hints to the device, dropped {}",
                d.hints_sent, d.hints_dropped
            ));
        }
        line
    }
}

/// `callback-vs-release`: poll waiters, merges and early closes racing the
/// final `dma_fence_put`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CallbackRaceReport {
    /// Poll waits on merged sync_files that ended (signaled or timed out).
    pub poll_waiters: u64,
    /// Successful `SYNC_IOC_MERGE` calls.
    pub merges: u64,
    /// Original out-fence fds closed while their fence was still unsignaled.
    pub early_closes: u64,
    /// Open fds at the end beyond those open at the start (must be 0).
    pub fds_leaked: u64,
}

impl CallbackRaceReport {
    /// One line for people.
    pub fn one_line(&self) -> String {
        format!(
            "{} poll waits, {} merges, {} early closes, {} fds leaked",
            self.poll_waiters, self.merges, self.early_closes, self.fds_leaked
        )
    }
}

/// `array-order`: merged sync_files (dma_fence arrays) and the order their
/// components and they themselves were seen signaled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ArrayOrderReport {
    /// Merged sync_files made.
    pub arrays: u64,
    /// Fences merged into them.
    pub components: u64,
    /// Arrays seen signaled while one of their components was not (findings).
    pub violations: u64,
    /// From the last component's signal (its kernel timestamp) to the array
    /// seen signaled, in µs.
    pub lag_us: RttUs,
}

impl ArrayOrderReport {
    /// One line for people.
    pub fn one_line(&self) -> String {
        format!(
            "{} arrays of {} fences, {} signaled before a component; lag µs {}",
            self.arrays,
            self.components,
            self.violations,
            self.lag_us.one_line()
        )
    }
}

/// `reset`: the device unbound from its driver and bound again with fences
/// pending.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ResetReport {
    /// Unbind + bind cycles that completed.
    pub rounds: u64,
    /// Fences still pending right before the unbinds, summed.
    pub pending_at_unbind: u64,
    /// Fences signaled `-ENODEV` by the unbinds.
    pub cut_off: u64,
    /// Fences submitted after a rebind.
    pub after_reset_fences: u64,
    /// Of those, fences that signaled without error.
    pub after_reset_ok: u64,
}

impl ResetReport {
    /// One line for people.
    pub fn one_line(&self) -> String {
        format!(
            "{} rounds; {} fences pending at unbind, {} cut off (-ENODEV); after rebind {}/{} fences ok",
            self.rounds,
            self.pending_at_unbind,
            self.cut_off,
            self.after_reset_ok,
            self.after_reset_fences
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_keys_read_as_zero() {
        let r: ArrayOrderReport = serde_json::from_str(r#"{"arrays":3}"#).unwrap();
        assert_eq!(r.arrays, 3);
        assert_eq!((r.components, r.violations), (0, 0));
        assert_eq!(r.lag_us, RttUs::default());
        let r: ResetReport = serde_json::from_str("{}").unwrap();
        assert_eq!(r, ResetReport::default());
    }

    #[test]
    fn one_lines_name_the_figures() {
        let mut d = DeadlineRaceReport {
            deadlines_set: 10,
            set_at_submit: 4,
            set_after_signal: 2,
            set_errors: 1,
            driver: None,
        };
        assert_eq!(
            d.one_line(),
            "10 deadlines set (4 at submission, 2 on signaled fences), 1 ioctl errors"
        );
        d.driver = Some(DriverTotals {
            hints_sent: 7,
            hints_dropped: 3,
            ..DriverTotals::default()
        });
        assert!(
            d.one_line()
                .ends_with("; fencelab_drm sent 7 deadline hints to the device, dropped 3"),
            "{}",
            d.one_line()
        );
        let old: DeadlineRaceReport =
            serde_json::from_str(r#"{"deadlines_set":3,"set_after_signal":1}"#).unwrap();
        assert_eq!(
            (old.set_at_submit, old.driver),
            (0, None),
            "older lines read"
        );
        let a = ArrayOrderReport {
            arrays: 2,
            components: 8,
            violations: 1,
            lag_us: RttUs::from_ns(&[5_000, 7_000]),
        };
        assert_eq!(
            a.one_line(),
            "2 arrays of 8 fences, 1 signaled before a component; lag µs p50 5 · p99 7 · max 7"
        );
        let c = CallbackRaceReport {
            poll_waiters: 9,
            merges: 9,
            early_closes: 3,
            fds_leaked: 0,
        };
        assert!(c.one_line().ends_with("3 early closes, 0 fds leaked"));
        let r = ResetReport {
            rounds: 2,
            pending_at_unbind: 30,
            cut_off: 28,
            after_reset_fences: 8,
            after_reset_ok: 8,
        };
        assert!(
            r.one_line()
                .contains("28 cut off (-ENODEV); after rebind 8/8")
        );
    }
}
