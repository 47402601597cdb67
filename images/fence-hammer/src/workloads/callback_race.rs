//! `callback-vs-release`: poll waiters, merges and early closes racing the
//! final `dma_fence_put` of a fence against its signal callbacks.
//!
//! Per fence (submitted on two lanes in turn, so that consecutive fences
//! are on different timelines — a real `dma_fence_array` on fencelab_drm):
//! each of `--waiters` threads gets a sync_file of its own, a
//! `SYNC_IOC_MERGE` of the fence with the previous one (another fence in
//! flight; the first fence is merged with itself), and polls it. Once the
//! next fence has been merged with it, the fence's own out-fence fd is
//! closed — while its fence is usually still pending and the waiters still
//! poll the merged ones (counted as early closes). A waiter that sees its
//! merged sync_file signaled reads it with FILE_INFO and closes it at once,
//! so the last reference of the array, and with it of the fence, is
//! dropped right as the signal's callbacks run.
//!
//! Checked: every merged sync_file signals (within `--timeout-ms` of its
//! fence's submission) with the right status — signaled only when none of
//! its fences is still active, an error only when one of its fences has
//! that error, success only when none has an error; and at the end, with
//! every fd closed and every thread joined, `/proc/self/fd` holds no more
//! entries than before the first submission. A fence counts as signaled
//! (or errored, by errno) with the status of the first merged sync_file of
//! it seen signaled, its round trip up to that moment, and its WRITE read
//! back then (virtio_gpu).

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use fencelab_report::CallbackRaceReport;

use super::pipeline::tally_signaled;
use super::{Context, SyncFiles, Workload};
use crate::readback::{self, SlotMemory};
use crate::report::Outcome;
use crate::sync_file::{self, FileInfo, Readiness, Status};

pub const WORKLOAD: Workload = Workload {
    name: "callback-vs-release",
    summary: "per fence: poll waiters on merged sync_files, its own fd closed early; every merged fence must signal right, no fd may leak",
    run,
};

/// How long a waiter blocks with nothing to wait for (it is woken anyway).
const IDLE_WAIT: Duration = Duration::from_secs(3600);
/// How much longer than `--timeout-ms` the collector waits for a waiter's
/// report before it gives up on the waiters.
const REPORT_GRACE: Duration = Duration::from_secs(10);

/// A merged sync_file handed to a waiter.
struct Job {
    seq: u64,
    merged: OwnedFd,
    expires: Instant,
}

/// What a waiter saw of one merged sync_file.
enum Seen {
    Signaled {
        info: Result<FileInfo, String>,
        at: Instant,
        slot_value: Option<u64>,
    },
    Failed(i16),
    Expired,
}

struct Report {
    seq: u64,
    seen: Seen,
}

/// A fence whose merged sync_files are being waited for.
struct Outstanding {
    submitted_at: Instant,
    expected: usize,
    reported: usize,
    counted: bool,
}

fn run(ctx: &mut Context<'_>) -> anyhow::Result<Outcome> {
    run_counting(ctx, &open_fds)
}

/// Open fds of this process: the entries of `/proc/self/fd` (less the one
/// reading it).
pub fn open_fds() -> io::Result<u64> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count() as u64 - 1)
}

/// An eventfd that wakes a waiter when it has a new job or should stop.
struct Wake(OwnedFd);

impl Wake {
    fn new() -> io::Result<Self> {
        // SAFETY: plain syscall without pointers.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: eventfd returned a new fd that we own.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ring(&self) {
        let one = 1u64;
        // SAFETY: writes the 8 bytes of `one`, a live u64, to our eventfd.
        // An eventfd write only fails when the counter would overflow, and
        // then a wake-up is pending anyway.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    fn clear(&self) {
        let mut n = 0u64;
        // SAFETY: reads at most 8 bytes into `n`, a live u64; non-blocking.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&raw mut n).cast(), 8) };
    }
}

