//! The vhost-user side: [`FencelabGpu`] implements `VhostUserBackend`,
//! turns descriptor chains into requests for [`Gpu`], writes responses, and
//! returns descriptors to the used ring, at once or through the fence
//! [`Engine`].
//!
//! Two queues: control (0) and cursor (1), served on one vring thread.
//!
//! A fenced request is decided on the vring thread: the plan
//! ([`Decide`]) gets a [`FenceInfo`], the response (or the decision's
//! injected error) is written at once, and the descriptor goes to the engine
//! with the decision; the engine thread lands its `WRITE`s and returns it
//! when the decision says (see [`crate::engine`]). `DEADLINE` hints in a
//! `SUBMIT_3D` go to the engine after the command's own fence.
//!
//! Stopping and resetting: when the frontend stops the control queue
//! (`GET_VRING_BASE`) every fence that is not hung forever or until released
//! completes at once, so the ring state it reads is final; hung ones stay
//! (the ring may be restarted as it was, e.g. VM stop/cont). A device reset
//! completes the same way and *abandons* the hung ones: their descriptors
//! belong to a driver instance that is gone.
//!
//! Requests sent before a vring is enabled are not lost: a kick to a ring
//! that is not yet enabled stays pending in its eventfd (the kick fd is
//! registered with epoll only once the ring is started and enabled, and the
//! eventfd is level-triggered), and vhost-user-backend 0.24 additionally calls
//! `handle_event` for a ring when it becomes enabled. Each `handle_event`
//! drains everything in the avail ring, so a `GET_CAPSET_INFO` posted right
//! after DRIVER_OK is served as soon as the ring is enabled.

mod completion;
mod control;
mod serve;

