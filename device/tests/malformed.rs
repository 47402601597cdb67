//! A hostile guest's descriptor chains and requests, through the real
//! vhost-user backend (the in-process frontend of `common`): each class gets
//! its exact answer — a `VIRTIO_GPU_RESP_ERR_*`, or, where the chain has no
//! device-writable room for a response header, the chain returned with
//! length 0 and counted in the stats' `dropped` — and the backend still
//! completes a valid fenced `SUBMIT_3D` afterwards.

mod common;

use std::time::Duration;

use common::*;
use fencelab_device::backend::STRAY_TIMELINE;
use fencelab_device::fault::TimelineId;
use fencelab_device::protocol::*;
use fencelab_stream::Op;
use vm_memory::ByteValued;

/// A device whose fences complete at once.
fn rig(name: &str) -> Rig {
    Rig::start(name, Script::new(|_| latency(Duration::ZERO)), false)
}

fn hdr(type_: u32) -> CtrlHdr {
    CtrlHdr {
        type_,
        ..CtrlHdr::default()
    }
}

fn fenced(type_: u32, ctx_id: u32, fence_id: u64) -> CtrlHdr {
    CtrlHdr {
        type_,
        flags: VIRTIO_GPU_FLAG_FENCE,
        fence_id,
        ctx_id,
        ..CtrlHdr::default()
    }
}

