//! An in-process vhost-user frontend, as QEMU would drive the backend: a
//! `vhost::Frontend` over a unix socket, guest memory in a memfd, and a
//! split virtqueue written by hand in that memory. Plus scripted deciders
//! and a recording tracer for the fault tests.

#![allow(dead_code)] // each test file uses part of the harness

pub mod process;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use fencelab_device::backend::{self, DeviceConfig, FencelabGpu};
use fencelab_device::fault::{Decide, Decision, FenceInfo, TraceEvent};
use fencelab_device::protocol::*;
use fencelab_device::stats::Stats;
pub use fencelab_device::trace::MemoryTrace;
use fencelab_stream::Op;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Address, ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub const GPA: u64 = 0x10_0000;
pub const MEM_SIZE: usize = 0x40_0000;
pub const QSIZE: u16 = 256;
pub const DESC: u64 = GPA;
pub const AVAIL: u64 = GPA + 0x1000;
pub const USED: u64 = GPA + 0x2000;
/// Scratch memory tests use as resource backing.
pub const SCRATCH: u64 = GPA + 0x1_0000;
pub const SCRATCH_LEN: u32 = 0x1_0000;
pub const DATA: u64 = GPA + 0x2_0000;

pub const VIRTIO_RING_F_EVENT_IDX: u64 = 29;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// Split-ring descriptor flags, for chains built by hand ([`RawDesc`]).
pub const VRING_DESC_F_NEXT: u16 = F_NEXT;
pub const VRING_DESC_F_WRITE: u16 = F_WRITE;
pub const VRING_DESC_F_INDIRECT: u16 = 4;

/// One split-ring descriptor as a test writes it, malformed or not.
#[derive(Clone, Copy, Debug)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl RawDesc {
    /// A device-readable descriptor that ends its chain.
    pub fn readable(addr: u64, len: u32) -> Self {
        RawDesc {
            addr,
            len,
            flags: 0,
            next: 0,
        }
    }

    /// A device-writable descriptor that ends its chain.
    pub fn writable(addr: u64, len: u32) -> Self {
        RawDesc {
            addr,
            len,
            flags: F_WRITE,
            next: 0,
        }
    }

    /// The same descriptor, continued at descriptor `next`.
    pub fn then(self, next: u16) -> Self {
        RawDesc {
            flags: self.flags | F_NEXT,
            next,
            ..self
        }
    }

    /// A descriptor pointing at an indirect table of `entries` descriptors.
    pub fn indirect(table: u64, entries: usize) -> Self {
        RawDesc {
            addr: table,
            len: (entries * 16) as u32,
            flags: VRING_DESC_F_INDIRECT,
            next: 0,
        }
    }
}

/// Where one split virtqueue lives in test memory, and where its driver
/// allocates buffers (up to [`Rings::data_end`]).
#[derive(Clone, Copy, Debug)]
pub struct Rings {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub data: u64,
    pub data_end: u64,
}

/// The control queue's rings ([`Driver::new`]): buffers from [`DATA`] to
/// the end of memory.
pub const CONTROL_RINGS: Rings = Rings {
    desc: DESC,
    avail: AVAIL,
    used: USED,
    data: DATA,
    data_end: GPA + MEM_SIZE as u64,
};

/// Rings for the cursor queue, clear of [`CONTROL_RINGS`]' tables and of
/// the scratch area; its buffers take the last 512 KiB of memory, which a
/// control-queue driver sharing the memory must then leave alone.
pub const CURSOR_RINGS: Rings = Rings {
    desc: GPA + 0x4000,
    avail: GPA + 0x5000,
    used: GPA + 0x6000,
    data: GPA + MEM_SIZE as u64 - 0x8_0000,
    data_end: GPA + MEM_SIZE as u64,
};

/// The driver side of one split virtqueue in test memory.
pub struct Driver {
    pub mem: GuestMemoryMmap,
    next_desc: u16,
    avail_idx: u16,
    data: u64,
    rings: Rings,
}

impl Driver {
    pub fn new(mem: GuestMemoryMmap) -> Self {
        Self::with_rings(mem, CONTROL_RINGS)
    }

