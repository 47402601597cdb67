//! The virtio-gpu command decoder ([`fencelab_device::decode::decode`]) and
//! the fencelab stream decoder ([`fencelab_stream::decode`]) on the
//! requests a guest really sends. Criterion group `decode`; each iteration
//! decodes one request, so throughput is commands/s.
//!
//! `cargo xtask bench` reads `target/criterion/decode/<name>/new/estimates.json`:
//! keep the names.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fencelab_device::decode::{Command, decode};
use fencelab_device::protocol::*;
use fencelab_stream::Op;
use vm_memory::ByteValued;

/// Header followed by each part's bytes.
fn request(hdr: CtrlHdr, parts: &[&[u8]]) -> Vec<u8> {
    let mut v = hdr.as_slice().to_vec();
    for p in parts {
        v.extend_from_slice(p);
    }
    v
}

/// The stream fence-hammer's smoke workload sends for fence `seq`.
fn hammer_stream(seq: u64) -> Vec<u8> {
    fencelab_stream::encode(&[
        Op::Work { ns: 250 },
        Op::Write {
            resource: 9,
            offset: seq * 8,
            value: seq + 1,
        },
    ])
}

/// A fenced `SUBMIT_3D` on context 1 carrying `payload`.
fn submit_3d(fence_id: u64, payload: &[u8]) -> Vec<u8> {
    let hdr = CtrlHdr {
        type_: CMD_SUBMIT_3D,
        flags: VIRTIO_GPU_FLAG_FENCE,
        fence_id,
        ctx_id: 1,
        ..CtrlHdr::default()
    };
    let size = u32::try_from(payload.len()).expect("payload fits a u32");
    let submit = CmdSubmit { size, padding: 0 };
    request(hdr, &[submit.as_slice(), payload])
}

/// What the guest's fbdev sends at probe: a 1024x768 framebuffer.
fn resource_create_2d() -> Vec<u8> {
    let hdr = CtrlHdr {
        type_: CMD_RESOURCE_CREATE_2D,
        ..CtrlHdr::default()
    };
    let body = ResourceCreate2d {
        resource_id: 1,
        format: FORMAT_B8G8R8X8_UNORM,
        width: 1024,
        height: 768,
    };
    request(hdr, &[body.as_slice()])
}

/// A backing scattered over 16 pages, as for a dumb buffer.
fn attach_backing(entries: u32) -> Vec<u8> {
    let hdr = CtrlHdr {
        type_: CMD_RESOURCE_ATTACH_BACKING,
        ..CtrlHdr::default()
    };
    let body = ResourceAttachBacking {
        resource_id: 1,
        nr_entries: entries,
    };
    let mut v = request(hdr, &[body.as_slice()]);
    for i in 0..u64::from(entries) {
        let e = MemEntry {
            addr: 0x1_0000_0000 + i * 0x2000,
            length: 4096,
            padding: 0,
        };
        v.extend_from_slice(e.as_slice());
    }
    v
}

fn bench_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));

    let submit = submit_3d(42, &hammer_stream(41));
    assert!(matches!(decode(&submit), Ok((_, Command::Submit3d { .. }))));
    g.bench_function("submit_3d_fencelab_stream", |b| {
        b.iter(|| decode(black_box(&submit)))
    });

    let create = resource_create_2d();
    assert!(matches!(
        decode(&create),
        Ok((_, Command::ResourceCreate2d(_)))
    ));
    g.bench_function("resource_create_2d", |b| {
        b.iter(|| decode(black_box(&create)))
    });

    let attach = attach_backing(16);
    assert!(matches!(
        decode(&attach),
        Ok((_, Command::ResourceAttachBacking { ref entries, .. })) if entries.len() == 16
    ));
    g.bench_function("attach_backing_16_entries", |b| {
        b.iter(|| decode(black_box(&attach)))
    });

    // 20 of the 24 header bytes: the error path.
    let short = submit[..20].to_vec();
    assert!(decode(&short).is_err());
    g.bench_function("malformed_short_header", |b| {
        b.iter(|| decode(black_box(&short)))
    });

    let stream = hammer_stream(41);
    assert_eq!(fencelab_stream::decode(&stream).map(|ops| ops.len()), Ok(2));
    g.bench_function("fencelab_stream_ops", |b| {
        b.iter(|| fencelab_stream::decode(black_box(&stream)))
    });

    g.finish();
}

criterion_group!(benches, bench_decode);
criterion_main!(benches);