fn bytes(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn rid(resource_id: u32) -> ResourceId {
    ResourceId {
        resource_id,
        padding: 0,
    }
}

/// Fill of response buffers, so a response that was never written shows.
const UNTOUCHED: u8 = 0xa5;

fn dropped(rig: &Rig) -> u64 {
    rig.stats.summary()["dropped"].as_u64().unwrap()
}

/// Kicks and waits for the next used entry; returns (head, written length).
fn served(rig: &mut Rig) -> (u32, u32) {
    rig.kick();
    rig.wait_fences(1);
    let idx = rig.drv.used_idx().wrapping_sub(1);
    rig.drv.used(idx)
}

/// Posts `request` (one readable descriptor) and a response buffer of
/// `resp_len` bytes; returns the response header once served, checking the
/// used length is the header's.
fn ask(rig: &mut Rig, request: &[u8], resp_len: u32) -> CtrlHdr {
    let req = rig.drv.place(request);
    let resp = rig.drv.buffer(resp_len as usize, UNTOUCHED);
    rig.drv.post_descs(&[
        RawDesc::readable(req, request.len() as u32).then(1),
        RawDesc::writable(resp, resp_len),
    ]);
    let (_, len) = served(rig);
    assert_eq!(len, 24, "used length of an error or NODATA answer");
    rig.drv.resp_hdr(resp)
}

/// The backend keeps serving: a fenced `SUBMIT_3D` on context 1 completes OK.
fn still_serving(rig: &mut Rig, fence: u64) {
    let resp = rig.post_fenced(1, None, fence, &[Op::Work { ns: 1_000 }]);
    rig.kick();
    assert_eq!(rig.wait_fences(1), [fence], "the valid fence came back");
    let h = rig.drv.resp_hdr(resp);
    assert_eq!((h.type_, h.fence_id), (RESP_OK_NODATA, fence));
}

/// Posts `descs`, waits for the chain and asserts it was dropped: returned
/// with length 0, counted, and `untouched` (its buffers) not written.
fn assert_dropped(rig: &mut Rig, descs: &[RawDesc], untouched: &[(u64, usize)]) {
    let before = dropped(rig);
    let head = rig.drv.post_descs(descs);
    assert_eq!(served(rig), (u32::from(head), 0), "returned empty");
    assert_eq!(dropped(rig), before + 1, "counted as dropped");
    for &(addr, len) in untouched {
        let got = rig.drv.read_bytes(addr, len);
        assert!(
            got.iter().all(|&b| b == UNTOUCHED),
            "buffer at {addr:#x} was written: {got:02x?}"
        );
    }
}

#[test]
fn chains_too_short() {
    let mut rig = rig("short");
    // Header only: nowhere to answer.
    let req = rig.drv.place(hdr(CMD_GET_DISPLAY_INFO).as_slice());
    assert_dropped(&mut rig, &[RawDesc::readable(req, 24)], &[]);
    // A fenced header with no response descriptor is dropped too (and never
    // becomes a fence the device would complete later).
    let h = fenced(CMD_SUBMIT_3D, 1, 7);
    let req = rig.drv.place(&submit(h, &[]));
    assert_dropped(&mut rig, &[RawDesc::readable(req, 32)], &[]);
    // A response descriptor smaller than a CtrlHdr: not written at all.
    let req = rig.drv.place(hdr(CMD_GET_DISPLAY_INFO).as_slice());
    let resp = rig.drv.buffer(16, UNTOUCHED);
    assert_dropped(
        &mut rig,
        &[
            RawDesc::readable(req, 24).then(1),
            RawDesc::writable(resp, 16),
        ],
        &[(resp, 16)],
    );
    // Shorter than a header, and shorter than the command's own struct.
    let display = hdr(CMD_GET_DISPLAY_INFO);
    assert_eq!(
        ask(&mut rig, &display.as_slice()[..10], 24).type_,
        RESP_ERR_UNSPEC
    );
    let create = ResourceCreate2d {
        resource_id: 5,
        format: FORMAT_B8G8R8X8_UNORM,
        width: 4,
        height: 4,
    };
    let short_body = bytes(&[
        hdr(CMD_RESOURCE_CREATE_2D).as_slice(),
        &create.as_slice()[..8],
    ]);
    assert_eq!(ask(&mut rig, &short_body, 24).type_, RESP_ERR_UNSPEC);
    // A response buffer too small for the command's answer (display info
    // is 408 bytes): an error header instead.
    assert_eq!(
        ask(&mut rig, hdr(CMD_GET_DISPLAY_INFO).as_slice(), 24).type_,
        RESP_ERR_UNSPEC
    );
    assert_eq!(rig.stats.count("MALFORMED"), 2);
    assert!(rig.gpu.pending_fences() == 0);
    still_serving(&mut rig, 100);
    rig.finish();
}

#[test]
fn descriptors_in_the_wrong_direction() {
    let mut rig = rig("direction");
    // The response buffer is device-readable: the device must not write it.
    let req = rig.drv.place(hdr(CMD_GET_DISPLAY_INFO).as_slice());
    let resp = rig.drv.buffer(408, UNTOUCHED);
    assert_dropped(
        &mut rig,
        &[
            RawDesc::readable(req, 24).then(1),
            RawDesc::readable(resp, 408),
        ],
        &[(resp, 408)],
    );
    // The request is device-writable: the device reads no request, so it
    // answers "unspecified error" in the writable room it was given.
    let req = rig.drv.place(hdr(CMD_GET_DISPLAY_INFO).as_slice());
    let resp = rig.drv.buffer(408, UNTOUCHED);
    let head = rig.drv.post_descs(&[
        RawDesc::writable(req, 24).then(1),
        RawDesc::writable(resp, 408),
    ]);
    assert_eq!(served(&mut rig), (u32::from(head), 24));
    assert_eq!(rig.drv.resp_hdr(req).type_, RESP_ERR_UNSPEC);
    assert_eq!(rig.drv.read_bytes(resp, 8), [UNTOUCHED; 8]);
    // A readable descriptor after a writable one breaks the chain's order:
    // refused, not executed (context 9 is not created).
    let create = bytes(&[CtrlHdr {
        ctx_id: 9,
        ..hdr(CMD_CTX_CREATE)
    }
    .as_slice()]);
    let req = rig.drv.place(&create);
    let resp = rig.drv.buffer(24, UNTOUCHED);
    let body = rig.drv.place(CtxCreate::default().as_slice());
    let head = rig.drv.post_descs(&[
        RawDesc::readable(req, 24).then(1),
        RawDesc::writable(resp, 24).then(2),
        RawDesc::readable(body, 72),
    ]);
    assert_eq!(served(&mut rig), (u32::from(head), 24));
    assert_eq!(rig.drv.resp_hdr(resp).type_, RESP_ERR_UNSPEC);
    rig.ctx_create(9);
    still_serving(&mut rig, 101);
    rig.finish();
}

#[test]
fn addresses_outside_guest_memory() {
    let mut rig = rig("outside");
    let past_end = GPA + MEM_SIZE as u64;
    // The request outside memory (wholly, and straddling the end): an error.
    for (addr, len) in [(0x1_0000_0000, 24), (past_end - 8, 24), (0, 24)] {
        let resp = rig.drv.buffer(24, UNTOUCHED);
        rig.drv.post_descs(&[
            RawDesc::readable(addr, len).then(1),
            RawDesc::writable(resp, 24),
        ]);
        assert_eq!(served(&mut rig).1, 24, "request at {addr:#x}");
        assert_eq!(rig.drv.resp_hdr(resp).type_, RESP_ERR_UNSPEC);
    }
    // The response outside memory: nowhere to answer.
    let req = rig.drv.place(hdr(CMD_GET_DISPLAY_INFO).as_slice());
    for addr in [0x1_0000_0000, past_end - 8, 0] {
        assert_dropped(
            &mut rig,
            &[
                RawDesc::readable(req, 24).then(1),
                RawDesc::writable(addr, 408),
            ],
            &[],
        );
    }
    // addr + len overflows u64, in the request and in the response.
    let resp = rig.drv.buffer(24, UNTOUCHED);
    rig.drv.post_descs(&[
        RawDesc::readable(u64::MAX - 8, 24).then(1),
        RawDesc::writable(resp, 24),
    ]);
    assert_eq!(served(&mut rig).1, 24);
    assert_eq!(rig.drv.resp_hdr(resp).type_, RESP_ERR_UNSPEC);
    assert_dropped(
        &mut rig,
        &[
            RawDesc::readable(req, 24).then(1),
            RawDesc::writable(u64::MAX - 8, 24),
        ],
        &[],
    );
    still_serving(&mut rig, 102);
    rig.finish();
}

#[test]
fn loops_long_chains_and_links_out_of_the_table() {
    let mut rig = rig("loops");
    let create = |ctx_id: u32| {
        bytes(&[
            CtrlHdr {
                ctx_id,
                ..hdr(CMD_CTX_CREATE)
            }
            .as_slice(),
            CtxCreate::default().as_slice(),
        ])
    };
    // Request -> response -> back to the request: a loop the device must
    // not follow. Refused with an error, the command not executed.
    let req = rig.drv.place(&create(20));
    let resp = rig.drv.buffer(24, UNTOUCHED);
    let head = rig.drv.post_descs(&[
        RawDesc::readable(req, 96).then(1),
        RawDesc::writable(resp, 24).then(0),
    ]);
    assert_eq!(served(&mut rig), (u32::from(head), 24));
    assert_eq!(rig.drv.resp_hdr(resp).type_, RESP_ERR_UNSPEC);
    // A descriptor pointing at itself, no writable room: dropped.
    let req = rig.drv.place(&create(21));
    assert_dropped(&mut rig, &[RawDesc::readable(req, 96).then(0)], &[]);
    // A chain that never ends within the queue size: every slot of the
    // table one readable descriptor, linked in a ring.
    let first = rig.drv.reserve_descs(QSIZE);
    assert_eq!(first, 0);
    let one_byte = rig.drv.place(&[0]);
    for i in 0..QSIZE {
        rig.drv
            .write_desc(i, RawDesc::readable(one_byte, 1).then((i + 1) % QSIZE));
    }
    let before = dropped(&rig);
    rig.drv.post_head(0);
    assert_eq!(served(&mut rig), (0, 0));
    assert_eq!(dropped(&rig), before + 1);
    // The next link names a descriptor past the table.
    let req = rig.drv.place(&create(22));
    let resp = rig.drv.buffer(24, UNTOUCHED);
    rig.drv.post_descs(&[
        RawDesc::readable(req, 96).then(1),
        RawDesc::writable(resp, 24).then(QSIZE + 40),
    ]);
    assert_eq!(served(&mut rig).1, 24);
    assert_eq!(rig.drv.resp_hdr(resp).type_, RESP_ERR_UNSPEC);
    let req = rig.drv.place(&create(23));
    assert_dropped(&mut rig, &[RawDesc::readable(req, 96).then(QSIZE)], &[]);
    // None of them was executed.
    for ctx in 20..24 {
        rig.ctx_create(ctx);
    }
    assert!(rig.stats.count("MALFORMED") >= 5);
    still_serving(&mut rig, 103);
    rig.finish();
}

#[test]
fn a_head_index_past_the_table_is_skipped() {
    let mut rig = rig("head");
    let before = dropped(&rig);
    rig.drv.post_head(QSIZE + 3);
    // The device cannot return a descriptor that does not exist; the next
    // chain is served and is the only one on the used ring.
    still_serving(&mut rig, 104);
    assert_eq!(rig.unseen_used(), 0);
    assert_eq!(dropped(&rig), before + 1);
    rig.finish();
}

#[test]
fn an_avail_index_past_the_queue_size_is_refused_until_put_right() {
    let mut rig = rig("avail");
    // Claims 300 new chains in a 256-entry ring: more than the ring can
    // hold, so the device walks none of it (and does not crash).
    let resp = rig.post_fenced(1, None, 110, &[]);
    rig.drv
        .publish_avail_idx(rig.drv.avail_idx().wrapping_add(299));
    rig.kick();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(rig.unseen_used(), 0);
    // The guest puts the index right: the chain it did post is served.
    rig.drv.republish_avail_idx();
    rig.kick();
    assert_eq!(rig.wait_fences(1), [110]);
    assert_eq!(rig.drv.resp_hdr(resp).type_, RESP_OK_NODATA);
    still_serving(&mut rig, 111);
    rig.finish();
}

#[test]
fn huge_lengths() {
    let mut rig = rig("huge");
    let req = rig.drv.place(hdr(CMD_GET_DISPLAY_INFO).as_slice());
    // A readable length of almost 4 GiB at a valid address: runs out of
    // guest memory, answered with an error.
    let resp = rig.drv.buffer(408, UNTOUCHED);
    rig.drv.post_descs(&[
        RawDesc::readable(req, 0xffff_0000).then(1),
        RawDesc::writable(resp, 408),
    ]);
    assert_eq!(served(&mut rig).1, 24);
    assert_eq!(rig.drv.resp_hdr(resp).type_, RESP_ERR_UNSPEC);
    // 4 GiB - 1: the response descriptor lies past the 4 GiB a chain may
    // span (virtio 1.2, 2.7.5.2), so there is nowhere to answer.
    let resp = rig.drv.buffer(408, UNTOUCHED);
    assert_dropped(
        &mut rig,
        &[
            RawDesc::readable(req, u32::MAX).then(1),
            RawDesc::writable(resp, 408),
        ],
        &[(resp, 408)],
    );
    // A writable length of 4 GiB - 1.
    assert_dropped(
        &mut rig,
        &[
            RawDesc::readable(req, 24).then(1),
            RawDesc::writable(resp, u32::MAX),
        ],
        &[],
    );
    // A request of 200 MiB, all in guest memory (200 descriptors naming
    // the same MiB): refused before the device allocates it.
    let mib = 1u32 << 20;
    let mut one_mib = vec![0u8; mib as usize];
    one_mib[..24].copy_from_slice(hdr(CMD_GET_DISPLAY_INFO).as_slice());
    let big = rig.drv.place(&one_mib);
    let resp = rig.drv.buffer(408, UNTOUCHED);
    let mut descs: Vec<RawDesc> = (1..=200)
        .map(|k| RawDesc::readable(big, mib).then(k))
        .collect();
    descs.push(RawDesc::writable(resp, 408));
    rig.drv.post_descs(&descs);
    assert_eq!(served(&mut rig).1, 24);
    assert_eq!(rig.drv.resp_hdr(resp).type_, RESP_ERR_UNSPEC);
    still_serving(&mut rig, 105);
    rig.finish();
}

#[test]
fn unknown_and_unsupported_commands() {
    let mut rig = rig("unknown");
    for ty in [
        0,
        0x4242,
        RESP_OK_NODATA,
        CMD_RESOURCE_CREATE_BLOB,
        u32::MAX,
    ] {
        let h = ask(&mut rig, &bytes(&[hdr(ty).as_slice(), &[0; 64]]), 24);
        assert_eq!(h.type_, RESP_ERR_UNSPEC, "type {ty:#x}");
    }
    // Fenced: the error still carries the fence, through the fence engine.
    let h = ask(&mut rig, fenced(0x4242, 1, 55).as_slice(), 24);
    assert_eq!(
        (h.type_, h.flags & VIRTIO_GPU_FLAG_FENCE, h.fence_id),
        (RESP_ERR_UNSPEC, VIRTIO_GPU_FLAG_FENCE, 55)
    );
    assert_eq!(rig.stats.count("UNKNOWN"), 5);
    assert_eq!(rig.stats.count("RESOURCE_CREATE_BLOB"), 0);
    still_serving(&mut rig, 106);
    rig.finish();
}

#[test]
fn resources_and_contexts_that_do_not_exist() {
    let mut rig = rig("missing");
    rig.backed_resource(1);
    let entry = MemEntry {
        addr: SCRATCH,
        length: 4096,
        padding: 0,
    };
    let attach = ResourceAttachBacking {
        resource_id: 77,
        nr_entries: 1,
    };
    let transfer = TransferToHost2d {
        r: Rect {
            x: 0,
            y: 0,
            width: 1,
            height: 1,
        },
        offset: 0,
        resource_id: 77,
        padding: 0,
    };
    let t3 = |resource_id| TransferHost3d {
        resource_id,
        ..TransferHost3d::default()
    };
    // A request of `type_` in context `ctx_id` with `body`.
    let req = |type_, ctx_id, body: &[u8]| {
        let h = CtrlHdr {
            ctx_id,
            ..hdr(type_)
        };
        bytes(&[h.as_slice(), body])
    };
    let attach_body = bytes(&[attach.as_slice(), entry.as_slice()]);
    // A SUBMIT_3D body (size, then the stream) writing resource 77.
    let stream_77 = write_77();
    let submit_77 = bytes(&[&submit(CtrlHdr::default(), &stream_77)[24..], &stream_77]);
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "ATTACH_BACKING to a missing resource",
            req(CMD_RESOURCE_ATTACH_BACKING, 0, &attach_body),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            "TRANSFER_TO_HOST_2D of a missing resource",
            req(CMD_TRANSFER_TO_HOST_2D, 0, transfer.as_slice()),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            "TRANSFER_TO_HOST_3D of a missing resource",
            req(CMD_TRANSFER_TO_HOST_3D, 1, t3(77).as_slice()),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            "TRANSFER_FROM_HOST_3D in a missing context",
            req(CMD_TRANSFER_FROM_HOST_3D, 66, t3(1).as_slice()),
            RESP_ERR_INVALID_CONTEXT_ID,
        ),
        (
            "CTX_ATTACH_RESOURCE of a missing resource",
            req(CMD_CTX_ATTACH_RESOURCE, 1, rid(77).as_slice()),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            "CTX_ATTACH_RESOURCE to a missing context",
            req(CMD_CTX_ATTACH_RESOURCE, 66, rid(1).as_slice()),
            RESP_ERR_INVALID_CONTEXT_ID,
        ),
        (
            "CTX_DETACH_RESOURCE from a missing context",
            req(CMD_CTX_DETACH_RESOURCE, 66, rid(1).as_slice()),
            RESP_ERR_INVALID_CONTEXT_ID,
        ),
        (
            "CTX_DESTROY of a missing context",
            req(CMD_CTX_DESTROY, 66, &[]),
            RESP_ERR_INVALID_CONTEXT_ID,
        ),
        (
            "RESOURCE_UNREF of a missing resource",
            req(CMD_RESOURCE_UNREF, 0, rid(77).as_slice()),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            "SUBMIT_3D to a missing context",
            req(CMD_SUBMIT_3D, 66, CmdSubmit::default().as_slice()),
            RESP_ERR_INVALID_CONTEXT_ID,
        ),
        (
            "SUBMIT_3D writing a missing resource",
            req(CMD_SUBMIT_3D, 1, &submit_77),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
    ];
    for (what, request, code) in &cases {
        assert_eq!(ask(&mut rig, request, 24).type_, *code, "{what}");
    }
    // Fenced, to a missing context: the error comes back as the fence
    // completes (the engine returns it), with the fence id.
    let h = fenced(CMD_SUBMIT_3D, 66, 56);
    let r = ask(&mut rig, &submit(h, &[]), 24);
    assert_eq!((r.type_, r.fence_id), (RESP_ERR_INVALID_CONTEXT_ID, 56));
    rig.wait_until("the errored fence completes", || {
        rig.gpu.pending_fences() == 0
    });
    assert_eq!(rig.stats.accounting().errored, 1);
    // On the device's own timeline: a context id the device does not know
    // opens no timeline.
    let timelines = rig.stats.accounting_by_timeline();
    assert_eq!(timelines[&STRAY_TIMELINE].errored, 1);
    assert!(!timelines.contains_key(&TimelineId { ctx: 66, ring: 0 }));
    // Nothing was created or attached by the refusals.
    assert_eq!(rig.stats.errors(), cases.len() as u64 + 1);
    still_serving(&mut rig, 107);
    rig.finish();
}

