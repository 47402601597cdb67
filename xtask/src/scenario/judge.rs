//! Judges one scenario run: the boot's own verdict (kernel splats, harness
//! failures, device and guest agreeing), then the scenario's expectations.

use serde::Serialize;
use serde_json::Value;

use super::spec::Expect;
use crate::boot::Driver;
use crate::report::{Accounting, Finding, Summary};

/// How a run of a scenario on one driver came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Everything held.
    Pass,
    /// Everything the harness checks held; the driver showed the findings
    /// listed (upstream `virtio_gpu` behaviour such as premature signals).
    DriverFindings,
    /// Something did not hold.
    Fail,
    /// The driver cannot run the scenario (the reason is given).
    Unsupported,
}

/// A verdict and what it rests on.
#[derive(Debug, Clone, Serialize)]
pub struct Judgement {
    pub verdict: Verdict,
    /// Why it failed: the boot's failures, then broken expectations.
    pub reasons: Vec<String>,
    /// Findings about the driver, each with its evidence.
    pub driver_findings: Vec<Finding>,
}

/// What a finished boot said, as the judge reads it.
pub struct Evidence<'a> {
    /// The boot's own failures (splats, harness, cross-check).
    pub failures: &'a [String],
    pub findings: &'a [Finding],
    pub accounting: Option<&'a Accounting>,
    /// The guest's result line as JSON (`None` when it printed none).
    pub guest: Option<&'a Value>,
}

impl<'a> Evidence<'a> {
    pub fn of(summary: &'a Summary, guest: Option<&'a Value>) -> Self {
        Evidence {
            failures: &summary.failures,
            findings: &summary.findings,
            accounting: summary.device.as_ref().and_then(|d| d.accounting.as_ref()),
            guest,
        }
    }
}

/// Judges a finished boot against `expect`.
pub fn judge(expect: &Expect, driver: Driver, evidence: &Evidence) -> Judgement {
    let mut reasons = evidence.failures.to_vec();
    let mut driver_findings = Vec::new();
    for finding in evidence.findings {
        let expected = expect.findings.contains(&finding.kind);
        // fencelab_drm is ours: a finding it was not expected to show is a bug.
        if driver == Driver::Fencelab && !expected {
            reasons.push(format!(
                "unexpected finding about fencelab_drm: {} ×{} ({})",
                finding.kind, finding.count, finding.detail
            ));
        } else {
            driver_findings.push(finding.clone());
        }
    }
    if let Some(guest) = evidence.guest {
        check_bounds(&expect.guest_min, guest, "guest", Bound::Min, &mut reasons);
        check_bounds(&expect.guest_max, guest, "guest", Bound::Max, &mut reasons);
    } else if !(expect.guest_min.is_empty() && expect.guest_max.is_empty()) {
        reasons.push("no guest result line to check the expectations against".into());
    }
    let accounting = evidence
        .accounting
        .and_then(|a| serde_json::to_value(a).ok());
    match accounting {
        Some(accounting) => check_bounds(
            &expect.device_min,
            &accounting,
            "device",
            Bound::Min,
            &mut reasons,
        ),
        None if !expect.device_min.is_empty() => {
            reasons.push("no device accounting to check the expectations against".into())
        }
        None => {}
    }
    if reasons.len() > evidence.failures.len() {
        reasons.extend(guest_figures(evidence.guest));
    }
    let verdict = if !reasons.is_empty() {
        Verdict::Fail
    } else if !driver_findings.is_empty() {
        Verdict::DriverFindings
    } else {
        Verdict::Pass
    };
    Judgement {
        verdict,
        reasons,
        driver_findings,
    }
}

/// The guest's own figures behind a broken expectation, so that a failure
/// read from CI output alone says which side saw what (e.g. the device saw
/// no deadline hint: did the guest set any on unsignaled fences, and did
/// fencelab_drm send them?).
fn guest_figures(guest: Option<&Value>) -> Option<String> {
    let race = guest?.get("deadline_race")?;
    let race: fencelab_report::DeadlineRaceReport = serde_json::from_value(race.clone()).ok()?;
    Some(format!("guest deadline race: {}", race.one_line()))
}

#[derive(Clone, Copy)]
enum Bound {
    Min,
    Max,
}

fn check_bounds(
    bounds: &std::collections::BTreeMap<String, u64>,
    value: &Value,
    whose: &str,
    bound: Bound,
    reasons: &mut Vec<String>,
) {
    for (path, &limit) in bounds {
        match lookup(value, path) {
            None => reasons.push(format!("{whose} {path}: not reported")),
            Some(actual) => match bound {
                Bound::Min if actual < limit => reasons.push(format!(
                    "{whose} {path} = {actual}, expected at least {limit}"
                )),
                Bound::Max if actual > limit => reasons.push(format!(
                    "{whose} {path} = {actual}, expected at most {limit}"
                )),
                _ => {}
            },
        }
    }
}

