//! The files a run leaves in its folder for machines and CI: `report.json`
//! (the summary, latency figures included), `junit.xml` (one test case for
//! the run) and `latency.svg` (the trace's latency histograms).

use crate::junit;
use crate::latency::{Latencies, TimelineLatency};
use crate::latency_plot;
use crate::report::{self, Summary};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// What [`write_run_reports`] wrote.
#[derive(Debug)]
pub struct RunReports {
    pub report_json: PathBuf,
    pub junit_xml: PathBuf,
    /// `None` when the run left no readable trace (see `latency_note`).
    pub latency_svg: Option<PathBuf>,
    pub latency: Vec<TimelineLatency>,
    /// Why there are no latency figures, when there are none.
    pub latency_note: Option<String>,
}

impl RunReports {
    /// Puts the latency figures and the SVG's path into `summary`, so the
    /// table and `--json` show what `report.json` has.
    pub fn attach(&self, summary: &mut Summary) {
        summary.latency_by_timeline = self.latency.clone();
        summary.latency_svg = self.latency_svg.clone();
    }
}

/// Writes `report.json`, `junit.xml` and `latency.svg` into the run folder
/// of `summary`. A missing or unreadable trace costs only the latency
/// figures (the reason is in `latency_note` and in `report.json`); failing
/// to write a file is an error.
pub fn write_run_reports(summary: &Summary) -> Result<RunReports> {
    let dir = &summary.run_dir;
    let (latency, latency_svg, latency_note) = latency_figures(summary, dir);

    let report_json = dir.join("report.json");
    let mut json = serde_json::to_value(summary).context("serialising the run summary")?;
    if let Some(object) = json.as_object_mut() {
        object.insert(
            "latency_by_timeline".into(),
            serde_json::to_value(&latency).context("serialising the latency figures")?,
        );
        object.insert(
            "latency_svg".into(),
            serde_json::to_value(&latency_svg).context("serialising the SVG path")?,
        );
        object.insert("latency_note".into(), latency_note.clone().into());
    }
    let text = serde_json::to_string_pretty(&json).context("serialising the run summary")?;
    std::fs::write(&report_json, text + "\n")
        .with_context(|| format!("writing {}", report_json.display()))?;

    let junit_xml = dir.join("junit.xml");
    junit::write(
        &junit_xml,
        "fencelab boot",
        &[junit_case(summary, &latency)],
    )?;

    Ok(RunReports {
        report_json,
        junit_xml,
        latency_svg,
        latency,
        latency_note,
    })
}

/// The trace's figures and `latency.svg`, or why there are none.
fn latency_figures(
    summary: &Summary,
    dir: &Path,
) -> (Vec<TimelineLatency>, Option<PathBuf>, Option<String>) {
    let trace = summary
        .trace
        .clone()
        .unwrap_or_else(|| dir.join("trace.jsonl"));
    if !trace.exists() {
        return (
            Vec::new(),
            None,
            Some(format!("no trace at {}", trace.display())),
        );
    }
    let svg = dir.join("latency.svg");
    let title = format!(
        "fence latency by timeline · {} · {}",
        summary.workload,
        dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned()
        )
    );
    let drawn = Latencies::from_trace(&trace).and_then(|latencies| {
        latency_plot::write_svg(&latencies, &title, &svg)?;
        Ok(latencies.figures())
    });
    match drawn {
        Ok(figures) => (figures, Some(svg), None),
        Err(error) => {
            let note = format!("no latency figures: {error:#}");
            eprintln!("warning: {note}");
            (Vec::new(), None, Some(note))
        }
    }
}

