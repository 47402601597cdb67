//! `fencelab-device --socket PATH [--latency DUR | --plan FILE] [--seed N]
//! [--replay TRACE] [--trace FILE] [--control-socket PATH] [--log-file PATH]
//! [--reconnect]`
//! `fencelab-device ctl --socket CTL <command>`
//!
//! Serves one vhost-user frontend connection, then prints a summary and
//! exits. SIGTERM/SIGINT print the summary too. While it runs, the control
//! socket (`device/CONTROL.md`) drives it; `ctl` is that socket's client.
//!
//! With `--reconnect` it serves frontends one after another on the same
//! socket until SIGTERM/SIGINT, which print the summary of the whole run
//! with `"connections"`, the number of frontend connections that ended.
//! Each disconnect ends what the frontend left behind
//! (`backend::serve_reconnecting`): its pending fences complete into its
//! own ring, hung ones are abandoned, and the next frontend starts clean.
//!
//! Exit status: 0 after a run; 1 when the device cannot start or its
//! frontend connection fails; 2 for bad arguments, an invalid plan or an
//! unreadable replay trace (nothing is started then).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use fencelab_device::backend::{self, DeviceConfig, FencelabGpu};
use fencelab_device::control::ctl::{self, CtlArgs};
use fencelab_device::control::{ControlServer, default_socket_path};
use fencelab_device::decide::{PlanDecider, choose_seed};
use fencelab_device::fault::{Decide, DeviceControl, NoTrace, TraceEvent, Tracer};
use fencelab_device::plan::Plan;
use fencelab_device::stats::Stats;
use fencelab_device::trace::{self, JsonLinesTrace, ReplayDecider};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// vhost-user virtio-gpu backend with a scheduled fence engine.
#[derive(Debug, Parser)]
#[command(
    name = "fencelab-device",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(flatten)]
    device: Args,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Talk to a running device over its control socket.
    Ctl(CtlArgs),
}

#[derive(Debug, clap::Args)]
struct Args {
    /// Unix socket to listen on for the vhost-user frontend (QEMU).
    #[arg(long, required = true)]
    socket: Option<PathBuf>,
    /// Every fence completes this long after it arrives, no faults, e.g.
    /// `100us`, `2ms` (the plan `[default] latency = DUR`). Not with --plan.
    #[arg(long, value_parser = parse_duration)]
    latency: Option<Duration>,
    /// The fault plan (TOML; see device/plans/README.md).
    #[arg(long, value_name = "FILE")]
    plan: Option<PathBuf>,
    /// Seed of every random decision (default: the plan's `seed`, else
    /// random; the seed used is printed at start). With --replay the run
    /// keeps the trace's seed and this seeds only fences beyond the trace.
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Repeat the decisions recorded in this trace; fences it has no
    /// decision for follow the plan.
    #[arg(long, value_name = "TRACE")]
    replay: Option<PathBuf>,
    /// Write every decision and completion to this file (JSON lines).
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// The control socket [default: <socket>.ctl].
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Write logs to this file instead of stderr.
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// After the frontend disconnects, wait for the next one on the same
    /// socket instead of exiting (the summary is printed at SIGTERM/SIGINT).
    /// The departed frontend's fences do not carry over.
    #[arg(long)]
    reconnect: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 0s, 100us, 2ms)"))
}

/// Why the device did not run.
#[derive(Debug)]
enum Failure {
    /// Bad arguments, plan or replay trace: exit 2, nothing started.
    Setup(anyhow::Error),
    /// Anything later: exit 1.
    Run(anyhow::Error),
}

fn setup<T>(result: anyhow::Result<T>) -> Result<T, Failure> {
    result.map_err(Failure::Setup)
}

fn run<T>(result: anyhow::Result<T>) -> Result<T, Failure> {
    result.map_err(Failure::Run)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let failure = match cli.command {
        Some(Command::Ctl(args)) => return ctl::run(args),
        None => match run_device(cli.device) {
            Ok(()) => return ExitCode::SUCCESS,
            Err(failure) => failure,
        },
    };
    let (code, error) = match failure {
        Failure::Setup(e) => (2, e),
        Failure::Run(e) => (1, e),
    };
    if LOGS_TO_FILE.load(Ordering::Relaxed) {
        tracing::error!("{error:#}");
    }
    // Not eprintln!: it panics when stderr is gone.
    let _ = writeln!(std::io::stderr(), "fencelab-device: error: {error:#}");
    ExitCode::from(code)
}

/// Set once logs go to --log-file (not stderr): errors are then logged
/// there as well as printed.
static LOGS_TO_FILE: AtomicBool = AtomicBool::new(false);

