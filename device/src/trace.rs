//! The trace: every [`TraceEvent`] of a run as one JSON object per line,
//! and replaying a run's decisions from it.
//!
//! - [`JsonLinesTrace`] writes the trace (a [`Tracer`]);
//! - [`MemoryTrace`] keeps the events in memory instead (tests, tools);
//! - [`read_trace`] reads it back, naming the line of any bad event;
//! - [`ReplayDecider`] answers each fence with the decision the trace
//!   recorded for it, so `--replay TRACE` repeats a run's faults exactly
//!   even when the plan had been changed over the control plane mid-run.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::decide::PlanDecider;
use crate::fault::{Decide, Decision, FenceInfo, TimelineId, TraceEvent, Tracer};
use crate::plan::Plan;

/// The first event of a trace: what the run was started with. `replay` is
/// the trace this run replays, if any.
pub fn start_event(seed: u64, plan: &Plan, replay: Option<&str>) -> TraceEvent {
    TraceEvent::Start {
        seed,
        plan: plan.origin().to_string(),
        plan_sha256: plan.sha256_hex().to_string(),
        replay: replay.map(str::to_string),
    }
}

/// Writes trace events to a file, one JSON object per line. Buffered;
/// [`Tracer::flush`] and dropping it flush the buffer.
#[derive(Debug)]
pub struct JsonLinesTrace {
    path: PathBuf,
    out: Mutex<BufWriter<File>>,
    write_errors: AtomicU64,
}

impl JsonLinesTrace {
    /// Creates (or truncates) the trace file.
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path)?;
        Ok(JsonLinesTrace {
            path,
            out: Mutex::new(BufWriter::with_capacity(64 * 1024, file)),
            write_errors: AtomicU64::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Events that could not be written (the first is logged).
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }

    fn out(&self) -> MutexGuard<'_, BufWriter<File>> {
        // A panic elsewhere while holding the lock leaves a usable writer.
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Tracer for JsonLinesTrace {
    fn record(&self, event: TraceEvent) {
        // Serialize outside the lock: the vring and engine threads share it.
        let mut line = match serde_json::to_vec(&event) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!("trace event does not serialize: {e}: {event:?}");
                return;
            }
        };
        line.push(b'\n');
        if let Err(e) = self.out().write_all(&line)
            && self.write_errors.fetch_add(1, Ordering::Relaxed) == 0
        {
            tracing::error!(
                "cannot write the trace {}: {e} (further errors are counted, not logged)",
                self.path.display()
            );
        }
    }

    fn flush(&self) -> io::Result<()> {
        self.out().flush()
    }
}

impl Drop for JsonLinesTrace {
    fn drop(&mut self) {
        if let Err(e) = self.out().flush() {
            tracing::error!("cannot flush the trace {}: {e}", self.path.display());
        }
    }
}

/// Keeps every event in memory, in the order recorded: a [`Tracer`] for
/// tests and tools that look at a run's events without a file.
#[derive(Debug, Default)]
pub struct MemoryTrace(Mutex<Vec<TraceEvent>>);