/// A fencelab stream writing resource 77.
fn write_77() -> Vec<u8> {
    fencelab_stream::encode(&[Op::Write {
        resource: 77,
        offset: 0,
        value: 1,
    }])
}

#[test]
fn submit_3d_sizes_that_lie_and_garbage_streams() {
    let mut rig = rig("lies");
    let stream = fencelab_stream::encode(&[Op::Work { ns: 10 }, Op::Work { ns: 20 }]);
    let h = CtrlHdr {
        ctx_id: 1,
        ..hdr(CMD_SUBMIT_3D)
    };
    let with_size = |size: u32, payload: &[u8]| {
        let b = CmdSubmit { size, padding: 0 };
        bytes(&[h.as_slice(), b.as_slice(), payload])
    };
    let len = stream.len() as u32;
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "size one larger than the data",
            with_size(len + 1, &stream),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "size u32::MAX",
            with_size(u32::MAX, &stream),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "size cuts an op in half",
            with_size(len - 3, &stream),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "size cuts into the magic: a foreign workload, a no-op",
            with_size(3, &stream),
            RESP_OK_NODATA,
        ),
        (
            "size smaller, at an op boundary: the ops it covers run",
            with_size(len - 16, &stream),
            RESP_OK_NODATA,
        ),
        (
            "garbage after the stream header",
            with_size(16, &bytes(&[&stream[..8], &[0xff; 8]])),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "an op whose length lies",
            with_size(
                16,
                &bytes(&[&stream[..8], &1u32.to_le_bytes(), &[200, 0, 0, 0]]),
            ),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "a stream of another version",
            with_size(8, &bytes(&[b"FNCL", &9u32.to_le_bytes()])),
            RESP_ERR_INVALID_PARAMETER,
        ),
    ];
    for (what, request, code) in &cases {
        assert_eq!(ask(&mut rig, request, 24).type_, *code, "{what}");
    }
    still_serving(&mut rig, 108);
    rig.finish();
}

