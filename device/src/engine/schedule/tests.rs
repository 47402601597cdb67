//! The scheduling core against a fake clock and a recording sink.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::trace::MemoryTrace;

const SUBMIT: &str = "SUBMIT_3D";
const MS: u64 = 1_000_000;

/// Records completions (with the time the test said it was) and notifies.
#[derive(Default)]
struct Recorder {
    now: u64,
    done: Vec<(u64, u64)>,
    notifies: u32,
    forced: u32,
    /// Items whose completion fails (the vring refused them).
    refuse: Vec<u64>,
}

impl Notifier for Recorder {
    fn notify(&mut self) -> bool {
        self.notifies += 1;
        true
    }
    fn notify_forced(&mut self) -> bool {
        self.forced += 1;
        true
    }
}

impl Sink for Recorder {
    type Item = u64;
    fn complete(&mut self, item: u64) -> Result<Vec<(u64, u64)>, String> {
        if self.refuse.contains(&item) {
            return Err("refused".into());
        }
        self.done.push((item, self.now));
        Ok(Vec::new())
    }
}

impl Recorder {
    fn ids(&self) -> Vec<u64> {
        self.done.iter().map(|d| d.0).collect()
    }
}

struct Rig {
    s: Scheduler<u64>,
    sink: Recorder,
    stats: Arc<Stats>,
    log: Arc<MemoryTrace>,
}

impl Rig {
    fn new() -> Self {
        let stats = Arc::new(Stats::new());
        let log = Arc::new(MemoryTrace::default());
        Rig {
            s: Scheduler::new(stats.clone(), log.clone()),
            sink: Recorder::default(),
            stats,
            log,
        }
    }

    /// Submits fence `id` (also its item) on context `ctx` at `now`.
    fn submit(&mut self, now: u64, ctx: u32, id: u64, d: Decision) {
        self.s.submit(
            now,
            Submission {
                timeline: TimelineId { ctx, ring: 0 },
                fence_id: id,
                command: SUBMIT,
                arrival_ns: now,
                work_ns: 0,
                decision: d,
                response: 0x1100,
                errored: false,
                item: id,
            },
        );
    }

    fn at(&mut self, now: u64) -> Vec<u64> {
        let before = self.sink.done.len();
        self.sink.now = now;
        self.s.advance(now, &mut self.sink);
        self.sink.done[before..].iter().map(|d| d.0).collect()
    }

    /// Runs the clock to the end of everything scheduled, from `now`.
    fn run_out(&mut self, mut now: u64) -> u64 {
        while let Some(t) = self.s.next_event_at() {
            now = now.max(t);
            self.at(now);
        }
        now
    }
}

fn latency(ms: u64) -> Decision {
    Decision {
        latency_ns: ms * MS,
        ..Decision::default()
    }
}

fn hang(ms: u64, h: Hang) -> Decision {
    Decision {
        hang: Some(h),
        ..latency(ms)
    }
}

fn reorder(ms: u64, block: u64, size: u32, rank: u32, hold_ms: u64) -> Decision {
    Decision {
        reorder: Some(ReorderSlot {
            block,
            size,
            rank,
            position: 0,
            hold_ns: hold_ms * MS,
        }),
        ..latency(ms)
    }
}

fn holds(a: &crate::fault::Accounting) -> bool {
    a.submitted == a.completed + a.hung + a.pending + a.abandoned
}

#[test]
fn due_is_arrival_plus_latency_work_and_jitter() {
    let d = Decision {
        latency_ns: 10,
        jitter_ns: 3,
        ..Decision::default()
    };
    assert_eq!(base_due(100, 5, &d), 118);
    assert_eq!(planned_due(100, 5, &d), Some(118));
    let d = Decision {
        hang: Some(Hang::For { ns: 1000 }),
        ..d
    };
    assert_eq!(planned_due(100, 5, &d), Some(1118));
    let d = Decision {
        hang: Some(Hang::UntilReleased),
        latency_ns: u64::MAX,
        ..d
    };
    assert_eq!(base_due(100, 5, &d), u64::MAX);
    assert_eq!(planned_due(100, 5, &d), None);
}

