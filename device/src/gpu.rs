//! Device state and command semantics: the resource and context tables, the
//! one display, and what each [`Command`] does to them.
//!
//! Nothing here touches guest memory or vrings. The only outside fact a
//! command needs is whether a guest-physical range exists (for
//! `RESOURCE_ATTACH_BACKING`), asked through [`GuestRanges`].

use std::collections::{BTreeSet, HashMap};

use thiserror::Error;
use tracing::{debug, warn};
use vm_memory::ByteValued;

use crate::decode::Command;
use crate::protocol::*;

/// The one scanout's mode, reported by `GET_DISPLAY_INFO` and the EDID.
pub const DISPLAY_WIDTH: u32 = 1024;
pub const DISPLAY_HEIGHT: u32 = 768;
/// Scanouts this device drives (QEMU owns `num_scanouts` in config space;
/// the guest may ask about more, which are reported disabled).
pub const NUM_SCANOUTS: u32 = 1;
/// Capsets advertised in config space. None: no renderer behind the device.
pub const NUM_CAPSETS: u32 = 0;
/// Bytes per pixel of every 2D format.
const BPP: u64 = 4;
/// Bytes a fencelab `WRITE` op stores: its `u64` value, little-endian.
pub const WRITE_LEN: u64 = 8;

/// Most resources alive at once. Each costs the host about 100 bytes plus
/// its backing list. The Linux virtio_gpu driver creates one per GEM object
/// (a desktop session holds hundreds to a few thousand); fencelab_drm
/// creates none, fence-hammer on virtio_gpu a handful (its `WRITE`
/// read-back buffers). 16 384 is far above both and bounds the table to a
/// few MiB.
pub const MAX_RESOURCES: usize = 16_384;
/// Most contexts alive at once. The virtio_gpu driver creates one per open
/// DRM file; fencelab_drm one per timeline, at most 64 contexts of 64
/// timelines per open file. 4 096 is one fencelab_drm file at its limits
/// (fence-hammer's workloads default to 1 or 4 timelines); each costs
/// about 200 bytes.
pub const MAX_CONTEXTS: usize = 4_096;
/// Most `MemEntry`s attached as backing, summed over all resources (16
/// bytes each: 16 MiB at the cap). Drivers send one entry per contiguous
/// run of guest pages, so this covers 4 GiB of 4 KiB pages, twice the
/// 2 GiB guest `cargo xtask boot` starts; without it a guest could
/// make every resource carry `MAX_MEM_ENTRIES` (256 KiB of host memory).
pub const MAX_BACKING_ENTRIES: usize = 1 << 20;
/// Most (context, resource) attachments, summed over all contexts. The
/// virtio_gpu driver attaches each GEM object to its file's one context
/// (about one per resource); without a cap, [`MAX_CONTEXTS`] contexts each
/// attaching [`MAX_RESOURCES`] resources would hold 64 Mi entries.
pub const MAX_ATTACHMENTS: usize = 1 << 18;

/// A bound on what a guest can make the device hold; exceeding one is
/// answered with `VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    Resources,
    Contexts,
    BackingEntries,
    Attachments,
}

impl Cap {
    /// The cap's value.
    pub const fn max(self) -> usize {
        match self {
            Cap::Resources => MAX_RESOURCES,
            Cap::Contexts => MAX_CONTEXTS,
            Cap::BackingEntries => MAX_BACKING_ENTRIES,
            Cap::Attachments => MAX_ATTACHMENTS,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The cap's name in the device's stats (`refused_over_cap`).
    pub const fn key(self) -> &'static str {
        match self {
            Cap::Resources => "resources",
            Cap::Contexts => "contexts",
            Cap::BackingEntries => "backing_entries",
            Cap::Attachments => "attachments",
        }
    }
}

impl std::fmt::Display for Cap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cap::Resources => "live resources",
            Cap::Contexts => "live contexts",
            Cap::BackingEntries => "backing entries",
            Cap::Attachments => "context attachments",
        })
    }
}

/// What the device holds for the guest, as counted against the [`Cap`]s.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub resources: usize,
    pub contexts: usize,
    pub backing_entries: usize,
    pub attachments: usize,
}

impl Usage {
    pub fn of(&self, cap: Cap) -> usize {
        match cap {
            Cap::Resources => self.resources,
            Cap::Contexts => self.contexts,
            Cap::BackingEntries => self.backing_entries,
            Cap::Attachments => self.attachments,
        }
    }
}

/// Whether the `n`th refusal by one cap is logged: the 1st, 2nd, 4th, 8th…,
/// so a guest flooding the device costs a log line per doubling.
fn log_refusal(n: u64) -> bool {
    n.is_power_of_two()
}

/// Whether guest-physical ranges exist in guest memory.
pub trait GuestRanges {
    /// True when `[addr, addr + len)` lies entirely in guest RAM.
    fn contains(&self, addr: u64, len: u64) -> bool;
}

/// What went wrong executing a well-formed command.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum GpuError {
    #[error("no resource {0}")]
    NoSuchResource(u32),
    #[error("resource {0} already exists")]
    ResourceExists(u32),
    #[error("no context {0}")]
    NoSuchContext(u32),
    #[error("context {0} already exists (or id 0)")]
    ContextExists(u32),
    #[error("scanout {0} does not exist")]
    NoSuchScanout(u32),
    #[error("capset index {index} out of range ({NUM_CAPSETS} capsets)")]
    NoSuchCapset { index: u32 },
    #[error("capset id {id} version {version} unknown")]
    UnknownCapset { id: u32, version: u32 },
    #[error("unknown 2D format {0}")]
    BadFormat(u32),
    #[error("zero-sized resource {width}x{height}")]
    ZeroSize { width: u32, height: u32 },
    #[error("rect {r:?} exceeds resource {resource_id} ({width}x{height})")]
    RectOutOfBounds {
        resource_id: u32,
        r: Rect,
        width: u32,
        height: u32,
    },
    #[error("resource {0} already has backing")]
    AlreadyBacked(u32),
    #[error("resource {0} has no backing")]
    NotBacked(u32),
    #[error("backing entry {index} [{addr:#x}, +{len:#x}) is not in guest memory")]
    BackingOutsideMemory { index: usize, addr: u64, len: u32 },
    #[error("transfer needs {need} bytes of backing, resource {resource_id} has {have}")]
    TransferOutsideBacking {
        resource_id: u32,
        need: u64,
        have: u64,
    },
    #[error("SUBMIT_3D: bad fencelab stream: {0}")]
    Stream(#[from] fencelab_stream::DecodeError),
    #[error("SUBMIT_3D op {op}: WRITE to resource {resource_id}, which does not exist")]
    WriteNoSuchResource { op: usize, resource_id: u32 },
    #[error("SUBMIT_3D op {op}: WRITE to resource {resource_id}, which has no backing attached")]
    WriteNotBacked { op: usize, resource_id: u32 },
    #[error(
        "SUBMIT_3D op {op}: WRITE of {WRITE_LEN} bytes at offset {offset:#x} is outside resource {resource_id}'s {backing_len:#x} bytes of backing"
    )]
    WriteOutsideBacking {
        op: usize,
        resource_id: u32,
        offset: u64,
        backing_len: u64,
    },
    #[error(
        "SUBMIT_3D op {op}: WRITE to resource {resource_id} resolves to [{addr:#x}, +{len}), which is not in guest memory"
    )]
    WriteOutsideMemory {
        op: usize,
        resource_id: u32,
        addr: u64,
        len: u64,
    },
    #[error("{cap} cap: {have} in use, the request needs {want} more, at most {} allowed", cap.max())]
    OverCap { cap: Cap, have: usize, want: usize },
}

impl GpuError {
    /// The `VIRTIO_GPU_RESP_ERR_*` this error is answered with.
    pub fn response_code(&self) -> u32 {
        match self {
            GpuError::NoSuchResource(_)
            | GpuError::ResourceExists(_)
            | GpuError::WriteNoSuchResource { .. } => RESP_ERR_INVALID_RESOURCE_ID,
            GpuError::NoSuchContext(_) | GpuError::ContextExists(_) => RESP_ERR_INVALID_CONTEXT_ID,
            GpuError::NoSuchScanout(_) => RESP_ERR_INVALID_SCANOUT_ID,
            GpuError::AlreadyBacked(_) => RESP_ERR_UNSPEC,
            GpuError::OverCap { .. } => RESP_ERR_OUT_OF_MEMORY,
            GpuError::NoSuchCapset { .. }
            | GpuError::UnknownCapset { .. }
            | GpuError::BadFormat(_)
            | GpuError::ZeroSize { .. }
            | GpuError::RectOutOfBounds { .. }
            | GpuError::NotBacked(_)
            | GpuError::BackingOutsideMemory { .. }
            | GpuError::TransferOutsideBacking { .. }
            | GpuError::Stream(_)
            | GpuError::WriteNotBacked { .. }
            | GpuError::WriteOutsideBacking { .. }
            | GpuError::WriteOutsideMemory { .. } => RESP_ERR_INVALID_PARAMETER,
        }
    }