fn init_logging(log_file: Option<&Path>) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open log file {}", path.display()))?;
            LOGS_TO_FILE.store(true, Ordering::Relaxed);
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .try_init()
        }
        None => {
            use std::io::IsTerminal;
            builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .try_init()
        }
    }
    .map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}

/// What the run decides with, resolved from the arguments before anything
/// starts.
struct Setup {
    plan: Plan,
    /// The run's seed: what is printed, traced in `Start`, and shown by
    /// `stats` and the summary (`Decide::seed`).
    seed: u64,
    /// Under `--replay`: the trace replayed and the seed of the plan that
    /// decides fences the trace has no decision for.
    replay: Option<(PathBuf, u64)>,
    decider: Box<dyn Decide>,
}

/// Loads the plan (and the replay trace) and chooses the seeds.
///
/// Without `--replay` the run's seed is `--seed`, else the `--plan`'s, else
/// random. A replay's seed is the one its trace recorded; `--seed` (else
/// the `--plan`'s seed, else the trace's) seeds only the fallback plan that
/// decides fences beyond the trace.
fn resolve(args: &Args) -> anyhow::Result<Setup> {
    let replay = match &args.replay {
        Some(path) => Some(
            // The error names the file; its Display already includes the cause.
            trace::read_trace(path).map_err(|e| anyhow::anyhow!("cannot replay: {e}"))?,
        ),
        None => None,
    };
    let recorded = replay.as_deref().and_then(start_of);
    let plan = match (&args.plan, args.latency) {
        (Some(_), Some(_)) => anyhow::bail!(
            "--latency and --plan cannot be combined: the plan sets every latency \
             (put `latency = \"2ms\"` in its [default] table instead)"
        ),
        (Some(path), None) => Plan::load(path).map_err(|e| anyhow::anyhow!("{e}"))?,
        (None, Some(latency)) => Plan::fixed_latency(latency),
        (None, None) => match recorded {
            Some((_, origin, sha256)) => plan_of_recording(origin, sha256),
            None => Plan::fixed_latency(Duration::ZERO),
        },
    };
    // A plan recovered from the trace does not outrank the trace's seed: the
    // recorded run may have been started with --seed.
    let plan_seed = args.plan.as_ref().and(plan.seed());
    let recorded_seed = recorded.map(|(seed, _, _)| seed);
    let fallback_seed = choose_seed(args.seed.or(plan_seed).or(recorded_seed), &plan);
    let fallback = PlanDecider::new(plan.clone(), fallback_seed);
    let (decider, replay): (Box<dyn Decide>, _) = match (replay, &args.replay) {
        (Some(events), Some(path)) => (
            Box::new(
                ReplayDecider::new(events, &path.display().to_string(), fallback)
                    .map_err(|e| anyhow::anyhow!("cannot replay: {e}"))?,
            ),
            Some((path.clone(), fallback_seed)),
        ),
        _ => (Box::new(fallback), None),
    };
    Ok(Setup {
        plan,
        seed: decider.seed(),
        replay,
        decider,
    })
}

/// The seed, plan origin and plan hash a trace's `Start` event recorded.
fn start_of(events: &[TraceEvent]) -> Option<(u64, &str, &str)> {
    events.iter().find_map(|event| match event {
        TraceEvent::Start {
            seed,
            plan,
            plan_sha256,
            ..
        } => Some((*seed, plan.as_str(), plan_sha256.as_str())),
        _ => None,
    })
}

/// The plan a replay falls back on without --plan or --latency: the one the
/// trace was recorded with, when it can be found again unchanged.
fn plan_of_recording(origin: &str, sha256: &str) -> Plan {
    if let Some(latency) = origin.strip_prefix("--latency ") {
        if let Ok(latency) = parse_duration(latency) {
            return Plan::fixed_latency(latency);
        }
    }
    match Plan::load(origin) {
        Ok(plan) if plan.sha256_hex() == sha256 => {
            info!("replay falls back on the recorded plan {origin}");
            return plan;
        }
        Ok(_) => warn!("the recorded plan {origin} has changed since the trace was written"),
        Err(e) => warn!("the recorded plan is not available: {e}"),
    }
    warn!("fences the trace has no decision for complete at once (give --plan to choose)");
    Plan::fixed_latency(Duration::ZERO)
}

/// `fencelab-device: seed N` (the line launchers read), and under a replay
/// which trace and the seed of fences beyond it.
fn print_seed(seed: u64, replay: Option<&(PathBuf, u64)>) {
    // Not eprintln!: it panics when stderr is gone.
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "fencelab-device: seed {seed}");
    if let Some((trace, fallback)) = replay {
        let _ = writeln!(
            stderr,
            "fencelab-device: replaying {} (seed {seed}); fallback seed {fallback}",
            trace.display()
        );
    }
}

