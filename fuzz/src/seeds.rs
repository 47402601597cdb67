//! Well-formed inputs the corpora start from, built from the device's own
//! wire structs and fixtures: one request of every command, fencelab
//! streams with every op, request sequences that reach `WRITE` resolution,
//! every example and broken plan, and the control requests `CONTROL.md`
//! documents. `examples/seed_corpus.rs` writes them out as files.

use std::io;
use std::path::{Path, PathBuf};

use fencelab_device::protocol::*;
use fencelab_stream::Op;
use vm_memory::ByteValued;

use crate::frames;
use crate::gpu::RAM;

/// A named input.
pub type Seed = (String, Vec<u8>);

/// The context every seed request runs in.
const CTX: u32 = 1;
/// The resource the seed sequences create and write to.
const RES: u32 = 7;

fn hdr(ty: u32) -> CtrlHdr {
    CtrlHdr {
        type_: ty,
        ctx_id: CTX,
        ..CtrlHdr::default()
    }
}

fn fenced(ty: u32, fence_id: u64) -> CtrlHdr {
    CtrlHdr {
        flags: VIRTIO_GPU_FLAG_FENCE,
        fence_id,
        ..hdr(ty)
    }
}

fn req(h: CtrlHdr, parts: &[&[u8]]) -> Vec<u8> {
    let mut v = h.as_slice().to_vec();
    for p in parts {
        v.extend_from_slice(p);
    }
    v
}

fn resource(resource_id: u32) -> ResourceId {
    ResourceId {
        resource_id,
        padding: 0,
    }
}

fn full_rect() -> Rect {
    Rect {
        x: 0,
        y: 0,
        width: 16,
        height: 16,
    }
}

/// `SUBMIT_3D` carrying `payload`.
pub fn submit(fence_id: u64, payload: &[u8]) -> Vec<u8> {
    let size = u32::try_from(payload.len()).expect("seed payloads are small");
    let b = CmdSubmit { size, padding: 0 };
    req(fenced(CMD_SUBMIT_3D, fence_id), &[b.as_slice(), payload])
}

fn create_2d(resource_id: u32) -> Vec<u8> {
    let b = ResourceCreate2d {
        resource_id,
        format: FORMAT_B8G8R8X8_UNORM,
        width: 16,
        height: 16,
    };
    req(hdr(CMD_RESOURCE_CREATE_2D), &[b.as_slice()])
}

/// Backing for [`RES`]: 1 KiB at the end of the first RAM region, the rest
/// at the start of the second, so a `WRITE` can straddle two entries.
fn attach(resource_id: u32) -> Vec<u8> {
    let entries = [
        MemEntry {
            addr: RAM[0].0 + RAM[0].1 - 0x400,
            length: 0x400,
            padding: 0,
        },
        MemEntry {
            addr: RAM[1].0,
            length: 0x400,
            padding: 0,
        },
    ];
    let b = ResourceAttachBacking {
        resource_id,
        nr_entries: entries.len() as u32,
    };
    let mut v = req(hdr(CMD_RESOURCE_ATTACH_BACKING), &[b.as_slice()]);
    for e in &entries {
        v.extend_from_slice(e.as_slice());
    }
    v
}

fn ctx_create(name: &[u8]) -> Vec<u8> {
    let mut b = CtxCreate {
        nlen: name.len() as u32,
        ..CtxCreate::default()
    };
    b.debug_name[..name.len()].copy_from_slice(name);
    req(hdr(CMD_CTX_CREATE), &[b.as_slice()])
}