    /// A driver for a queue whose rings are at `rings`.
    pub fn with_rings(mem: GuestMemoryMmap, rings: Rings) -> Self {
        Driver {
            mem,
            next_desc: 0,
            avail_idx: 0,
            data: rings.data,
            rings,
        }
    }

    fn alloc(&mut self, len: usize) -> u64 {
        let at = self.data;
        self.data += (len as u64 + 15) & !15;
        assert!(
            self.data <= self.rings.data_end,
            "test driver out of memory"
        );
        at
    }

    fn desc(&mut self, addr: u64, len: u32, flags: u16) -> u16 {
        let i = self.next_desc;
        self.next_desc = (self.next_desc + 1) % QSIZE;
        let at = GuestAddress(self.rings.desc + u64::from(i) * 16);
        let next = (i + 1) % QSIZE;
        self.write_raw_desc(
            at,
            RawDesc {
                addr,
                len,
                flags,
                next,
            },
        );
        i
    }

    /// Posts a chain: one readable descriptor per part, then a writable
    /// response buffer of `resp_len` bytes (none when 0). Returns the head
    /// descriptor and the response buffer's address.
    pub fn post_chain(&mut self, parts: &[&[u8]], resp_len: u32) -> (u16, u64) {
        let mut head = None;
        let n = parts.len() + usize::from(resp_len > 0);
        let mut resp_addr = 0;
        for (k, p) in parts.iter().enumerate() {
            let addr = self.alloc(p.len());
            self.mem.write_slice(p, GuestAddress(addr)).unwrap();
            let last = k + 1 == n;
            let d = self.desc(addr, p.len() as u32, if last { 0 } else { F_NEXT });
            head.get_or_insert(d);
        }
        if resp_len > 0 {
            resp_addr = self.alloc(resp_len as usize);
            let d = self.desc(resp_addr, resp_len, F_WRITE);
            head.get_or_insert(d);
        }
        let head = head.unwrap();
        self.post_head(head);
        (head, resp_addr)
    }

    /// Copies `bytes` into fresh test memory; returns their address.
    pub fn place(&mut self, bytes: &[u8]) -> u64 {
        let at = self.alloc(bytes.len());
        self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
        at
    }

    /// Fresh test memory of `len` bytes, each set to `fill`.
    pub fn buffer(&mut self, len: usize, fill: u8) -> u64 {
        self.place(&vec![fill; len])
    }

    /// Takes `n` consecutive descriptor-table slots (not wrapping past the
    /// end of the table) for a hand-built chain; returns the first.
    pub fn reserve_descs(&mut self, n: u16) -> u16 {
        assert!(n <= QSIZE, "{n} descriptors do not fit in the table");
        if self.next_desc + n > QSIZE {
            self.next_desc = 0;
        }
        let first = self.next_desc;
        self.next_desc = (self.next_desc + n) % QSIZE;
        first
    }

    /// Writes descriptor `i` of the table exactly as given.
    pub fn write_desc(&self, i: u16, d: RawDesc) {
        let at = GuestAddress(self.rings.desc + u64::from(i) * 16);
        self.write_raw_desc(at, d);
    }

    fn write_raw_desc(&self, at: GuestAddress, d: RawDesc) {
        self.mem.write_obj(d.addr, at).unwrap();
        self.mem.write_obj(d.len, at.unchecked_add(8)).unwrap();
        self.mem.write_obj(d.flags, at.unchecked_add(12)).unwrap();
        self.mem.write_obj(d.next, at.unchecked_add(14)).unwrap();
    }

    /// Places an indirect descriptor table holding `descs`; returns its address.
    pub fn indirect_table(&mut self, descs: &[RawDesc]) -> u64 {
        let at = self.alloc(descs.len() * 16);
        for (k, d) in descs.iter().enumerate() {
            self.write_raw_desc(GuestAddress(at + k as u64 * 16), *d);
        }
        at
    }

    /// Writes `descs` into consecutive fresh table slots and posts the first
    /// as a chain head. A descriptor with `NEXT` set names its successor
    /// *relative to the first slot* (`RawDesc::then(1)` is the slot after
    /// the head), so loops and out-of-range links are written as meant.
    pub fn post_descs(&mut self, descs: &[RawDesc]) -> u16 {
        let n = u16::try_from(descs.len()).unwrap();
        let first = self.reserve_descs(n);
        for (k, d) in descs.iter().enumerate() {
            let mut d = *d;
            if d.flags & F_NEXT != 0 {
                d.next = first.wrapping_add(d.next);
            }
            self.write_desc(first + k as u16, d);
        }
        self.post_head(first);
        first
    }