fn open_tracer(path: Option<&Path>) -> anyhow::Result<Arc<dyn Tracer>> {
    Ok(match path {
        Some(path) => Arc::new(
            JsonLinesTrace::create(path)
                .with_context(|| format!("cannot create trace file {}", path.display()))?,
        ),
        None => Arc::new(NoTrace),
    })
}

static SUMMARY: Once = Once::new();

/// Frontend connections that ended, under `--reconnect` (`None` without:
/// the summary then has no `connections` key).
type Connections = Option<Arc<AtomicU64>>;

/// Logs and prints the summary and flushes the trace, once, whoever gets
/// here first (the main thread or the signal thread).
fn finish(backend: &FencelabGpu, connections: &Connections) {
    SUMMARY.call_once(|| {
        let mut summary = backend.summary();
        if let Some(ended) = connections {
            summary["connections"] = ended.load(Ordering::Relaxed).into();
        }
        info!(%summary, "summary");
        // Not eprintln!: it panics when stderr is gone, and this must not.
        let _ = writeln!(std::io::stderr(), "fencelab-device: summary {summary}");
        if let Err(e) = DeviceControl::flush_trace(backend) {
            warn!("{e}");
        }
    });
}

/// Blocks SIGINT/SIGTERM in every thread (call before spawning any) and
/// returns the set for `sigwait`.
fn block_signals() -> anyhow::Result<libc::sigset_t> {
    // SAFETY: the sigset is initialised by sigemptyset before use and only
    // passed to the libc functions that expect it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            anyhow::bail!(
                "cannot block signals: {}",
                std::io::Error::from_raw_os_error(rc)
            );
        }
        Ok(set)
    }
}

/// On SIGINT/SIGTERM: summary, trace flushed, sockets removed, exit 0.
fn spawn_signal_thread(
    signals: libc::sigset_t,
    backend: Arc<FencelabGpu>,
    connections: Connections,
    control: Arc<ControlServer>,
    socket: PathBuf,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: `signals` is a valid set and `sig` a valid out-pointer.
            let rc = unsafe { libc::sigwait(&signals, &mut sig) };
            if rc == 0 {
                info!(signal = sig, "terminating on signal");
            }
            finish(&backend, &connections);
            control.remove_socket();
            let _ = std::fs::remove_file(&socket);
            std::process::exit(0);
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

fn run_device(args: Args) -> Result<(), Failure> {
    let socket = setup(
        args.socket
            .clone()
            .context("--socket is required to run the device"),
    )?;
    let control_path = args
        .control_socket
        .clone()
        .unwrap_or_else(|| default_socket_path(&socket));
    if std::path::absolute(&control_path).ok() == std::path::absolute(&socket).ok() {
        return Err(Failure::Setup(anyhow::anyhow!(
            "--control-socket must differ from --socket ({})",
            socket.display()
        )));
    }
    let signals = run(block_signals())?;
    run(init_logging(args.log_file.as_deref()))?;
    let Setup {
        plan,
        seed,
        replay,
        decider,
    } = setup(resolve(&args))?;

    let replayed = replay.as_ref().map(|(path, _)| path.display().to_string());
    let tracer = run(open_tracer(args.trace.as_deref()))?;
    tracer.record(trace::start_event(seed, &plan, replayed.as_deref()));
    print_seed(seed, replay.as_ref());
    info!(
        seed,
        plan = plan.origin(),
        plan_sha256 = plan.sha256_hex(),
        replay = replayed,
        fallback_seed = replay.as_ref().map(|(_, fallback)| *fallback),
        "starting"
    );

    let stats = Arc::new(Stats::new());
    let backend = Arc::new(run(FencelabGpu::new(DeviceConfig {
        decider,
        tracer,
        stats,
    })
    .context("cannot start the fence engine"))?);

    // The control socket first: once the vhost-user socket exists (what a
    // launcher waits for), the control socket is ready too.
    let control = Arc::new(run(ControlServer::start(&control_path, backend.clone()))?);
    let mut listener = run(backend::bind(&socket))?;
    info!(socket = %socket.display(), control = %control_path.display(), "listening");
    let connections: Connections = args.reconnect.then(Arc::default);
    run(spawn_signal_thread(
        signals,
        backend.clone(),
        connections.clone(),
        control.clone(),
        socket,
    ))?;

    let res = match &connections {
        Some(ended) => backend::serve_reconnecting(&mut listener, backend.clone(), ended),
        None => backend::serve(&mut listener, backend.clone()),
    };
    match &res {
        Ok(()) => info!("frontend disconnected"),
        Err(e) => tracing::error!("{e:#}"),
    }
    finish(&backend, &connections);
    control.remove_socket();
    drop(listener);
    run(res)
}