/// Fencelab streams: every op, and a few the device refuses.
pub fn streams() -> Vec<(String, Vec<u8>)> {
    let write = |offset| Op::Write {
        resource: RES,
        offset,
        value: 0x1122_3344_5566_7788,
    };
    let mut bad_version = fencelab_stream::encode(&[Op::Work { ns: 1 }]);
    bad_version[4] = 2;
    let mut bad_length = fencelab_stream::encode(&[Op::Fail { err: 0x1200 }]);
    bad_length[12] = 9;
    vec![
        ("empty".into(), fencelab_stream::encode(&[])),
        (
            "work".into(),
            fencelab_stream::encode(&[Op::Work { ns: 1_000 }]),
        ),
        (
            "write-deadline-work".into(),
            fencelab_stream::encode(&[
                write(0),
                Op::Deadline { fence: 1, ns: 500 },
                Op::Work { ns: 2_000_000 },
            ]),
        ),
        // 0x3fc: four bytes in each backing entry.
        (
            "write-straddling".into(),
            fencelab_stream::encode(&[write(0x3fc)]),
        ),
        (
            "fail-twice".into(),
            fencelab_stream::encode(&[Op::Fail { err: 0x1205 }, Op::Fail { err: 0x1200 }]),
        ),
        ("bad-version".into(), bad_version),
        ("bad-length".into(), bad_length),
        ("foreign".into(), b"\x00\x01virgl-commands".to_vec()),
    ]
}

/// One request of every command the decoder knows, and submits of every
/// stream.
pub fn requests() -> Vec<Seed> {
    let r = full_rect();
    let mut out: Vec<Seed> = vec![
        ("display-info".into(), req(hdr(CMD_GET_DISPLAY_INFO), &[])),
        (
            "edid".into(),
            req(
                hdr(CMD_GET_EDID),
                &[GetEdid {
                    scanout: 0,
                    padding: 0,
                }
                .as_slice()],
            ),
        ),
        (
            "capset-info".into(),
            req(
                hdr(CMD_GET_CAPSET_INFO),
                &[GetCapsetInfo {
                    capset_index: 0,
                    padding: 0,
                }
                .as_slice()],
            ),
        ),
        (
            "capset".into(),
            req(
                hdr(CMD_GET_CAPSET),
                &[GetCapset {
                    capset_id: 1,
                    capset_version: 1,
                }
                .as_slice()],
            ),
        ),
        ("create-2d".into(), create_2d(RES)),
        (
            "unref".into(),
            req(hdr(CMD_RESOURCE_UNREF), &[resource(RES).as_slice()]),
        ),
        (
            "set-scanout".into(),
            req(
                hdr(CMD_SET_SCANOUT),
                &[SetScanout {
                    r,
                    scanout_id: 0,
                    resource_id: RES,
                }
                .as_slice()],
            ),
        ),
        (
            "flush".into(),
            req(
                hdr(CMD_RESOURCE_FLUSH),
                &[ResourceFlush {
                    r,
                    resource_id: RES,
                    padding: 0,
                }
                .as_slice()],
            ),
        ),
        (
            "transfer-2d".into(),
            req(
                hdr(CMD_TRANSFER_TO_HOST_2D),
                &[TransferToHost2d {
                    r,
                    offset: 0,
                    resource_id: RES,
                    padding: 0,
                }
                .as_slice()],
            ),
        ),
        ("attach-backing".into(), attach(RES)),
        (
            "detach-backing".into(),
            req(
                hdr(CMD_RESOURCE_DETACH_BACKING),
                &[resource(RES).as_slice()],
            ),
        ),
        ("ctx-create".into(), ctx_create(b"fencelab")),
        ("ctx-destroy".into(), req(hdr(CMD_CTX_DESTROY), &[])),
        (
            "ctx-attach".into(),
            req(hdr(CMD_CTX_ATTACH_RESOURCE), &[resource(RES).as_slice()]),
        ),
        (
            "ctx-detach".into(),
            req(hdr(CMD_CTX_DETACH_RESOURCE), &[resource(RES).as_slice()]),
        ),
        (
            "create-3d".into(),
            req(
                hdr(CMD_RESOURCE_CREATE_3D),
                &[ResourceCreate3d {
                    resource_id: RES + 1,
                    target: 2,
                    format: 1,
                    width: 16,
                    height: 16,
                    depth: 1,
                    array_size: 1,
                    ..ResourceCreate3d::default()
                }
                .as_slice()],
            ),
        ),
    ];
    let t3 = TransferHost3d {
        box_: Box3d {
            w: 16,
            h: 16,
            d: 1,
            ..Box3d::default()
        },
        resource_id: RES + 1,
        stride: 64,
        ..TransferHost3d::default()
    };
    out.push((
        "transfer-to-3d".into(),
        req(hdr(CMD_TRANSFER_TO_HOST_3D), &[t3.as_slice()]),
    ));
    out.push((
        "transfer-from-3d".into(),
        req(hdr(CMD_TRANSFER_FROM_HOST_3D), &[t3.as_slice()]),
    ));
    let cursor = UpdateCursor {
        pos: CursorPos {
            scanout_id: 0,
            x: 10,
            y: 10,
            padding: 0,
        },
        resource_id: RES,
        hot_x: 0,
        hot_y: 0,
        padding: 0,
    };
    out.push((
        "update-cursor".into(),
        req(hdr(CMD_UPDATE_CURSOR), &[cursor.as_slice()]),
    ));
    out.push((
        "move-cursor".into(),
        req(hdr(CMD_MOVE_CURSOR), &[cursor.as_slice()]),
    ));
    for (i, (name, payload)) in streams().into_iter().enumerate() {
        out.push((format!("submit-{name}"), submit(i as u64 + 1, &payload)));
    }
    out
}

