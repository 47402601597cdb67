//! Mirrors of the kernel uapi that fence-hammer calls: structs laid out
//! exactly as the C headers lay them out on x86_64, and ioctl request numbers
//! computed the way `asm-generic/ioctl.h` computes them.
//!
//! Sources (Linux 7.3 uapi):
//! - `include/uapi/drm/drm.h`: `struct drm_version`, `DRM_IOCTL_VERSION`,
//!   `DRM_COMMAND_BASE`, ioctl type `'d'`.
//! - `include/uapi/drm/drm.h`: `struct drm_gem_close`, `DRM_IOCTL_GEM_CLOSE`.
//! - `include/uapi/drm/virtgpu_drm.h`: `struct drm_virtgpu_execbuffer`,
//!   `DRM_IOCTL_VIRTGPU_EXECBUFFER`, `VIRTGPU_EXECBUF_*`,
//!   `struct drm_virtgpu_resource_create`, `struct drm_virtgpu_map`,
//!   `struct drm_virtgpu_3d_wait` and their ioctls.
//! - `src/gallium/drivers/virgl/virgl_hw.h` (Mesa): the buffer target,
//!   format and bind values a virgl buffer resource is created with.
//! - `include/uapi/linux/sync_file.h`: `struct sync_file_info`,
//!   `struct sync_fence_info`, `struct sync_merge_data`,
//!   `struct sync_set_deadline`, `SYNC_IOC_*`.
//!
//! Every struct carries a compile-time size check against the C `sizeof`.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

use libc::{c_char, c_int, c_ulong};

// ---------------------------------------------------------------------------
// asm-generic/ioctl.h (x86_64 uses the generic encoding)
// ---------------------------------------------------------------------------

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;

/// `_IOC_WRITE`: userspace writes the argument (kernel reads it).
pub const IOC_WRITE: u32 = 1;
/// `_IOC_READ`: userspace reads the argument back (kernel writes it).
pub const IOC_READ: u32 = 2;

/// `_IOC(dir, type, nr, size)`.
pub const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> c_ulong {
    assert!(
        size < (1 << IOC_SIZEBITS),
        "ioctl argument too large for _IOC_SIZEBITS"
    );
    ((dir << IOC_DIRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
        | ((ty as u32) << IOC_TYPESHIFT)
        | ((nr as u32) << IOC_NRSHIFT)) as c_ulong
}

/// `_IOW(type, nr, T)`.
pub const fn iow<T>(ty: u8, nr: u8) -> c_ulong {
    ioc(IOC_WRITE, ty, nr, size_of::<T>())
}

/// `_IOWR(type, nr, T)`.
pub const fn iowr<T>(ty: u8, nr: u8) -> c_ulong {
    ioc(IOC_READ | IOC_WRITE, ty, nr, size_of::<T>())
}

/// Calls `ioctl(fd, request, arg)`, retrying on `EINTR` and `EAGAIN` the way
/// libdrm's `drmIoctl` does.
///
/// # Safety
/// `request` must be an ioctl whose argument is a pointer to a `T` (with
/// the layout the kernel expects for that request), and every pointer stored
/// inside `*arg` must be valid for the accesses the kernel makes through it
/// for the duration of the call.
pub unsafe fn ioctl<T>(fd: BorrowedFd<'_>, request: c_ulong, arg: &mut T) -> io::Result<c_int> {
    loop {
        // SAFETY: `fd` is a live descriptor for the duration of the borrow;
        // `arg` is an exclusive, properly aligned `T`; the caller guarantees
        // that `request` takes a `T*` and that embedded pointers are valid.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *mut T) };
        if rc >= 0 {
            return Ok(rc);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
            _ => return Err(err),
        }
    }
}

// ---------------------------------------------------------------------------
// drm.h
// ---------------------------------------------------------------------------

/// DRM ioctl type, `DRM_IOCTL_BASE`.
pub const DRM_IOCTL_BASE: u8 = b'd';
/// First driver-private ioctl number, `DRM_COMMAND_BASE`.
pub const DRM_COMMAND_BASE: u8 = 0x40;

/// `struct drm_version` (`__kernel_size_t` is `unsigned long`, 8 bytes on x86_64).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DrmVersion {
    pub version_major: c_int,
    pub version_minor: c_int,
    pub version_patchlevel: c_int,
    pub name_len: libc::size_t,
    pub name: *mut c_char,
    pub date_len: libc::size_t,
    pub date: *mut c_char,
    pub desc_len: libc::size_t,
    pub desc: *mut c_char,
}
const _: () = assert!(size_of::<DrmVersion>() == 64);

