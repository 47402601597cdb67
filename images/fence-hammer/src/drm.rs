//! Safe wrappers around the DRM ioctls fence-hammer needs: open a render
//! node, read its driver version, submit a fenced virtio-gpu EXECBUFFER,
//! create and map the buffer fencelab `WRITE`s land in.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::readback::{MappedSlots, SlotMap, SlotMemory};
use crate::uapi;

/// The DRM driver name the workloads are written for.
pub const VIRTIO_GPU: &str = "virtio_gpu";

/// Longest string accepted from `DRM_IOCTL_VERSION` (the kernel's are a few
/// dozen bytes; this only bounds an allocation).
const MAX_VERSION_STRING: usize = 4096;

/// What `DRM_IOCTL_VERSION` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub major: i32,
    pub minor: i32,
    pub patchlevel: i32,
    pub name: String,
    pub date: String,
    pub desc: String,
}

/// `DRM_IOCTL_VERSION` on `fd`: once for the lengths, once for the strings.
pub fn version(fd: BorrowedFd<'_>) -> io::Result<Version> {
    let mut v = uapi::DrmVersion::zeroed();
    // SAFETY: DRM_IOCTL_VERSION takes a `struct drm_version *`; all its
    // pointers are null with zero lengths, so the kernel writes no strings.
    unsafe { uapi::ioctl(fd, uapi::DRM_IOCTL_VERSION, &mut v)? };

    let cap = |len: usize| len.min(MAX_VERSION_STRING);
    let mut name = vec![0u8; cap(v.name_len)];
    let mut date = vec![0u8; cap(v.date_len)];
    let mut desc = vec![0u8; cap(v.desc_len)];
    let mut v2 = uapi::DrmVersion {
        name_len: name.len(),
        name: name.as_mut_ptr().cast(),
        date_len: date.len(),
        date: date.as_mut_ptr().cast(),
        desc_len: desc.len(),
        desc: desc.as_mut_ptr().cast(),
        ..uapi::DrmVersion::zeroed()
    };
    // SAFETY: each pointer refers to a live, exclusively borrowed buffer of
    // exactly the length stored next to it; the kernel writes at most that
    // many bytes into each.
    unsafe { uapi::ioctl(fd, uapi::DRM_IOCTL_VERSION, &mut v2)? };

    // The kernel reports the full length even when it truncated the copy.
    let text = |mut buf: Vec<u8>, len: usize| {
        buf.truncate(len.min(buf.len()));
        uapi::c_field_to_string(&buf)
    };
    Ok(Version {
        major: v2.version_major,
        minor: v2.version_minor,
        patchlevel: v2.version_patchlevel,
        name: text(name, v2.name_len),
        date: text(date, v2.date_len),
        desc: text(desc, v2.desc_len),
    })
}

/// An open DRM render node and the driver behind it.
#[derive(Debug)]
pub struct RenderNode {
    file: File,
    path: PathBuf,
    version: Version,
}

