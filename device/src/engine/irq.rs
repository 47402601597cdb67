//! The interrupt policy: when, after completions land on the used ring, the
//! guest is notified, per each completion's [`IrqFault`].
//!
//! Completions are handed over in batches (everything the engine completes
//! in one wake-up). `unnotified` counts completions no notify has covered
//! yet; any notify covers all of them.
//!
//! - `Normal`: notify at the end of the batch — unless a coalescing window
//!   is open, which the completion then joins.
//! - `Coalesce{window}`: opens a window (if none is open) ending `window`
//!   later; whatever lands meanwhile shares its single notify.
//! - `Drop`: no notify. A later notify covers it; if none comes within
//!   [`Decide::irq_rescue`](crate::fault::Decide::irq_rescue) of the oldest
//!   uncovered drop, a rescue notify does.
//! - `Spurious{count}`: notify normally, then `count` forced notifies
//!   [`SPURIOUS_SPACING_NS`] apart, past `EVENT_IDX` suppression.
//! - `Delay{d}`: notify `d` after landing, if no other notify covered it.
//!
//! Every notify except the spurious ones asks the queue first
//! (`needs_notification`, i.e. `EVENT_IDX`); a suppressed notify still
//! counts as covering (the guest asked not to be told).

use std::sync::Arc;

use crate::fault::{IrqFault, NotifyKind, TraceEvent, Tracer};
use crate::stats::{FenceTag, Stats};

use super::timers::Timers;

/// Gap between the notifies of a spurious storm, so that they reach the
/// guest as separate interrupts rather than one eventfd count.
pub const SPURIOUS_SPACING_NS: u64 = 50_000;

/// Where notifies go.
pub trait Notifier {
    /// Notifies the guest if the queue says it wants to hear (EVENT_IDX);
    /// returns whether it was signalled.
    fn notify(&mut self) -> bool;
    /// Notifies the guest unconditionally; returns whether it was signalled.
    fn notify_forced(&mut self) -> bool;
}

#[derive(Debug)]
enum Event {
    CoalesceEnd,
    Delayed,
    Spurious { remaining: u32, tag: FenceTag },
    Rescue,
}

pub struct Irq {
    timers: Timers<Event>,
    unnotified: u32,
    coalesce_until: Option<u64>,
    /// Landing time of the oldest drop no notify has covered yet.
    oldest_dropped: Option<u64>,
    rescue_at: Option<u64>,
    rescue_ns: Option<u64>,
    batch: Batch,
    stats: Arc<Stats>,
    tracer: Arc<dyn Tracer>,
}

#[derive(Default)]
struct Batch {
    wants_notify: bool,
    dropped: u32,
    spurious: Vec<(u32, FenceTag)>,
}

impl Irq {
    pub fn new(stats: Arc<Stats>, tracer: Arc<dyn Tracer>) -> Self {
        Irq {
            timers: Timers::default(),
            unnotified: 0,
            coalesce_until: None,
            oldest_dropped: None,
            rescue_at: None,
            rescue_ns: None,
            batch: Batch::default(),
            stats,
            tracer,
        }
    }

    /// How long dropped interrupts may leave completions un-notified.
    pub fn set_rescue(&mut self, rescue_ns: Option<u64>) {
        self.rescue_ns = rescue_ns;
    }

    /// A completion with `fault` landed on the used ring at `now`.
    pub fn landed(&mut self, now: u64, fault: IrqFault, tag: FenceTag) {
        self.unnotified = self.unnotified.saturating_add(1);
        match fault {
            IrqFault::Normal => self.batch.wants_notify = true,
            IrqFault::Coalesce { window_ns } => {
                if self.coalesce_until.is_none() {
                    let end = now.saturating_add(window_ns);
                    self.coalesce_until = Some(end);
                    self.timers.push(end, Event::CoalesceEnd);
                }
            }
            IrqFault::Drop => {
                self.batch.dropped += 1;
                self.oldest_dropped.get_or_insert(now);
                self.stats.irq_dropped(tag);
            }
            IrqFault::Spurious { count } => {
                self.batch.wants_notify = true;
                if count > 0 {
                    self.batch.spurious.push((count, tag));
                }
            }
            IrqFault::Delay { delay_ns } => {
                self.timers
                    .push(now.saturating_add(delay_ns), Event::Delayed);
            }
        }
    }

    /// Ends a batch of completions: the immediate notify, the drop record,
    /// the spurious storms and the rescue timer.
    pub fn finish_batch(&mut self, now: u64, out: &mut dyn Notifier) {
        let batch = std::mem::take(&mut self.batch);
        if batch.wants_notify && self.coalesce_until.is_none() {
            self.send(now, NotifyKind::Normal, out);
        }
        if batch.dropped > 0 {
            self.tracer.record(TraceEvent::IrqDropped {
                t_ns: now,
                fences: batch.dropped,
            });
        }
        for (remaining, tag) in batch.spurious {
            self.timers.push(
                now.saturating_add(SPURIOUS_SPACING_NS),
                Event::Spurious { remaining, tag },
            );
        }
        self.arm_rescue();
    }

