//! The run summary: what the guest, the kernel and the device said, as a
//! table for people and one JSON object for machines.

use crate::boot::{Backend, BootArgs};
use crate::console::{ConsoleReport, Splat};
use crate::kernel::Kernel;
use crate::latency::TimelineLatency;
use crate::qemu::Accel;
use crate::supervise::ResourceUsage;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use fencelab_report::{Accounting, ResultLine, RttUs, UnloadReport};

/// Something the run found out about the driver under test: reported, not
/// a failure of the harness (`boot --fail-on-findings` makes it one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// `premature_signal`, `error_signaled_as_success` or
    /// `hung_fence_never_signaled`.
    pub kind: String,
    pub count: u64,
    /// The first few fences concerned (fence-hammer's fence numbers), when known.
    pub fences: Vec<u64>,
    pub detail: String,
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
    /// The seed every random decision was drawn from.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Totals over all timelines.
    #[serde(default)]
    pub accounting: Option<Accounting>,
    /// Per command type, e.g. `"SUBMIT_3D"`.
    #[serde(default)]
    pub accounting_by_command: Option<BTreeMap<String, Accounting>>,
    /// Per timeline, keyed `"CTX.RING"`.
    #[serde(default)]
    pub timelines: BTreeMap<String, Accounting>,
}

pub const DEVICE_SUMMARY_MARKER: &str = "fencelab-device: summary ";
/// The line fencelab-device prints at start: `fencelab-device: seed N`.
pub const DEVICE_SEED_MARKER: &str = "fencelab-device: seed ";

impl DeviceSummary {
    /// The last summary line in the device log, if there is one.
    pub fn from_log(log: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(log).ok()?;
        text.lines()
            .rev()
            .find_map(|line| line.split_once(DEVICE_SUMMARY_MARKER))
            .and_then(|(_, json)| serde_json::from_str(json.trim()).ok())
    }

    /// The `SUBMIT_3D` accounting: the fences fence-hammer's EXECBUFFERs
    /// became. `None` when the device reports no per-command accounting;
    /// zeros when it does but saw no `SUBMIT_3D`.
    pub fn submit_3d(&self) -> Option<Accounting> {
        self.accounting_by_command
            .as_ref()
            .map(|m| m.get("SUBMIT_3D").copied().unwrap_or_default())
    }
}

/// The seed from the device's start line (`fencelab-device: seed N`), when
/// it printed one.
pub fn seed_from_log(log: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().find_map(|line| {
        let (_, rest) = line.split_once(DEVICE_SEED_MARKER)?;
        rest.split_whitespace().next()?.parse().ok()
    })
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
    pub rtt_us: RttUs,
    pub premature_signals: u64,
    pub premature_fences: Vec<u64>,
    pub write_checks: u64,
    /// `unload-live`'s figures (`null` for the other workloads).
    pub unload: Option<UnloadReport>,
    pub splats: Vec<String>,
    pub splat_details: Vec<Splat>,
    /// The vhost-user backend behind the guest's GPU.
    pub backend: Backend,
    /// The backend's CPU time and peak memory over the whole run.
    pub backend_usage: Option<ResourceUsage>,
    /// QEMU start to the workload's first fence.
    pub boot_to_workload_ms: Option<u64>,
    pub boot_to_result_ms: Option<u64>,
    pub prepare_secs: f64,
    pub kernel: KernelInfo,
    pub guest_release: Option<String>,
    pub guest_config: BTreeMap<String, String>,
    pub accel: Accel,
    /// The fixed latency, when no plan was given.
    pub latency: Option<String>,
    /// The plan file, when one was given.
    pub plan: Option<PathBuf>,
    /// The seed the device drew its decisions from.
    pub seed: Option<u64>,
    /// The device's decision trace (JSON lines), replayable with `--replay`.
    pub trace: Option<PathBuf>,
    pub device: Option<DeviceSummary>,
    pub qemu_exit: Option<i32>,
    pub run_dir: PathBuf,
    pub reproduce: String,
    /// Facts about the driver under test; not failures.
    pub findings: Vec<Finding>,
    pub failures: Vec<String>,
    /// Earlier attempts whose kernel stalled before the init and were
    /// booted again; empty on a clean first boot.
    pub early_boot_stalls: Vec<EarlyBootStall>,
    /// The guest's whole result line, for checks on the fields the table
    /// does not copy (the workloads' own objects). Not in `report.json`,
    /// which keeps its flat keys.
    #[serde(skip)]
    pub guest: Option<ResultLine>,
    /// Per-timeline injected vs observed latency, from the trace
    /// (`run_report::RunReports::attach` fills it in).
    pub latency_by_timeline: Vec<TimelineLatency>,
    /// The latency histograms, `latency.svg` in the run folder.
    pub latency_svg: Option<PathBuf>,
}

