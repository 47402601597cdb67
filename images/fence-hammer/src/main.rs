//! fence-hammer: the fencelab guest workload.
//!
//! Runs inside the test guest against the upstream `virtio_gpu` DRM driver
//! or fencelab's `fencelab_drm` (`--driver`): submits fenced jobs carrying
//! fencelab command streams, waits on the out-fence sync_files and checks
//! fence invariants, in one of the workloads of [`workloads`] (smoke,
//! signal-storm, deadline-race, callback-vs-release, array-order) or
//! fencelab_drm's own unload-live and reset. Progress goes to stderr;
//! stdout gets exactly one line, `FENCELAB_RESULT {json}` (see
//! [`report::ResultLine`]), whatever happens.
//!
//! Exit status: 0 all invariants held, 1 a run finished but some did not,
//! 2 usage or setup error (no run).

mod drm;
mod errno;
mod fencelab;
mod fencelab_cutoff;
mod fencelab_debugfs;
mod fencelab_reset;
mod fencelab_uapi;
mod fencelab_unload;
mod lanes;
mod order;
mod readback;
mod report;
mod sync_file;
mod uapi;
mod workloads;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use clap::error::ErrorKind;

use crate::drm::{RenderNode, WriteBuffer};
use crate::fencelab::FencelabNode;
use crate::fencelab_cutoff::RoundsConfig;
use crate::lanes::{FencelabLanes, Lanes, VirtioLanes};
use crate::readback::{SlotMap, SlotMemory};
use crate::report::{Outcome, ResultLine, result_line, setup_error_line, to_line};
use crate::workloads::{Context, FenceSource, Params};

const EXIT_NOT_OK: u8 = 1;
const EXIT_SETUP: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "fence-hammer",
    version,
    about = "fencelab guest workload: hammer virtio_gpu fences and check invariants"
)]
struct Cli {
    /// DRM render node [default: the first /dev/dri/renderD* driven by the --driver]
    #[arg(long, value_name = "PATH")]
    device: Option<PathBuf>,

    /// Workload to run (an unknown name lists the known ones)
    #[arg(long, value_name = "NAME", default_value = "smoke")]
    workload: String,

    /// Fences to submit
    #[arg(long, value_name = "N", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    fences: u64,

    /// Most out-fences outstanding at once
    #[arg(long, value_name = "K", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=512))]
    inflight: u64,

    /// Simulated GPU time per submission (fencelab WORK op), in ns
    #[arg(long, value_name = "NS", default_value_t = 0)]
    work_ns: u64,

    /// How long one fence may stay unsignaled, in ms
    #[arg(long, value_name = "MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,

    /// Do not give fences a WRITE to read back (no premature-signal check)
    #[arg(long)]
    no_write: bool,

    /// DRM driver to drive (fencelab: fencelab_drm, which has no buffers, so no WRITE read-back)
    #[arg(long, value_enum, default_value_t = Driver::VirtioGpu)]
    driver: Driver,

    /// Timelines the fences are spread over, in turn (--driver fencelab) [default: 1; unload-live, reset: 4]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    timelines: Option<u32>,

    /// Rounds of unload-live (module unloads) and reset (unbind + bind); the fences are shared among them
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,

    /// Submitting threads of signal-storm, each on a timeline of its own
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: u64,

    /// Fences merged into one sync_file by array-order, each from another timeline
    #[arg(long, value_name = "K", default_value_t = 4, value_parser = clap::value_parser!(u64).range(2..=64))]
    merge_width: u64,

    /// poll() waiter threads of callback-vs-release, each on merged sync_files of its own
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=64))]
    waiters: u64,

    /// Also report round trips by phase: fences split by number into N equal, contiguous phases
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    rtt_phases: u64,
}

impl Cli {
    fn params(&self) -> Params {
        Params {
            fences: self.fences,
            inflight: self.inflight as usize,
            work_ns: self.work_ns,
            timeout: Duration::from_millis(self.timeout_ms),
            threads: self.threads as usize,
            merge_width: self.merge_width as usize,
            waiters: self.waiters as usize,
            rtt_phases: self.rtt_phases as usize,
        }
    }
}

