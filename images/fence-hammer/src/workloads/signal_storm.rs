//! `signal-storm`: `--threads` threads submit the `--fences` concurrently,
//! each on a timeline of its own (a lane: its own render-node fd, so its
//! own virgl context, on virtio_gpu; its own timeline of one context on
//! fencelab_drm), each at most `--inflight` fences outstanding.
//!
//! Each thread is a fence [`pipeline`](super::pipeline) over a contiguous
//! share of the fence numbers, so every fence has a WRITE slot of its own
//! (virtio_gpu). Checked per fence: it signals, once (status and timestamp
//! never change afterwards), without error, never before its WRITE landed
//! (premature signals are findings, as in `smoke`), none lost (timeouts),
//! and in order on its timeline. Out-of-order signals break the run only
//! where the driver promises order (see
//! [`Lanes::signals_in_order`](crate::lanes::Lanes::signals_in_order)):
//! fencelab_drm signals each fence when the device answers it, so under an
//! in-timeline reorder plan they are counted, not failures.

use std::time::Instant;

use anyhow::bail;

use super::pipeline::Pipeline;
use super::{Context, Workload};
use crate::readback::MAX_SLOTS;
use crate::report::Outcome;

pub const WORKLOAD: Workload = Workload {
    name: "signal-storm",
    summary: "--threads threads, each on a timeline of its own, submit the fences concurrently; each must signal once, in order, never before its WRITE",
    run,
};

/// Fence numbers `0..fences` split into `threads` contiguous shares, the
/// first `fences % threads` one larger; no share is empty (fewer threads
/// when there are fewer fences).
pub fn shares(fences: u64, threads: usize) -> Vec<std::ops::Range<u64>> {
    let threads = (threads as u64).clamp(1, fences.max(1));
    let mut start = 0;
    (0..threads)
        .map(|t| {
            let len = fences / threads + u64::from(t < fences % threads);
            let share = start..start + len;
            start += len;
            share
        })
        .collect()
}