/// The run as one test case: failed with every failure, the splats'
/// excerpts and the reproduce line; its facts in `system-out` either way.
fn junit_case(summary: &Summary, latency: &[TimelineLatency]) -> junit::Case {
    let name = match &summary.plan {
        Some(plan) => format!(
            "{} [{}]",
            summary.workload,
            plan.file_stem().map_or_else(
                || plan.display().to_string(),
                |s| s.to_string_lossy().into_owned()
            )
        ),
        None => summary.workload.clone(),
    };
    let reproduce = format!(
        "reproduce: {}\nkernel: {} (cache key {})\nrun folder: {}\n",
        summary.reproduce,
        summary.kernel.release,
        summary.kernel.cache_key,
        summary.run_dir.display()
    );
    let outcome = match summary.failures.first() {
        None => junit::Outcome::Passed,
        Some(first) => {
            let mut text = String::new();
            for failure in &summary.failures {
                text.push_str(&format!("FAILURE: {failure}\n"));
            }
            for splat in report::failed_splats(summary) {
                text.push('\n');
                text.push_str(&report::splat_excerpt(splat, usize::MAX));
            }
            text.push('\n');
            text.push_str(&reproduce);
            junit::Outcome::Failed {
                message: first.clone(),
                text,
            }
        }
    };
    let mut out = String::new();
    for finding in &summary.findings {
        out.push_str(&format!(
            "finding: {} ×{}: {}\n",
            finding.kind, finding.count, finding.detail
        ));
    }
    for timeline in latency {
        out.push_str(&format!(
            "latency {}: {}\n",
            timeline.timeline,
            timeline.one_line()
        ));
    }
    out.push_str(&reproduce);
    junit::Case {
        name,
        classname: "fencelab.boot".into(),
        time_secs: summary.prepare_secs
            + summary
                .boot_to_result_ms
                .map_or(0.0, |ms| ms as f64 / 1000.0),
        outcome,
        system_out: Some(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::junit::tests::parse;
    use crate::latency::tests::synthetic_trace;
    use crate::report::tests::failed_summary;

    /// The failed sample run of `report::tests`, in `dir`, with the
    /// synthetic trace when `with_trace`.
    fn failed_run(dir: &Path, with_trace: bool) -> Summary {
        std::fs::create_dir_all(dir).unwrap();
        let mut summary = failed_summary(dir);
        if with_trace {
            let trace = dir.join("trace.jsonl");
            std::fs::write(&trace, synthetic_trace()).unwrap();
            summary.trace = Some(trace);
        }
        summary
    }

    fn temp_dir(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("fencelab-run-report-{name}-{}", std::process::id()))
    }

    #[test]
    fn a_failed_run_leaves_json_junit_and_svg() {
        let dir = temp_dir("failed");
        let mut summary = failed_run(&dir, true);
        let reports = write_run_reports(&summary).unwrap();

        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&reports.report_json).unwrap()).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["seed"], 7);
        assert_eq!(json["latency_by_timeline"][0]["timeline"], "1.0");
        assert_eq!(json["latency_by_timeline"][1]["fences"], 201);
        assert_eq!(
            json["splat_details"][0]["signature"],
            "kasan: KASAN: slab-use-after-free Read in __list_add_valid_or_report"
        );
        assert!(json["latency_note"].is_null());

        let root = parse(&std::fs::read_to_string(&reports.junit_xml).unwrap());
        let suite = root.child("testsuite").unwrap();
        assert_eq!((suite.attr("tests"), suite.attr("failures")), ("1", "1"));
        let case = suite.child("testcase").unwrap();
        assert_eq!(case.attr("name"), "smoke [reorder]");
        assert_eq!(case.attr("time"), "34.000");
        let failure = case.child("failure").unwrap();
        assert!(
            failure
                .attr("message")
                .starts_with("kernel splat: [kasan] BUG: KASAN")
        );
        for wanted in [
            "FAILURE: fences signaled 1999 of 2000",
            "signature: kasan: KASAN: slab-use-after-free Read in __list_add_valid_or_report",
            "| Read of size 8 at addr ffff888012acfc20 by task syz-executor311/9489",
            "reproduce: cargo xtask boot --plan device/plans/reorder.toml --seed 7",
            "kernel: 7.3.4 (cache key k3y)",
        ] {
            assert!(
                failure.text.contains(wanted),
                "no {wanted:?} in\n{}",
                failure.text
            );
        }
        let out = &case.child("system-out").unwrap().text;
        assert!(out.contains("finding: premature_signal ×2"), "{out}");
        assert!(out.contains("latency 1.0: 1000 fences"), "{out}");

        let svg = reports.latency_svg.clone().unwrap();
        assert_eq!(svg, dir.join("latency.svg"));
        assert_eq!(parse(&std::fs::read_to_string(&svg).unwrap()).name, "svg");

        reports.attach(&mut summary);
        assert_eq!(summary.latency_by_timeline.len(), 2);
        assert_eq!(summary.latency_svg, Some(svg));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_trace_costs_only_the_latency_figures() {
        let dir = temp_dir("no-trace");
        let mut summary = failed_run(&dir, false);
        summary.failures.clear();
        summary.ok = true;
        let reports = write_run_reports(&summary).unwrap();
        assert!(reports.latency.is_empty() && reports.latency_svg.is_none());
        assert!(
            reports
                .latency_note
                .as_deref()
                .unwrap()
                .starts_with("no trace at")
        );
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&reports.report_json).unwrap()).unwrap();
        assert!(
            json["latency_note"]
                .as_str()
                .unwrap()
                .starts_with("no trace at")
        );
        let case = parse(&std::fs::read_to_string(&reports.junit_xml).unwrap());
        let case = case.child("testsuite").unwrap().child("testcase").unwrap();
        assert!(case.child("failure").is_none());
        assert!(
            case.child("system-out")
                .unwrap()
                .text
                .contains("reproduce: cargo xtask boot")
        );

        // A corrupt trace: still a report, with the reason.
        std::fs::write(
            dir.join("trace.jsonl"),
            "{\"event\":\"decide\"}\ngarbage\n{}\n",
        )
        .unwrap();
        let reports = write_run_reports(&summary).unwrap();
        assert!(reports.latency_svg.is_none());
        assert!(
            reports
                .latency_note
                .as_deref()
                .unwrap()
                .contains("trace.jsonl:2: not a trace event"),
            "{:?}",
            reports.latency_note
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_run_folder_is_an_error_naming_the_file() {
        let dir = temp_dir("gone").join("missing");
        let mut summary = failed_run(&temp_dir("gone"), false);
        summary.run_dir = dir.clone();
        let err = write_run_reports(&summary).unwrap_err();
        assert!(format!("{err:#}").contains("report.json"), "{err:#}");
        std::fs::remove_dir_all(temp_dir("gone")).unwrap();
    }
}
