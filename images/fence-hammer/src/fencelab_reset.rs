//! `reset` (`--driver fencelab`): unbinds the virtio-gpu device from
//! fencelab_drm through sysfs while fences are pending, and binds it again,
//! `--rounds` times: a device reset as the driver sees it, without unloading
//! the module.
//!
//! Each round: submit this round's share of `--fences` but a few (jobs go
//! to the `--timelines` in turn), count the fences still pending, write the
//! device's name to `/sys/bus/virtio/drivers/fencelab_drm/unbind` — with
//! the render node still open, so the DRM file outlives its device — then
//! every fence must have ended: signaled, or `-ENODEV` where the unbind cut
//! it off; none unsignaled (see [`fencelab_cutoff::settle`]). Then close
//! the node, write the name to `.../bind`, open the new node and submit the
//! round's last few fences (a quarter of the share, 1 to
//! [`AFTER_RESET_MAX`]): each must signal without error within
//! `--timeout-ms`.
//!
//! The device plan decides how many fences are still pending at each
//! unbind: `images/fence-hammer/plans/reset.toml` makes jobs take 100 ms to
//! 1 s.

use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use fencelab_report::ResetReport;
use fencelab_stream::{Op, encode};

use crate::fencelab::FencelabNode;
use crate::fencelab_cutoff::{self, Job, RoundsConfig};
use crate::fencelab_uapi as fl;
use crate::report::Outcome;
use crate::sync_file::{self, Readiness, Status};

pub const NAME: &str = "reset";
pub const SUMMARY: &str = "unbind the device from fencelab_drm (sysfs) with fences pending and bind it again, N rounds; pending fences must end -ENODEV or signaled, new fences must work after each rebind";

/// The driver's directory in sysfs: its `bind` and `unbind` files and a
/// link per bound device.
const DRIVER_DIR: &str = "/sys/bus/virtio/drivers/fencelab_drm";
/// Most fences of the submit/wait pass after each rebind.
pub const AFTER_RESET_MAX: u64 = 8;

/// How round `round`'s fences split: (pending at the unbind, after the
/// rebind). The rounds share `fences` as evenly as possible; every round
/// needs two.
pub fn split(fences: u64, rounds: u64, round: u64) -> (u64, u64) {
    let share = fencelab_cutoff::round_share(fences, rounds, round);
    let after = (share / 4)
        .clamp(1, AFTER_RESET_MAX)
        .min(share.saturating_sub(1));
    (share - after, after)
}