/// How the run went, apart from what the guest and the console said.
/// A boot attempt whose kernel stopped printing before it reached the init
/// (see `guest::EARLY_BOOT_STALL`); the run was booted again.
#[derive(Debug, Clone, Serialize)]
pub struct EarlyBootStall {
    pub run_dir: PathBuf,
    /// Console lines printed before the stall.
    pub after_line: usize,
    pub last_line: String,
}

#[derive(Debug)]
pub struct RunInfo {
    pub boot_to_workload_ms: Option<u64>,
    pub boot_to_result_ms: Option<u64>,
    pub backend_usage: Option<ResourceUsage>,
    pub prepare_secs: f64,
    pub qemu_exit: Option<i32>,
    pub run_dir: PathBuf,
    pub seed: Option<u64>,
    pub trace: Option<PathBuf>,
    pub reproduce: String,
    pub findings: Vec<Finding>,
    pub failures: Vec<String>,
}

impl Summary {
    pub fn new(
        args: &BootArgs,
        kernel: KernelInfo,
        console: ConsoleReport,
        guest: Option<ResultLine>,
        device: Option<DeviceSummary>,
        run: RunInfo,
    ) -> Self {
        let guest_ref = guest.as_ref();
        Self {
            ok: run.failures.is_empty(),
            workload: args.workload.clone(),
            fences_submitted: guest_ref.map_or(0, |g| g.fences_submitted),
            fences_signaled: guest_ref.map_or(0, |g| g.fences_signaled),
            fence_errors: guest_ref.map_or(0, |g| g.fence_errors),
            fence_timeouts: guest_ref.map_or(0, |g| g.fence_timeouts),
            out_of_order: guest_ref.map_or(0, |g| g.out_of_order),
            fences_per_s: guest_ref.map_or(0.0, |g| g.fences_per_s),
            rtt_us: guest_ref.map(|g| g.rtt_us).unwrap_or_default(),
            premature_signals: guest_ref.map_or(0, |g| g.premature_signals),
            premature_fences: guest_ref.map_or(Vec::new(), |g| g.premature_fences.clone()),
            write_checks: guest_ref.map_or(0, |g| g.write_checks),
            unload: guest_ref.and_then(|g| g.unload.clone()),
            splats: console.splats.iter().map(Splat::summary).collect(),
            splat_details: console.splats,
            backend: args.backend,
            backend_usage: run.backend_usage,
            boot_to_workload_ms: run.boot_to_workload_ms,
            boot_to_result_ms: run.boot_to_result_ms,
            prepare_secs: run.prepare_secs,
            kernel,
            guest_release: console.booted_release,
            guest_config: console.guest_config,
            accel: args.accel,
            latency: args.plan.is_none().then(|| args.latency.clone()),
            plan: args.plan.clone(),
            seed: run.seed,
            trace: run.trace,
            device,
            qemu_exit: run.qemu_exit,
            run_dir: run.run_dir,
            reproduce: run.reproduce,
            findings: run.findings,
            failures: run.failures,
            early_boot_stalls: Vec::new(),
            guest,
            latency_by_timeline: Vec::new(),
            latency_svg: None,
        }
    }
}

/// Prints the table (and the JSON line when asked) to stdout.
pub fn print(summary: &Summary, json: bool) {
    print!("{}", table(summary));
    if json {
        match serde_json::to_string(summary) {
            Ok(line) => println!("{line}"),
            Err(error) => {
                println!("{{\"ok\":false,\"failures\":[\"summary not serialisable: {error}\"]}}")
            }
        }
    }
}

