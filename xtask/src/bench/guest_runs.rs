//! The benchmarks that boot a guest: fence round trips through each backend
//! and guest driver, and how closely guest-observed latency follows the
//! injected one. Every run is an ordinary `cargo xtask boot` (same kernel,
//! image, QEMU command line and fence-hammer), so the backends differ in
//! nothing else.

use super::{BenchArgs, Figures};
use crate::boot::{self, Backend, BootArgs, Driver};
use crate::latency::{Latencies, human_us};
use crate::report::Summary;
use fencelab_report::{RttUs, percentile};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One round-trip run: zero injected latency, one fence in flight per
/// timeline, so a fence's round trip is the path's whole latency.
#[derive(Debug, Clone, Serialize)]
pub struct RoundTrip {
    pub backend: Backend,
    /// The guest's DRM driver module.
    pub driver: &'static str,
    pub timelines: u32,
    pub fences: u64,
    pub fences_per_s: Option<f64>,
    /// Guest submit to the waiter seeing the signal.
    pub rtt_us: RttUs,
    pub backend_cpu_ms_per_1000_fences: Option<f64>,
    pub backend_peak_rss_kib: Option<u64>,
    pub qemu_to_workload_ms: Option<u64>,
    pub run_dir: Option<PathBuf>,
    /// Why the run produced no figures (or failed).
    pub error: Option<String>,
}

impl RoundTrip {
    /// The row of a configuration before its run.
    pub(super) fn unmeasured(backend: Backend, driver: &'static str, timelines: u32) -> Self {
        Self {
            backend,
            driver,
            timelines,
            fences: 0,
            fences_per_s: None,
            rtt_us: RttUs::default(),
            backend_cpu_ms_per_1000_fences: None,
            backend_peak_rss_kib: None,
            qemu_to_workload_ms: None,
            run_dir: None,
            error: None,
        }
    }
}

/// Guest-observed against injected latency for one fixed latency.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyAccuracy {
    /// As given to `--latency` (`50us`, `10ms`).
    pub injected: String,
    pub injected_us: f64,
    pub fences: u64,
    /// Guest submit to signal seen.
    pub guest_rtt_us: RttUs,
    /// Guest round trip minus the injected latency.
    pub guest_error_us: ErrorUs,
    /// The device's own completion time minus the injected latency (from
    /// its trace): the engine's timer accuracy alone.
    pub device_error_us: ErrorUs,
    pub run_dir: Option<PathBuf>,
    pub error: Option<String>,
}

/// How far observed latencies were above the injected one, in µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ErrorUs {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

/// The latencies of item 2 of issue 7, in µs.
const INJECTED: [(&str, f64); 4] = [
    ("50us", 50.0),
    ("100us", 100.0),
    ("1ms", 1000.0),
    ("10ms", 10_000.0),
];

/// One boot the bench makes.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RoundTripSpec {
    backend: Backend,
    driver: Driver,
    timelines: u32,
}

/// fencelab-device and the peer back to back for each timeline count (so
/// they see the same machine load), in turn first (so neither always gets
/// the first boot of the bench), then fencelab_drm, which only
/// fencelab-device speaks to.
fn round_trip_specs(with_peer: bool) -> Vec<RoundTripSpec> {
    let mut specs = Vec::new();
    for (round, timelines) in [1, 4].into_iter().enumerate() {
        let virtio = |backend| RoundTripSpec {
            backend,
            driver: Driver::VirtioGpu,
            timelines,
        };
        let mut pair = vec![virtio(Backend::Fencelab)];
        if with_peer {
            pair.push(virtio(Backend::VhostDeviceGpu));
        }
        if round % 2 == 1 {
            pair.reverse();
        }
        specs.extend(pair);
        specs.push(RoundTripSpec {
            backend: Backend::Fencelab,
            driver: Driver::Fencelab,
            timelines,
        });
    }
    specs
}

/// The boot of one measurement: fence-hammer's signal-storm with one
/// thread per timeline, one fence in flight each, no WRITE read-back (the
/// peer does not run fencelab's command stream, so neither backend gets one).
fn boot_args(
    backend: Backend,
    driver: Driver,
    timelines: u32,
    fences: u32,
    latency: &str,
) -> BootArgs {
    BootArgs {
        workload: "signal-storm".into(),
        driver,
        backend,
        fences: Some(fences),
        latency: latency.into(),
        hammer_args: vec![
            format!("--threads={timelines}"),
            "--inflight=1".into(),
            "--no-write".into(),
        ],
        timeout_secs: 600,
        ..BootArgs::default()
    }
}

