//! Fences whose driver went away: what `unload-live` (rmmod) and `reset`
//! (sysfs unbind) check once fencelab_drm has let go of its device. The
//! driver signals every pending fence `-ENODEV` when it unbinds, and the
//! sync_files userspace holds must keep working afterwards.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::fencelab::FencelabNode;
use crate::report::Outcome;
use crate::sync_file::{self, Readiness, Status};

/// How long to wait for the render node after a load or a bind.
pub const NODE_WAIT: Duration = Duration::from_secs(10);

/// What `unload-live` and `reset` are asked to do.
#[derive(Debug, Clone)]
pub struct RoundsConfig {
    pub device: Option<PathBuf>,
    pub fences: u64,
    pub rounds: u64,
    pub timelines: u32,
    pub work_ns: u64,
    /// How long a fence that must complete may take.
    pub timeout: Duration,
}

/// Fences of round `round` when `rounds` rounds share `fences` as evenly as
/// possible (the first `fences % rounds` rounds get one more).
pub fn round_share(fences: u64, rounds: u64, round: u64) -> u64 {
    fences / rounds + u64::from(round < fences % rounds)
}

/// One fence submitted before the driver let go.
pub struct Job {
    pub fence: OwnedFd,
    pub submitted_at: Instant,
    pub fence_id: u64,
    /// It was given a `SYNC_IOC_SET_DEADLINE` (named in messages).
    pub with_deadline: bool,
}

/// How the fences of [`settle`] ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Signaled successfully: the device completed them first.
    pub completed: u64,
    /// Signaled `-ENODEV`: the driver cut them off.
    pub cut_off: u64,
    /// Signaled with another error, or FILE_INFO failed.
    pub other_errors: u64,
    /// Not signaled.
    pub unsignaled: u64,
}

/// Checks every fence of `jobs` after `event` (e.g. "the unload"): poll
/// must report it ready and FILE_INFO signaled, successfully or `-ENODEV`
/// (both count as signaled in `out`, with the round trip from submission
/// to now; `-ENODEV` is also counted by errno). Another error counts as an
/// error, an unsignaled fence as a timeout. Fails only if poll(2) does.
pub fn settle(label: &str, event: &str, jobs: &[Job], out: &mut Outcome) -> io::Result<Settled> {
    let mut s = Settled::default();
    for (i, job) in jobs.iter().enumerate() {
        let what = format!(
            "{label}: fence {i} (device fence {}{})",
            job.fence_id,
            if job.with_deadline { ", deadline" } else { "" }
        );
        let state =
            sync_file::poll_in(&[job.fence.as_fd()], Duration::ZERO).map_err(io::Error::other)?[0];
        if state != Readiness::Ready {
            out.counts.timeouts += 1;
            s.unsignaled += 1;
            out.note_error(format!("{what}: poll says {state:?} after {event}"));
            continue;
        }
        out.rtt_ns
            .push(job.submitted_at.elapsed().as_nanos() as u64);
        let info = match sync_file::file_info(job.fence.as_fd()) {
            Ok(info) => info,
            Err(e) => {
                out.counts.errors += 1;
                s.other_errors += 1;
                out.note_error(format!("{what}: {e}"));
                continue;
            }
        };
        match info.status {
            Status::Signaled => {
                s.completed += 1;
                out.counts.signaled += 1;
            }
            Status::Error(e) if e == -libc::ENODEV => {
                s.cut_off += 1;
                out.counts.signaled += 1;
                out.count_errno(e);
            }
            Status::Error(e) => {
                out.counts.errors += 1;
                out.count_errno(e);
                s.other_errors += 1;
                out.note_error(format!(
                    "{what}: signaled with {} ({e})",
                    io::Error::from_raw_os_error(-e)
                ));
            }
            Status::Active => {
                out.counts.timeouts += 1;
                s.unsignaled += 1;
                out.note_error(format!("{what}: FILE_INFO says active after {event}"));
            }
        }
    }
    Ok(s)
}

/// Opens `device`, or the first fencelab_drm render node, with a context of
/// `timelines` timelines, waiting up to [`NODE_WAIT`] for it to appear (after
/// a module load or a bind).
pub fn open_waiting(device: Option<&Path>, timelines: u32) -> anyhow::Result<FencelabNode> {
    let deadline = Instant::now() + NODE_WAIT;
    loop {
        match FencelabNode::open(device, timelines) {
            Ok(node) => return Ok(node),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Fences of `jobs` still pending now.
pub fn pending(jobs: &[Job]) -> io::Result<u64> {
    let fds: Vec<_> = jobs.iter().map(|j| j.fence.as_fd()).collect();
    let states = sync_file::poll_in(&fds, Duration::ZERO).map_err(io::Error::other)?;
    Ok(states.iter().filter(|r| **r == Readiness::Pending).count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::FenceSource;
    use crate::workloads::fake::FakeGpu;

    #[test]
    fn a_fence_not_signaled_after_the_cut_off_is_a_timeout() {
        // Pipes are not sync_files: a ready one fails FILE_INFO (an
        // error), a silent one is unsignaled.
        let mut gpu = FakeGpu::new(Box::new(|s| if s == 0 { vec![0] } else { vec![] }));
        let jobs: Vec<Job> = (0..2)
            .map(|i| Job {
                fence: gpu.submit(b"").unwrap(),
                submitted_at: Instant::now(),
                fence_id: 10 + i,
                with_deadline: i == 1,
            })
            .collect();
        assert_eq!(pending(&jobs).unwrap(), 1);
        let mut out = Outcome::default();
        let s = settle("t", "the unbind", &jobs, &mut out).unwrap();
        assert_eq!(
            s,
            Settled {
                other_errors: 1,
                unsignaled: 1,
                ..Settled::default()
            }
        );
        assert_eq!((out.counts.errors, out.counts.timeouts), (1, 1));
        assert!(
            out.first_error
                .unwrap()
                .starts_with("t: fence 0 (device fence 10): fd")
        );
        assert_eq!(out.errors_logged, 2);
    }
}
