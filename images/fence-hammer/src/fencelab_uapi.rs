//! Mirror of the fencelab_drm uapi, `include/uapi/drm/fencelab_drm.h` (added
//! by `guest-driver/patches/0005-drm-add-fencelab_drm.patch`): structs laid
//! out as the C header lays them out on x86_64 and the ioctl request numbers.
//!
//! Checked at compile time against the header itself: `build.rs` extracts it
//! from the patch series and generates its constants, struct sizes and field
//! offsets into [`header`]; the assertions below fail the build if the mirror
//! and the header disagree (a renamed field does not even compile).

use std::mem::{offset_of, size_of};

use libc::c_ulong;

use crate::uapi::{DRM_COMMAND_BASE, DRM_IOCTL_BASE, iowr};

/// What `build.rs` read from the header.
#[allow(dead_code)]
mod header {
    include!(concat!(env!("OUT_DIR"), "/fencelab_drm_h.rs"));
}

/// The driver's name in `DRM_IOCTL_VERSION`.
pub const DRIVER_NAME: &str = "fencelab_drm";

/// The interface version this mirror speaks (`DRM_FENCELAB_PARAM_API_VERSION`).
pub const API_VERSION: u64 = 1;

pub const DRM_FENCELAB_GET_PARAM: u8 = 0x00;
pub const DRM_FENCELAB_CTX_CREATE: u8 = 0x01;
pub const DRM_FENCELAB_SUBMIT: u8 = 0x02;
pub const DRM_FENCELAB_WAIT: u8 = 0x03;

pub const PARAM_API_VERSION: u32 = 0;
pub const PARAM_MAX_TIMELINES: u32 = 1;
pub const PARAM_MAX_STREAM_SIZE: u32 = 2;
pub const PARAM_JOB_TIMEOUT_MS: u32 = 3;
pub const PARAM_RING_SIZE: u32 = 4;

/// `DRM_FENCELAB_SUBMIT_IN_FENCE`: `in_fence_fd` is valid.
pub const SUBMIT_IN_FENCE: u32 = 1 << 0;

/// `struct drm_fencelab_get_param`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct GetParam {
    pub param: u32,
    pub pad: u32,
    pub value: u64,
}

/// `struct drm_fencelab_ctx_create`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct CtxCreate {
    pub num_timelines: u32,
    pub ctx_id: u32,
}

/// `struct drm_fencelab_submit`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Submit {
    pub ctx_id: u32,
    pub timeline: u32,
    pub stream: u64,
    pub stream_size: u32,
    pub flags: u32,
    pub in_fence_fd: i32,
    pub out_fence_fd: i32,
    pub seqno: u64,
    pub fence_id: u64,
}

/// `struct drm_fencelab_wait`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Wait {
    pub fence_fd: i32,
    pub flags: u32,
    pub timeout_ns: i64,
    pub status: i32,
    pub pad: u32,
}

pub const DRM_IOCTL_FENCELAB_GET_PARAM: c_ulong =
    iowr::<GetParam>(DRM_IOCTL_BASE, DRM_COMMAND_BASE + DRM_FENCELAB_GET_PARAM);
pub const DRM_IOCTL_FENCELAB_CTX_CREATE: c_ulong =
    iowr::<CtxCreate>(DRM_IOCTL_BASE, DRM_COMMAND_BASE + DRM_FENCELAB_CTX_CREATE);
pub const DRM_IOCTL_FENCELAB_SUBMIT: c_ulong =
    iowr::<Submit>(DRM_IOCTL_BASE, DRM_COMMAND_BASE + DRM_FENCELAB_SUBMIT);
pub const DRM_IOCTL_FENCELAB_WAIT: c_ulong =
    iowr::<Wait>(DRM_IOCTL_BASE, DRM_COMMAND_BASE + DRM_FENCELAB_WAIT);