#[test]
fn a_timeline_completes_in_arrival_order_and_timelines_are_independent() {
    let mut r = Rig::new();
    r.submit(0, 1, 1, latency(100));
    r.submit(0, 1, 2, latency(10));
    r.submit(0, 1, 3, latency(50));
    r.submit(0, 2, 4, latency(20));
    assert_eq!(r.at(0), Vec::<u64>::new());
    assert_eq!(r.s.next_event_at(), Some(20 * MS), "timer for the earliest");
    assert_eq!(r.at(19 * MS), Vec::<u64>::new());
    assert_eq!(r.at(20 * MS), vec![4]);
    assert_eq!(r.at(99 * MS), Vec::<u64>::new(), "2 and 3 wait for 1");
    assert_eq!(r.at(100 * MS), vec![1, 2, 3]);
    assert_eq!(r.s.outstanding(), 0);
    assert_eq!(r.s.next_event_at(), None);
}

#[test]
fn a_late_wake_up_completes_in_due_order_across_timelines() {
    let mut r = Rig::new();
    r.submit(0, 1, 1, latency(30));
    r.submit(0, 1, 2, latency(40));
    r.submit(0, 2, 3, latency(10));
    r.submit(0, 2, 4, latency(35));
    assert_eq!(r.at(100 * MS), vec![3, 1, 4, 2]);
}

#[test]
fn hung_fences_leave_the_fifo() {
    let mut r = Rig::new();
    r.submit(0, 1, 1, hang(0, Hang::Forever));
    r.submit(0, 1, 2, hang(0, Hang::UntilReleased));
    r.submit(0, 1, 3, hang(10, Hang::For { ns: 40 * MS }));
    r.submit(0, 1, 4, latency(5));
    assert_eq!(r.at(5 * MS), vec![4], "nothing hung blocks the timeline");
    assert_eq!(r.at(49 * MS), Vec::<u64>::new());
    assert_eq!(r.at(50 * MS), vec![3], "For{{40ms}} after its 10ms due");
    let a = r.stats.accounting();
    assert_eq!((a.hung, a.pending, a.completed), (2, 0, 2));

    let err = r.s.release(60 * MS, ReleaseTarget::Fence { fence: 1 });
    assert!(err.unwrap_err().contains("hung forever"));
    let err = r.s.release(60 * MS, ReleaseTarget::Fence { fence: 4 });
    assert!(err.unwrap_err().contains("not outstanding"));
    assert_eq!(r.at(1_000 * MS), Vec::<u64>::new(), "still hung");
    assert_eq!(r.s.release(1_000 * MS, ReleaseTarget::All), Ok(1));
    assert_eq!(r.at(1_000 * MS), vec![2]);
    assert_eq!(
        r.s.release(1_000 * MS, ReleaseTarget::All),
        Ok(0),
        "forever is not releasable"
    );
    let a = r.stats.accounting();
    assert_eq!((a.hung, a.released, a.completed), (1, 1, 3));
    assert!(holds(&a));

    assert_eq!(r.s.reset(2_000 * MS, &mut r.sink), 1);
    let a = r.stats.accounting();
    assert_eq!((a.hung, a.abandoned), (0, 1));
    assert!(holds(&a));
    assert!(
        r.log
            .events()
            .iter()
            .any(|e| matches!(e, TraceEvent::Abandoned { fences, .. } if fences == &vec![1]))
    );
    let released: Vec<_> = r
        .log
        .events()
        .into_iter()
        .filter_map(|e| match e {
            TraceEvent::Complete { fence, due_ns, .. } => Some((fence, due_ns)),
            _ => None,
        })
        .collect();
    assert_eq!(
        released,
        vec![(4, Some(5 * MS)), (3, Some(50 * MS)), (2, None)]
    );
}

#[test]
fn release_by_timeline_only_touches_that_timeline() {
    let mut r = Rig::new();
    r.submit(0, 1, 1, hang(0, Hang::UntilReleased));
    r.submit(0, 2, 2, hang(0, Hang::UntilReleased));
    let tl = TimelineId { ctx: 2, ring: 0 };
    assert_eq!(
        r.s.release(1, ReleaseTarget::Timeline { timeline: tl }),
        Ok(1)
    );
    assert_eq!(r.at(1), vec![2]);
    assert_eq!(r.stats.accounting_by_timeline()[&tl].released, 1);
}