/// The requests that set up [`RES`] with backing in a context and submit
/// `WRITE`s to it (one of them straddling two backing entries).
pub fn write_sequence() -> Vec<Vec<u8>> {
    let streams = streams();
    let stream = |name: &str| {
        streams
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.clone())
            .expect("seed stream exists")
    };
    vec![
        ctx_create(b"hammer"),
        create_2d(RES),
        attach(RES),
        req(hdr(CMD_CTX_ATTACH_RESOURCE), &[resource(RES).as_slice()]),
        submit(1, &stream("write-deadline-work")),
        submit(2, &stream("write-straddling")),
    ]
}

/// Request sequences for the `gpu` target, joined by [`frames::join`].
pub fn sequences() -> Vec<Seed> {
    let all = requests();
    let find = |name: &str| {
        all.iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r.as_slice())
            .expect("seed request exists")
    };
    let writes = write_sequence();
    let mut teardown: Vec<&[u8]> = writes.iter().map(Vec::as_slice).collect();
    teardown.extend(
        [
            "set-scanout",
            "flush",
            "transfer-2d",
            "update-cursor",
            "ctx-detach",
            "detach-backing",
            "unref",
            "ctx-destroy",
        ]
        .map(find),
    );
    let probe = [
        "display-info",
        "edid",
        "capset-info",
        "capset",
        "create-3d",
        "transfer-to-3d",
        "transfer-from-3d",
        "move-cursor",
    ]
    .map(find);
    vec![
        (
            "writes".into(),
            frames::join(writes.iter().map(Vec::as_slice)),
        ),
        ("lifecycle".into(), frames::join(teardown)),
        ("probe".into(), frames::join(probe)),
    ]
}

fn device_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../device")
}

/// Every example plan and every broken one, as (file name, text).
pub fn plans() -> io::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for dir in [
        device_dir().join("plans"),
        device_dir().join("plans/broken"),
    ] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .map(|e| e.map(|e| e.path()))
            .collect::<io::Result<_>>()?;
        files.retain(|p| p.extension().is_some_and(|e| e == "toml"));
        files.sort();
        for file in files {
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let prefix = if dir.ends_with("broken") {
                "broken-"
            } else {
                ""
            };
            out.push((format!("{prefix}{name}"), std::fs::read_to_string(&file)?));
        }
    }
    Ok(out)
}

/// The request lines `device/CONTROL.md` shows.
pub fn control_requests() -> io::Result<Vec<String>> {
    let text = std::fs::read_to_string(device_dir().join("CONTROL.md"))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("{\"cmd\""))
        .map(str::to_string)
        .collect())
}

/// Writes every target's seeds into `<root>/<target>/<name>`.
pub fn write_corpus(root: &Path) -> io::Result<usize> {
    let mut count = 0;
    let mut put = |target: &str, name: &str, bytes: &[u8]| -> io::Result<()> {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
        count += 1;
        Ok(())
    };
    for (name, bytes) in requests() {
        put("decode", &name, &bytes)?;
    }
    for (name, bytes) in sequences() {
        put("gpu", &name, &bytes)?;
    }
    for (name, text) in plans()? {
        put("plan", &name, text.as_bytes())?;
    }
    for (i, line) in control_requests()?.into_iter().enumerate() {
        put("control", &format!("control-md-{i}"), line.as_bytes())?;
    }
    Ok(count)
}
