//! fencelab-device: a vhost-user virtio-gpu backend for QEMU's
//! `vhost-user-gpu-pci`, answering the Linux `virtio_gpu` driver and
//! completing fences on a schedule.
//!
//! - [`protocol`]: virtio-gpu wire structs and constants.
//! - [`decode`]: request bytes to a typed [`decode::Command`] (pure).
//! - [`gpu`]: device state (resources, contexts) and command semantics.
//! - [`fault`]: the types shared by plan, engine, trace and control plane.
//! - [`engine`]: the fence completion loop.
//! - [`backend`]: the `VhostUserBackend` implementation and vring plumbing.
//! - [`stats`]: accounting and latency histograms, for `ctl stats` and the
//!   shutdown summary.
//! - [`plan`]: fault plans (TOML), checked with precise errors.
//! - [`decide`]: the seeded decider that applies a plan to each fence.
//! - [`trace`]: the JSON-lines trace, and replaying a run from it.
//! - [`control`]: the control socket (server, protocol, `ctl` client).
//! - `socket_probe`: whether a process listens on a unix socket path.

pub mod backend;
pub mod control;
pub mod decide;
pub mod decode;
pub mod engine;
pub mod fault;
pub mod gpu;
pub mod plan;
pub mod protocol;
mod socket_probe;
pub mod stats;
#[cfg(test)]
mod testing;
pub mod trace;
