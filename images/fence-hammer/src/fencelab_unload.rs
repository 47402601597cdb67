//! `unload-live` (`--driver fencelab`): unloads fencelab_drm while its fences
//! are pending and userspace holds their sync_files, then uses those
//! sync_files, again and again.
//!
//! Each of `--rounds` rounds: load the module (the init loaded it for the
//! first), create a context with `--timelines` timelines, submit this
//! round's share of `--fences` (jobs go to the timelines in turn; every
//! second one gets a deadline, `SYNC_IOC_SET_DEADLINE` 1 ms ahead, which the
//! driver forwards to the device), read the driver's debugfs totals, count
//! the fences still pending, close the render node and `rmmod` the module
//! (timed). Then every sync_file, its issuer gone, must still work: poll
//! reports it ready, `SYNC_IOC_FILE_INFO` reports it signaled, successfully
//! if the device completed the job, with `-ENODEV` if the unload cut it off.
//!
//! Counting: a fence signaled either way counts as signaled (its round trip
//! is from its submission to the poll after the unload); one signaled
//! with any other error counts as an error, one not signaled after the
//! unload as a timeout (both break the run). The device plan decides how
//! many fences are still pending at each unload (the xtask default plan for
//! this workload makes jobs take hundreds of milliseconds, reordered).
//!
//! The result line's `unload` object ([`UnloadReport`]) splits the signaled
//! fences into those the device completed and those the unload cut off,
//! with the pending counts at each `rmmod`, the `rmmod` and reload times and
//! the driver's own counters.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fencelab_report::{DriverTotals, MsPercentiles, PendingAtRmmod, UnloadReport};
use fencelab_stream::{Op, encode};

use crate::fencelab::FencelabNode;
use crate::fencelab_cutoff::{self, Job, RoundsConfig};
use crate::fencelab_debugfs;
use crate::fencelab_uapi as fl;
use crate::report::Outcome;
use crate::sync_file::{self, Readiness};

pub const NAME: &str = "unload-live";
pub const SUMMARY: &str = "rmmod fencelab_drm with fences pending and their sync_files open, N rounds; every fence must end signaled";

/// The module the workload unloads and loads.
const MODULE: &CStr = c"fencelab_drm";
/// How long `rmmod` may keep failing with `EAGAIN`/`EBUSY` (a DRM file
/// being released) before the round fails.
const UNLOAD_WAIT: Duration = Duration::from_secs(10);
/// How far ahead of submission the deadlines are set.
const DEADLINE_AHEAD: Duration = Duration::from_millis(1);

/// Figures of the whole run, printed at the end and reported as
/// [`UnloadReport`].
#[derive(Debug, Default)]
struct Figures {
    rounds: u64,
    completed: u64,
    cut_off: u64,
    /// Signaled with another error than `-ENODEV`, or FILE_INFO failed.
    other_errors: u64,
    /// Not signaled after the unload.
    unsignaled: u64,
    deadlines_set: u64,
    /// Fences pending at each `rmmod`.
    pending: Vec<u64>,
    unload_ms: Vec<f64>,
    /// `modprobe` to the first fence SUBMIT returned, rounds after the first.
    load_to_first_submit_ms: Vec<f64>,
    driver: DriverTotals,
}

impl Figures {
    fn report(&self) -> UnloadReport {
        UnloadReport {
            rounds: self.rounds,
            pending_at_rmmod: PendingAtRmmod {
                min: self.pending.iter().copied().min(),
                max: self.pending.iter().copied().max(),
                total: self.pending.iter().sum(),
            },
            completed_before_rmmod: self.completed,
            cut_off_enodev: self.cut_off,
            other_errors: self.other_errors,
            unsignaled_after_rmmod: self.unsignaled,
            deadlines_set: self.deadlines_set,
            rmmod_ms: MsPercentiles::from_ms(&self.unload_ms),
            load_to_first_submit_ms: MsPercentiles::from_ms(&self.load_to_first_submit_ms),
            driver: self.driver,
        }
    }
}

/// Runs the workload; returns its outcome (with its `unload` figures) and
/// the render node it used.
pub fn run(cfg: &RoundsConfig) -> (Outcome, String) {
    let mut out = Outcome::one_thread();
    let mut figures = Figures::default();
    let mut device = String::new();
    let start = Instant::now();
    let stream = encode(&[Op::Work { ns: cfg.work_ns }]);

    for round in 0..cfg.rounds {
        let share = fencelab_cutoff::round_share(cfg.fences, cfg.rounds, round);
        if let Err(e) = one_round(
            cfg,
            round,
            share,
            &stream,
            &mut out,
            &mut figures,
            &mut device,
        ) {
            out.note_error(format!("round {}/{}: {e:#}", round + 1, cfg.rounds));
            break;
        }
    }
    out.elapsed = start.elapsed();
    let report = figures.report();
    print_report(&report, &out);
    out.unload = Some(report);
    (out, device)
}

