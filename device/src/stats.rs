//! What the device did, for the shutdown summary, the control plane's
//! `stats` and the test oracles:
//!
//! - command counts by type, error responses, chains returned without any
//!   response;
//! - fence [`Accounting`] in total, per command and per timeline, kept so
//!   that `submitted == completed + hung + pending + abandoned` holds in
//!   every bucket at every moment a lock is not held;
//! - per-timeline latency histograms in µs: *injected* (due − arrival, what
//!   the plan asked for) and *observed* (completion − arrival).
//!
//! Deadline hints for fences the device never saw count in the totals only,
//! so per-timeline `deadline_hints` may sum to less than the total.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tracing::warn;

use crate::fault::{Accounting, TimelineId};

/// The buckets a fence is counted in: its timeline and its command type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FenceTag {
    pub timeline: TimelineId,
    /// Command type name, e.g. `"SUBMIT_3D"`.
    pub command: &'static str,
}

/// How a fence went back to the guest, for [`Stats::fence_completed`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// Answered with an error response.
    pub errored: bool,
    /// Returned early by a queue stop or device reset
    /// ([`Accounting::flushed`]).
    pub flushed: bool,
    /// Due − arrival; `None` for a released fence, which had no due time.
    pub injected_ns: Option<u64>,
    /// Completion − arrival.
    pub observed_ns: u64,
}

/// The device's counters. Cheap to update from the vring and engine threads.
#[derive(Debug, Default)]
pub struct Stats {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    commands: BTreeMap<&'static str, u64>,
    error_responses: u64,
    dropped: u64,
    /// Requests refused because they would have exceeded a cap of the
    /// device's (`gpu::Cap::key`), answered `ERR_OUT_OF_MEMORY`.
    refused_over_cap: BTreeMap<&'static str, u64>,
    totals: Accounting,
    by_command: BTreeMap<&'static str, Accounting>,
    timelines: BTreeMap<TimelineId, TimelineStats>,
}

#[derive(Debug)]
struct TimelineStats {
    accounting: Accounting,
    injected_us: Latencies,
    observed_us: Latencies,
}

impl TimelineStats {
    fn new() -> Self {
        TimelineStats {
            accounting: Accounting::default(),
            injected_us: Latencies::new(),
            observed_us: Latencies::new(),
        }
    }
}

/// A latency histogram in µs. `None` only if hdrhistogram refused to build
/// one, which it does not for 3 significant figures; kept total anyway.
#[derive(Debug)]
struct Latencies(Option<Histogram<u64>>);

impl Latencies {
    fn new() -> Self {
        // 3 significant figures, auto-resizing: any u64 µs value fits.
        Latencies(Histogram::new(3).ok())
    }

    fn record_ns(&mut self, ns: u64) {
        if let Some(h) = &mut self.0 {
            if let Err(e) = h.record(ns / 1_000) {
                warn!("latency histogram cannot record {ns} ns: {e}");
            }
        }
    }

    fn json(&self) -> Value {
        match &self.0 {
            Some(h) if !h.is_empty() => json!({
                "count": h.len(),
                "p50": h.value_at_quantile(0.50),
                "p90": h.value_at_quantile(0.90),
                "p99": h.value_at_quantile(0.99),
                "max": h.max(),
            }),
            _ => json!({ "count": 0 }),
        }
    }
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// Applies `f` to the totals and to the fence's command and timeline.
    fn fence(&mut self, tag: FenceTag, f: impl Fn(&mut Accounting)) -> &mut TimelineStats {
        f(&mut self.totals);
        f(self.by_command.entry(tag.command).or_default());
        let tl = self
            .timelines
            .entry(tag.timeline)
            .or_insert_with(TimelineStats::new);
        f(&mut tl.accounting);
        tl
    }
}

fn dec(x: &mut u64) {
    *x = x.saturating_sub(1);
}

impl Stats {
    pub fn new() -> Self {
        Self::default()
    }

    /// One request of type `name` was served (whatever the answer).
    pub fn command(&self, name: &'static str) {
        *lock(&self.inner).commands.entry(name).or_default() += 1;
    }

    /// A request was answered with an error (fenced or not).
    pub fn error_response(&self) {
        lock(&self.inner).error_responses += 1;
    }

    /// A request was refused because it would have exceeded the cap named
    /// `cap` (kept across device resets, unlike the `Gpu` that refused it).
    pub fn refused_over_cap(&self, cap: &'static str) {
        *lock(&self.inner).refused_over_cap.entry(cap).or_default() += 1;
    }

    /// A chain returned without any response (nowhere to write one).
    pub fn dropped(&self) {
        lock(&self.inner).dropped += 1;
    }

    /// A fenced command was accepted; `hung`: forever or until released.
    pub fn fence_submitted(&self, tag: FenceTag, hung: bool) {
        lock(&self.inner).fence(tag, |a| {
            a.submitted += 1;
            if hung {
                a.hung += 1;
            } else {
                a.pending += 1;
            }
        });
    }