pub use completion::{Completion, SharedVring};
pub use serve::{serve, serve_reconnecting};

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use anyhow::Context as _;
use tracing::{debug, error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{GpuBackend, Listener};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::{
    VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{
    ByteValued, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryLoadGuard, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::decode::{self, Command};
use crate::engine::{Clock, Engine, Submission, planned_due};
use crate::fault::{Decide, Decision, FenceInfo, TimelineId, TraceEvent, Tracer};
use crate::gpu::{DeadlineHint, Gpu, GpuError, GuestRanges, NUM_CAPSETS, NUM_SCANOUTS, Outcome};
use crate::protocol::*;
use crate::stats::Stats;

pub const CONTROL_QUEUE: u16 = 0;
pub const CURSOR_QUEUE: u16 = 1;
pub const NUM_QUEUES: usize = 2;
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Largest request the device reads. Bigger chains are answered with an
/// error instead of making the device allocate whatever the guest claims.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

type Mem = GuestMemoryMmap<()>;
type MemGuard = GuestMemoryLoadGuard<Mem>;

/// Virtio feature bits the device offers. QEMU passes the transport bits
/// through and vhost-user-backend refuses `SET_FEATURES` with any bit not
/// offered here, so all of them must be listed.
pub fn device_features() -> u64 {
    (1u64 << VIRTIO_GPU_F_VIRGL)
        | (1u64 << VIRTIO_GPU_F_EDID)
        | (1u64 << VIRTIO_F_VERSION_1)
        | (1u64 << VIRTIO_RING_F_EVENT_IDX)
        | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1u64 << VIRTIO_F_NOTIFY_ON_EMPTY)
        | (1u64 << VIRTIO_F_RING_RESET)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// The device config space. QEMU only takes `num_capsets` from it.
pub fn config_space() -> GpuConfig {
    GpuConfig {
        events_read: 0,
        events_clear: 0,
        num_scanouts: NUM_SCANOUTS,
        num_capsets: NUM_CAPSETS,
    }
}

type SharedMem = Arc<RwLock<Option<GuestMemoryAtomic<Mem>>>>;

/// What to do with a chain once its request is served.
enum Answer {
    /// Return it now with this many bytes written.
    Now(u32),
    /// The engine returns it when the decision says.
    Fence {
        submission: Box<Submission<Completion>>,
        rescue_ns: Option<u64>,
    },
}

/// The plan and what it needs to know about arrivals.
struct FenceDesk {
    decider: Box<dyn Decide>,
    /// Arrivals per timeline since the device started.
    arrivals: HashMap<TimelineId, u64>,
}

/// One fenced request, decided.
struct Decided {
    info: FenceInfo,
    arrival_ns: u64,
    decision: Decision,
    rescue_ns: Option<u64>,
}

/// What a [`FencelabGpu`] is built from.
pub struct DeviceConfig {
    /// Decides every fence's fate (the plan, a replay, or a test script).
    pub decider: Box<dyn Decide>,
    /// Where trace events go (`fault::NoTrace` for none).
    pub tracer: Arc<dyn Tracer>,
    pub stats: Arc<Stats>,
}

fn duration_ns(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Where fenced requests naming a context that does not exist are tracked
/// (the device's own context 0, ring 0; see `FencelabGpu::fence_timeline`).
pub const STRAY_TIMELINE: TimelineId = TimelineId { ctx: 0, ring: 0 };

/// The timeline a request's fence joins: its context, and its ring when the
/// driver says which (`VIRTIO_GPU_FLAG_INFO_RING_IDX`), else ring 0.
pub fn timeline_of(hdr: &CtrlHdr) -> TimelineId {
    let ring = if hdr.flags & VIRTIO_GPU_FLAG_INFO_RING_IDX != 0 {
        hdr.ring_idx
    } else {
        0
    };
    TimelineId {
        ctx: hdr.ctx_id,
        ring,
    }
}

struct MemRanges<'a>(&'a Mem);

impl GuestRanges for MemRanges<'_> {
    fn contains(&self, addr: u64, len: u64) -> bool {
        let Ok(len) = usize::try_from(len) else {
            return false;
        };
        addr.checked_add(len as u64).is_some()
            && self.0.check_address(GuestAddress(addr)).is_some()
            && self.0.check_range(GuestAddress(addr), len)
    }
}

/// The virtio-gpu vhost-user backend.
pub struct FencelabGpu {
    mem: SharedMem,
    gpu: Mutex<Gpu>,
    event_idx: AtomicBool,
    gpu_socket: Mutex<Option<GpuBackend>>,
    desk: Mutex<FenceDesk>,
    control_vring: SharedVring,
    engine: Engine<Completion>,
    clock: Clock,
    paused: AtomicBool,
    stats: Arc<Stats>,
    tracer: Arc<dyn Tracer>,
    /// Exit-event fds handed to vhost-user-backend, which never closes them
    /// (see [`serve`]); closed when their connection ends.
    exit_consumers: serve::ExitConsumers,
}

fn lock<X>(m: &Mutex<X>) -> MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FencelabGpu {
    /// A backend whose fences complete as `config.decider` decides. Starts
    /// the engine thread; its clock (trace times) starts now.
    pub fn new(config: DeviceConfig) -> io::Result<Self> {
        let clock = Clock::start();
        let mem = completion::shared_mem();
        let control_vring: SharedVring = Arc::new(Mutex::new(None));
        let sink = completion::VringSink::new(control_vring.clone(), mem.clone());
        let engine = Engine::spawn(clock, sink, config.stats.clone(), config.tracer.clone())?;
        Ok(FencelabGpu {
            mem,
            gpu: Mutex::new(Gpu::new()),
            event_idx: AtomicBool::new(false),
            gpu_socket: Mutex::new(None),
            desk: Mutex::new(FenceDesk {
                decider: config.decider,
                arrivals: HashMap::new(),
            }),
            control_vring,
            engine,
            clock,
            paused: AtomicBool::new(false),
            stats: config.stats,
            tracer: config.tracer,
            exit_consumers: serve::ExitConsumers::default(),
        })
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The seed the decider draws from.
    pub fn seed(&self) -> u64 {
        lock(&self.desk).decider.seed()
    }

    /// Fences accepted and neither completed nor abandoned (pending + hung).
    pub fn pending_fences(&self) -> usize {
        usize::try_from(self.stats.fences_outstanding()).unwrap_or(usize::MAX)
    }

    /// The shutdown summary (`fencelab-device: summary {json}`): the
    /// [`Stats::summary`] keys plus `seed`.
    pub fn summary(&self) -> serde_json::Value {
        let mut s = self.stats.summary();
        s["seed"] = self.seed().into();
        s
    }

    fn memory(&self) -> Option<GuestMemoryAtomic<Mem>> {
        self.mem.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forgets the vrings of a previous connection.
    fn forget_vrings(&self) {
        *lock(&self.control_vring) = None;
    }

    /// Remembers the control queue for the engine's completions.
    fn note_control_vring(&self, vring: &VringRwLock) {
        let mut slot = lock(&self.control_vring);
        if slot.is_none() {
            *slot = Some(vring.clone());
        }
    }

    /// Serves everything in `vring`'s avail ring. Errors that leave the ring
    /// unusable are logged and returned; per-request problems are answered.
    fn process_queue(&self, vring: &VringRwLock, queue: u16) -> Result<(), String> {
        let atomic = self
            .memory()
            .ok_or_else(|| "queue kicked before any memory table".to_string())?;
        let mem: MemGuard = atomic.memory();
        let chains: Vec<DescriptorChain<MemGuard>> = vring
            .get_mut()
            .get_queue_mut()
            .iter(mem.clone())
            .map_err(|e| format!("cannot walk avail ring of queue {queue}: {e}"))?
            .collect();

        let mut used = false;
        for chain in chains {
            let head = chain.head_index();
            if let Some(len) = self.serve(&mem, chain, queue) {
                match vring.add_used(head, len) {
                    Ok(()) => used = true,
                    Err(e) => error!(queue, head, "cannot return descriptor: {e}"),
                }
            }
        }
        if used {
            notify(vring, queue);
        }
        Ok(())
    }

    /// Reads, executes and answers one request. Returns the length to
    /// return the chain with now, or `None` when the engine has it.
    fn serve(&self, mem: &Mem, chain: DescriptorChain<MemGuard>, queue: u16) -> Option<u32> {
        let head = chain.head_index();
        let writer = match Writer::new(mem, chain.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(queue, head, "response descriptors not in guest memory: {e}");
                None
            }
        };
        let request = match read_request(mem, chain) {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(queue, head, "unreadable request: {e}");
                self.stats.command("MALFORMED");
                let outcome = Outcome::error_response(RESP_ERR_UNSPEC);
                let reply = Reply {
                    hdr: &CtrlHdr::default(),
                    outcome,
                    command: "MALFORMED",
                    queue,
                    head,
                };
                return self.answer(mem, writer, reply);
            }
        };

        let (hdr, outcome, command) = match decode::decode(&request) {
            Ok((hdr, cmd)) => {
                let name = cmd.name();
                self.stats.command(name);
                if let Command::Submit3d { payload } = &cmd {
                    debug!(
                        ctx = hdr.ctx_id,
                        fence_id = hdr.fence_id,
                        fenced = hdr.is_fenced(),
                        payload_len = payload.len(),
                        "SUBMIT_3D"
                    );
                }
                let ranges = MemRanges(mem);
                let outcome = lock(&self.gpu).execute(&hdr, cmd, &ranges);
                if let Some(GpuError::OverCap { cap, .. }) = &outcome.error {
                    self.stats.refused_over_cap(cap.key());
                }
                // Cap refusals are logged by `Gpu` itself, rate-limited.
                if let Some(e) = outcome.error.as_ref().filter(|e| !e.logged_by_gpu()) {
                    warn!(
                        queue,
                        cmd = type_name(hdr.type_),
                        ctx = hdr.ctx_id,
                        fence_id = hdr.fence_id,
                        "{e}"
                    );
                }
                (hdr, outcome, name)
            }
            Err((hdr, e)) => {
                warn!(queue, head, "malformed request: {e}");
                self.stats.command(match e {
                    decode::DecodeError::UnknownType(_) => "UNKNOWN",
                    _ => "MALFORMED",
                });
                let outcome = Outcome::error_response(e.response_code());
                let hdr = hdr.unwrap_or_default();
                (hdr, outcome, type_name(hdr.type_))
            }
        };
        let reply = Reply {
            hdr: &hdr,
            outcome,
            command,
            queue,
            head,
        };
        self.answer(mem, writer, reply)
    }

    /// Writes the response and hands a fenced chain and the request's
    /// deadline hints to the engine.
    fn answer(&self, mem: &Mem, writer: Option<Writer<'_>>, mut reply: Reply<'_>) -> Option<u32> {
        let hints = std::mem::take(&mut reply.outcome.deadlines);
        let result = match self.respond(mem, writer, reply) {
            Answer::Now(len) => Some(len),
            Answer::Fence {
                submission,
                rescue_ns,
            } => {
                self.engine.submit(*submission, rescue_ns);
                None
            }
        };
        if !hints.is_empty() {
            self.send_hints(&hints);
        }
        result
    }

    fn send_hints(&self, hints: &[DeadlineHint]) {
        let boost_ns = lock(&self.desk).decider.deadline_boost().map(duration_ns);
        for h in hints {
            debug!(fence = h.fence, ns = h.ns, "DEADLINE hint");
            self.engine.deadline(h.fence, h.ns, boost_ns);
        }
    }

    /// Writes the response (control queue only) and decides when the chain
    /// goes back: now, or (fenced) as the plan decides. A fenced request
    /// whose plan injects an error is answered with that error instead.
    fn respond(&self, mem: &Mem, writer: Option<Writer<'_>>, reply: Reply<'_>) -> Answer {
        let Reply {
            hdr,
            outcome,
            command,
            queue,
            head,
        } = reply;
        if queue == CURSOR_QUEUE {
            // Cursor commands have no response; the descriptor just goes back.
            if outcome.response.is_error() {
                self.stats.error_response();
            }
            return Answer::Now(0);
        }
        let Some(mut writer) = writer else {
            self.stats.dropped();
            return Answer::Now(0);
        };
        let room = writer.available_bytes();
        let hdr_len = std::mem::size_of::<CtrlHdr>();
        if room < hdr_len {
            warn!(
                cmd = type_name(hdr.type_),
                room, "no room for a response header: returning the chain empty"
            );
            self.stats.dropped();
            return Answer::Now(0);
        }
        let mut bytes = outcome.response.encode(hdr);
        let mut code = outcome.response.code();
        let mut is_error = outcome.response.is_error();
        if room < bytes.len() {
            warn!(
                cmd = type_name(hdr.type_),
                room,
                need = bytes.len(),
                "response buffer too small"
            );
            code = RESP_ERR_UNSPEC;
            bytes = hdr.response(code).as_slice().to_vec();
            is_error = true;
        }
        let decided = hdr
            .is_fenced()
            .then(|| self.decide(hdr, command, outcome.work_ns));
        if let Some(injected) = decided.as_ref().and_then(|d| d.decision.error) {
            code = injected;
            bytes = hdr.response(code).as_slice().to_vec();
            is_error = true;
        }
        if let Err(e) = io::Write::write_all(&mut writer, &bytes) {
            warn!(cmd = type_name(hdr.type_), "cannot write response: {e}");
            self.stats.dropped();
            return Answer::Now(0);
        }
        if is_error {
            self.stats.error_response();
        }
        // `bytes` is at most a few KiB.
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);

        let Some(d) = decided else {
            // An unfenced command's WRITEs land before its chain goes back.
            completion::store_writes(mem, &outcome.writes);
            return Answer::Now(len);
        };
        self.tracer.record(TraceEvent::Decide {
            t_ns: d.arrival_ns,
            timeline: d.info.timeline,
            fence: d.info.fence_id,
            index: d.info.index,
            command: d.info.command.to_string(),
            work_ns: d.info.work_ns,
            decision: d.decision.clone(),
            due_ns: planned_due(d.arrival_ns, d.info.work_ns, &d.decision),
        });
        Answer::Fence {
            submission: Box::new(Submission {
                timeline: d.info.timeline,
                fence_id: d.info.fence_id,
                command: d.info.command,
                arrival_ns: d.arrival_ns,
                work_ns: d.info.work_ns,
                decision: d.decision,
                response: code,
                errored: is_error,
                item: Completion {
                    head,
                    len,
                    writes: outcome.writes,
                },
            }),
            rescue_ns: d.rescue_ns,
        }
    }

    /// The timeline a fenced request is tracked on: [`timeline_of`], unless
    /// the request names a context the device does not have (it is answered
    /// with an error, or is not even a valid command). Those go to
    /// [`STRAY_TIMELINE`] instead of opening a timeline of their own: a
    /// timeline's state lives as long as the device (arrival count, scheduler
    /// queue, stats with two latency histograms of 16 KiB each), so a guest
    /// naming a new context id in every fenced request grew the device
    /// without bound (1 668 such requests: 65 MiB more resident memory).
    fn fence_timeline(&self, hdr: &CtrlHdr) -> TimelineId {
        let timeline = timeline_of(hdr);
        if timeline.ctx == 0 || lock(&self.gpu).context(timeline.ctx).is_some() {
            timeline
        } else {
            STRAY_TIMELINE
        }
    }

    /// Asks the plan about a fenced request arriving now.
    fn decide(&self, hdr: &CtrlHdr, command: &'static str, work_ns: u64) -> Decided {
        let timeline = self.fence_timeline(hdr);
        let mut desk = lock(&self.desk);
        let arrivals = desk.arrivals.entry(timeline).or_default();
        let index = *arrivals;
        *arrivals += 1;
        let info = FenceInfo {
            timeline,
            fence_id: hdr.fence_id,
            index,
            command,
            work_ns,
        };
        let arrival_ns = self.clock.now_ns();
        let decision = desk.decider.decide(&info);
        let rescue_ns = desk.decider.irq_rescue().map(duration_ns);
        Decided {
            info,
            arrival_ns,
            decision,
            rescue_ns,
        }
    }
}

/// A served request on its way to an answer.
struct Reply<'a> {
    hdr: &'a CtrlHdr,
    outcome: Outcome,
    command: &'static str,
    queue: u16,
    head: u16,
}