impl RenderNode {
    /// Opens `path` read-write and asks the driver for its version. Any
    /// driver is accepted here; see [`RenderNode::require_driver`].
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let version = version(file.as_fd()).with_context(|| {
            format!(
                "DRM_IOCTL_VERSION on {} failed (not a DRM device?)",
                path.display()
            )
        })?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            version,
        })
    }

    /// Refuses a node whose driver is not `driver`: the driver-private ioctl
    /// numbers mean different things to different drivers.
    pub fn require_driver(self, driver: &str) -> anyhow::Result<Self> {
        if self.version.name != driver {
            bail!(
                "{} is driven by {:?}, not {:?}",
                self.path.display(),
                self.version.name,
                driver
            );
        }
        Ok(self)
    }

    /// The first `renderD<N>` in `dir` (lowest N) whose driver is
    /// `virtio_gpu`. The error names every node looked at and what it was.
    pub fn find_virtio_gpu(dir: &Path) -> anyhow::Result<Self> {
        Self::find(dir, VIRTIO_GPU)
    }

    /// The first `renderD<N>` in `dir` (lowest N) whose driver is `driver`.
    /// The error names every node looked at and what it was.
    pub fn find(dir: &Path, driver: &str) -> anyhow::Result<Self> {
        let entries = std::fs::read_dir(dir).with_context(|| {
            format!(
                "no {driver} render node: cannot list {} (is devtmpfs mounted and {driver} loaded?)",
                dir.display()
            )
        })?;
        let mut nodes: Vec<(u32, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name();
                let minor = name
                    .to_str()?
                    .strip_prefix("renderD")?
                    .parse::<u32>()
                    .ok()?;
                Some((minor, e.path()))
            })
            .collect();
        nodes.sort();
        if nodes.is_empty() {
            bail!(
                "no {driver} render node: {} has no renderD* entries",
                dir.display()
            );
        }
        let mut seen = Vec::new();
        for (_, path) in nodes {
            match Self::open(&path) {
                Ok(node) if node.version.name == driver => return Ok(node),
                Ok(node) => seen.push(format!(
                    "{}: driver {:?}",
                    path.display(),
                    node.version.name
                )),
                Err(e) => seen.push(format!("{e:#}")),
            }
        }
        bail!(
            "no render node in {} is driven by {driver}: {}",
            dir.display(),
            seen.join("; ")
        )
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> &Version {
        &self.version
    }

    /// `DRM_IOCTL_VIRTGPU_EXECBUFFER` with `VIRTGPU_EXECBUF_FENCE_FD_OUT`
    /// (and `FENCE_FD_IN` when `in_fence` is given): submits `command` to the
    /// host and returns the out-fence as a sync_file fd.
    pub fn execbuffer(
        &self,
        command: &[u8],
        in_fence: Option<BorrowedFd<'_>>,
    ) -> io::Result<OwnedFd> {
        let size = u32::try_from(command.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "command buffer larger than 4 GiB",
            )
        })?;
        let mut flags = uapi::VIRTGPU_EXECBUF_FENCE_FD_OUT;
        let mut fence_fd = -1;
        if let Some(fd) = in_fence {
            flags |= uapi::VIRTGPU_EXECBUF_FENCE_FD_IN;
            fence_fd = fd.as_raw_fd();
        }
        let mut eb = uapi::DrmVirtgpuExecbuffer {
            flags,
            size,
            command: command.as_ptr() as u64,
            fence_fd,
            ..Default::default()
        };
        // SAFETY: DRM_IOCTL_VIRTGPU_EXECBUFFER takes a `struct
        // drm_virtgpu_execbuffer *`; `command` points at `size` readable
        // bytes that outlive the call; no BOs and no syncobjs are passed.
        unsafe {
            uapi::ioctl(
                self.file.as_fd(),
                uapi::DRM_IOCTL_VIRTGPU_EXECBUFFER,
                &mut eb,
            )?
        };
        if eb.fence_fd < 0 {
            return Err(io::Error::other(format!(
                "EXECBUFFER with FENCE_FD_OUT succeeded but returned fence_fd {}",
                eb.fence_fd
            )));
        }
        // SAFETY: on success with FENCE_FD_OUT the kernel installed a new
        // sync_file fd in our table and handed ownership of it to us.
        Ok(unsafe { OwnedFd::from_raw_fd(eb.fence_fd) })
    }
}

/// Page size assumed for buffer objects (x86_64).
const PAGE_SIZE: u64 = 4096;

/// What it means when waiting for the buffer's creation fence fails (the
/// kernel gives up after 15 s): the run goes on regardless.
const CREATE_WAIT_NOTE: &str = "the first WRITEs may be refused if the device has not created it";

