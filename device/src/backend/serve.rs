//! Serving frontends on the vhost-user socket: one connection
//! ([`serve`], what every boot uses: the device exits when QEMU goes), or
//! one after another on the same socket ([`serve_reconnecting`],
//! `fencelab-device --reconnect`).
//!
//! Between connections the device forgets everything that belonged to the
//! frontend that left ([`FencelabGpu::end_connection`]): its fences, its
//! rings, its memory, its resources and contexts. A pending fence's
//! descriptor is an index into a ring that only the departed frontend can
//! read; returning it later into the next frontend's ring would complete a
//! request that frontend never made. vhost-user has no way to carry
//! in-flight requests across a reconnect unless `INFLIGHT_SHMFD` is
//! negotiated, which fencelab does not offer (QEMU's vhost-user-gpu does
//! not use it either).
//!
//! vhost-user-backend 0.24 leaks one fd per connection: the exit event a
//! backend hands it (`VhostUserBackend::exit_event`) goes into its vring
//! thread's epoll as `consumer.into_raw_fd()` and is never closed
//! (`VringEpollHandler::new`, event_loop.rs). [`ExitConsumers`] remembers
//! those fds and closes them once the connection's daemon (and with it the
//! epoll and its thread) is gone. `device/tests/lifecycle.rs` counts the
//! device's fds across 100 connections, so a crate upgrade that starts
//! closing them itself shows up there.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tracing::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::event::EventConsumer;

use super::{FencelabGpu, Gpu, Mem, lock};

/// How one connection ended badly.
#[derive(Debug)]
enum ServeError {
    /// No connection was made: the socket itself is unusable.
    Accept(anyhow::Error),
    /// The frontend connected and the session failed.
    Connection(anyhow::Error),
}

impl From<ServeError> for anyhow::Error {
    fn from(e: ServeError) -> Self {
        match e {
            ServeError::Accept(e) | ServeError::Connection(e) => e,
        }
    }
}

/// Serves one frontend connection on `listener` until it disconnects.
/// What the frontend left pending stays as it was (the exit summary counts
/// it as pending).
pub fn serve(listener: &mut Listener, backend: Arc<FencelabGpu>) -> anyhow::Result<()> {
    serve_one(listener, backend).map_err(anyhow::Error::from)
}

/// Serves frontends one after another on `listener`, forever: after each
/// disconnect (clean or not) the device ends that connection
/// ([`FencelabGpu::end_connection`]), counts it in `ended`, and accepts the
/// next. Returns only when the socket cannot accept any more.
pub fn serve_reconnecting(
    listener: &mut Listener,
    backend: Arc<FencelabGpu>,
    ended: &AtomicU64,
) -> anyhow::Result<()> {
    loop {
        let res = serve_one(listener, backend.clone());
        let dropped = backend.end_connection();
        let connection = ended.fetch_add(1, Ordering::Relaxed) + 1;
        match res {
            Ok(()) => info!(
                connection,
                dropped, "frontend disconnected; waiting for the next one"
            ),
            Err(ServeError::Connection(e)) => warn!(
                connection,
                dropped, "frontend connection failed ({e:#}); waiting for the next one"
            ),
            Err(ServeError::Accept(e)) => return Err(e),
        }
    }
}

fn serve_one(listener: &mut Listener, backend: Arc<FencelabGpu>) -> Result<(), ServeError> {
    backend.forget_vrings();
    let mem = GuestMemoryAtomic::new(Mem::new());
    let mut daemon = VhostUserDaemon::new("fencelab-gpu".into(), backend, mem)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("cannot create the vhost-user daemon")
        .map_err(ServeError::Accept)?;
    info!("waiting for the frontend");
    daemon
        .start(listener)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("cannot accept the frontend connection")
        .map_err(ServeError::Accept)?;
    info!("frontend connected");
    let res = daemon.wait();
    daemon.request_shutdown();
    match res {
        Ok(()) => Ok(()),
        // A frontend that quits mid-message is a normal way for a VM to end.
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(ServeError::Connection(
            anyhow::anyhow!("{e}").context("vhost-user connection failed"),
        )),
    }
}

/// The exit-event fds given to vhost-user-backend for the current
/// connection's vring threads, which it leaks.
///
/// # Invariants
///
/// Every fd in the list is open and owned by nobody (vhost-user-backend gave
/// it up with `into_raw_fd`) until [`ExitConsumers::close_all`] closes it.
#[derive(Debug, Default)]
pub(super) struct ExitConsumers(Mutex<Vec<RawFd>>);

impl ExitConsumers {
    /// Notes the consumer of an exit event being handed to
    /// vhost-user-backend.
    pub(super) fn note(&self, consumer: &EventConsumer) {
        lock(&self.0).push(consumer.as_raw_fd());
    }

    /// Closes the noted fds. Only once the daemon that got them is dropped:
    /// its vring threads are joined and its epoll is closed.
    fn close_all(&self) {
        for fd in lock(&self.0).drain(..) {
            // SAFETY: by the type invariant `fd` is open and nobody owns it;
            // it is removed from the list as it is closed, so it is closed
            // once.
            if unsafe { libc::close(fd) } != 0 {
                warn!(
                    fd,
                    "cannot close a vring thread's exit event: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

impl FencelabGpu {
    /// Forgets the frontend that left: completes its pending fences into its
    /// own (now unread) ring and abandons the hung ones, exactly as a device
    /// reset does, before the ring is forgotten, so that nothing of it can
    /// reach the next frontend's ring; then drops its rings, its guest
    /// memory mapping, its display socket, and its resources and contexts.
    /// Returns how many fences were still outstanding.
    pub fn end_connection(&self) -> usize {
        let outstanding = self.engine.outstanding();
        let abandoned = self.engine.reset();
        if outstanding > 0 {
            info!(
                outstanding,
                abandoned,
                "frontend gone: its pending fences completed into its own ring, hung ones abandoned"
            );
        }
        self.forget_vrings();
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = None;
        *lock(&self.gpu_socket) = None;
        *lock(&self.gpu) = Gpu::new();
        self.exit_consumers.close_all();
        outstanding
    }
}