fn run(ctx: &mut Context<'_>) -> anyhow::Result<Outcome> {
    let p = ctx.params;
    if ctx.slots.is_some() && p.fences > MAX_SLOTS {
        bail!(
            "usage: {} gives each fence a WRITE slot of its own, at most {MAX_SLOTS}: use fewer --fences or --no-write",
            WORKLOAD.name
        );
    }
    let shares = shares(p.fences, p.threads);
    let mut lanes = ctx.lanes.open(shares.len())?;
    eprintln!(
        "fence-hammer: {}: {} threads, {} fences, {} in flight each",
        ctx.label,
        shares.len(),
        p.fences,
        p.inflight
    );
    let slots = ctx.slots;
    let label = ctx.label;
    let order_promised = ctx.lanes.signals_in_order();
    let start = Instant::now();
    let parts: Vec<Outcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = lanes
            .iter_mut()
            .zip(&shares)
            .enumerate()
            .map(|(t, (lane, share))| {
                let share = share.clone();
                scope.spawn(move || {
                    let mut pipeline = Pipeline {
                        source: &mut **lane,
                        slots,
                        params: p,
                        label: format!("{label}/{t}"),
                        order_promised,
                    };
                    pipeline.run(share, &mut |_, _| {})
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(&shares)
            .enumerate()
            .map(|(t, (h, share))| h.join().unwrap_or_else(|_| panicked(t, share)))
            .collect()
    });

    let mut out = Outcome::default();
    for part in parts {
        out.absorb(part);
    }
    out.elapsed = start.elapsed();
    out.order_not_promised = !order_promised;
    Ok(out)
}

/// The outcome of a thread that panicked: its fences are lost.
fn panicked(t: usize, share: &std::ops::Range<u64>) -> Outcome {
    let mut out = Outcome::one_thread();
    let n = share.end - share.start;
    out.counts.submitted = n;
    out.counts.errors = n;
    out.note_error(format!(
        "thread {t} panicked; its fences #{}..#{} are counted as errors",
        share.start, share.end
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::readback::SlotMap;
    use crate::readback::tests::FakeSlots;
    use crate::workloads::Params;
    use crate::workloads::fake::{FakeGpu, FakeLanes};
    use std::sync::Arc;
    use std::time::Duration;

    fn params(fences: u64, threads: usize) -> Params {
        Params {
            fences,
            threads,
            inflight: 4,
            timeout: Duration::from_secs(5),
            ..Params::default()
        }
    }

    fn storm(lanes: &FakeLanes, slots: Option<&FakeSlots>, p: Params) -> anyhow::Result<Outcome> {
        let mut unused = FakeGpu::in_order();
        let mut ctx = lanes.context(&mut unused, slots, p, "storm-test");
        run(&mut ctx)
    }

    #[test]
    fn shares_cover_every_fence_once() {
        assert_eq!(shares(10, 4), vec![0..3, 3..6, 6..8, 8..10]);
        assert_eq!(shares(2, 4), vec![0..1, 1..2], "no empty share");
        assert_eq!(shares(7, 1), vec![0..7]);
        assert_eq!(shares(0, 3), vec![0..0]);
    }

    #[test]
    fn round_trips_are_split_into_phases_by_fence_number_across_threads() {
        let lanes = FakeLanes::new(FakeGpu::in_order());
        let p = Params {
            rtt_phases: 4,
            ..params(400, 2)
        };
        let o = storm(&lanes, None, p).unwrap();
        assert!(o.ok(), "{o:?}");
        let sizes: Vec<usize> = o.rtt_phases.samples.iter().map(Vec::len).collect();
        assert_eq!(
            sizes,
            [100, 100, 100, 100],
            "each thread fed its own phases"
        );
        let line = crate::report::result_line("signal-storm", "/dev/x", "virtio_gpu", &o);
        assert_eq!(line.rtt_us_by_phase.len(), 4);
        assert!(line.rtt_us_by_phase.iter().all(|r| r.p50.is_some()));

        let unsplit = storm(&lanes, None, params(40, 2)).unwrap();
        assert!(unsplit.rtt_phases.samples.is_empty());
    }

    #[test]
    fn every_thread_signals_its_share_with_its_own_slots() {
        let memory = Arc::new(FakeSlots::new(3, SlotMap::for_fences(400)));
        let mut gpu = FakeGpu::in_order();
        gpu.memory = Some(memory.clone());
        let lanes = FakeLanes::new(gpu);
        let o = storm(&lanes, Some(&memory), params(400, 4)).unwrap();
        assert!(o.ok(), "{o:?}");
        assert_eq!(o.threads, 4);
        assert_eq!((o.counts.submitted, o.counts.signaled), (400, 400));
        assert_eq!(o.rtt_ns.len(), 400);
        assert_eq!((o.premature.checks, o.premature.premature), (400, 0));
        // Every fence number wrote its own value into its own slot.
        let words = memory.words.lock().unwrap();
        assert!(words.iter().enumerate().all(|(i, &w)| w == i as u64 + 1));
        assert_eq!(lanes.gpu().next, 400);
    }

    #[test]
    fn premature_signals_are_found_in_any_thread() {
        let memory = Arc::new(FakeSlots::new(3, SlotMap::for_fences(200)));
        let mut gpu = FakeGpu::in_order();
        gpu.memory = Some(memory.clone());
        gpu.premature = [10, 150].into();
        let lanes = FakeLanes::new(gpu);
        let o = storm(&lanes, Some(&memory), params(200, 3)).unwrap();
        assert_eq!(o.premature.premature, 2);
        assert_eq!(o.premature.first.len(), 2);
        assert!(o.ok(), "premature signals are findings");
    }

    #[test]
    fn out_of_order_breaks_the_run_only_where_order_is_promised() {
        // Odd fences signal with their even predecessor, with an earlier
        // timestamp: each odd one is out of order.
        let gpu = || {
            let mut gpu = FakeGpu::new(Box::new(
                |s| {
                    if s % 2 == 1 { vec![s, s - 1] } else { vec![] }
                },
            ));
            gpu.timestamp = Box::new(|s| 1_000 + 10 * s - if s % 2 == 1 { 15 } else { 0 });
            gpu
        };
        let lanes = FakeLanes::new(gpu());
        let o = storm(&lanes, None, params(10, 1)).unwrap();
        assert_eq!(o.counts.out_of_order, 5);
        assert!(!o.ok());
        let lanes = FakeLanes {
            in_order: false,
            ..FakeLanes::new(gpu())
        };
        let o = storm(&lanes, None, params(10, 1)).unwrap();
        assert_eq!(o.counts.out_of_order, 5);
        assert!(o.ok(), "fencelab_drm does not promise order");
    }

    #[test]
    fn lost_fences_time_out_in_their_thread_only() {
        // The fake's 5th submission never signals.
        let lanes = FakeLanes::new(FakeGpu::new(Box::new(|s| {
            if s == 5 { vec![] } else { vec![s] }
        })));
        let p = Params {
            timeout: Duration::from_millis(100),
            ..params(40, 2)
        };
        let o = storm(&lanes, None, p).unwrap();
        assert_eq!(o.counts.timeouts, 1);
        assert!(o.counts.signaled >= 20, "the other thread went on: {o:?}");
        assert!(!o.ok());
    }

    #[test]
    fn too_many_fences_for_the_slots_is_a_usage_error() {
        let memory = FakeSlots::new(3, SlotMap::new(4));
        let lanes = FakeLanes::unused();
        let err = storm(&lanes, Some(&memory), params(MAX_SLOTS + 1, 2))
            .expect_err("refused")
            .to_string();
        assert!(err.contains("--no-write"), "{err}");
    }
}