/// A virgl buffer resource mapped into this process: the memory fencelab
/// `WRITE` ops land in (see [`crate::readback`]).
///
/// `DRM_IOCTL_VIRTGPU_RESOURCE_CREATE` makes the driver send
/// `RESOURCE_CREATE_3D` (fenced) and `RESOURCE_ATTACH_BACKING` with the
/// object's guest pages; `DRM_IOCTL_VIRTGPU_MAP` + mmap(2) map those same
/// pages here, so a value the device stores is visible to a plain load.
#[derive(Debug)]
pub struct WriteBuffer {
    /// A duplicate of the render node's fd: the same DRM file, so the same
    /// GEM handle namespace (for `GEM_CLOSE` on drop).
    file: File,
    bo_handle: u32,
    res_handle: u32,
    mapping: *mut libc::c_void,
    len: usize,
    slots: MappedSlots,
}

// SAFETY: the only non-thread-safe part is the mapping's raw pointer:
// `mapping` is only used by `Drop` (with exclusive access), and `slots` only
// reads the mapping (see `MappedSlots`), which stays mapped until the drop.
unsafe impl Send for WriteBuffer {}
// SAFETY: see `Send` above; `&WriteBuffer` only reads slots and handles.
unsafe impl Sync for WriteBuffer {}

impl WriteBuffer {
    /// Creates, waits for and maps a buffer holding `map.slots()` slots.
    pub fn create(node: &RenderNode, map: SlotMap) -> anyhow::Result<Self> {
        let len = map.bytes().div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let size = u32::try_from(len).context("write buffer larger than 4 GiB")?;
        let file = node
            .file
            .try_clone()
            .context("cannot duplicate the render node fd")?;
        let mut rc = uapi::DrmVirtgpuResourceCreate {
            target: uapi::PIPE_BUFFER,
            format: uapi::VIRGL_FORMAT_R8_UNORM,
            bind: uapi::VIRGL_BIND_CUSTOM,
            width: size,
            height: 1,
            depth: 1,
            array_size: 1,
            size,
            ..Default::default()
        };
        // SAFETY: DRM_IOCTL_VIRTGPU_RESOURCE_CREATE takes a `struct
        // drm_virtgpu_resource_create *` and holds no pointers.
        unsafe {
            uapi::ioctl(
                file.as_fd(),
                uapi::DRM_IOCTL_VIRTGPU_RESOURCE_CREATE,
                &mut rc,
            )
        }
        .with_context(|| {
            format!("DRM_IOCTL_VIRTGPU_RESOURCE_CREATE (a {size}-byte virgl buffer) failed")
        })?;
        let handle = GemHandle {
            file: &file,
            handle: rc.bo_handle,
        };

        let mut wait = uapi::DrmVirtgpu3dWait {
            handle: rc.bo_handle,
            flags: 0,
        };
        // SAFETY: DRM_IOCTL_VIRTGPU_WAIT takes a `struct drm_virtgpu_3d_wait *`
        // and holds no pointers.
        if let Err(e) =
            unsafe { uapi::ioctl(file.as_fd(), uapi::DRM_IOCTL_VIRTGPU_WAIT, &mut wait) }
        {
            eprintln!(
                "fence-hammer: warning: DRM_IOCTL_VIRTGPU_WAIT on the write buffer: {e}; {CREATE_WAIT_NOTE}"
            );
        }

        let mut m = uapi::DrmVirtgpuMap {
            handle: rc.bo_handle,
            ..Default::default()
        };
        // SAFETY: DRM_IOCTL_VIRTGPU_MAP takes a `struct drm_virtgpu_map *`
        // and holds no pointers.
        unsafe { uapi::ioctl(file.as_fd(), uapi::DRM_IOCTL_VIRTGPU_MAP, &mut m) }
            .context("DRM_IOCTL_VIRTGPU_MAP on the write buffer failed")?;
        let offset = libc::off_t::try_from(m.offset)
            .with_context(|| format!("DRM_IOCTL_VIRTGPU_MAP returned offset {:#x}", m.offset))?;
        // SAFETY: a new shared mapping of `len` bytes of the DRM fd at the
        // offset the driver handed out for this object; no existing memory
        // is affected.
        let mapping = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if mapping == libc::MAP_FAILED {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("mmap of the {len}-byte write buffer failed"));
        }
        std::mem::forget(handle);
        // SAFETY: the mapping is page-aligned, `len >= map.bytes()` readable
        // bytes long, and lives as long as `self` (unmapped in drop).
        let slots = unsafe { MappedSlots::new(mapping.cast::<u64>().cast_const(), map) };
        Ok(Self {
            file,
            bo_handle: rc.bo_handle,
            res_handle: rc.res_handle,
            mapping,
            len: len as usize,
            slots,
        })
    }

    pub fn bo_handle(&self) -> u32 {
        self.bo_handle
    }
}