#[test]
fn reorder_blocks_stay_between_their_neighbours() {
    let mut r = Rig::new();
    r.submit(0, 1, 1, latency(30));
    for (id, rank) in [(2, 3), (3, 1), (4, 0), (5, 2)] {
        r.submit(0, 1, id, reorder(1, 9, 4, rank, 50));
    }
    r.submit(0, 1, 6, latency(0));
    assert_eq!(r.at(29 * MS), Vec::<u64>::new(), "all wait for fence 1");
    assert_eq!(r.at(30 * MS), vec![1, 4, 3, 5, 2, 6]);
}

#[test]
fn a_block_member_waits_hold_for_missing_lower_ranks() {
    let mut r = Rig::new();
    r.submit(0, 1, 1, reorder(10, 1, 2, 1, 20));
    assert_eq!(r.at(29 * MS), Vec::<u64>::new());
    assert_eq!(r.at(30 * MS), vec![1], "due 10ms + hold 20ms");
    // The skipped member arrives and completes at its own due time.
    r.submit(40 * MS, 1, 2, reorder(10, 1, 2, 0, 20));
    assert_eq!(r.at(49 * MS), Vec::<u64>::new());
    assert_eq!(r.at(50 * MS), vec![2]);
    // A new block starts fresh.
    r.submit(60 * MS, 1, 3, reorder(0, 2, 2, 1, 1_000));
    r.submit(61 * MS, 1, 4, reorder(0, 2, 2, 0, 1_000));
    assert_eq!(r.at(61 * MS), vec![4, 3]);
}

#[test]
fn an_unordered_arrival_closes_an_incomplete_block() {
    let mut r = Rig::new();
    r.submit(0, 1, 1, reorder(0, 1, 3, 2, 1_000));
    r.submit(0, 1, 2, reorder(0, 1, 3, 1, 1_000));
    assert_eq!(r.at(1), Vec::<u64>::new(), "rank 0 may still come");
    r.submit(2, 1, 3, latency(0));
    assert_eq!(r.at(2), vec![2, 1, 3]);
}

#[test]
fn a_deadline_boost_pulls_the_fence_and_its_predecessors_in() {
    let mut r = Rig::new();
    r.submit(0, 1, 1, latency(10_000));
    r.submit(0, 1, 2, latency(10_000));
    r.submit(0, 1, 3, latency(10_000));
    r.submit(0, 2, 4, latency(10_000));
    r.s.deadline(5 * MS, 2, 1_000, Some(20 * MS));
    assert_eq!(r.at(24 * MS), Vec::<u64>::new());
    assert_eq!(r.at(25 * MS), vec![1, 2]);
    assert_eq!(r.at(1_000 * MS), Vec::<u64>::new(), "3 and 4 keep 10 s");

    r.s.deadline(1_000 * MS, 3, 0, None);
    r.s.deadline(1_000 * MS, 3, 0, Some(20_000 * MS));
    r.s.deadline(1_000 * MS, 2, 0, Some(MS));
    r.s.deadline(1_000 * MS, 77, 0, Some(MS));
    r.submit(1_000 * MS, 3, 5, hang(0, Hang::UntilReleased));
    r.s.deadline(1_000 * MS, 5, 0, Some(MS));
    let outcomes: Vec<_> = r
        .log
        .events()
        .into_iter()
        .filter_map(|e| match e {
            TraceEvent::Deadline {
                fence,
                outcome,
                old_due_ns,
                new_due_ns,
                ..
            } => Some((fence, outcome, old_due_ns, new_due_ns)),
            _ => None,
        })
        .collect();
    use DeadlineOutcome::*;
    assert_eq!(
        outcomes,
        vec![
            (2, Boosted, Some(10_000 * MS), Some(25 * MS)),
            (3, NoBoost, None, None),
            (3, AlreadySooner, Some(10_000 * MS), Some(10_000 * MS)),
            (2, Completed, None, None),
            (77, Unknown, None, None),
            (5, Hung, None, None),
        ]
    );
    let a = r.stats.accounting();
    assert_eq!((a.deadline_hints, a.deadline_boosts), (6, 1));
}