/// The table, then the failures, the excerpts of the splats behind them
/// and the reproduce line.
pub fn table(summary: &Summary) -> String {
    let mut out = String::new();
    let mut rows: Vec<(&str, String)> = vec![
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
        ("round trip µs", summary.rtt_us.one_line()),
        (
            "premature signals",
            if summary.write_checks == 0 {
                "not checked (no WRITE read-backs)".into()
            } else if summary.premature_signals == 0 {
                format!("none in {} read-backs", summary.write_checks)
            } else {
                format!(
                    "{} in {} read-backs (first fences: {})",
                    summary.premature_signals,
                    summary.write_checks,
                    join_numbers(&summary.premature_fences)
                )
            },
        ),
        ("backend", backend_cost(summary)),
        (
            "device fences",
            match summary.backend {
                Backend::Fencelab => device_fences(summary.device.as_ref()),
                peer => format!("not counted by {}", peer.name()),
            },
        ),
        (
            "findings",
            if summary.findings.is_empty() {
                "none".into()
            } else {
                summary
                    .findings
                    .iter()
                    .map(|f| format!("{} ×{}: {}", f.kind, f.count, f.detail))
                    .collect::<Vec<_>>()
                    .join("\n")
            },
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
                "{} (config {}, cache key {})",
                summary.kernel.release,
                short(&summary.kernel.config_sha256),
                summary.kernel.cache_key
            ),
        ),
        ("accel", format!("{:?}", summary.accel).to_lowercase()),
        (
            "faults",
            match (&summary.plan, &summary.latency) {
                _ if summary.backend != Backend::Fencelab => {
                    format!(
                        "none ({} completes every fence at once)",
                        summary.backend.name()
                    )
                }
                (Some(plan), _) => format!("plan {}", plan.display()),
                (None, Some(latency)) => format!("fixed latency {latency}"),
                (None, None) => "-".into(),
            },
        ),
        (
            "seed",
            summary.seed.map_or("-".into(), |seed| seed.to_string()),
        ),
        (
            "trace",
            summary
                .trace
                .as_ref()
                .map_or("-".into(), |t| t.display().to_string()),
        ),
        ("run folder", summary.run_dir.display().to_string()),
        ("reproduce", summary.reproduce.clone()),
    ];
    if !summary.early_boot_stalls.is_empty() {
        let stalls: Vec<String> = summary
            .early_boot_stalls
            .iter()
            .map(|s| {
                format!(
                    "kernel silent after console line {} ({}), booted again; {}",
                    s.after_line,
                    s.last_line,
                    s.run_dir.display()
                )
            })
            .collect();
        rows.push(("early-boot stalls", stalls.join("\n")));
    }
    if !summary.latency_by_timeline.is_empty() {
        let at = rows
            .iter()
            .position(|(k, _)| *k == "boot → result")
            .unwrap_or(rows.len());
        let mut lines: Vec<String> = summary
            .latency_by_timeline
            .iter()
            .map(|t| format!("{}: {}", t.timeline, t.one_line()))
            .collect();
        if let Some(svg) = &summary.latency_svg {
            lines.push(format!("histograms: {}", svg.display()));
        }
        rows.insert(at, ("latency by timeline", lines.join("\n")));
    }
    if let Some(unload) = &summary.unload {
        let at = rows
            .iter()
            .position(|(k, _)| *k == "device fences")
            .unwrap_or(rows.len());
        rows.insert(at, ("unload", unload.lines()));
    }
    let width = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    for (key, value) in rows {
        let mut lines = value.lines();
        out.push_str(&format!("{key:>width$}  {}\n", lines.next().unwrap_or("")));
        for more in lines {
            out.push_str(&format!("{:>width$}  {more}\n", ""));
        }
    }
    for failure in &summary.failures {
        out.push_str(&format!("FAILURE: {failure}\n"));
    }
    for splat in failed_splats(summary) {
        out.push_str(&splat_excerpt(splat, PRINTED_EXCERPT_LINES));
    }
    if !summary.failures.is_empty() {
        // Last, where a reader of a failed run looks first.
        out.push_str(&format!("reproduce: {}\n", summary.reproduce));
    }
    out
}

/// Lines of a splat's excerpt the table shows under the failures
/// (`report.json` and `junit.xml` carry all of them).
pub const PRINTED_EXCERPT_LINES: usize = 15;

/// The splats that made the run fail (a `kernel splat:` failure names each).
pub fn failed_splats(summary: &Summary) -> impl Iterator<Item = &Splat> {
    summary.splat_details.iter().filter(|splat| {
        let named = splat.summary();
        summary.failures.iter().any(|f| f.contains(&named))
    })
}