fn run_counting(
    ctx: &mut Context<'_>,
    count_fds: &dyn Fn() -> io::Result<u64>,
) -> anyhow::Result<Outcome> {
    let p = ctx.params;
    let mut lanes = ctx.lanes.open(2)?;
    let files = ctx.sync_files;
    let slots = ctx.slots;
    let label = ctx.label;
    let slot_map = slots.map(|m| m.map());
    let baseline = count_fds().context("counting open fds (/proc/self/fd)")?;
    eprintln!(
        "fence-hammer: {label}: {} fences, {} poll waiters each, {} in flight; {baseline} fds open",
        p.fences, p.waiters, p.inflight
    );

    let mut out = Outcome::one_thread();
    let mut report = CallbackRaceReport::default();
    let wakes: Vec<Wake> = (0..p.waiters)
        .map(|_| Wake::new())
        .collect::<io::Result<_>>()
        .context("eventfd for the poll waiters")?;
    let start = Instant::now();
    std::thread::scope(|scope| {
        let (report_tx, reports) = mpsc::channel::<Report>();
        let mut jobs: Vec<Sender<Job>> = Vec::new();
        for wake in &wakes {
            let (tx, rx) = mpsc::channel::<Job>();
            let report_tx = report_tx.clone();
            scope.spawn(move || wait_merged(rx, wake, report_tx, files, slots));
            jobs.push(tx);
        }
        drop(report_tx);

        let mut outstanding: BTreeMap<u64, Outstanding> = BTreeMap::new();
        let mut previous: Option<(u64, OwnedFd)> = None;
        let mut next_seq = 0u64;
        let mut stuck = false;
        loop {
            while !stuck
                && next_seq < p.fences
                && outstanding.len() < p.inflight
                && slot_map.is_none_or(|m| m.is_free(next_seq, outstanding.keys().next().copied()))
            {
                let seq = next_seq;
                next_seq += 1;
                out.counts.submitted += 1;
                let command = readback::command(seq, p.work_ns, slots);
                let submitted_at = Instant::now();
                let fence = match lanes[(seq % 2) as usize].submit(&command) {
                    Ok(fence) => fence,
                    Err(e) => {
                        out.counts.errors += 1;
                        out.counts.submit_failures += 1;
                        out.note_error(format!("fence #{seq}: submission failed: {e}"));
                        continue;
                    }
                };
                let partner = previous.as_ref().map_or(fence.as_fd(), |(_, f)| f.as_fd());
                let mut sent = 0;
                for (waiter, wake) in jobs.iter().zip(&wakes) {
                    match files.merge(fence.as_fd(), partner, "callback-vs-release") {
                        Ok(merged) => {
                            report.merges += 1;
                            let job = Job {
                                seq,
                                merged,
                                expires: submitted_at + p.timeout,
                            };
                            if waiter.send(job).is_ok() {
                                wake.ring();
                                sent += 1;
                            }
                        }
                        Err(e) => out.violation(format!("fence #{seq}: SYNC_IOC_MERGE: {e}")),
                    }
                }
                if sent == 0 {
                    out.counts.errors += 1;
                    out.note_error(format!(
                        "fence #{seq}: no waiter got a merged sync_file of it"
                    ));
                } else {
                    outstanding.insert(
                        seq,
                        Outstanding {
                            submitted_at,
                            expected: sent,
                            reported: 0,
                            counted: false,
                        },
                    );
                }
                // The previous fence's fd has served as a partner: close it.
                if let Some((_, fence)) = previous.replace((seq, fence)) {
                    report.early_closes += u64::from(close_original(fence));
                }
            }
            if outstanding.is_empty() {
                if stuck || next_seq >= p.fences {
                    break;
                }
                continue;
            }

            let r = match reports.recv_timeout(p.timeout + REPORT_GRACE) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    let left = outstanding.values().filter(|o| !o.counted).count() as u64;
                    out.counts.errors += left;
                    out.violation(format!(
                        "the poll waiters stopped reporting; {left} fence(s) abandoned"
                    ));
                    break;
                }
            };
            let Some(o) = outstanding.get_mut(&r.seq) else {
                continue;
            };
            o.reported += 1;
            report.poll_waiters += 1;
            let first = !o.counted;
            o.counted = true;
            match r.seen {
                Seen::Signaled {
                    info,
                    at,
                    slot_value,
                } => match info {
                    Ok(info) => {
                        if let Some(why) = wrong_status(&info) {
                            out.violation(format!("fence #{}: merged sync_file {why}", r.seq));
                        }
                        if first {
                            let rtt = at.duration_since(o.submitted_at);
                            let slot = slots.map(|_| slot_value);
                            tally_signaled(label, &mut out, r.seq, info.status, rtt, slot);
                        }
                    }
                    Err(e) => {
                        out.counts.errors += u64::from(first);
                        out.note_error(format!("fence #{}: merged sync_file: {e}", r.seq));
                    }
                },
                Seen::Failed(revents) => {
                    out.counts.errors += u64::from(first);
                    out.note_error(format!(
                        "fence #{}: merged sync_file: poll revents {revents:#x} without POLLIN",
                        r.seq
                    ));
                }
                Seen::Expired => {
                    if first {
                        out.counts.timeouts += 1;
                        stuck = true;
                    }
                    out.violation(format!(
                        "fence #{}: a merged sync_file not signaled {} ms after submission",
                        r.seq,
                        p.timeout.as_millis()
                    ));
                }
            }
            if o.reported == o.expected {
                outstanding.remove(&r.seq);
            }
        }
        if let Some((_, fence)) = previous.take() {
            report.early_closes += u64::from(close_original(fence));
        }
        drop(jobs);
        for wake in &wakes {
            wake.ring();
        }
        // The scope joins the waiters.
    });
    drop(wakes);
    out.elapsed = start.elapsed();

    let end = count_fds().context("counting open fds (/proc/self/fd)")?;
    report.fds_leaked = end.saturating_sub(baseline);
    if report.fds_leaked > 0 {
        out.violation(format!(
            "{} fd(s) leaked: {baseline} open before the first submission, {end} after every fd was closed",
            report.fds_leaked
        ));
    }
    eprintln!("fence-hammer: {label}: {}", report.one_line());
    out.callbacks = Some(report);
    Ok(out)
}

