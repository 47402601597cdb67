//! The benchmarks without a guest: criterion's decoder and scheduler
//! benches (`device/benches/{decoder,scheduler}.rs`) and the backend's
//! memory and CPU over a million fences (`device/benches/memory.rs`).

use super::{BenchArgs, Figures};
use crate::cmd::{self, Logged};
use crate::paths;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

/// One criterion benchmark's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CriterionFigure {
    /// `group/function`, e.g. `scheduler/10k_pending`.
    pub id: String,
    /// Median time of one iteration, in ns.
    pub median_ns: f64,
    /// Elements (commands, fences) per second at the median, when the bench
    /// declares its throughput.
    pub per_s: Option<f64>,
}

/// `device/benches/memory.rs`'s JSON line (the keys xtask reads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryFigures {
    pub fences_small: u64,
    pub fences_large: u64,
    pub rss_kib_after_small: u64,
    pub rss_kib_after_large: u64,
    pub rss_growth_kib: i64,
    pub cpu_ms_per_1000_fences: f64,
    pub backend_cpu_ms_per_1000_fences: f64,
    pub wall_s: f64,
    pub fences_per_s: f64,
    /// Where the backend's trace went: `file` or `none`.
    pub trace: String,
}

/// The criterion benches xtask runs, by `cargo bench --bench` name.
const CRITERION_BENCHES: [&str; 2] = ["decoder", "scheduler"];

pub fn run_all(args: &BenchArgs, figures: &mut Figures) -> Result<()> {
    eprintln!(
        "bench: criterion ({}; {} s per benchmark)",
        CRITERION_BENCHES.join(", "),
        args.measurement_secs
    );
    match criterion(args.measurement_secs) {
        Ok(found) => figures.criterion = found,
        Err(error) => figures
            .unavailable
            .push(format!("criterion benches: {error:#}")),
    }
    eprintln!("bench: memory: a million fences through the backend in-process");
    match memory() {
        Ok(memory) => {
            figures.rss_growth_kib = Some(memory.rss_growth_kib);
            figures.memory = Some(memory);
        }
        Err(error) => figures.unavailable.push(format!("memory bench: {error:#}")),
    }
    Ok(())
}

fn cargo_bench() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args(["bench", "--package", "fencelab-device"])
        .current_dir(paths::workspace_root());
    command
}

fn criterion(measurement_secs: u64) -> Result<Vec<CriterionFigure>> {
    // File times come from a coarser clock than SystemTime::now(): a file
    // written just after this line can carry an earlier time. Leftovers of
    // earlier runs are older than a few seconds.
    let started = SystemTime::now() - Duration::from_secs(2);
    let mut command = cargo_bench();
    for bench in CRITERION_BENCHES {
        command.args(["--bench", bench]);
    }
    command.args([
        "--",
        "--warm-up-time",
        "1",
        "--measurement-time",
        &measurement_secs.to_string(),
        "--noplot",
    ]);
    let log = paths::runs_dir().join("bench-criterion.log");
    let logged = Logged {
        every: Some(Duration::from_secs(20)),
        ..Logged::new("bench: cargo bench (criterion)", &log)
    };
    cmd::run_logged(command, &logged)?;
    let root = paths::target_dir().join("criterion");
    let found = read_criterion(&root, started)?;
    if found.is_empty() {
        bail!(
            "cargo bench ran but wrote no results under {} (log {})",
            root.display(),
            log.display()
        );
    }
    Ok(found)
}

/// Every benchmark under `root` whose `new/` results were written at or
/// after `since` (older ones are earlier runs' leftovers), sorted by id.
pub fn read_criterion(root: &Path, since: SystemTime) -> Result<Vec<CriterionFigure>> {
    let mut found = Vec::new();
    for dir in new_result_dirs(root)? {
        let estimates = dir.join("estimates.json");
        let fresh = std::fs::metadata(&estimates)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t >= since);
        if fresh {
            found.push(read_one(&dir)?);
        }
    }
    found.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(found)
}

