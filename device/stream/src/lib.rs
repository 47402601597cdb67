//! The fencelab command stream.
//!
//! A `SUBMIT_3D` payload that starts with [`MAGIC`] is a fencelab command
//! stream: a fixed header followed by operations. Everything is
//! little-endian, and every operation is `opcode: u32, len: u32` followed by
//! `len` bytes of arguments, so a decoder can reject what it does not know
//! precisely instead of guessing.
//!
//! ```text
//! header:  magic "FNCL" (4 bytes) | version: u32 (= 1)
//! op:      opcode: u32 | len: u32 | args[len]
//!   WORK     = 1  { ns: u64 }                                   simulated GPU time
//!   WRITE    = 2  { resource: u32, pad: u32, offset: u64, value: u64 }
//!                                                               lands before the fence completes
//!   DEADLINE = 3  { fence: u64, ns: u64 }                       deadline hint for a pending fence
//!   FAIL     = 4  { err: u32 }                                  answer with VIRTIO_GPU_RESP_ERR_*
//! ```
//!
//! This crate has no dependencies beyond `thiserror` so that the guest
//! workload (a static binary) and the device share one definition.

use thiserror::Error;

/// First four bytes of every fencelab command stream.
pub const MAGIC: [u8; 4] = *b"FNCL";
/// The stream version this crate writes and reads.
pub const VERSION: u32 = 1;
/// Size of the stream header in bytes.
pub const HEADER_LEN: usize = 8;
/// Upper bound on operations in one stream; more is refused, not truncated.
pub const MAX_OPS: usize = 4096;

const OP_WORK: u32 = 1;
const OP_WRITE: u32 = 2;
const OP_DEADLINE: u32 = 3;
const OP_FAIL: u32 = 4;

/// One operation of a fencelab command stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Occupy the simulated GPU for `ns` nanoseconds before the fence may complete.
    Work { ns: u64 },
    /// Write `value` at `offset` into the backing of `resource` before the fence completes.
    Write {
        resource: u32,
        offset: u64,
        value: u64,
    },
    /// A deadline hint: the guest wants `fence` signaled within `ns` nanoseconds.
    Deadline { fence: u64, ns: u64 },
    /// Answer the command with the given `VIRTIO_GPU_RESP_ERR_*` code.
    Fail { err: u32 },
}

impl Op {
    fn opcode(&self) -> u32 {
        match self {
            Op::Work { .. } => OP_WORK,
            Op::Write { .. } => OP_WRITE,
            Op::Deadline { .. } => OP_DEADLINE,
            Op::Fail { .. } => OP_FAIL,
        }
    }

    fn args_len(opcode: u32) -> Option<usize> {
        match opcode {
            OP_WORK => Some(8),
            OP_WRITE => Some(24),
            OP_DEADLINE => Some(16),
            OP_FAIL => Some(4),
            _ => None,
        }
    }
}

/// Why a payload is not a valid fencelab command stream.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("payload of {len} bytes is too short for the {HEADER_LEN}-byte stream header")]
    ShortHeader { len: usize },
    #[error("unsupported stream version {0} (this build reads version {VERSION})")]
    Version(u32),
    #[error("op {index} at byte {offset}: truncated ({need} bytes needed, {have} left)")]
    Truncated {
        index: usize,
        offset: usize,
        need: usize,
        have: usize,
    },
    #[error("op {index} at byte {offset}: unknown opcode {opcode:#x}")]
    UnknownOp {
        index: usize,
        offset: usize,
        opcode: u32,
    },
    #[error(
        "op {index} at byte {offset}: opcode {opcode:#x} takes {want} bytes of arguments, header says {got}"
    )]
    BadLength {
        index: usize,
        offset: usize,
        opcode: u32,
        want: usize,
        got: u32,
    },
    #[error("stream has more than {MAX_OPS} ops")]
    TooManyOps,
}

/// True when `payload` claims to be a fencelab stream (starts with [`MAGIC`]).
/// Anything else is a foreign workload the device accepts as a no-op.
pub fn is_stream(payload: &[u8]) -> bool {
    payload.starts_with(&MAGIC)
}

/// Encodes `ops` as a complete stream (header included).
pub fn encode(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + ops.len() * 32);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    for op in ops {
        let mut args = Vec::with_capacity(24);
        match *op {
            Op::Work { ns } => args.extend_from_slice(&ns.to_le_bytes()),
            Op::Write {
                resource,
                offset,
                value,
            } => {
                args.extend_from_slice(&resource.to_le_bytes());
                args.extend_from_slice(&0u32.to_le_bytes());
                args.extend_from_slice(&offset.to_le_bytes());
                args.extend_from_slice(&value.to_le_bytes());
            }
            Op::Deadline { fence, ns } => {
                args.extend_from_slice(&fence.to_le_bytes());
                args.extend_from_slice(&ns.to_le_bytes());
            }
            Op::Fail { err } => args.extend_from_slice(&err.to_le_bytes()),
        }
        out.extend_from_slice(&op.opcode().to_le_bytes());
        out.extend_from_slice(&(args.len() as u32).to_le_bytes());
        out.extend_from_slice(&args);
    }
    out
}

