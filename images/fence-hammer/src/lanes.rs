//! Lanes: independent timelines a workload submits to, each usable from a
//! thread of its own.
//!
//! - `virtio_gpu`: a lane is a render-node fd of its own, so a DRM file and
//!   a virgl context of its own: the device sees one context timeline per
//!   lane (the guest driver still puts every fence on its one global fence
//!   context, and signals them in order).
//! - `fencelab_drm`: a lane is one timeline of one context (one DRM file),
//!   a dma_fence context of its own and a device context of its own.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;

use crate::drm::{self, RenderNode};
use crate::fencelab::FencelabNode;
use crate::sync_file::{self, FileInfo, SyncFileError};
use crate::workloads::FenceSource;

/// A lane: a fence source that can move to another thread.
pub type Lane = Box<dyn FenceSource + Send>;

/// Opens lanes on the driver under test.
pub trait Lanes {
    /// `n` lanes, each a timeline of its own.
    fn open(&self, n: usize) -> anyhow::Result<Vec<Lane>>;
    /// True when the driver signals the fences of a timeline in submission
    /// order whatever order the device completes them in (virtio_gpu signals
    /// every earlier fence with each completion); false when it signals each
    /// fence as its completion arrives (fencelab_drm, which counts an
    /// overtaking completion as an ordering violation in debugfs).
    fn signals_in_order(&self) -> bool;
}

/// Lanes on the upstream virtio_gpu driver: one render-node fd each.
#[derive(Debug, Clone)]
pub struct VirtioLanes {
    pub node: PathBuf,
}

impl Lanes for VirtioLanes {
    fn open(&self, n: usize) -> anyhow::Result<Vec<Lane>> {
        (0..n)
            .map(|i| {
                let node = RenderNode::open(&self.node)
                    .and_then(|node| node.require_driver(drm::VIRTIO_GPU))
                    .with_context(|| format!("lane {i} of {n}"))?;
                Ok(Box::new(node) as Lane)
            })
            .collect()
    }

    fn signals_in_order(&self) -> bool {
        true
    }
}

/// Lanes on fencelab_drm: the timelines of one new context.
#[derive(Debug, Clone)]
pub struct FencelabLanes {
    pub node: PathBuf,
}

impl Lanes for FencelabLanes {
    fn open(&self, n: usize) -> anyhow::Result<Vec<Lane>> {
        let timelines = u32::try_from(n).context("too many lanes")?;
        let node = Arc::new(
            FencelabNode::open(Some(&self.node), timelines)
                .with_context(|| format!("{n} lanes"))?,
        );
        Ok((0..timelines)
            .map(|timeline| {
                Box::new(FencelabLane {
                    node: node.clone(),
                    timeline,
                }) as Lane
            })
            .collect())
    }

    fn signals_in_order(&self) -> bool {
        false
    }
}

/// One timeline of a shared fencelab_drm context.
struct FencelabLane {
    node: Arc<FencelabNode>,
    timeline: u32,
}

impl FenceSource for FencelabLane {
    fn submit(&mut self, command: &[u8]) -> io::Result<OwnedFd> {
        Ok(self.node.submit_on(self.timeline, command, None)?.fence)
    }

    fn info(&mut self, fence: BorrowedFd<'_>) -> Result<FileInfo, SyncFileError> {
        sync_file::file_info(fence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_node_fails_with_the_lane_named() {
        let lanes = VirtioLanes {
            node: PathBuf::from("/nonexistent/renderD128"),
        };
        let err = format!("{:#}", lanes.open(3).err().expect("no such node"));
        assert!(
            err.starts_with("lane 0 of 3: cannot open /nonexistent/renderD128"),
            "{err}"
        );
        assert!(lanes.signals_in_order());
        let fl = FencelabLanes {
            node: PathBuf::from("/nonexistent/renderD128"),
        };
        let err = format!("{:#}", fl.open(2).err().expect("no such node"));
        assert!(err.starts_with("2 lanes: cannot open"), "{err}");
        assert!(!fl.signals_in_order());
    }

    #[test]
    fn a_non_drm_file_is_refused() {
        let lanes = VirtioLanes {
            node: PathBuf::from("/dev/null"),
        };
        let err = format!("{:#}", lanes.open(1).err().expect("not DRM"));
        assert!(err.contains("not a DRM device"), "{err}");
    }
}
