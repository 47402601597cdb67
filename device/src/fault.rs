//! The vocabulary shared by the parts of the fault machinery:
//!
//! - the plan ([`crate::plan`]) turns a [`FenceInfo`] into a [`Decision`]
//!   through the [`Decide`] trait, drawing from one seeded RNG;
//! - the engine ([`crate::engine`]) carries the decision out and reports
//!   what happened as [`TraceEvent`]s to a [`Tracer`];
//! - the trace ([`crate::trace`]) writes those events as JSON lines and reads
//!   them back for `--replay`;
//! - the control plane ([`crate::control`]) drives a running device through
//!   [`DeviceControl`].
//!
//! Times in decisions and trace events are integers in nanoseconds so that a
//! trace is exact and replays bit for bit. `t_ns` and `due_ns` are measured
//! from the device's start ([`crate::engine`] owns that clock).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A timeline: the fences of one device context and ring. Within a timeline
/// the device completes fences in arrival order unless the plan reorders or
/// hangs them (a GPU ring is FIFO); across timelines there is no order.
///
/// The upstream `virtio_gpu` driver without `CONTEXT_INIT` uses ring 0 of the
/// DRM file's context; kernel-internal fences (fbdev) use context 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TimelineId {
    pub ctx: u32,
    pub ring: u8,
}

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.ctx, self.ring)
    }
}

/// Error parsing a [`TimelineId`] from `"CTX.RING"` or `"CTX"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad timeline {0:?}: expected CTX or CTX.RING, e.g. \"3\" or \"3.0\"")]
pub struct BadTimeline(pub String);

impl FromStr for TimelineId {
    type Err = BadTimeline;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadTimeline(s.to_string());
        let (ctx, ring) = match s.split_once('.') {
            Some((c, r)) => (c, r),
            None => (s, "0"),
        };
        Ok(TimelineId {
            ctx: ctx.trim().parse().map_err(|_| bad())?,
            ring: ring.trim().parse().map_err(|_| bad())?,
        })
    }
}

// Serialized as the string "CTX.RING" so it can key JSON objects.
impl Serialize for TimelineId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TimelineId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A fenced command as the plan sees it when it arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FenceInfo {
    pub timeline: TimelineId,
    /// The driver's fence id (`virtio_gpu_ctrl_hdr.fence_id`).
    pub fence_id: u64,
    /// 0-based arrival index within its timeline since the device started.
    pub index: u64,
    /// Command type, e.g. `"SUBMIT_3D"`.
    pub command: &'static str,
    /// Simulated GPU time asked for by the command stream's `WORK` ops.
    pub work_ns: u64,
}

/// How a hung fence ends. A hung fence leaves its timeline's order: the
/// fences after it complete without waiting for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Hang {
    /// Never completes; only a device reset abandons it.
    Forever,
    /// Completes `ns` after it would have completed.
    For { ns: u64 },
    /// Completes when the control plane releases it.
    UntilReleased,
}

/// What happens to the interrupt that would announce a completion.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum IrqFault {
    /// Notify when the completion lands (if the guest asked to be told).
    #[default]
    Normal,
    /// Hold the notify up to `window_ns`; completions landing meanwhile
    /// share it.
    Coalesce { window_ns: u64 },
    /// Advance the used ring without notifying; a later notify covers it
    /// (or the engine's rescue notify, see [`Decide::irq_rescue`]).
    Drop,
    /// Notify normally, then `count` more times with nothing new
    /// (`count` 1 is a spurious interrupt, more is a storm).
    Spurious { count: u32 },
    /// Notify `delay_ns` after the used-ring update.
    Delay { delay_ns: u64 },
}

/// A fence's place in an in-timeline reorder block.
///
/// The decider groups `size` consecutive arrivals of a timeline, starting at
/// a fence whose rule asks for reordering, into one block and draws a
/// permutation of `0..size` for it. Within the block fences complete in
/// `rank` order, each no earlier than its own due time; a due fence waits at
/// most `hold_ns` for lower-ranked members that have not arrived. Fences
/// never move out of their block, so no fence is displaced by `size` or more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReorderSlot {
    /// Block number, unique within the timeline.
    pub block: u64,
    pub size: u32,
    /// Position in the block's completion order, `0..size`.
    pub rank: u32,
    /// Index of this fence within the block, `0..size` (arrival order).
    pub position: u32,
    pub hold_ns: u64,
}

/// Everything the plan decided for one fence. The engine computes
/// `due = arrival + latency_ns + work_ns + jitter_ns`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Name of the rule that matched, `None` for the plan's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Completion latency drawn from the distribution.
    pub latency_ns: u64,
    /// Extra delay from a cross-timeline reorder rule. The timeline's FIFO
    /// order still holds, so this only moves the fence relative to other
    /// timelines.
    #[serde(default)]
    pub jitter_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hang: Option<Hang>,
    /// `VIRTIO_GPU_RESP_ERR_*` to answer with instead of the real response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reorder: Option<ReorderSlot>,
    #[serde(default)]
    pub irq: IrqFault,
}