/// Decodes a complete stream. The payload must start with [`MAGIC`]
/// (check with [`is_stream`] first); every byte after the header must belong
/// to a well-formed op.
pub fn decode(payload: &[u8]) -> Result<Vec<Op>, DecodeError> {
    if payload.len() < HEADER_LEN || !is_stream(payload) {
        return Err(DecodeError::ShortHeader { len: payload.len() });
    }
    let version = u32_at(payload, 4);
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let mut ops = Vec::new();
    let mut offset = HEADER_LEN;
    while offset < payload.len() {
        let index = ops.len();
        if index == MAX_OPS {
            return Err(DecodeError::TooManyOps);
        }
        let have = payload.len() - offset;
        if have < 8 {
            return Err(DecodeError::Truncated {
                index,
                offset,
                need: 8,
                have,
            });
        }
        let opcode = u32_at(payload, offset);
        let len = u32_at(payload, offset + 4);
        let want = Op::args_len(opcode).ok_or(DecodeError::UnknownOp {
            index,
            offset,
            opcode,
        })?;
        if len as usize != want {
            return Err(DecodeError::BadLength {
                index,
                offset,
                opcode,
                want,
                got: len,
            });
        }
        if have - 8 < want {
            return Err(DecodeError::Truncated {
                index,
                offset,
                need: 8 + want,
                have,
            });
        }
        let a = offset + 8;
        let op = match opcode {
            OP_WORK => Op::Work {
                ns: u64_at(payload, a),
            },
            OP_WRITE => Op::Write {
                resource: u32_at(payload, a),
                offset: u64_at(payload, a + 8),
                value: u64_at(payload, a + 16),
            },
            OP_DEADLINE => Op::Deadline {
                fence: u64_at(payload, a),
                ns: u64_at(payload, a + 8),
            },
            OP_FAIL => Op::Fail {
                err: u32_at(payload, a),
            },
            _ => unreachable!("args_len accepted only known opcodes"),
        };
        ops.push(op);
        offset = a + want;
    }
    Ok(ops)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("caller checked length"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("caller checked length"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_op() {
        let ops = [
            Op::Work { ns: 1_000_000 },
            Op::Write {
                resource: 7,
                offset: 4096,
                value: 0xdead_beef,
            },
            Op::Deadline { fence: 42, ns: 5 },
            Op::Fail { err: 0x1203 },
        ];
        let bytes = encode(&ops);
        assert_eq!(&bytes[..4], b"FNCL");
        assert_eq!(
            bytes.len(),
            HEADER_LEN + (8 + 8) + (8 + 24) + (8 + 16) + (8 + 4)
        );
        assert_eq!(decode(&bytes).unwrap(), ops);
    }

    #[test]
    fn empty_stream_is_valid() {
        assert_eq!(decode(&encode(&[])).unwrap(), vec![]);
    }

    #[test]
    fn foreign_payload_is_not_a_stream() {
        assert!(!is_stream(b"\x00\x01\x02\x03virgl"));
        assert!(matches!(
            decode(b"FNC"),
            Err(DecodeError::ShortHeader { len: 3 })
        ));
    }

    #[test]
    fn rejects_wrong_version() {
        let mut bytes = encode(&[Op::Work { ns: 1 }]);
        bytes[4] = 9;
        assert_eq!(decode(&bytes), Err(DecodeError::Version(9)));
    }

    #[test]
    fn rejects_truncated_op() {
        let bytes = encode(&[Op::Work { ns: 1 }]);
        let cut = &bytes[..bytes.len() - 3];
        assert_eq!(
            decode(cut),
            Err(DecodeError::Truncated {
                index: 0,
                offset: 8,
                need: 16,
                have: 13
            })
        );
        assert!(matches!(
            decode(&bytes[..HEADER_LEN + 5]),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn rejects_unknown_opcode_and_lying_length() {
        let mut bytes = encode(&[Op::Work { ns: 1 }]);
        bytes[8] = 0x77;
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::UnknownOp {
                index: 0,
                offset: 8,
                opcode: 0x77
            })
        );

        let mut bytes = encode(&[Op::Work { ns: 1 }]);
        bytes[12] = 200;
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::BadLength {
                index: 0,
                offset: 8,
                opcode: 1,
                want: 8,
                got: 200
            })
        );
    }

    #[test]
    fn refuses_more_than_max_ops() {
        let ops = vec![Op::Work { ns: 0 }; MAX_OPS + 1];
        assert_eq!(decode(&encode(&ops)), Err(DecodeError::TooManyOps));
        let ops = vec![Op::Work { ns: 0 }; MAX_OPS];
        assert_eq!(decode(&encode(&ops)).unwrap().len(), MAX_OPS);
    }
}
