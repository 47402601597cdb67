//! The run summary: what the guest, the kernel and the device said, as a
//! table for people and one JSON object for machines.

use crate::boot::BootArgs;
use crate::console::{ConsoleReport, Splat};
use crate::kernel::Kernel;
use crate::qemu::Accel;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Round-trip percentiles reported by fence-hammer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoundTrip {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

/// fence-hammer's `FENCELAB_RESULT` line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestResult {
    pub workload: String,
    pub fences_submitted: u64,
    pub fences_signaled: u64,
    pub fence_errors: u64,
    #[serde(default)]
    pub fence_timeouts: u64,
    #[serde(default)]
    pub out_of_order: u64,
    #[serde(default)]
    pub elapsed_ms: f64,
    #[serde(default)]
    pub fences_per_s: f64,
    #[serde(default)]
    pub rtt_us: RoundTrip,
    #[serde(default)]
    pub first_error: Option<String>,
    #[serde(default)]
    pub timeline_name: Option<String>,
    pub ok: bool,
}

/// The device's `fencelab-device: summary {json}` line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceSummary {
    pub fences_submitted: u64,
    pub fences_completed: u64,
    #[serde(default)]
    pub commands: serde_json::Value,
    #[serde(default)]
    pub error_responses: serde_json::Value,
}

pub const DEVICE_SUMMARY_MARKER: &str = "fencelab-device: summary ";

impl DeviceSummary {
    /// The last summary line in the device log, if there is one.
    pub fn from_log(log: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(log).ok()?;
        text.lines()
            .rev()
            .find_map(|line| line.split_once(DEVICE_SUMMARY_MARKER))
            .and_then(|(_, json)| serde_json::from_str(json.trim()).ok())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct KernelInfo {
    pub release: String,
    pub config_sha256: String,
    pub cache_key: String,
}

impl From<&Kernel> for KernelInfo {
    fn from(kernel: &Kernel) -> Self {
        Self {
            release: kernel.release.clone(),
            config_sha256: kernel.config_sha256.clone(),
            cache_key: kernel.key.clone(),
        }
    }
}

/// The summary of one boot; its JSON form is the contract of `--json`.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub ok: bool,
    pub workload: String,
    pub fences_submitted: u64,
    pub fences_signaled: u64,
    pub fence_errors: u64,
    pub fence_timeouts: u64,
    pub out_of_order: u64,
    pub fences_per_s: f64,
    pub rtt_us: RoundTrip,
    pub splats: Vec<String>,
    pub splat_details: Vec<Splat>,
    pub boot_to_result_ms: Option<u64>,
    pub prepare_secs: f64,
    pub kernel: KernelInfo,
    pub guest_release: Option<String>,
    pub guest_config: BTreeMap<String, String>,
    pub accel: Accel,
    pub latency: String,
    pub device: Option<DeviceSummary>,
    pub qemu_exit: Option<i32>,
    pub run_dir: PathBuf,
    pub reproduce: String,
    pub failures: Vec<String>,
}

impl Summary {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        args: &BootArgs,
        kernel: KernelInfo,
        console: ConsoleReport,
        guest: Option<GuestResult>,
        device: Option<DeviceSummary>,
        boot_to_result_ms: Option<u64>,
        prepare_secs: f64,
        qemu_exit: Option<i32>,
        run_dir: PathBuf,
        reproduce: String,
        failures: Vec<String>,
    ) -> Self {
        let guest_ref = guest.as_ref();
        Self {
            ok: failures.is_empty(),
            workload: args.workload.clone(),
            fences_submitted: guest_ref.map_or(0, |g| g.fences_submitted),
            fences_signaled: guest_ref.map_or(0, |g| g.fences_signaled),
            fence_errors: guest_ref.map_or(0, |g| g.fence_errors),
            fence_timeouts: guest_ref.map_or(0, |g| g.fence_timeouts),
            out_of_order: guest_ref.map_or(0, |g| g.out_of_order),
            fences_per_s: guest_ref.map_or(0.0, |g| g.fences_per_s),
            rtt_us: guest_ref.map(|g| g.rtt_us.clone()).unwrap_or_default(),
            splats: console.splats.iter().map(Splat::summary).collect(),
            splat_details: console.splats,
            boot_to_result_ms,
            prepare_secs,
            kernel,
            guest_release: console.booted_release,
            guest_config: console.guest_config,
            accel: args.accel,
            latency: args.latency.clone(),
            device,
            qemu_exit,
            run_dir,
            reproduce,
            failures,
        }
    }
}

