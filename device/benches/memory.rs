//! Backend cost (issue 7, item 3): pushes fences through the real backend
//! in-process and measures the process's resident memory and CPU time.
//!
//! The backend is the device's own (`backend::serve`, the fence engine, a
//! `PlanDecider` with the `--latency 0` plan, real `Stats`), driven over a
//! unix socket by the in-process vhost-user frontend of the device tests.
//! Every fence is a fenced `SUBMIT_3D` whose stream `WRITE`s its id into
//! guest memory; 64 are kept in flight, each chain re-posted as soon as it
//! comes back. The trace goes where the real device sends it: the
//! production `JsonLinesTrace`, to a file in a temporary directory
//! (`FENCELAB_BENCH_TRACE=none` for no trace).
//!
//! RSS (`VmRSS`) is read after the first 10 000 fences and after all of
//! them (`FENCELAB_BENCH_FENCES`, default 1 000 000). Progress goes to
//! stderr; the last stdout line is one JSON object:
//! `{"fences_small","fences_large","rss_kib_after_small","rss_kib_after_large",
//! "rss_growth_kib","cpu_ms_per_1000_fences","backend_cpu_ms_per_1000_fences",
//! "wall_s","fences_per_s","trace","in_flight","threads"}`.
//!
//! Run: `cargo bench -p fencelab-device --bench memory`.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "memory/pump.rs"]
mod pump;
#[path = "memory/usage.rs"]
mod usage;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use fencelab_device::backend::DeviceConfig;
use fencelab_device::decide::PlanDecider;
use fencelab_device::fault::{NoTrace, Tracer};
use fencelab_device::plan::Plan;
use fencelab_device::stats::Stats;
use fencelab_device::trace::JsonLinesTrace;
use serde_json::json;
use vhost::vhost_user::VhostUserFrontend;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use pump::Pump;

/// Fences after which the first RSS is read.
const SMALL: u64 = 10_000;
/// Default for the second reading (`FENCELAB_BENCH_FENCES`).
const LARGE: u64 = 1_000_000;
/// Fenced commands in flight, as a guest with a deep queue keeps.
const IN_FLIGHT: u16 = 64;
/// Progress is printed this often.
const PROGRESS_EVERY: u64 = 100_000;

/// Where the backend's trace goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TraceMode {
    File,
    None,
}

impl TraceMode {
    fn from_env() -> Result<Self> {
        match std::env::var("FENCELAB_BENCH_TRACE").as_deref() {
            Err(_) | Ok("file") => Ok(TraceMode::File),
            Ok("none") => Ok(TraceMode::None),
            Ok(other) => bail!("FENCELAB_BENCH_TRACE={other:?}: expected \"file\" or \"none\""),
        }
    }

    fn name(self) -> &'static str {
        match self {
            TraceMode::File => "file",
            TraceMode::None => "none",
        }
    }
}

fn fences_from_env() -> Result<u64> {
    let Ok(v) = std::env::var("FENCELAB_BENCH_FENCES") else {
        return Ok(LARGE);
    };
    let n: u64 = v
        .trim()
        .replace('_', "")
        .parse()
        .with_context(|| format!("FENCELAB_BENCH_FENCES={v:?} is not a number"))?;
    ensure!(
        n >= SMALL,
        "FENCELAB_BENCH_FENCES={n}: must be at least {SMALL} (RSS is read after {SMALL} first)"
    );
    Ok(n)
}

