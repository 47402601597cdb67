//! The vhost-user side: [`FencelabGpu`] implements `VhostUserBackend`,
//! turns descriptor chains into requests for [`Gpu`], writes responses, and
//! returns descriptors to the used ring, at once or through the fence
//! [`Engine`].
//!
//! Two queues: control (0) and cursor (1), served on one vring thread.
//!
//! Requests sent before a vring is enabled are not lost: a kick to a ring
//! that is not yet enabled stays pending in its eventfd (the kick fd is
//! registered with epoll only once the ring is started and enabled, and the
//! eventfd is level-triggered), and vhost-user-backend 0.24 additionally calls
//! `handle_event` for a ring when it becomes enabled. Each `handle_event`
//! drains everything in the avail ring, so a `GET_CAPSET_INFO` posted right
//! after DRIVER_OK is served as soon as the ring is enabled.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tracing::{debug, error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{GpuBackend, Listener};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
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
use crate::engine::Engine;
use crate::gpu::{Gpu, GuestRanges, NUM_CAPSETS, NUM_SCANOUTS, Outcome};
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

/// A fenced request whose response is written and whose descriptor waits
/// for the engine to return it.
pub struct Completion {
    vring: VringRwLock,
    head: u16,
    len: u32,
    fence_id: u64,
    ctx_id: u32,
    submitted: Instant,
}

/// What to do with a chain once its request is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disposition {
    /// Return it now with this many bytes written.
    Now(u32),
    /// Return it when the fence is due.
    Fence {
        len: u32,
        due: Instant,
        fence_id: u64,
        ctx_id: u32,
    },
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
    mem: RwLock<Option<GuestMemoryAtomic<Mem>>>,
    gpu: Mutex<Gpu>,
    event_idx: AtomicBool,
    gpu_socket: Mutex<Option<GpuBackend>>,
    engine: Engine<Completion>,
    latency: Duration,
    stats: Arc<Stats>,
}

fn lock<X>(m: &Mutex<X>) -> MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FencelabGpu {
    /// A backend that completes each fence `latency` (plus its `WORK`) after
    /// it was submitted.
    pub fn new(latency: Duration, stats: Arc<Stats>) -> io::Result<Self> {
        let engine_stats = stats.clone();
        let engine =
            Engine::spawn(move |batch: Vec<Completion>| complete_batch(&engine_stats, batch))?;
        Ok(FencelabGpu {
            mem: RwLock::new(None),
            gpu: Mutex::new(Gpu::new()),
            event_idx: AtomicBool::new(false),
            gpu_socket: Mutex::new(None),
            engine,
            latency,
            stats,
        })
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Fences submitted to the engine and not yet completed.
    pub fn pending_fences(&self) -> usize {
        self.engine.pending()
    }

    fn memory(&self) -> Option<GuestMemoryAtomic<Mem>> {
        self.mem.read().unwrap_or_else(|p| p.into_inner()).clone()
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
            match self.serve(&mem, chain, queue) {
                Disposition::Now(len) => match vring.add_used(head, len) {
                    Ok(()) => used = true,
                    Err(e) => error!(queue, head, "cannot return descriptor: {e}"),
                },
                Disposition::Fence {
                    len,
                    due,
                    fence_id,
                    ctx_id,
                } => {
                    self.stats.fence_submitted();
                    self.engine.submit(
                        due,
                        Completion {
                            vring: vring.clone(),
                            head,
                            len,
                            fence_id,
                            ctx_id,
                            submitted: Instant::now(),
                        },
                    );
                }
            }
        }
        if used {
            notify(vring, queue);
        }
        Ok(())
    }

    /// Reads, executes and answers one request.
    fn serve(&self, mem: &Mem, chain: DescriptorChain<MemGuard>, queue: u16) -> Disposition {
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
                return self.respond(writer, &CtrlHdr::default(), outcome, queue, None);
            }
        };

        let (hdr, outcome, submit_len) = match decode::decode(&request) {
            Ok((hdr, cmd)) => {
                self.stats.command(cmd.name());
                let submit_len = match &cmd {
                    Command::Submit3d { payload } => Some(payload.len()),
                    _ => None,
                };
                let ranges = MemRanges(mem);
                let outcome = lock(&self.gpu).execute(&hdr, cmd, &ranges);
                if let Some(e) = &outcome.error {
                    warn!(
                        queue,
                        cmd = type_name(hdr.type_),
                        ctx = hdr.ctx_id,
                        fence_id = hdr.fence_id,
                        "{e}"
                    );
                }
                (hdr, outcome, submit_len)
            }
            Err((hdr, e)) => {
                warn!(queue, head, "malformed request: {e}");
                self.stats.command(match e {
                    decode::DecodeError::UnknownType(_) => "UNKNOWN",
                    _ => "MALFORMED",
                });
                let outcome = Outcome::error_response(e.response_code());
                (hdr.unwrap_or_default(), outcome, None)
            }
        };
        self.respond(writer, &hdr, outcome, queue, submit_len)
    }

    /// Writes the response (control queue only) and decides when the chain
    /// goes back.
    fn respond(
        &self,
        writer: Option<Writer<'_>>,
        hdr: &CtrlHdr,
        outcome: Outcome,
        queue: u16,
        submit_len: Option<usize>,
    ) -> Disposition {
        if queue == CURSOR_QUEUE {
            // Cursor commands have no response; the descriptor just goes back.
            if outcome.response.is_error() {
                self.stats.error_response();
            }
            return Disposition::Now(0);
        }
        let mut bytes = outcome.response.encode(hdr);
        let mut is_error = outcome.response.is_error();
        let Some(mut writer) = writer else {
            self.stats.dropped();
            return Disposition::Now(0);
        };
        let room = writer.available_bytes();
        if room < bytes.len() {
            let hdr_len = std::mem::size_of::<CtrlHdr>();
            if room < hdr_len {
                warn!(
                    cmd = type_name(hdr.type_),
                    room, "no room for a response header: returning the chain empty"
                );
                self.stats.dropped();
                return Disposition::Now(0);
            }
            warn!(
                cmd = type_name(hdr.type_),
                room,
                need = bytes.len(),
                "response buffer too small"
            );
            bytes = hdr.response(RESP_ERR_UNSPEC).as_slice().to_vec();
            is_error = true;
        }
        if let Err(e) = io::Write::write_all(&mut writer, &bytes) {
            warn!(cmd = type_name(hdr.type_), "cannot write response: {e}");
            self.stats.dropped();
            return Disposition::Now(0);
        }
        if is_error {
            self.stats.error_response();
        }
        // `bytes` is at most a few KiB.
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);

        if !hdr.is_fenced() {
            return Disposition::Now(len);
        }
        let now = Instant::now();
        let delay = self
            .latency
            .saturating_add(Duration::from_nanos(outcome.work_ns));
        // Far enough to be "never" for a test run, without overflowing Instant.
        let due = now
            .checked_add(delay)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86400));
        if let Some(payload_len) = submit_len {
            debug!(
                ctx = hdr.ctx_id,
                fence_id = hdr.fence_id,
                payload_len,
                due_in = ?delay,
                "fenced SUBMIT_3D"
            );
        }
        Disposition::Fence {
            len,
            due,
            fence_id: hdr.fence_id,
            ctx_id: hdr.ctx_id,
        }
    }
}