/// The `new` folders below `root` (criterion nests them by group, function
/// and parameter).
fn new_result_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(out);
    };
    for entry in entries {
        let path = entry
            .with_context(|| format!("reading {}", root.display()))?
            .path();
        if !path.is_dir() {
            continue;
        }
        if path.file_name().is_some_and(|n| n == "new") {
            out.push(path);
        } else if path.file_name().is_some_and(|n| n != "report") {
            out.extend(new_result_dirs(&path)?);
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
struct Benchmark {
    full_id: String,
    /// `{"Elements": n}`, `{"Bytes": n}`… or null.
    throughput: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Estimates {
    median: Estimate,
}

#[derive(Deserialize)]
struct Estimate {
    point_estimate: f64,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn read_one(dir: &Path) -> Result<CriterionFigure> {
    let bench: Benchmark = read_json(&dir.join("benchmark.json"))?;
    let estimates: Estimates = read_json(&dir.join("estimates.json"))?;
    let median_ns = estimates.median.point_estimate;
    let elements = bench
        .throughput
        .as_ref()
        .and_then(|t| t.get("Elements"))
        .and_then(serde_json::Value::as_u64);
    let per_s = elements
        .filter(|_| median_ns > 0.0)
        .map(|n| n as f64 * 1e9 / median_ns);
    Ok(CriterionFigure {
        id: bench.full_id,
        median_ns,
        per_s,
    })
}

fn memory() -> Result<MemoryFigures> {
    let mut command = cargo_bench();
    command
        .args(["--bench", "memory"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let output = command
        .output()
        .context("running cargo bench --bench memory")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "cargo bench --bench memory failed ({}); its errors are above",
            output.status
        );
    }
    parse_memory_line(&stdout)
}

/// The memory bench's figures: the last line of its stdout.
fn parse_memory_line(stdout: &str) -> Result<MemoryFigures> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("the memory bench printed nothing on stdout")?;
    serde_json::from_str(line)
        .with_context(|| format!("the memory bench's last line is not its figures: {line}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// Writes one criterion result folder (`benchmark.json` and
    /// `estimates.json`) at `dir`; returns the estimates file.
    fn criterion_result(dir: &Path, benchmark: &str, estimates: &str) -> PathBuf {
        write(&dir.join("benchmark.json"), benchmark);
        let estimates_file = dir.join("estimates.json");
        write(&estimates_file, estimates);
        estimates_file
    }

    #[test]
    fn criterion_results_are_read_by_id_with_their_throughput_and_old_ones_skipped() {
        let root = std::env::temp_dir().join(format!("fencelab-criterion-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let old = criterion_result(
            &root.join("decode/old_bench/new"),
            r#"{"full_id":"decode/old_bench","throughput":null}"#,
            r#"{"median":{"point_estimate":1.0}}"#,
        );
        let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(old)
            .unwrap()
            .set_modified(an_hour_ago)
            .unwrap();
        let since = an_hour_ago + Duration::from_secs(60);
        criterion_result(
            &root.join("scheduler/10k_pending/new"),
            r#"{"group_id":"scheduler","function_id":"10k_pending","full_id":"scheduler/10k_pending","throughput":{"Elements":1}}"#,
            r#"{"mean":{"point_estimate":300.0},"median":{"point_estimate":250.0}}"#,
        );
        criterion_result(
            &root.join("decode/short/new"),
            r#"{"full_id":"decode/short","throughput":null}"#,
            r#"{"median":{"point_estimate":40.0}}"#,
        );
        // criterion's HTML report folders are not results.
        write(&root.join("report/new/estimates.json"), "not json");

        let found = read_criterion(&root, since).unwrap();
        assert_eq!(
            found,
            [
                CriterionFigure {
                    id: "decode/short".into(),
                    median_ns: 40.0,
                    per_s: None
                },
                CriterionFigure {
                    id: "scheduler/10k_pending".into(),
                    median_ns: 250.0,
                    per_s: Some(4_000_000.0)
                },
            ]
        );
        std::fs::remove_dir_all(&root).unwrap();
        assert!(read_criterion(&root, since).unwrap().is_empty());
    }

    #[test]
    fn the_memory_figures_are_the_last_stdout_line() {
        let stdout = "warming up\n{\"fences_small\":10000,\"fences_large\":1000000,\"rss_kib_after_small\":9000,\"rss_kib_after_large\":9100,\"rss_growth_kib\":100,\"cpu_ms_per_1000_fences\":5.5,\"backend_cpu_ms_per_1000_fences\":3.25,\"wall_s\":40.0,\"fences_per_s\":25000.0,\"trace\":\"file\",\"in_flight\":64,\"threads\":[\"a\"]}\n\n";
        let m = parse_memory_line(stdout).unwrap();
        assert_eq!((m.rss_growth_kib, m.trace.as_str()), (100, "file"));
        assert_eq!(m.backend_cpu_ms_per_1000_fences, 3.25);
        let err = format!("{:#}", parse_memory_line("oops\n").unwrap_err());
        assert!(
            err.starts_with("the memory bench's last line is not its figures: oops"),
            "{err}"
        );
        assert!(parse_memory_line("").is_err());
    }
}
