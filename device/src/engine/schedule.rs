//! The scheduling core: which fence completes when, given the plan's
//! [`Decision`]s. Pure state driven by explicit times (ns since the device
//! started), so it is tested without threads or vrings; the engine thread
//! ([`super::Engine`]) feeds it the clock and a [`Sink`].
//!
//! - **Timelines.** Each timeline is a FIFO of *units*: a single fence or a
//!   reorder [`Block`]. Only the front unit may complete, so a fence never
//!   completes before an earlier one of its timeline (except within a
//!   block). Timelines are independent.
//! - **Due time.** `due = arrival + latency + work + jitter`; a fence
//!   completes at `max(due, when its turn comes)`.
//! - **Hangs** leave the FIFO: `For{ns}` completes `ns` after its due time on
//!   its own timer; `UntilReleased` when [`Scheduler::release`]d; `Forever`
//!   only goes away when [`Scheduler::reset`] abandons it.
//! - **Deadline hints** pull a queued fence and its queued predecessors in
//!   to `now + boost`.
//! - **Pause** holds every completion; resuming lets everything due go.
//! - Interrupts after completions follow [`super::irq`].
//!
//! Costs: O(log n) per fence (one heap entry per timeline wake-up and per
//! timed fence; stale entries are skipped when they pop). A deadline hint
//! walks its fence's predecessors; a block walks its members.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use tracing::warn;

use crate::fault::{
    DeadlineOutcome, Decision, Hang, IrqFault, ReleaseTarget, ReorderSlot, TimelineId, TraceEvent,
    Tracer,
};
use crate::stats::{Completion, FenceTag, Stats};

use super::Key;
use super::block::{Block, Next, Pick};
use super::irq::{Irq, Notifier};
use super::timers::Timers;

/// How many completed fence ids are remembered, to tell a deadline hint
/// that raced its fence's completion from one for a fence never seen.
const RECENT_FENCES: usize = 4096;

/// Where completed fences go: the vring, or a recorder in tests.
pub trait Sink: Notifier {
    type Item;
    /// Lands the item's guest-memory writes, then returns its descriptor to
    /// the used ring. Returns the writes as traced: (address, value).
    fn complete(&mut self, item: Self::Item) -> Result<Vec<(u64, u64)>, String>;
}

/// A fenced command whose response is written, handed to the engine.
#[derive(Debug)]
pub struct Submission<T> {
    pub timeline: TimelineId,
    pub fence_id: u64,
    /// Command type name, e.g. `"SUBMIT_3D"`.
    pub command: &'static str,
    pub arrival_ns: u64,
    pub work_ns: u64,
    pub decision: Decision,
    /// The response code written.
    pub response: u32,
    /// Whether that response is an error.
    pub errored: bool,
    pub item: T,
}

/// `arrival + latency + work + jitter`, saturating.
pub fn base_due(arrival_ns: u64, work_ns: u64, d: &Decision) -> u64 {
    arrival_ns
        .saturating_add(d.latency_ns)
        .saturating_add(work_ns)
        .saturating_add(d.jitter_ns)
}

/// When the fence is planned to complete: its due time, pushed back by a
/// `For` hang; `None` for a fence hung forever or until released.
pub fn planned_due(arrival_ns: u64, work_ns: u64, d: &Decision) -> Option<u64> {
    let due = base_due(arrival_ns, work_ns, d);
    match d.hang {
        None => Some(due),
        Some(Hang::For { ns }) => Some(due.saturating_add(ns)),
        Some(Hang::Forever | Hang::UntilReleased) => None,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// In its timeline's FIFO.
    Queued,
    /// Out of the FIFO, completes at `due_ns` on its own timer.
    HungFor,
    /// Hung forever or until released (counted `hung`).
    Hung(Hang),
    /// Released from `Hung(UntilReleased)`; completes as soon as allowed.
    Released,
}

impl State {
    fn describe(self) -> &'static str {
        match self {
            State::Queued => "pending",
            State::HungFor => "hung for a fixed time",
            State::Hung(Hang::Forever) => "hung forever",
            State::Hung(_) => "hung until released",
            State::Released => "already released",
        }
    }
}

struct Fence<T> {
    tag: FenceTag,
    fence_id: u64,
    arrival_ns: u64,
    /// When it may complete (for `Released`: when it was released).
    due_ns: u64,
    state: State,
    irq: IrqFault,
    response: u32,
    errored: bool,
    item: T,
}

enum Unit {
    One(Key),
    Block(Block),
}