/// The summary of a boot that passed, or why there is none.
fn boot(args: &BootArgs) -> Result<Summary, (String, Option<PathBuf>)> {
    match boot::execute(args) {
        Err(error) => Err((format!("{error:#}"), None)),
        Ok(summary) if !summary.ok => Err((summary.failures.join("; "), Some(summary.run_dir))),
        Ok(summary) => Ok(summary),
    }
}

fn round_trip(spec: RoundTripSpec, fences: u32) -> (RoundTrip, Option<Summary>) {
    let args = boot_args(spec.backend, spec.driver, spec.timelines, fences, "0");
    let mut row = RoundTrip::unmeasured(spec.backend, spec.driver.module(), spec.timelines);
    match boot(&args) {
        Err((error, run_dir)) => {
            row.error = Some(error);
            row.run_dir = run_dir;
            (row, None)
        }
        Ok(summary) => {
            row.fences = summary.fences_signaled;
            row.fences_per_s = Some(summary.fences_per_s);
            row.rtt_us = summary.rtt_us;
            row.backend_cpu_ms_per_1000_fences = crate::report::per_1000_fences(&summary);
            row.backend_peak_rss_kib = summary.backend_usage.map(|u| u.max_rss_kib);
            row.qemu_to_workload_ms = summary.boot_to_workload_ms;
            row.run_dir = Some(summary.run_dir.clone());
            (row, Some(summary))
        }
    }
}

/// `observed − injected` for each of p50, p99, max (µs).
fn error_above(injected_us: f64, p50: Option<f64>, p99: Option<f64>, max: Option<f64>) -> ErrorUs {
    let minus = |v: Option<f64>| v.map(|v| v - injected_us);
    ErrorUs {
        p50: minus(p50),
        p99: minus(p99),
        max: minus(max),
    }
}

/// The device plan of the latency-accuracy run: the workload's fences in
/// consecutive phases of `per_phase`, each phase with one injected latency
/// of [`INJECTED`]; everything else completes at once.
fn phased_plan(per_phase: u32) -> String {
    let mut plan = String::from("# written by cargo xtask bench\n[default]\nlatency = \"0s\"\n");
    for (i, (latency, _)) in INJECTED.iter().enumerate() {
        let from = i as u64 * u64::from(per_phase);
        let to = from + u64::from(per_phase) - 1;
        plan.push_str(&format!(
            "\n[[rule]]\nname = \"phase {i}: {latency}\"\nlatency = \"{latency}\"\n\
             match = {{ command = \"SUBMIT_3D\", index = {{ from = {from}, to = {to} }} }}\n"
        ));
    }
    plan
}

/// One boot for all of [`INJECTED`]: the device changes its latency by
/// phase (`phased_plan`), fence-hammer reports its round trips by the same
/// phases (`--rtt-phases`), and the trace gives the device's side.
fn latency_accuracy(per_phase: u32, dir: &Path) -> Vec<LatencyAccuracy> {
    let row = |(injected, injected_us): (&str, f64)| LatencyAccuracy {
        injected: injected.into(),
        injected_us,
        fences: 0,
        guest_rtt_us: RttUs::default(),
        guest_error_us: ErrorUs::default(),
        device_error_us: ErrorUs::default(),
        run_dir: None,
        error: None,
    };
    let mut rows: Vec<LatencyAccuracy> = INJECTED.into_iter().map(row).collect();
    let fail = |rows: &mut Vec<LatencyAccuracy>, error: String, run_dir: Option<PathBuf>| {
        for r in rows.iter_mut() {
            r.error = Some(error.clone());
            r.run_dir = run_dir.clone();
        }
    };
    let plan = dir.join("latency-phases.toml");
    if let Err(error) = std::fs::write(&plan, phased_plan(per_phase)) {
        fail(
            &mut rows,
            format!("writing {}: {error}", plan.display()),
            None,
        );
        return rows;
    }
    let mut args = boot_args(
        Backend::Fencelab,
        Driver::VirtioGpu,
        1,
        per_phase * INJECTED.len() as u32,
        "0",
    );
    args.plan = Some(plan);
    args.hammer_args
        .push(format!("--rtt-phases={}", INJECTED.len()));
    let summary = match boot(&args) {
        Err((error, run_dir)) => {
            fail(&mut rows, error, run_dir);
            return rows;
        }
        Ok(summary) => summary,
    };
    let phases = summary
        .guest
        .as_ref()
        .map(|g| g.rtt_us_by_phase.clone())
        .unwrap_or_default();
    if phases.len() != INJECTED.len() {
        fail(
            &mut rows,
            format!(
                "fence-hammer reported {} round-trip phases, {} asked",
                phases.len(),
                INJECTED.len()
            ),
            Some(summary.run_dir),
        );
        return rows;
    }
    let device = summary
        .trace
        .as_deref()
        .map(Latencies::from_trace_by_injected)
        .transpose();
    let device = match device {
        Ok(device) => device.map(|d| d.figures()).unwrap_or_default(),
        Err(error) => {
            fail(&mut rows, format!("{error:#}"), Some(summary.run_dir));
            return rows;
        }
    };
    let as_f64 = |v: Option<u64>| v.map(|v| v as f64);
    for (row, rtt) in rows.iter_mut().zip(phases) {
        row.guest_rtt_us = rtt;
        row.guest_error_us = error_above(
            row.injected_us,
            as_f64(rtt.p50),
            as_f64(rtt.p99),
            as_f64(rtt.max),
        );
        // The workload's timeline in this phase (the most fences with this
        // injected latency; setup commands on context 0 have their own).
        let suffix = format!(" @ {}", human_us(row.injected_us));
        if let Some(timeline) = device
            .iter()
            .filter(|t| t.timeline.ends_with(&suffix))
            .max_by_key(|t| t.fences)
        {
            row.fences = timeline.fences;
            row.device_error_us = ErrorUs {
                max: timeline.max_error_us,
                ..error_above(
                    row.injected_us,
                    timeline.observed_p50_us,
                    timeline.observed_p99_us,
                    None,
                )
            };
        }
        row.run_dir = Some(summary.run_dir.clone());
    }
    rows
}

