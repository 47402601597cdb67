//! Signal-order checks for fences on one timeline: a fence submitted later
//! must never be seen signaled before one submitted earlier.

/// Given the readiness of the in-flight fences in submission order (oldest
/// first), sampled newest-first in one pass, marks each fence that is ready
/// while some older fence is not: it signaled out of order.
pub fn ready_before_older(ready_oldest_first: &[bool]) -> Vec<bool> {
    let mut older_pending = false;
    ready_oldest_first
        .iter()
        .map(|&ready| {
            let early = ready && older_pending;
            older_pending |= !ready;
            early
        })
        .collect()
}

/// Checks kernel signal timestamps: along one timeline they must not
/// decrease in submission order.
#[derive(Debug, Default)]
pub struct TimestampOrder {
    /// (sequence number, timestamp) of the newest fence checked so far.
    newest: Option<(u64, u64)>,
}

impl TimestampOrder {
    /// Records fence `seq` signaled at `timestamp_ns`. Returns the
    /// `(older seq, older timestamp)` it contradicts when it signaled before
    /// an older fence already seen. A straggler (seq older than the newest
    /// checked) is not compared: the newer fence that overtook it was already
    /// reported by whichever check saw it first.
    pub fn check(&mut self, seq: u64, timestamp_ns: u64) -> Option<(u64, u64)> {
        match self.newest {
            Some((newest_seq, _)) if seq < newest_seq => None,
            Some((newest_seq, newest_ts)) if timestamp_ns < newest_ts => {
                self.newest = Some((seq, timestamp_ns));
                Some((newest_seq, newest_ts))
            }
            _ => {
                self.newest = Some((seq, timestamp_ns));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ready_prefix_is_in_order() {
        assert_eq!(ready_before_older(&[]), Vec::<bool>::new());
        assert_eq!(
            ready_before_older(&[true, true, false, false]),
            vec![false; 4]
        );
        assert_eq!(ready_before_older(&[false, false]), vec![false; 2]);
        assert_eq!(ready_before_older(&[true, true, true]), vec![false; 3]);
    }

    #[test]
    fn ready_after_a_pending_one_is_flagged() {
        assert_eq!(ready_before_older(&[false, true]), vec![false, true]);
        assert_eq!(
            ready_before_older(&[true, false, true, false, true]),
            vec![false, false, true, false, true]
        );
    }

    #[test]
    fn timestamps_must_not_decrease() {
        let mut t = TimestampOrder::default();
        assert_eq!(t.check(0, 100), None);
        assert_eq!(t.check(1, 100), None, "equal timestamps are fine");
        assert_eq!(t.check(2, 150), None);
        assert_eq!(t.check(3, 140), Some((2, 150)));
        // 4 is compared with 3 (the newest), not with 2.
        assert_eq!(t.check(4, 145), None);
        // A straggler older than the newest is not double-counted.
        assert_eq!(t.check(1, 10), None);
        assert_eq!(t.check(5, 144), Some((4, 145)));
    }
}