#[test]
fn indirect_descriptors() {
    let mut rig = rig("indirect");
    assert_ne!(
        fencelab_device::backend::device_features()
            & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC),
        0,
        "the device offers indirect descriptors"
    );
    // A valid fenced SUBMIT_3D whose whole chain is in an indirect table.
    let h = fenced(CMD_SUBMIT_3D, 1, 60);
    let payload = fencelab_stream::encode(&[Op::Work { ns: 1 }]);
    let req = rig.drv.place(&submit(h, &payload));
    let body = rig.drv.place(&payload);
    let resp = rig.drv.buffer(24, UNTOUCHED);
    let table = rig.drv.indirect_table(&[
        RawDesc::readable(req, 32).then(1),
        RawDesc::readable(body, payload.len() as u32).then(2),
        RawDesc::writable(resp, 24),
    ]);
    rig.drv.post_descs(&[RawDesc::indirect(table, 3)]);
    assert_eq!(served(&mut rig).1, 24);
    let r = rig.drv.resp_hdr(resp);
    assert_eq!((r.type_, r.fence_id), (RESP_OK_NODATA, 60));

    // An indirect descriptor inside an indirect table (the spec forbids it):
    // refused, the context it would create not created.
    let create = bytes(&[
        CtrlHdr {
            ctx_id: 30,
            ..hdr(CMD_CTX_CREATE)
        }
        .as_slice(),
        CtxCreate::default().as_slice(),
    ]);
    let req = rig.drv.place(&create);
    let resp = rig.drv.buffer(24, UNTOUCHED);
    let inner = rig.drv.indirect_table(&[RawDesc::readable(req, 96)]);
    let table = rig.drv.indirect_table(&[
        RawDesc::readable(req, 96).then(1),
        RawDesc::writable(resp, 24).then(2),
        RawDesc::indirect(inner, 1),
    ]);
    rig.drv.post_descs(&[RawDesc::indirect(table, 3)]);
    assert_eq!(served(&mut rig).1, 24);
    assert_eq!(rig.drv.resp_hdr(resp).type_, RESP_ERR_UNSPEC);
    // Nested as the table's only entry: nothing readable or writable at all.
    let only = rig.drv.indirect_table(&[RawDesc::indirect(inner, 1)]);
    assert_dropped(&mut rig, &[RawDesc::indirect(only, 1)], &[]);
    // A table whose length is not a whole number of descriptors, and one
    // outside guest memory.
    let mut ragged = RawDesc::indirect(table, 3);
    ragged.len = 40;
    assert_dropped(&mut rig, &[ragged], &[]);
    assert_dropped(&mut rig, &[RawDesc::indirect(0x1_0000_0000, 3)], &[]);
    rig.ctx_create(30);
    still_serving(&mut rig, 109);
    rig.finish();
}