/// Closes a fence's own out-fence fd; true when its fence was still
/// pending (an early close).
fn close_original(fence: OwnedFd) -> bool {
    let pending = matches!(
        sync_file::poll_in(&[fence.as_fd()], Duration::ZERO).map(|r| r[0]),
        Ok(Readiness::Pending)
    );
    drop(fence);
    pending
}

/// What is wrong with the status of a merged sync_file seen signaled, if
/// anything: it must not be active, nor hold an active fence; an error must
/// be one of its fences' errors, success needs none of them to have failed.
pub fn wrong_status(info: &FileInfo) -> Option<String> {
    let active: Vec<usize> = (0..info.fences.len())
        .filter(|&i| info.fences[i].status == Status::Active)
        .collect();
    let errors: Vec<i32> = info
        .fences
        .iter()
        .filter_map(|f| match f.status {
            Status::Error(e) => Some(e),
            _ => None,
        })
        .collect();
    match info.status {
        Status::Active => Some("polled ready, but FILE_INFO says active".into()),
        _ if !active.is_empty() => Some(format!(
            "signaled while its fence(s) {active:?} (of {}) are active",
            info.fences.len()
        )),
        Status::Error(e) if !errors.contains(&e) => Some(format!(
            "signaled with error {e}, which none of its fences has ({errors:?})"
        )),
        Status::Signaled if !errors.is_empty() => Some(format!(
            "signaled successfully though its fences have errors {errors:?}"
        )),
        _ => None,
    }
}

