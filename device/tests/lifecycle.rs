//! Frontends coming and going (`fencelab-device --reconnect`): a second
//! frontend is served after the first one left with fences pending, and
//! starts clean; 100 connect/disconnect cycles of the real binary leak no
//! fd, thread or memory.

mod common;

use std::io::Read as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use fencelab_device::backend::{self, DeviceConfig, FencelabGpu};
use fencelab_device::protocol::*;
use fencelab_device::stats::Stats;
use fencelab_stream::Op;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// One frontend connection with its control queue enabled, as QEMU sets it
/// up at DRIVER_OK.
struct Session {
    fe: Frontend,
    drv: Driver,
    kick: EventFd,
    _call: EventFd,
}

impl Session {
    fn open(path: &Path) -> Session {
        let (mut fe, _) = connect(path, false);
        let mem = share_memory(&mut fe);
        let kick = EventFd::new(0).unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        configure_vring(&mut fe, &mem, &kick, &call);
        fe.set_vring_enable(0, true).unwrap();
        Session {
            fe,
            drv: Driver::new(mem),
            kick,
            _call: call,
        }
    }

    /// Creates context `ctx`; returns the response type.
    fn ctx_create(&mut self, ctx: u32) -> u32 {
        let h = CtrlHdr {
            type_: CMD_CTX_CREATE,
            ctx_id: ctx,
            ..CtrlHdr::default()
        };
        let used = self.drv.used_idx();
        let r = self
            .drv
            .post(&[h.as_slice(), CtxCreate::default().as_slice()], 24);
        self.kick.write(1).unwrap();
        self.drv.wait_used(used + 1);
        self.drv.resp_hdr(r).type_
    }

    /// Posts and kicks a fenced `SUBMIT_3D` on context `ctx`.
    fn submit_fenced(&mut self, ctx: u32, fence: u64) {
        let hdr = CtrlHdr {
            type_: CMD_SUBMIT_3D,
            flags: VIRTIO_GPU_FLAG_FENCE,
            fence_id: fence,
            ctx_id: ctx,
            ..CtrlHdr::default()
        };
        let payload = fencelab_stream::encode(&[Op::Work { ns: 0 }]);
        self.drv.post(&[&submit(hdr, &payload), &payload], 24);
        self.kick.write(1).unwrap();
    }
}