    /// Sends the timed notifies that are due.
    pub fn advance(&mut self, now: u64, out: &mut dyn Notifier) {
        while let Some((at, event)) = self.timers.pop_due(now) {
            match event {
                Event::CoalesceEnd => {
                    if self.coalesce_until == Some(at) {
                        self.coalesce_until = None;
                        if self.unnotified > 0 {
                            self.send(now, NotifyKind::Coalesced, out);
                        }
                    }
                }
                Event::Delayed => {
                    if self.unnotified > 0 {
                        self.send(now, NotifyKind::Delayed, out);
                    }
                }
                Event::Spurious { remaining, tag } => {
                    self.send(now, NotifyKind::Spurious, out);
                    self.stats.irq_spurious(tag);
                    if remaining > 1 {
                        self.timers.push(
                            now.saturating_add(SPURIOUS_SPACING_NS),
                            Event::Spurious {
                                remaining: remaining - 1,
                                tag,
                            },
                        );
                    }
                }
                Event::Rescue => {
                    if self.rescue_at == Some(at) {
                        self.rescue_at = None;
                        self.rescue_if_overdue(now, out);
                    }
                }
            }
        }
    }

    /// Notifies now for anything un-notified and forgets every timed
    /// notify: the queue is stopping or resetting.
    pub fn flush(&mut self, now: u64, out: &mut dyn Notifier) {
        if self.unnotified > 0 {
            self.send(now, NotifyKind::Normal, out);
        }
        self.timers.clear();
        self.coalesce_until = None;
        self.oldest_dropped = None;
        self.rescue_at = None;
        self.batch = Batch::default();
    }

    pub fn next_at(&self) -> Option<u64> {
        self.timers.next_at()
    }

    fn send(&mut self, now: u64, kind: NotifyKind, out: &mut dyn Notifier) {
        let covers = std::mem::take(&mut self.unnotified);
        self.oldest_dropped = None;
        let signalled = match kind {
            NotifyKind::Spurious => out.notify_forced(),
            _ => out.notify(),
        };
        if signalled {
            self.tracer.record(TraceEvent::Notify {
                t_ns: now,
                kind,
                covers,
            });
        }
    }

    fn arm_rescue(&mut self) {
        if let (Some(oldest), Some(after), None) =
            (self.oldest_dropped, self.rescue_ns, self.rescue_at)
        {
            let at = oldest.saturating_add(after);
            self.rescue_at = Some(at);
            self.timers.push(at, Event::Rescue);
        }
    }

