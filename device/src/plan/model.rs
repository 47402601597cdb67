//! The validated plan: what [`super::validate`] produces from the file and
//! what the decider reads. Times are nanoseconds.

use std::ops::RangeInclusive;

use crate::fault::{FenceInfo, Hang, IrqFault, TimelineId};

use super::latency::Latency;

/// What happens to a fence. In `[default]` and in rules every action is
/// optional; a matching rule's actions replace the ones before it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Actions {
    pub latency: Option<Latency>,
    pub reorder: Option<Reorder>,
    /// Cross-timeline reorder: a uniform extra delay in `[0, jitter_ns)`.
    pub jitter_ns: Option<u64>,
    /// `Some(None)` is `hang = "none"`: undoes an earlier rule's hang.
    pub hang: Option<Option<Hang>>,
    /// `Some(None)` is `error = "none"`.
    pub error: Option<Option<u32>>,
    pub irq: Option<IrqFault>,
}

impl Actions {
    /// `self` with every action `later` sets replaced by `later`'s.
    pub fn overridden_by(&mut self, later: &Actions) {
        fn take<T: Clone>(slot: &mut Option<T>, later: &Option<T>) {
            if later.is_some() {
                slot.clone_from(later);
            }
        }
        take(&mut self.latency, &later.latency);
        take(&mut self.reorder, &later.reorder);
        take(&mut self.jitter_ns, &later.jitter_ns);
        take(&mut self.hang, &later.hang);
        take(&mut self.error, &later.error);
        take(&mut self.irq, &later.irq);
    }
}

/// Start a reorder block of `window` consecutive arrivals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reorder {
    pub window: u32,
    pub hold_ns: u64,
}

/// One `[[rule]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub name: String,
    pub matcher: Match,
    pub actions: Actions,
}

/// `[rule.match]`: every condition given must hold. `None` means "any".
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Match {
    pub ctx: Option<Vec<u32>>,
    pub timeline: Option<Vec<TimelineId>>,
    pub fence: Option<RangeInclusive<u64>>,
    pub index: Option<RangeInclusive<u64>>,
    /// Matches indexes `every-1`, `2·every-1`, …
    pub every: Option<u64>,
    /// Checked by the decider with a draw from its RNG, after everything else
    /// matched.
    pub probability: Option<f64>,
    pub command: Option<Vec<String>>,
}

impl Match {
    /// Whether every condition except `probability` holds.
    pub fn matches_fixed(&self, fence: &FenceInfo) -> bool {
        fn in_list<T: PartialEq>(list: &Option<Vec<T>>, x: T) -> bool {
            list.as_ref().is_none_or(|l| l.contains(&x))
        }
        in_list(&self.ctx, fence.timeline.ctx)
            && in_list(&self.timeline, fence.timeline)
            && self
                .fence
                .as_ref()
                .is_none_or(|r| r.contains(&fence.fence_id))
            && self.index.as_ref().is_none_or(|r| r.contains(&fence.index))
            && self.every.is_none_or(|n| n > 0 && fence.index % n == n - 1)
            && self
                .command
                .as_ref()
                .is_none_or(|c| c.iter().any(|c| c == fence.command))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fence_on;

    #[test]
    fn empty_match_matches_everything() {
        assert!(Match::default().matches_fixed(&fence_on(0, 1, 0)));
    }

    #[test]
    fn each_condition_filters() {
        let m = Match {
            ctx: Some(vec![1, 2]),
            ..Match::default()
        };
        assert!(m.matches_fixed(&fence_on(2, 1, 0)));
        assert!(!m.matches_fixed(&fence_on(3, 1, 0)));

        let m = Match {
            timeline: Some(vec![TimelineId { ctx: 1, ring: 1 }]),
            ..Match::default()
        };
        assert!(!m.matches_fixed(&fence_on(1, 1, 0)));
        let mut f = fence_on(1, 1, 0);
        f.timeline.ring = 1;
        assert!(m.matches_fixed(&f));

        let m = Match {
            fence: Some(100..=200),
            ..Match::default()
        };
        let hits: Vec<u64> = (0..300)
            .filter(|&id| m.matches_fixed(&fence_on(1, id, 0)))
            .collect();
        assert_eq!(hits, (100..=200).collect::<Vec<_>>());

        let m = Match {
            index: Some(5..=6),
            ..Match::default()
        };
        let hits: Vec<u64> = (0..10)
            .filter(|&i| m.matches_fixed(&fence_on(1, 0, i)))
            .collect();
        assert_eq!(hits, vec![5, 6]);

        let m = Match {
            every: Some(10),
            ..Match::default()
        };
        let hits: Vec<u64> = (0..35)
            .filter(|&i| m.matches_fixed(&fence_on(1, 0, i)))
            .collect();
        assert_eq!(hits, vec![9, 19, 29]);

        let m = Match {
            command: Some(vec!["RESOURCE_FLUSH".into()]),
            ..Match::default()
        };
        assert!(!m.matches_fixed(&fence_on(1, 0, 0)));
    }

    #[test]
    fn later_actions_override_only_what_they_set() {
        let mut a = Actions {
            latency: Some(Latency::fixed(5)),
            irq: Some(IrqFault::Drop),
            hang: Some(Some(Hang::Forever)),
            ..Actions::default()
        };
        a.overridden_by(&Actions {
            latency: Some(Latency::fixed(9)),
            hang: Some(None),
            ..Actions::default()
        });
        assert_eq!(a.latency, Some(Latency::fixed(9)));
        assert_eq!(a.irq, Some(IrqFault::Drop));
        assert_eq!(a.hang, Some(None));
    }
}