/// The unsigned integer at a dotted `path` (`array_order.violations`).
/// A float field reads rounded down; anything else is `None`.
pub fn lookup(value: &Value, path: &str) -> Option<u64> {
    let mut at = value;
    for key in path.split('.') {
        at = at.get(key)?;
    }
    at.as_u64()
        .or_else(|| at.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lookup_follows_dotted_paths_and_refuses_non_numbers() {
        let v = json!({"a": {"b": 3, "s": "x"}, "f": 2.9, "neg": -1});
        assert_eq!(lookup(&v, "a.b"), Some(3));
        assert_eq!(lookup(&v, "f"), Some(2));
        assert_eq!(lookup(&v, "a.s"), None);
        assert_eq!(lookup(&v, "a.c"), None);
        assert_eq!(lookup(&v, "neg"), None);
    }

    fn finding(kind: &str) -> Finding {
        Finding {
            kind: kind.into(),
            count: 2,
            fences: vec![5, 9],
            detail: "seen".into(),
        }
    }

    #[test]
    fn findings_label_virtio_gpu_and_fail_fencelab_unless_expected() {
        let findings = [finding("premature_signal")];
        let evidence = Evidence {
            failures: &[],
            findings: &findings,
            accounting: None,
            guest: None,
        };
        let none = Expect::default();
        let upstream = judge(&none, Driver::VirtioGpu, &evidence);
        assert_eq!(upstream.verdict, Verdict::DriverFindings);
        assert_eq!(upstream.driver_findings[0].fences, [5, 9]);
        let ours = judge(&none, Driver::Fencelab, &evidence);
        assert_eq!(ours.verdict, Verdict::Fail);
        assert!(
            ours.reasons[0].contains("unexpected finding about fencelab_drm: premature_signal ×2")
        );
        let expected = Expect {
            findings: vec!["premature_signal".into()],
            ..Expect::default()
        };
        assert_eq!(
            judge(&expected, Driver::Fencelab, &evidence).verdict,
            Verdict::DriverFindings
        );
    }

    #[test]
    fn boot_failures_and_device_bounds_fail_and_a_clean_run_passes() {
        let accounting = Accounting {
            deadline_hints: 3,
            ..Accounting::default()
        };
        let expect = Expect {
            device_min: [
                ("deadline_hints".to_string(), 1),
                ("deadline_boosts".to_string(), 1),
            ]
            .into(),
            ..Expect::default()
        };
        let clean = Evidence {
            failures: &[],
            findings: &[],
            accounting: Some(&accounting),
            guest: None,
        };
        let j = judge(&expect, Driver::Fencelab, &clean);
        assert_eq!(
            j.reasons,
            ["device deadline_boosts = 0, expected at least 1"]
        );
        let fine = Expect {
            device_min: [("deadline_hints".to_string(), 3)].into(),
            ..Expect::default()
        };
        assert_eq!(
            judge(&fine, Driver::Fencelab, &clean).verdict,
            Verdict::Pass
        );
        let failures = ["kernel splat: [kasan] BUG: KASAN".to_string()];
        let splatted = Evidence {
            failures: &failures,
            ..clean
        };
        assert_eq!(
            judge(&fine, Driver::Fencelab, &splatted).verdict,
            Verdict::Fail
        );
        let no_device = Evidence {
            accounting: None,
            ..clean
        };
        assert_eq!(
            judge(&fine, Driver::Fencelab, &no_device).reasons,
            ["no device accounting to check the expectations against"]
        );
    }

    #[test]
    fn a_broken_expectation_quotes_the_guests_deadline_race_figures() {
        let accounting = Accounting::default();
        let expect = Expect {
            device_min: [("deadline_hints".to_string(), 1)].into(),
            ..Expect::default()
        };
        let guest = json!({"deadline_race": {"deadlines_set": 1048, "set_after_signal": 1000,
            "driver": {"hints_sent": 44, "hints_dropped": 0}}});
        let evidence = Evidence {
            failures: &[],
            findings: &[],
            accounting: Some(&accounting),
            guest: Some(&guest),
        };
        let j = judge(&expect, Driver::Fencelab, &evidence);
        assert_eq!(j.reasons.len(), 2, "{:?}", j.reasons);
        assert!(
            j.reasons[1].starts_with("guest deadline race: 1048 deadlines set")
                && j.reasons[1].contains("sent 44 deadline hints"),
            "{}",
            j.reasons[1]
        );
        let enough = Accounting {
            deadline_hints: 1,
            ..Accounting::default()
        };
        let passing = Evidence {
            accounting: Some(&enough),
            ..evidence
        };
        assert!(
            judge(&expect, Driver::Fencelab, &passing)
                .reasons
                .is_empty()
        );
    }

    #[test]
    fn bounds_report_what_was_seen_and_what_was_expected() {
        let v = json!({"array_order": {"arrays": 0, "violations": 2}});
        let mut reasons = Vec::new();
        let min = [("array_order.arrays".to_string(), 1)].into();
        let max = [("array_order.violations".to_string(), 0)].into();
        check_bounds(&min, &v, "guest", Bound::Min, &mut reasons);
        check_bounds(&max, &v, "guest", Bound::Max, &mut reasons);
        check_bounds(
            &[("nope".to_string(), 0)].into(),
            &v,
            "guest",
            Bound::Max,
            &mut reasons,
        );
        assert_eq!(
            reasons,
            [
                "guest array_order.arrays = 0, expected at least 1",
                "guest array_order.violations = 2, expected at most 0",
                "guest nope: not reported",
            ]
        );
    }
}