#[test]
fn a_burst_of_malformed_requests_leaves_nothing_behind() {
    const BURST: u32 = 10_000;
    const BATCH: u32 = 50;
    let mut rig = rig("burst");
    let display = rig.drv.place(hdr(CMD_GET_DISPLAY_INFO).as_slice());
    let unknown = rig.drv.place(fenced(0x4242, 1, 1).as_slice());
    let mut lying = submit(fenced(CMD_SUBMIT_3D, 1, 2), b"abc");
    lying[24..28].copy_from_slice(&1000u32.to_le_bytes());
    let lying = rig.drv.place(&lying);
    let resp = rig.drv.buffer(24, UNTOUCHED);
    let rss_before = rss_kib();
    let before = rig.stats.summary();
    let timelines_before = rig.stats.accounting_by_timeline().len();
    let mut expect_dropped = 0;
    for batch in 0..BURST / BATCH {
        for k in 0..BATCH {
            let n = batch * BATCH + k;
            let descs: Vec<RawDesc> = match n % 6 {
                // Fenced, to a context that does not exist (a new one each time).
                0 => {
                    let h = fenced(CMD_SUBMIT_3D, 1_000 + n, u64::from(n));
                    let req = rig.drv.place(&submit(h, &[]));
                    vec![
                        RawDesc::readable(req, 32).then(1),
                        RawDesc::writable(resp, 24),
                    ]
                }
                1 => vec![
                    RawDesc::readable(unknown, 24).then(1),
                    RawDesc::writable(resp, 24),
                ],
                2 => vec![
                    RawDesc::readable(lying, 32).then(1),
                    RawDesc::writable(resp, 24),
                ],
                3 => {
                    expect_dropped += 1;
                    vec![RawDesc::readable(display, 24).then(0)]
                }
                4 => {
                    expect_dropped += 1;
                    vec![
                        RawDesc::readable(display, 24).then(1),
                        RawDesc::readable(resp, 24),
                    ]
                }
                _ => vec![
                    RawDesc::readable(0x1_0000_0000, 24).then(1),
                    RawDesc::writable(resp, 24),
                ],
            };
            rig.drv.post_descs(&descs);
        }
        rig.kick();
        rig.wait_fences(BATCH as u16);
    }
    still_serving(&mut rig, 1_000_000);
    rig.wait_until("every fence completed", || rig.gpu.pending_fences() == 0);
    let after = rig.stats.summary();
    let grew = |key: &str| after[key].as_u64().unwrap() - before[key].as_u64().unwrap();
    assert_eq!(grew("dropped"), expect_dropped);
    assert_eq!(after["fences_pending"], 0);
    // Requests naming contexts that do not exist share one timeline (the
    // device's own) instead of opening one each; the rest were on context 1.
    let timelines = rig.stats.accounting_by_timeline().len() - timelines_before;
    assert_eq!(
        rig.stats
            .accounting_by_timeline()
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        [STRAY_TIMELINE, TimelineId { ctx: 1, ring: 0 }]
    );
    eprintln!(
        "burst of {BURST}: dropped {}, errors {}, fences {} submitted, new timelines {timelines}, \
         RSS {rss_before} -> {} KiB",
        grew("dropped"),
        grew("error_responses"),
        grew("fences_submitted"),
        rss_kib(),
    );
    rig.finish();
}