    /// A pending fence went back to the guest.
    pub fn fence_completed(&self, tag: FenceTag, c: Completion) {
        let mut inner = lock(&self.inner);
        let tl = inner.fence(tag, |a| {
            dec(&mut a.pending);
            a.completed += 1;
            if c.errored {
                a.errored += 1;
            }
            if c.flushed {
                a.flushed += 1;
            }
        });
        if let Some(ns) = c.injected_ns {
            tl.injected_us.record_ns(ns);
        }
        tl.observed_us.record_ns(c.observed_ns);
    }

    /// A hung fence was released: it is pending again until it completes.
    pub fn fence_released(&self, tag: FenceTag) {
        lock(&self.inner).fence(tag, |a| {
            dec(&mut a.hung);
            a.pending += 1;
            a.released += 1;
        });
    }

    /// A fence will never go back to the guest (`was_hung`: it was counted
    /// hung, else pending).
    pub fn fence_abandoned(&self, tag: FenceTag, was_hung: bool) {
        lock(&self.inner).fence(tag, |a| {
            if was_hung {
                dec(&mut a.hung);
            } else {
                dec(&mut a.pending);
            }
            a.abandoned += 1;
        });
    }

    /// A completion's interrupt was dropped by the plan.
    pub fn irq_dropped(&self, tag: FenceTag) {
        lock(&self.inner).fence(tag, |a| a.irq_dropped += 1);
    }

    /// A spurious notify asked for by this fence's decision was sent.
    pub fn irq_spurious(&self, tag: FenceTag) {
        lock(&self.inner).fence(tag, |a| a.irq_spurious += 1);
    }

    /// A `DEADLINE` hint arrived for a fence (`None`: one the device does
    /// not know, counted in the totals only).
    pub fn deadline_hint(&self, target: Option<FenceTag>, boosted: bool) {
        let count = |a: &mut Accounting| {
            a.deadline_hints += 1;
            if boosted {
                a.deadline_boosts += 1;
            }
        };
        let mut inner = lock(&self.inner);
        match target {
            Some(tag) => {
                inner.fence(tag, count);
            }
            None => count(&mut inner.totals),
        }
    }

    /// Requests of type `name` served so far.
    pub fn count(&self, name: &str) -> u64 {
        lock(&self.inner).commands.get(name).copied().unwrap_or(0)
    }

    pub fn commands_total(&self) -> u64 {
        lock(&self.inner).commands.values().sum()
    }

    /// (submitted, completed) fences.
    pub fn fences(&self) -> (u64, u64) {
        let inner = lock(&self.inner);
        (inner.totals.submitted, inner.totals.completed)
    }

    /// Fences accepted and not yet returned nor abandoned (pending + hung).
    pub fn fences_outstanding(&self) -> u64 {
        let inner = lock(&self.inner);
        inner.totals.pending + inner.totals.hung
    }

    pub fn errors(&self) -> u64 {
        lock(&self.inner).error_responses
    }

    /// Totals over all timelines.
    pub fn accounting(&self) -> Accounting {
        lock(&self.inner).totals
    }

    pub fn accounting_by_command(&self) -> BTreeMap<String, Accounting> {
        lock(&self.inner)
            .by_command
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect()
    }

    pub fn accounting_by_timeline(&self) -> BTreeMap<TimelineId, Accounting> {
        lock(&self.inner)
            .timelines
            .iter()
            .map(|(k, v)| (*k, v.accounting))
            .collect()
    }

    /// The shutdown summary: command counts, fence totals, and the
    /// accounting in total, per command and per timeline. The caller adds
    /// what only it knows (`seed`).
    pub fn summary(&self) -> Value {
        let inner = lock(&self.inner);
        let timelines: BTreeMap<String, Accounting> = inner
            .timelines
            .iter()
            .map(|(k, v)| (k.to_string(), v.accounting))
            .collect();
        json!({
            "commands": inner.commands.values().sum::<u64>(),
            "commands_by_type": inner.commands,
            "fences_submitted": inner.totals.submitted,
            "fences_completed": inner.totals.completed,
            "error_responses": inner.error_responses,
            "dropped": inner.dropped,
            "refused_over_cap": inner.refused_over_cap,
            "fences_pending": inner.totals.pending + inner.totals.hung,
            "accounting": inner.totals,
            "accounting_by_command": inner.by_command,
            "timelines": timelines,
        })
    }

