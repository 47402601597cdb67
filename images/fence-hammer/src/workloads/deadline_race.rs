//! `deadline-race`: `SYNC_IOC_SET_DEADLINE` in a tight loop against
//! signaling.
//!
//! The submitter is the fence [`pipeline`](super::pipeline) on the
//! workload's node (every check of `smoke` applies). It sets one deadline,
//! "now", on each out-fence right after submitting it, while the fence is
//! surely still in flight: the setter thread alone may reach hardly any
//! fence before it signals when the guest scheduler runs it late (seen
//! under TCG: 48 of 1000 fences in a run of 2.3 s, and none at all in
//! another), and then the driver and the device see no deadline at all.
//! Beside it, a setter thread gets a duplicate of every out-fence as it is
//! submitted and sweeps over all it holds, without pause: each sweep sets a
//! deadline on each fence — now, or a little in the past or the future,
//! varied from call to call ([`OFFSETS_NS`]) — so that deadlines land while
//! the fence is being signaled. A fence the setter saw signaled (poll, just before its call)
//! gets that one last deadline, on purpose — a deadline reaching a signaled
//! fence is a case drivers must handle — and is dropped; so is one whose
//! `--timeout-ms` has passed (the pipeline reports it).
//!
//! Counted: deadlines set, those set at submission, those set on fences
//! already seen signaled, and failed ioctls (a SET_DEADLINE on a valid
//! sync_file cannot fail: each breaks the run). On fencelab_drm the
//! driver's own counts of hints sent to the device and dropped are read
//! from its debugfs file at the end.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use fencelab_report::DeadlineRaceReport;

use super::{Context, SyncFiles, Workload};
use crate::fencelab_debugfs;
use crate::report::Outcome;
use crate::sync_file::{self, Readiness};

pub const WORKLOAD: Workload = Workload {
    name: "deadline-race",
    summary: "SYNC_IOC_SET_DEADLINE in a tight loop on every in-flight fence, racing its signal",
    run,
};

/// Deadlines relative to now, in turn: now, in the past, in the future.
pub const OFFSETS_NS: [i64; 6] = [0, -1_000_000, 100_000, -50_000, 1_000_000, 10_000];

/// A fence the setter holds.
struct Held {
    seq: u64,
    fence: OwnedFd,
    expires: Instant,
}

/// What the setter did.
#[derive(Debug, Default)]
struct Setter {
    report: DeadlineRaceReport,
    first_error: Option<String>,
}

fn run(ctx: &mut Context<'_>) -> anyhow::Result<Outcome> {
    let files = ctx.sync_files;
    let timeout = ctx.params.timeout;
    let (tx, rx) = mpsc::channel::<Held>();
    let mut at_submit = Setter::default();
    let (mut out, setter) = std::thread::scope(|scope| {
        let setter = scope.spawn(move || set_deadlines(rx, files));
        let mut dup_failures = Vec::new();
        let mut hand_over = |seq: u64, fence: BorrowedFd<'_>| {
            at_submit.set(files, seq, fence, 0, false);
            match fence.try_clone_to_owned() {
                Ok(fence) => {
                    // The setter only ends once every sender is gone.
                    let _ = tx.send(Held {
                        seq,
                        fence,
                        expires: Instant::now() + timeout,
                    });
                }
                Err(e) => {
                    dup_failures.push(format!("fence #{seq}: dup for the deadline setter: {e}"))
                }
            }
        };
        let fences = ctx.params.fences;
        let mut out = ctx.pipeline().run(0..fences, &mut hand_over);
        drop(tx);
        for e in dup_failures {
            out.violation(e);
        }
        let setter = setter.join().unwrap_or_else(|_| Setter {
            first_error: Some("the deadline setter thread panicked".into()),
            ..Setter::default()
        });
        (out, setter)
    });
    let r = DeadlineRaceReport {
        deadlines_set: at_submit.report.deadlines_set + setter.report.deadlines_set,
        set_at_submit: at_submit.report.deadlines_set,
        set_after_signal: setter.report.set_after_signal,
        set_errors: at_submit.report.set_errors + setter.report.set_errors,
        // Absent on virtio_gpu (and on the test host): `None`.
        driver: fencelab_debugfs::read_totals(),
    };
    eprintln!("fence-hammer: {}: {}", ctx.label, r.one_line());
    if let Some(e) = at_submit.first_error.or(setter.first_error) {
        out.violation(format!(
            "{e} ({} of {} SET_DEADLINE calls failed)",
            r.set_errors,
            r.set_errors + r.deadlines_set
        ));
    }
    out.deadline_race = Some(r);
    Ok(out)
}