#[derive(Default)]
struct Timeline {
    units: VecDeque<Unit>,
    /// The wake-up this timeline has in the heap (entries at other times
    /// are stale).
    wake_at: Option<u64>,
}

impl Timeline {
    /// Adds an arrival to the FIFO (`hung`: it only takes its block rank).
    fn admit(&mut self, key: Key, slot: Option<&ReorderSlot>, hung: bool) {
        if let Some(slot) = slot {
            if let Some(Unit::Block(b)) = self.units.back_mut() {
                if b.admit(slot, key, hung) {
                    return;
                }
            }
            self.close_last_block();
            match Block::open(slot) {
                Some(mut b) => {
                    b.admit(slot, key, hung);
                    self.units.push_back(Unit::Block(b));
                    return;
                }
                None => warn!(?slot, "unusable reorder slot: fence completes unordered"),
            }
        } else {
            self.close_last_block();
        }
        if !hung {
            self.units.push_back(Unit::One(key));
        }
    }

    fn close_last_block(&mut self) {
        if let Some(Unit::Block(b)) = self.units.back_mut() {
            b.close();
        }
    }

    /// The next fence allowed to complete and when; drops finished units.
    fn candidate<T>(
        &mut self,
        fences: &HashMap<Key, Fence<T>>,
    ) -> Option<(u64, Key, Option<Pick>)> {
        let due = |k: Key| fences.get(&k).map_or(0, |f| f.due_ns);
        loop {
            match self.units.front_mut()? {
                Unit::One(k) => {
                    if let Some(f) = fences.get(k) {
                        return Some((f.due_ns, *k, None));
                    }
                    self.units.pop_front();
                }
                Unit::Block(b) => match b.next(due) {
                    Next::Ready { at_ns, key, pick } => return Some((at_ns, key, Some(pick))),
                    Next::Finished => {
                        self.units.pop_front();
                    }
                    Next::Idle => return None,
                },
            }
        }
    }

    /// Removes the fence `candidate` returned from the FIFO.
    fn take(&mut self, pick: Option<Pick>) {
        match (self.units.front_mut(), pick) {
            (Some(Unit::Block(b)), Some(pick)) => b.completed(pick),
            (Some(Unit::One(_)), None) => {
                self.units.pop_front();
            }
            _ => warn!("fence engine: completed fence was not at its timeline's front"),
        }
    }

    /// Queued fences in arrival order up to (and including) `key`.
    fn queued_up_to(&self, key: Key) -> Vec<Key> {
        let mut out = Vec::new();
        for unit in &self.units {
            match unit {
                Unit::One(k) if *k > key => break,
                Unit::One(k) => out.push(*k),
                Unit::Block(b) => {
                    let before = out.len();
                    out.extend(b.pending().filter(|k| *k <= key));
                    if out.len() == before && b.pending().any(|k| k > key) {
                        break;
                    }
                }
            }
        }
        out
    }

    /// Empties the FIFO in the order the engine would have completed it,
    /// each fence paired with whether it was held at `now`: its turn (its
    /// own allowed time, and no earlier than the fence before it) had not
    /// come, or completions were `paused`. Members of a block still waiting
    /// for lower ranks that never arrived come last, held.
    fn drain<T>(
        &mut self,
        fences: &HashMap<Key, Fence<T>>,
        now: u64,
        paused: bool,
    ) -> Vec<(Key, bool)> {
        let mut out = Vec::new();
        let mut turn = 0;
        while let Some((at, key, pick)) = self.candidate(fences) {
            turn = turn.max(at);
            self.take(pick);
            out.push((key, paused || turn > now));
        }
        out.extend(self.all_queued().into_iter().map(|k| (k, true)));
        self.units.clear();
        self.wake_at = None;
        out
    }

    fn all_queued(&self) -> Vec<Key> {
        self.units
            .iter()
            .flat_map(|u| match u {
                Unit::One(k) => vec![*k],
                Unit::Block(b) => b.pending().collect(),
            })
            .collect()
    }
}

#[derive(Clone, Copy, Debug)]
enum Event {
    /// Re-evaluate this timeline's front.
    Timeline(TimelineId),
    /// A hung-for or released fence's time has come.
    Timed(Key),
}

/// Completed fence ids, most recent [`RECENT_FENCES`].
#[derive(Default)]
struct Recent {
    order: VecDeque<u64>,
    tags: HashMap<u64, FenceTag>,
}

impl Recent {
    fn insert(&mut self, fence_id: u64, tag: FenceTag) {
        if self.tags.insert(fence_id, tag).is_none() {
            self.order.push_back(fence_id);
            if self.order.len() > RECENT_FENCES {
                if let Some(old) = self.order.pop_front() {
                    self.tags.remove(&old);
                }
            }
        }
    }
}

