//! `array-order`: fences from `--merge-width` timelines merged into one
//! sync_file, and the order their signals are seen in.
//!
//! Each array takes one fence from each of K lanes (timelines; on
//! virtio_gpu, render-node fds of their own) and merges them with
//! `SYNC_IOC_MERGE`. On fencelab_drm each lane is a fence context of its
//! own, so the merged sync_file holds a `dma_fence_array` of K fences; on
//! virtio_gpu every fence is on the driver's one fence context and the
//! kernel keeps only the latest, so the merged sync_file is that fence
//! alone (still a check of virtio_gpu's in-order signaling). The
//! `--fences` are shared out in arrays of K (the last may be smaller); at
//! most `--inflight` fences (at least one array) are outstanding.
//!
//! Waiting: each poll pass samples every pending array's merged fd *before*
//! its pending components. The invariant: an array is never seen signaled
//! while one of its components is not; since signals never go away, a
//! component sampled unsignaled after its array was sampled signaled in the
//! same pass is a real violation, counted as a finding (not a failure, like
//! premature signals). Components are checked as `smoke` checks fences
//! (status, errno, WRITE read-back on virtio_gpu) and must all signal; an
//! array whose components all signaled must signal too.
//!
//! Measured: arrays, components, violations, and the lag from the last
//! component's signal (its kernel timestamp) to the array seen signaled
//! (CLOCK_MONOTONIC right after the poll that saw it), for the arrays that
//! had to wait for their last component (it signaled after the merge; an
//! array merged from signaled fences has nothing to wait for, and is only
//! counted in the log).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use fencelab_report::{ArrayOrderReport, RttUs};

use super::pipeline::tally_signaled;
use super::{Context, Workload};
use crate::readback;
use crate::report::Outcome;
use crate::sync_file::{self, Readiness, Status};

pub const WORKLOAD: Workload = Workload {
    name: "array-order",
    summary: "fences of --merge-width timelines merged into one sync_file; an array must never be seen signaled before its components; lag measured",
    run,
};

/// Violations logged by array number (all are counted).
const MAX_VIOLATIONS_LOGGED: u64 = 16;

struct Component {
    seq: u64,
    fence: OwnedFd,
    submitted_at: Instant,
    /// When it signaled (kernel timestamp, CLOCK_MONOTONIC ns), once read.
    signaled_ns: Option<u64>,
    /// Signaled (read), errored or timed out: no longer polled.
    done: bool,
}

struct Array {
    id: u64,
    components: Vec<Component>,
    /// `None` when the merge failed.
    merged: Option<OwnedFd>,
    /// CLOCK_MONOTONIC right after the merge.
    merged_ns: u64,
    /// CLOCK_MONOTONIC when a poll first saw the merged fd ready.
    seen_ns: Option<u64>,
    deadline: Instant,
}

impl Array {
    fn done(&self) -> bool {
        (self.seen_ns.is_some() || self.merged.is_none()) && self.components.iter().all(|c| c.done)
    }
}

/// An entry of one poll pass.
#[derive(Clone, Copy)]
enum Polled {
    Merged(usize),
    Component(usize, usize),
}

/// Sizes of the arrays that share out `fences`: `width` each, the last the
/// remainder.
pub fn array_sizes(fences: u64, width: usize) -> impl Iterator<Item = usize> {
    let width = width.max(1) as u64;
    (0..fences.div_ceil(width)).map(move |i| (fences - i * width).min(width) as usize)
}