impl MemoryTrace {
    /// The events recorded so far.
    pub fn events(&self) -> Vec<TraceEvent> {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<TraceEvent>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Tracer for MemoryTrace {
    fn record(&self, event: TraceEvent) {
        self.lock().push(event);
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A trace that cannot be read or replayed.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{path}: cannot read the trace: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}:{line}: not a trace event: {source}")]
    Parse {
        path: String,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: no start event, so not a fencelab trace")]
    NoStart { path: String },
}

/// Reads a trace written by [`JsonLinesTrace`]. A last line without its
/// newline that does not parse is the tail of a run that was killed
/// mid-write: it is skipped with a warning. Any other bad line is an error
/// naming the line.
pub fn read_trace(path: impl AsRef<Path>) -> Result<Vec<TraceEvent>, TraceError> {
    let path = path.as_ref();
    let name = path.display().to_string();
    let file = File::open(path).map_err(|source| TraceError::Read {
        path: name.clone(),
        source,
    })?;
    parse_trace(BufReader::new(file), &name)
}

/// [`read_trace`] from any reader; `name` is used in errors.
pub fn parse_trace(mut input: impl BufRead, name: &str) -> Result<Vec<TraceEvent>, TraceError> {
    let mut events = Vec::new();
    let mut buf = Vec::new();
    for line in 1.. {
        buf.clear();
        let n = input
            .read_until(b'\n', &mut buf)
            .map_err(|source| TraceError::Read {
                path: name.to_string(),
                source,
            })?;
        if n == 0 {
            break;
        }
        let complete = buf.ends_with(b"\n");
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice(&buf) {
            Ok(event) => events.push(event),
            Err(source) if complete => {
                return Err(TraceError::Parse {
                    path: name.to_string(),
                    line,
                    source,
                });
            }
            Err(e) => {
                tracing::warn!("{name}:{line}: skipping a cut-off last line ({e})");
                break;
            }
        }
    }
    Ok(events)
}

/// Answers fences with the decisions a trace recorded, keyed by timeline
/// and arrival index. A fence the trace has no decision for (or recorded
/// with another fence id: the guest did something else) is decided by the
/// fallback plan instead; that is counted and logged once per timeline.
///
/// Deadline boosts and the IRQ rescue are not per-fence decisions: they
/// come from the fallback plan, which should be the one the trace was
/// recorded with (a different one is warned about).
#[derive(Debug)]
pub struct ReplayDecider {
    recorded: HashMap<(TimelineId, u64), (u64, Decision)>,
    seed: u64,
    fallback: PlanDecider,
    replayed: u64,
    fell_back: u64,
    warned: HashSet<TimelineId>,
}

impl ReplayDecider {
    /// A replay of `events` (from the trace `name`).
    pub fn new(
        events: Vec<TraceEvent>,
        name: &str,
        fallback: PlanDecider,
    ) -> Result<Self, TraceError> {
        let mut start = None;
        let mut recorded = HashMap::new();
        let mut duplicates = 0u64;
        for event in events {
            match event {
                TraceEvent::Start {
                    seed, plan_sha256, ..
                } if start.is_none() => start = Some((seed, plan_sha256)),
                TraceEvent::Decide {
                    timeline,
                    fence,
                    index,
                    decision,
                    ..
                } => {
                    let earlier = recorded.insert((timeline, index), (fence, decision));
                    duplicates += u64::from(earlier.is_some());
                }
                _ => {}
            }
        }
        let Some((seed, plan_sha256)) = start else {
            return Err(TraceError::NoStart {
                path: name.to_string(),
            });
        };
        if duplicates > 0 {
            tracing::warn!(
                "{name}: {duplicates} fences decided twice; the last decision is replayed"
            );
        }
        if plan_sha256 != fallback.plan().sha256_hex() {
            tracing::warn!(
                "{name} was recorded with plan sha256 {plan_sha256}, the fallback plan {} is {}: \
                 deadline boosts, IRQ rescue and unrecorded fences follow the fallback",
                fallback.plan().origin(),
                fallback.plan().sha256_hex()
            );
        }
        tracing::info!(
            "{name}: replaying {} decisions, seed {seed}",
            recorded.len()
        );
        Ok(ReplayDecider {
            recorded,
            seed,
            fallback,
            replayed: 0,
            fell_back: 0,
            warned: HashSet::new(),
        })
    }

    /// Reads the trace at `path` and replays it.
    pub fn load(path: impl AsRef<Path>, fallback: PlanDecider) -> Result<Self, TraceError> {
        let path = path.as_ref();
        Self::new(read_trace(path)?, &path.display().to_string(), fallback)
    }

    /// Fences answered from the trace.
    pub fn replayed(&self) -> u64 {
        self.replayed
    }

    /// Fences the trace had no decision for, decided by the fallback plan.
    pub fn fell_back(&self) -> u64 {
        self.fell_back
    }
}

impl Decide for ReplayDecider {
    fn decide(&mut self, fence: &FenceInfo) -> Decision {
        let key = (fence.timeline, fence.index);
        let why = match self.recorded.remove(&key) {
            Some((id, decision)) if id == fence.fence_id => {
                self.replayed += 1;
                return decision;
            }
            Some((id, _)) => format!("the trace has fence {id} at that index"),
            None => "the trace has no decision for it".to_string(),
        };
        self.fell_back += 1;
        if self.warned.insert(fence.timeline) {
            tracing::warn!(
                "replay: timeline {} fence {} (index {}): {why}; the plan decides it \
                 (further fallbacks on this timeline are counted, not logged)",
                fence.timeline,
                fence.fence_id,
                fence.index
            );
        }
        self.fallback.decide(fence)
    }

    fn seed(&self) -> u64 {
        self.seed
    }

    fn deadline_boost(&self) -> Option<Duration> {
        self.fallback.deadline_boost()
    }

    fn irq_rescue(&self) -> Option<Duration> {
        self.fallback.irq_rescue()
    }

    fn load_plan(&mut self, source: &str, origin: &str) -> Result<(), String> {
        self.fallback.load_plan(source, origin)
    }

    fn patch_plan(&mut self, patch: &serde_json::Value) -> Result<(), String> {
        self.fallback.patch_plan(patch)
    }

    fn plan_json(&self) -> serde_json::Value {
        self.fallback.plan_json()
    }

    fn plan_sha256(&self) -> String {
        self.fallback.plan_sha256()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::fault::{DeadlineOutcome, NotifyKind};
    use crate::testing::fence_on;

    /// A fresh scratch file in the system's temporary folder.
    fn scratch(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("trace-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    const PLAN: &str = r#"
[default]
latency = { dist = "exponential", mean = "300us", max = "5ms" }

[[rule]]
name = "jitter"
match = { probability = 0.3 }
cross_reorder = { jitter = "1ms" }

[[rule]]
name = "shuffle"
match = { every = 9 }
reorder = { window = 4, hold = "1ms" }

[[rule]]
name = "faults"
match = { probability = 0.05 }
irq = { storm = 3 }
hang = { for = "2ms" }
error = "ERR_INVALID_PARAMETER"
"#;

    fn plan() -> Plan {
        Plan::parse(PLAN, "replay.toml").unwrap()
    }

    /// Two interleaved timelines, as a guest with two contexts would send.
    fn workload() -> Vec<FenceInfo> {
        (0..1500u64)
            .map(|i| {
                let index = if i % 3 == 0 { i / 3 } else { i - i / 3 - 1 };
                fence_on(1 + u32::from(i % 3 == 0), i + 1, index)
            })
            .collect()
    }

    fn decide_event(f: &FenceInfo, decision: Decision, t_ns: u64) -> TraceEvent {
        TraceEvent::Decide {
            t_ns,
            timeline: f.timeline,
            fence: f.fence_id,
            index: f.index,
            command: f.command.to_string(),
            work_ns: f.work_ns,
            due_ns: Some(t_ns + decision.latency_ns),
            decision,
        }
    }

    #[test]
    fn the_workload_indexes_each_timeline_from_zero() {
        let w = workload();
        for ctx in [1, 2] {
            let idx: Vec<u64> = w
                .iter()
                .filter(|f| f.timeline.ctx == ctx)
                .map(|f| f.index)
                .collect();
            assert_eq!(idx, (0..idx.len() as u64).collect::<Vec<_>>());
        }
    }

    #[test]
    fn recorded_decisions_replay_identically() {
        let path = scratch("replay.jsonl");
        let seed = 1234;
        let fences = workload();
        let mut live = PlanDecider::new(plan(), seed);
        let recorded: Vec<Decision> = {
            let trace = JsonLinesTrace::create(&path).unwrap();
            trace.record(start_event(seed, live.plan(), None));
            let decisions: Vec<Decision> = fences
                .iter()
                .enumerate()
                .map(|(t, f)| {
                    let d = live.decide(f);
                    trace.record(decide_event(f, d.clone(), t as u64 * 1000));
                    trace.record(TraceEvent::Notify {
                        t_ns: t as u64 * 1000 + 1,
                        kind: NotifyKind::Normal,
                        covers: 1,
                    });
                    d
                })
                .collect();
            decisions
            // Dropping the trace flushes it.
        };
        assert!(recorded.iter().any(|d| d.reorder.is_some()));
        assert!(recorded.iter().any(|d| d.hang.is_some()));
        assert!(recorded.iter().any(|d| d.error.is_some()));

        let events = read_trace(&path).unwrap();
        assert_eq!(events.len(), 1 + 2 * fences.len());
        // The fallback plan's own draws would differ: another seed.
        let fallback = PlanDecider::new(plan(), seed + 1);
        let mut replay = ReplayDecider::new(events, "replay.jsonl", fallback).unwrap();
        assert_eq!(replay.seed(), seed);
        let replayed: Vec<Decision> = fences.iter().map(|f| replay.decide(f)).collect();
        assert_eq!(replayed, recorded);
        assert_eq!(replay.replayed(), fences.len() as u64);
        assert_eq!(replay.fell_back(), 0);
        assert_eq!(replay.irq_rescue(), plan().irq_rescue());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn fences_the_trace_does_not_know_fall_back_to_the_plan() {
        let fences = workload();
        let seed = 5;
        let mut live = PlanDecider::new(plan(), seed);
        let mut events = vec![start_event(seed, live.plan(), None)];
        for f in &fences[..100] {
            events.push(decide_event(f, live.decide(f), 0));
        }
        // The recorded decisions, overwritten with a marker to tell them apart.
        for e in &mut events {
            if let TraceEvent::Decide { decision, .. } = e {
                decision.latency_ns = 777;
            }
        }
        let fallback = PlanDecider::new(Plan::fixed_latency(Duration::from_micros(5)), 0);
        let mut replay = ReplayDecider::new(events, "t", fallback).unwrap();
        for f in &fences[..100] {
            assert_eq!(replay.decide(f).latency_ns, 777);
        }
        // Past the end of the trace.
        assert_eq!(replay.decide(&fences[100]).latency_ns, 5_000);
        // A fence id the trace recorded differently at that index.
        let mut other = fences[0].clone();
        other.fence_id = 999_999;
        let mut fresh = ReplayDecider::new(
            vec![
                start_event(seed, &plan(), None),
                decide_event(&fences[0], Decision::default(), 0),
            ],
            "t",
            PlanDecider::new(Plan::fixed_latency(Duration::from_micros(9)), 0),
        )
        .unwrap();
        assert_eq!(fresh.decide(&other).latency_ns, 9_000);
        assert_eq!(replay.replayed(), 100);
        assert_eq!(replay.fell_back(), 1);
        assert_eq!(fresh.fell_back(), 1);
    }

    #[test]
    fn a_trace_needs_its_start_event() {
        let fallback = PlanDecider::new(plan(), 0);
        let err = ReplayDecider::new(Vec::new(), "empty.jsonl", fallback).unwrap_err();
        assert_eq!(
            err.to_string(),
            "empty.jsonl: no start event, so not a fencelab trace"
        );
    }

    #[test]
    fn start_event_names_the_plan() {
        let p = plan();
        assert_eq!(
            start_event(3, &p, Some("old.jsonl")),
            TraceEvent::Start {
                seed: 3,
                plan: "replay.toml".into(),
                plan_sha256: p.sha256_hex().into(),
                replay: Some("old.jsonl".into()),
            }
        );
    }

    #[test]
    fn every_event_kind_round_trips_through_a_file() {
        let t = TimelineId { ctx: 2, ring: 1 };
        let events = vec![
            start_event(1, &plan(), None),
            TraceEvent::PlanLoaded {
                t_ns: 1,
                origin: "x".into(),
                plan_sha256: "ab".into(),
            },
            TraceEvent::Complete {
                t_ns: 2,
                timeline: t,
                fence: 3,
                due_ns: None,
                response: 0x1100,
                writes: vec![(0x1000, 7)],
                flushed: true,
            },
            TraceEvent::Release {
                t_ns: 3,
                timeline: t,
                fence: 3,
            },
            TraceEvent::Deadline {
                t_ns: 4,
                fence: 3,
                hint_ns: 9,
                outcome: DeadlineOutcome::Boosted,
                old_due_ns: Some(10),
                new_due_ns: Some(5),
            },
            TraceEvent::IrqDropped { t_ns: 5, fences: 2 },
            TraceEvent::Paused { t_ns: 6 },
            TraceEvent::Resumed { t_ns: 7 },
            TraceEvent::Abandoned {
                t_ns: 8,
                fences: vec![1, 2],
            },
        ];
        let path = scratch("kinds.jsonl");
        let trace = JsonLinesTrace::create(&path).unwrap();
        for e in &events {
            trace.record(e.clone());
        }
        trace.flush().unwrap();
        assert_eq!(read_trace(&path).unwrap(), events);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), events.len());
        assert!(text.lines().all(|l| l.starts_with("{\"event\":")));
        drop(trace);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn threads_share_a_trace_without_tearing_lines() {
        let path = scratch("threads.jsonl");
        let trace = Arc::new(JsonLinesTrace::create(&path).unwrap());
        let threads: Vec<_> = (0..4u64)
            .map(|n| {
                let trace = Arc::clone(&trace);
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        trace.record(TraceEvent::Notify {
                            t_ns: n * 1_000_000 + i,
                            kind: NotifyKind::Spurious,
                            covers: n as u32,
                        });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(trace);
        let events = read_trace(&path).unwrap();
        assert_eq!(events.len(), 20_000);
        for n in 0..4u64 {
            let mine: Vec<u64> = events
                .iter()
                .filter_map(|e| match e {
                    TraceEvent::Notify { t_ns, covers, .. } if u64::from(*covers) == n => {
                        Some(*t_ns)
                    }
                    _ => None,
                })
                .collect();
            // Each thread's events are all there, in its order.
            assert_eq!(
                mine,
                (0..5000).map(|i| n * 1_000_000 + i).collect::<Vec<_>>()
            );
        }
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn bad_lines_are_named_and_a_cut_off_tail_is_skipped() {
        let good = serde_json::to_string(&TraceEvent::Paused { t_ns: 1 }).unwrap();
        let text = format!("{good}\n\n{good}\n{{\"event\":\"bogus\"}}\n{good}\n");
        let err = parse_trace(text.as_bytes(), "t.jsonl").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("t.jsonl:4: not a trace event: unknown variant `bogus`"),
            "{msg}"
        );

        let cut = format!("{good}\n{good}\n{}", &good[..good.len() / 2]);
        assert_eq!(parse_trace(cut.as_bytes(), "t.jsonl").unwrap().len(), 2);

        let err = read_trace(scratch("missing.jsonl")).unwrap_err();
        assert!(matches!(err, TraceError::Read { .. }), "{err}");
    }
}