/// A scratch directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("fencelab-bench-memory-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(TempDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ms_per_1000(cpu: Duration, fences: u64) -> f64 {
    cpu.as_secs_f64() * 1000.0 * 1000.0 / fences as f64
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memory bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let large = fences_from_env()?;
    let trace = TraceMode::from_env()?;
    let dir = TempDir::new()?;
    let trace_path = dir.path().join("trace.jsonl");
    let tracer: Arc<dyn Tracer> = match trace {
        TraceMode::File => Arc::new(
            JsonLinesTrace::create(&trace_path)
                .with_context(|| format!("cannot create {}", trace_path.display()))?,
        ),
        TraceMode::None => Arc::new(NoTrace),
    };
    let stats = Arc::new(Stats::new());
    let socket = dir.path().join("gpu.sock");
    let (_gpu, server) = common::spawn_backend(
        &socket,
        DeviceConfig {
            decider: Box::new(PlanDecider::new(Plan::fixed_latency(Duration::ZERO), 1)),
            tracer: tracer.clone(),
            stats: stats.clone(),
        },
    );
    let (mut fe, _) = common::connect(&socket, false);
    let mem = common::share_memory(&mut fe);
    let kick = EventFd::new(0).context("kick eventfd")?;
    let call = EventFd::new(EFD_NONBLOCK).context("call eventfd")?;
    common::configure_vring(&mut fe, &mem, &kick, &call);
    fe.set_vring_enable(0, true)
        .context("enable the control queue")?;
    eprintln!(
        "memory bench: {large} fences, {IN_FLIGHT} in flight, zero latency, trace: {}",
        trace.name()
    );

    let rss_start = usage::rss_kib()?;
    let threads_before = usage::threads_cpu()?;
    let cpu_before = usage::process_cpu()?;
    let started = Instant::now();
    let mut pump = Pump::start(common::Driver::new(mem), kick, call, IN_FLIGHT, large)?;

    pump.run_to(SMALL)?;
    let rss_small = usage::rss_kib()?;
    eprintln!(
        "memory bench: {} fences back, RSS {rss_small} KiB (before: {rss_start} KiB)",
        pump.completed()
    );
    while pump.completed() < large {
        let next = (pump.completed() / PROGRESS_EVERY + 1) * PROGRESS_EVERY;
        pump.run_to(next)?;
        eprintln!(
            "memory bench: {} fences back in {:.1} s, RSS {} KiB",
            pump.completed(),
            started.elapsed().as_secs_f64(),
            usage::rss_kib()?
        );
    }
    let wall = started.elapsed();
    let cpu = usage::process_cpu()?.saturating_sub(cpu_before);
    let threads = usage::threads_delta(&threads_before, &usage::threads_cpu()?);
    let rss_large = usage::rss_kib()?;

    pump.check_done()?;
    let a = stats.accounting();
    ensure!(
        a.submitted == large && a.completed == large && a.errored == 0,
        "the backend counted {} fences submitted, {} completed ({} with errors), expected {large}",
        a.submitted,
        a.completed,
        a.errored
    );
    tracer.flush().context("flush the trace")?;
    if trace == TraceMode::File {
        let bytes = std::fs::metadata(&trace_path).map_or(0, |m| m.len());
        eprintln!("memory bench: trace file {} MiB", bytes >> 20);
    }
    drop(fe);
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the backend thread panicked"))?
        .context("the backend")?;

    // The main thread is the frontend (the bench's own guest side); every
    // other thread is the backend's (vhost-user daemon, vring worker,
    // fence engine).
    let main_tid = std::process::id();
    let backend_cpu: Duration = threads
        .iter()
        .filter(|(tid, _)| *tid != main_tid)
        .map(|(_, t)| t.cpu)
        .sum();
    for (tid, t) in &threads {
        let role = if *tid == main_tid {
            "frontend"
        } else {
            "backend"
        };
        eprintln!(
            "memory bench: thread {tid} {:?} ({role}): {:.0} ms CPU",
            t.name,
            t.cpu.as_secs_f64() * 1000.0
        );
    }
    let thread_names: Vec<&str> = threads.iter().map(|(_, t)| t.name.as_str()).collect();
    let wall_s = wall.as_secs_f64();
    let out = json!({
        "fences_small": SMALL,
        "fences_large": large,
        "rss_kib_after_small": rss_small,
        "rss_kib_after_large": rss_large,
        "rss_growth_kib": rss_large as i64 - rss_small as i64,
        // getrusage(RUSAGE_SELF): the whole process, so this includes the
        // bench's own frontend thread (posting and reaping descriptors).
        "cpu_ms_per_1000_fences": ms_per_1000(cpu, large),
        // The backend's threads alone (/proc/self/task/<tid>/stat, clock
        // tick resolution).
        "backend_cpu_ms_per_1000_fences": ms_per_1000(backend_cpu, large),
        "wall_s": wall_s,
        "fences_per_s": large as f64 / wall_s,
        "trace": trace.name(),
        "in_flight": IN_FLIGHT,
        "threads": thread_names,
    });
    println!("{out}");
    Ok(())
}
