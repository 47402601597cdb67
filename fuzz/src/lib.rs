//! What the fuzz targets check, as plain functions so that they can be
//! unit-tested and replayed without libFuzzer.
//!
//! Each module's `check(data)` is one target's body: it must not panic for
//! any input, and panics (through `assert!`) when a property that must hold
//! for every input does not.
//!
//! - [`decode`]: virtio-gpu request bytes, and the fencelab command stream
//!   inside a `SUBMIT_3D`.
//! - [`gpu`]: a sequence of requests run through the device's state machine
//!   against a model of guest memory: a hostile guest's view of the device.
//! - [`plan`]: fault plans (TOML) and their JSON form.
//! - [`control`]: control-socket request lines.
//! - [`frames`]: how the `gpu` target splits its input into requests.
//! - [`seeds`]: well-formed inputs the corpora start from.

pub mod control;
pub mod decode;
pub mod frames;
pub mod gpu;
pub mod plan;
pub mod seeds;