/// Runs every boot of the bench and fills their part of `figures`.
pub fn run_all(args: &BenchArgs, dir: &Path, figures: &mut Figures) -> anyhow::Result<()> {
    let with_peer = !args.no_peer
        && match crate::peer::ensure_installed() {
            Ok(_) => true,
            Err(error) => {
                figures.unavailable.push(format!(
                    "{} {}: not installed: {error:#}",
                    crate::peer::CRATE,
                    crate::peer::VERSION
                ));
                false
            }
        };
    let specs = round_trip_specs(with_peer);
    let total = specs.len() + 1;
    let mut summaries = Vec::new();
    for (i, spec) in specs.into_iter().enumerate() {
        eprintln!(
            "bench: [{}/{total}] round trip: {} through {}, {} timeline(s), {} fences",
            i + 1,
            spec.backend.name(),
            spec.driver.module(),
            spec.timelines,
            args.fences
        );
        let (row, summary) = round_trip(spec, args.fences);
        if let Some(error) = &row.error {
            eprintln!("bench: that run failed: {error}");
            if spec.backend == Backend::VhostDeviceGpu {
                figures.unavailable.push(format!(
                    "{} with {} timeline(s): the run failed: {error}",
                    spec.backend.name(),
                    spec.timelines
                ));
            }
        }
        figures.round_trip.push(row);
        summaries.extend(summary);
    }
    eprintln!(
        "bench: [{total}/{total}] latency accuracy: {} injected in turn, {} fences each",
        INJECTED.map(|(name, _)| name).join(", "),
        args.latency_fences
    );
    for row in latency_accuracy(args.latency_fences, dir) {
        if let Some(p99) = row.guest_error_us.p99 {
            figures
                .latency_p99_error_us
                .insert(row.injected.clone(), p99);
        }
        figures.latency.push(row);
    }
    headline(figures);
    boot_figures(&summaries, figures);
    Ok(())
}

/// fences/s of `backend` through virtio_gpu on `timelines` timelines.
fn virtio_fences_per_s(rows: &[RoundTrip], backend: Backend, timelines: u32) -> Option<f64> {
    rows.iter()
        .find(|r| r.backend == backend && r.driver == "virtio_gpu" && r.timelines == timelines)
        .and_then(|r| r.fences_per_s)
}

/// fencelab-device's fences/s over the peer's, through virtio_gpu.
pub fn ratio_to_peer(rows: &[RoundTrip], timelines: u32) -> Option<f64> {
    let ours = virtio_fences_per_s(rows, Backend::Fencelab, timelines)?;
    let peer = virtio_fences_per_s(rows, Backend::VhostDeviceGpu, timelines)?;
    (peer > 0.0).then(|| ours / peer)
}

/// The JSON's headline keys: one timeline through virtio_gpu.
fn headline(figures: &mut Figures) {
    let rows = &figures.round_trip;
    figures.fencelab_fences_per_s = virtio_fences_per_s(rows, Backend::Fencelab, 1);
    figures.peer_fences_per_s = virtio_fences_per_s(rows, Backend::VhostDeviceGpu, 1);
    figures.fencelab_to_peer_ratio = ratio_to_peer(rows, 1);
}