fn one_round(
    cfg: &RoundsConfig,
    round: u64,
    share: u64,
    stream: &[u8],
    out: &mut Outcome,
    figures: &mut Figures,
    device: &mut String,
) -> anyhow::Result<()> {
    let label = format!("{NAME}: round {}/{}", round + 1, cfg.rounds);
    let loaded_at = (round > 0).then(Instant::now);
    if loaded_at.is_some() {
        load()?;
    }
    let node = fencelab_cutoff::open_waiting(cfg.device.as_deref(), cfg.timelines)?;
    if device.is_empty() {
        *device = node.node().path().display().to_string();
    }
    let ring = node.param(fl::PARAM_RING_SIZE)?;
    if share > ring {
        anyhow::bail!(
            "{share} fences per round do not fit the driver's ring of {ring} jobs: use more --rounds"
        );
    }

    let mut jobs = Vec::with_capacity(share as usize);
    for i in 0..share {
        out.counts.submitted += 1;
        let timeline = (i % u64::from(node.timelines())) as u32;
        let submitted_at = Instant::now();
        match node.submit_on(timeline, stream, None) {
            Ok(submitted) => {
                if jobs.is_empty() {
                    if let Some(t) = loaded_at {
                        figures
                            .load_to_first_submit_ms
                            .push(t.elapsed().as_secs_f64() * 1e3);
                    }
                }
                let with_deadline = i % 2 == 0;
                if with_deadline {
                    let deadline = sync_file::monotonic_ns() + DEADLINE_AHEAD.as_nanos() as u64;
                    sync_file::set_deadline(submitted.fence.as_fd(), deadline)?;
                    figures.deadlines_set += 1;
                }
                if out.timeline_name.is_none() {
                    log_names(out, submitted.fence.as_fd(), submitted.seqno);
                }
                jobs.push(Job {
                    fence: submitted.fence,
                    submitted_at,
                    fence_id: submitted.fence_id,
                    with_deadline,
                });
            }
            Err(e) => {
                out.counts.errors += 1;
                out.counts.submit_failures += 1;
                out.note_error(format!("{label}: fence {i}: SUBMIT failed: {e}"));
            }
        }
    }

    match fencelab_debugfs::read_totals() {
        Some(t) => figures.driver.add(t),
        None => eprintln!(
            "fence-hammer: {label}: no driver totals in {}",
            fencelab_debugfs::TIMELINES
        ),
    }
    let fds: Vec<BorrowedFd<'_>> = jobs.iter().map(|j| j.fence.as_fd()).collect();
    let states = sync_file::poll_in(&fds, Duration::ZERO)?;
    drop(fds);
    let pending = states.iter().filter(|r| **r == Readiness::Pending).count() as u64;
    check_wait(&node, &jobs, &states, out, &label);

    // The DRM file holds a reference on the module: close it first.
    drop(node);
    let unload = unload()?;
    figures.unload_ms.push(unload.as_secs_f64() * 1e3);
    figures.rounds += 1;
    figures.pending.push(pending);

    let settled = fencelab_cutoff::settle(&label, "the unload", &jobs, out)?;
    drop(jobs);
    figures.completed += settled.completed;
    figures.cut_off += settled.cut_off;
    figures.other_errors += settled.other_errors;
    figures.unsignaled += settled.unsignaled;
    let (completed, cut_off) = (settled.completed, settled.cut_off);
    eprintln!(
        "fence-hammer: {label}: {share} fences, {pending} pending at rmmod; after: {completed} completed, {cut_off} cut off (-ENODEV); rmmod {:.1} ms",
        unload.as_secs_f64() * 1e3
    );
    Ok(())
}

/// `DRM_IOCTL_FENCELAB_WAIT` while the driver is loaded: on a fence poll
/// found signaled it returns at once, on a pending one with a zero timeout
/// it fails with `ETIME`.
fn check_wait(
    node: &FencelabNode,
    jobs: &[Job],
    states: &[Readiness],
    out: &mut Outcome,
    label: &str,
) {
    let first = |want: Readiness| jobs.iter().zip(states).find(|(_, s)| **s == want);
    if let Some((job, _)) = first(Readiness::Ready) {
        if let Err(e) = node.wait(job.fence.as_fd(), Duration::from_secs(1)) {
            out.counts.errors += 1;
            out.note_error(format!("{label}: WAIT on a signaled fence failed: {e}"));
        }
    }
    if let Some((job, _)) = first(Readiness::Pending) {
        match node.wait(job.fence.as_fd(), Duration::ZERO) {
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            // It may have signaled since the poll.
            Ok(_) => {}
            Err(e) => {
                out.counts.errors += 1;
                out.note_error(format!("{label}: WAIT(0) on a pending fence: {e}"));
            }
        }
    }
}