/// Turns arriving fences into decisions. One instance per device, called
/// from the vring thread in arrival order, so a seeded implementation is
/// deterministic for a given guest workload.
pub trait Decide: Send {
    fn decide(&mut self, fence: &FenceInfo) -> Decision;
    /// The seed the decisions are drawn from (printed at start).
    fn seed(&self) -> u64;
    /// How far a `DEADLINE` hint pulls a pending fence (and the fences before
    /// it in its timeline): `due = min(due, now + boost)`. `None`: hints are
    /// recorded, not acted on.
    fn deadline_boost(&self) -> Option<Duration>;
    /// When completions sit on the used ring un-notified (dropped interrupts)
    /// this long, notify anyway so a run cannot stall forever. `None`: never.
    fn irq_rescue(&self) -> Option<Duration>;
    /// Replaces the plan with the TOML in `source` (`origin` names it in
    /// errors and the trace). On error nothing changes.
    fn load_plan(&mut self, source: &str, origin: &str) -> Result<(), String>;
    /// Applies a JSON merge patch (RFC 7386) to the plan. On error nothing
    /// changes.
    fn patch_plan(&mut self, patch: &serde_json::Value) -> Result<(), String>;
    /// The current plan, as JSON.
    fn plan_json(&self) -> serde_json::Value;
    /// SHA-256 of the current plan (`Plan::sha256_hex`), lowercase hex: what
    /// the trace's `start` and `plan_loaded` events record.
    fn plan_sha256(&self) -> String;
}

/// Which hung fences to release.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "target", rename_all = "snake_case")]
pub enum ReleaseTarget {
    Fence { fence: u64 },
    Timeline { timeline: TimelineId },
    All,
}

/// What happened at a `DEADLINE` hint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadlineOutcome {
    /// The fence (and its timeline predecessors) were pulled earlier.
    Boosted,
    /// Already due sooner than the boost would make it.
    AlreadySooner,
    /// The plan has no boost; the hint is only recorded.
    NoBoost,
    /// The fence is hung; hints do not release hangs.
    Hung,
    /// The fence already completed (the hint raced its signal).
    Completed,
    /// The device never saw this fence.
    Unknown,
}

/// Why a notify was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyKind {
    Normal,
    Coalesced,
    Delayed,
    Spurious,
    /// Sent by the rescue watchdog after dropped interrupts.
    Rescue,
}