/// A poll waiter: waits for the merged sync_files it is given, reads each
/// as soon as it is signaled and closes it at once.
fn wait_merged(
    jobs: Receiver<Job>,
    wake: &Wake,
    reports: Sender<Report>,
    files: &dyn SyncFiles,
    slots: Option<&dyn SlotMemory>,
) {
    let mut held: Vec<Job> = Vec::new();
    let mut open = true;
    loop {
        loop {
            match jobs.try_recv() {
                Ok(job) => held.push(job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if !open && held.is_empty() {
            return;
        }
        let now = Instant::now();
        let wait = held
            .iter()
            .map(|j| j.expires.saturating_duration_since(now))
            .min()
            .unwrap_or(IDLE_WAIT);
        let fds: Vec<BorrowedFd<'_>> = std::iter::once(wake.0.as_fd())
            .chain(held.iter().map(|j| j.merged.as_fd()))
            .collect();
        let states = match sync_file::poll_in(&fds, wait) {
            Ok(states) => states,
            Err(_) => {
                // Cannot wait: report what it holds as failed.
                drop(fds);
                for job in held.drain(..) {
                    let _ = reports.send(Report {
                        seq: job.seq,
                        seen: Seen::Failed(0),
                    });
                }
                continue;
            }
        };
        drop(fds);
        let at = Instant::now();
        if states[0] != Readiness::Pending {
            wake.clear();
        }
        let mut i = 0;
        held.retain(|job| {
            i += 1;
            let seen = match states[i] {
                Readiness::Ready => {
                    let slot_value = slots.and_then(|m| readback::observe(job.seq, m));
                    let info = files.info(job.merged.as_fd()).map_err(|e| e.to_string());
                    Seen::Signaled {
                        info,
                        at,
                        slot_value,
                    }
                }
                Readiness::Failed(revents) => Seen::Failed(revents),
                Readiness::Pending if at >= job.expires => Seen::Expired,
                Readiness::Pending => return true,
            };
            let _ = reports.send(Report { seq: job.seq, seen });
            false
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::readback::SlotMap;
    use crate::readback::tests::FakeSlots;
    use crate::sync_file::FenceInfo;
    use crate::workloads::Params;
    use crate::workloads::fake::{FakeGpu, FakeLanes, Ticker};
    use std::cell::Cell;
    use std::sync::Arc;

    fn params(fences: u64, waiters: usize, timeout_ms: u64) -> Params {
        Params {
            fences,
            waiters,
            inflight: 4,
            timeout: Duration::from_millis(timeout_ms),
            ..Params::default()
        }
    }

    fn race(
        lanes: &FakeLanes,
        slots: Option<&FakeSlots>,
        p: Params,
        count_fds: &dyn Fn() -> io::Result<u64>,
    ) -> Outcome {
        let mut unused = FakeGpu::in_order();
        let mut ctx = lanes.context(&mut unused, slots, p, "callback-test");
        run_counting(&mut ctx, count_fds).unwrap()
    }

    fn fence(status: Status) -> FenceInfo {
        FenceInfo {
            timeline: "t".into(),
            driver: "d".into(),
            status,
            flags: 0,
            timestamp_ns: 1,
        }
    }

    fn merged(status: Status, fences: &[Status]) -> FileInfo {
        FileInfo {
            name: "m".into(),
            status,
            fences: fences.iter().map(|s| fence(*s)).collect(),
        }
    }

    #[test]
    fn merged_status_must_follow_its_fences() {
        let (ok, active, eio) = (Status::Signaled, Status::Active, Status::Error(-libc::EIO));
        assert_eq!(wrong_status(&merged(ok, &[ok, ok])), None);
        assert_eq!(wrong_status(&merged(eio, &[ok, eio])), None);
        let why = |m| wrong_status(&m).expect("wrong");
        assert!(why(merged(active, &[ok, ok])).contains("FILE_INFO says active"));
        assert!(why(merged(ok, &[ok, active])).contains("fence(s) [1] (of 2) are active"));
        assert!(why(merged(eio, &[ok, ok])).contains("none of its fences has"));
        assert!(why(merged(ok, &[eio, ok])).contains("though its fences have errors"));
        let etime = Status::Error(-libc::ETIMEDOUT);
        assert!(why(merged(etime, &[eio, ok])).contains("error -110"));
    }

    #[test]
    fn every_merged_fence_is_waited_for_and_every_fd_closed() {
        let memory = Arc::new(FakeSlots::new(5, SlotMap::for_fences(30)));
        let mut gpu = FakeGpu::new(Box::new(|_| vec![]));
        gpu.memory = Some(memory.clone());
        let lanes = FakeLanes::new(gpu);
        let device = Ticker::start(&lanes, Duration::from_millis(2));
        let o = race(&lanes, Some(&memory), params(30, 3, 5_000), &|| Ok(7));
        drop(device);
        assert!(o.ok(), "{o:?}");
        assert_eq!((o.counts.submitted, o.counts.signaled), (30, 30));
        assert_eq!(o.premature.checks, 30);
        let r = o.callbacks.unwrap();
        assert_eq!((r.merges, r.poll_waiters, r.fds_leaked), (90, 90, 0));
        assert!(r.early_closes >= 1, "{r:?}");
        assert_eq!(o.threads, 1);
        let gpu = lanes.gpu();
        assert_eq!(
            gpu.readers_open(),
            0,
            "every fence and merged fd was closed"
        );
        // Each fence merged with the previous one (the first with itself).
        assert_eq!(gpu.merged[0].components, [0]);
        assert_eq!(gpu.merged[3].components, [1, 0]);
        assert_eq!(gpu.merged[89].components, [29, 28]);
    }

    #[test]
    fn a_leaked_fd_breaks_the_run() {
        let lanes = FakeLanes::new(FakeGpu::in_order());
        let calls = Cell::new(0);
        let count = || {
            calls.set(calls.get() + 1);
            Ok(if calls.get() == 1 { 10 } else { 12 })
        };
        let o = race(&lanes, None, params(5, 2, 5_000), &count);
        assert_eq!(o.callbacks.unwrap().fds_leaked, 2);
        assert!(!o.ok());
        assert!(o.first_error.unwrap().contains("2 fd(s) leaked"));
    }

    #[test]
    fn a_fence_that_never_signals_times_out_in_every_waiter() {
        // The fake's fence 2 never signals.
        let lanes = FakeLanes::new(FakeGpu::new(Box::new(|s| {
            if s == 2 { vec![] } else { vec![s] }
        })));
        let o = race(&lanes, None, params(6, 2, 150), &|| Ok(3));
        // Fence 2's two merges and fence 3's (with 2) never signal: fence
        // 3 is seen through them only, so it times out too.
        assert_eq!(o.counts.timeouts, 2);
        assert!(!o.ok());
        assert!(o.violations >= 2, "{o:?}");
        assert_eq!(lanes.gpu().readers_open(), 0);
    }
}
