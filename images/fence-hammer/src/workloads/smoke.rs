//! `smoke`: a few thousand `WORK{ns}` submissions, at most `--inflight`
//! out-fences outstanding. Every fence must signal, without error, and in
//! submission order (the upstream driver without CONTEXT_INIT has one global
//! fence timeline).
//!
//! Waiting: all outstanding out-fences are polled together, newest first
//! (see [`sync_file::poll_in`]), with the timeout of the oldest. Each pass
//! returns the set of signaled fences; on one timeline that set must be a
//! prefix of the outstanding fences in submission order. A fence that is
//! ready while an older one is not, or whose kernel signal timestamp is
//! earlier than an older fence's, counts as out of order. Ready fences are
//! read with SYNC_IOC_FILE_INFO and closed; a fence still unsignaled
//! `--timeout-ms` after its submission counts as timed out, and then no new
//! fence is submitted (the timeline is stuck; the outstanding ones still get
//! their full timeout).
//!
//! WRITE read-back (unless `--no-write`): each fence's stream also carries
//! a `WRITE` of its own value into its slot of the write buffer (see
//! [`crate::readback`]). The slots of the fences a poll pass found ready are
//! read right after that pass; a fence that then reads as signaled (without
//! error) but whose value is missing was signaled prematurely. Premature
//! signals are counted and listed, not treated as errors: the upstream
//! driver signals every earlier fence of its timeline whenever one
//! completes, so a device that completes out of order makes it signal fences
//! early, and measuring that is the point.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use super::{Context, Workload};
use crate::order::{TimestampOrder, ready_before_older};
use crate::readback;
use crate::report::Outcome;
use crate::sync_file::{self, Readiness, Status};

pub const WORKLOAD: Workload = Workload {
    name: "smoke",
    summary: "N fenced WORK submissions, all must signal in order",
    run,
};

/// Progress line every this many submissions.
const PROGRESS_EVERY: u64 = 500;

struct InFlight {
    seq: u64,
    fence: OwnedFd,
    submitted_at: Instant,
    deadline: Instant,
}