/// A splat as a block of text: its summary, signature and the first
/// `max_lines` lines of its excerpt, indented.
pub fn splat_excerpt(splat: &Splat, max_lines: usize) -> String {
    let mut out = format!(
        "splat {}\n  signature: {}\n",
        splat.summary(),
        splat.signature()
    );
    for line in splat.excerpt.iter().take(max_lines) {
        out.push_str(&format!("  | {line}\n"));
    }
    if splat.excerpt.len() > max_lines {
        out.push_str(&format!(
            "  | … {} more lines in the run folder's console.log\n",
            splat.excerpt.len() - max_lines
        ));
    }
    out
}

/// The backend's name and what the run cost it: CPU time (in all, and from
/// the workload's start per 1000 signaled fences) and peak memory.
fn backend_cost(summary: &Summary) -> String {
    let name = summary.backend.name();
    let Some(usage) = summary.backend_usage else {
        return format!("{name} (cost not measured)");
    };
    let workload = match (usage.cpu_ms_after_mark, per_1000_fences(summary)) {
        (Some(after), Some(per_1000)) => format!(
            ", {after:.0} ms of it from the workload's start: {per_1000:.1} ms per 1000 fences;"
        ),
        _ => ",".into(),
    };
    format!(
        "{name}: cpu {:.0} ms{workload} peak RSS {} KiB",
        usage.cpu_ms, usage.max_rss_kib
    )
}

/// The backend's CPU time from the workload's start per 1000 signaled
/// fences, in ms.
pub fn per_1000_fences(summary: &Summary) -> Option<f64> {
    let after = summary.backend_usage?.cpu_ms_after_mark?;
    (summary.fences_signaled > 0).then(|| after * 1000.0 / summary.fences_signaled as f64)
}

/// What the device says it did with the workload's fences (`SUBMIT_3D`)
/// and with all fenced commands.
fn device_fences(device: Option<&DeviceSummary>) -> String {
    let Some(d) = device else {
        return "no summary".into();
    };
    let all = d.accounting.map_or_else(
        || {
            format!(
                "{} submitted, {} completed",
                d.fences_submitted, d.fences_completed
            )
        },
        |a| a.one_line(),
    );
    match d.submit_3d() {
        Some(s) => format!("SUBMIT_3D: {}\nall fenced commands: {all}", s.one_line()),
        None => all,
    }
}