fn run(ctx: &mut Context<'_>) -> anyhow::Result<Outcome> {
    let p = ctx.params;
    let width = p.merge_width.max(1);
    let mut lanes = ctx.lanes.open(width)?;
    let files = ctx.sync_files;
    let slot_map = ctx.slots.map(|m| m.map());
    let max_arrays = (p.inflight / width).max(1);
    eprintln!(
        "fence-hammer: {}: {} fences in arrays of {width}, {max_arrays} array(s) in flight",
        ctx.label, p.fences
    );

    let mut out = Outcome::one_thread();
    let mut report = ArrayOrderReport::default();
    let mut lags_ns = Vec::new();
    // Arrays merged from fences that had all signaled already (no lag).
    let mut merged_signaled = 0u64;
    let mut sizes = array_sizes(p.fences, width).peekable();
    let mut pending: Vec<Array> = Vec::new();
    let mut next_seq = 0u64;
    let mut stuck = false;
    let start = Instant::now();

    loop {
        while !stuck && pending.len() < max_arrays {
            let Some(&size) = sizes.peek() else { break };
            let last = next_seq + size as u64 - 1;
            let oldest = pending
                .iter()
                .flat_map(|a| &a.components)
                .filter(|c| !c.done)
                .map(|c| c.seq)
                .min();
            if slot_map.is_some_and(|m| !m.is_free(last, oldest)) {
                break;
            }
            sizes.next();
            let mut components = Vec::with_capacity(size);
            for lane in lanes.iter_mut().take(size) {
                let seq = next_seq;
                next_seq += 1;
                out.counts.submitted += 1;
                let command = readback::command(seq, p.work_ns, ctx.slots);
                let submitted_at = Instant::now();
                match lane.submit(&command) {
                    Ok(fence) => components.push(Component {
                        seq,
                        fence,
                        submitted_at,
                        signaled_ns: None,
                        done: false,
                    }),
                    Err(e) => {
                        out.counts.errors += 1;
                        out.counts.submit_failures += 1;
                        out.note_error(format!("fence #{seq}: submission failed: {e}"));
                    }
                }
            }
            if components.is_empty() {
                continue;
            }
            let id = report.arrays;
            let fds: Vec<BorrowedFd<'_>> = components.iter().map(|c| c.fence.as_fd()).collect();
            let merged = match merge_all(files, &fds) {
                Ok(m) => Some(m),
                Err(e) => {
                    // Its fences are still waited for and checked.
                    out.violation(format!("array {id}: SYNC_IOC_MERGE failed: {e}"));
                    None
                }
            };
            drop(fds);
            if let (0, Some(m)) = (id, &merged) {
                log_merged(ctx.label, files, m.as_fd(), components.len());
            }
            report.arrays += 1;
            report.components += components.len() as u64;
            pending.push(Array {
                id,
                components,
                merged,
                merged_ns: sync_file::monotonic_ns(),
                seen_ns: None,
                deadline: Instant::now() + p.timeout,
            });
        }
        let Some(deadline) = pending.iter().map(|a| a.deadline).min() else {
            break;
        };

        // One pass: each array's merged fd before its pending components.
        let mut entries = Vec::new();
        let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
        for (i, a) in pending.iter().enumerate() {
            if let (None, Some(merged)) = (a.seen_ns, &a.merged) {
                entries.push(Polled::Merged(i));
                fds.push(merged.as_fd());
            }
            for (j, c) in a.components.iter().enumerate().filter(|(_, c)| !c.done) {
                entries.push(Polled::Component(i, j));
                fds.push(c.fence.as_fd());
            }
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        let states = match sync_file::poll_in(&fds, wait) {
            Ok(states) => states,
            Err(e) => {
                let left: u64 = pending
                    .iter()
                    .map(|a| a.components.iter().filter(|c| !c.done).count() as u64)
                    .sum();
                out.counts.errors += left;
                out.note_error(format!("{e}; {left} fence(s) abandoned"));
                break;
            }
        };
        drop(fds);
        let seen_ns = sync_file::monotonic_ns();
        let polled_at = Instant::now();
        let slot_values: Vec<Option<u64>> = entries
            .iter()
            .zip(&states)
            .map(|(e, s)| match (e, s, ctx.slots) {
                (Polled::Component(i, j), Readiness::Ready, Some(m)) => {
                    readback::observe(pending[*i].components[*j].seq, m)
                }
                _ => None,
            })
            .collect();

        // Arrays seen signaled while a component was still seen pending.
        for (k, (e, s)) in entries.iter().zip(&states).enumerate() {
            let Polled::Merged(i) = *e else { continue };
            if *s != Readiness::Ready {
                continue;
            }
            let unsignaled: Vec<u64> = entries[k + 1..]
                .iter()
                .zip(&states[k + 1..])
                .filter_map(|(e, s)| match e {
                    Polled::Component(ci, j) if *ci == i && *s == Readiness::Pending => {
                        Some(pending[i].components[*j].seq)
                    }
                    _ => None,
                })
                .collect();
            if !unsignaled.is_empty() {
                report.violations += 1;
                if report.violations <= MAX_VIOLATIONS_LOGGED {
                    eprintln!(
                        "fence-hammer: {}: violation #{}: array {} seen signaled while its fence(s) {unsignaled:?} were not",
                        ctx.label, report.violations, pending[i].id
                    );
                }
            }
        }

        for ((e, s), slot_value) in entries.iter().zip(states).zip(slot_values) {
            match *e {
                Polled::Merged(i) => {
                    if s != Readiness::Pending {
                        pending[i].seen_ns = Some(seen_ns);
                    }
                    if let Readiness::Failed(revents) = s {
                        out.violation(format!(
                            "array {}: poll revents {revents:#x} without POLLIN",
                            pending[i].id
                        ));
                    }
                }
                Polled::Component(i, j) => {
                    let expired = polled_at >= pending[i].deadline;
                    let c = &mut pending[i].components[j];
                    match s {
                        Readiness::Pending if expired => {
                            c.done = true;
                            out.counts.timeouts += 1;
                            stuck = true;
                            out.note_error(format!(
                                "fence #{}: not signaled {} ms after submission",
                                c.seq,
                                p.timeout.as_millis()
                            ));
                        }
                        Readiness::Pending => {}
                        Readiness::Failed(revents) => {
                            c.done = true;
                            out.counts.errors += 1;
                            out.note_error(format!(
                                "fence #{}: poll revents {revents:#x} without POLLIN",
                                c.seq
                            ));
                        }
                        Readiness::Ready => {
                            c.done = true;
                            match files.info(c.fence.as_fd()) {
                                Ok(info) => {
                                    let ts = info.fences.first().map_or(0, |f| f.timestamp_ns);
                                    if info.status != Status::Active {
                                        c.signaled_ns = Some(if ts != 0 { ts } else { seen_ns });
                                    }
                                    let rtt = polled_at.duration_since(c.submitted_at);
                                    let slot = ctx.slots.map(|_| slot_value);
                                    tally_signaled(
                                        ctx.label,
                                        &mut out,
                                        c.seq,
                                        info.status,
                                        rtt,
                                        slot,
                                    );
                                }
                                Err(e) => {
                                    out.counts.errors += 1;
                                    out.note_error(format!("fence #{}: {e}", c.seq));
                                }
                            }
                        }
                    }
                }
            }
        }

        // Retire finished arrays; an array whose components all signaled
        // but which itself did not by its deadline was lost.
        pending.retain(|a| {
            if a.done() {
                let last = a
                    .components
                    .iter()
                    .map(|c| c.signaled_ns)
                    .collect::<Option<Vec<_>>>();
                match (last.and_then(|v| v.into_iter().max()), a.seen_ns) {
                    // The array waited for its last component.
                    (Some(last), Some(seen)) if last > a.merged_ns => {
                        lags_ns.push(seen.saturating_sub(last))
                    }
                    (Some(_), Some(_)) => merged_signaled += 1,
                    _ => {}
                }
                return false;
            }
            let expired = polled_at >= a.deadline && a.components.iter().all(|c| c.done);
            if expired {
                if a.components.iter().all(|c| c.signaled_ns.is_some()) {
                    out.violation(format!(
                        "array {}: every fence signaled, the merged sync_file did not within {} ms",
                        a.id,
                        p.timeout.as_millis()
                    ));
                }
                return false;
            }
            true
        });
    }

    out.elapsed = start.elapsed();
    report.lag_us = RttUs::from_ns(&lags_ns);
    eprintln!(
        "fence-hammer: {}: {}; {merged_signaled} arrays merged from fences all signaled already (no lag)",
        ctx.label,
        report.one_line()
    );
    out.array_order = Some(report);
    Ok(out)
}

/// `SYNC_IOC_MERGE` of all of `fences` (of one fence: with itself).
pub fn merge_all(
    files: &dyn super::SyncFiles,
    fences: &[BorrowedFd<'_>],
) -> std::io::Result<OwnedFd> {
    let (first, rest) = fences
        .split_first()
        .ok_or_else(|| std::io::Error::other("nothing to merge"))?;
    let (second, rest) = rest.split_first().unwrap_or((first, &[]));
    let mut merged = files.merge(*first, *second, "array-order")?;
    for fence in rest {
        merged = files.merge(merged.as_fd(), *fence, "array-order")?;
    }
    Ok(merged)
}

/// Logs what the first merged sync_file holds.
fn log_merged(
    label: &str,
    files: &dyn super::SyncFiles,
    merged: BorrowedFd<'_>,
    merged_fences: usize,
) {
    match files.info(merged) {
        Ok(info) => eprintln!(
            "fence-hammer: {label}: first array: {merged_fences} fences merged, the sync_file holds {} (timelines {:?})",
            info.fences.len(),
            info.fences
                .iter()
                .map(|f| f.timeline.as_str())
                .collect::<Vec<_>>()
        ),
        Err(e) => eprintln!("fence-hammer: {label}: first array: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::readback::SlotMap;
    use crate::readback::tests::FakeSlots;
    use crate::workloads::Params;
    use crate::workloads::fake::{FakeGpu, FakeLanes, Ticker};
    use std::sync::Arc;
    use std::time::Duration;

    fn params(fences: u64, width: usize) -> Params {
        Params {
            fences,
            merge_width: width,
            inflight: 8,
            timeout: Duration::from_secs(5),
            ..Params::default()
        }
    }

    fn order(lanes: &FakeLanes, slots: Option<&FakeSlots>, p: Params) -> Outcome {
        let mut unused = FakeGpu::in_order();
        let mut ctx = lanes.context(&mut unused, slots, p, "array-test");
        run(&mut ctx).unwrap()
    }

    /// A GPU whose signal timestamps are real CLOCK_MONOTONIC times, 1 ms
    /// before they are read.
    fn monotonic_gpu() -> FakeGpu {
        let mut gpu = FakeGpu::new(Box::new(|_| vec![]));
        gpu.timestamp = Box::new(|_| sync_file::monotonic_ns() - 1_000_000);
        gpu
    }

    #[test]
    fn arrays_share_out_the_fences() {
        assert_eq!(array_sizes(10, 4).collect::<Vec<_>>(), [4, 4, 2]);
        assert_eq!(array_sizes(8, 4).collect::<Vec<_>>(), [4, 4]);
        assert_eq!(array_sizes(1, 4).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn sound_arrays_signal_after_their_components() {
        let memory = Arc::new(FakeSlots::new(2, SlotMap::for_fences(18)));
        let mut gpu = monotonic_gpu();
        gpu.memory = Some(memory.clone());
        let lanes = FakeLanes::new(gpu);
        let _device = Ticker::start(&lanes, Duration::from_millis(2));
        let o = order(&lanes, Some(&memory), params(18, 4));
        assert!(o.ok(), "{o:?}");
        assert_eq!((o.counts.submitted, o.counts.signaled), (18, 18));
        assert_eq!(o.premature.checks, 18);
        let r = o.array_order.unwrap();
        assert_eq!((r.arrays, r.components, r.violations), (5, 18, 0));
        // Lag: about the 1 ms the timestamps lie in the past.
        assert!(r.lag_us.p50.unwrap() >= 900, "{r:?}");
        assert!(r.lag_us.max.unwrap() < 5_000_000, "{r:?}");
        // Each array of 4 merged its fences one at a time; the last holds 2.
        let gpu = lanes.gpu();
        let sizes: Vec<usize> = gpu.merged.iter().map(|m| m.components.len()).collect();
        assert_eq!(sizes, [2, 3, 4, 2, 3, 4, 2, 3, 4, 2, 3, 4, 2]);
    }

    #[test]
    fn arrays_of_fences_signaled_before_the_merge_have_no_lag() {
        let mut gpu = FakeGpu::in_order();
        gpu.timestamp = Box::new(|_| 1);
        let lanes = FakeLanes::new(gpu);
        let o = order(&lanes, None, params(8, 4));
        assert!(o.ok(), "{o:?}");
        let r = o.array_order.unwrap();
        assert_eq!((r.arrays, r.violations), (2, 0));
        assert_eq!(r.lag_us, RttUs::default());
    }

    #[test]
    fn an_array_signaled_before_a_component_is_a_finding() {
        let mut gpu = monotonic_gpu();
        gpu.early_arrays = true;
        let lanes = FakeLanes::new(gpu);
        let _device = Ticker::start(&lanes, Duration::from_millis(15));
        let o = order(&lanes, None, params(6, 2));
        let r = o.array_order.unwrap();
        assert_eq!(r.arrays, 3);
        assert_eq!(r.violations, 3, "each array fired with its first fence");
        assert!(o.ok(), "violations are findings: {o:?}");
        assert_eq!(o.counts.signaled, 6);
    }

    #[test]
    fn a_lost_component_times_out() {
        // Only the fake's first three fences ever signal.
        let lanes = FakeLanes::new(FakeGpu::new(Box::new(|s| {
            if s == 2 { vec![0, 1, 2] } else { vec![] }
        })));
        let p = Params {
            timeout: Duration::from_millis(100),
            inflight: 4,
            ..params(8, 4)
        };
        let o = order(&lanes, None, p);
        assert_eq!(o.counts.signaled, 3);
        assert_eq!(o.counts.timeouts, 1);
        assert_eq!(o.counts.submitted, 4, "no new array after a timeout");
        assert!(!o.ok());
        assert_eq!(o.array_order.unwrap().violations, 0);
    }
}
