//! `cargo xtask bench`: fencelab-device measured, in one run, against
//! rust-vmm's vhost-device-gpu and against its own limits (issue 7).
//!
//! - [`guest_runs`]: real boots: fence round trips on both backends and both
//!   guest drivers, and latency-injection accuracy.
//! - [`in_process`]: criterion benches of the decoder and the scheduler,
//!   and the backend's memory over a million fences.
//! - [`table`]: the printed table.
//!
//! Performance is reported here, never asserted: the figures depend on the
//! machine (TCG, timer slack, load), and the table says what limits each.

mod guest_runs;
mod in_process;
mod table;

use crate::{kernel, paths, setup};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

pub use guest_runs::{LatencyAccuracy, RoundTrip};
pub use in_process::{CriterionFigure, MemoryFigures};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Print the figures as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// Fences per round-trip run (each timeline gets its share).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(10..))]
    pub fences: u32,
    /// Fences per injected latency in the latency-accuracy run.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(10..))]
    pub latency_fences: u32,
    /// Leave out rust-vmm's vhost-device-gpu.
    #[arg(long)]
    pub no_peer: bool,
    /// Only the in-process benches (no kernel, no QEMU).
    #[arg(long)]
    pub no_boot: bool,
    /// Only the boots (no criterion, no million-fence memory run).
    #[arg(long, conflicts_with = "no_boot")]
    pub no_in_process: bool,
    /// Criterion's measurement time per benchmark, in seconds.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub measurement_secs: u64,
}

/// Everything one `cargo xtask bench` measured; its JSON form is `--json`'s
/// contract. Figures that could not be measured are `null`, with the reason
/// in `unavailable`.
#[derive(Debug, Default, Serialize)]
pub struct Figures {
    /// fencelab-device through virtio_gpu, one timeline.
    pub fencelab_fences_per_s: Option<f64>,
    /// vhost-device-gpu (null mode) through virtio_gpu, one timeline.
    pub peer_fences_per_s: Option<f64>,
    /// fencelab / peer, one timeline.
    pub fencelab_to_peer_ratio: Option<f64>,
    /// Guest-observed minus injected, p99, keyed by injected latency.
    pub latency_p99_error_us: BTreeMap<String, f64>,
    /// RSS after a million fences minus RSS after ten thousand (in-process).
    pub rss_growth_kib: Option<i64>,
    pub round_trip: Vec<RoundTrip>,
    pub latency: Vec<LatencyAccuracy>,
    pub memory: Option<MemoryFigures>,
    pub criterion: Vec<CriterionFigure>,
    pub boot: BootFigures,
    /// What could not be measured, and why.
    pub unavailable: Vec<String>,
    pub elapsed_s: f64,
}

/// How long a user waits.
#[derive(Debug, Default, Serialize)]
pub struct BootFigures {
    /// `cargo xtask boot` start to the result line with everything built,
    /// median over the runs.
    pub warm_boot_to_result_s: Option<f64>,
    /// QEMU start to the workload's first fence, median over the runs.
    pub qemu_to_workload_ms_p50: Option<u64>,
    /// The kernel's cold build, from the cache's build record.
    pub cold_kernel_build_s: Option<f64>,
    /// Which record, when not the running kernel's own.
    pub cold_kernel_build_record: Option<String>,
    pub kernel_cache_key: Option<String>,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let started = Instant::now();
    let mut figures = Figures::default();
    let runs_dir = bench_dir()?;
    eprintln!("bench: results in {}", runs_dir.display());
    if !args.no_boot {
        let toolchain = setup::run()?;
        let kernel = kernel::build(&toolchain, &kernel::KernelArgs::default())?;
        figures.boot.kernel_cache_key = Some(kernel.key.clone());
        figures.boot.cold_kernel_build_s = kernel.cold_build_secs;
        if kernel.cold_build_secs.is_none() {
            // Built incrementally on the shared build folder after a patch
            // changed: the folder's own cold build is on an earlier record.
            match kernel::latest_cold_build(&paths::cache_dir().join("kernel")) {
                Some(cold) => {
                    figures.boot.cold_kernel_build_s = Some(cold.secs);
                    figures.boot.cold_kernel_build_record = Some(format!(
                        "cache entry {} built {} (this kernel was an incremental build)",
                        cold.key16, cold.built_at
                    ));
                }
                None => figures
                    .unavailable
                    .push("cold kernel build time: no build record in the cache has one".into()),
            }
        }
        guest_runs::run_all(args, &runs_dir, &mut figures)?;
    }
    if !args.no_in_process {
        in_process::run_all(args, &mut figures)?;
    }
    figures.elapsed_s = started.elapsed().as_secs_f64();
    let json = serde_json::to_string(&figures).context("serialising the figures")?;
    let json_path = runs_dir.join("bench.json");
    std::fs::write(&json_path, &json)
        .with_context(|| format!("writing {}", json_path.display()))?;
    print!("{}", table::render(&figures));
    println!("figures: {}", json_path.display());
    if args.json {
        println!("{json}");
    }
    let own_failures: Vec<&RoundTrip> = figures
        .round_trip
        .iter()
        .filter(|r| r.error.is_some() && r.backend == crate::boot::Backend::Fencelab)
        .collect();
    if !own_failures.is_empty() {
        bail!(
            "{} fencelab-device run(s) failed; their errors are in the table",
            own_failures.len()
        );
    }
    Ok(())
}

/// `target/fencelab-runs/bench-<unix time>`.
fn bench_dir() -> Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let dir = paths::runs_dir().join(format!("bench-{stamp}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
