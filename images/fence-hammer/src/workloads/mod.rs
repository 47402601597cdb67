//! The workloads fence-hammer can run, selected with `--workload NAME`.
//!
//! A workload is a [`Workload`] entry in [`WORKLOADS`]: a name, a one-line
//! summary and a function from a [`Context`] to an [`Outcome`]. To add one,
//! write a module with a `pub const WORKLOAD: Workload` and list it below.
//! Workloads that load, unload or unbind the driver themselves
//! (`unload-live`, `reset`) open no node beforehand and are run by `main`;
//! they are listed in [`DRIVER_WORKLOADS`].

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use anyhow::bail;

use crate::drm::RenderNode;
use crate::lanes::Lanes;
use crate::readback::SlotMemory;
use crate::report::Outcome;
use crate::sync_file::{self, FileInfo, SyncFileError};

pub mod array_order;
pub mod callback_race;
pub mod deadline_race;
#[cfg(test)]
pub mod fake;
pub mod pipeline;
pub mod signal_storm;
pub mod smoke;

/// Every workload, in the order `--workload` lists them.
pub const WORKLOADS: &[Workload] = &[
    smoke::WORKLOAD,
    signal_storm::WORKLOAD,
    deadline_race::WORKLOAD,
    callback_race::WORKLOAD,
    array_order::WORKLOAD,
];

/// The workloads `main` runs itself, as (name, summary).
pub const DRIVER_WORKLOADS: &[(&str, &str)] = &[
    (
        crate::fencelab_unload::NAME,
        crate::fencelab_unload::SUMMARY,
    ),
    (crate::fencelab_reset::NAME, crate::fencelab_reset::SUMMARY),
];

/// One selectable workload.
pub struct Workload {
    pub name: &'static str,
    pub summary: &'static str,
    /// Runs the workload; an error means it could not start (a setup or
    /// usage error: no run, exit status 2).
    pub run: fn(&mut Context<'_>) -> anyhow::Result<Outcome>,
}

/// Looks a workload up by name; an unknown name lists the known ones.
pub fn find(name: &str) -> anyhow::Result<&'static Workload> {
    match WORKLOADS.iter().find(|w| w.name == name) {
        Some(w) => Ok(w),
        None => {
            let known: Vec<String> = WORKLOADS
                .iter()
                .map(|w| (w.name, w.summary))
                .chain(DRIVER_WORKLOADS.iter().copied())
                .map(|(name, summary)| format!("{name} ({summary})"))
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
    /// Submitting threads (`signal-storm`).
    pub threads: usize,
    /// Fences merged into one sync_file (`array-order`).
    pub merge_width: usize,
    /// poll() waiters per fence (`callback-vs-release`).
    pub waiters: usize,
    /// Phases the round trips are reported by (1: no split).
    pub rtt_phases: usize,
}

impl Default for Params {
    /// The command line's defaults.
    fn default() -> Self {
        Self {
            fences: 2000,
            inflight: 8,
            work_ns: 0,
            timeout: Duration::from_secs(10),
            threads: 4,
            merge_width: 4,
            waiters: 3,
            rtt_phases: 1,
        }
    }
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

/// What workloads do with sync_files besides waiting for them: read and
/// merge them, from any thread. The kernel's ([`sync_file::Kernel`]), or a
/// stand-in in tests.
pub trait SyncFiles: Sync {
    /// `SYNC_IOC_FILE_INFO` (see [`sync_file::file_info`]).
    fn info(&self, fd: BorrowedFd<'_>) -> Result<FileInfo, SyncFileError>;
    /// `SYNC_IOC_MERGE` (see [`sync_file::merge`]).
    fn merge(&self, a: BorrowedFd<'_>, b: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd>;
    /// `SYNC_IOC_SET_DEADLINE` (see [`sync_file::set_deadline`]).
    fn set_deadline(&self, fd: BorrowedFd<'_>, deadline_ns: u64) -> io::Result<()>;
}

impl SyncFiles for sync_file::Kernel {
    fn info(&self, fd: BorrowedFd<'_>) -> Result<FileInfo, SyncFileError> {
        sync_file::file_info(fd)
    }

    fn merge(&self, a: BorrowedFd<'_>, b: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
        sync_file::merge(a, b, name)
    }

    fn set_deadline(&self, fd: BorrowedFd<'_>, deadline_ns: u64) -> io::Result<()> {
        sync_file::set_deadline(fd, deadline_ns)
    }
}

/// Everything a workload gets to run with.
pub struct Context<'a> {
    /// The driver's node, opened for the workload (one timeline on
    /// virtio_gpu; `--timelines` in turn on fencelab_drm).
    pub source: &'a mut dyn FenceSource,
    /// Where fences `WRITE` their values for the read-back check; `None`
    /// with `--no-write` and on fencelab_drm (no buffers).
    pub slots: Option<&'a dyn SlotMemory>,
    /// More timelines, for workloads that need several.
    pub lanes: &'a dyn Lanes,
    /// Reads and merges sync_files.
    pub sync_files: &'a dyn SyncFiles,
    pub params: Params,
    /// Name used in progress lines.
    pub label: &'a str,
}

impl Context<'_> {
    /// The fence pipeline over [`Context::source`].
    pub fn pipeline(&mut self) -> pipeline::Pipeline<'_> {
        pipeline::Pipeline {
            source: &mut *self.source,
            slots: self.slots,
            params: self.params,
            label: self.label.to_string(),
            order_promised: self.lanes.signals_in_order(),
        }
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
    fn the_catalogue_names_are_all_here() {
        let names: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();
        assert_eq!(
            names,
            [
                "smoke",
                "signal-storm",
                "deadline-race",
                "callback-vs-release",
                "array-order"
            ]
        );
        let others: Vec<&str> = DRIVER_WORKLOADS.iter().map(|(n, _)| *n).collect();
        assert_eq!(others, ["unload-live", "reset"]);
        let err = find("nope").err().expect("unknown").to_string();
        assert!(err.contains("reset (unbind the device"), "{err}");
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