    /// Makes descriptor `head` (which need not exist) the next available chain.
    pub fn post_head(&mut self, head: u16) {
        let slot = GuestAddress(self.rings.avail + 4 + u64::from(self.avail_idx % QSIZE) * 2);
        self.mem.write_obj(head, slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.republish_avail_idx();
    }

    /// Writes `idx` as the avail ring's index, leaving the driver's own
    /// count alone ([`Driver::republish_avail_idx`] puts it back).
    pub fn publish_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.rings.avail + 2))
            .unwrap();
    }

    /// Writes the driver's own count as the avail ring's index again.
    pub fn republish_avail_idx(&self) {
        self.publish_avail_idx(self.avail_idx);
    }

    /// The driver's count of chains made available.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// `len` bytes of guest memory at `addr`.
    pub fn read_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// [`Driver::post_chain`], returning only the response address.
    pub fn post(&mut self, parts: &[&[u8]], resp_len: u32) -> u64 {
        self.post_chain(parts, resp_len).1
    }

    /// Posts (not kicked) `RESOURCE_CREATE_2D` of 64×64 resource `id` and
    /// its `ATTACH_BACKING` with the whole scratch area, as a guest driver
    /// creates a buffer. Returns the two response addresses.
    pub fn post_backed_resource(&mut self, id: u32) -> [u64; 2] {
        let hdr = |type_| CtrlHdr {
            type_,
            ..CtrlHdr::default()
        };
        let create = ResourceCreate2d {
            resource_id: id,
            format: FORMAT_B8G8R8X8_UNORM,
            width: 64,
            height: 64,
        };
        let attach = ResourceAttachBacking {
            resource_id: id,
            nr_entries: 1,
        };
        let entry = MemEntry {
            addr: SCRATCH,
            length: SCRATCH_LEN,
            padding: 0,
        };
        let created = self.post(
            &[hdr(CMD_RESOURCE_CREATE_2D).as_slice(), create.as_slice()],
            24,
        );
        let attached = self.post(
            &[
                hdr(CMD_RESOURCE_ATTACH_BACKING).as_slice(),
                attach.as_slice(),
                entry.as_slice(),
            ],
            24,
        );
        [created, attached]
    }

    /// EVENT_IDX: the used index after which the driver wants a notify.
    pub fn set_used_event(&self, idx: u16) {
        self.mem
            .write_obj(
                idx,
                GuestAddress(self.rings.avail + 4 + 2 * u64::from(QSIZE)),
            )
            .unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.rings.used + 2))
            .unwrap()
    }

    /// (descriptor id, written length) of used entry `i`.
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = GuestAddress(self.rings.used + 4 + u64::from(i % QSIZE) * 8);
        (
            self.mem.read_obj(at).unwrap(),
            self.mem.read_obj(at.unchecked_add(4)).unwrap(),
        )
    }

    /// Waits (polling every ms, up to 10 s) until `n` entries are used.
    pub fn wait_used(&self, n: u16) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used_idx() < n {
            assert!(
                Instant::now() < deadline,
                "used idx stuck at {} waiting for {n}",
                self.used_idx()
            );
            thread::sleep(Duration::from_millis(1));
        }
        Instant::now()
    }

    pub fn resp_hdr(&self, addr: u64) -> CtrlHdr {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }
}

pub fn memfd_memory() -> GuestMemoryMmap {
    // SAFETY: memfd_create with a valid C string; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c"fencelab-test".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM_SIZE as u64).unwrap();
    GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(GPA),
        MEM_SIZE,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap()
}

pub fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("fencelab-{name}-{}.sock", std::process::id()))
}

/// A `SUBMIT_3D` request header and size (the payload goes separately).
pub fn submit(hdr: CtrlHdr, payload: &[u8]) -> Vec<u8> {
    let mut v = hdr.as_slice().to_vec();
    let b = CmdSubmit {
        size: payload.len() as u32,
        padding: 0,
    };
    v.extend_from_slice(b.as_slice());
    v
}

