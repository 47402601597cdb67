//! The fence engine's scheduling core ([`Scheduler::submit`] and
//! [`Scheduler::advance`]) in steady state with 10 000 fences pending: each
//! iteration submits one fence and advances the clock to the earliest due
//! time, which completes one. Criterion group `scheduler`; throughput is
//! fences/s.
//!
//! Real [`Stats`] (counters and latency histograms, as in the device), a
//! tracer that drops every event and a sink that only counts: this measures
//! the scheduler, not I/O or the vring.
//!
//! `cargo xtask bench` reads `target/criterion/scheduler/<name>/new/estimates.json`:
//! keep the names.

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fencelab_device::engine::{Notifier, Scheduler, Sink, Submission};
use fencelab_device::fault::{Decision, NoTrace, ReorderSlot, TimelineId};
use fencelab_device::stats::Stats;

/// Fences pending throughout.
const PENDING: u64 = 10_000;
/// Reorder blocks of this many fences complete in [`RANKS`] order.
const BLOCK: u64 = 4;
const RANKS: [u32; BLOCK as usize] = [2, 0, 3, 1];

/// Counts completions and notifies; writes nothing.
#[derive(Default)]
struct CountingSink {
    completed: u64,
    notifies: u64,
}

impl Notifier for CountingSink {
    fn notify(&mut self) -> bool {
        self.notifies += 1;
        true
    }
    fn notify_forced(&mut self) -> bool {
        self.notify()
    }
}

impl Sink for CountingSink {
    type Item = ();
    fn complete(&mut self, _item: ()) -> Result<Vec<(u64, u64)>, String> {
        self.completed += 1;
        Ok(Vec::new())
    }
}

/// How the fences of a bench are spread and ordered.
#[derive(Clone, Copy)]
struct Shape {
    timelines: u32,
    reorder: bool,
}

/// A scheduler holding [`PENDING`] fences; fence `n` arrives at `n` ns and
/// is due [`PENDING`] ns later, so advancing to `n` completes one fence.
struct SteadyState {
    scheduler: Scheduler<()>,
    sink: CountingSink,
    shape: Shape,
    /// The clock, and the number of fences submitted so far.
    now: u64,
}

impl SteadyState {
    fn new(shape: Shape) -> Self {
        let scheduler = Scheduler::new(Arc::new(Stats::new()), Arc::new(NoTrace));
        let mut s = SteadyState {
            scheduler,
            sink: CountingSink::default(),
            shape,
            now: 0,
        };
        for _ in 0..PENDING {
            s.submit();
        }
        assert_eq!(s.scheduler.outstanding() as u64, PENDING);
        s
    }

    fn decision(&self, n: u64) -> Decision {
        let reorder = self.shape.reorder.then(|| ReorderSlot {
            block: n / BLOCK,
            size: BLOCK as u32,
            rank: RANKS[(n % BLOCK) as usize],
            position: (n % BLOCK) as u32,
            hold_ns: 1_000,
        });
        Decision {
            latency_ns: PENDING,
            reorder,
            ..Decision::default()
        }
    }

    fn submit(&mut self) {
        let n = self.now;
        let timeline = TimelineId {
            ctx: 1 + (n % u64::from(self.shape.timelines)) as u32,
            ring: 0,
        };
        let decision = self.decision(n);
        self.scheduler.submit(
            n,
            Submission {
                timeline,
                fence_id: n + 1,
                command: "SUBMIT_3D",
                arrival_ns: n,
                work_ns: 0,
                decision,
                response: 0x1100,
                errored: false,
                item: (),
            },
        );
        self.now += 1;
    }

    /// One step: a fence arrives, the clock reaches the earliest due time.
    fn step(&mut self) {
        self.submit();
        let due = self.now - 1;
        self.scheduler.advance(due, &mut self.sink);
    }

    /// The queue did stay at [`PENDING`] (within one reorder block) and
    /// every step completed a fence.
    fn check(&self) {
        let outstanding = self.scheduler.outstanding() as u64;
        assert!(
            (PENDING..PENDING + 2 * BLOCK).contains(&outstanding),
            "{outstanding} fences pending, expected about {PENDING}"
        );
        assert_eq!(self.sink.completed + outstanding, self.now);
    }
}

fn bench_scheduler(c: &mut Criterion) {
    let mut g = c.benchmark_group("scheduler");
    g.throughput(Throughput::Elements(1));
    let shapes = [
        (
            "10k_pending",
            Shape {
                timelines: 1,
                reorder: false,
            },
        ),
        (
            "10k_pending_4_timelines",
            Shape {
                timelines: 4,
                reorder: false,
            },
        ),
        (
            "10k_pending_reorder_blocks_4",
            Shape {
                timelines: 1,
                reorder: true,
            },
        ),
    ];
    for (name, shape) in shapes {
        let mut state = SteadyState::new(shape);
        g.bench_function(name, |b| b.iter(|| state.step()));
        state.check();
    }
    g.finish();
}

criterion_group!(benches, bench_scheduler);
criterion_main!(benches);