impl DrmVersion {
    /// All lengths zero and all pointers null: the kernel fills in the
    /// numbers and the string lengths only.
    pub const fn zeroed() -> Self {
        Self {
            version_major: 0,
            version_minor: 0,
            version_patchlevel: 0,
            name_len: 0,
            name: std::ptr::null_mut(),
            date_len: 0,
            date: std::ptr::null_mut(),
            desc_len: 0,
            desc: std::ptr::null_mut(),
        }
    }
}

/// `DRM_IOCTL_VERSION = DRM_IOWR(0x00, struct drm_version)`.
pub const DRM_IOCTL_VERSION: c_ulong = iowr::<DrmVersion>(DRM_IOCTL_BASE, 0x00);

// ---------------------------------------------------------------------------
// virtgpu_drm.h
// ---------------------------------------------------------------------------

/// `struct drm_gem_close`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DrmGemClose {
    pub handle: u32,
    pub pad: u32,
}
const _: () = assert!(size_of::<DrmGemClose>() == 8);

/// `DRM_IOCTL_GEM_CLOSE = DRM_IOW(0x09, struct drm_gem_close)`.
pub const DRM_IOCTL_GEM_CLOSE: c_ulong = iow::<DrmGemClose>(DRM_IOCTL_BASE, 0x09);

/// `DRM_VIRTGPU_MAP`.
pub const DRM_VIRTGPU_MAP: u8 = 0x01;
/// `DRM_VIRTGPU_EXECBUFFER`.
pub const DRM_VIRTGPU_EXECBUFFER: u8 = 0x02;
/// `DRM_VIRTGPU_RESOURCE_CREATE`.
pub const DRM_VIRTGPU_RESOURCE_CREATE: u8 = 0x04;
/// `DRM_VIRTGPU_WAIT`.
pub const DRM_VIRTGPU_WAIT: u8 = 0x08;

/// `struct drm_virtgpu_map`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DrmVirtgpuMap {
    /// Out: the fake offset to pass to mmap(2) on the DRM fd.
    pub offset: u64,
    pub handle: u32,
    pub pad: u32,
}
const _: () = assert!(size_of::<DrmVirtgpuMap>() == 16);

/// `DRM_IOCTL_VIRTGPU_MAP = DRM_IOWR(DRM_COMMAND_BASE + 0x01, struct drm_virtgpu_map)`.
pub const DRM_IOCTL_VIRTGPU_MAP: c_ulong =
    iowr::<DrmVirtgpuMap>(DRM_IOCTL_BASE, DRM_COMMAND_BASE + DRM_VIRTGPU_MAP);

/// `struct drm_virtgpu_resource_create`. With virgl the driver sends
/// `RESOURCE_CREATE_3D` with these fields, then `RESOURCE_ATTACH_BACKING`
/// with the buffer's guest pages (`size` bytes; one page when 0).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DrmVirtgpuResourceCreate {
    pub target: u32,
    pub format: u32,
    pub bind: u32,
    pub width: u32,
    pub height: u32,
    pub depth: u32,
    pub array_size: u32,
    pub last_level: u32,
    pub nr_samples: u32,
    pub flags: u32,
    /// Out: the GEM handle in this DRM file.
    pub bo_handle: u32,
    /// Out: the device's resource id.
    pub res_handle: u32,
    pub size: u32,
    pub stride: u32,
}
const _: () = assert!(size_of::<DrmVirtgpuResourceCreate>() == 56);

