//! The engine's [`Sink`] on the real device: lands a fence's `WRITE`s in
//! guest memory, returns its descriptor to the control queue's used ring,
//! and notifies the guest through the queue's call eventfd.
//!
//! A fence whose plan injects an error response still lands its writes:
//! the error is in the response, the job's side effects are not undone.

use std::sync::{Arc, Mutex, RwLock};

use tracing::{error, warn};
use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use super::{CONTROL_QUEUE, SharedMem, lock, notify};
use crate::engine::{Notifier, Sink};
use crate::gpu::GuestWrite;

/// A fenced request whose response is written and whose descriptor waits
/// for the engine to return it.
#[derive(Debug)]
pub struct Completion {
    pub head: u16,
    pub len: u32,
    /// Stored, in order, just before the descriptor goes back.
    pub writes: Vec<GuestWrite>,
}

/// The control queue, once the vring thread has seen it.
pub type SharedVring = Arc<Mutex<Option<VringRwLock>>>;

pub struct VringSink {
    vring: SharedVring,
    mem: SharedMem,
}

impl VringSink {
    pub fn new(vring: SharedVring, mem: SharedMem) -> Self {
        VringSink { vring, mem }
    }

    fn vring(&self) -> Option<VringRwLock> {
        lock(&self.vring).clone()
    }

    /// Stores `writes` in the current guest memory; returns the ones that
    /// landed as (address, value). Without memory (the frontend is gone)
    /// they are logged and dropped: the fence still completes.
    fn land(&self, writes: &[GuestWrite]) -> Vec<(u64, u64)> {
        if writes.is_empty() {
            return Vec::new();
        }
        let atomic = self.mem.read().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(atomic) = atomic else {
            warn!("no guest memory: {} WRITE(s) dropped", writes.len());
            return Vec::new();
        };
        store_writes(&*atomic.memory(), writes)
    }
}

/// Stores `writes` in `mem`, in order; returns the ones that landed as
/// (address, value). One that cannot land is logged and skipped.
pub fn store_writes<M: GuestMemoryBackend>(mem: &M, writes: &[GuestWrite]) -> Vec<(u64, u64)> {
    let mut landed = Vec::with_capacity(writes.len());
    for w in writes {
        match mem.write_slice(&w.bytes, GuestAddress(w.addr)) {
            Ok(()) => landed.push((w.addr, le_value(&w.bytes))),
            Err(e) => warn!(addr = w.addr, "cannot store a WRITE value: {e}"),
        }
    }
    landed
}

/// The first 8 bytes as a little-endian u64 (zero-padded): how a WRITE
/// (or the part of one in one backing entry) is traced.
fn le_value(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = bytes.len().min(8);
    b[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(b)
}

impl Notifier for VringSink {
    fn notify(&mut self) -> bool {
        self.vring()
            .is_some_and(|vring| notify(&vring, CONTROL_QUEUE))
    }

    fn notify_forced(&mut self) -> bool {
        let Some(vring) = self.vring() else {
            return false;
        };
        match vring.signal_used_queue() {
            Ok(()) => true,
            Err(e) => {
                error!("cannot signal the guest: {e}");
                false
            }
        }
    }
}

impl Sink for VringSink {
    type Item = Completion;

    fn complete(&mut self, c: Completion) -> Result<Vec<(u64, u64)>, String> {
        let vring = self
            .vring()
            .ok_or_else(|| "the control queue was never started".to_string())?;
        let landed = self.land(&c.writes);
        vring
            .add_used(c.head, c.len)
            .map_err(|e| format!("cannot return descriptor {}: {e}", c.head))?;
        Ok(landed)
    }
}

/// Guest memory as the backend last saw it.
pub fn shared_mem() -> SharedMem {
    Arc::new(RwLock::new(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_values_trace_as_little_endian_u64() {
        assert_eq!(
            le_value(&0x1122_3344_5566_7788u64.to_le_bytes()),
            0x1122_3344_5566_7788
        );
        assert_eq!(le_value(&[0x88, 0x77]), 0x7788);
        assert_eq!(le_value(&[]), 0);
        assert_eq!(le_value(&[1; 12]), 0x0101_0101_0101_0101);
    }
}