impl SlotMemory for WriteBuffer {
    fn res_handle(&self) -> u32 {
        self.res_handle
    }

    fn map(&self) -> SlotMap {
        self.slots.map()
    }

    fn read_slot(&self, slot: u64) -> Option<u64> {
        self.slots.read(slot)
    }
}

impl Drop for WriteBuffer {
    fn drop(&mut self) {
        // SAFETY: `mapping`/`len` are exactly what mmap returned in
        // `create`; nothing borrows the mapping past `self`.
        unsafe { libc::munmap(self.mapping, self.len) };
        drop(GemHandle {
            file: &self.file,
            handle: self.bo_handle,
        });
    }
}

/// Closes a GEM handle when dropped (on `create`'s error paths and in
/// [`WriteBuffer`]'s drop).
struct GemHandle<'a> {
    file: &'a File,
    handle: u32,
}

impl Drop for GemHandle<'_> {
    fn drop(&mut self) {
        let mut close = uapi::DrmGemClose {
            handle: self.handle,
            pad: 0,
        };
        // SAFETY: DRM_IOCTL_GEM_CLOSE takes a `struct drm_gem_close *` and
        // holds no pointers; closing a handle only drops our reference.
        if let Err(e) =
            unsafe { uapi::ioctl(self.file.as_fd(), uapi::DRM_IOCTL_GEM_CLOSE, &mut close) }
        {
            eprintln!(
                "fence-hammer: warning: DRM_IOCTL_GEM_CLOSE {}: {e}",
                self.handle
            );
        }
    }
}

impl AsFd for RenderNode {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fence-hammer-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn missing_dir_is_a_precise_error() {
        let dir = scratch_dir("missing").join("dri");
        let err = format!("{:#}", RenderNode::find_virtio_gpu(&dir).unwrap_err());
        assert!(err.contains("cannot list"), "{err}");
        assert!(err.contains(&dir.display().to_string()), "{err}");
    }

    #[test]
    fn dir_without_render_nodes_is_a_precise_error() {
        let dir = scratch_dir("empty");
        std::fs::write(dir.join("card0"), b"").unwrap();
        let err = format!("{:#}", RenderNode::find_virtio_gpu(&dir).unwrap_err());
        assert!(err.contains("has no renderD* entries"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn non_drm_nodes_are_listed_in_order_in_the_error() {
        let dir = scratch_dir("fake");
        // Regular files: open works, DRM_IOCTL_VERSION fails with ENOTTY.
        std::fs::write(dir.join("renderD129"), b"").unwrap();
        std::fs::write(dir.join("renderD128"), b"").unwrap();
        let err = format!("{:#}", RenderNode::find_virtio_gpu(&dir).unwrap_err());
        assert!(err.contains("is driven by virtio_gpu"), "{err}");
        let a = err.find("renderD128").expect("renderD128 listed");
        let b = err.find("renderD129").expect("renderD129 listed");
        assert!(a < b, "nodes must be tried in minor order: {err}");
        assert!(err.contains("not a DRM device"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn version_on_a_non_drm_fd_fails_cleanly() {
        let f = File::open("/dev/null").unwrap();
        let err = version(f.as_fd()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTTY));
    }
}