/// The keys of the device's summary JSON (stderr at exit, `gpu.summary()`),
/// old and new: xtask reads them.
pub const SUMMARY_KEYS: [&str; 11] = [
    "commands",
    "commands_by_type",
    "fences_submitted",
    "fences_completed",
    "error_responses",
    "dropped",
    "fences_pending",
    "seed",
    "accounting",
    "accounting_by_command",
    "timelines",
];

/// Asserts `summary` has every one of [`SUMMARY_KEYS`].
pub fn assert_summary_keys(summary: &serde_json::Value) {
    for key in SUMMARY_KEYS {
        assert!(summary.get(key).is_some(), "summary lacks {key}: {summary}");
    }
}

/// A decider driven by a closure, with fixed boost and rescue.
pub struct Script {
    decide: Box<dyn FnMut(&FenceInfo) -> Decision + Send>,
    pub boost: Option<Duration>,
    pub rescue: Option<Duration>,
}

impl Script {
    pub fn new(decide: impl FnMut(&FenceInfo) -> Decision + Send + 'static) -> Self {
        Script {
            decide: Box::new(decide),
            boost: None,
            rescue: None,
        }
    }

    /// Looks each fence id up in `by_fence`; others get `default`.
    pub fn table(by_fence: Vec<(u64, Decision)>, default: Decision) -> Self {
        let table: HashMap<u64, Decision> = by_fence.into_iter().collect();
        Script::new(move |f| table.get(&f.fence_id).cloned().unwrap_or(default.clone()))
    }
}

impl Decide for Script {
    fn decide(&mut self, fence: &FenceInfo) -> Decision {
        (self.decide)(fence)
    }
    fn seed(&self) -> u64 {
        42
    }
    fn deadline_boost(&self) -> Option<Duration> {
        self.boost
    }
    fn irq_rescue(&self) -> Option<Duration> {
        self.rescue
    }
    fn load_plan(&mut self, _source: &str, _origin: &str) -> Result<(), String> {
        Err("scripted".into())
    }
    fn patch_plan(&mut self, _patch: &serde_json::Value) -> Result<(), String> {
        Err("scripted".into())
    }
    fn plan_json(&self) -> serde_json::Value {
        serde_json::json!("scripted")
    }
    fn plan_sha256(&self) -> String {
        "scripted".into()
    }
}

pub fn latency(d: Duration) -> Decision {
    Decision {
        latency_ns: d.as_nanos() as u64,
        ..Decision::default()
    }
}

/// (fence, t_ns, due_ns, response) of every completion in `trace`, in order.
pub fn completions(trace: &MemoryTrace) -> Vec<(u64, u64, Option<u64>, u32)> {
    trace
        .events()
        .into_iter()
        .filter_map(|e| match e {
            TraceEvent::Complete {
                fence,
                t_ns,
                due_ns,
                response,
                ..
            } => Some((fence, t_ns, due_ns, response)),
            _ => None,
        })
        .collect()
}

/// Binds `path` and serves one frontend on it from a new thread, with a
/// backend made from `config`.
pub fn spawn_backend(
    path: &Path,
    config: DeviceConfig,
) -> (Arc<FencelabGpu>, JoinHandle<anyhow::Result<()>>) {
    let gpu = Arc::new(FencelabGpu::new(config).unwrap());
    let mut listener = backend::bind(path).unwrap();
    let server = {
        let gpu = gpu.clone();
        thread::spawn(move || backend::serve(&mut listener, gpu))
    };
    (gpu, server)
}

/// Connects to the backend at `path` and negotiates as QEMU does: every
/// offered feature (EVENT_IDX only when `event_idx`), the protocol features
/// (CONFIG must be among them), then ownership. Returns the frontend and
/// the features the backend offered.
pub fn connect(path: &Path, event_idx: bool) -> (Frontend, u64) {
    let mut fe = Frontend::connect(path, 2).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let offered = fe.get_features().unwrap();
    let features = if event_idx {
        offered
    } else {
        offered & !(1 << VIRTIO_RING_F_EVENT_IDX)
    };
    fe.set_features(features).unwrap();
    let proto = fe.get_protocol_features().unwrap();
    assert!(proto.contains(VhostUserProtocolFeatures::CONFIG));
    fe.set_protocol_features(proto).unwrap();
    fe.set_owner().unwrap();
    (fe, offered)
}