    fn rescue_if_overdue(&mut self, now: u64, out: &mut dyn Notifier) {
        let (Some(oldest), Some(after)) = (self.oldest_dropped, self.rescue_ns) else {
            return;
        };
        if oldest.saturating_add(after) <= now {
            self.send(now, NotifyKind::Rescue, out);
        } else {
            self.arm_rescue();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::TimelineId;
    use crate::trace::MemoryTrace;

    #[derive(Default)]
    struct Calls {
        normal: u32,
        forced: u32,
        /// Answer of `notify()`: false models EVENT_IDX suppression.
        suppress: bool,
    }

    impl Notifier for Calls {
        fn notify(&mut self) -> bool {
            if self.suppress {
                return false;
            }
            self.normal += 1;
            true
        }
        fn notify_forced(&mut self) -> bool {
            self.forced += 1;
            true
        }
    }

    const TAG: FenceTag = FenceTag {
        timeline: TimelineId { ctx: 1, ring: 0 },
        command: "SUBMIT_3D",
    };

    fn irq() -> (Irq, Arc<MemoryTrace>, Arc<Stats>) {
        let log = Arc::new(MemoryTrace::default());
        let stats = Arc::new(Stats::new());
        (Irq::new(stats.clone(), log.clone()), log, stats)
    }

    fn notifies(log: &MemoryTrace) -> Vec<(u64, NotifyKind, u32)> {
        log.events()
            .into_iter()
            .filter_map(|e| match e {
                TraceEvent::Notify { t_ns, kind, covers } => Some((t_ns, kind, covers)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn normal_completions_share_the_batch_notify() {
        let (mut irq, log, _) = irq();
        let mut out = Calls::default();
        for _ in 0..3 {
            irq.landed(5, IrqFault::Normal, TAG);
        }
        irq.finish_batch(5, &mut out);
        assert_eq!(out.normal, 1);
        assert_eq!(notifies(&log), vec![(5, NotifyKind::Normal, 3)]);
    }

    #[test]
    fn a_coalescing_window_merges_everything_landing_in_it() {
        let (mut irq, log, _) = irq();
        let mut out = Calls::default();
        irq.landed(10, IrqFault::Coalesce { window_ns: 100 }, TAG);
        irq.finish_batch(10, &mut out);
        for t in [20, 50, 109] {
            irq.advance(t, &mut out);
            irq.landed(t, IrqFault::Normal, TAG);
            irq.finish_batch(t, &mut out);
        }
        assert_eq!(out.normal, 0);
        irq.advance(110, &mut out);
        assert_eq!(out.normal, 1);
        assert_eq!(notifies(&log), vec![(110, NotifyKind::Coalesced, 4)]);
        assert_eq!(irq.next_at(), None);
    }

    #[test]
    fn dropped_interrupts_wait_for_a_later_notify_or_the_rescue() {
        let (mut irq, log, stats) = irq();
        let mut out = Calls::default();
        irq.landed(0, IrqFault::Drop, TAG);
        irq.finish_batch(0, &mut out);
        assert_eq!(irq.next_at(), None, "no rescue without irq_rescue");
        // A later normal completion covers the dropped one.
        irq.landed(7, IrqFault::Normal, TAG);
        irq.finish_batch(7, &mut out);
        assert_eq!(notifies(&log), vec![(7, NotifyKind::Normal, 2)]);

        irq.set_rescue(Some(1_000));
        irq.landed(10, IrqFault::Drop, TAG);
        irq.finish_batch(10, &mut out);
        irq.landed(500, IrqFault::Drop, TAG);
        irq.finish_batch(500, &mut out);
        irq.advance(1_009, &mut out);
        assert_eq!(out.normal, 1);
        irq.advance(1_010, &mut out);
        assert_eq!(out.normal, 2);
        assert_eq!(notifies(&log)[1], (1_010, NotifyKind::Rescue, 2));
        assert_eq!(stats.accounting().irq_dropped, 3);
        let dropped = log
            .events()
            .iter()
            .filter(|e| matches!(e, TraceEvent::IrqDropped { fences: 1, .. }))
            .count();
        assert_eq!(dropped, 3);
    }

    #[test]
    fn a_covered_drop_needs_no_rescue() {
        let (mut irq, _, _) = irq();
        let mut out = Calls::default();
        irq.set_rescue(Some(100));
        irq.landed(0, IrqFault::Drop, TAG);
        irq.finish_batch(0, &mut out);
        irq.landed(50, IrqFault::Normal, TAG);
        irq.finish_batch(50, &mut out);
        irq.advance(1_000, &mut out);
        assert_eq!(out.normal, 1, "only the normal notify");
    }

    #[test]
    fn spurious_notifies_follow_the_real_one_past_suppression() {
        let (mut irq, log, stats) = irq();
        let mut out = Calls {
            suppress: true,
            ..Calls::default()
        };
        irq.landed(0, IrqFault::Spurious { count: 3 }, TAG);
        irq.finish_batch(0, &mut out);
        let mut t = 0;
        while let Some(at) = irq.next_at() {
            t = at;
            irq.advance(t, &mut out);
        }
        assert_eq!((out.normal, out.forced), (0, 3));
        assert_eq!(t, 3 * SPURIOUS_SPACING_NS);
        let kinds: Vec<_> = notifies(&log).iter().map(|n| (n.1, n.2)).collect();
        assert_eq!(
            kinds,
            vec![(NotifyKind::Spurious, 0); 3],
            "the real notify, suppressed, still covered the completion"
        );
        assert_eq!(stats.accounting().irq_spurious, 3);
    }

    #[test]
    fn delayed_notifies_go_late_unless_covered() {
        let (mut irq, log, _) = irq();
        let mut out = Calls::default();
        irq.landed(0, IrqFault::Delay { delay_ns: 300 }, TAG);
        irq.finish_batch(0, &mut out);
        irq.advance(299, &mut out);
        assert_eq!(out.normal, 0);
        irq.advance(300, &mut out);
        assert_eq!(notifies(&log), vec![(300, NotifyKind::Delayed, 1)]);

        irq.landed(400, IrqFault::Delay { delay_ns: 300 }, TAG);
        irq.landed(400, IrqFault::Normal, TAG);
        irq.finish_batch(400, &mut out);
        irq.advance(700, &mut out);
        assert_eq!(out.normal, 2, "the delayed one was covered at 400");
    }

    #[test]
    fn flush_notifies_and_forgets_timers() {
        let (mut irq, _, _) = irq();
        let mut out = Calls::default();
        irq.set_rescue(Some(10));
        irq.landed(0, IrqFault::Coalesce { window_ns: 100 }, TAG);
        irq.landed(0, IrqFault::Drop, TAG);
        irq.finish_batch(0, &mut out);
        irq.flush(1, &mut out);
        assert_eq!(out.normal, 1);
        assert_eq!(irq.next_at(), None);
    }
}