/// The fence scheduler. See the module docs.
pub struct Scheduler<T> {
    fences: HashMap<Key, Fence<T>>,
    next_key: Key,
    timelines: BTreeMap<TimelineId, Timeline>,
    /// Latest outstanding fence with each driver fence id.
    by_fence_id: HashMap<u64, Key>,
    /// Fences hung forever or until released.
    hung: BTreeSet<Key>,
    recent: Recent,
    timers: Timers<Event>,
    irq: Irq,
    paused: bool,
    stats: Arc<Stats>,
    tracer: Arc<dyn Tracer>,
}

impl<T> Scheduler<T> {
    pub fn new(stats: Arc<Stats>, tracer: Arc<dyn Tracer>) -> Self {
        Scheduler {
            fences: HashMap::new(),
            next_key: 0,
            timelines: BTreeMap::new(),
            by_fence_id: HashMap::new(),
            hung: BTreeSet::new(),
            recent: Recent::default(),
            timers: Timers::default(),
            irq: Irq::new(stats.clone(), tracer.clone()),
            paused: false,
            stats,
            tracer,
        }
    }

    /// Fences not yet completed nor abandoned (queued, timed and hung).
    pub fn outstanding(&self) -> usize {
        self.fences.len()
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// See [`Irq::set_rescue`].
    pub fn set_rescue(&mut self, rescue_ns: Option<u64>) {
        self.irq.set_rescue(rescue_ns);
    }

    /// When [`Scheduler::advance`] next has something to do.
    pub fn next_event_at(&self) -> Option<u64> {
        let fences = if self.paused {
            None
        } else {
            self.timers.next_at()
        };
        match (fences, self.irq.next_at()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Takes a fence that arrived at `s.arrival_ns`. It completes from
    /// [`Scheduler::advance`] once allowed.
    pub fn submit(&mut self, now: u64, s: Submission<T>) {
        let key = self.next_key;
        self.next_key += 1;
        let tag = FenceTag {
            timeline: s.timeline,
            command: s.command,
        };
        let due = base_due(s.arrival_ns, s.work_ns, &s.decision);
        let (state, due_ns) = match s.decision.hang {
            None => (State::Queued, due),
            Some(Hang::For { ns }) => (State::HungFor, due.saturating_add(ns)),
            Some(h) => (State::Hung(h), due),
        };
        let counted_hung = matches!(state, State::Hung(_));
        self.stats.fence_submitted(tag, counted_hung);
        if counted_hung {
            self.hung.insert(key);
        }
        if state == State::HungFor {
            self.timers.push(due_ns, Event::Timed(key));
        }
        self.by_fence_id.insert(s.fence_id, key);
        self.timelines.entry(s.timeline).or_default().admit(
            key,
            s.decision.reorder.as_ref(),
            state != State::Queued,
        );
        self.fences.insert(
            key,
            Fence {
                tag,
                fence_id: s.fence_id,
                arrival_ns: s.arrival_ns,
                due_ns,
                state,
                irq: s.decision.irq,
                response: s.response,
                errored: s.errored,
                item: s.item,
            },
        );
        self.schedule_wake(s.timeline, now);
    }

    /// A `DEADLINE` hint for `fence_id`: with a boost, the fence and its
    /// queued predecessors become due no later than `now + boost_ns`.
    pub fn deadline(&mut self, now: u64, fence_id: u64, hint_ns: u64, boost_ns: Option<u64>) {
        let mut old_due_ns = None;
        let mut new_due_ns = None;
        let (tag, outcome) = match self.by_fence_id.get(&fence_id).copied() {
            None => match self.recent.tags.get(&fence_id) {
                Some(tag) => (Some(*tag), DeadlineOutcome::Completed),
                None => (None, DeadlineOutcome::Unknown),
            },
            Some(key) => {
                let (tag, state, due) = match self.fences.get(&key) {
                    Some(f) => (f.tag, f.state, f.due_ns),
                    None => return,
                };
                let outcome = match (state, boost_ns) {
                    (State::Hung(_) | State::HungFor, _) => DeadlineOutcome::Hung,
                    (State::Released, _) => DeadlineOutcome::AlreadySooner,
                    (State::Queued, None) => DeadlineOutcome::NoBoost,
                    (State::Queued, Some(boost)) => {
                        old_due_ns = Some(due);
                        let pulled = self.pull_in(tag.timeline, key, now.saturating_add(boost));
                        new_due_ns = self.fences.get(&key).map(|f| f.due_ns);
                        if pulled > 0 {
                            self.schedule_wake(tag.timeline, now);
                            DeadlineOutcome::Boosted
                        } else {
                            DeadlineOutcome::AlreadySooner
                        }
                    }
                };
                (Some(tag), outcome)
            }
        };
        self.stats
            .deadline_hint(tag, outcome == DeadlineOutcome::Boosted);
        self.tracer.record(TraceEvent::Deadline {
            t_ns: now,
            fence: fence_id,
            hint_ns,
            outcome,
            old_due_ns,
            new_due_ns,
        });
    }

    /// Sets `due = min(due, target)` for `key` and the queued fences before
    /// it in its timeline; returns how many moved.
    fn pull_in(&mut self, timeline: TimelineId, key: Key, target: u64) -> usize {
        let Some(tl) = self.timelines.get(&timeline) else {
            return 0;
        };
        let mut pulled = 0;
        for k in tl.queued_up_to(key) {
            if let Some(f) = self.fences.get_mut(&k) {
                if f.due_ns > target {
                    f.due_ns = target;
                    pulled += 1;
                }
            }
        }
        pulled
    }

    /// Releases fences hung until released; they complete as soon as the
    /// engine is not paused. A single fence that is not releasable is an
    /// error; a timeline or `All` with none releases 0.
    pub fn release(&mut self, now: u64, target: ReleaseTarget) -> Result<u64, String> {
        let releasable = |f: &Fence<T>| f.state == State::Hung(Hang::UntilReleased);
        let keys: Vec<Key> = self
            .hung
            .iter()
            .copied()
            .filter(|k| {
                self.fences.get(k).is_some_and(|f| {
                    releasable(f)
                        && match target {
                            ReleaseTarget::Fence { fence } => f.fence_id == fence,
                            ReleaseTarget::Timeline { timeline } => f.tag.timeline == timeline,
                            ReleaseTarget::All => true,
                        }
                })
            })
            .collect();
        if let (ReleaseTarget::Fence { fence }, true) = (target, keys.is_empty()) {
            let known = self
                .by_fence_id
                .get(&fence)
                .and_then(|k| self.fences.get(k));
            return Err(match known {
                Some(f) => format!(
                    "fence {fence} (timeline {}) is {}, not hung until released",
                    f.tag.timeline,
                    f.state.describe()
                ),
                None => format!("fence {fence} is not outstanding (never seen, or completed)"),
            });
        }
        for &key in &keys {
            self.hung.remove(&key);
            if let Some(f) = self.fences.get_mut(&key) {
                f.state = State::Released;
                f.due_ns = now;
                self.stats.fence_released(f.tag);
                self.tracer.record(TraceEvent::Release {
                    t_ns: now,
                    timeline: f.tag.timeline,
                    fence: f.fence_id,
                });
            }
            self.timers.push(now, Event::Timed(key));
        }
        Ok(keys.len() as u64)
    }

    /// Pauses or resumes completion. Resuming completes everything due.
    pub fn set_paused(&mut self, now: u64, paused: bool, sink: &mut impl Sink<Item = T>) {
        if self.paused == paused {
            return;
        }
        self.paused = paused;
        self.tracer.record(if paused {
            TraceEvent::Paused { t_ns: now }
        } else {
            TraceEvent::Resumed { t_ns: now }
        });
        self.advance(now, sink);
    }

    /// Completes everything allowed at `now` and sends the notifies due.
    pub fn advance(&mut self, now: u64, sink: &mut impl Sink<Item = T>) {
        if !self.paused {
            while let Some((at, event)) = self.timers.pop_due(now) {
                match event {
                    Event::Timeline(tl) => {
                        let Some(t) = self.timelines.get_mut(&tl) else {
                            continue;
                        };
                        if t.wake_at == Some(at) {
                            t.wake_at = None;
                            self.run_timeline(tl, at, now, sink);
                        }
                    }
                    Event::Timed(key) => {
                        let timed = self
                            .fences
                            .get(&key)
                            .is_some_and(|f| matches!(f.state, State::HungFor | State::Released));
                        if timed {
                            self.complete(key, now, sink, false);
                        }
                    }
                }
            }
        }
        self.irq.finish_batch(now, sink);
        self.irq.advance(now, sink);
    }

    /// On a wake-up of `tl` scheduled for `woke_at`: completes its front
    /// fence if that was allowed by then, and schedules the next look at
    /// when the (next) front fence is allowed. One fence per wake-up, so a
    /// late engine still completes across timelines in time order.
    fn run_timeline(
        &mut self,
        tl: TimelineId,
        woke_at: u64,
        now: u64,
        sink: &mut impl Sink<Item = T>,
    ) {
        let Some(t) = self.timelines.get_mut(&tl) else {
            return;
        };
        match t.candidate(&self.fences) {
            Some((at, key, pick)) if at <= woke_at => {
                t.take(pick);
                self.complete(key, now, sink, false);
            }
            Some((at, ..)) => {
                self.schedule_wake(tl, at);
                return;
            }
            None => return,
        }
        if let Some(t) = self.timelines.get_mut(&tl) {
            if let Some((at, ..)) = t.candidate(&self.fences) {
                self.schedule_wake(tl, at);
            }
        }
    }

    fn schedule_wake(&mut self, tl: TimelineId, at: u64) {
        let Some(t) = self.timelines.get_mut(&tl) else {
            return;
        };
        if t.wake_at.is_none_or(|w| at < w) {
            t.wake_at = Some(at);
            self.timers.push(at, Event::Timeline(tl));
        }
    }

    /// Returns fence `key` to the guest; `flushed`: early, by a queue stop
    /// or reset.
    fn complete(&mut self, key: Key, now: u64, sink: &mut impl Sink<Item = T>, flushed: bool) {
        let Some(f) = self.fences.remove(&key) else {
            return;
        };
        if self.by_fence_id.get(&f.fence_id) == Some(&key) {
            self.by_fence_id.remove(&f.fence_id);
        }
        self.recent.insert(f.fence_id, f.tag);
        let due_ns = (f.state != State::Released).then_some(f.due_ns);
        match sink.complete(f.item) {
            Ok(writes) => {
                self.stats.fence_completed(
                    f.tag,
                    Completion {
                        errored: f.errored,
                        flushed,
                        injected_ns: due_ns.map(|d| d.saturating_sub(f.arrival_ns)),
                        observed_ns: now.saturating_sub(f.arrival_ns),
                    },
                );
                self.irq.landed(now, f.irq, f.tag);
                // Last: whoever sees the trace event sees the counts too.
                self.tracer.record(TraceEvent::Complete {
                    t_ns: now,
                    timeline: f.tag.timeline,
                    fence: f.fence_id,
                    due_ns,
                    response: f.response,
                    writes,
                    flushed,
                });
            }
            Err(e) => {
                warn!(
                    fence_id = f.fence_id,
                    timeline = %f.tag.timeline,
                    "cannot return a completed fence, abandoning it: {e}"
                );
                self.stats.fence_abandoned(f.tag, false);
                self.tracer.record(TraceEvent::Abandoned {
                    t_ns: now,
                    fences: vec![f.fence_id],
                });
            }
        }
    }

    /// Completes every fence that is not hung forever or until released,
    /// now, ignoring due times, holds and pause: timeline by timeline in
    /// the order the engine would have completed them, then the timed ones.
    /// Hung fences stay. Those the engine would not have let go yet are
    /// counted and traced as flushed. Then one notify covers everything.
    pub fn flush(&mut self, now: u64, sink: &mut impl Sink<Item = T>) {
        let mut order = Vec::new();
        for t in self.timelines.values_mut() {
            order.extend(t.drain(&self.fences, now, self.paused));
        }
        let mut timed: Vec<(Key, bool)> = self
            .fences
            .iter()
            .filter(|(_, f)| matches!(f.state, State::HungFor | State::Released))
            .map(|(k, f)| (*k, self.paused || f.due_ns > now))
            .collect();
        timed.sort_unstable();
        order.extend(timed);
        for (key, flushed) in order {
            self.complete(key, now, sink, flushed);
        }
        self.timers.clear();
        self.irq.flush(now, sink);
    }

    /// A device reset: flushes, then abandons the fences hung forever or
    /// until released (their descriptors are never returned) and forgets
    /// every timeline. Returns how many were abandoned.
    pub fn reset(&mut self, now: u64, sink: &mut impl Sink<Item = T>) -> u64 {
        self.flush(now, sink);
        let mut ids = Vec::new();
        for key in std::mem::take(&mut self.hung) {
            if let Some(f) = self.fences.remove(&key) {
                self.stats.fence_abandoned(f.tag, true);
                ids.push(f.fence_id);
            }
        }
        if !ids.is_empty() {
            self.tracer.record(TraceEvent::Abandoned {
                t_ns: now,
                fences: ids.clone(),
            });
        }
        self.timelines.clear();
        self.by_fence_id.clear();
        self.recent = Recent::default();
        ids.len() as u64
    }
}

#[cfg(test)]
mod tests;
