//! The `decode` target: arbitrary bytes as one virtio-gpu request.
//!
//! Properties:
//! - a decoded command has the header's type;
//! - a `SUBMIT_3D`'s payload is exactly the `size` bytes after its
//!   `virtio_gpu_cmd_submit`; a `RESOURCE_ATTACH_BACKING` carries exactly
//!   `nr_entries` entries;
//! - a refused request keeps its header whenever the bytes hold one, and is
//!   answered with a `VIRTIO_GPU_RESP_ERR_*` code;
//! - a `SUBMIT_3D` payload that is a fencelab stream decodes to ops that
//!   encode back to a stream of the same length and the same ops; a refused
//!   stream's error points inside the payload.

use fencelab_device::decode::{Command, decode};
use fencelab_device::protocol::{RESP_ERR_INVALID_PARAMETER, RESP_ERR_UNSPEC};

/// Size of `virtio_gpu_ctrl_hdr`.
pub const HDR_LEN: usize = 24;
/// Size of `virtio_gpu_cmd_submit` (after the header).
const SUBMIT_LEN: usize = 8;
/// Size of `virtio_gpu_resource_attach_backing` (after the header).
const ATTACH_LEN: usize = 8;

pub fn check(data: &[u8]) {
    match decode(data) {
        Ok((hdr, cmd)) => {
            assert_eq!(
                cmd.type_code(),
                hdr.type_,
                "command type differs from header"
            );
            assert_eq!(u32_at(data, 0), hdr.type_);
            check_command(data, &cmd);
        }
        Err((hdr, e)) => {
            assert_eq!(
                hdr.is_some(),
                data.len() >= HDR_LEN,
                "header kept iff the request holds one: {e}"
            );
            let code = e.response_code();
            assert!(
                (RESP_ERR_UNSPEC..=RESP_ERR_INVALID_PARAMETER).contains(&code),
                "{code:#x} is not a RESP_ERR_* code"
            );
            assert!(!e.to_string().is_empty());
        }
    }
}

fn check_command(data: &[u8], cmd: &Command) {
    match cmd {
        Command::Submit3d { payload } => {
            let size = u32_at(data, HDR_LEN) as usize;
            assert_eq!(
                payload.len(),
                size,
                "SUBMIT_3D payload length != size field"
            );
            let start = HDR_LEN + SUBMIT_LEN;
            assert_eq!(payload.as_slice(), &data[start..start + size]);
            check_stream(payload);
        }
        Command::ResourceAttachBacking { entries, .. } => {
            let nr = u32_at(data, HDR_LEN + 4) as usize;
            assert_eq!(entries.len(), nr, "ATTACH_BACKING entries != nr_entries");
            assert!(data.len() >= HDR_LEN + ATTACH_LEN + nr * 16);
        }
        Command::CtxCreate { debug_name, .. } => {
            // At most 64 name bytes, each at most 3 bytes once lossily decoded.
            assert!(debug_name.len() <= 64 * 3);
        }
        _ => {}
    }
}

/// Checks a `SUBMIT_3D` payload as the device reads it.
pub fn check_stream(payload: &[u8]) {
    if !fencelab_stream::is_stream(payload) {
        return;
    }
    match fencelab_stream::decode(payload) {
        Ok(ops) => {
            assert!(ops.len() <= fencelab_stream::MAX_OPS);
            let again = fencelab_stream::encode(&ops);
            assert_eq!(again.len(), payload.len(), "re-encoded stream length");
            assert_eq!(fencelab_stream::decode(&again).as_ref(), Ok(&ops));
        }
        Err(e) => {
            use fencelab_stream::DecodeError as E;
            let offset = match e {
                E::Truncated { offset, .. }
                | E::UnknownOp { offset, .. }
                | E::BadLength { offset, .. } => Some(offset),
                E::ShortHeader { .. } | E::Version(_) | E::TooManyOps => None,
            };
            if let Some(offset) = offset {
                assert!(offset < payload.len(), "{e} points past the payload");
            }
            assert!(!e.to_string().is_empty());
        }
    }
}

/// The little-endian `u32` at `at`, or 0 when the bytes end before it.
pub fn u32_at(data: &[u8], at: usize) -> u32 {
    data.get(at..at + 4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeds;

    #[test]
    fn every_seed_passes() {
        let all = seeds::requests();
        assert!(all.len() > 20);
        for (name, bytes) in all {
            assert!(decode(&bytes).is_ok(), "seed {name} must decode");
            check(&bytes);
        }
    }

    #[test]
    fn short_and_garbage_inputs_pass() {
        for len in 0..80 {
            check(&vec![0xffu8; len]);
            check(&vec![0u8; len]);
        }
    }
}