// The mirror against the header.
const _: () = {
    use header as h;
    assert!(DRM_FENCELAB_GET_PARAM as u64 == h::DRM_FENCELAB_GET_PARAM);
    assert!(DRM_FENCELAB_CTX_CREATE as u64 == h::DRM_FENCELAB_CTX_CREATE);
    assert!(DRM_FENCELAB_SUBMIT as u64 == h::DRM_FENCELAB_SUBMIT);
    assert!(DRM_FENCELAB_WAIT as u64 == h::DRM_FENCELAB_WAIT);
    assert!(PARAM_API_VERSION as u64 == h::DRM_FENCELAB_PARAM_API_VERSION);
    assert!(PARAM_MAX_TIMELINES as u64 == h::DRM_FENCELAB_PARAM_MAX_TIMELINES);
    assert!(PARAM_MAX_STREAM_SIZE as u64 == h::DRM_FENCELAB_PARAM_MAX_STREAM_SIZE);
    assert!(PARAM_JOB_TIMEOUT_MS as u64 == h::DRM_FENCELAB_PARAM_JOB_TIMEOUT_MS);
    assert!(PARAM_RING_SIZE as u64 == h::DRM_FENCELAB_PARAM_RING_SIZE);
    assert!(SUBMIT_IN_FENCE as u64 == h::DRM_FENCELAB_SUBMIT_IN_FENCE);

    assert!(size_of::<GetParam>() == h::SIZEOF_DRM_FENCELAB_GET_PARAM);
    assert!(offset_of!(GetParam, param) == h::OFFSETOF_DRM_FENCELAB_GET_PARAM_PARAM);
    assert!(offset_of!(GetParam, pad) == h::OFFSETOF_DRM_FENCELAB_GET_PARAM_PAD);
    assert!(offset_of!(GetParam, value) == h::OFFSETOF_DRM_FENCELAB_GET_PARAM_VALUE);

    assert!(size_of::<CtxCreate>() == h::SIZEOF_DRM_FENCELAB_CTX_CREATE);
    assert!(
        offset_of!(CtxCreate, num_timelines) == h::OFFSETOF_DRM_FENCELAB_CTX_CREATE_NUM_TIMELINES
    );
    assert!(offset_of!(CtxCreate, ctx_id) == h::OFFSETOF_DRM_FENCELAB_CTX_CREATE_CTX_ID);

    assert!(size_of::<Submit>() == h::SIZEOF_DRM_FENCELAB_SUBMIT);
    assert!(offset_of!(Submit, ctx_id) == h::OFFSETOF_DRM_FENCELAB_SUBMIT_CTX_ID);
    assert!(offset_of!(Submit, timeline) == h::OFFSETOF_DRM_FENCELAB_SUBMIT_TIMELINE);
    assert!(offset_of!(Submit, stream) == h::OFFSETOF_DRM_FENCELAB_SUBMIT_STREAM);
    assert!(offset_of!(Submit, stream_size) == h::OFFSETOF_DRM_FENCELAB_SUBMIT_STREAM_SIZE);
    assert!(offset_of!(Submit, flags) == h::OFFSETOF_DRM_FENCELAB_SUBMIT_FLAGS);
    assert!(offset_of!(Submit, in_fence_fd) == h::OFFSETOF_DRM_FENCELAB_SUBMIT_IN_FENCE_FD);
    assert!(offset_of!(Submit, out_fence_fd) == h::OFFSETOF_DRM_FENCELAB_SUBMIT_OUT_FENCE_FD);
    assert!(offset_of!(Submit, seqno) == h::OFFSETOF_DRM_FENCELAB_SUBMIT_SEQNO);
    assert!(offset_of!(Submit, fence_id) == h::OFFSETOF_DRM_FENCELAB_SUBMIT_FENCE_ID);

    assert!(size_of::<Wait>() == h::SIZEOF_DRM_FENCELAB_WAIT);
    assert!(offset_of!(Wait, fence_fd) == h::OFFSETOF_DRM_FENCELAB_WAIT_FENCE_FD);
    assert!(offset_of!(Wait, flags) == h::OFFSETOF_DRM_FENCELAB_WAIT_FLAGS);
    assert!(offset_of!(Wait, timeout_ns) == h::OFFSETOF_DRM_FENCELAB_WAIT_TIMEOUT_NS);
    assert!(offset_of!(Wait, status) == h::OFFSETOF_DRM_FENCELAB_WAIT_STATUS);
    assert!(offset_of!(Wait, pad) == h::OFFSETOF_DRM_FENCELAB_WAIT_PAD);

    assert!(DRM_IOCTL_FENCELAB_GET_PARAM == h::DRM_IOCTL_FENCELAB_GET_PARAM);
    assert!(DRM_IOCTL_FENCELAB_CTX_CREATE == h::DRM_IOCTL_FENCELAB_CTX_CREATE);
    assert!(DRM_IOCTL_FENCELAB_SUBMIT == h::DRM_IOCTL_FENCELAB_SUBMIT);
    assert!(DRM_IOCTL_FENCELAB_WAIT == h::DRM_IOCTL_FENCELAB_WAIT);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_are_the_ones_the_kernel_computes() {
        // _IOWR('d', 0x40 + nr, struct): by hand, as a second opinion.
        assert_eq!(DRM_IOCTL_FENCELAB_GET_PARAM, 0xC010_6440);
        assert_eq!(DRM_IOCTL_FENCELAB_CTX_CREATE, 0xC008_6441);
        assert_eq!(DRM_IOCTL_FENCELAB_SUBMIT, 0xC030_6442);
        assert_eq!(DRM_IOCTL_FENCELAB_WAIT, 0xC018_6443);
    }
}
