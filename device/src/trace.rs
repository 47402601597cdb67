//! The trace: every [`TraceEvent`] of a run as one JSON object per line,
//! and replaying a run's decisions from it.
//!
//! - [`JsonLinesTrace`] writes the trace (a [`Tracer`]);
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
                    if recorded
                        .insert((timeline, index), (fence, decision))
                        .is_some()
                    {
                        duplicates += 1;
                    }
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
}

#[cfg(test)]
mod tests {
    use super::*;
}