/// `DRM_IOCTL_VIRTGPU_RESOURCE_CREATE = DRM_IOWR(DRM_COMMAND_BASE + 0x04, struct drm_virtgpu_resource_create)`.
pub const DRM_IOCTL_VIRTGPU_RESOURCE_CREATE: c_ulong = iowr::<DrmVirtgpuResourceCreate>(
    DRM_IOCTL_BASE,
    DRM_COMMAND_BASE + DRM_VIRTGPU_RESOURCE_CREATE,
);

/// `struct drm_virtgpu_3d_wait`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DrmVirtgpu3dWait {
    pub handle: u32,
    pub flags: u32,
}
const _: () = assert!(size_of::<DrmVirtgpu3dWait>() == 8);

/// `DRM_IOCTL_VIRTGPU_WAIT = DRM_IOWR(DRM_COMMAND_BASE + 0x08, struct drm_virtgpu_3d_wait)`:
/// waits (up to 15 s in the kernel) until the BO's fences have signaled.
pub const DRM_IOCTL_VIRTGPU_WAIT: c_ulong =
    iowr::<DrmVirtgpu3dWait>(DRM_IOCTL_BASE, DRM_COMMAND_BASE + DRM_VIRTGPU_WAIT);

/// Gallium `PIPE_BUFFER`: a linear buffer resource (virgl_hw.h targets).
pub const PIPE_BUFFER: u32 = 0;
/// `VIRGL_FORMAT_R8_UNORM`, the format virgl gives buffers.
pub const VIRGL_FORMAT_R8_UNORM: u32 = 64;
/// `VIRGL_BIND_CUSTOM`: memory the host treats as plain bytes.
pub const VIRGL_BIND_CUSTOM: u32 = 1 << 17;

/// `VIRTGPU_EXECBUF_FENCE_FD_IN`: `fence_fd` is an in-fence to wait for.
#[allow(dead_code)] // for later workloads (fence chains)
pub const VIRTGPU_EXECBUF_FENCE_FD_IN: u32 = 0x01;
/// `VIRTGPU_EXECBUF_FENCE_FD_OUT`: return a sync_file fd in `fence_fd`.
pub const VIRTGPU_EXECBUF_FENCE_FD_OUT: u32 = 0x02;
/// `VIRTGPU_EXECBUF_RING_IDX`: `ring_idx` is valid (needs CONTEXT_INIT).
#[allow(dead_code)] // the device under test has no CONTEXT_INIT
pub const VIRTGPU_EXECBUF_RING_IDX: u32 = 0x04;

/// `struct drm_virtgpu_execbuffer`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DrmVirtgpuExecbuffer {
    pub flags: u32,
    pub size: u32,
    /// `void *` to the command buffer, as `__u64`.
    pub command: u64,
    pub bo_handles: u64,
    pub num_bo_handles: u32,
    /// In/out fence fd (see `VIRTGPU_EXECBUF_FENCE_FD_IN/OUT`).
    pub fence_fd: i32,
    pub ring_idx: u32,
    pub syncobj_stride: u32,
    pub num_in_syncobjs: u32,
    pub num_out_syncobjs: u32,
    pub in_syncobjs: u64,
    pub out_syncobjs: u64,
}
const _: () = assert!(size_of::<DrmVirtgpuExecbuffer>() == 64);

/// `DRM_IOCTL_VIRTGPU_EXECBUFFER = DRM_IOWR(DRM_COMMAND_BASE + 0x02, struct drm_virtgpu_execbuffer)`.
pub const DRM_IOCTL_VIRTGPU_EXECBUFFER: c_ulong =
    iowr::<DrmVirtgpuExecbuffer>(DRM_IOCTL_BASE, DRM_COMMAND_BASE + DRM_VIRTGPU_EXECBUFFER);

// ---------------------------------------------------------------------------
// sync_file.h
// ---------------------------------------------------------------------------

/// `SYNC_IOC_MAGIC`.
pub const SYNC_IOC_MAGIC: u8 = b'>';

/// `struct sync_merge_data`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncMergeData {
    pub name: [u8; 32],
    pub fd2: i32,
    pub fence: i32,
    pub flags: u32,
    pub pad: u32,
}
const _: () = assert!(size_of::<SyncMergeData>() == 48);