    /// True when [`Gpu::execute`] already logged the error (rate-limited),
    /// so the caller should not log it again per request.
    pub fn logged_by_gpu(&self) -> bool {
        matches!(self, GpuError::OverCap { .. })
    }
}

/// The response a command earns, before it is tied to a request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    NoData,
    DisplayInfo(Box<RespDisplayInfo>),
    CapsetInfo(RespCapsetInfo),
    Edid(Box<RespEdid>),
    /// A `VIRTIO_GPU_RESP_ERR_*` code (or whatever a fencelab `FAIL` asked for).
    Err(u32),
}

impl Response {
    /// The response type code.
    pub fn code(&self) -> u32 {
        match self {
            Response::NoData => RESP_OK_NODATA,
            Response::DisplayInfo(_) => RESP_OK_DISPLAY_INFO,
            Response::CapsetInfo(_) => RESP_OK_CAPSET_INFO,
            Response::Edid(_) => RESP_OK_EDID,
            Response::Err(code) => *code,
        }
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Response::Err(_))
    }

    /// The bytes to write into the response buffer of request `req`.
    pub fn encode(&self, req: &CtrlHdr) -> Vec<u8> {
        let hdr = req.response(self.code());
        match self {
            Response::NoData | Response::Err(_) => hdr.as_slice().to_vec(),
            Response::DisplayInfo(r) => {
                let mut r = **r;
                r.hdr = hdr;
                r.as_slice().to_vec()
            }
            Response::CapsetInfo(r) => {
                let mut r = *r;
                r.hdr = hdr;
                r.as_slice().to_vec()
            }
            Response::Edid(r) => {
                let mut r = **r;
                r.hdr = hdr;
                r.as_slice().to_vec()
            }
        }
    }
}

/// Result of executing one command.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub response: Response,
    /// Simulated GPU time (fencelab `WORK` ops) the fence must wait for.
    pub work_ns: u64,
    /// Why the command failed, when it did for a reason worth logging.
    pub error: Option<GpuError>,
    /// Guest-memory writes (fencelab `WRITE` ops) that must land just
    /// before the fence completes, in this order.
    pub writes: Vec<GuestWrite>,
    /// Deadline hints (fencelab `DEADLINE` ops) for fences already pending.
    pub deadlines: Vec<DeadlineHint>,
}

/// Bytes to store at a guest-physical address when a fence completes.
/// Resolved (and checked against guest memory) when the command arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestWrite {
    pub addr: u64,
    pub bytes: Vec<u8>,
}

/// A `DEADLINE{fence, ns}` op: the guest wants `fence` done within `ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadlineHint {
    pub fence: u64,
    pub ns: u64,
}

impl Outcome {
    pub fn ok(response: Response) -> Self {
        Outcome {
            response,
            work_ns: 0,
            error: None,
            writes: Vec::new(),
            deadlines: Vec::new(),
        }
    }

    fn with_error(mut self, e: GpuError) -> Self {
        self.error = Some(e);
        self
    }

