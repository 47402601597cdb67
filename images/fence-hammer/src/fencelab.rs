//! fence-hammer on `fencelab_drm`, fencelab's Rust DRM driver: its render
//! node, a context of timelines, submissions and waits (the uapi is mirrored
//! in [`crate::fencelab_uapi`]).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::drm::RenderNode;
use crate::fencelab_uapi as fl;
use crate::sync_file::{self, FileInfo, SyncFileError};
use crate::uapi;
use crate::workloads::FenceSource;

/// A job submitted to a timeline.
#[derive(Debug)]
pub struct Submitted {
    /// The job's out-fence, a sync_file.
    pub fence: OwnedFd,
    /// The fence's sequence number on its timeline.
    pub seqno: u64,
    /// The fence id the device sees (and its trace records).
    pub fence_id: u64,
}

/// An open `fencelab_drm` render node with one context of timelines.
#[derive(Debug)]
pub struct FencelabNode {
    node: RenderNode,
    ctx_id: u32,
    timelines: u32,
    /// Where [`FenceSource::submit`] sends the next job (round robin).
    next_timeline: u32,
}

impl FencelabNode {
    /// Opens `device`, or the first render node driven by `fencelab_drm` in
    /// `/dev/dri`, checks the interface version and creates a context with
    /// `timelines` timelines.
    pub fn open(device: Option<&Path>, timelines: u32) -> anyhow::Result<Self> {
        let node = match device {
            Some(path) => RenderNode::open(path)?.require_driver(fl::DRIVER_NAME)?,
            None => RenderNode::find(Path::new("/dev/dri"), fl::DRIVER_NAME)?,
        };
        let version = param(&node, fl::PARAM_API_VERSION)
            .with_context(|| format!("{}: GET_PARAM(API_VERSION)", node.path().display()))?;
        if version != fl::API_VERSION {
            bail!(
                "{}: fencelab_drm speaks interface version {version}, fence-hammer {}",
                node.path().display(),
                fl::API_VERSION
            );
        }
        let max = param(&node, fl::PARAM_MAX_TIMELINES)?;
        if timelines == 0 || u64::from(timelines) > max {
            bail!("--timelines {timelines}: fencelab_drm allows 1 to {max}");
        }
        let mut create = fl::CtxCreate {
            num_timelines: timelines,
            ..Default::default()
        };
        // SAFETY: DRM_IOCTL_FENCELAB_CTX_CREATE takes a `struct
        // drm_fencelab_ctx_create *`, which holds no pointers.
        unsafe { uapi::ioctl(node.as_fd(), fl::DRM_IOCTL_FENCELAB_CTX_CREATE, &mut create) }
            .with_context(|| format!("{}: CTX_CREATE({timelines})", node.path().display()))?;
        Ok(Self {
            node,
            ctx_id: create.ctx_id,
            timelines,
            next_timeline: 0,
        })
    }

    pub fn node(&self) -> &RenderNode {
        &self.node
    }

    pub fn timelines(&self) -> u32 {
        self.timelines
    }

    /// `DRM_IOCTL_FENCELAB_GET_PARAM`.
    pub fn param(&self, param: u32) -> io::Result<u64> {
        self::param(&self.node, param)
    }

    /// Submits `stream` to `timeline`, after `in_fence` if given.
    pub fn submit_on(
        &self,
        timeline: u32,
        stream: &[u8],
        in_fence: Option<BorrowedFd<'_>>,
    ) -> io::Result<Submitted> {
        let stream_size = u32::try_from(stream.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "stream larger than 4 GiB"))?;
        let mut submit = fl::Submit {
            ctx_id: self.ctx_id,
            timeline,
            stream: stream.as_ptr() as u64,
            stream_size,
            in_fence_fd: in_fence.map_or(-1, |fd| fd.as_raw_fd()),
            flags: if in_fence.is_some() {
                fl::SUBMIT_IN_FENCE
            } else {
                0
            },
            ..Default::default()
        };
        // SAFETY: DRM_IOCTL_FENCELAB_SUBMIT takes a `struct
        // drm_fencelab_submit *`; `stream` points at `stream_size` readable
        // bytes that outlive the call.
        unsafe {
            uapi::ioctl(
                self.node.as_fd(),
                fl::DRM_IOCTL_FENCELAB_SUBMIT,
                &mut submit,
            )?
        };
        if submit.out_fence_fd < 0 {
            return Err(io::Error::other(format!(
                "SUBMIT succeeded but returned out_fence_fd {}",
                submit.out_fence_fd
            )));
        }
        Ok(Submitted {
            // SAFETY: on success the kernel installed a new sync_file fd in
            // our table and handed ownership of it to us.
            fence: unsafe { OwnedFd::from_raw_fd(submit.out_fence_fd) },
            seqno: submit.seqno,
            fence_id: submit.fence_id,
        })
    }

    /// `DRM_IOCTL_FENCELAB_WAIT`: `Ok(status)` once `fence` is signaled (0,
    /// or the negative errno it was signaled with), `ETIME` on timeout.
    pub fn wait(&self, fence: BorrowedFd<'_>, timeout: Duration) -> io::Result<i32> {
        let mut wait = fl::Wait {
            fence_fd: fence.as_raw_fd(),
            timeout_ns: i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX),
            ..Default::default()
        };
        // SAFETY: DRM_IOCTL_FENCELAB_WAIT takes a `struct drm_fencelab_wait *`,
        // which holds no pointers.
        unsafe { uapi::ioctl(self.node.as_fd(), fl::DRM_IOCTL_FENCELAB_WAIT, &mut wait)? };
        Ok(wait.status)
    }
}

/// `DRM_IOCTL_FENCELAB_GET_PARAM` on `node`.
fn param(node: &RenderNode, param: u32) -> io::Result<u64> {
    let mut get = fl::GetParam {
        param,
        ..Default::default()
    };
    // SAFETY: DRM_IOCTL_FENCELAB_GET_PARAM takes a `struct
    // drm_fencelab_get_param *`, which holds no pointers.
    unsafe { uapi::ioctl(node.as_fd(), fl::DRM_IOCTL_FENCELAB_GET_PARAM, &mut get)? };
    Ok(get.value)
}

/// The workloads' view: jobs go to the timelines in turn.
impl FenceSource for FencelabNode {
    fn submit(&mut self, command: &[u8]) -> io::Result<OwnedFd> {
        let timeline = self.next_timeline;
        self.next_timeline = (self.next_timeline + 1) % self.timelines;
        Ok(self.submit_on(timeline, command, None)?.fence)
    }

    fn info(&mut self, fence: BorrowedFd<'_>) -> Result<FileInfo, SyncFileError> {
        sync_file::file_info(fence)
    }
}