/// `struct sync_fence_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncFenceInfo {
    pub obj_name: [u8; 32],
    pub driver_name: [u8; 32],
    /// 1 signaled, 0 active, < 0 error.
    pub status: i32,
    pub flags: u32,
    pub timestamp_ns: u64,
}
const _: () = assert!(size_of::<SyncFenceInfo>() == 80);

/// `struct sync_file_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncFileInfo {
    pub name: [u8; 32],
    /// 1 signaled, 0 active, < 0 error.
    pub status: i32,
    /// Must be 0 on input.
    pub flags: u32,
    /// In: entries available at `sync_fence_info` (0 = just count them).
    /// Out: the number of fences in the sync_file.
    pub num_fences: u32,
    /// Must be 0 on input.
    pub pad: u32,
    /// Pointer to an array of `struct sync_fence_info`, as `__u64`.
    pub sync_fence_info: u64,
}
const _: () = assert!(size_of::<SyncFileInfo>() == 56);

/// `struct sync_set_deadline`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncSetDeadline {
    /// Absolute CLOCK_MONOTONIC deadline in nanoseconds.
    pub deadline_ns: u64,
    /// Must be 0.
    pub pad: u64,
}
const _: () = assert!(size_of::<SyncSetDeadline>() == 16);

/// `SYNC_IOC_MERGE = _IOWR('>', 3, struct sync_merge_data)`.
pub const SYNC_IOC_MERGE: c_ulong = iowr::<SyncMergeData>(SYNC_IOC_MAGIC, 3);
/// `SYNC_IOC_FILE_INFO = _IOWR('>', 4, struct sync_file_info)`.
pub const SYNC_IOC_FILE_INFO: c_ulong = iowr::<SyncFileInfo>(SYNC_IOC_MAGIC, 4);
/// `SYNC_IOC_SET_DEADLINE = _IOW('>', 5, struct sync_set_deadline)`.
pub const SYNC_IOC_SET_DEADLINE: c_ulong = iow::<SyncSetDeadline>(SYNC_IOC_MAGIC, 5);