/// This process's resident set (the backend runs in it), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

#[test]
fn the_cursor_queue_answers_nothing_and_writes_nothing() {
    use vhost::vhost_user::VhostUserFrontend as _;
    use vmm_sys_util::eventfd::EventFd;
    let mut rig = rig("cursor");
    let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    configure_queue(&mut rig.fe, &rig.drv.mem, 1, CURSOR_RINGS, &kick, &call);
    rig.fe.set_vring_enable(1, true).unwrap();
    let mut cursor = Driver::with_rings(rig.drv.mem.clone(), CURSOR_RINGS);
    let update = bytes(&[
        hdr(CMD_UPDATE_CURSOR).as_slice(),
        UpdateCursor::default().as_slice(),
    ]);
    let valid = cursor.place(&update);
    let unknown = cursor.place(hdr(0x4242).as_slice());
    let short = cursor.place(&update[..30]);
    let writable = cursor.buffer(64, UNTOUCHED);
    let chains: Vec<(&str, Vec<RawDesc>)> = vec![
        ("valid", vec![RawDesc::readable(valid, 56)]),
        ("unknown type", vec![RawDesc::readable(unknown, 24)]),
        ("short body", vec![RawDesc::readable(short, 30)]),
        ("loop", vec![RawDesc::readable(valid, 56).then(0)]),
        ("outside memory", vec![RawDesc::readable(0x1_0000_0000, 56)]),
        (
            "with a writable descriptor",
            vec![
                RawDesc::readable(valid, 56).then(1),
                RawDesc::writable(writable, 64),
            ],
        ),
        (
            "request in a writable descriptor",
            vec![RawDesc::writable(writable, 64)],
        ),
    ];
    for (k, (what, descs)) in chains.iter().enumerate() {
        let head = cursor.post_descs(descs);
        kick.write(1).unwrap();
        cursor.wait_used(k as u16 + 1);
        assert_eq!(cursor.used(k as u16), (u32::from(head), 0), "{what}");
    }
    // Cursor commands have no response: nothing was written.
    assert_eq!(cursor.read_bytes(writable, 64), [UNTOUCHED; 64]);
    assert_eq!(rig.stats.count("UPDATE_CURSOR"), 2);
    assert_eq!(rig.stats.count("UNKNOWN"), 1);
    assert_eq!(rig.stats.count("MALFORMED"), 4);
    still_serving(&mut rig, 112);
    rig.finish();
}