/// Runs the workload; returns its outcome (with its `reset` figures) and
/// the render node it used first.
pub fn run(cfg: &RoundsConfig) -> (Outcome, String) {
    let mut out = Outcome::one_thread();
    let mut report = ResetReport::default();
    let mut device = String::new();
    let start = Instant::now();
    let stream = encode(&[Op::Work { ns: cfg.work_ns }]);
    let result = (|| -> anyhow::Result<()> {
        let mut node = fencelab_cutoff::open_waiting(cfg.device.as_deref(), cfg.timelines)?;
        device = node.node().path().display().to_string();
        for round in 0..cfg.rounds {
            let label = format!("{NAME}: round {}/{}", round + 1, cfg.rounds);
            node = one_round(cfg, round, &label, node, &stream, &mut out, &mut report)
                .with_context(|| label.clone())?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        out.note_error(format!("{e:#}"));
        // The run stopped short: what was not submitted is not counted.
    }
    out.elapsed = start.elapsed();
    eprintln!("fence-hammer: {NAME}: {}", report.one_line());
    out.reset = Some(report);
    (out, device)
}

fn one_round(
    cfg: &RoundsConfig,
    round: u64,
    label: &str,
    node: FencelabNode,
    stream: &[u8],
    out: &mut Outcome,
    report: &mut ResetReport,
) -> anyhow::Result<FencelabNode> {
    let (cut, after) = split(cfg.fences, cfg.rounds, round);
    let ring = node.param(fl::PARAM_RING_SIZE)?;
    if cut > ring {
        anyhow::bail!(
            "{cut} fences per round do not fit the driver's ring of {ring} jobs: use more --rounds"
        );
    }
    let jobs = submit(&node, cut, stream, out, label);
    let pending = fencelab_cutoff::pending(&jobs)?;
    let virtio = bound_device()?;

    let unbind_started = Instant::now();
    sysfs_write("unbind", &virtio)?;
    let unbind_ms = unbind_started.elapsed().as_secs_f64() * 1e3;
    let settled = fencelab_cutoff::settle(label, "the unbind", &jobs, out)?;
    drop(jobs);
    // The DRM file outlived its device until here.
    drop(node);
    sysfs_write("bind", &virtio)?;
    let node = fencelab_cutoff::open_waiting(cfg.device.as_deref(), cfg.timelines)
        .context("the render node after the rebind")?;
    report.rounds += 1;
    report.pending_at_unbind += pending;
    report.cut_off += settled.cut_off;

    let jobs = submit(&node, after, stream, out, label);
    report.after_reset_fences += after;
    let ok = wait_all(&jobs, cfg.timeout, out, label)?;
    report.after_reset_ok += ok;
    eprintln!(
        "fence-hammer: {label}: {cut} fences, {pending} pending at the unbind ({unbind_ms:.1} ms): {} completed, {} cut off (-ENODEV); after the rebind {ok}/{after} fences ok",
        settled.completed, settled.cut_off
    );
    Ok(node)
}

/// Submits `n` jobs to the node's timelines in turn.
fn submit(node: &FencelabNode, n: u64, stream: &[u8], out: &mut Outcome, label: &str) -> Vec<Job> {
    let mut jobs = Vec::with_capacity(n as usize);
    for i in 0..n {
        out.counts.submitted += 1;
        let timeline = (i % u64::from(node.timelines())) as u32;
        let submitted_at = Instant::now();
        match node.submit_on(timeline, stream, None) {
            Ok(s) => jobs.push(Job {
                fence: s.fence,
                submitted_at,
                fence_id: s.fence_id,
                with_deadline: false,
            }),
            Err(e) => {
                out.counts.errors += 1;
                out.counts.submit_failures += 1;
                out.note_error(format!("{label}: fence {i}: SUBMIT failed: {e}"));
            }
        }
    }
    jobs
}

/// Waits for every job (each at most `timeout` after its submission); each
/// must signal without error. Returns how many did.
fn wait_all(jobs: &[Job], timeout: Duration, out: &mut Outcome, label: &str) -> io::Result<u64> {
    let mut ok = 0;
    for (i, job) in jobs.iter().enumerate() {
        let left = (job.submitted_at + timeout).saturating_duration_since(Instant::now());
        let what = format!(
            "{label}: after-reset fence {i} (device fence {})",
            job.fence_id
        );
        let state = sync_file::poll_in(&[job.fence.as_fd()], left).map_err(io::Error::other)?[0];
        if state != Readiness::Ready {
            out.counts.timeouts += 1;
            out.note_error(format!(
                "{what}: {state:?} {} ms after submission",
                timeout.as_millis()
            ));
            continue;
        }
        out.rtt_ns
            .push(job.submitted_at.elapsed().as_nanos() as u64);
        match sync_file::file_info(job.fence.as_fd()).map(|info| info.status) {
            Ok(Status::Signaled) => {
                ok += 1;
                out.counts.signaled += 1;
            }
            Ok(Status::Error(e)) => {
                out.counts.errors += 1;
                out.count_errno(e);
                out.note_error(format!("{what}: signaled with error {e}"));
            }
            Ok(Status::Active) => {
                out.counts.errors += 1;
                out.note_error(format!("{what}: poll says ready, FILE_INFO active"));
            }
            Err(e) => {
                out.counts.errors += 1;
                out.note_error(format!("{what}: {e}"));
            }
        }
    }
    Ok(ok)
}

/// The name of the virtio device fencelab_drm is bound to (`virtioN`).
fn bound_device() -> anyhow::Result<String> {
    bound_device_in(Path::new(DRIVER_DIR))
}

fn bound_device_in(dir: &Path) -> anyhow::Result<String> {
    let entries = std::fs::read_dir(dir).with_context(|| {
        format!(
            "cannot list {} (is fencelab_drm loaded? --driver fencelab)",
            dir.display()
        )
    })?;
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("virtio"))
        .collect();
    names.sort();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        [] => anyhow::bail!(
            "no virtio device is bound to fencelab_drm ({})",
            dir.display()
        ),
        many => anyhow::bail!(
            "{} virtio devices are bound to fencelab_drm ({many:?}); reset expects one",
            many.len()
        ),
    }
}

/// Writes `device` to the driver's `bind` or `unbind` file.
fn sysfs_write(file: &str, device: &str) -> anyhow::Result<()> {
    let path = Path::new(DRIVER_DIR).join(file);
    std::fs::write(&path, device).with_context(|| format!("writing {device} to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_share_the_fences_and_keep_some_for_after_the_rebind() {
        assert_eq!(split(2000, 50, 0), (32, 8));
        assert_eq!(split(600, 10, 3), (52, 8));
        assert_eq!(split(40, 10, 0), (3, 1));
        assert_eq!(
            split(21, 10, 0),
            (2, 1),
            "the first round gets the remainder"
        );
        assert_eq!(split(20, 10, 9), (1, 1));
        let total: u64 = (0..7).map(|r| split(100, 7, r)).map(|(a, b)| a + b).sum();
        assert_eq!(total, 100);
    }

    #[test]
    fn the_bound_device_is_found_by_name() {
        let dir = std::env::temp_dir().join(format!("fence-hammer-reset-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["bind", "unbind", "uevent", "module"] {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        let err = bound_device_in(&dir).unwrap_err().to_string();
        assert!(err.starts_with("no virtio device is bound"), "{err}");
        std::fs::write(dir.join("virtio1"), b"").unwrap();
        assert_eq!(bound_device_in(&dir).unwrap(), "virtio1");
        std::fs::write(dir.join("virtio0"), b"").unwrap();
        let err = bound_device_in(&dir).unwrap_err().to_string();
        assert!(err.contains("[\"virtio0\", \"virtio1\"]"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        let err = format!("{:#}", bound_device_in(&dir).unwrap_err());
        assert!(err.contains("is fencelab_drm loaded?"), "{err}");
    }
}