    /// A bare error answer with no side effects.
    pub fn error_response(code: u32) -> Self {
        Self::ok(Response::Err(code))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResourceKind {
    TwoD { format: u32 },
    ThreeD(ResourceCreate3d),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub kind: ResourceKind,
    pub width: u32,
    pub height: u32,
    /// Guest pages backing the resource, when attached.
    pub backing: Option<Vec<MemEntry>>,
}

impl Resource {
    fn backing_len(&self) -> u64 {
        self.backing
            .iter()
            .flatten()
            .map(|e| u64::from(e.length))
            .sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Context {
    pub name: String,
    pub context_init: u32,
    pub resources: BTreeSet<u32>,
}

/// The device's state.
///
/// # Invariants
///
/// `backing_entries` is the sum of the resources' backing lengths and
/// `attachments` the sum of the contexts' resource set sizes; these and the
/// table sizes stay within their [`Cap`]s.
#[derive(Debug, Default)]
pub struct Gpu {
    resources: HashMap<u32, Resource>,
    contexts: HashMap<u32, Context>,
    scanout: Option<u32>,
    cursor: Option<u32>,
    backing_entries: usize,
    attachments: usize,
    /// Requests refused by each cap, by [`Cap::index`].
    refused: [u64; 4],
}

impl Gpu {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn resource(&self, id: u32) -> Option<&Resource> {
        self.resources.get(&id)
    }

    pub fn context(&self, id: u32) -> Option<&Context> {
        self.contexts.get(&id)
    }

    /// What the device holds, as counted against the caps.
    pub fn usage(&self) -> Usage {
        Usage {
            resources: self.resources.len(),
            contexts: self.contexts.len(),
            backing_entries: self.backing_entries,
            attachments: self.attachments,
        }
    }

    /// Requests refused so far because they would have exceeded `cap`.
    pub fn refused(&self, cap: Cap) -> u64 {
        self.refused[cap.index()]
    }

    /// The resource shown on scanout 0, if any.
    pub fn scanout(&self) -> Option<u32> {
        self.scanout
    }

    /// Executes `cmd` (whose request header is `hdr`) and returns the response.
    pub fn execute(&mut self, hdr: &CtrlHdr, cmd: Command, mem: &dyn GuestRanges) -> Outcome {
        match self.run(hdr, cmd, mem) {
            Ok(outcome) => outcome,
            Err(e) => {
                if let GpuError::OverCap { cap, .. } = e {
                    self.note_refusal(cap, hdr, &e);
                }
                Outcome::error_response(e.response_code()).with_error(e)
            }
        }
    }

    /// Counts a refusal by `cap` and logs it when [`log_refusal`] says so.
    fn note_refusal(&mut self, cap: Cap, hdr: &CtrlHdr, e: &GpuError) {
        let n = &mut self.refused[cap.index()];
        *n += 1;
        if log_refusal(*n) {
            warn!(
                cmd = type_name(hdr.type_),
                ctx = hdr.ctx_id,
                refused = *n,
                "{e}: answered ERR_OUT_OF_MEMORY (refusals by this cap are logged at powers of two)"
            );
        }
    }

    /// Fails with [`GpuError::OverCap`] unless `want` more fit under `cap`.
    fn room(&self, cap: Cap, want: usize) -> Result<(), GpuError> {
        let have = self.usage().of(cap);
        if have.saturating_add(want) > cap.max() {
            return Err(GpuError::OverCap { cap, have, want });
        }
        Ok(())
    }

    fn run(
        &mut self,
        hdr: &CtrlHdr,
        cmd: Command,
        mem: &dyn GuestRanges,
    ) -> Result<Outcome, GpuError> {
        let nodata = || Ok(Outcome::ok(Response::NoData));
        match cmd {
            Command::GetDisplayInfo => {
                Ok(Outcome::ok(Response::DisplayInfo(Box::new(display_info()))))
            }
            Command::GetEdid { scanout } => {
                if scanout as usize >= VIRTIO_GPU_MAX_SCANOUTS {
                    return Err(GpuError::NoSuchScanout(scanout));
                }
                let mut r = RespEdid {
                    size: 128,
                    ..RespEdid::default()
                };
                r.edid[..128].copy_from_slice(&edid());
                Ok(Outcome::ok(Response::Edid(Box::new(r))))
            }
            Command::GetCapsetInfo { index } => Err(GpuError::NoSuchCapset { index }),
            Command::GetCapset { id, version } => Err(GpuError::UnknownCapset { id, version }),
            Command::ResourceCreate2d(c) => {
                if self.resources.contains_key(&c.resource_id) {
                    return Err(GpuError::ResourceExists(c.resource_id));
                }
                if !FORMATS_2D.contains(&c.format) {
                    return Err(GpuError::BadFormat(c.format));
                }
                if c.width == 0 || c.height == 0 {
                    return Err(GpuError::ZeroSize {
                        width: c.width,
                        height: c.height,
                    });
                }
                self.room(Cap::Resources, 1)?;
                self.resources.insert(
                    c.resource_id,
                    Resource {
                        kind: ResourceKind::TwoD { format: c.format },
                        width: c.width,
                        height: c.height,
                        backing: None,
                    },
                );
                nodata()
            }
            Command::ResourceCreate3d(c) => {
                if self.resources.contains_key(&c.resource_id) {
                    return Err(GpuError::ResourceExists(c.resource_id));
                }
                self.room(Cap::Resources, 1)?;
                self.resources.insert(
                    c.resource_id,
                    Resource {
                        kind: ResourceKind::ThreeD(c),
                        width: c.width,
                        height: c.height,
                        backing: None,
                    },
                );
                nodata()
            }
            Command::ResourceUnref { resource_id } => {
                let res = self
                    .resources
                    .remove(&resource_id)
                    .ok_or(GpuError::NoSuchResource(resource_id))?;
                self.backing_entries -= res.backing.map_or(0, |b| b.len());
                for ctx in self.contexts.values_mut() {
                    if ctx.resources.remove(&resource_id) {
                        self.attachments -= 1;
                    }
                }
                if self.scanout == Some(resource_id) {
                    self.scanout = None;
                }
                if self.cursor == Some(resource_id) {
                    self.cursor = None;
                }
                nodata()
            }
            Command::SetScanout(s) => {
                if s.scanout_id >= NUM_SCANOUTS {
                    return Err(GpuError::NoSuchScanout(s.scanout_id));
                }
                if s.resource_id == 0 {
                    self.scanout = None;
                    return nodata();
                }
                let res = self.get(s.resource_id)?;
                check_rect(s.resource_id, res, &s.r)?;
                self.scanout = Some(s.resource_id);
                nodata()
            }
            Command::ResourceFlush(f) => {
                let res = self.get(f.resource_id)?;
                check_rect(f.resource_id, res, &f.r)?;
                nodata()
            }
            Command::TransferToHost2d(t) => {
                let res = self.get(t.resource_id)?;
                check_rect(t.resource_id, res, &t.r)?;
                if res.backing.is_none() {
                    return Err(GpuError::NotBacked(t.resource_id));
                }
                let need =
                    transfer_2d_len(res.width, &t).ok_or(GpuError::TransferOutsideBacking {
                        resource_id: t.resource_id,
                        need: u64::MAX,
                        have: res.backing_len(),
                    })?;
                if need > res.backing_len() {
                    return Err(GpuError::TransferOutsideBacking {
                        resource_id: t.resource_id,
                        need,
                        have: res.backing_len(),
                    });
                }
                nodata()
            }
            Command::ResourceAttachBacking {
                resource_id,
                entries,
            } => {
                let res = self.get(resource_id)?;
                if res.backing.is_some() {
                    return Err(GpuError::AlreadyBacked(resource_id));
                }
                for (index, e) in entries.iter().enumerate() {
                    if !mem.contains(e.addr, u64::from(e.length)) {
                        return Err(GpuError::BackingOutsideMemory {
                            index,
                            addr: e.addr,
                            len: e.length,
                        });
                    }
                }
                self.room(Cap::BackingEntries, entries.len())?;
                if let Some(res) = self.resources.get_mut(&resource_id) {
                    self.backing_entries += entries.len();
                    res.backing = Some(entries);
                }
                nodata()
            }
            Command::ResourceDetachBacking { resource_id } => {
                let res = self
                    .resources
                    .get_mut(&resource_id)
                    .ok_or(GpuError::NoSuchResource(resource_id))?;
                let backing = res.backing.take().ok_or(GpuError::NotBacked(resource_id))?;
                self.backing_entries -= backing.len();
                nodata()
            }
            Command::CtxCreate {
                context_init,
                debug_name,
            } => {
                if hdr.ctx_id == 0 || self.contexts.contains_key(&hdr.ctx_id) {
                    return Err(GpuError::ContextExists(hdr.ctx_id));
                }
                self.room(Cap::Contexts, 1)?;
                debug!(ctx = hdr.ctx_id, name = %debug_name, "context created");
                self.contexts.insert(
                    hdr.ctx_id,
                    Context {
                        name: debug_name,
                        context_init,
                        resources: BTreeSet::new(),
                    },
                );
                nodata()
            }
            Command::CtxDestroy => {
                let ctx = self
                    .contexts
                    .remove(&hdr.ctx_id)
                    .ok_or(GpuError::NoSuchContext(hdr.ctx_id))?;
                self.attachments -= ctx.resources.len();
                nodata()
            }
            Command::CtxAttachResource { resource_id } => {
                self.get(resource_id)?;
                if !self.ctx_mut(hdr.ctx_id)?.resources.contains(&resource_id) {
                    self.room(Cap::Attachments, 1)?;
                    self.ctx_mut(hdr.ctx_id)?.resources.insert(resource_id);
                    self.attachments += 1;
                }
                nodata()
            }
            Command::CtxDetachResource { resource_id } => {
                self.get(resource_id)?;
                if self.ctx_mut(hdr.ctx_id)?.resources.remove(&resource_id) {
                    self.attachments -= 1;
                }
                nodata()
            }
            Command::TransferToHost3d(t) | Command::TransferFromHost3d(t) => {
                if hdr.ctx_id != 0 {
                    self.ctx_mut(hdr.ctx_id)?;
                }
                self.get(t.resource_id)?;
                nodata()
            }
            Command::Submit3d { payload } => {
                self.ctx_mut(hdr.ctx_id)?;
                self.submit_3d(hdr, &payload, mem)
            }
            Command::UpdateCursor(c) => {
                if c.pos.scanout_id >= NUM_SCANOUTS {
                    return Err(GpuError::NoSuchScanout(c.pos.scanout_id));
                }
                if c.resource_id == 0 {
                    self.cursor = None;
                } else {
                    self.get(c.resource_id)?;
                    self.cursor = Some(c.resource_id);
                }
                nodata()
            }
            Command::MoveCursor(c) => {
                if c.pos.scanout_id >= NUM_SCANOUTS {
                    return Err(GpuError::NoSuchScanout(c.pos.scanout_id));
                }
                nodata()
            }
        }
    }

    fn get(&self, id: u32) -> Result<&Resource, GpuError> {
        self.resources.get(&id).ok_or(GpuError::NoSuchResource(id))
    }

    fn ctx_mut(&mut self, id: u32) -> Result<&mut Context, GpuError> {
        self.contexts
            .get_mut(&id)
            .ok_or(GpuError::NoSuchContext(id))
    }
}

/// `SUBMIT_3D` and the fencelab ops it carries.
impl Gpu {
    /// Runs a `SUBMIT_3D` payload: a fencelab stream is interpreted, anything
    /// else is a foreign workload accepted as a no-op.
    ///
    /// `WRITE` and `DEADLINE` ops are resolved here, when the command arrives,
    /// and carried out by the fence engine: the writes land just before the
    /// fence's descriptor goes back to the guest, the hints act on fences
    /// already pending. A `WRITE` that cannot be resolved refuses the whole
    /// command (nothing is written, no `WORK` is simulated):
    ///
    /// - unknown resource: `RESP_ERR_INVALID_RESOURCE_ID`, as for every other
    ///   command naming a resource that does not exist;
    /// - a resource without backing, an offset whose 8 bytes do not fit in the
    ///   backing, or backing that is no longer guest memory:
    ///   `RESP_ERR_INVALID_PARAMETER`, as for a 2D transfer outside its backing.
    ///
    /// The resource need not be attached to the submitting context: the
    /// upstream driver attaches every BO the file creates to its context
    /// (`CTX_ATTACH_RESOURCE` at GEM handle creation), but a guest that does
    /// not should still be able to observe its fences; a WRITE outside the
    /// context is only logged.
    fn submit_3d(
        &self,
        hdr: &CtrlHdr,
        payload: &[u8],
        mem: &dyn GuestRanges,
    ) -> Result<Outcome, GpuError> {
        let mut outcome = Outcome::ok(Response::NoData);
        if !fencelab_stream::is_stream(payload) {
            return Ok(outcome);
        }
        for (index, op) in fencelab_stream::decode(payload)?.into_iter().enumerate() {
            match op {
                fencelab_stream::Op::Work { ns } => {
                    outcome.work_ns = outcome.work_ns.saturating_add(ns);
                }
                fencelab_stream::Op::Fail { err } => {
                    // The first FAIL decides the answer.
                    if !outcome.response.is_error() {
                        outcome.response = Response::Err(err);
                    }
                }
                fencelab_stream::Op::Write {
                    resource,
                    offset,
                    value,
                } => {
                    if self
                        .contexts
                        .get(&hdr.ctx_id)
                        .is_some_and(|c| !c.resources.contains(&resource))
                    {
                        debug!(
                            ctx = hdr.ctx_id,
                            resource, "WRITE to a resource not attached to the context"
                        );
                    }
                    let writes = self.resolve_write(index, resource, offset, value, mem)?;
                    outcome.writes.extend(writes);
                }
                fencelab_stream::Op::Deadline { fence, ns } => {
                    outcome.deadlines.push(DeadlineHint { fence, ns });
                }
            }
        }
        Ok(outcome)
    }

    /// Turns `WRITE{resource_id, offset, value}` (op number `op` of its
    /// stream) into guest-physical writes: the resource's backing entries,
    /// in order, form one linear byte range, and the value's 8
    /// little-endian bytes are split where they straddle two entries.
    fn resolve_write(
        &self,
        op: usize,
        resource_id: u32,
        offset: u64,
        value: u64,
        mem: &dyn GuestRanges,
    ) -> Result<Vec<GuestWrite>, GpuError> {
        let res = self
            .resources
            .get(&resource_id)
            .ok_or(GpuError::WriteNoSuchResource { op, resource_id })?;
        let backing = res
            .backing
            .as_deref()
            .ok_or(GpuError::WriteNotBacked { op, resource_id })?;
        let outside = || GpuError::WriteOutsideBacking {
            op,
            resource_id,
            offset,
            backing_len: res.backing_len(),
        };
        let end = offset.checked_add(WRITE_LEN).ok_or_else(outside)?;
        if end > res.backing_len() {
            return Err(outside());
        }
        let bytes = value.to_le_bytes();
        let mut writes = Vec::new();
        let mut entry_start = 0u64;
        for e in backing {
            let entry_end = entry_start + u64::from(e.length);
            let from = offset.max(entry_start);
            let to = end.min(entry_end);
            if from < to {
                let addr =
                    e.addr
                        .checked_add(from - entry_start)
                        .ok_or(GpuError::WriteOutsideMemory {
                            op,
                            resource_id,
                            addr: e.addr,
                            len: to - from,
                        })?;
                let len = to - from;
                if !mem.contains(addr, len) {
                    return Err(GpuError::WriteOutsideMemory {
                        op,
                        resource_id,
                        addr,
                        len,
                    });
                }
                let at = (from - offset) as usize;
                writes.push(GuestWrite {
                    addr,
                    bytes: bytes[at..at + len as usize].to_vec(),
                });
            }
            if entry_end >= end {
                break;
            }
            entry_start = entry_end;
        }
        Ok(writes)
    }
}

/// Checks that `r` lies inside `res`.
fn check_rect(resource_id: u32, res: &Resource, r: &Rect) -> Result<(), GpuError> {
    let fits =
        |start: u32, len: u32, limit: u32| start.checked_add(len).is_some_and(|end| end <= limit);
    if fits(r.x, r.width, res.width) && fits(r.y, r.height, res.height) {
        Ok(())
    } else {
        Err(GpuError::RectOutOfBounds {
            resource_id,
            r: *r,
            width: res.width,
            height: res.height,
        })
    }
}

/// Bytes of backing a 2D transfer reads: from `offset` to the end of the
/// last pixel of the rect's last row, with the resource's row stride.
/// `None` on overflow.
fn transfer_2d_len(res_width: u32, t: &TransferToHost2d) -> Option<u64> {
    if t.r.width == 0 || t.r.height == 0 {
        return Some(0);
    }
    let stride = u64::from(res_width).checked_mul(BPP)?;
    let last_row = u64::from(t.r.height - 1).checked_mul(stride)?;
    let row = u64::from(t.r.width).checked_mul(BPP)?;
    t.offset.checked_add(last_row)?.checked_add(row)
}

fn display_info() -> RespDisplayInfo {
    let mut r = RespDisplayInfo::default();
    r.pmodes[0] = DisplayOne {
        r: Rect {
            x: 0,
            y: 0,
            width: DISPLAY_WIDTH,
            height: DISPLAY_HEIGHT,
        },
        enabled: 1,
        flags: 0,
    };
    r
}

/// A 128-byte EDID 1.4 block for one 1024x768@60 (VESA DMT) digital display.
pub fn edid() -> [u8; 128] {
    let mut e = [0u8; 128];
    e[0..8].copy_from_slice(&[0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]);
    // Manufacturer "FNL": three 5-bit letters, big-endian.
    let id: u16 = ((b'F' - b'@') as u16) << 10 | ((b'N' - b'@') as u16) << 5 | (b'L' - b'@') as u16;
    e[8..10].copy_from_slice(&id.to_be_bytes());
    e[10..12].copy_from_slice(&1u16.to_le_bytes()); // product code
    // serial 12..16 = 0
    e[16] = 1; // week
    e[17] = 36; // year - 1990 = 2026
    e[18] = 1; // EDID 1.4
    e[19] = 4;
    e[20] = 0x80; // digital input
    e[21] = 27; // 27 cm x 20 cm
    e[22] = 20;
    e[23] = 120; // gamma 2.2
    e[24] = 0x06; // sRGB default colour space, preferred timing is native
    // Chromaticity: sRGB primaries.
    e[25..35].copy_from_slice(&[0xee, 0x91, 0xa3, 0x54, 0x4c, 0x99, 0x26, 0x0f, 0x50, 0x54]);
    e[35] = 0x00;
    e[36] = 0x08; // established timing 1024x768@60
    e[37] = 0x00;
    // Standard timings: 1024x768@60 (4:3), the rest unused.
    e[38] = (1024 / 8 - 31) as u8;
    e[39] = 0x40;
    for i in (40..54).step_by(2) {
        e[i] = 0x01;
        e[i + 1] = 0x01;
    }
    // Detailed timing: 65.00 MHz, 1024+24+136+160 x 768+3+6+29, -hsync -vsync.
    e[54..72].copy_from_slice(&[
        0x64, 0x19, // pixel clock 6500 x 10 kHz
        0x00, // h active low 8 bits (1024)
        0x40, // h blank low 8 bits (320)
        0x41, // h active hi 4 | h blank hi 4
        0x00, // v active low (768)
        0x26, // v blank low (38)
        0x30, // v active hi | v blank hi
        0x18, // h front porch 24
        0x88, // h sync 136
        0x36, // v front porch 3 | v sync 6
        0x00, // high bits of the porches and syncs
        0x0e, // image width 270 mm (low)
        0xcb, // image height 203 mm (low)
        0x10, // size high bits
        0x00, 0x00, // borders
        0x18, // digital separate sync, both negative
    ]);
    // Display product name.
    e[72..90].copy_from_slice(&[
        0x00, 0x00, 0x00, 0xfc, 0x00, b'f', b'e', b'n', b'c', b'e', b'l', b'a', b'b', 0x0a, 0x20,
        0x20, 0x20, 0x20,
    ]);
    // Range limits: 50-75 Hz vertical, 30-80 kHz horizontal, 80 MHz.
    e[90..108].copy_from_slice(&[
        0x00, 0x00, 0x00, 0xfd, 0x00, 50, 75, 30, 80, 8, 0x00, 0x0a, 0x20, 0x20, 0x20, 0x20, 0x20,
        0x20,
    ]);
    // Dummy descriptor.
    e[108..113].copy_from_slice(&[0x00, 0x00, 0x00, 0x10, 0x00]);
    e[126] = 0; // no extensions
    let sum = e[..127].iter().fold(0u8, |a, b| a.wrapping_add(*b));
    e[127] = 0u8.wrapping_sub(sum);
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::decode;
    use crate::decode::testutil::*;

    /// Guest memory: [0x1000_0000, 0x2000_0000).
    struct Ram;
    impl GuestRanges for Ram {
        fn contains(&self, addr: u64, len: u64) -> bool {
            addr >= 0x1000_0000 && addr.checked_add(len).is_some_and(|end| end <= 0x2000_0000)
        }
    }

    fn run(gpu: &mut Gpu, bytes: &[u8]) -> Outcome {
        let (h, c) = decode(bytes).expect("test request decodes");
        gpu.execute(&h, c, &Ram)
    }

    fn code(gpu: &mut Gpu, bytes: &[u8]) -> u32 {
        run(gpu, bytes).response.code()
    }

    fn create_2d(id: u32, w: u32, h: u32) -> Vec<u8> {
        let c = ResourceCreate2d {
            resource_id: id,
            format: FORMAT_B8G8R8X8_UNORM,
            width: w,
            height: h,
        };
        req(hdr(CMD_RESOURCE_CREATE_2D), &[c.as_slice()])
    }

    fn rid_req(ty: u32, ctx: u32, id: u32) -> Vec<u8> {
        let h = CtrlHdr {
            ctx_id: ctx,
            ..hdr(ty)
        };
        req(
            h,
            &[ResourceId {
                resource_id: id,
                padding: 0,
            }
            .as_slice()],
        )
    }

    fn ctx_create(ctx: u32) -> Vec<u8> {
        let h = CtrlHdr {
            ctx_id: ctx,
            ..hdr(CMD_CTX_CREATE)
        };
        req(h, &[CtxCreate::default().as_slice()])
    }

    fn entry(addr: u64, length: u32) -> MemEntry {
        MemEntry {
            addr,
            length,
            padding: 0,
        }
    }

    fn transfer(id: u32, r: Rect, offset: u64) -> Vec<u8> {
        let t = TransferToHost2d {
            r,
            offset,
            resource_id: id,
            padding: 0,
        };
        req(hdr(CMD_TRANSFER_TO_HOST_2D), &[t.as_slice()])
    }

    fn rect(x: u32, y: u32, width: u32, height: u32) -> Rect {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    #[test]
    fn display_info_reports_one_enabled_scanout() {
        let mut gpu = Gpu::new();
        let out = run(&mut gpu, &req(hdr(CMD_GET_DISPLAY_INFO), &[]));
        let bytes = out.response.encode(&hdr(CMD_GET_DISPLAY_INFO));
        let r: RespDisplayInfo = read_struct(&bytes).unwrap();
        assert_eq!(r.hdr.type_, RESP_OK_DISPLAY_INFO);
        assert_eq!(r.pmodes[0].enabled, 1);
        assert_eq!((r.pmodes[0].r.width, r.pmodes[0].r.height), (1024, 768));
        assert!(r.pmodes[1..].iter().all(|m| m.enabled == 0));
    }

    #[test]
    fn edid_is_valid_and_describes_1024x768() {
        let e = edid();
        assert_eq!(&e[..8], &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
        assert_eq!(e.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
        let dtd = &e[54..72];
        let clock_khz = u32::from(u16::from_le_bytes([dtd[0], dtd[1]])) * 10;
        let h_active = u32::from(dtd[2]) | (u32::from(dtd[4] >> 4) << 8);
        let h_blank = u32::from(dtd[3]) | (u32::from(dtd[4] & 0xf) << 8);
        let v_active = u32::from(dtd[5]) | (u32::from(dtd[7] >> 4) << 8);
        let v_blank = u32::from(dtd[6]) | (u32::from(dtd[7] & 0xf) << 8);
        assert_eq!((h_active, v_active), (1024, 768));
        let refresh =
            clock_khz as f64 * 1000.0 / f64::from((h_active + h_blank) * (v_active + v_blank));
        assert!((refresh - 60.0).abs() < 0.5, "refresh {refresh}");

        let mut gpu = Gpu::new();
        let ge = GetEdid {
            scanout: 0,
            padding: 0,
        };
        let out = run(&mut gpu, &req(hdr(CMD_GET_EDID), &[ge.as_slice()]));
        let bytes = out.response.encode(&hdr(CMD_GET_EDID));
        let r: RespEdid = read_struct(&bytes).unwrap();
        assert_eq!(r.hdr.type_, RESP_OK_EDID);
        assert_eq!(r.size, 128);
        assert_eq!(&r.edid[..128], &e[..]);
        let ge = GetEdid {
            scanout: 16,
            padding: 0,
        };
        assert_eq!(
            code(&mut gpu, &req(hdr(CMD_GET_EDID), &[ge.as_slice()])),
            RESP_ERR_INVALID_SCANOUT_ID
        );
    }

    #[test]
    fn no_capsets() {
        let mut gpu = Gpu::new();
        let ci = GetCapsetInfo {
            capset_index: 0,
            padding: 0,
        };
        assert_eq!(
            code(&mut gpu, &req(hdr(CMD_GET_CAPSET_INFO), &[ci.as_slice()])),
            RESP_ERR_INVALID_PARAMETER
        );
        let gc = GetCapset {
            capset_id: 1,
            capset_version: 0,
        };
        assert_eq!(
            code(&mut gpu, &req(hdr(CMD_GET_CAPSET), &[gc.as_slice()])),
            RESP_ERR_INVALID_PARAMETER
        );
    }

    #[test]
    fn fbdev_sequence() {
        // What Linux's fbdev emulation does: create, attach, scanout, transfer, flush.
        let mut gpu = Gpu::new();
        assert_eq!(code(&mut gpu, &create_2d(1, 1024, 768)), RESP_OK_NODATA);
        assert_eq!(
            code(&mut gpu, &create_2d(1, 8, 8)),
            RESP_ERR_INVALID_RESOURCE_ID
        );
        let size = 1024 * 768 * 4;
        assert_eq!(
            code(&mut gpu, &attach(1, &[entry(0x1000_0000, size)])),
            RESP_OK_NODATA
        );
        assert_eq!(gpu.resource(1).unwrap().backing.as_ref().unwrap().len(), 1);
        assert_eq!(
            code(&mut gpu, &attach(1, &[entry(0x1000_0000, 4)])),
            RESP_ERR_UNSPEC,
            "double attach"
        );
        let ss = SetScanout {
            r: rect(0, 0, 1024, 768),
            scanout_id: 0,
            resource_id: 1,
        };
        assert_eq!(
            code(&mut gpu, &req(hdr(CMD_SET_SCANOUT), &[ss.as_slice()])),
            RESP_OK_NODATA
        );
        assert_eq!(gpu.scanout(), Some(1));
        assert_eq!(
            code(&mut gpu, &transfer(1, rect(0, 0, 1024, 768), 0)),
            RESP_OK_NODATA
        );
        assert_eq!(
            code(&mut gpu, &transfer(1, rect(0, 0, 1024, 768), 4)),
            RESP_ERR_INVALID_PARAMETER,
            "reads past the backing"
        );
        assert_eq!(
            code(&mut gpu, &transfer(1, rect(1000, 0, 25, 1), 0)),
            RESP_ERR_INVALID_PARAMETER,
            "rect past the resource"
        );
        assert_eq!(
            code(&mut gpu, &transfer(1, rect(u32::MAX, 0, 2, 1), 0)),
            RESP_ERR_INVALID_PARAMETER,
            "overflowing rect"
        );
        assert_eq!(
            code(&mut gpu, &transfer(1, rect(0, 0, 1, 1), u64::MAX)),
            RESP_ERR_INVALID_PARAMETER,
            "overflowing offset"
        );
        let fl = ResourceFlush {
            r: rect(0, 0, 1024, 768),
            resource_id: 1,
            padding: 0,
        };
        assert_eq!(
            code(&mut gpu, &req(hdr(CMD_RESOURCE_FLUSH), &[fl.as_slice()])),
            RESP_OK_NODATA
        );
        assert_eq!(
            code(&mut gpu, &rid_req(CMD_RESOURCE_DETACH_BACKING, 0, 1)),
            RESP_OK_NODATA
        );
        assert_eq!(
            code(&mut gpu, &transfer(1, rect(0, 0, 1, 1), 0)),
            RESP_ERR_INVALID_PARAMETER,
            "no backing"
        );
        assert_eq!(
            code(&mut gpu, &rid_req(CMD_RESOURCE_DETACH_BACKING, 0, 1)),
            RESP_ERR_INVALID_PARAMETER
        );
        assert_eq!(
            code(&mut gpu, &rid_req(CMD_RESOURCE_UNREF, 0, 1)),
            RESP_OK_NODATA
        );
        assert_eq!(gpu.scanout(), None, "unref drops the scanout");
        assert!(gpu.resource(1).is_none());
        assert_eq!(
            code(&mut gpu, &rid_req(CMD_RESOURCE_UNREF, 0, 1)),
            RESP_ERR_INVALID_RESOURCE_ID
        );
    }

    #[test]
    fn create_2d_validates() {
        let mut gpu = Gpu::new();
        let mut c = ResourceCreate2d {
            resource_id: 2,
            format: 99,
            width: 4,
            height: 4,
        };
        assert_eq!(
            code(&mut gpu, &req(hdr(CMD_RESOURCE_CREATE_2D), &[c.as_slice()])),
            RESP_ERR_INVALID_PARAMETER
        );
        c.format = FORMAT_R8G8B8A8_UNORM;
        c.height = 0;
        assert_eq!(
            code(&mut gpu, &req(hdr(CMD_RESOURCE_CREATE_2D), &[c.as_slice()])),
            RESP_ERR_INVALID_PARAMETER
        );
        assert!(gpu.resource(2).is_none());
    }

    #[test]
    fn attach_backing_checks_guest_memory() {
        let mut gpu = Gpu::new();
        code(&mut gpu, &create_2d(1, 16, 16));
        let out = run(
            &mut gpu,
            &attach(1, &[entry(0x1000_0000, 4096), entry(0x1fff_f000, 0x1001)]),
        );
        assert_eq!(out.response.code(), RESP_ERR_INVALID_PARAMETER);
        assert_eq!(
            out.error,
            Some(GpuError::BackingOutsideMemory {
                index: 1,
                addr: 0x1fff_f000,
                len: 0x1001
            })
        );
        assert!(
            gpu.resource(1).unwrap().backing.is_none(),
            "nothing attached"
        );
        assert_eq!(
            code(&mut gpu, &attach(1, &[entry(u64::MAX - 1, 16)])),
            RESP_ERR_INVALID_PARAMETER,
            "wrapping address"
        );
        assert_eq!(
            code(&mut gpu, &attach(7, &[entry(0x1000_0000, 16)])),
            RESP_ERR_INVALID_RESOURCE_ID
        );
    }

    #[test]
    fn set_scanout_validates() {
        let mut gpu = Gpu::new();
        code(&mut gpu, &create_2d(1, 64, 64));
        let mut ss = SetScanout {
            r: rect(0, 0, 64, 64),
            scanout_id: 1,
            resource_id: 1,
        };
        assert_eq!(
            code(&mut gpu, &req(hdr(CMD_SET_SCANOUT), &[ss.as_slice()])),
            RESP_ERR_INVALID_SCANOUT_ID
        );
        ss.scanout_id = 0;
        ss.resource_id = 9;
        assert_eq!(
            code(&mut gpu, &req(hdr(CMD_SET_SCANOUT), &[ss.as_slice()])),
            RESP_ERR_INVALID_RESOURCE_ID
        );
        ss.resource_id = 1;
        ss.r = rect(0, 0, 65, 64);
        assert_eq!(
            code(&mut gpu, &req(hdr(CMD_SET_SCANOUT), &[ss.as_slice()])),
            RESP_ERR_INVALID_PARAMETER
        );
        ss.resource_id = 0;
        assert_eq!(
            code(&mut gpu, &req(hdr(CMD_SET_SCANOUT), &[ss.as_slice()])),
            RESP_OK_NODATA,
            "resource 0 disables"
        );
    }

    #[test]
    fn contexts_and_3d() {
        let mut gpu = Gpu::new();
        assert_eq!(code(&mut gpu, &ctx_create(0)), RESP_ERR_INVALID_CONTEXT_ID);
        assert_eq!(code(&mut gpu, &ctx_create(1)), RESP_OK_NODATA);
        assert_eq!(code(&mut gpu, &ctx_create(1)), RESP_ERR_INVALID_CONTEXT_ID);
        let c3 = ResourceCreate3d {
            resource_id: 5,
            width: 4096,
            height: 1,
            depth: 1,
            array_size: 1,
            ..ResourceCreate3d::default()
        };
        assert_eq!(
            code(
                &mut gpu,
                &req(hdr(CMD_RESOURCE_CREATE_3D), &[c3.as_slice()])
            ),
            RESP_OK_NODATA
        );
        assert_eq!(
            code(&mut gpu, &rid_req(CMD_CTX_ATTACH_RESOURCE, 1, 5)),
            RESP_OK_NODATA
        );
        assert!(gpu.context(1).unwrap().resources.contains(&5));
        assert_eq!(
            code(&mut gpu, &rid_req(CMD_CTX_ATTACH_RESOURCE, 2, 5)),
            RESP_ERR_INVALID_CONTEXT_ID
        );
        assert_eq!(
            code(&mut gpu, &rid_req(CMD_CTX_ATTACH_RESOURCE, 1, 6)),
            RESP_ERR_INVALID_RESOURCE_ID
        );
        let t3 = TransferHost3d {
            resource_id: 5,
            ..TransferHost3d::default()
        };
        let h = CtrlHdr {
            ctx_id: 1,
            ..fenced(CMD_TRANSFER_TO_HOST_3D, 1, 3)
        };
        assert_eq!(code(&mut gpu, &req(h, &[t3.as_slice()])), RESP_OK_NODATA);
        let h = CtrlHdr {
            ctx_id: 3,
            ..hdr(CMD_TRANSFER_FROM_HOST_3D)
        };
        assert_eq!(
            code(&mut gpu, &req(h, &[t3.as_slice()])),
            RESP_ERR_INVALID_CONTEXT_ID
        );
        let t3 = TransferHost3d {
            resource_id: 8,
            ..TransferHost3d::default()
        };
        assert_eq!(
            code(
                &mut gpu,
                &req(hdr(CMD_TRANSFER_FROM_HOST_3D), &[t3.as_slice()])
            ),
            RESP_ERR_INVALID_RESOURCE_ID
        );
        assert_eq!(
            code(&mut gpu, &rid_req(CMD_CTX_DETACH_RESOURCE, 1, 5)),
            RESP_OK_NODATA
        );
        assert!(gpu.context(1).unwrap().resources.is_empty());
        let destroy = req(
            CtrlHdr {
                ctx_id: 1,
                ..hdr(CMD_CTX_DESTROY)
            },
            &[],
        );
        assert_eq!(code(&mut gpu, &destroy), RESP_OK_NODATA);
        assert_eq!(code(&mut gpu, &destroy), RESP_ERR_INVALID_CONTEXT_ID);
    }

    #[test]
    fn submit_3d_interprets_fencelab_streams() {
        use fencelab_stream::{Op, encode};
        let mut gpu = Gpu::new();
        code(&mut gpu, &ctx_create(1));
        let h = fenced(CMD_SUBMIT_3D, 1, 7);

        let out = run(&mut gpu, &submit(h, b"virgl-opaque-bytes"));
        assert_eq!(out.response, Response::NoData);
        assert_eq!(out.work_ns, 0);

        let s = encode(&[Op::Work { ns: 1000 }, Op::Work { ns: 500 }]);
        let out = run(&mut gpu, &submit(h, &s));
        assert_eq!(out.response, Response::NoData);
        assert_eq!(out.work_ns, 1500);

        let s = encode(&[Op::Work { ns: u64::MAX }, Op::Work { ns: 5 }]);
        assert_eq!(run(&mut gpu, &submit(h, &s)).work_ns, u64::MAX, "saturates");

        let s = encode(&[
            Op::Fail {
                err: RESP_ERR_OUT_OF_MEMORY,
            },
            Op::Work { ns: 10 },
            Op::Fail {
                err: RESP_ERR_UNSPEC,
            },
        ]);
        let out = run(&mut gpu, &submit(h, &s));
        assert_eq!(out.response, Response::Err(RESP_ERR_OUT_OF_MEMORY));
        assert_eq!(out.work_ns, 10);
        let bytes = out.response.encode(&h);
        let rh: CtrlHdr = read_struct(&bytes).unwrap();
        assert_eq!(rh.type_, RESP_ERR_OUT_OF_MEMORY);
        assert_eq!(
            (rh.fence_id, rh.ctx_id, rh.flags),
            (7, 1, VIRTIO_GPU_FLAG_FENCE)
        );

        let s = encode(&[Op::Deadline { fence: 7, ns: 1 }, Op::Work { ns: 3 }]);
        let out = run(&mut gpu, &submit(h, &s));
        assert_eq!(out.response, Response::NoData);
        assert_eq!(out.deadlines, vec![DeadlineHint { fence: 7, ns: 1 }]);
        assert!(out.writes.is_empty());

        let mut bad = encode(&[Op::Work { ns: 1 }]);
        bad[8] = 0x55;
        let out = run(&mut gpu, &submit(h, &bad));
        assert_eq!(out.response, Response::Err(RESP_ERR_INVALID_PARAMETER));
        assert!(matches!(out.error, Some(GpuError::Stream(_))));

        let h = fenced(CMD_SUBMIT_3D, 2, 8);
        assert_eq!(
            run(&mut gpu, &submit(h, b"")).response,
            Response::Err(RESP_ERR_INVALID_CONTEXT_ID)
        );
    }

    /// A 3D resource `id` backed by `entries`, attached to context 1.
    fn backed_3d(gpu: &mut Gpu, id: u32, entries: &[MemEntry]) {
        let c3 = ResourceCreate3d {
            resource_id: id,
            width: 4096,
            height: 1,
            depth: 1,
            array_size: 1,
            ..ResourceCreate3d::default()
        };
        let create = req(hdr(CMD_RESOURCE_CREATE_3D), &[c3.as_slice()]);
        assert_eq!(code(gpu, &create), RESP_OK_NODATA);
        assert_eq!(code(gpu, &attach(id, entries)), RESP_OK_NODATA);
    }

    fn write_op(resource: u32, offset: u64, value: u64) -> Vec<u8> {
        fencelab_stream::encode(&[fencelab_stream::Op::Write {
            resource,
            offset,
            value,
        }])
    }

    #[test]
    fn write_resolves_into_one_backing_entry() {
        let mut gpu = Gpu::new();
        code(&mut gpu, &ctx_create(1));
        backed_3d(
            &mut gpu,
            5,
            &[entry(0x1000_0000, 4096), entry(0x1800_0000, 4096)],
        );
        let h = fenced(CMD_SUBMIT_3D, 1, 9);
        let value = 0x0807_0605_0403_0201u64;

        let out = run(&mut gpu, &submit(h, &write_op(5, 16, value)));
        assert_eq!(out.response, Response::NoData, "{:?}", out.error);
        assert_eq!(
            out.writes,
            vec![GuestWrite {
                addr: 0x1000_0010,
                bytes: vec![1, 2, 3, 4, 5, 6, 7, 8]
            }]
        );

        // In the second entry: offset 4096 + 8 is 8 bytes into it.
        let out = run(&mut gpu, &submit(h, &write_op(5, 4096 + 8, value)));
        assert_eq!(
            out.writes,
            vec![GuestWrite {
                addr: 0x1800_0008,
                bytes: value.to_le_bytes().to_vec()
            }]
        );

        // The last 8 bytes of the backing.
        let out = run(&mut gpu, &submit(h, &write_op(5, 8192 - 8, 1)));
        assert_eq!(out.writes.len(), 1);
        assert_eq!(out.writes[0].addr, 0x1800_0ff8);
    }

    #[test]
    fn write_straddling_two_entries_is_split() {
        let mut gpu = Gpu::new();
        code(&mut gpu, &ctx_create(1));
        // Three entries: 4096 bytes, 3 bytes, 4096 bytes, far apart.
        backed_3d(
            &mut gpu,
            6,
            &[
                entry(0x1000_0000, 4096),
                entry(0x1200_0000, 3),
                entry(0x1400_0000, 4096),
            ],
        );
        let h = fenced(CMD_SUBMIT_3D, 1, 9);
        let value = 0x0807_0605_0403_0201u64;
        // Starts 2 bytes before the end of entry 0, covers all of entry 1,
        // ends 3 bytes into entry 2.
        let out = run(&mut gpu, &submit(h, &write_op(6, 4094, value)));
        assert_eq!(out.response, Response::NoData, "{:?}", out.error);
        assert_eq!(
            out.writes,
            vec![
                GuestWrite {
                    addr: 0x1000_0ffe,
                    bytes: vec![1, 2]
                },
                GuestWrite {
                    addr: 0x1200_0000,
                    bytes: vec![3, 4, 5]
                },
                GuestWrite {
                    addr: 0x1400_0000,
                    bytes: vec![6, 7, 8]
                },
            ]
        );
        let total: usize = out.writes.iter().map(|w| w.bytes.len()).sum();
        assert_eq!(total as u64, WRITE_LEN);
    }

    #[test]
    fn several_writes_keep_stream_order_with_work_and_deadlines() {
        use fencelab_stream::{Op, encode};
        let mut gpu = Gpu::new();
        code(&mut gpu, &ctx_create(1));
        backed_3d(&mut gpu, 5, &[entry(0x1000_0000, 4096)]);
        let s = encode(&[
            Op::Write {
                resource: 5,
                offset: 8,
                value: 2,
            },
            Op::Work { ns: 100 },
            Op::Deadline { fence: 3, ns: 50 },
            Op::Write {
                resource: 5,
                offset: 0,
                value: 1,
            },
            Op::Deadline { fence: 4, ns: 60 },
        ]);
        let out = run(&mut gpu, &submit(fenced(CMD_SUBMIT_3D, 1, 4), &s));
        assert_eq!(out.response, Response::NoData);
        assert_eq!(out.work_ns, 100);
        let addrs: Vec<u64> = out.writes.iter().map(|w| w.addr).collect();
        assert_eq!(addrs, vec![0x1000_0008, 0x1000_0000]);
        assert_eq!(
            out.deadlines,
            vec![
                DeadlineHint { fence: 3, ns: 50 },
                DeadlineHint { fence: 4, ns: 60 }
            ]
        );
    }

    #[test]
    fn bad_writes_refuse_the_command_precisely() {
        let mut gpu = Gpu::new();
        code(&mut gpu, &ctx_create(1));
        backed_3d(&mut gpu, 5, &[entry(0x1000_0000, 16)]);
        let c3 = ResourceCreate3d {
            resource_id: 7,
            width: 64,
            height: 1,
            ..ResourceCreate3d::default()
        };
        code(
            &mut gpu,
            &req(hdr(CMD_RESOURCE_CREATE_3D), &[c3.as_slice()]),
        );
        let h = fenced(CMD_SUBMIT_3D, 1, 9);
        let refused = |gpu: &mut Gpu, payload: &[u8]| {
            let out = run(gpu, &submit(h, payload));
            assert!(out.writes.is_empty(), "nothing is written");
            assert_eq!(out.work_ns, 0);
            (out.response.code(), out.error.expect("an error is given"))
        };

        let mut two = write_op(5, 0, 1);
        two.extend_from_slice(&write_op(9, 0, 1)[fencelab_stream::HEADER_LEN..]);
        assert_eq!(
            refused(&mut gpu, &two),
            (
                RESP_ERR_INVALID_RESOURCE_ID,
                GpuError::WriteNoSuchResource {
                    op: 1,
                    resource_id: 9
                }
            )
        );
        assert_eq!(
            refused(&mut gpu, &write_op(7, 0, 1)),
            (
                RESP_ERR_INVALID_PARAMETER,
                GpuError::WriteNotBacked {
                    op: 0,
                    resource_id: 7
                }
            )
        );
        for offset in [9, 16, u64::MAX - 7, u64::MAX] {
            let (code, error) = refused(&mut gpu, &write_op(5, offset, 1));
            assert_eq!(code, RESP_ERR_INVALID_PARAMETER);
            assert_eq!(
                error,
                GpuError::WriteOutsideBacking {
                    op: 0,
                    resource_id: 5,
                    offset,
                    backing_len: 16
                }
            );
            assert!(error.to_string().contains("outside resource 5"), "{error}");
        }
        // 8 is the last offset that fits.
        assert_eq!(
            run(&mut gpu, &submit(h, &write_op(5, 8, 1))).response,
            Response::NoData
        );
    }

    #[test]
    fn write_into_backing_that_left_guest_memory_is_refused() {
        /// Guest memory that shrank after the backing was attached.
        struct Shrunk;
        impl GuestRanges for Shrunk {
            fn contains(&self, addr: u64, len: u64) -> bool {
                addr >= 0x1000_0000 && addr.checked_add(len).is_some_and(|e| e <= 0x1000_1000)
            }
        }
        let mut gpu = Gpu::new();
        code(&mut gpu, &ctx_create(1));
        backed_3d(
            &mut gpu,
            5,
            &[entry(0x1000_0000, 4096), entry(0x1800_0000, 4096)],
        );
        let (h, c) = decode(&submit(fenced(CMD_SUBMIT_3D, 1, 9), &write_op(5, 4092, 1))).unwrap();
        let out = gpu.execute(&h, c, &Shrunk);
        assert_eq!(out.response, Response::Err(RESP_ERR_INVALID_PARAMETER));
        assert_eq!(
            out.error,
            Some(GpuError::WriteOutsideMemory {
                op: 0,
                resource_id: 5,
                addr: 0x1800_0000,
                len: 4
            })
        );
        assert!(out.writes.is_empty());
    }

    #[test]
    fn write_to_a_resource_outside_the_context_is_still_resolved() {
        let mut gpu = Gpu::new();
        code(&mut gpu, &ctx_create(1));
        code(&mut gpu, &ctx_create(2));
        backed_3d(&mut gpu, 5, &[entry(0x1000_0000, 4096)]);
        assert_eq!(
            code(&mut gpu, &rid_req(CMD_CTX_ATTACH_RESOURCE, 1, 5)),
            RESP_OK_NODATA
        );
        let out = run(
            &mut gpu,
            &submit(fenced(CMD_SUBMIT_3D, 2, 3), &write_op(5, 0, 7)),
        );
        assert_eq!(out.response, Response::NoData);
        assert_eq!(out.writes.len(), 1);
    }

    #[test]
    fn cursor_commands() {
        let mut gpu = Gpu::new();
        code(&mut gpu, &create_2d(3, 64, 64));
        let mut c = UpdateCursor {
            resource_id: 3,
            ..UpdateCursor::default()
        };
        assert_eq!(
            code(&mut gpu, &req(hdr(CMD_UPDATE_CURSOR), &[c.as_slice()])),
            RESP_OK_NODATA
        );
        c.resource_id = 4;
        assert_eq!(
            code(&mut gpu, &req(hdr(CMD_UPDATE_CURSOR), &[c.as_slice()])),
            RESP_ERR_INVALID_RESOURCE_ID
        );
        c.pos.scanout_id = 5;
        assert_eq!(
            code(&mut gpu, &req(hdr(CMD_MOVE_CURSOR), &[c.as_slice()])),
            RESP_ERR_INVALID_SCANOUT_ID
        );
    }

    /// Executes `cmd` in context `ctx`; returns the response code.
    fn exec(gpu: &mut Gpu, ctx: u32, cmd: Command) -> u32 {
        let h = CtrlHdr {
            ctx_id: ctx,
            ..CtrlHdr::default()
        };
        gpu.execute(&h, cmd, &Ram).response.code()
    }

    fn new_2d(id: u32) -> Command {
        Command::ResourceCreate2d(ResourceCreate2d {
            resource_id: id,
            format: FORMAT_B8G8R8X8_UNORM,
            width: 1,
            height: 1,
        })
    }

    fn new_ctx() -> Command {
        Command::CtxCreate {
            context_init: 0,
            debug_name: String::new(),
        }
    }

    fn attach_backing_of(resource_id: u32, n: usize) -> Command {
        Command::ResourceAttachBacking {
            resource_id,
            entries: vec![entry(0x1000_0000, 4096); n],
        }
    }

    /// The last refusal of `cap`, checked to have changed nothing.
    fn assert_refused(gpu: &mut Gpu, ctx: u32, cmd: Command, cap: Cap) {
        let (usage, refused) = (gpu.usage(), gpu.refused(cap));
        assert_eq!(exec(gpu, ctx, cmd), RESP_ERR_OUT_OF_MEMORY, "{cap}");
        assert_eq!(
            gpu.usage(),
            usage,
            "a refusal by the {cap} cap changed nothing"
        );
        assert_eq!(gpu.refused(cap), refused + 1);
    }

    #[test]
    fn resources_are_capped_and_unref_gives_the_room_back() {
        let mut gpu = Gpu::new();
        for id in 1..=MAX_RESOURCES as u32 {
            assert_eq!(exec(&mut gpu, 0, new_2d(id)), RESP_OK_NODATA);
        }
        assert_eq!(gpu.usage().resources, MAX_RESOURCES);
        let next = MAX_RESOURCES as u32 + 1;
        assert_refused(&mut gpu, 0, new_2d(next), Cap::Resources);
        let create_3d = || {
            Command::ResourceCreate3d(ResourceCreate3d {
                resource_id: next,
                width: 1,
                height: 1,
                ..ResourceCreate3d::default()
            })
        };
        assert_refused(&mut gpu, 0, create_3d(), Cap::Resources);
        assert!(gpu.resource(next).is_none());
        // An existing id is still answered as such, not as out of memory.
        assert_eq!(exec(&mut gpu, 0, new_2d(1)), RESP_ERR_INVALID_RESOURCE_ID);
        let e = gpu.execute(&CtrlHdr::default(), new_2d(next), &Ram).error;
        assert_eq!(
            e,
            Some(GpuError::OverCap {
                cap: Cap::Resources,
                have: MAX_RESOURCES,
                want: 1
            })
        );
        assert!(e.unwrap().logged_by_gpu());
        assert_eq!(
            exec(&mut gpu, 0, Command::ResourceUnref { resource_id: 7 }),
            RESP_OK_NODATA
        );
        assert_eq!(exec(&mut gpu, 0, create_3d()), RESP_OK_NODATA);
        assert_refused(&mut gpu, 0, new_2d(7), Cap::Resources);
    }

    #[test]
    fn contexts_are_capped_and_destroy_gives_the_room_back() {
        let mut gpu = Gpu::new();
        for ctx in 1..=MAX_CONTEXTS as u32 {
            assert_eq!(exec(&mut gpu, ctx, new_ctx()), RESP_OK_NODATA);
        }
        let next = MAX_CONTEXTS as u32 + 1;
        assert_refused(&mut gpu, next, new_ctx(), Cap::Contexts);
        assert!(gpu.context(next).is_none());
        assert_eq!(exec(&mut gpu, 1, new_ctx()), RESP_ERR_INVALID_CONTEXT_ID);
        assert_eq!(exec(&mut gpu, 5, Command::CtxDestroy), RESP_OK_NODATA);
        assert_eq!(exec(&mut gpu, next, new_ctx()), RESP_OK_NODATA);
        assert_refused(&mut gpu, 5, new_ctx(), Cap::Contexts);
    }

    #[test]
    fn backing_entries_are_capped_in_all_and_detach_and_unref_give_them_back() {
        let mut gpu = Gpu::new();
        let per = crate::decode::MAX_MEM_ENTRIES as usize;
        let full = (MAX_BACKING_ENTRIES / per) as u32;
        for id in 1..=full + 1 {
            assert_eq!(exec(&mut gpu, 0, new_2d(id)), RESP_OK_NODATA);
        }
        for id in 1..=full {
            assert_eq!(
                exec(&mut gpu, 0, attach_backing_of(id, per)),
                RESP_OK_NODATA
            );
        }
        assert_eq!(gpu.usage().backing_entries, MAX_BACKING_ENTRIES);
        let spare = full + 1;
        assert_refused(
            &mut gpu,
            0,
            attach_backing_of(spare, 1),
            Cap::BackingEntries,
        );
        assert_eq!(gpu.resource(spare).unwrap().backing, None);
        // Detaching gives back exactly what was attached.
        let detach = Command::ResourceDetachBacking { resource_id: 1 };
        assert_eq!(exec(&mut gpu, 0, detach), RESP_OK_NODATA);
        assert_eq!(gpu.usage().backing_entries, MAX_BACKING_ENTRIES - per);
        assert_eq!(
            exec(&mut gpu, 0, attach_backing_of(spare, per)),
            RESP_OK_NODATA
        );
        assert_refused(&mut gpu, 0, attach_backing_of(1, 1), Cap::BackingEntries);
        // So does unref of a backed resource.
        let unref = Command::ResourceUnref { resource_id: 2 };
        assert_eq!(exec(&mut gpu, 0, unref), RESP_OK_NODATA);
        assert_eq!(gpu.usage().backing_entries, MAX_BACKING_ENTRIES - per);
        assert_eq!(exec(&mut gpu, 0, attach_backing_of(1, per)), RESP_OK_NODATA);
        assert_eq!(gpu.usage().backing_entries, MAX_BACKING_ENTRIES);
    }

    #[test]
    fn attachments_are_capped_and_detach_destroy_and_unref_give_them_back() {
        let mut gpu = Gpu::new();
        let resources = MAX_RESOURCES as u32;
        let contexts = (MAX_ATTACHMENTS / MAX_RESOURCES) as u32;
        for id in 1..=resources {
            exec(&mut gpu, 0, new_2d(id));
        }
        for ctx in 1..=contexts + 1 {
            exec(&mut gpu, ctx, new_ctx());
        }
        let attach = |resource_id| Command::CtxAttachResource { resource_id };
        for ctx in 1..=contexts {
            for id in 1..=resources {
                assert_eq!(exec(&mut gpu, ctx, attach(id)), RESP_OK_NODATA);
            }
        }
        assert_eq!(gpu.usage().attachments, MAX_ATTACHMENTS);
        let spare = contexts + 1;
        assert_refused(&mut gpu, spare, attach(1), Cap::Attachments);
        // Attaching again what is attached takes no room.
        assert_eq!(exec(&mut gpu, 1, attach(1)), RESP_OK_NODATA);
        let detach = Command::CtxDetachResource { resource_id: 1 };
        assert_eq!(exec(&mut gpu, 1, detach), RESP_OK_NODATA);
        assert_eq!(exec(&mut gpu, spare, attach(1)), RESP_OK_NODATA);
        assert_refused(&mut gpu, 1, attach(1), Cap::Attachments);
        // Unref detaches the resource from every context (here 16).
        let unref = Command::ResourceUnref { resource_id: 2 };
        assert_eq!(exec(&mut gpu, 0, unref), RESP_OK_NODATA);
        assert_eq!(gpu.usage().attachments, MAX_ATTACHMENTS - contexts as usize);
        assert_eq!(exec(&mut gpu, 2, Command::CtxDestroy), RESP_OK_NODATA);
        assert_eq!(
            gpu.usage().attachments,
            MAX_ATTACHMENTS - contexts as usize - (MAX_RESOURCES - 1)
        );
        assert_eq!(exec(&mut gpu, 1, attach(1)), RESP_OK_NODATA);
    }

    #[test]
    fn refusals_are_logged_at_powers_of_two() {
        let logged: Vec<u64> = (1..=10_000).filter(|&n| log_refusal(n)).collect();
        assert_eq!(logged.len(), 14);
        assert_eq!(logged[..5], [1, 2, 4, 8, 16]);
    }
}