#[test]
fn pause_holds_completions_and_resume_lets_the_due_ones_go() {
    let mut r = Rig::new();
    r.s.set_paused(0, true, &mut r.sink);
    r.submit(0, 1, 1, latency(10));
    r.submit(0, 1, 2, latency(500));
    assert_eq!(r.s.next_event_at(), None, "no timer while paused");
    assert_eq!(r.at(100 * MS), Vec::<u64>::new());
    r.sink.now = 100 * MS;
    r.s.set_paused(100 * MS, false, &mut r.sink);
    assert_eq!(r.sink.ids(), vec![1]);
    assert_eq!(r.at(500 * MS), vec![2]);
    let kinds: Vec<bool> = r
        .log
        .events()
        .iter()
        .filter_map(|e| match e {
            TraceEvent::Paused { .. } => Some(true),
            TraceEvent::Resumed { .. } => Some(false),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, vec![true, false]);
}

#[test]
fn flush_completes_all_but_the_hung_and_notifies_once() {
    let mut r = Rig::new();
    r.submit(0, 1, 1, latency(10_000));
    r.submit(0, 1, 2, reorder(10_000, 1, 2, 1, 0));
    r.submit(0, 1, 3, reorder(10_000, 1, 2, 0, 0));
    r.submit(0, 2, 4, hang(10_000, Hang::For { ns: 1 }));
    r.submit(0, 2, 5, hang(0, Hang::UntilReleased));
    r.submit(
        0,
        2,
        6,
        Decision {
            irq: IrqFault::Drop,
            ..latency(10_000)
        },
    );
    r.s.flush(1, &mut r.sink);
    assert_eq!(r.sink.ids(), vec![1, 3, 2, 6, 4]);
    assert_eq!(r.sink.notifies, 1);
    assert_eq!(r.s.outstanding(), 1, "the hung one stays");
    assert_eq!(r.s.next_event_at(), None);
    assert_eq!(r.s.release(2, ReleaseTarget::All), Ok(1));
    assert_eq!(r.at(2), vec![5]);
}

/// (fence, flushed) of every completion traced.
fn flushed_flags(r: &Rig) -> Vec<(u64, bool)> {
    r.log
        .events()
        .into_iter()
        .filter_map(|e| match e {
            TraceEvent::Complete { fence, flushed, .. } => Some((fence, flushed)),
            _ => None,
        })
        .collect()
}

#[test]
fn flush_counts_only_the_fences_it_returned_early() {
    let mut r = Rig::new();
    r.submit(0, 1, 1, latency(0));
    r.submit(0, 2, 2, latency(10));
    r.submit(0, 2, 3, latency(0));
    r.submit(0, 3, 4, hang(0, Hang::For { ns: 5 * MS }));
    r.submit(0, 3, 5, hang(0, Hang::UntilReleased));
    r.submit(0, 4, 6, reorder(0, 1, 2, 1, 3));
    assert_eq!(r.s.release(MS, ReleaseTarget::All), Ok(1));
    r.sink.now = 2 * MS;
    r.s.flush(2 * MS, &mut r.sink);
    assert_eq!(
        flushed_flags(&r),
        vec![
            (1, false), // due at 0: the engine only had not run yet
            (2, true),  // due at 10 ms
            (3, true),  // due, but its turn comes after 2's
            (6, true),  // rank 1 waits up to 3 ms for rank 0
            (4, true),  // hung for 5 ms
            (5, false), // released at 1 ms
        ]
    );
    let total = r.stats.accounting();
    assert_eq!((total.completed, total.flushed), (6, 4));
    assert!(holds(&total), "{total:?}");
    let tls = r.stats.accounting_by_timeline();
    let flushed: Vec<u64> = tls.values().map(|a| a.flushed).collect();
    assert_eq!(flushed, vec![0, 2, 1, 1]);
    assert_eq!(r.stats.accounting_by_command()[SUBMIT].flushed, 4);
}

#[test]
fn a_flush_while_paused_returns_everything_early() {
    let mut r = Rig::new();
    r.submit(0, 1, 1, latency(0));
    r.s.set_paused(0, true, &mut r.sink);
    r.submit(0, 1, 2, latency(0));
    assert!(r.at(MS).is_empty(), "paused");
    r.s.flush(MS, &mut r.sink);
    assert_eq!(flushed_flags(&r), vec![(1, true), (2, true)]);
    assert_eq!(r.stats.accounting().flushed, 2);
}

#[test]
fn a_reset_flushes_too_and_on_time_completions_are_not_flushed() {
    let mut r = Rig::new();
    r.submit(0, 1, 1, latency(1));
    r.submit(0, 2, 2, hang(0, Hang::For { ns: MS }));
    r.submit(0, 3, 3, latency(100));
    r.at(5 * MS);
    r.s.reset(10 * MS, &mut r.sink);
    let mut flags = flushed_flags(&r);
    flags.sort_unstable();
    assert_eq!(flags, vec![(1, false), (2, false), (3, true)]);
    let total = r.stats.accounting();
    assert_eq!((total.completed, total.flushed), (3, 1));
}

#[test]
fn interrupts_follow_each_completions_fault() {
    let mut r = Rig::new();
    let with = |irq| Decision { irq, ..latency(1) };
    r.submit(0, 1, 1, with(IrqFault::Drop));
    assert_eq!(r.at(MS), vec![1]);
    assert_eq!(r.sink.notifies, 0, "dropped");
    for id in 2..6 {
        r.submit(MS, 1, id, with(IrqFault::Coalesce { window_ns: 10 * MS }));
    }
    r.at(2 * MS);
    assert_eq!(r.sink.done.len(), 5);
    assert_eq!(r.sink.notifies, 0, "coalescing");
    r.at(12 * MS);
    assert_eq!(r.sink.notifies, 1, "one notify for the window");
    r.submit(20 * MS, 1, 7, with(IrqFault::Spurious { count: 2 }));
    r.run_out(20 * MS);
    assert_eq!((r.sink.notifies, r.sink.forced), (2, 2));
    let covers: Vec<_> = r
        .log
        .events()
        .into_iter()
        .filter_map(|e| match e {
            TraceEvent::Notify { kind, covers, .. } => Some((kind, covers)),
            _ => None,
        })
        .collect();
    use crate::fault::NotifyKind::*;
    assert_eq!(
        covers,
        vec![(Coalesced, 5), (Normal, 1), (Spurious, 0), (Spurious, 0)]
    );
}

#[test]
fn a_fence_the_vring_refuses_is_abandoned() {
    let mut r = Rig::new();
    r.sink.refuse.push(1);
    r.submit(0, 1, 1, latency(0));
    r.submit(0, 1, 2, latency(0));
    assert_eq!(r.at(0), vec![2]);
    let a = r.stats.accounting();
    assert_eq!((a.abandoned, a.completed, a.pending), (1, 1, 0));
    assert!(holds(&a));
}

/// Random plans, clocks, releases, hints and pauses: the accounting adds up
/// in every bucket, nothing completes before it is allowed, and unordered
/// fences keep their timeline's arrival order.
#[test]
fn random_runs_keep_the_invariants() {
    for seed in 0..20u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut r = Rig::new();
        let mut now = 0;
        let mut plain: HashMap<u64, (u32, u64)> = HashMap::new();
        let mut earliest: HashMap<u64, u64> = HashMap::new();
        let mut block = 0;
        let mut in_block: Vec<u32> = Vec::new();
        for id in 0..400u64 {
            now += rng.random_range(0..3 * MS);
            let ctx = rng.random_range(0..3u32);
            let mut d = latency(rng.random_range(0..20));
            d.jitter_ns = rng.random_range(0..MS);
            match rng.random_range(0..20) {
                0 => d.hang = Some(Hang::UntilReleased),
                1 => d.hang = Some(Hang::Forever),
                2 => d.hang = Some(Hang::For { ns: 5 * MS }),
                3 => d.irq = IrqFault::Drop,
                4 => d.irq = IrqFault::Coalesce { window_ns: MS },
                5 => d.irq = IrqFault::Spurious { count: 2 },
                6 => d.irq = IrqFault::Delay { delay_ns: MS },
                _ => {}
            }
            if ctx == 2 {
                // Timeline 2 reorders in blocks of 4.
                if in_block.is_empty() {
                    block += 1;
                    in_block = vec![0, 1, 2, 3];
                    for i in (1..4).rev() {
                        in_block.swap(i, rng.random_range(0..=i));
                    }
                }
                let rank = in_block.pop().unwrap_or(0);
                d.reorder = Some(ReorderSlot {
                    block,
                    size: 4,
                    rank,
                    position: 0,
                    hold_ns: 2 * MS,
                });
            } else if d.hang.is_none() {
                plain.insert(id, (ctx, id));
            }
            if let Some(due) = planned_due(now, 0, &d) {
                earliest.insert(id, due);
            }
            r.submit(now, ctx, id, d);
            match rng.random_range(0..30) {
                0 => {
                    let _ = r.s.release(now, ReleaseTarget::All);
                }
                1 => r.s.deadline(now, rng.random_range(0..=id), 0, Some(MS)),
                2 => {
                    r.sink.now = now;
                    let p = !r.s.is_paused();
                    r.s.set_paused(now, p, &mut r.sink);
                }
                _ => {}
            }
            r.at(now);
            let a = r.stats.accounting();
            assert!(holds(&a), "seed {seed}: {a:?}");
        }
        r.sink.now = now;
        r.s.set_paused(now, false, &mut r.sink);
        now = r.run_out(now);
        let _ = r.s.release(now, ReleaseTarget::All);
        r.run_out(now);
        for (id, at) in &r.sink.done {
            if let Some(due) = earliest.get(id) {
                // Deadline boosts may pull a fence in, never before the hint.
                assert!(
                    at >= due || r.stats.accounting().deadline_boosts > 0,
                    "seed {seed}: fence {id} at {at} before due {due}"
                );
            }
        }
        for ctx in 0..2 {
            let order: Vec<u64> = r
                .sink
                .ids()
                .into_iter()
                .filter(|id| plain.get(id).is_some_and(|p| p.0 == ctx))
                .collect();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(order, sorted, "seed {seed}: timeline {ctx} out of order");
        }
        let a = r.stats.accounting();
        assert!(holds(&a));
        assert_eq!(a.pending, 0, "seed {seed}: everything went");
        assert_eq!(a.hung as usize, r.s.outstanding(), "only forever is left");
        assert!(r.stats.accounting_by_timeline().values().all(holds));
        assert!(r.stats.accounting_by_command().values().all(holds));
    }
}

