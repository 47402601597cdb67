//! The `gpu` target: a hostile guest's request sequence through the
//! device's decoder and state machine ([`fencelab_device::gpu::Gpu`]),
//! against a small model of guest memory.
//!
//! Properties, after every request:
//! - a failed command has no side effects: its response is its error's
//!   code, with no writes, deadline hints or simulated work;
//! - only `SUBMIT_3D` carries writes, hints or work, and exactly what its
//!   fencelab stream asks for: 8 bytes per `WRITE`, in order, every byte
//!   inside guest memory; one hint per `DEADLINE`; the `WORK` total; the
//!   first `FAIL`'s code as the response;
//! - created resources and contexts exist, destroyed ones do not;
//! - nothing refers to a resource that does not exist: the scanout, and
//!   every context's attached resources; backing is inside guest memory.

use std::collections::BTreeSet;

use fencelab_device::decode::{Command, decode};
use fencelab_device::gpu::{DeadlineHint, Gpu, GuestRanges, Outcome, Response};
use fencelab_device::protocol::CtrlHdr;
use fencelab_stream::Op;

use crate::frames;

/// Guest RAM of the model: two 64 KiB regions with a hole between them.
pub const RAM: [(u64, u64); 2] = [(0x1000_0000, 0x1_0000), (0x2000_0000, 0x1_0000)];

/// [`RAM`] as the device asks about it.
pub struct ModelRam;

impl GuestRanges for ModelRam {
    fn contains(&self, addr: u64, len: u64) -> bool {
        RAM.iter().any(|&(start, size)| {
            addr >= start
                && addr < start + size
                && addr.checked_add(len).is_some_and(|end| end <= start + size)
        })
    }
}

pub fn check(data: &[u8]) {
    let mut gpu = Gpu::new();
    let mut ids = Ids::default();
    for request in frames::split(data) {
        let Ok((hdr, cmd)) = decode(request) else {
            continue;
        };
        ids.note(&hdr, &cmd);
        let outcome = gpu.execute(&hdr, cmd.clone(), &ModelRam);
        check_outcome(&hdr, &cmd, &outcome);
        check_effect(&gpu, &hdr, &cmd, &outcome);
        check_state(&gpu, &ids);
    }
}

/// Every resource and context id the sequence named.
#[derive(Default)]
struct Ids {
    resources: BTreeSet<u32>,
    contexts: BTreeSet<u32>,
}

impl Ids {
    fn note(&mut self, hdr: &CtrlHdr, cmd: &Command) {
        self.contexts.insert(hdr.ctx_id);
        if let Some(id) = resource_of(cmd) {
            self.resources.insert(id);
        }
    }
}

fn resource_of(cmd: &Command) -> Option<u32> {
    Some(match cmd {
        Command::ResourceCreate2d(c) => c.resource_id,
        Command::ResourceCreate3d(c) => c.resource_id,
        Command::ResourceUnref { resource_id }
        | Command::ResourceAttachBacking { resource_id, .. }
        | Command::ResourceDetachBacking { resource_id }
        | Command::CtxAttachResource { resource_id }
        | Command::CtxDetachResource { resource_id } => *resource_id,
        Command::SetScanout(s) => s.resource_id,
        Command::UpdateCursor(c) => c.resource_id,
        _ => return None,
    })
}

fn check_outcome(hdr: &CtrlHdr, cmd: &Command, outcome: &Outcome) {
    let encoded = outcome.response.encode(hdr);
    assert!(encoded.len() >= crate::decode::HDR_LEN);
    assert_eq!(crate::decode::u32_at(&encoded, 0), outcome.response.code());

    if let Some(e) = &outcome.error {
        assert_eq!(outcome.response, Response::Err(e.response_code()), "{e}");
        assert_no_side_effects(cmd, outcome);
        return;
    }
    match cmd {
        Command::Submit3d { payload } => check_submit(payload, outcome),
        _ => {
            assert!(
                !outcome.response.is_error(),
                "{} failed with no error",
                cmd.name()
            );
            assert_no_side_effects(cmd, outcome);
        }
    }
}

fn assert_no_side_effects(cmd: &Command, outcome: &Outcome) {
    assert!(outcome.writes.is_empty(), "{}: writes", cmd.name());
    assert!(
        outcome.deadlines.is_empty(),
        "{}: deadline hints",
        cmd.name()
    );
    assert_eq!(outcome.work_ns, 0, "{}: work", cmd.name());
}