/// Why a chain is not a well-formed request, if it is not.
///
/// `virtio-queue` ends a chain's iteration silently where it cannot go on —
/// a `next` past the descriptor table, a loop (it stops after queue-size
/// descriptors), a broken or nested indirect table, more than 4 GiB — and
/// gathers readable and writable descriptors wherever they are in the
/// chain. Read as it is, such a chain is a different request from the one
/// the guest wrote: a loop repeats the header and runs the command anyway
/// (and wraps a long response round the same small buffer), and a readable
/// descriptor after a writable one is read as if the guest had ordered
/// them. QEMU and Linux's vhost refuse all of these (virtio 1.2, 2.7.5.2,
/// 2.7.4.2); so does fencelab: the request is not executed and is answered
/// `RESP_ERR_UNSPEC` where the chain has room for an answer.
fn chain_defect(chain: &DescriptorChain<MemGuard>) -> Option<&'static str> {
    let mut last = None;
    let mut writable_seen = false;
    for desc in chain.clone() {
        if desc.is_write_only() {
            writable_seen = true;
        } else if writable_seen {
            return Some("a device-readable descriptor follows a device-writable one");
        }
        last = Some(desc);
    }
    match last {
        None => Some("the chain has no usable descriptor (bad head or indirect table)"),
        Some(desc) if desc.has_next() => Some(
            "the chain does not end: a loop, a link past the descriptor table, \
             a bad indirect table, or more than 4 GiB",
        ),
        Some(_) => None,
    }
}