/// Fresh guest memory (a memfd) handed to the backend as its memory table.
pub fn share_memory(fe: &mut Frontend) -> GuestMemoryMmap {
    let mem = memfd_memory();
    let region = mem.find_region(GuestAddress(GPA)).unwrap();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()])
        .unwrap();
    mem
}

/// Sets up the control vring in `mem` (size, base, ring addresses, kick
/// and call eventfds) without enabling it, so a test can post before the
/// ring is enabled.
pub fn configure_vring(fe: &mut Frontend, mem: &GuestMemoryMmap, kick: &EventFd, call: &EventFd) {
    configure_queue(fe, mem, 0, CONTROL_RINGS, kick, call);
}

/// [`configure_vring`] for queue `queue` with its rings at `rings`.
pub fn configure_queue(
    fe: &mut Frontend,
    mem: &GuestMemoryMmap,
    queue: usize,
    rings: Rings,
    kick: &EventFd,
    call: &EventFd,
) {
    let host = mem.get_host_address(GuestAddress(GPA)).unwrap() as u64;
    fe.set_vring_num(queue, QSIZE).unwrap();
    fe.set_vring_base(queue, 0).unwrap();
    fe.set_vring_addr(
        queue,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: host + (rings.desc - GPA),
            used_ring_addr: host + (rings.used - GPA),
            avail_ring_addr: host + (rings.avail - GPA),
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_kick(queue, kick).unwrap();
    fe.set_vring_call(queue, call).unwrap();
}

/// A running backend with one connected frontend and its control queue
/// enabled.
pub struct Rig {
    pub gpu: Arc<FencelabGpu>,
    pub stats: Arc<Stats>,
    pub trace: Arc<MemoryTrace>,
    pub fe: Frontend,
    pub drv: Driver,
    pub kick: EventFd,
    /// Non-blocking: [`Rig::calls`] reads it without waiting.
    pub call: EventFd,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    /// Fence id of each head posted, for reading completion order.
    fence_of_head: HashMap<u16, u64>,
    used_seen: u16,
}

impl Rig {
    /// Starts a backend deciding with `decider`, connects, negotiates (with
    /// or without EVENT_IDX), and enables the control queue.
    pub fn start(name: &str, decider: impl Decide + 'static, event_idx: bool) -> Rig {
        let path = socket_path(name);
        let stats = Arc::new(Stats::new());
        let trace = Arc::new(MemoryTrace::default());
        let (gpu, server) = spawn_backend(
            &path,
            DeviceConfig {
                decider: Box::new(decider),
                tracer: trace.clone(),
                stats: stats.clone(),
            },
        );
        let (mut fe, _) = connect(&path, event_idx);
        let mem = share_memory(&mut fe);
        let kick = EventFd::new(0).unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        configure_vring(&mut fe, &mem, &kick, &call);
        fe.set_vring_enable(0, true).unwrap();

        let mut rig = Rig {
            gpu,
            stats,
            trace,
            fe,
            drv: Driver::new(mem),
            kick,
            call,
            server: Some(server),
            fence_of_head: HashMap::new(),
            used_seen: 0,
        };
        let ctx = CtrlHdr {
            type_: CMD_CTX_CREATE,
            ctx_id: 1,
            ..CtrlHdr::default()
        };
        let r = rig
            .drv
            .post(&[ctx.as_slice(), CtxCreate::default().as_slice()], 24);
        rig.kick();
        rig.wait_used(1);
        assert_eq!(rig.drv.resp_hdr(r).type_, RESP_OK_NODATA);
        rig.used_seen = 1;
        rig.calls();
        rig
    }

    /// Creates context `ctx` (context 1 exists from the start).
    pub fn ctx_create(&mut self, ctx: u32) {
        let h = CtrlHdr {
            type_: CMD_CTX_CREATE,
            ctx_id: ctx,
            ..CtrlHdr::default()
        };
        let r = self
            .drv
            .post(&[h.as_slice(), CtxCreate::default().as_slice()], 24);
        self.kick();
        let n = self.used_seen + 1;
        self.wait_used(n);
        self.used_seen = n;
        assert_eq!(self.drv.resp_hdr(r).type_, RESP_OK_NODATA);
    }

    /// Creates 2D resource `id` backed by the scratch area (all of it).
    pub fn backed_resource(&mut self, id: u32) {
        let [r1, r2] = self.drv.post_backed_resource(id);
        self.kick();
        let n = self.used_seen + 2;
        self.wait_used(n);
        self.used_seen = n;
        assert_eq!(self.drv.resp_hdr(r1).type_, RESP_OK_NODATA);
        assert_eq!(self.drv.resp_hdr(r2).type_, RESP_OK_NODATA);
    }

    /// Posts a fenced `SUBMIT_3D` (not kicked). `ring`: `Some` sets
    /// `VIRTIO_GPU_FLAG_INFO_RING_IDX`. Returns the response address.
    pub fn post_fenced(&mut self, ctx: u32, ring: Option<u8>, fence: u64, ops: &[Op]) -> u64 {
        let mut flags = VIRTIO_GPU_FLAG_FENCE;
        if ring.is_some() {
            flags |= VIRTIO_GPU_FLAG_INFO_RING_IDX;
        }
        let hdr = CtrlHdr {
            type_: CMD_SUBMIT_3D,
            flags,
            fence_id: fence,
            ctx_id: ctx,
            ring_idx: ring.unwrap_or(0),
            ..CtrlHdr::default()
        };
        let payload = fencelab_stream::encode(ops);
        let (head, resp) = self.drv.post_chain(&[&submit(hdr, &payload), &payload], 24);
        self.fence_of_head.insert(head, fence);
        resp
    }

    /// Posts an unfenced `SUBMIT_3D` on context 1 (not kicked).
    pub fn post_unfenced(&mut self, ops: &[Op]) -> u64 {
        let hdr = CtrlHdr {
            type_: CMD_SUBMIT_3D,
            ctx_id: 1,
            ..CtrlHdr::default()
        };
        let payload = fencelab_stream::encode(ops);
        self.drv.post(&[&submit(hdr, &payload), &payload], 24)
    }

    pub fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    pub fn wait_used(&self, n: u16) -> Instant {
        self.drv.wait_used(n)
    }

    /// Waits for `n` more used entries and returns their fence ids (0 for
    /// chains that were not fenced), in used-ring order.
    pub fn wait_fences(&mut self, n: u16) -> Vec<u64> {
        let to = self.used_seen + n;
        self.wait_used(to);
        let ids = (self.used_seen..to)
            .map(|i| {
                let head = self.drv.used(i).0 as u16;
                self.fence_of_head.get(&head).copied().unwrap_or(0)
            })
            .collect();
        self.used_seen = to;
        ids
    }

    /// Used entries not yet taken by [`Rig::wait_fences`].
    pub fn unseen_used(&self) -> u16 {
        self.drv.used_idx().wrapping_sub(self.used_seen)
    }

    /// Call-eventfd writes since the last look (the eventfd counter; 0 when
    /// there were none).
    pub fn calls(&self) -> u64 {
        match self.call.read() {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) => panic!("call eventfd: {e}"),
        }
    }

    /// Blocks until the call eventfd is written (or `timeout`); returns when.
    pub fn wait_call(&self, timeout: Duration) -> Option<Instant> {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        (n == 1).then(Instant::now)
    }

    /// Waits up to 10 s for the trace to satisfy `cond`.
    pub fn wait_trace(&self, what: &str, cond: impl Fn(&[TraceEvent]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond(&self.trace.events()) {
            assert!(Instant::now() < deadline, "trace never showed {what}");
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits until the trace holds `n` completions (the engine traces a
    /// completion after counting it, so the accounting is then current).
    pub fn wait_completions(&self, n: usize) {
        self.wait_trace(&format!("{n} completions"), |ev| {
            ev.iter()
                .filter(|e| matches!(e, TraceEvent::Complete { .. }))
                .count()
                >= n
        });
    }

    /// Polls `cond` every 2 ms for up to 10 s.
    pub fn wait_until(&self, what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "never: {what}");
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Disconnects and waits for the backend to finish serving.
    pub fn finish(mut self) {
        let server = self.server.take().unwrap();
        drop(self.fe);
        server.join().unwrap().unwrap();
    }
}