/// `modprobe fencelab_drm`.
fn load() -> anyhow::Result<()> {
    let module = MODULE.to_str().expect("ASCII");
    let status = Command::new("modprobe")
        .arg(module)
        .status()
        .map_err(|e| anyhow::anyhow!("running modprobe {module}: {e}"))?;
    if !status.success() {
        anyhow::bail!("modprobe {module} failed ({status})");
    }
    Ok(())
}

/// `delete_module("fencelab_drm", O_NONBLOCK)`, retried while the module is
/// busy; returns how long the successful call took.
fn unload() -> anyhow::Result<Duration> {
    let deadline = Instant::now() + UNLOAD_WAIT;
    loop {
        let started = Instant::now();
        // SAFETY: delete_module(2) takes a NUL-terminated module name and
        // flags; MODULE is a C string literal.
        let rc =
            unsafe { libc::syscall(libc::SYS_delete_module, MODULE.as_ptr(), libc::O_NONBLOCK) };
        let took = started.elapsed();
        if rc == 0 {
            if Path::new("/sys/module/fencelab_drm").exists() {
                anyhow::bail!(
                    "delete_module succeeded but /sys/module/fencelab_drm is still there"
                );
            }
            return Ok(took);
        }
        let err = io::Error::last_os_error();
        let busy = matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY));
        if !busy || Instant::now() >= deadline {
            anyhow::bail!("rmmod {}: {err}", MODULE.to_string_lossy());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Logs the names the first fence reports while its driver is loaded.
fn log_names(out: &mut Outcome, fence: BorrowedFd<'_>, seqno: u64) {
    if let Ok(info) = sync_file::file_info(fence) {
        if let Some(f) = info.fences.first() {
            eprintln!(
                "fence-hammer: {NAME}: first fence (seqno {seqno}): driver {:?}, timeline {:?}",
                f.driver, f.timeline
            );
            out.timeline_name = Some(f.timeline.clone());
        }
    }
}

/// The closing lines: the figures of the run.
fn print_report(r: &UnloadReport, out: &Outcome) {
    let ms = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
    eprintln!(
        "fence-hammer: {NAME}: {} rounds, {} fences ({} with deadlines): {} completed by the device, {} cut off by the unload (-ENODEV), {} other errors, {} unsignaled",
        r.rounds,
        out.counts.submitted,
        r.deadlines_set,
        r.completed_before_rmmod,
        r.cut_off_enodev,
        r.other_errors,
        r.unsignaled_after_rmmod
    );
    eprintln!(
        "fence-hammer: {NAME}: pending at rmmod min {} max {} total {}; rmmod ms p50 {} p99 {} max {}; load to first submit ms p50 {} max {}",
        r.pending_at_rmmod.min.unwrap_or(0),
        r.pending_at_rmmod.max.unwrap_or(0),
        r.pending_at_rmmod.total,
        ms(r.rmmod_ms.p50),
        ms(r.rmmod_ms.p99),
        ms(r.rmmod_ms.max),
        ms(r.load_to_first_submit_ms.p50),
        ms(r.load_to_first_submit_ms.max)
    );
    eprintln!(
        "fence-hammer: {NAME}: driver counted {} ordering violations, {} job timeouts, {} deadline hints sent, {} dropped (debugfs, before each unload)",
        r.driver.ordering_violations,
        r.driver.timeouts,
        r.driver.hints_sent,
        r.driver.hints_dropped
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_sums_the_rounds() {
        let f = Figures {
            rounds: 3,
            completed: 20,
            cut_off: 70,
            deadlines_set: 45,
            pending: vec![30, 12, 28],
            unload_ms: vec![4.0, 1.5, 2.25],
            load_to_first_submit_ms: vec![80.0, 60.0],
            driver: DriverTotals {
                ordering_violations: 5,
                ..DriverTotals::default()
            },
            ..Figures::default()
        };
        let r = f.report();
        assert_eq!(
            r.pending_at_rmmod,
            PendingAtRmmod {
                min: Some(12),
                max: Some(30),
                total: 70
            }
        );
        assert_eq!((r.rmmod_ms.p50, r.rmmod_ms.max), (Some(2.25), Some(4.0)));
        assert_eq!(r.load_to_first_submit_ms.p50, Some(60.0));
        assert_eq!(r.load_to_first_submit_ms.max, Some(80.0));
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["cut_off_enodev"], 70);
        assert_eq!(j["completed_before_rmmod"], 20);
        assert_eq!(j["unsignaled_after_rmmod"], 0);
        assert_eq!(j["driver"]["ordering_violations"], 5);
    }

    #[test]
    fn a_run_that_never_unloaded_reports_nulls_not_zeros() {
        let r = Figures::default().report();
        assert_eq!(r.rounds, 0);
        assert_eq!(r.pending_at_rmmod.min, None);
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["rmmod_ms"]["p50"], serde_json::Value::Null);
        assert_eq!(j["pending_at_rmmod"]["total"], 0);
    }
}