impl Setter {
    /// Sets a deadline `offset_ns` from now on `fence` (`signaled`: it was
    /// seen signaled just before) and counts the call.
    fn set(
        &mut self,
        files: &dyn SyncFiles,
        seq: u64,
        fence: BorrowedFd<'_>,
        offset_ns: i64,
        signaled: bool,
    ) {
        let deadline = sync_file::monotonic_ns().saturating_add_signed(offset_ns);
        match files.set_deadline(fence, deadline) {
            Ok(()) => {
                self.report.deadlines_set += 1;
                self.report.set_after_signal += u64::from(signaled);
            }
            Err(e) => {
                self.report.set_errors += 1;
                self.first_error
                    .get_or_insert_with(|| format!("fence #{seq}: SYNC_IOC_SET_DEADLINE: {e}"));
            }
        }
    }
}

/// The setter thread: sweeps over the fences it holds until the submitter
/// is done and every fence has signaled or expired.
fn set_deadlines(rx: Receiver<Held>, files: &dyn SyncFiles) -> Setter {
    let mut s = Setter::default();
    let mut held: Vec<Held> = Vec::new();
    let mut turn = 0usize;
    loop {
        if held.is_empty() {
            match rx.recv() {
                Ok(h) => held.push(h),
                Err(_) => break,
            }
        }
        while let Ok(h) = rx.try_recv() {
            held.push(h);
        }
        let now = Instant::now();
        held.retain(|h| {
            let signaled = matches!(
                sync_file::poll_in(&[h.fence.as_fd()], Duration::ZERO).map(|r| r[0]),
                Ok(Readiness::Ready)
            );
            let offset = OFFSETS_NS[turn % OFFSETS_NS.len()];
            turn += 1;
            s.set(files, h.seq, h.fence.as_fd(), offset, signaled);
            !signaled && now < h.expires
        });
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::Params;
    use crate::workloads::fake::{FakeGpu, FakeLanes};

    fn race(lanes: &FakeLanes, p: Params) -> Outcome {
        let mut source = lanes.source();
        let mut ctx = lanes.context(&mut source, None, p, "deadline-test");
        run(&mut ctx).unwrap()
    }

    fn params(fences: u64, timeout_ms: u64) -> Params {
        Params {
            fences,
            inflight: 4,
            timeout: Duration::from_millis(timeout_ms),
            ..Params::default()
        }
    }

    #[test]
    fn pending_fences_get_deadlines_until_they_signal_then_one_more() {
        // Fence n signals when fence n + 3 is submitted: the last three
        // never do, and get deadlines until their timeout.
        let lanes = FakeLanes::new(FakeGpu::new(Box::new(|s| {
            s.checked_sub(3).into_iter().collect()
        })));
        let o = race(&lanes, params(20, 200));
        let r = o.deadline_race.unwrap();
        assert_eq!(o.counts.signaled, 17);
        assert_eq!(o.counts.timeouts, 3);
        assert_eq!(r.set_after_signal, 17, "one deadline after each signal");
        assert_eq!(r.set_at_submit, 20, "one at each submission");
        assert!(
            r.deadlines_set > r.set_after_signal + 3,
            "pending fences get many: {r:?}"
        );
        assert_eq!(r.set_errors, 0);
        assert_eq!(lanes.gpu().deadline_calls, r.deadlines_set);
        assert_eq!(o.violations, 0);
    }

    #[test]
    fn every_fence_gets_a_deadline_and_the_run_passes() {
        let lanes = FakeLanes::new(FakeGpu::in_order());
        let o = race(&lanes, params(50, 5_000));
        let r = o.deadline_race.unwrap();
        assert!(o.ok(), "{o:?}");
        assert_eq!(r.set_at_submit, 50, "one each from the submitter");
        assert_eq!(
            r.deadlines_set, 100,
            "signaled at once: one more each from the setter"
        );
        assert_eq!(r.set_after_signal, 50);
        assert_eq!(r.driver, None, "no fencelab_drm debugfs file here");
    }

    #[test]
    fn failed_ioctls_are_counted_and_break_the_run() {
        let mut gpu = FakeGpu::in_order();
        gpu.deadline_error = Some(libc::EINVAL);
        let lanes = FakeLanes::new(gpu);
        let o = race(&lanes, params(10, 5_000));
        let r = o.deadline_race.unwrap();
        assert_eq!((r.deadlines_set, r.set_errors), (0, 20));
        assert!(!o.ok());
        let err = o.first_error.unwrap();
        assert!(
            err.contains("fence #0: SYNC_IOC_SET_DEADLINE") && err.contains("20 of 20"),
            "{err}"
        );
    }

    #[test]
    fn offsets_reach_both_sides_of_now() {
        assert!(OFFSETS_NS.contains(&0));
        assert!(OFFSETS_NS.iter().any(|o| *o < 0));
        assert!(OFFSETS_NS.iter().any(|o| *o > 0));
    }
}