/// Reads the whole device-readable part of a chain, refusing malformed
/// chains ([`chain_defect`]) and absurd sizes.
fn read_request(mem: &Mem, chain: DescriptorChain<MemGuard>) -> Result<Vec<u8>, String> {
    if let Some(defect) = chain_defect(&chain) {
        return Err(format!("malformed descriptor chain: {defect}"));
    }
    let mut reader: Reader<'_> = Reader::new(mem, chain).map_err(|e| e.to_string())?;
    let len = reader.available_bytes();
    if len > MAX_REQUEST_BYTES {
        return Err(format!(
            "request of {len} bytes exceeds {MAX_REQUEST_BYTES}"
        ));
    }
    let mut bytes = vec![0u8; len];
    io::Read::read_exact(&mut reader, &mut bytes).map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// Interrupts the guest if it wants to hear about the used entries just added
/// (`EVENT_IDX` suppression is decided by the queue). Returns whether it did.
fn notify(vring: &VringRwLock, queue: u16) -> bool {
    let wanted = vring.needs_notification().unwrap_or_else(|e| {
        warn!(queue, "cannot read used_event, notifying anyway: {e}");
        true
    });
    if !wanted {
        return false;
    }
    match vring.signal_used_queue() {
        Ok(()) => true,
        Err(e) => {
            error!(queue, "cannot signal the guest: {e}");
            false
        }
    }
}

impl VhostUserBackend for FencelabGpu {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        device_features()
    }

    fn acked_features(&self, features: u64) {
        info!("driver acked features {features:#x}");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // RESET_DEVICE: without it QEMU does not tell the backend when the
        // guest resets the device (driver unbind/reload), and the next driver
        // instance finds the old one's resources and contexts still there.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        let abandoned = self.engine.reset();
        info!(abandoned, "device reset");
        *lock(&self.gpu) = Gpu::new();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = config_space();
        let bytes = cfg.as_slice();
        let start = offset as usize;
        match start
            .checked_add(size as usize)
            .and_then(|end| bytes.get(start..end))
        {
            Some(s) => s.to_vec(),
            None => {
                warn!(offset, size, "config read outside the 16-byte config space");
                Vec::new()
            }
        }
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn set_gpu_socket(&self, gpu_backend: GpuBackend) -> io::Result<()> {
        // The display socket stays idle: GET_DISPLAY_INFO is answered locally
        // and nothing is ever shown. Keep it open so QEMU sees a live peer.
        info!("frontend handed over the GPU display socket");
        *lock(&self.gpu_socket) = Some(gpu_backend);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one the vring thread never ends, and dropping the daemon
        // (which joins it) hangs after the frontend disconnects.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => {
                self.exit_consumers.note(&pair.0);
                Some(pair)
            }
            Err(e) => {
                error!("cannot create the vring thread's exit event: {e}");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if queue_index == u32::from(CONTROL_QUEUE) {
            let outstanding = self.engine.outstanding();
            if outstanding > 0 {
                info!(
                    outstanding,
                    "control queue stopping: completing pending fences now (hung ones stay)"
                );
            }
            self.engine.flush();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            warn!(device_event, "unexpected event set {evset:?}");
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            warn!(device_event, "event for an unknown queue");
            return Ok(());
        };
        if device_event == CONTROL_QUEUE {
            self.note_control_vring(vring);
        }
        {
            let state = vring.get_ref();
            if !(state.get_queue().ready() && state.is_enabled()) {
                debug!(device_event, "event for a stopped or disabled queue");
                return Ok(());
            }
        }
        // Errors are logged, not returned: an error would end the vring
        // thread and with it every later request.
        if self.event_idx.load(Ordering::Acquire) {
            // With EVENT_IDX the guest only kicks when it sees our avail_event
            // move; re-check after re-enabling so nothing posted in between
            // is left waiting for a kick that will not come.
            loop {
                if let Err(e) = vring.disable_notification() {
                    error!(device_event, "cannot disable notifications: {e}");
                }
                if let Err(e) = self.process_queue(vring, device_event) {
                    error!("{e}");
                    break;
                }
                match vring.enable_notification() {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        error!(device_event, "cannot enable notifications: {e}");
                        break;
                    }
                }
            }
        } else if let Err(e) = self.process_queue(vring, device_event) {
            error!("{e}");
        }
        Ok(())
    }
}