fn wait_until(what: &str, timeout: Duration, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

/// Fences 1–4 take a minute; any other completes at once.
fn slow_first_four() -> Script {
    Script::table(
        (1..=4)
            .map(|f| (f, latency(Duration::from_secs(60))))
            .collect(),
        latency(Duration::ZERO),
    )
}

#[test]
fn a_second_frontend_starts_clean_after_the_first_left_fences_pending() {
    let path = socket_path("lifecycle-reconnect");
    let stats = Arc::new(Stats::new());
    let gpu = Arc::new(
        FencelabGpu::new(DeviceConfig {
            decider: Box::new(slow_first_four()),
            tracer: Arc::new(MemoryTrace::default()),
            stats: stats.clone(),
        })
        .unwrap(),
    );
    let ended = Arc::new(AtomicU64::new(0));
    let mut listener = backend::bind(&path).unwrap();
    {
        let (gpu, ended) = (gpu.clone(), ended.clone());
        thread::spawn(move || backend::serve_reconnecting(&mut listener, gpu, &ended));
    }

    let mut first = Session::open(&path);
    assert_eq!(first.ctx_create(1), RESP_OK_NODATA);
    for fence in 1..=4 {
        first.submit_fenced(1, fence);
    }
    wait_until("4 pending fences", Duration::from_secs(10), || {
        gpu.pending_fences() == 4
    });
    assert_eq!(first.drv.used_idx(), 1, "only the context creation is back");
    drop(first);

    wait_until(
        "the first connection to end",
        Duration::from_secs(10),
        || ended.load(Ordering::Relaxed) == 1,
    );
    assert_eq!(gpu.pending_fences(), 0, "the departed frontend's fences");
    let summary = gpu.summary();
    assert_eq!(summary["accounting"]["flushed"], 4, "{summary}");

    let mut second = Session::open(&path);
    // Context 1 died with the first frontend: creating it again works.
    assert_eq!(second.ctx_create(1), RESP_OK_NODATA);
    second.submit_fenced(1, 10);
    second.drv.wait_used(2);
    let (id, _) = second.drv.used(1);
    assert_ne!(id, 0, "the new fence's descriptor, not a stale head");
    // Nothing of the first frontend lands in this ring later either.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(second.drv.used_idx(), 2);
    assert_eq!(gpu.pending_fences(), 0);
    drop(second);
    wait_until(
        "the second connection to end",
        Duration::from_secs(10),
        || ended.load(Ordering::Relaxed) == 2,
    );
    assert_eq!(stats.summary()["fences_completed"], 5);
    // A third frontend is still accepted.
    let mut third = Session::open(&path);
    assert_eq!(third.ctx_create(1), RESP_OK_NODATA);
    third.fe.set_vring_enable(0, false).unwrap();
}

/// What leaks show in: open fds, threads, resident memory (KiB).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Usage {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

fn usage(pid: u32) -> Usage {
    let count = |dir: &str| {
        std::fs::read_dir(format!("/proc/{pid}/{dir}"))
            .unwrap()
            .count()
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    Usage {
        fds: count("fd"),
        threads: count("task"),
        rss_kib,
    }
}

/// The usage once fds and threads stop changing (the backend ends a
/// connection on its own threads, shortly after the frontend hangs up).
fn settled_usage(pid: u32) -> Usage {
    let mut last = usage(pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        thread::sleep(Duration::from_millis(100));
        let now = usage(pid);
        if (now.fds, now.threads) == (last.fds, last.threads) || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// One frontend's life: connect, negotiate, map memory, create a context,
/// complete a fence, hang up.
fn one_connection(path: &Path) {
    let mut s = Session::open(path);
    assert_eq!(s.ctx_create(1), RESP_OK_NODATA);
    s.submit_fenced(1, 1);
    s.drv.wait_used(2);
}

/// RSS may grow this much over 100 connections (allocator caches and the
/// trace of 100 fences, not per-connection state); fds and threads may not
/// grow at all.
const RSS_TOLERANCE_KIB: u64 = 2048;
const CYCLES: usize = 100;

struct Device {
    child: Child,
    _scratch: process::Scratch,
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_hundred_reconnects_leak_no_fd_thread_or_memory() {
    let scratch = process::Scratch::new("lifecycle-leak");
    let socket = scratch.path("gpu.sock");
    let child = Command::new(process::BINARY)
        .arg("--socket")
        .arg(&socket)
        .args(["--latency", "0", "--reconnect", "--log-file"])
        .arg(scratch.path("device.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut device = Device {
        child,
        _scratch: scratch,
    };
    let pid = device.child.id();
    wait_until("the device's socket", Duration::from_secs(10), || {
        socket.exists()
    });
    // Warm up: first-use allocations are not leaks.
    for _ in 0..5 {
        one_connection(&socket);
    }
    let before = settled_usage(pid);
    for _ in 0..CYCLES {
        one_connection(&socket);
    }
    let after = settled_usage(pid);
    println!(
        "fencelab-device over {CYCLES} reconnects: fds {} -> {}, threads {} -> {}, RSS {} -> {} KiB",
        before.fds, after.fds, before.threads, after.threads, before.rss_kib, after.rss_kib
    );
    assert_eq!(after.fds, before.fds, "fd leak: {before:?} -> {after:?}");
    assert_eq!(
        after.threads, before.threads,
        "thread leak: {before:?} -> {after:?}"
    );
    assert!(
        after.rss_kib <= before.rss_kib + RSS_TOLERANCE_KIB,
        "RSS grew more than {RSS_TOLERANCE_KIB} KiB: {before:?} -> {after:?}"
    );

    // SIGTERM prints the summary of the whole run, connections counted.
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let status = device.child.wait().unwrap();
    assert!(status.success(), "{status}");
    let mut stderr = String::new();
    device
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("fencelab-device: summary "))
        .unwrap_or_else(|| panic!("no summary in {stderr}"));
    let summary: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_summary_keys(&summary);
    assert_eq!(summary["connections"], (CYCLES + 5) as u64, "{summary}");
    assert_eq!(
        summary["fences_completed"],
        (CYCLES + 5) as u64,
        "{summary}"
    );
}

#[test]
fn without_reconnect_the_device_exits_after_its_frontend() {
    let scratch = process::Scratch::new("lifecycle-once");
    let socket = scratch.path("gpu.sock");
    let mut child = Command::new(process::BINARY)
        .arg("--socket")
        .arg(&socket)
        .args(["--latency", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the device's socket", Duration::from_secs(10), || {
        socket.exists()
    });
    one_connection(&socket);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the device did not exit after its frontend left");
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(stderr.contains("fencelab-device: summary "), "{stderr}");
    assert!(!stderr.contains("\"connections\""), "{stderr}");
}
