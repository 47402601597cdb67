//! Drives the real backend through the vhost-user protocol, as QEMU would:
//! a `vhost::Frontend` over a unix socket, guest memory in a memfd, and a
//! split virtqueue written by hand in that memory.

mod common;

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use fencelab_device::backend::{self, DeviceConfig};
use fencelab_device::decide::PlanDecider;
use fencelab_device::fault::NoTrace;
use fencelab_device::plan::Plan;
use fencelab_device::protocol::*;
use fencelab_device::stats::Stats;
use vhost::vhost_user::VhostUserFrontend;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vm_memory::{ByteValued, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

#[test]
fn serves_a_frontend_like_qemu() {
    let path = socket_path("serve");
    let stats = Arc::new(Stats::new());
    let latency = Duration::from_millis(20);
    let (_gpu, server) = spawn_backend(
        &path,
        DeviceConfig {
            decider: Box::new(PlanDecider::new(Plan::fixed_latency(latency), 7)),
            tracer: Arc::new(NoTrace),
            stats: stats.clone(),
        },
    );
    // Like a driver without EVENT_IDX: every used entry is signalled.
    let (mut fe, offered) = connect(&path, false);
    assert_ne!(offered & (1 << VIRTIO_GPU_F_VIRGL), 0);
    assert_ne!(offered & (1 << VIRTIO_GPU_F_EDID), 0);
    let (_, cfg) = fe
        .get_config(0, 16, VhostUserConfigFlags::empty(), &[0u8; 16])
        .unwrap();
    let cfg: GpuConfig = read_struct(&cfg).unwrap();
    assert_eq!(cfg.num_capsets, 0);

    let mem = share_memory(&mut fe);
    let mut drv = Driver::new(mem.clone());
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(0).unwrap();
    configure_vring(&mut fe, &mem, &kick, &call);

    // The startup race: a request posted and kicked before the ring is
    // enabled must be served once it is.
    let info = drv.post(
        &[CtrlHdr {
            type_: CMD_GET_DISPLAY_INFO,
            ..CtrlHdr::default()
        }
        .as_slice()],
        408,
    );
    kick.write(1).unwrap();
    thread::sleep(Duration::from_millis(50));
    assert_eq!(drv.used_idx(), 0, "served before the ring was enabled");
    fe.set_vring_enable(0, true).unwrap();
    drv.wait_used(1);
    assert_eq!(drv.used(0), (0, 408));
    let di: RespDisplayInfo = mem.read_obj(GuestAddress(info)).unwrap();
    assert_eq!(di.hdr.type_, RESP_OK_DISPLAY_INFO);
    assert_eq!((di.pmodes[0].r.width, di.pmodes[0].enabled), (1024, 1));
    assert!(call.read().unwrap() >= 1, "guest was notified");

    // A context, then a fenced SUBMIT_3D with header, payload and response
    // in separate descriptors, as Linux sends it.
    let ctx = CtrlHdr {
        type_: CMD_CTX_CREATE,
        ctx_id: 1,
        ..CtrlHdr::default()
    };
    let r = drv.post(&[ctx.as_slice(), CtxCreate::default().as_slice()], 24);
    kick.write(1).unwrap();
    drv.wait_used(2);
    assert_eq!(drv.resp_hdr(r).type_, RESP_OK_NODATA);

    let work = Duration::from_millis(30);
    let payload = fencelab_stream::encode(&[fencelab_stream::Op::Work {
        ns: work.as_nanos() as u64,
    }]);
    let fenced = CtrlHdr {
        type_: CMD_SUBMIT_3D,
        flags: VIRTIO_GPU_FLAG_FENCE,
        fence_id: 41,
        ctx_id: 1,
        ..CtrlHdr::default()
    };
    let start = Instant::now();
    let r = drv.post(&[&submit(fenced, &payload), &payload], 24);
    kick.write(1).unwrap();
    let done = drv.wait_used(3);
    assert!(
        done.duration_since(start) >= latency + work,
        "fence completed after {:?}, before latency + WORK",
        done.duration_since(start)
    );
    let h = drv.resp_hdr(r);
    assert_eq!(h.type_, RESP_OK_NODATA);
    assert_eq!(
        (h.flags, h.fence_id, h.ctx_id),
        (VIRTIO_GPU_FLAG_FENCE, 41, 1)
    );

    // Malformed: a SUBMIT_3D whose size lies, and a chain with nowhere to
    // put the response. Both come back; the first with an error.
    let mut lying = submit(fenced, b"abc");
    lying[24..28].copy_from_slice(&1000u32.to_le_bytes());
    let r = drv.post(&[&lying, b"abc"], 24);
    let no_resp = CtrlHdr {
        type_: CMD_GET_DISPLAY_INFO,
        ..CtrlHdr::default()
    };
    drv.post(&[no_resp.as_slice()], 0);
    kick.write(1).unwrap();
    drv.wait_used(5);
    assert_eq!(drv.resp_hdr(r).type_, RESP_ERR_INVALID_PARAMETER);
    assert_eq!(
        drv.resp_hdr(r).fence_id,
        41,
        "error still carries the fence"
    );
    let lens: Vec<u32> = (3..5).map(|i| drv.used(i).1).collect();
    assert!(lens.contains(&24) && lens.contains(&0), "{lens:?}");

    drop(fe);
    server.join().unwrap().unwrap();
    let (submitted, completed) = stats.fences();
    // The lying SUBMIT_3D was fenced too: its error completes the fence.
    assert_eq!((submitted, completed), (2, 2));
    assert_eq!(stats.count("SUBMIT_3D"), 1);
    assert_eq!(stats.count("MALFORMED"), 1);
    assert_eq!(stats.count("GET_DISPLAY_INFO"), 2);
    assert_eq!(stats.errors(), 1);
    assert!(
        !path.exists(),
        "socket removed when the listener is dropped"
    );
}

#[test]
fn stale_socket_is_replaced_and_live_one_refused() {
    let path = socket_path("stale");
    // A stale socket: bound, then its owner went away.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let listener = backend::bind(&path).unwrap();
    let err = backend::bind(&path).err().expect("bind refused");
    assert!(
        format!("{err:#}").contains("another process is listening"),
        "{err:#}"
    );
    drop(listener);
    let _ = std::fs::remove_file(&path);

    std::fs::write(&path, b"not a socket").unwrap();
    let err = backend::bind(&path).err().expect("bind refused");
    assert!(format!("{err:#}").contains("not a socket"), "{err:#}");
    std::fs::remove_file(&path).unwrap();
}