fn run(ctx: &mut Context<'_>) -> Outcome {
    let p = ctx.params;
    let slot_map = ctx.slots.map(|m| m.map());
    let mut out = Outcome::default();
    let mut ts_order = TimestampOrder::default();
    let mut queue: VecDeque<InFlight> = VecDeque::with_capacity(p.inflight);
    let mut next_seq = 0u64;
    let mut stuck = false;
    let start = Instant::now();

    loop {
        // Top up to `inflight` outstanding fences, never reusing the WRITE
        // slot of one still outstanding.
        while !stuck
            && next_seq < p.fences
            && queue.len() < p.inflight
            && slot_map.is_none_or(|m| m.is_free(next_seq, queue.front().map(|f| f.seq)))
        {
            let seq = next_seq;
            next_seq += 1;
            out.counts.submitted += 1;
            let command = readback::command(seq, p.work_ns, ctx.slots);
            let submitted_at = Instant::now();
            match ctx.source.submit(&command) {
                Ok(fence) => {
                    if seq == 0 {
                        log_live_names(ctx, fence.as_fd());
                    }
                    queue.push_back(InFlight {
                        seq,
                        fence,
                        submitted_at,
                        deadline: submitted_at + p.timeout,
                    });
                }
                Err(e) => {
                    out.counts.errors += 1;
                    out.counts.submit_failures += 1;
                    out.note_error(format!(
                        "fence #{seq}: DRM_IOCTL_VIRTGPU_EXECBUFFER failed: {e}"
                    ));
                }
            }
            if out.counts.submitted % PROGRESS_EVERY == 0 {
                ctx.progress(&out.counts);
            }
        }
        let Some(oldest_deadline) = queue.iter().map(|f| f.deadline).min() else {
            break;
        };

        // Wait for any of them; sample the newest first.
        let newest_first: Vec<BorrowedFd<'_>> =
            queue.iter().rev().map(|f| f.fence.as_fd()).collect();
        let wait = oldest_deadline.saturating_duration_since(Instant::now());
        let states = match sync_file::poll_in(&newest_first, wait) {
            Ok(mut s) => {
                s.reverse();
                s
            }
            Err(e) => {
                // Cannot wait any more: the outstanding fences end as errors.
                out.counts.errors += queue.len() as u64;
                out.note_error(format!("{e}; {} fence(s) abandoned", queue.len()));
                break;
            }
        };
        drop(newest_first);
        let polled_at = Instant::now();
        // Read the WRITE slots of the ready fences first: the sooner after
        // the signal, the smaller the chance that a late completion hides
        // a premature signal.
        let observed: Vec<Option<u64>> = queue
            .iter()
            .zip(&states)
            .map(|(f, state)| match (state, ctx.slots) {
                (Readiness::Ready, Some(m)) => readback::observe(f.seq, m),
                _ => None,
            })
            .collect();
        let ready: Vec<bool> = states.iter().map(|s| *s != Readiness::Pending).collect();
        let early = ready_before_older(&ready);

        let mut still = VecDeque::with_capacity(queue.len());
        for (((f, state), early), observed) in queue.drain(..).zip(states).zip(early).zip(observed)
        {
            match state {
                Readiness::Pending if polled_at >= f.deadline => {
                    out.counts.timeouts += 1;
                    out.note_error(format!(
                        "fence #{}: not signaled {} ms after submission",
                        f.seq,
                        p.timeout.as_millis()
                    ));
                    stuck = true;
                }
                Readiness::Pending => still.push_back(f),
                Readiness::Failed(revents) => {
                    out.counts.errors += 1;
                    out.note_error(format!(
                        "fence #{}: poll revents {revents:#x} without POLLIN",
                        f.seq
                    ));
                }
                Readiness::Ready => {
                    let seen = Seen {
                        polled_at,
                        signaled_before_older: early,
                        slot_value: observed,
                    };
                    complete(ctx, &mut out, &mut ts_order, f, seen)
                }
            }
        }
        queue = still;
    }

    out.elapsed = start.elapsed();
    ctx.progress(&out.counts);
    out
}

/// What the poll pass that found a fence ready saw of it.
struct Seen {
    polled_at: Instant,
    /// Ready while an older fence was not.
    signaled_before_older: bool,
    /// Its WRITE slot, read right after the pass (`None` without a buffer).
    slot_value: Option<u64>,
}

/// Reads a signaled fence, counts it and closes it.
fn complete(
    ctx: &mut Context<'_>,
    out: &mut Outcome,
    ts_order: &mut TimestampOrder,
    f: InFlight,
    seen: Seen,
) {
    let Seen {
        polled_at,
        signaled_before_older,
        slot_value,
    } = seen;
    let seq = f.seq;
    let info = match ctx.source.info(f.fence.as_fd()) {
        Ok(info) => info,
        Err(e) => {
            out.counts.errors += 1;
            out.note_error(format!("fence #{seq}: {e}"));
            return;
        }
    };
    let fence = info.fences.first();
    if out.timeline_name.is_none() {
        out.timeline_name = fence.map(|f| f.timeline.clone());
    }
    match info.status {
        Status::Signaled => {
            out.counts.signaled += 1;
            out.rtt_ns
                .push(polled_at.duration_since(f.submitted_at).as_nanos() as u64);
            if ctx.slots.is_some() && out.premature.record(seq, slot_value) {
                note_premature(ctx, out, seq, slot_value);
            }
        }
        Status::Error(errno) => {
            out.counts.errors += 1;
            out.note_error(format!(
                "fence #{seq}: signaled with error {errno} ({})",
                std::io::Error::from_raw_os_error(-errno)
            ));
        }
        Status::Active => {
            out.counts.errors += 1;
            out.note_error(format!(
                "fence #{seq}: poll reported POLLIN but SYNC_IOC_FILE_INFO status is 0 (active)"
            ));
        }
    }

    let mut why = Vec::new();
    if signaled_before_older {
        why.push("was signaled while an older fence was not".to_string());
    }
    if let Some(fence) = fence {
        if fence.status != Status::Active && fence.timestamp_ns != 0 {
            if let Some((older, older_ts)) = ts_order.check(seq, fence.timestamp_ns) {
                why.push(format!(
                    "signal timestamp {} ns is before fence #{older}'s {older_ts} ns",
                    fence.timestamp_ns
                ));
            }
        }
    }
    if !why.is_empty() {
        out.counts.out_of_order += 1;
        out.note_error(format!("fence #{seq} out of order: {}", why.join(", ")));
    }
    // `f.fence` is closed here.
}