/// Prints the table (and the JSON line when asked) to stdout.
pub fn print(summary: &Summary, json: bool) {
    let rows: Vec<(&str, String)> = vec![
        (
            "result",
            if summary.ok {
                "PASS".into()
            } else {
                "FAIL".into()
            },
        ),
        ("workload", summary.workload.clone()),
        ("fences submitted", summary.fences_submitted.to_string()),
        ("fences signaled", summary.fences_signaled.to_string()),
        ("fence errors", summary.fence_errors.to_string()),
        ("fence timeouts", summary.fence_timeouts.to_string()),
        ("out of order", summary.out_of_order.to_string()),
        ("fences/s", format!("{:.0}", summary.fences_per_s)),
        (
            "round trip µs",
            format!(
                "p50 {} · p99 {} · max {}",
                summary.rtt_us.p50, summary.rtt_us.p99, summary.rtt_us.max
            ),
        ),
        (
            "device fences",
            summary.device.as_ref().map_or("no summary".into(), |d| {
                format!(
                    "{} submitted, {} completed",
                    d.fences_submitted, d.fences_completed
                )
            }),
        ),
        (
            "splats",
            if summary.splats.is_empty() {
                "none".into()
            } else {
                summary.splats.join("\n")
            },
        ),
        (
            "boot → result",
            summary
                .boot_to_result_ms
                .map_or("-".into(), |ms| format!("{ms} ms")),
        ),
        (
            "prepare (setup+build)",
            format!("{:.1} s", summary.prepare_secs),
        ),
        (
            "kernel",
            format!(
                "{} (config {})",
                summary.kernel.release,
                short(&summary.kernel.config_sha256)
            ),
        ),
        ("accel", format!("{:?}", summary.accel).to_lowercase()),
        ("run folder", summary.run_dir.display().to_string()),
        ("reproduce", summary.reproduce.clone()),
    ];
    let width = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    for (key, value) in rows {
        let mut lines = value.lines();
        println!("{key:>width$}  {}", lines.next().unwrap_or(""));
        for more in lines {
            println!("{:>width$}  {more}", "");
        }
    }
    for failure in &summary.failures {
        println!("FAILURE: {failure}");
    }
    if json {
        match serde_json::to_string(summary) {
            Ok(line) => println!("{line}"),
            Err(error) => {
                println!("{{\"ok\":false,\"failures\":[\"summary not serialisable: {error}\"]}}")
            }
        }
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_last_device_summary_line() {
        let dir = std::env::temp_dir().join(format!("fencelab-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("device.log");
        std::fs::write(
            &log,
            "INFO something\n\
             fencelab-device: summary {\"fences_submitted\":1,\"fences_completed\":1}\n\
             fencelab-device: summary {\"fences_submitted\":2001,\"fences_completed\":2000,\"commands\":{\"SUBMIT_3D\":2001}}\n",
        )
        .unwrap();
        let summary = DeviceSummary::from_log(&log).unwrap();
        assert_eq!(summary.fences_submitted, 2001);
        assert_eq!(summary.fences_completed, 2000);
        assert_eq!(summary.commands["SUBMIT_3D"], 2001);
        std::fs::write(&log, "no summary here\n").unwrap();
        assert!(DeviceSummary::from_log(&log).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn guest_result_line_parses() {
        let line = r#"{"workload":"smoke","device":"/dev/dri/renderD128","driver":"virtio_gpu",
            "fences_submitted":2000,"fences_signaled":2000,"fence_errors":0,"fence_timeouts":0,
            "out_of_order":0,"elapsed_ms":2100.5,"fences_per_s":952.1,
            "rtt_us":{"p50":900,"p99":2100,"max":5000},"first_error":null,
            "timeline_name":"controlq","ok":true}"#;
        let guest: GuestResult = serde_json::from_str(line).unwrap();
        assert!(guest.ok);
        assert_eq!(guest.fences_signaled, 2000);
        assert_eq!(guest.rtt_us.p99, 2100);
    }
}