/// Binds the vhost-user socket at `path`. A stale socket left by a dead
/// backend is removed; a live one (something accepts connections) or a
/// non-socket file is an error.
pub fn bind(path: &Path) -> anyhow::Result<Listener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            anyhow::bail!(
                "cannot bind vhost-user socket {}: path exists and is not a socket",
                path.display()
            );
        }
        // Not probed by connecting: that would end a live backend's run.
        if crate::socket_probe::is_listening(path) {
            anyhow::bail!(
                "cannot bind vhost-user socket {}: another process is listening on it",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
        info!(path = %path.display(), "removed stale socket");
    }
    Listener::new(path, false)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot bind vhost-user socket {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_cover_what_qemu_negotiates() {
        let f = device_features();
        for bit in [0, 1, 24, 28, 29, 30, 32, 40] {
            assert_ne!(f & (1u64 << bit), 0, "bit {bit}");
        }
        // Blob and context-init are not offered.
        assert_eq!(f & (1 << 3), 0);
        assert_eq!(f & (1 << 4), 0);
    }

    #[test]
    fn config_space_reads() {
        let b = FencelabGpu::new(DeviceConfig {
            decider: Box::new(crate::decide::PlanDecider::new(
                crate::plan::Plan::fixed_latency(std::time::Duration::ZERO),
                1,
            )),
            tracer: Arc::new(crate::fault::NoTrace),
            stats: Arc::new(Stats::new()),
        })
        .unwrap();
        let all = b.get_config(0, 16);
        assert_eq!(all.len(), 16);
        let cfg: GpuConfig = read_struct(&all).unwrap();
        assert_eq!(cfg.num_capsets, 0);
        assert_eq!(cfg.num_scanouts, 1);
        assert_eq!(b.get_config(12, 4), 0u32.to_le_bytes().to_vec());
        assert!(b.get_config(12, 8).is_empty());
        assert!(b.get_config(u32::MAX, 2).is_empty());
        assert!(
            b.protocol_features()
                .contains(VhostUserProtocolFeatures::CONFIG)
        );
    }

    #[test]
    fn timelines_use_the_ring_only_when_the_driver_names_it() {
        let mut h = CtrlHdr {
            flags: VIRTIO_GPU_FLAG_FENCE,
            ctx_id: 3,
            ring_idx: 2,
            ..CtrlHdr::default()
        };
        assert_eq!(timeline_of(&h), TimelineId { ctx: 3, ring: 0 });
        h.flags |= VIRTIO_GPU_FLAG_INFO_RING_IDX;
        assert_eq!(timeline_of(&h), TimelineId { ctx: 3, ring: 2 });
    }

    #[test]
    fn mem_ranges() {
        let mem = Mem::from_ranges(&[
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x2000), 0x1000),
        ])
        .unwrap();
        let r = MemRanges(&mem);
        assert!(r.contains(0x1000, 0x2000), "spans adjacent regions");
        assert!(!r.contains(0x1000, 0x2001));
        assert!(!r.contains(0, 1));
        assert!(r.contains(0x1800, 0));
        assert!(!r.contains(0x5000, 0));
        assert!(!r.contains(u64::MAX, 2));
    }
}