/// Boot times over every run that passed: medians, so that the first
/// run's builds (a fresh clone builds the device and the image there) do
/// not count as a warm boot.
fn boot_figures(summaries: &[Summary], figures: &mut Figures) {
    let median = |mut values: Vec<u64>| {
        values.sort_unstable();
        percentile(&values, 0.5)
    };
    let to_result_ms: Vec<u64> = summaries
        .iter()
        .filter_map(|s| {
            s.boot_to_result_ms
                .map(|ms| (s.prepare_secs * 1000.0) as u64 + ms)
        })
        .collect();
    figures.boot.warm_boot_to_result_s = median(to_result_ms).map(|ms| ms as f64 / 1000.0);
    figures.boot.qemu_to_workload_ms_p50 = median(
        summaries
            .iter()
            .filter_map(|s| s.boot_to_workload_ms)
            .collect(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_timeline_count_runs_both_backends_back_to_back_in_turn_first_then_fencelab_drm() {
        let specs = round_trip_specs(true);
        let names: Vec<String> = specs
            .iter()
            .map(|s| format!("{}/{}/{}", s.backend.name(), s.driver.module(), s.timelines))
            .collect();
        assert_eq!(
            names,
            [
                "fencelab-device/virtio_gpu/1",
                "vhost-device-gpu/virtio_gpu/1",
                "fencelab-device/fencelab_drm/1",
                "vhost-device-gpu/virtio_gpu/4",
                "fencelab-device/virtio_gpu/4",
                "fencelab-device/fencelab_drm/4",
            ]
        );
        assert!(
            round_trip_specs(false)
                .iter()
                .all(|s| s.backend == Backend::Fencelab)
        );
    }

    #[test]
    fn a_measurement_is_signal_storm_one_fence_in_flight_per_timeline_without_writes() {
        let args = boot_args(Backend::VhostDeviceGpu, Driver::VirtioGpu, 4, 1000, "0");
        assert_eq!(args.workload, "signal-storm");
        assert_eq!(args.fences(), 1000);
        assert_eq!(
            args.hammer_args,
            ["--threads=4", "--inflight=1", "--no-write"]
        );
        assert_eq!(args.backend, Backend::VhostDeviceGpu);
        let timed = boot_args(Backend::Fencelab, Driver::VirtioGpu, 1, 300, "50us");
        assert_eq!(timed.latency, "50us");
    }

    #[test]
    fn the_phased_plan_gives_each_phase_its_latency_and_the_device_accepts_it() {
        let text = phased_plan(300);
        let plan = fencelab_device::plan::Plan::parse(&text, "phased").expect("a valid plan");
        assert_eq!(plan.rules().len(), 4);
        assert!(text.contains(
            "name = \"phase 3: 10ms\"\nlatency = \"10ms\"\nmatch = { command = \"SUBMIT_3D\", index = { from = 900, to = 1199 } }"
        ), "{text}");
        assert!(text.contains("index = { from = 0, to = 299 }"), "{text}");
    }

    #[test]
    fn errors_are_observed_minus_injected() {
        let e = error_above(100.0, Some(150.0), Some(900.5), None);
        assert_eq!(
            e,
            ErrorUs {
                p50: Some(50.0),
                p99: Some(800.5),
                max: None
            }
        );
    }

    #[test]
    fn the_headline_is_one_timeline_through_virtio_gpu_and_the_ratio_needs_both() {
        let row = |backend, driver, timelines, per_s| RoundTrip {
            fences_per_s: Some(per_s),
            ..RoundTrip::unmeasured(backend, driver, timelines)
        };
        let mut figures = Figures {
            round_trip: vec![
                row(Backend::Fencelab, "virtio_gpu", 4, 900.0),
                row(Backend::Fencelab, "fencelab_drm", 1, 700.0),
                row(Backend::Fencelab, "virtio_gpu", 1, 300.0),
                row(Backend::VhostDeviceGpu, "virtio_gpu", 1, 400.0),
            ],
            ..Figures::default()
        };
        headline(&mut figures);
        assert_eq!(figures.fencelab_fences_per_s, Some(300.0));
        assert_eq!(figures.peer_fences_per_s, Some(400.0));
        assert_eq!(figures.fencelab_to_peer_ratio, Some(0.75));
        figures.round_trip.pop();
        headline(&mut figures);
        assert_eq!(figures.fencelab_to_peer_ratio, None);
    }
}