/// Logs the first premature signals (they are findings, not errors).
fn note_premature(ctx: &Context<'_>, out: &Outcome, seq: u64, slot_value: Option<u64>) {
    let n = out.premature.premature;
    if n <= readback::MAX_PREMATURE_LISTED as u64 {
        let found = match slot_value {
            Some(0) => "nothing written yet".to_string(),
            Some(v) => format!("{v:#x}"),
            None => "an unreadable slot".to_string(),
        };
        eprintln!(
            "fence-hammer: {}: premature signal #{n}: fence #{seq} signaled, its WRITE slot holds {found}, not {:#x}",
            ctx.label,
            readback::SlotMap::value(seq)
        );
    }
}

/// The timeline and driver names of a live fence, for the log: once a fence
/// has signaled, Linux reports placeholder names for it instead.
fn log_live_names(ctx: &mut Context<'_>, fence: BorrowedFd<'_>) {
    match ctx.source.info(fence) {
        Ok(info) => match info.fences.first() {
            Some(f) => eprintln!(
                "fence-hammer: {}: first fence: sync_file {:?}, timeline {:?}, driver {:?}, status {:?}",
                ctx.label, info.name, f.timeline, f.driver, f.status
            ),
            None => eprintln!(
                "fence-hammer: {}: first fence: sync_file {:?} holds no fences",
                ctx.label, info.name
            ),
        },
        Err(e) => eprintln!("fence-hammer: {}: first fence: {e}", ctx.label),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::readback::SlotMap;
    use crate::readback::tests::FakeSlots;
    use crate::sync_file::{FenceInfo, FileInfo, SyncFileError};
    use crate::workloads::{FenceSource, Params};
    use fencelab_stream::Op;
    use std::collections::{HashMap, HashSet};
    use std::fs::File;
    use std::io::{self, Write};
    use std::os::fd::{AsRawFd, FromRawFd, RawFd};
    use std::rc::Rc;
    use std::time::Duration;

    type SignalPolicy = Box<dyn Fn(u64) -> Vec<u64>>;

    /// Fences made of pipes: a fence is signaled when a byte is written to
    /// its pipe. `on_submit(seq)` names the fences to signal right after
    /// fence `seq` is submitted.
    struct FakeGpu {
        on_submit: SignalPolicy,
        fail_submit: HashSet<u64>,
        status: HashMap<u64, i32>,
        timestamp: Box<dyn Fn(u64) -> u64>,
        writers: HashMap<u64, File>,
        by_fd: HashMap<RawFd, u64>,
        signaled: HashSet<u64>,
        next: u64,
        commands: Vec<Vec<u8>>,
        /// The write buffer: a fence's WRITEs land in it when it is
        /// signaled, unless the fence is in `premature`.
        memory: Option<Rc<FakeSlots>>,
        /// Fences signaled without their WRITEs (as a driver signaling a
        /// fence the device has not completed would).
        premature: HashSet<u64>,
    }

    impl FakeGpu {
        fn new(on_submit: SignalPolicy) -> Self {
            Self {
                on_submit,
                fail_submit: HashSet::new(),
                status: HashMap::new(),
                timestamp: Box::new(|seq| 1_000 + seq * 10),
                writers: HashMap::new(),
                by_fd: HashMap::new(),
                signaled: HashSet::new(),
                next: 0,
                commands: Vec::new(),
                memory: None,
                premature: HashSet::new(),
            }
        }

        fn in_order() -> Self {
            Self::new(Box::new(|seq| vec![seq]))
        }

        fn signal(&mut self, seq: u64) {
            if let Some(memory) = &self.memory {
                if !self.premature.contains(&seq) {
                    memory.apply(&self.commands[seq as usize]);
                }
            }
            if self.signaled.insert(seq) {
                self.writers
                    .get_mut(&seq)
                    .expect("signal a submitted fence")
                    .write_all(b"!")
                    .unwrap();
            }
        }
    }

    impl FenceSource for FakeGpu {
        fn submit(&mut self, command: &[u8]) -> io::Result<OwnedFd> {
            let seq = self.next;
            self.next += 1;
            self.commands.push(command.to_vec());
            if self.fail_submit.contains(&seq) {
                return Err(io::Error::from_raw_os_error(libc::ENOMEM));
            }
            let mut fds = [0; 2];
            // SAFETY: `fds` is a writable array of two ints.
            assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            // SAFETY: pipe2 succeeded; both fds are new and ours.
            let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
            self.writers.insert(seq, w);
            self.by_fd.insert(r.as_raw_fd(), seq);
            for s in (self.on_submit)(seq) {
                self.signal(s);
            }
            Ok(r)
        }

        fn info(&mut self, fence: BorrowedFd<'_>) -> Result<FileInfo, SyncFileError> {
            let seq = self.by_fd[&fence.as_raw_fd()];
            let signaled = self.signaled.contains(&seq);
            let raw = if signaled {
                *self.status.get(&seq).unwrap_or(&1)
            } else {
                0
            };
            let status = Status::from_raw(raw);
            Ok(FileInfo {
                name: format!("fake-{seq}"),
                status,
                fences: vec![FenceInfo {
                    timeline: if signaled {
                        "signaled-timeline"
                    } else {
                        "fake"
                    }
                    .into(),
                    driver: "fake".into(),
                    status,
                    flags: 0,
                    timestamp_ns: if signaled { (self.timestamp)(seq) } else { 0 },
                }],
            })
        }
    }

    fn params(fences: u64, inflight: usize, timeout_ms: u64) -> Params {
        Params {
            fences,
            inflight,
            work_ns: 250,
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    fn run_on(gpu: &mut FakeGpu, p: Params) -> Outcome {
        let mut ctx = Context {
            source: gpu,
            slots: None,
            params: p,
            label: "smoke-test",
        };
        run(&mut ctx)
    }

    /// Runs with a write buffer of `slots` slots for resource 9.
    fn run_writing(gpu: &mut FakeGpu, p: Params, slots: u64) -> Outcome {
        let memory = Rc::new(FakeSlots::new(9, SlotMap::new(slots)));
        gpu.memory = Some(memory.clone());
        let mut ctx = Context {
            source: gpu,
            slots: Some(&*memory),
            params: p,
            label: "smoke-test",
        };
        run(&mut ctx)
    }

    #[test]
    fn every_fence_writes_its_value_and_is_read_back() {
        let mut gpu = FakeGpu::in_order();
        let o = run_writing(&mut gpu, params(300, 8, 5_000), 300);
        assert!(o.counts.ok(), "{o:?}");
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
        assert!(o.counts.ok(), "premature signals are findings, not errors");
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
        assert!(o.counts.ok(), "{o:?}");
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
        assert!(o.counts.ok(), "{o:?}");
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
        assert!(o.counts.ok());
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
        assert!(!o.counts.ok());

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
        let err = o.first_error.unwrap();
        assert!(
            err.contains("fence #3 out of order") && err.contains("fence #2's 1020 ns"),
            "{err}"
        );
        assert!(!o.counts.ok());
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
        let err = o.first_error.unwrap();
        assert!(err.starts_with("fence #2: signaled with error -5"), "{err}");
        assert!(!o.counts.ok());
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
            params: params(20, 4, 5_000),
            label: "threaded",
        };
        let o = run(&mut ctx);
        gpu.tx = None;
        signaler.join().unwrap();
        assert!(o.counts.ok(), "{o:?}");
        assert_eq!(o.counts.signaled, 20);
        // Each waited at least the 2 ms the signaler slept for it.
        assert!(o.rtt_ns.iter().all(|&ns| ns >= 2_000_000), "{:?}", o.rtt_ns);
    }
}
