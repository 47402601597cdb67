//! The workloads fence-hammer can run, selected with `--workload NAME`.
//!
//! A workload is a [`Workload`] entry in [`WORKLOADS`]: a name, a one-line
//! summary and a function from a [`Context`] to an [`Outcome`]. To add one,
//! write a module with a `pub const WORKLOAD: Workload` and list it below.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use anyhow::bail;

use crate::drm::RenderNode;
use crate::readback::SlotMemory;
use crate::report::{Counts, Outcome};
use crate::sync_file::{self, FileInfo, SyncFileError};

pub mod smoke;

/// Every workload, in the order `--workload` lists them.
pub const WORKLOADS: &[Workload] = &[smoke::WORKLOAD];

/// One selectable workload.
pub struct Workload {
    pub name: &'static str,
    pub summary: &'static str,
    pub run: fn(&mut Context<'_>) -> Outcome,
}

/// Looks a workload up by name; an unknown name lists the known ones.
pub fn find(name: &str) -> anyhow::Result<&'static Workload> {
    match WORKLOADS.iter().find(|w| w.name == name) {
        Some(w) => Ok(w),
        None => {
            let known: Vec<String> = WORKLOADS
                .iter()
                .map(|w| format!("{} ({})", w.name, w.summary))
                .collect();
            bail!(
                "unknown workload {name:?}; known workloads: {}",
                known.join(", ")
            )
        }
    }
}

/// Knobs shared by the workloads (from the command line).
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Fences to submit.
    pub fences: u64,
    /// Most out-fences outstanding at once.
    pub inflight: usize,
    /// `WORK{ns}` per submission: simulated GPU time on the device.
    pub work_ns: u64,
    /// How long one fence may stay unsignaled before it counts as timed out.
    pub timeout: Duration,
}

/// Where fences come from: the GPU, or a stand-in in tests.
pub trait FenceSource {
    /// Submits `command` and returns its out-fence.
    fn submit(&mut self, command: &[u8]) -> io::Result<OwnedFd>;
    /// Reads an out-fence returned by [`FenceSource::submit`].
    fn info(&mut self, fence: BorrowedFd<'_>) -> Result<FileInfo, SyncFileError>;
}

/// The real thing: fenced virtio-gpu EXECBUFFERs and real sync_files.
impl FenceSource for RenderNode {
    fn submit(&mut self, command: &[u8]) -> io::Result<OwnedFd> {
        self.execbuffer(command, None)
    }

    fn info(&mut self, fence: BorrowedFd<'_>) -> Result<FileInfo, SyncFileError> {
        sync_file::file_info(fence)
    }
}

/// Everything a workload gets to run with.
pub struct Context<'a> {
    pub source: &'a mut dyn FenceSource,
    /// Where fences `WRITE` their values for the read-back check; `None`
    /// with `--no-write`.
    pub slots: Option<&'a dyn SlotMemory>,
    pub params: Params,
    /// Name used in progress lines.
    pub label: &'a str,
}

impl Context<'_> {
    /// One progress line to stderr.
    pub fn progress(&self, c: &Counts) {
        eprintln!(
            "fence-hammer: {}: {}/{} submitted, {} signaled, {} errors, {} timeouts, {} out of order",
            self.label,
            c.submitted,
            self.params.fences,
            c.signaled,
            c.errors,
            c.timeouts,
            c.out_of_order
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_smoke() {
        assert_eq!(find("smoke").unwrap().name, "smoke");
    }

    #[test]
    fn unknown_workload_lists_the_known_ones() {
        let err = find("smok")
            .err()
            .expect("unknown name must fail")
            .to_string();
        assert!(err.contains("unknown workload \"smok\""), "{err}");
        for w in WORKLOADS {
            assert!(err.contains(w.name), "{err} should list {}", w.name);
        }
    }

    #[test]
    fn names_are_unique() {
        for (i, a) in WORKLOADS.iter().enumerate() {
            assert!(
                WORKLOADS[i + 1..].iter().all(|b| b.name != a.name),
                "{}",
                a.name
            );
        }
    }
}