/// A `SUBMIT_3D` that succeeded does exactly what its stream says.
fn check_submit(payload: &[u8], outcome: &Outcome) {
    let ops = if fencelab_stream::is_stream(payload) {
        fencelab_stream::decode(payload).expect("a refused stream is an error outcome")
    } else {
        Vec::new()
    };
    let mut want_bytes = Vec::new();
    let mut want_hints = Vec::new();
    let mut want_work = 0u64;
    let mut want_response = Response::NoData;
    for op in ops {
        match op {
            Op::Work { ns } => want_work = want_work.saturating_add(ns),
            Op::Write { value, .. } => want_bytes.extend_from_slice(&value.to_le_bytes()),
            Op::Deadline { fence, ns } => want_hints.push(DeadlineHint { fence, ns }),
            Op::Fail { err } => {
                if !want_response.is_error() {
                    want_response = Response::Err(err);
                }
            }
        }
    }
    assert_eq!(outcome.response, want_response);
    assert_eq!(outcome.work_ns, want_work);
    assert_eq!(outcome.deadlines, want_hints);
    let mut got_bytes = Vec::new();
    for w in &outcome.writes {
        assert!(!w.bytes.is_empty(), "empty write at {:#x}", w.addr);
        assert!(
            ModelRam.contains(w.addr, w.bytes.len() as u64),
            "write of {} bytes at {:#x} outside guest memory",
            w.bytes.len(),
            w.addr
        );
        got_bytes.extend_from_slice(&w.bytes);
    }
    assert_eq!(
        got_bytes, want_bytes,
        "written bytes differ from the WRITE values"
    );
}

/// What a successful command must have done to the state.
fn check_effect(gpu: &Gpu, hdr: &CtrlHdr, cmd: &Command, outcome: &Outcome) {
    if outcome.error.is_some() {
        return;
    }
    match cmd {
        Command::ResourceCreate2d(c) => assert!(gpu.resource(c.resource_id).is_some()),
        Command::ResourceCreate3d(c) => assert!(gpu.resource(c.resource_id).is_some()),
        Command::ResourceUnref { resource_id } => assert!(gpu.resource(*resource_id).is_none()),
        Command::ResourceAttachBacking {
            resource_id,
            entries,
        } => {
            let res = gpu.resource(*resource_id).expect("attached to a resource");
            assert_eq!(res.backing.as_ref(), Some(entries));
        }
        Command::ResourceDetachBacking { resource_id } => {
            assert!(
                gpu.resource(*resource_id)
                    .is_some_and(|r| r.backing.is_none())
            );
        }
        Command::CtxCreate { .. } => assert!(gpu.context(hdr.ctx_id).is_some()),
        Command::CtxDestroy => assert!(gpu.context(hdr.ctx_id).is_none()),
        Command::CtxAttachResource { resource_id } => {
            let ctx = gpu.context(hdr.ctx_id).expect("attached in a context");
            assert!(ctx.resources.contains(resource_id));
        }
        Command::CtxDetachResource { resource_id } => {
            let ctx = gpu.context(hdr.ctx_id).expect("detached in a context");
            assert!(!ctx.resources.contains(resource_id));
        }
        Command::SetScanout(s) => {
            let want = (s.resource_id != 0).then_some(s.resource_id);
            assert_eq!(gpu.scanout(), want);
        }
        _ => {}
    }
}

/// Nothing refers to a resource that does not exist; backing is in RAM.
fn check_state(gpu: &Gpu, ids: &Ids) {
    if let Some(id) = gpu.scanout() {
        assert!(
            gpu.resource(id).is_some(),
            "scanout shows resource {id}, which is gone"
        );
    }
    for &ctx_id in &ids.contexts {
        if let Some(ctx) = gpu.context(ctx_id) {
            for id in &ctx.resources {
                assert!(
                    gpu.resource(*id).is_some(),
                    "context {ctx_id} holds resource {id}, which is gone"
                );
            }
        }
    }
    for &id in &ids.resources {
        let Some(res) = gpu.resource(id) else {
            continue;
        };
        for e in res.backing.iter().flatten() {
            assert!(ModelRam.contains(e.addr, u64::from(e.length)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeds;

    #[test]
    fn the_model_ram_has_a_hole_and_no_wrap() {
        assert!(ModelRam.contains(0x1000_0000, 0x1_0000));
        assert!(!ModelRam.contains(0x1000_0000, 0x1_0001));
        assert!(!ModelRam.contains(0x1800_0000, 1));
        assert!(ModelRam.contains(0x2000_fff8, 8));
        assert!(!ModelRam.contains(u64::MAX, 2));
    }

    #[test]
    fn every_seed_sequence_passes_and_writes_land() {
        let sequences = seeds::sequences();
        assert!(!sequences.is_empty());
        for (_, bytes) in &sequences {
            check(bytes);
        }
    }

    #[test]
    fn the_write_sequence_really_writes() {
        // The seed that attaches backing and submits WRITEs must produce
        // writes, or the target never reaches resolve_write.
        let mut gpu = Gpu::new();
        let mut writes = 0;
        for request in seeds::write_sequence() {
            let (hdr, cmd) = decode(&request).expect("seed decodes");
            let outcome = gpu.execute(&hdr, cmd, &ModelRam);
            assert!(outcome.error.is_none(), "{:?}", outcome.error);
            writes += outcome.writes.len();
        }
        assert!(writes >= 3, "{writes} writes");
    }
}