/// The DRM drivers fence-hammer speaks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Driver {
    /// The upstream virtio_gpu driver.
    #[value(name = "virtio_gpu")]
    VirtioGpu,
    /// fencelab_drm, fencelab's Rust driver.
    Fencelab,
}

/// The opened driver.
enum Opened {
    VirtioGpu(RenderNode),
    Fencelab(FencelabNode),
}

impl Opened {
    fn open(cli: &Cli) -> anyhow::Result<Self> {
        match cli.driver {
            Driver::VirtioGpu => Ok(Opened::VirtioGpu(match &cli.device {
                Some(path) => RenderNode::open(path)?.require_driver(drm::VIRTIO_GPU)?,
                None => RenderNode::find_virtio_gpu(Path::new("/dev/dri"))?,
            })),
            Driver::Fencelab => Ok(Opened::Fencelab(FencelabNode::open(
                cli.device.as_deref(),
                cli.timelines.unwrap_or(1),
            )?)),
        }
    }

    fn node(&self) -> &RenderNode {
        match self {
            Opened::VirtioGpu(node) => node,
            Opened::Fencelab(fl) => fl.node(),
        }
    }

    fn source(&mut self) -> &mut dyn FenceSource {
        match self {
            Opened::VirtioGpu(node) => node,
            Opened::Fencelab(fl) => fl,
        }
    }

    /// More timelines on the same node.
    fn lanes(&self) -> Box<dyn Lanes> {
        let node = self.node().path().to_path_buf();
        match self {
            Opened::VirtioGpu(_) => Box::new(VirtioLanes { node }),
            Opened::Fencelab(_) => Box::new(FencelabLanes { node }),
        }
    }
}

fn emit(line: &ResultLine) {
    println!("{}", to_line(line));
}

fn setup_error(
    workload: Option<&str>,
    device: Option<&Path>,
    driver: Option<&str>,
    err: String,
) -> ExitCode {
    eprintln!("fence-hammer: {err}");
    let device = device.map(|d| d.display().to_string());
    emit(&setup_error_line(workload, device.as_deref(), driver, err));
    ExitCode::from(EXIT_SETUP)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("").trim();
            let msg = format!("usage: {}", first.strip_prefix("error: ").unwrap_or(first));
            emit(&setup_error_line(None, None, None, msg));
            return ExitCode::from(EXIT_SETUP);
        }
    };

    match cli.workload.as_str() {
        fencelab_unload::NAME => return run_rounds(&cli, &UNLOAD_LIVE),
        fencelab_reset::NAME => return run_rounds(&cli, &RESET),
        _ => {}
    }

    let workload = match workloads::find(&cli.workload) {
        Ok(w) => w,
        Err(e) => {
            return setup_error(
                Some(&cli.workload),
                cli.device.as_deref(),
                None,
                format!("usage: {e:#}"),
            );
        }
    };

    let mut opened = match Opened::open(&cli) {
        Ok(opened) => opened,
        Err(e) => {
            return setup_error(
                Some(workload.name),
                cli.device.as_deref(),
                None,
                format!("{e:#}"),
            );
        }
    };
    let node = opened.node();

    let device = node.path().display().to_string();
    let driver = node.version().name.clone();
    let v = node.version();
    eprintln!(
        "fence-hammer: {device}: {} {}.{}.{} ({}); workload {}: {} fences, {} in flight, WORK {} ns, timeout {} ms",
        v.name,
        v.major,
        v.minor,
        v.patchlevel,
        v.desc,
        workload.name,
        cli.fences,
        cli.inflight,
        cli.work_ns,
        cli.timeout_ms
    );

    let buffer = if cli.no_write || cli.driver == Driver::Fencelab {
        None
    } else {
        match WriteBuffer::create(node, SlotMap::for_fences(cli.fences)) {
            Ok(b) => {
                eprintln!(
                    "fence-hammer: WRITE read-back: resource {} (GEM handle {}), {} slots",
                    b.res_handle(),
                    b.bo_handle(),
                    b.map().slots()
                );
                Some(b)
            }
            Err(e) => {
                return setup_error(
                    Some(workload.name),
                    Some(node.path()),
                    Some(&driver),
                    format!("write buffer (use --no-write to run without): {e:#}"),
                );
            }
        }
    };

    let lanes = opened.lanes();
    let mut ctx = Context {
        source: opened.source(),
        slots: buffer.as_ref().map(|b| b as &dyn SlotMemory),
        lanes: &*lanes,
        sync_files: &sync_file::Kernel,
        params: cli.params(),
        label: workload.name,
    };
    let outcome = match (workload.run)(&mut ctx) {
        Ok(outcome) => outcome,
        Err(e) => {
            return setup_error(
                Some(workload.name),
                Some(Path::new(&device)),
                Some(&driver),
                format!("{e:#}"),
            );
        }
    };

    finish(&result_line(workload.name, &device, &driver, &outcome))
}