fn join_numbers(numbers: &[u64]) -> String {
    numbers
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::console;

    /// A failed run: a real KASAN report on the console (a fixture of the
    /// splat parser) and a fence that never signaled; no trace.
    pub fn failed_summary(run_dir: &Path) -> Summary {
        let fixture = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/splats/kasan-slab-use-after-free.log"),
        )
        .unwrap();
        let log = fixture.split_once("\n# ---\n").unwrap().1;
        let console = console::parse(&format!("FENCELAB_WORKLOAD_START workload=smoke\n{log}"));
        let failures = vec![
            format!("kernel splat: {}", console.splats[0].summary()),
            "fences signaled 1999 of 2000".to_owned(),
        ];
        Summary {
            ok: false,
            workload: "smoke".into(),
            fences_submitted: 2000,
            fences_signaled: 1999,
            fence_errors: 0,
            fence_timeouts: 1,
            out_of_order: 0,
            fences_per_s: 900.0,
            rtt_us: RttUs::default(),
            premature_signals: 0,
            premature_fences: vec![],
            write_checks: 0,
            unload: None,
            splats: console.splats.iter().map(Splat::summary).collect(),
            splat_details: console.splats,
            backend: Backend::Fencelab,
            backend_usage: Some(ResourceUsage {
                cpu_ms: 500.0,
                cpu_ms_after_mark: Some(200.0),
                max_rss_kib: 9000,
            }),
            boot_to_workload_ms: Some(30_000),
            boot_to_result_ms: Some(31_500),
            prepare_secs: 2.5,
            kernel: KernelInfo {
                release: "7.3.4".into(),
                config_sha256: "c0ffee".into(),
                cache_key: "k3y".into(),
            },
            guest_release: Some("7.3.4".into()),
            guest_config: BTreeMap::new(),
            accel: Accel::Tcg,
            latency: None,
            plan: Some(PathBuf::from("device/plans/reorder.toml")),
            seed: Some(7),
            trace: None,
            device: None,
            qemu_exit: Some(0),
            run_dir: run_dir.to_path_buf(),
            reproduce: "cargo xtask boot --plan device/plans/reorder.toml --seed 7".into(),
            findings: vec![Finding {
                kind: "premature_signal".into(),
                count: 2,
                fences: vec![3, 4],
                detail: "signaled before the device completed".into(),
            }],
            failures,
            early_boot_stalls: vec![],
            guest: None,
            latency_by_timeline: vec![],
            latency_svg: None,
        }
    }

    #[test]
    fn a_failed_run_shows_its_splat_excerpt_cache_key_and_reproduce_line_last() {
        let mut summary = failed_summary(Path::new("/runs/1-smoke"));
        summary.latency_by_timeline = vec![TimelineLatency {
            timeline: "2.0".into(),
            fences: 2000,
            unfinished: 0,
            flushed: 0,
            injected_p50_us: Some(2000.0),
            injected_p99_us: Some(2000.0),
            observed_p50_us: Some(2400.0),
            observed_p99_us: Some(3900.0),
            max_error_us: Some(1900.0),
        }];
        summary.latency_svg = Some(PathBuf::from("/runs/1-smoke/latency.svg"));
        let table = table(&summary);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines.last(),
            Some(&"reproduce: cargo xtask boot --plan device/plans/reorder.toml --seed 7")
        );
        assert!(
            table.contains("7.3.4 (config c0ffee, cache key k3y)"),
            "{table}"
        );
        assert!(table.contains("FAILURE: fences signaled 1999 of 2000"));
        assert!(
            table.contains(
                "fencelab-device: cpu 500 ms, 200 ms of it from the workload's start: 100.1 ms per 1000 fences; peak RSS 9000 KiB"
            ),
            "{table}"
        );
        assert!(table.contains(
            "  signature: kasan: KASAN: slab-use-after-free Read in __list_add_valid_or_report"
        ));
        let excerpt: Vec<&&str> = lines.iter().filter(|l| l.starts_with("  | ")).collect();
        assert_eq!(excerpt.len(), PRINTED_EXCERPT_LINES + 1, "{table}");
        assert_eq!(
            excerpt[0],
            &"  | =================================================================="
        );
        assert!(
            excerpt[PRINTED_EXCERPT_LINES].contains("25 more lines"),
            "{table}"
        );
        assert!(table.contains(
            "2.0: 2000 fences · injected p50 2 ms / p99 2 ms · observed p50 2.4 ms / p99 3.9 ms · max error 1.9 ms"
        ));
        assert!(table.contains("histograms: /runs/1-smoke/latency.svg"));

        summary.failures.clear();
        let passing = super::table(&summary);
        assert!(!passing.contains("  | "), "no excerpt without a failure");
        assert_eq!(
            passing.matches("reproduce").count(),
            1,
            "only the table row"
        );
    }

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
        let guest: ResultLine = serde_json::from_str(line).unwrap();
        assert!(guest.ok);
        assert_eq!(guest.fences_signaled, 2000);
        assert_eq!(guest.rtt_us.p99, Some(2100));
        assert_eq!(guest.unload, None);
        assert_eq!((guest.premature_signals, guest.write_checks), (0, 0));
    }

    #[test]
    fn guest_result_line_with_read_backs_parses() {
        let line = r#"{"workload":"smoke","fences_submitted":10,"fences_signaled":9,
            "fence_errors":1,"premature_signals":2,"premature_fences":[3,4],
            "write_checks":9,"submit_failures":1,"ok":false}"#;
        let guest: ResultLine = serde_json::from_str(line).unwrap();
        assert_eq!(guest.premature_signals, 2);
        assert_eq!(guest.premature_fences, vec![3, 4]);
        assert_eq!(guest.write_checks, 9);
        assert_eq!(guest.fences_sent(), 9);
    }

    #[test]
    fn a_setup_error_line_without_a_workload_parses() {
        let line = r#"{"workload":null,"device":null,"driver":null,"fences_submitted":0,
            "fences_signaled":0,"fence_errors":0,"fence_timeouts":0,"out_of_order":0,
            "elapsed_ms":0.0,"fences_per_s":0.0,"rtt_us":{"p50":null,"p99":null,"max":null},
            "first_error":"usage: unexpected argument '--bogus' found","timeline_name":null,
            "premature_signals":0,"premature_fences":[],"write_checks":0,"submit_failures":0,
            "ok":false}"#;
        let guest: ResultLine = serde_json::from_str(line).unwrap();
        assert_eq!(guest.workload, None);
        assert!(!guest.ok);
        assert!(guest.first_error.unwrap().starts_with("usage:"));
        let no_counts = serde_json::from_str::<ResultLine>(r#"{"workload":"smoke","ok":true}"#);
        assert!(
            no_counts.is_err(),
            "a line without fence counts is not a result"
        );
    }

    #[test]
    fn null_round_trips_parse_as_not_measured() {
        let line = r#"{"workload":"smoke","fences_submitted":3,"fences_signaled":0,
            "fence_errors":0,"fence_timeouts":3,
            "rtt_us":{"p50":null,"p99":null,"max":null},"ok":false}"#;
        let guest: ResultLine = serde_json::from_str(line).unwrap();
        assert_eq!(guest.rtt_us, RttUs::default());
        assert_eq!(guest.rtt_us.one_line(), "p50 - · p99 - · max -");
        let partial: RttUs = serde_json::from_str(r#"{"p50":7}"#).unwrap();
        assert_eq!(partial.one_line(), "p50 7 · p99 - · max -");
    }

    #[test]
    fn the_unload_object_parses_tolerantly() {
        let line = r#"{"workload":"unload-live","fences_submitted":2000,"fences_signaled":2000,
            "fence_errors":0,"rtt_us":{"p50":900,"p99":2100,"max":5000},
            "unload":{"rounds":10,"pending_at_rmmod":{"min":180,"max":199,"total":1900},
              "completed_before_rmmod":120,"cut_off_enodev":1880,"other_errors":0,
              "unsignaled_after_rmmod":0,"deadlines_set":1000,
              "rmmod_ms":{"p50":3.5,"p99":9.25,"max":9.25},
              "load_to_first_submit_ms":{"p50":null,"p99":null,"max":null},
              "driver":{"ordering_violations":4,"timeouts":0,"hints_sent":1000,"hints_dropped":0},
              "a_key_from_the_future":1},
            "ok":true}"#;
        let guest: ResultLine = serde_json::from_str(line).unwrap();
        let u = guest.unload.clone().unwrap();
        assert_eq!(u.rounds, 10);
        assert_eq!(u.pending_at_rmmod.total, 1900);
        assert_eq!(u.cut_off_enodev, 1880);
        assert_eq!(u.rmmod_ms.p99, Some(9.25));
        assert_eq!(u.load_to_first_submit_ms.p50, None);
        assert_eq!(u.driver.ordering_violations, 4);

        let sparse: UnloadReport = serde_json::from_str(r#"{"rounds":2}"#).unwrap();
        assert_eq!((sparse.rounds, sparse.cut_off_enodev), (2, 0));
        assert_eq!(sparse.pending_at_rmmod.min, None);
    }

    #[test]
    fn the_seed_comes_from_the_device_start_line() {
        let dir = std::env::temp_dir().join(format!("fencelab-seed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("device.log");
        std::fs::write(
            &log,
            "INFO listening\nfencelab-device: seed 12345678901\nfencelab-device: seed 1\n",
        )
        .unwrap();
        assert_eq!(seed_from_log(&log), Some(12_345_678_901));
        std::fs::write(&log, "fencelab-device: seed x\n").unwrap();
        assert_eq!(seed_from_log(&log), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn device_accounting_reads_flushed_and_tolerates_its_absence() {
        let old: DeviceSummary = serde_json::from_str(
            r#"{"fences_submitted":3,"fences_completed":3,
                "accounting":{"submitted":3,"completed":3,"errored":1},
                "accounting_by_command":{"SUBMIT_3D":{"submitted":3,"completed":3}}}"#,
        )
        .unwrap();
        assert_eq!(old.accounting.unwrap().flushed, 0);
        assert_eq!(old.accounting.unwrap().errored, 1);
        let new: DeviceSummary = serde_json::from_str(
            r#"{"fences_submitted":3,"fences_completed":3,
                "accounting_by_command":{"SUBMIT_3D":{"submitted":3,"completed":3,"flushed":2}},
                "timelines":{"1.0":{"submitted":3,"completed":3,"flushed":2}}}"#,
        )
        .unwrap();
        assert_eq!(new.submit_3d().unwrap().flushed, 2);
        assert_eq!(new.timelines["1.0"].flushed, 2);
        assert!(device_fences(Some(&new)).contains("2 flushed early"));
    }
}
