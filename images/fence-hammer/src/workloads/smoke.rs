//! `smoke`: a few thousand `WORK{ns}` submissions on one timeline, at most
//! `--inflight` out-fences outstanding. Every fence must signal once,
//! without error, and in submission order (the upstream driver without
//! CONTEXT_INIT has one global fence timeline), never before its `WRITE`
//! landed. This is the fence [`pipeline`](super::pipeline) alone; its docs
//! say how fences are waited for and checked.

use super::{Context, Workload};
use crate::report::Outcome;

pub const WORKLOAD: Workload = Workload {
    name: "smoke",
    summary: "N fenced WORK submissions, all must signal in order",
    run,
};

fn run(ctx: &mut Context<'_>) -> anyhow::Result<Outcome> {
    let fences = ctx.params.fences;
    Ok(ctx.pipeline().run(0..fences, &mut |_, _| {}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::readback::SlotMap;
    use crate::readback::tests::FakeSlots;
    use crate::sync_file::{FileInfo, SyncFileError};
    use crate::workloads::fake::{FakeGpu, FakeLanes};
    use crate::workloads::{FenceSource, Params};
    use fencelab_stream::Op;
    use std::fs::File;
    use std::io::{self, Write};
    use std::os::fd::{BorrowedFd, OwnedFd};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    fn params(fences: u64, inflight: usize, timeout_ms: u64) -> Params {
        Params {
            fences,
            inflight,
            work_ns: 250,
            timeout: Duration::from_millis(timeout_ms),
            ..Params::default()
        }
    }

    fn run_on(gpu: &mut FakeGpu, p: Params) -> Outcome {
        let mut ctx = Context {
            source: gpu,
            slots: None,
            lanes: &FakeLanes::unused(),
            sync_files: &crate::sync_file::Kernel,
            params: p,
            label: "smoke-test",
        };
        run(&mut ctx).unwrap()
    }

    /// Runs with a write buffer of `slots` slots for resource 9.
    fn run_writing(gpu: &mut FakeGpu, p: Params, slots: u64) -> Outcome {
        let memory = Arc::new(FakeSlots::new(9, SlotMap::new(slots)));
        gpu.memory = Some(memory.clone());
        let mut ctx = Context {
            source: gpu,
            slots: Some(&*memory),
            lanes: &FakeLanes::unused(),
            sync_files: &crate::sync_file::Kernel,
            params: p,
            label: "smoke-test",
        };
        run(&mut ctx).unwrap()
    }

    #[test]
    fn every_fence_writes_its_value_and_is_read_back() {
        let mut gpu = FakeGpu::in_order();
        let o = run_writing(&mut gpu, params(300, 8, 5_000), 300);
        assert!(o.ok(), "{o:?}");
        assert_eq!(o.premature.checks, 300);
        assert_eq!(o.premature.premature, 0);
        for (seq, command) in gpu.commands.iter().enumerate() {
            let seq = seq as u64;
            assert_eq!(
                fencelab_stream::decode(command).unwrap(),
                [
                    Op::Work { ns: 250 },
                    Op::Write {
                        resource: 9,
                        offset: seq * 8,
                        value: seq + 1
                    }
                ]
            );
        }
    }

    #[test]
    fn a_fence_signaled_without_its_write_is_premature() {
        let mut gpu = FakeGpu::in_order();
        gpu.premature = [3, 7, 40].into();
        let o = run_writing(&mut gpu, params(50, 4, 5_000), 50);
        assert_eq!(o.counts.signaled, 50);
        assert_eq!(o.premature.checks, 50);
        assert_eq!(o.premature.premature, 3);
        assert_eq!(o.premature.first, vec![3, 7, 40]);
        assert!(o.ok(), "premature signals are findings, not errors");
        assert_eq!(o.first_error, None);
    }

    #[test]
    fn an_earlier_fence_signaled_by_a_later_completion_is_premature() {
        // What the upstream driver does: fence 5 "hangs" on the device, and
        // the completion of fence 6 signals it too, without its WRITE.
        let mut gpu = FakeGpu::new(Box::new(|seq| match seq {
            5 => vec![],
            6 => vec![5, 6],
            s => vec![s],
        }));
        gpu.premature = [5].into();
        let o = run_writing(&mut gpu, params(10, 4, 5_000), 10);
        assert!(o.ok(), "{o:?}");
        assert_eq!(
            (o.premature.premature, o.premature.first.clone()),
            (1, vec![5])
        );
    }

    #[test]
    fn slots_are_not_reused_while_their_fence_is_outstanding() {
        // Two slots, eight in flight allowed, fences signaled at once: if
        // fence n + 2 were submitted before fence n was read back, its
        // value would overwrite fence n's and fence n would look premature.
        let mut gpu = FakeGpu::in_order();
        let o = run_writing(&mut gpu, params(50, 8, 5_000), 2);
        assert!(o.ok(), "{o:?}");
        assert_eq!(o.premature.checks, 50);
        assert_eq!(o.premature.premature, 0, "{:?}", o.premature.first);
    }

    #[test]
    fn no_read_back_without_a_buffer() {
        let mut gpu = FakeGpu::in_order();
        let o = run_on(&mut gpu, params(20, 4, 5_000));
        assert_eq!(o.premature.checks, 0);
        assert!(
            gpu.commands
                .iter()
                .all(|c| fencelab_stream::decode(c).unwrap() == [Op::Work { ns: 250 }])
        );
    }

    #[test]
    fn in_order_fences_all_signal() {
        let mut gpu = FakeGpu::in_order();
        let o = run_on(&mut gpu, params(1_234, 8, 5_000));
        assert_eq!(o.counts.submitted, 1_234);
        assert_eq!(o.counts.signaled, 1_234);
        assert_eq!(
            (o.counts.errors, o.counts.timeouts, o.counts.out_of_order),
            (0, 0, 0)
        );
        assert!(o.ok());
        assert_eq!(o.rtt_ns.len(), 1_234);
        assert_eq!(o.first_error, None);
        assert_eq!(o.timeline_name.as_deref(), Some("signaled-timeline"));
        // Every submission carries exactly WORK{work_ns}.
        assert_eq!(gpu.commands.len(), 1_234);
        assert!(
            gpu.commands
                .iter()
                .all(|c| fencelab_stream::decode(c).unwrap() == [Op::Work { ns: 250 }])
        );
    }

    #[test]
    fn never_more_than_inflight_outstanding() {
        // Fence n is signaled only when fence n + 3 is submitted: with
        // inflight 3 the run deadlocks (and times out); with 4 it completes.
        let lagging = || FakeGpu::new(Box::new(|seq| seq.checked_sub(3).into_iter().collect()));
        let mut gpu = lagging();
        let o = run_on(&mut gpu, params(10, 3, 100));
        assert_eq!(o.counts.submitted, 3);
        assert_eq!(o.counts.timeouts, 3);
        assert!(!o.ok());

        let mut gpu = lagging();
        let o = run_on(&mut gpu, params(10, 4, 100));
        // The last three are never signaled by anyone.
        assert_eq!(o.counts.submitted, 10);
        assert_eq!(o.counts.signaled, 7);
        assert_eq!(o.counts.timeouts, 3);
        assert_eq!(o.counts.out_of_order, 0);
    }

    #[test]
    fn a_fence_overtaking_a_stuck_one_is_out_of_order() {
        // Fence 0 never signals; every other fence signals at once.
        let mut gpu = FakeGpu::new(Box::new(|seq| if seq == 0 { vec![] } else { vec![seq] }));
        let t0 = Instant::now();
        let o = run_on(&mut gpu, params(6, 3, 150));
        assert!(
            t0.elapsed() >= Duration::from_millis(140),
            "waited the timeout"
        );
        assert_eq!(o.counts.submitted, 6);
        assert_eq!(o.counts.signaled, 5);
        assert_eq!(o.counts.timeouts, 1);
        assert_eq!(o.counts.out_of_order, 5);
        assert!(o.first_error.unwrap().contains("fence #1 out of order"));
    }

    #[test]
    fn a_decreasing_signal_timestamp_is_out_of_order() {
        let mut gpu = FakeGpu::in_order();
        gpu.timestamp = Box::new(|seq| if seq == 3 { 5 } else { 1_000 + seq * 10 });
        let o = run_on(&mut gpu, params(10, 4, 5_000));
        assert_eq!(o.counts.signaled, 10);
        assert_eq!(o.counts.out_of_order, 1);
        let err = o.first_error.clone().unwrap();
        assert!(
            err.contains("fence #3 out of order") && err.contains("fence #2's 1020 ns"),
            "{err}"
        );
        assert!(!o.ok());
    }

    #[test]
    fn error_status_and_failed_submission_are_errors() {
        let mut gpu = FakeGpu::in_order();
        gpu.status.insert(2, -libc::EIO);
        gpu.fail_submit.insert(5);
        let o = run_on(&mut gpu, params(8, 2, 5_000));
        assert_eq!(o.counts.submitted, 8);
        assert_eq!(o.counts.signaled, 6);
        assert_eq!(o.counts.errors, 2);
        assert_eq!(o.counts.submit_failures, 1, "only fence 5's ioctl failed");
        assert_eq!(o.counts.out_of_order, 0);
        let err = o.first_error.clone().unwrap();
        assert!(err.starts_with("fence #2: signaled with error -5"), "{err}");
        assert_eq!(o.errors_by_errno["EIO"], 1);
        assert!(!o.ok());
    }

    #[test]
    fn a_stuck_timeline_stops_submission() {
        let mut gpu = FakeGpu::new(Box::new(|_| vec![]));
        let t0 = Instant::now();
        let o = run_on(&mut gpu, params(1_000, 4, 80));
        let took = t0.elapsed();
        assert_eq!(o.counts.submitted, 4);
        assert_eq!(o.counts.timeouts, 4);
        assert_eq!(o.counts.signaled, 0);
        assert!(
            took >= Duration::from_millis(75) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!(o.rtt_ns.len(), 0);
    }

    #[test]
    fn fences_signaled_later_are_waited_for() {
        // Fences are signaled from another thread, in order, 2 ms apart.
        let (tx, rx) = std::sync::mpsc::channel::<File>();
        let signaler = std::thread::spawn(move || {
            for mut w in rx {
                std::thread::sleep(Duration::from_millis(2));
                w.write_all(b"!").unwrap();
            }
        });
        struct Threaded {
            inner: FakeGpu,
            tx: Option<std::sync::mpsc::Sender<File>>,
        }
        impl FenceSource for Threaded {
            fn submit(&mut self, command: &[u8]) -> io::Result<OwnedFd> {
                let fd = self.inner.submit(command)?;
                let seq = self.inner.next - 1;
                let w = self.inner.writers[&seq].try_clone()?;
                self.inner.signaled.insert(seq);
                self.tx.as_ref().unwrap().send(w).unwrap();
                Ok(fd)
            }
            fn info(&mut self, fence: BorrowedFd<'_>) -> Result<FileInfo, SyncFileError> {
                self.inner.info(fence)
            }
        }
        let mut gpu = Threaded {
            inner: FakeGpu::new(Box::new(|_| vec![])),
            tx: Some(tx),
        };
        let mut ctx = Context {
            source: &mut gpu,
            slots: None,
            lanes: &FakeLanes::unused(),
            sync_files: &crate::sync_file::Kernel,
            params: params(20, 4, 5_000),
            label: "threaded",
        };
        let o = run(&mut ctx).unwrap();
        gpu.tx = None;
        signaler.join().unwrap();
        assert!(o.ok(), "{o:?}");
        assert_eq!(o.counts.signaled, 20);
        // Each waited at least the 2 ms the signaler slept for it.
        assert!(o.rtt_ns.iter().all(|&ns| ns >= 2_000_000), "{:?}", o.rtt_ns);
    }

    #[test]
    fn a_fence_whose_signal_changes_afterwards_signaled_twice() {
        // Fence 4's signal timestamp moves on its second read, as if it had
        // been signaled again; every other fence reads the same each time.
        let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = reads.clone();
        let mut gpu = FakeGpu::in_order();
        gpu.timestamp = Box::new(move |seq| {
            if seq == 4 {
                1_045 + seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            } else {
                1_000 + seq * 10
            }
        });
        let o = run_on(&mut gpu, params(12, 2, 5_000));
        assert_eq!(o.counts.signaled, 12);
        assert_eq!(o.violations, 1, "{:?}", o.first_error);
        assert!(
            reads.load(std::sync::atomic::Ordering::Relaxed) >= 2,
            "read twice"
        );
        let err = o.first_error.clone().unwrap();
        assert!(err.contains("fence #4 changed after it signaled"), "{err}");
        assert!(!o.ok());

        let mut gpu = FakeGpu::in_order();
        let o = run_on(&mut gpu, params(12, 2, 5_000));
        assert_eq!(o.violations, 0);
        assert!(o.ok());
    }
}