    /// Live statistics for the control plane: the accounting plus, per
    /// timeline, p50/p90/p99/max/count of the injected and observed latency
    /// in µs.
    pub fn json(&self) -> Value {
        let inner = lock(&self.inner);
        let timelines: serde_json::Map<String, Value> = inner
            .timelines
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    json!({
                        "accounting": v.accounting,
                        "injected_us": v.injected_us.json(),
                        "observed_us": v.observed_us.json(),
                    }),
                )
            })
            .collect();
        json!({
            "commands": inner.commands.values().sum::<u64>(),
            "commands_by_type": inner.commands,
            "error_responses": inner.error_responses,
            "dropped": inner.dropped,
            "refused_over_cap": inner.refused_over_cap,
            "accounting": inner.totals,
            "accounting_by_command": inner.by_command,
            "timelines": timelines,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUBMIT: &str = "SUBMIT_3D";

    fn tag(ctx: u32) -> FenceTag {
        FenceTag {
            timeline: TimelineId { ctx, ring: 0 },
            command: SUBMIT,
        }
    }

    fn holds(a: &Accounting) -> bool {
        a.submitted == a.completed + a.hung + a.pending + a.abandoned
    }

    #[test]
    fn summary_counts() {
        let s = Stats::new();
        s.command("SUBMIT_3D");
        s.command("SUBMIT_3D");
        s.command("GET_EDID");
        s.fence_submitted(tag(1), false);
        s.fence_completed(
            tag(1),
            Completion {
                errored: true,
                injected_ns: Some(1_000),
                observed_ns: 2_000,
                ..Completion::default()
            },
        );
        s.error_response();
        s.refused_over_cap("contexts");
        s.refused_over_cap("contexts");
        let j = s.summary();
        assert_eq!(j["refused_over_cap"], json!({"contexts": 2}));
        assert_eq!(s.json()["refused_over_cap"], j["refused_over_cap"]);
        assert_eq!(j["commands"], 3);
        assert_eq!(j["commands_by_type"]["SUBMIT_3D"], 2);
        assert_eq!(j["fences_submitted"], 1);
        assert_eq!(j["fences_completed"], 1);
        assert_eq!(j["error_responses"], 1);
        assert_eq!(j["dropped"], 0);
        assert_eq!(j["fences_pending"], 0);
        assert_eq!(j["accounting"]["errored"], 1);
        assert_eq!(j["accounting"]["flushed"], 0);
        assert_eq!(j["accounting_by_command"][SUBMIT]["completed"], 1);
        assert_eq!(j["timelines"]["1.0"]["completed"], 1);
    }

    #[test]
    fn every_transition_keeps_the_invariant_in_every_bucket() {
        let s = Stats::new();
        let (a, b) = (tag(1), tag(2));
        s.fence_submitted(a, false);
        s.fence_submitted(a, true);
        s.fence_submitted(b, true);
        s.fence_submitted(b, false);
        s.fence_released(a);
        s.fence_completed(
            a,
            Completion {
                observed_ns: 10,
                ..Completion::default()
            },
        );
        s.fence_completed(
            a,
            Completion {
                flushed: true,
                injected_ns: Some(5),
                observed_ns: 10,
                ..Completion::default()
            },
        );
        s.fence_abandoned(b, true);
        s.irq_dropped(b);
        s.irq_spurious(a);
        s.deadline_hint(Some(b), true);
        s.deadline_hint(None, false);

        let total = s.accounting();
        assert!(holds(&total), "{total:?}");
        assert_eq!(
            (total.submitted, total.completed, total.pending, total.hung),
            (4, 2, 1, 0)
        );
        assert_eq!((total.abandoned, total.released), (1, 1));
        assert_eq!((total.flushed, total.errored), (1, 0));
        assert_eq!((total.deadline_hints, total.deadline_boosts), (2, 1));
        let tls = s.accounting_by_timeline();
        assert!(tls.values().all(holds));
        assert_eq!(tls[&b.timeline].deadline_hints, 1, "unknown hint not here");
        assert_eq!(tls[&b.timeline].irq_dropped, 1);
        assert_eq!((tls[&a.timeline].flushed, tls[&b.timeline].flushed), (1, 0));
        assert_eq!(tls[&a.timeline].irq_spurious, 1);
        let cmds = s.accounting_by_command();
        assert!(cmds.values().all(holds));
        assert_eq!((cmds[SUBMIT].submitted, cmds[SUBMIT].flushed), (4, 1));
        assert_eq!(s.fences_outstanding(), 1);
    }

    #[test]
    fn latency_histograms_report_microseconds() {
        let s = Stats::new();
        for ms in 1..=100u64 {
            s.fence_submitted(tag(3), false);
            s.fence_completed(
                tag(3),
                Completion {
                    injected_ns: Some(ms * 1_000_000),
                    observed_ns: ms * 1_000_000 + 7_000,
                    ..Completion::default()
                },
            );
        }
        let j = s.json();
        let inj = &j["timelines"]["3.0"]["injected_us"];
        assert_eq!(inj["count"], 100);
        let p50 = inj["p50"].as_u64().unwrap();
        assert!((49_900..=50_100).contains(&p50), "{p50}");
        let max = j["timelines"]["3.0"]["observed_us"]["max"]
            .as_u64()
            .unwrap();
        assert!((100_000..=100_200).contains(&max), "{max}");
        assert_eq!(j["accounting"]["completed"], 100);
    }
}