/// Reads the whole device-readable part of a chain, refusing absurd sizes.
fn read_request(mem: &Mem, chain: DescriptorChain<MemGuard>) -> Result<Vec<u8>, String> {
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
/// (`EVENT_IDX` suppression is decided by the queue).
fn notify(vring: &VringRwLock, queue: u16) {
    let wanted = vring.needs_notification().unwrap_or_else(|e| {
        warn!(queue, "cannot read used_event, notifying anyway: {e}");
        true
    });
    if wanted {
        if let Err(e) = vring.signal_used_queue() {
            error!(queue, "cannot signal the guest: {e}");
        }
    }
}

/// The engine's completer: returns due fenced descriptors and notifies the
/// guest once for the batch.
fn complete_batch(stats: &Stats, batch: Vec<Completion>) {
    let mut last: Option<VringRwLock> = None;
    let mut n = 0u64;
    for c in batch {
        match c.vring.add_used(c.head, c.len) {
            Ok(()) => {
                n += 1;
                debug!(
                    fence_id = c.fence_id,
                    ctx = c.ctx_id,
                    after = ?c.submitted.elapsed(),
                    "fence completed"
                );
            }
            Err(e) => error!(
                fence_id = c.fence_id,
                "cannot return fenced descriptor: {e}"
            ),
        }
        last = Some(c.vring);
    }
    stats.fences_completed(n);
    // Every completion is on the control queue: one notification covers all.
    if let Some(vring) = last {
        notify(&vring, CONTROL_QUEUE);
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
        info!("device reset");
        self.engine.flush();
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
            Ok(pair) => Some(pair),
            Err(e) => {
                error!("cannot create the vring thread's exit event: {e}");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if queue_index == u32::from(CONTROL_QUEUE) {
            let pending = self.engine.pending();
            if pending > 0 {
                info!(
                    pending,
                    "control queue stopping: completing pending fences now"
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
        if is_listening(path) {
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

/// True when some process has a listening unix socket bound to `path`.
///
/// Read from `/proc/net/unix` rather than by connecting: a probe connection
/// would be accepted by a single-connection backend (like this one) as its
/// frontend and end its run.
fn is_listening(path: &Path) -> bool {
    const SO_ACCEPTCON: u32 = 1 << 16;
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let mut names = vec![path.to_path_buf()];
    if let Ok(abs) = std::path::absolute(path) {
        names.push(abs);
    }
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let listening = fields
            .get(3)
            .and_then(|f| u32::from_str_radix(f, 16).ok())
            .is_some_and(|flags| flags & SO_ACCEPTCON != 0);
        listening
            && fields
                .get(7)
                .is_some_and(|p| names.iter().any(|n| n.as_os_str() == *p))
    })
}

/// Serves one frontend connection on `listener` until it disconnects.
pub fn serve(listener: &mut Listener, backend: Arc<FencelabGpu>) -> anyhow::Result<()> {
    let mem = GuestMemoryAtomic::new(Mem::new());
    let mut daemon = VhostUserDaemon::new("fencelab-gpu".into(), backend, mem)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("cannot create the vhost-user daemon")?;
    info!("waiting for the frontend");
    daemon
        .start(listener)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("cannot accept the frontend connection")?;
    info!("frontend connected");
    let res = daemon.wait();
    daemon.request_shutdown();
    match res {
        Ok(()) => Ok(()),
        // A frontend that quits mid-message is a normal way for a VM to end.
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(anyhow::anyhow!("{e}")).context("vhost-user connection failed"),
    }
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
        let b = FencelabGpu::new(Duration::ZERO, Arc::new(Stats::new())).unwrap();
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
