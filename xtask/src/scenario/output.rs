//! Reporting scenario runs: a line per run while they go, a table at the
//! end, `report.json` and `junit.xml` in the invocation's report folder.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

use super::judge::Verdict;
use super::run::Outcome;
use super::spec::Scenario;
use crate::junit;

/// `--list`: name, drivers, what it hammers.
pub fn list_line(scenario: &Scenario) -> String {
    let drivers: Vec<String> = scenario
        .drivers
        .iter()
        .map(|(key, spec)| match &spec.unsupported {
            None => key.clone(),
            Some(_) => format!("({key}: unsupported)"),
        })
        .collect();
    format!(
        "{:<20} {:<36} {}",
        scenario.name,
        drivers.join(" "),
        scenario.hammers
    )
}

fn verdict_word(outcome: &Outcome) -> String {
    match (&outcome.bug, outcome.verdict) {
        (Some(bug), _) if bug.caught_by.is_some() => "BUG CAUGHT".into(),
        (Some(_), Verdict::Fail) => "FAIL (bug not caught by its splat)".into(),
        (Some(_), _) => "BUG MISSED".into(),
        (None, Verdict::Pass) => "PASS".into(),
        (None, Verdict::DriverFindings) => {
            let kinds: Vec<String> = outcome
                .driver_findings
                .iter()
                .map(|f| format!("{} ×{}", f.kind, f.count))
                .collect();
            format!("PASS with driver findings: {}", kinds.join(", "))
        }
        (None, Verdict::Fail) => "FAIL".into(),
        (None, Verdict::Unsupported) => "UNSUPPORTED".into(),
    }
}

/// One line per finished run.
pub fn one_line(outcome: &Outcome) -> String {
    let mut line = format!(
        "{} on {}: {}",
        outcome.scenario,
        outcome.driver,
        verdict_word(outcome)
    );
    match outcome.verdict {
        Verdict::Unsupported => line.push_str(&format!(" ({})", outcome.reasons.join("; "))),
        _ => line.push_str(&format!(
            " ({} of {} fences signaled, {:.0} s)",
            outcome.fences_signaled, outcome.fences_submitted, outcome.seconds
        )),
    }
    line
}

/// The report files of one invocation.
pub struct ReportFiles {
    pub json: PathBuf,
    pub junit: PathBuf,
}

/// Writes `report.json` (every outcome) and `junit.xml` (a test case per
/// scenario × driver) into `dir`.
pub fn write_reports(dir: &Path, outcomes: &[Outcome]) -> Result<ReportFiles> {
    let json = dir.join("report.json");
    let text = serde_json::to_string_pretty(&serde_json::json!({ "runs": outcomes }))?;
    std::fs::write(&json, text).with_context(|| format!("writing {}", json.display()))?;
    let junit = dir.join("junit.xml");
    let cases: Vec<junit::Case> = outcomes.iter().map(junit_case).collect();
    junit::write(&junit, "fencelab scenarios", &cases)?;
    Ok(ReportFiles { json, junit })
}

fn junit_case(outcome: &Outcome) -> junit::Case {
    let details = details(outcome);
    let outcome_kind = match outcome.verdict {
        Verdict::Unsupported => junit::Outcome::Skipped {
            message: outcome.reasons.join("; "),
        },
        Verdict::Fail => junit::Outcome::Failed {
            message: outcome
                .reasons
                .first()
                .cloned()
                .unwrap_or_else(|| "failed".into()),
            text: details.clone(),
        },
        Verdict::Pass | Verdict::DriverFindings => junit::Outcome::Passed,
    };
    junit::Case {
        name: outcome.scenario.clone(),
        classname: format!("scenario.{}", outcome.driver),
        time_secs: outcome.seconds,
        outcome: outcome_kind,
        system_out: Some(details),
    }
}

/// Everything a reader of a failure needs: the reasons, each splat with its
/// excerpt, each driver finding with its evidence, the reproduce line.
pub fn details(outcome: &Outcome) -> String {
    let mut out = format!("must hold: {}\n", outcome.must_hold);
    for reason in &outcome.reasons {
        out.push_str(&format!("reason: {reason}\n"));
    }
    for splat in &outcome.splats {
        out.push_str(&crate::report::splat_excerpt(
            splat,
            crate::report::PRINTED_EXCERPT_LINES,
        ));
    }
    for finding in &outcome.driver_findings {
        out.push_str(&format!(
            "driver finding: {} ×{}: {}{}\n",
            finding.kind,
            finding.count,
            finding.detail,
            if finding.fences.is_empty() {
                String::new()
            } else {
                format!(
                    " (fences {})",
                    finding
                        .fences
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        ));
    }
    if let Some(bug) = &outcome.bug {
        out.push_str(&format!(
            "injected bug: {} (expected splat: {}); caught by: {}\n",
            bug.name,
            bug.expected_splats.join(" / "),
            bug.caught_by.as_deref().unwrap_or("nothing")
        ));
    }
    if !outcome.reproduce.is_empty() {
        out.push_str(&format!(
            "reproduce: {}   # kernel {}\n",
            outcome.reproduce,
            outcome.kernel.as_deref().unwrap_or("?")
        ));
    }
    if let Some(dir) = &outcome.run_dir {
        out.push_str(&format!("run folder: {}\n", dir.display()));
    }
    out
}

/// The table at the end; details for every run that did not simply pass.
pub fn print(outcomes: &[Outcome], files: &ReportFiles, json: bool) {
    println!();
    for outcome in outcomes {
        println!("{}", one_line(outcome));
    }
    for outcome in outcomes {
        if matches!(outcome.verdict, Verdict::Fail | Verdict::DriverFindings)
            || outcome.bug.is_some()
        {
            println!("\n--- {} on {}", outcome.scenario, outcome.driver);
            print!("{}", details(outcome));
        }
    }
    let count = |v: Verdict| outcomes.iter().filter(|o| o.verdict == v).count();
    println!(
        "\nscenarios: {} passed, {} passed with driver findings, {} failed, {} unsupported",
        count(Verdict::Pass),
        count(Verdict::DriverFindings),
        count(Verdict::Fail),
        count(Verdict::Unsupported)
    );
    println!(
        "reports: {} {}",
        files.json.display(),
        files.junit.display()
    );
    if json {
        println!(
            "{}",
            serde_json::json!({ "runs": outcomes, "report": files.json, "junit": files.junit })
        );
    }
}