/// A guest creating resources without end is refused at
/// [`MAX_RESOURCES`] with `ERR_OUT_OF_MEMORY`, changing nothing; unref
/// gives the room back, and the device keeps serving fences.
#[test]
fn resources_past_the_cap_are_refused_until_one_is_unreferenced() {
    use fencelab_device::gpu::MAX_RESOURCES;
    use vm_memory::{Bytes, GuestAddress};

    /// Chains per kick: two descriptors each, which with the one slot
    /// `reserve_descs` may skip at the table's end still fit the table.
    const BATCH: usize = QSIZE as usize / 2 - 1;
    let started = std::time::Instant::now();
    let mut rig = rig("caps");
    let create = |resource_id| {
        let c = ResourceCreate2d {
            resource_id,
            format: FORMAT_B8G8R8X8_UNORM,
            width: 1,
            height: 1,
        };
        bytes(&[hdr(CMD_RESOURCE_CREATE_2D).as_slice(), c.as_slice()])
    };
    let slots: Vec<(u64, u64)> = (0..BATCH)
        .map(|_| (rig.drv.buffer(48, 0), rig.drv.buffer(24, UNTOUCHED)))
        .collect();
    // Creates resources `first..first + BATCH` in one kick; their answers.
    let create_batch = |rig: &mut Rig, first: u32| -> Vec<u32> {
        for (k, &(req, resp)) in slots.iter().enumerate() {
            let mem = &rig.drv.mem;
            mem.write_slice(&create(first + k as u32), GuestAddress(req))
                .unwrap();
            mem.write_slice(&[UNTOUCHED; 24], GuestAddress(resp))
                .unwrap();
            rig.drv.post_descs(&[
                RawDesc::readable(req, 48).then(1),
                RawDesc::writable(resp, 24),
            ]);
        }
        rig.kick();
        rig.wait_fences(BATCH as u16);
        slots
            .iter()
            .map(|&(_, resp)| rig.drv.resp_hdr(resp).type_)
            .collect()
    };
    let errors_before = rig.stats.errors();
    let mut answers = Vec::new();
    while !answers.contains(&RESP_ERR_OUT_OF_MEMORY) {
        let first = answers.len() as u32 + 1;
        answers.extend(create_batch(&mut rig, first));
        assert!(answers.len() <= MAX_RESOURCES + BATCH, "never refused");
    }
    let refused = answers.len() - MAX_RESOURCES;
    assert!(
        answers[..MAX_RESOURCES]
            .iter()
            .all(|&t| t == RESP_OK_NODATA),
        "every create under the cap succeeds"
    );
    assert!(
        answers[MAX_RESOURCES..]
            .iter()
            .all(|&t| t == RESP_ERR_OUT_OF_MEMORY),
        "every create over the cap is refused"
    );
    assert_eq!(rig.stats.errors() - errors_before, refused as u64);
    assert_eq!(
        rig.stats.summary()["refused_over_cap"]["resources"],
        refused as u64,
        "the summary counts the refusals"
    );
    // Nothing was created by the refusals: unref of the first refused id
    // names no resource.
    let unref = |id: u32| bytes(&[hdr(CMD_RESOURCE_UNREF).as_slice(), rid(id).as_slice()]);
    let over = MAX_RESOURCES as u32 + 1;
    assert_eq!(
        ask(&mut rig, &unref(over), 24).type_,
        RESP_ERR_INVALID_RESOURCE_ID
    );
    // Unref one: there is room for exactly one more.
    assert_eq!(ask(&mut rig, &unref(5), 24).type_, RESP_OK_NODATA);
    assert_eq!(ask(&mut rig, &create(over), 24).type_, RESP_OK_NODATA);
    assert_eq!(
        ask(&mut rig, &create(over + 1), 24).type_,
        RESP_ERR_OUT_OF_MEMORY
    );
    still_serving(&mut rig, 9);
    rig.finish();
    eprintln!(
        "{MAX_RESOURCES} resources created, {} refused, in {:?}",
        refused + 1,
        started.elapsed()
    );
}
