//! A KTAP reader for KUnit output on the kernel console.
//!
//! KUnit prints one KTAP document whose subtests are the suites, each with
//! its test cases nested one level deeper:
//!
//! ```text
//! KTAP version 1
//! 1..1
//!     KTAP version 1
//!     # Subtest: rust_dma_fence
//!     1..2
//!     ok 1 signal_consumes
//!     not ok 2 deadline_not_after_signal
//! ok 1 rust_dma_fence
//! ```
//!
//! Parameterised tests nest a third level; their cases are reported under the
//! parent test's name. Lines are read after the printk timestamp is removed.

use crate::console::printk_body;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
}

/// One test case result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaseResult {
    pub suite: String,
    pub name: String,
    pub outcome: Outcome,
    /// The `# SKIP` reason or the diagnostic lines printed before a failure.
    pub detail: Vec<String>,
}

/// A suite's own result line (which KUnit prints after its cases).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SuiteResult {
    pub name: String,
    pub outcome: Outcome,
}

#[derive(Debug, Default, Serialize)]
pub struct KtapReport {
    pub suites: Vec<SuiteResult>,
    pub cases: Vec<CaseResult>,
}

impl KtapReport {
    pub fn count(&self, outcome: Outcome) -> usize {
        self.cases.iter().filter(|c| c.outcome == outcome).count()
    }
}

/// Parses a result line: `ok 3 name # SKIP reason` / `not ok 1 name`.
fn result_line(text: &str) -> Option<(Outcome, String, Option<String>)> {
    let (passed, rest) = if let Some(rest) = text.strip_prefix("not ok ") {
        (false, rest)
    } else if let Some(rest) = text.strip_prefix("ok ") {
        (true, rest)
    } else {
        return None;
    };
    let (number, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    number.parse::<u32>().ok()?;
    let (name, directive) = match rest.split_once(" # ") {
        Some((name, directive)) => (name.trim(), Some(directive.trim())),
        None => (rest.trim(), None),
    };
    let skip = directive
        .and_then(|d| d.strip_prefix("SKIP"))
        .map(|r| r.trim().to_owned());
    let outcome = match (passed, &skip) {
        (_, Some(_)) => Outcome::Skip,
        (true, None) => Outcome::Pass,
        (false, None) => Outcome::Fail,
    };
    Some((outcome, name.to_owned(), skip))
}

/// Reads every KUnit result from a console log.
pub fn parse(console: &str) -> KtapReport {
    let mut report = KtapReport::default();
    // Indentation of the top-level KTAP document; suites sit one level (four
    // spaces) deeper, and anything deeper still is a parameterised case.
    let mut top: Option<usize> = None;
    let mut suite: Option<String> = None;
    let mut diagnostics: Vec<String> = Vec::new();
    for raw in console.lines() {
        let line = printk_body(raw);
        let text = line.trim_start();
        let indent = line.len() - text.len();
        if text.starts_with("KTAP version") {
            top.get_or_insert(indent);
            continue;
        }
        let Some(top) = top else { continue };
        let case_indent = top + 4;
        if let Some(name) = text.strip_prefix("# Subtest: ") {
            if indent == case_indent {
                suite = Some(name.trim().to_owned());
                diagnostics.clear();
            }
            continue;
        }
        if let Some(diagnostic) = text.strip_prefix("# ") {
            diagnostics.push(diagnostic.to_owned());
            continue;
        }
        let Some((outcome, name, skip)) = result_line(text) else {
            continue;
        };
        match &suite {
            Some(suite_name) if indent == case_indent => {
                let detail = match skip {
                    Some(reason) => vec![reason],
                    None if outcome == Outcome::Fail => std::mem::take(&mut diagnostics),
                    None => Vec::new(),
                };
                report.cases.push(CaseResult {
                    suite: suite_name.clone(),
                    name,
                    outcome,
                    detail,
                });
            }
            Some(suite_name) if indent == top && name == *suite_name => {
                report.suites.push(SuiteResult { name, outcome });
                suite = None;
            }
            _ => {}
        }
        diagnostics.clear();
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    // Shaped like the 7.3 KUnit executor's output on a serial console.
    const LOG: &str = "\
[    3.100000] KTAP version 1
[    3.100001] 1..2
[    3.100002]     KTAP version 1
[    3.100003]     # Subtest: rust_dma_fence
[    3.100004]     # speed: normal
[    3.100005]     1..3
[    3.200000]     ok 1 signal_consumes_the_fence
[    3.300000]     # deadline_not_after_signal: ASSERTION FAILED at rust/kernel/dma_fence.rs:812
[    3.300001]     Expected calls == 0, but
[    3.300002]     not ok 2 deadline_not_after_signal
[    3.400000]     ok 3 needs_two_cpus # SKIP only one CPU online
[    3.400001] # rust_dma_fence: pass:1 fail:1 skip:1 total:3
[    3.400002] not ok 1 rust_dma_fence
[    3.500000]     KTAP version 1
[    3.500001]     # Subtest: rust_dma_fence_order
[    3.500002]     1..1
[    3.500003]         KTAP version 1
[    3.500004]         # Subtest: ordered_signaling
[    3.500005]         ok 1 seqno 1
[    3.500006]         ok 2 seqno 2
[    3.500007]     ok 1 ordered_signaling
[    3.500008] ok 2 rust_dma_fence_order
";

    #[test]
    fn reads_cases_suites_and_failure_detail() {
        let report = parse(LOG);
        let names: Vec<_> = report
            .cases
            .iter()
            .map(|c| (c.suite.as_str(), c.name.as_str(), c.outcome))
            .collect();
        assert_eq!(
            names,
            [
                ("rust_dma_fence", "signal_consumes_the_fence", Outcome::Pass),
                ("rust_dma_fence", "deadline_not_after_signal", Outcome::Fail),
                ("rust_dma_fence", "needs_two_cpus", Outcome::Skip),
                ("rust_dma_fence_order", "ordered_signaling", Outcome::Pass),
            ]
        );
        assert_eq!(
            report.cases[1].detail,
            ["deadline_not_after_signal: ASSERTION FAILED at rust/kernel/dma_fence.rs:812"]
        );
        assert_eq!(report.cases[2].detail, ["only one CPU online"]);
        assert_eq!(
            report.suites,
            [
                SuiteResult {
                    name: "rust_dma_fence".into(),
                    outcome: Outcome::Fail
                },
                SuiteResult {
                    name: "rust_dma_fence_order".into(),
                    outcome: Outcome::Pass
                },
            ]
        );
        assert_eq!(
            (
                report.count(Outcome::Pass),
                report.count(Outcome::Fail),
                report.count(Outcome::Skip)
            ),
            (2, 1, 1)
        );
    }

    #[test]
    fn no_kunit_output_means_no_results() {
        let report = parse("[    1.0] Run /init as init process\nok 1 not inside a suite\n");
        assert!(report.cases.is_empty());
        assert!(report.suites.is_empty());
    }

    #[test]
    fn result_lines() {
        assert_eq!(
            result_line("ok 1 a"),
            Some((Outcome::Pass, "a".into(), None))
        );
        assert_eq!(
            result_line("not ok 12 b_c"),
            Some((Outcome::Fail, "b_c".into(), None))
        );
        assert_eq!(
            result_line("ok 3 x # SKIP why"),
            Some((Outcome::Skip, "x".into(), Some("why".into())))
        );
        assert_eq!(result_line("okay 1 a"), None);
        assert_eq!(result_line("ok one a"), None);
    }
}