/// Why `w` cannot run: another driver than fencelab_drm, or fewer fences
/// than its rounds need.
fn fencelab_rounds_usage(cli: &Cli, w: &RoundsWorkload) -> Option<String> {
    let (name, per_round) = (w.name, w.per_round);
    if cli.driver != Driver::Fencelab {
        return Some(format!(
            "usage: {name} is not supported by this driver (virtio_gpu): it {}; use --driver fencelab",
            w.does
        ));
    }
    let needed = cli.rounds.saturating_mul(per_round);
    (needed > cli.fences).then(|| {
        format!(
            "usage: --rounds {} needs at least {needed} --fences ({per_round} per round), not {}",
            cli.rounds, cli.fences
        )
    })
}

/// Prints the result line; the exit status follows its `ok`.
fn finish(line: &ResultLine) -> ExitCode {
    emit(line);
    if line.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_OK)
    }
}

/// A fencelab_drm workload that loads, unloads or unbinds the driver itself
/// (`unload-live`, `reset`): run by `main`, with no node opened beforehand
/// (an open DRM file keeps the module loaded).
struct RoundsWorkload {
    name: &'static str,
    summary: &'static str,
    /// What it does that only fencelab_drm supports.
    does: &'static str,
    /// Fewest fences a round needs.
    per_round: u64,
    /// Returns the outcome and the render node used.
    run: fn(&RoundsConfig) -> (Outcome, String),
}

const UNLOAD_LIVE: RoundsWorkload = RoundsWorkload {
    name: fencelab_unload::NAME,
    summary: fencelab_unload::SUMMARY,
    does: "unloads fencelab_drm",
    per_round: 1,
    run: fencelab_unload::run,
};

const RESET: RoundsWorkload = RoundsWorkload {
    name: fencelab_reset::NAME,
    summary: fencelab_reset::SUMMARY,
    does: "unbinds the device from fencelab_drm and needs every pending fence signaled -ENODEV",
    per_round: 2,
    run: fencelab_reset::run,
};