/// Cost per fence as the number pending grows (run in release, see the
/// `ignore` reason). Flat or logarithmic growth is what O(log n) promises.
#[test]
#[ignore = "measurement: cargo test --release -p fencelab-device --lib scheduling_cost -- --ignored --nocapture"]
fn scheduling_cost_per_fence() {
    use crate::fault::NoTrace;
    for n in [10_000u64, 100_000, 1_000_000] {
        let mut rng = ChaCha8Rng::seed_from_u64(n);
        let mut s: Scheduler<u64> = Scheduler::new(Arc::new(Stats::new()), Arc::new(NoTrace));
        let mut sink = Recorder::default();
        let start = std::time::Instant::now();
        let mut now = 0;
        for id in 0..n {
            now += 1_000;
            s.submit(
                now,
                Submission {
                    timeline: TimelineId {
                        ctx: rng.random_range(0..16),
                        ring: 0,
                    },
                    fence_id: id,
                    command: SUBMIT,
                    arrival_ns: now,
                    work_ns: 0,
                    // Up to 1 s: most of the run's fences are pending at once.
                    decision: latency(rng.random_range(0..1_000)),
                    response: 0x1100,
                    errored: false,
                    item: id,
                },
            );
            if id % 64 == 0 {
                s.advance(now, &mut sink);
            }
        }
        while let Some(t) = s.next_event_at() {
            s.advance(t, &mut sink);
        }
        let took = start.elapsed();
        assert_eq!(sink.done.len() as u64, n);
        println!(
            "{n} fences: {:?} total, {} ns per fence",
            took,
            took.as_nanos() / u128::from(n)
        );
    }
}