/// One line of the trace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TraceEvent {
    /// First line: what the run was started with.
    Start {
        seed: u64,
        plan: String,
        plan_sha256: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replay: Option<String>,
    },
    /// The plan was replaced or patched over the control plane.
    PlanLoaded {
        t_ns: u64,
        origin: String,
        plan_sha256: String,
    },
    /// A fenced command arrived and the plan decided its fate.
    Decide {
        t_ns: u64,
        timeline: TimelineId,
        fence: u64,
        index: u64,
        command: String,
        work_ns: u64,
        decision: Decision,
        /// `None` for a fence hung forever or until released.
        due_ns: Option<u64>,
    },
    /// A fence's descriptor went back to the guest. `t_ns` is the actual
    /// time, `due_ns` the planned one.
    Complete {
        t_ns: u64,
        timeline: TimelineId,
        fence: u64,
        due_ns: Option<u64>,
        /// The response code written (`OK_NODATA` or the injected error).
        response: u32,
        /// Values written by `WRITE` ops just before (guest address, u64).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        writes: Vec<(u64, u64)>,
        /// Returned early because the queue stopped or the device reset:
        /// before the engine would have let it go (see
        /// [`Accounting::flushed`]). Written only when true.
        #[serde(default, skip_serializing_if = "is_false")]
        flushed: bool,
    },
    /// A hung fence was released over the control plane.
    Release {
        t_ns: u64,
        timeline: TimelineId,
        fence: u64,
    },
    /// A `DEADLINE` hint arrived.
    Deadline {
        t_ns: u64,
        fence: u64,
        hint_ns: u64,
        outcome: DeadlineOutcome,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        old_due_ns: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        new_due_ns: Option<u64>,
    },
    /// The guest was interrupted; `covers` completions were new.
    Notify {
        t_ns: u64,
        kind: NotifyKind,
        covers: u32,
    },
    /// Completions landed without a notify.
    IrqDropped {
        t_ns: u64,
        fences: u32,
    },
    Paused {
        t_ns: u64,
    },
    Resumed {
        t_ns: u64,
    },
    /// A device reset abandoned these hung fences (their chains are not
    /// returned; the guest driver has reset the queue).
    Abandoned {
        t_ns: u64,
        fences: Vec<u64>,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Where trace events go. Implementations must be cheap to call from the
/// vring and engine threads.
pub trait Tracer: Send + Sync {
    fn record(&self, event: TraceEvent);
    fn flush(&self) -> std::io::Result<()>;
}

/// A tracer that forgets everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoTrace;

impl Tracer for NoTrace {
    fn record(&self, _event: TraceEvent) {}
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Fence counts for one timeline, or all of them: defined in
/// `fencelab-report`, which xtask reads the device's summary with.
pub use fencelab_report::Accounting;

/// A plan as the control plane shows it, read in one go.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanView {
    /// The plan as JSON, in the file's notation (what a merge patch applies
    /// to).
    pub plan: serde_json::Value,
    /// [`Decide::plan_sha256`] of the same plan.
    pub sha256: String,
}

/// The running device as the control plane sees it. Every method either
/// does all it says or returns an error and changes nothing.
pub trait DeviceControl: Send + Sync + 'static {
    fn load_plan(&self, source: &str, origin: &str) -> Result<PlanView, String>;
    fn patch_plan(&self, patch: &serde_json::Value) -> Result<PlanView, String>;
    fn plan(&self) -> PlanView;
    /// Releases hung fences; returns how many.
    fn release(&self, target: ReleaseTarget) -> Result<u64, String>;
    fn set_paused(&self, paused: bool);
    /// Per-timeline accounting and latency histograms, as JSON.
    fn stats(&self) -> serde_json::Value;
    /// Totals over all timelines.
    fn accounting(&self) -> Accounting;
    fn flush_trace(&self) -> Result<(), String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_ids_round_trip_as_strings() {
        let t: TimelineId = "3.1".parse().unwrap();
        assert_eq!(t, TimelineId { ctx: 3, ring: 1 });
        assert_eq!("7".parse::<TimelineId>().unwrap().to_string(), "7.0");
        assert!("x.1".parse::<TimelineId>().is_err());
        assert!("1.300".parse::<TimelineId>().is_err());
        let j = serde_json::to_string(&t).unwrap();
        assert_eq!(j, "\"3.1\"");
        assert_eq!(serde_json::from_str::<TimelineId>(&j).unwrap(), t);
    }

    #[test]
    fn trace_events_round_trip() {
        let ev = TraceEvent::Decide {
            t_ns: 5,
            timeline: TimelineId { ctx: 1, ring: 0 },
            fence: 9,
            index: 2,
            command: "SUBMIT_3D".into(),
            work_ns: 0,
            decision: Decision {
                rule: Some("slow".into()),
                latency_ns: 100,
                hang: Some(Hang::For { ns: 7 }),
                irq: IrqFault::Spurious { count: 3 },
                ..Decision::default()
            },
            due_ns: Some(105),
        };
        let line = serde_json::to_string(&ev).unwrap();
        assert!(line.starts_with("{\"event\":\"decide\""), "{line}");
        assert_eq!(serde_json::from_str::<TraceEvent>(&line).unwrap(), ev);
    }

    #[test]
    fn flushed_is_written_only_when_true_and_read_as_false_when_absent() {
        let line = r#"{"event":"complete","t_ns":1,"timeline":"1.0","fence":2,"due_ns":3,"response":4352}"#;
        let ev: TraceEvent = serde_json::from_str(line).unwrap();
        assert!(matches!(ev, TraceEvent::Complete { flushed: false, .. }));
        assert!(!serde_json::to_string(&ev).unwrap().contains("flushed"));
        let TraceEvent::Complete {
            t_ns,
            timeline,
            fence,
            due_ns,
            response,
            writes,
            ..
        } = ev
        else {
            unreachable!()
        };
        let early = TraceEvent::Complete {
            t_ns,
            timeline,
            fence,
            due_ns,
            response,
            writes,
            flushed: true,
        };
        let line = serde_json::to_string(&early).unwrap();
        assert!(line.ends_with(",\"flushed\":true}"), "{line}");
        assert_eq!(serde_json::from_str::<TraceEvent>(&line).unwrap(), early);
    }

    #[test]
    fn accounting_without_flushed_reads_as_zero() {
        let a: Accounting = serde_json::from_str(
            r#"{"submitted":2,"completed":2,"errored":0,"hung":0,"pending":0,"abandoned":0,"released":0,"irq_dropped":0,"irq_spurious":0,"deadline_hints":0,"deadline_boosts":0}"#,
        )
        .unwrap();
        assert_eq!((a.completed, a.flushed), (2, 0));
    }
}