/// The bytes of a fixed-size C string field up to its first NUL, lossily
/// decoded (kernel names are ASCII).
pub fn c_field_to_string(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of};

    /// `_IOC` by hand: dir << 30 | size << 16 | type << 8 | nr.
    fn by_hand(dir: u64, ty: u8, nr: u8, size: u64) -> c_ulong {
        ((dir << 30) | (size << 16) | ((ty as u64) << 8) | nr as u64) as c_ulong
    }

    #[test]
    fn ioctl_numbers_match_the_c_macros() {
        // Values worked out from the C macros (and, for the well-known ones,
        // as printed by strace on real systems).
        assert_eq!(SYNC_IOC_FILE_INFO, 0xC038_3E04);
        assert_eq!(SYNC_IOC_MERGE, 0xC030_3E03);
        assert_eq!(SYNC_IOC_SET_DEADLINE, 0x4010_3E05);
        assert_eq!(DRM_IOCTL_VERSION, 0xC040_6400);
        assert_eq!(DRM_IOCTL_VIRTGPU_EXECBUFFER, 0xC040_6442);
        assert_eq!(DRM_IOCTL_VIRTGPU_MAP, 0xC010_6441);
        assert_eq!(DRM_IOCTL_VIRTGPU_RESOURCE_CREATE, 0xC038_6444);
        assert_eq!(DRM_IOCTL_VIRTGPU_WAIT, 0xC008_6448);
        assert_eq!(DRM_IOCTL_GEM_CLOSE, 0x4008_6409);

        assert_eq!(SYNC_IOC_FILE_INFO, by_hand(3, b'>', 4, 56));
        assert_eq!(SYNC_IOC_SET_DEADLINE, by_hand(1, b'>', 5, 16));
        assert_eq!(DRM_IOCTL_VERSION, by_hand(3, b'd', 0, 64));
        assert_eq!(
            DRM_IOCTL_VIRTGPU_EXECBUFFER,
            by_hand(3, b'd', 0x40 + 0x02, 64)
        );
    }

    #[test]
    fn struct_sizes_match_the_c_sizes() {
        assert_eq!(size_of::<DrmVersion>(), 64);
        assert_eq!(size_of::<DrmVirtgpuExecbuffer>(), 64);
        assert_eq!(size_of::<SyncFileInfo>(), 56);
        assert_eq!(size_of::<SyncFenceInfo>(), 80);
        assert_eq!(size_of::<SyncMergeData>(), 48);
        assert_eq!(size_of::<SyncSetDeadline>(), 16);
        assert_eq!(align_of::<DrmVirtgpuExecbuffer>(), 8);
        assert_eq!(size_of::<DrmVirtgpuResourceCreate>(), 56);
        assert_eq!(size_of::<DrmVirtgpuMap>(), 16);
        assert_eq!(align_of::<DrmVirtgpuMap>(), 8);
        assert_eq!(size_of::<DrmVirtgpu3dWait>(), 8);
        assert_eq!(size_of::<DrmGemClose>(), 8);
    }

    #[test]
    fn field_offsets_match_the_c_layout() {
        // struct drm_version: three ints, 4 bytes of padding, then 8-byte fields.
        assert_eq!(offset_of!(DrmVersion, name_len), 16);
        assert_eq!(offset_of!(DrmVersion, name), 24);
        assert_eq!(offset_of!(DrmVersion, desc), 56);
        // struct drm_virtgpu_execbuffer
        assert_eq!(offset_of!(DrmVirtgpuExecbuffer, command), 8);
        assert_eq!(offset_of!(DrmVirtgpuExecbuffer, bo_handles), 16);
        assert_eq!(offset_of!(DrmVirtgpuExecbuffer, num_bo_handles), 24);
        assert_eq!(offset_of!(DrmVirtgpuExecbuffer, fence_fd), 28);
        assert_eq!(offset_of!(DrmVirtgpuExecbuffer, ring_idx), 32);
        assert_eq!(offset_of!(DrmVirtgpuExecbuffer, syncobj_stride), 36);
        assert_eq!(offset_of!(DrmVirtgpuExecbuffer, num_out_syncobjs), 44);
        assert_eq!(offset_of!(DrmVirtgpuExecbuffer, in_syncobjs), 48);
        assert_eq!(offset_of!(DrmVirtgpuExecbuffer, out_syncobjs), 56);
        // struct drm_virtgpu_resource_create: fourteen __u32 in order.
        assert_eq!(offset_of!(DrmVirtgpuResourceCreate, flags), 36);
        assert_eq!(offset_of!(DrmVirtgpuResourceCreate, bo_handle), 40);
        assert_eq!(offset_of!(DrmVirtgpuResourceCreate, res_handle), 44);
        assert_eq!(offset_of!(DrmVirtgpuResourceCreate, size), 48);
        assert_eq!(offset_of!(DrmVirtgpuResourceCreate, stride), 52);
        // struct drm_virtgpu_map
        assert_eq!(offset_of!(DrmVirtgpuMap, handle), 8);
        // struct sync_file_info
        assert_eq!(offset_of!(SyncFileInfo, status), 32);
        assert_eq!(offset_of!(SyncFileInfo, num_fences), 40);
        assert_eq!(offset_of!(SyncFileInfo, sync_fence_info), 48);
        // struct sync_fence_info
        assert_eq!(offset_of!(SyncFenceInfo, driver_name), 32);
        assert_eq!(offset_of!(SyncFenceInfo, status), 64);
        assert_eq!(offset_of!(SyncFenceInfo, timestamp_ns), 72);
    }

    #[test]
    fn c_fields_stop_at_nul() {
        let mut f = [0u8; 32];
        f[..8].copy_from_slice(b"controlq");
        assert_eq!(c_field_to_string(&f), "controlq");
        assert_eq!(c_field_to_string(&[b'x'; 4]), "xxxx");
        assert_eq!(c_field_to_string(&[0u8; 4]), "");
    }
}
