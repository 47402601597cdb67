//! `fencelab-device --socket PATH [--latency DUR] [--log-file PATH]`
//! `fencelab-device ctl --socket CTL <command>`
//!
//! Serves one vhost-user frontend connection, then prints a summary and
//! exits. SIGTERM/SIGINT print the summary too. `ctl` talks to a running
//! device over its control socket (see `device/CONTROL.md`).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use fencelab_device::backend::{self, FencelabGpu};
use fencelab_device::control::ctl::{self, CtlArgs};
use fencelab_device::stats::Stats;
use tracing::info;
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
    /// Base completion latency of every fence, e.g. `100us`, `2ms`.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    latency: Duration,
    /// Write logs to this file instead of stderr.
    #[arg(long)]
    log_file: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 0s, 100us, 2ms)"))
}

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

static SUMMARY: Once = Once::new();

/// Logs and prints the summary, once, whoever gets here first.
fn print_summary(stats: &Stats, pending: usize) {
    SUMMARY.call_once(|| {
        let mut summary = stats.summary();
        summary["fences_pending"] = pending.into();
        info!(%summary, "summary");
        // Not eprintln!: it panics when stderr is gone, and this must not.
        let _ = writeln!(std::io::stderr(), "fencelab-device: summary {summary}");
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

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Ctl(args)) => ctl::run(args),
        None => match run_device(cli.device) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "fencelab-device: error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}

fn run_device(args: Args) -> anyhow::Result<()> {
    let socket = args
        .socket
        .context("--socket is required to run the device")?;
    let signals = block_signals()?;
    init_logging(args.log_file.as_deref())?;

    let stats = Arc::new(Stats::new());
    let backend = Arc::new(
        FencelabGpu::new(backend::DeviceConfig {
            decider: Box::new(backend::FixedLatency::new(args.latency)),
            tracer: Arc::new(fencelab_device::fault::NoTrace),
            stats: stats.clone(),
        })
        .context("cannot start the fence engine")?,
    );
    let mut listener = backend::bind(&socket)?;
    info!(socket = %socket.display(), latency = ?args.latency, "listening");

    {
        let backend = backend.clone();
        let socket = socket.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut sig: libc::c_int = 0;
                // SAFETY: `signals` is a valid set and `sig` a valid out-pointer.
                let rc = unsafe { libc::sigwait(&signals, &mut sig) };
                if rc == 0 {
                    info!(signal = sig, "terminating on signal");
                }
                print_summary(backend.stats(), backend.pending_fences());
                let _ = std::fs::remove_file(&socket);
                std::process::exit(0);
            })
            .context("cannot start the signal thread")?;
    }

    let res = backend::serve(&mut listener, backend.clone());
    match &res {
        Ok(()) => info!("frontend disconnected"),
        Err(e) => tracing::error!("{e:#}"),
    }
    print_summary(backend.stats(), backend.pending_fences());
    drop(listener);
    res
}