fn run_rounds(cli: &Cli, w: &RoundsWorkload) -> ExitCode {
    let name = w.name;
    if let Some(msg) = fencelab_rounds_usage(cli, w) {
        return setup_error(Some(name), cli.device.as_deref(), None, msg);
    }
    let cfg = RoundsConfig {
        device: cli.device.clone(),
        fences: cli.fences,
        rounds: cli.rounds,
        timelines: cli.timelines.unwrap_or(4),
        work_ns: cli.work_ns,
        timeout: Duration::from_millis(cli.timeout_ms),
    };
    eprintln!(
        "fence-hammer: {name} ({}): {} fences, {} rounds, {} timelines, WORK {} ns",
        w.summary, cfg.fences, cfg.rounds, cfg.timelines, cfg.work_ns
    );
    let (outcome, device) = (w.run)(&cfg);
    finish(&result_line(
        name,
        &device,
        fencelab_uapi::DRIVER_NAME,
        &outcome,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_ones() {
        let cli = Cli::try_parse_from(["fence-hammer"]).unwrap();
        assert_eq!(cli.device, None);
        assert_eq!(cli.workload, "smoke");
        assert_eq!(
            (cli.fences, cli.inflight, cli.work_ns, cli.timeout_ms),
            (2000, 8, 0, 10_000)
        );
        assert!(!cli.no_write, "WRITE read-back is on by default");
        assert!(
            Cli::try_parse_from(["fence-hammer", "--no-write"])
                .unwrap()
                .no_write
        );
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from([
            "fence-hammer",
            "--device",
            "/dev/dri/renderD129",
            "--workload",
            "smoke",
            "--fences",
            "10",
            "--inflight",
            "2",
            "--work-ns",
            "1000",
            "--timeout-ms",
            "50",
        ])
        .unwrap();
        assert_eq!(
            cli.device.as_deref(),
            Some(Path::new("/dev/dri/renderD129"))
        );
        assert_eq!(
            (cli.fences, cli.inflight, cli.work_ns, cli.timeout_ms),
            (10, 2, 1000, 50)
        );
    }

    #[test]
    fn driver_flags_parse() {
        let cli = Cli::try_parse_from(["fence-hammer"]).unwrap();
        assert_eq!(
            (cli.driver, cli.timelines, cli.rounds),
            (Driver::VirtioGpu, None, 50)
        );
        let cli = Cli::try_parse_from([
            "fence-hammer",
            "--driver",
            "fencelab",
            "--timelines",
            "4",
            "--rounds",
            "10",
        ])
        .unwrap();
        assert_eq!(
            (cli.driver, cli.timelines, cli.rounds),
            (Driver::Fencelab, Some(4), 10)
        );
        assert_eq!(
            Cli::try_parse_from(["fence-hammer", "--driver", "virtio_gpu"])
                .unwrap()
                .driver,
            Driver::VirtioGpu
        );
        assert!(Cli::try_parse_from(["fence-hammer", "--driver", "nouveau"]).is_err());
        assert!(Cli::try_parse_from(["fence-hammer", "--timelines", "0"]).is_err());
    }

    #[test]
    fn zero_inflight_and_zero_fences_are_refused() {
        assert!(Cli::try_parse_from(["fence-hammer", "--inflight", "0"]).is_err());
        assert!(Cli::try_parse_from(["fence-hammer", "--fences", "0"]).is_err());
        assert!(Cli::try_parse_from(["fence-hammer", "--bogus"]).is_err());
    }

    #[test]
    fn reset_and_unload_live_need_fencelab_and_enough_fences() {
        let cli = |args: &[&str]| Cli::try_parse_from([&["fence-hammer"], args].concat()).unwrap();
        let msg = fencelab_rounds_usage(&cli(&["--workload", "reset"]), &RESET)
            .expect("virtio_gpu refused");
        assert!(
            msg.starts_with("usage: reset is not supported by this driver (virtio_gpu)"),
            "{msg}"
        );
        let fl = cli(&["--driver", "fencelab", "--rounds", "10", "--fences", "19"]);
        let msg = fencelab_rounds_usage(&fl, &RESET).expect("too few fences");
        assert!(
            msg.contains("--rounds 10 needs at least 20 --fences"),
            "{msg}"
        );
        assert_eq!(fencelab_rounds_usage(&fl, &UNLOAD_LIVE), None);
        let fl = cli(&["--driver", "fencelab", "--rounds", "10", "--fences", "20"]);
        assert_eq!(fencelab_rounds_usage(&fl, &RESET), None);
    }

    #[test]
    fn workload_flags_parse() {
        let cli = Cli::try_parse_from(["fence-hammer"]).unwrap();
        assert_eq!((cli.threads, cli.merge_width, cli.waiters), (4, 4, 3));
        let p = cli.params();
        assert_eq!(
            (p.threads, p.merge_width, p.waiters, p.inflight),
            (4, 4, 3, 8)
        );
        let cli = Cli::try_parse_from([
            "fence-hammer",
            "--threads=8",
            "--merge-width=2",
            "--waiters=5",
        ])
        .unwrap();
        assert_eq!((cli.threads, cli.merge_width, cli.waiters), (8, 2, 5));
        for bad in [
            "--threads=0",
            "--merge-width=1",
            "--waiters=0",
            "--threads=65",
        ] {
            assert!(Cli::try_parse_from(["fence-hammer", bad]).is_err(), "{bad}");
        }
    }
}
