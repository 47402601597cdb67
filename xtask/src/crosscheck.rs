//! The accounting cross-check: what fence-hammer counted in the guest
//! against what fencelab-device says it did, and the findings about the
//! driver that fall out of the comparison.
//!
//! Only fence-hammer sends `SUBMIT_3D` (the kernel's own fenced commands —
//! fbdev flushes, resource creation — are other command types), and each
//! EXECBUFFER that succeeds queues exactly one fenced `SUBMIT_3D`, so the
//! device's `accounting_by_command.SUBMIT_3D` (`D` below) is the workload's
//! fences as the device saw them. `G` is fence-hammer's result line.
//!
//! Required equalities (a mismatch fails the boot):
//! 1. the device's own invariant, for the totals, for `SUBMIT_3D` and for
//!    every timeline: `submitted == completed + hung + pending + abandoned`,
//!    and `errored` and `flushed` (fences returned early by a queue stop or
//!    reset) are parts of `completed`;
//! 2. `D.submitted == G.fences_submitted - G.submit_failures`: every
//!    EXECBUFFER that returned a fence reached the device, nothing else did;
//! 3. when the run is complete (no guest timeouts or errors) and the device
//!    left nothing behind (`D.hung == D.pending == D.abandoned == 0`):
//!    `G.fences_signaled == D.completed`.
//!
//! Only an inequality holds in general:
//! 4. `G.fences_signaled - G.premature_signals <= D.completed` (with WRITE
//!    read-backs; without them, 4 is checked only when 3 applies): a fence
//!    whose WRITE the guest read back was completed by the device, but the
//!    guest may see fences signaled that the device never completed. The
//!    upstream `virtio_gpu` driver puts every fence of the device on one
//!    dma-fence context and, whenever one completes, signals every earlier
//!    fence too: a hung fence, one the device still holds at exit, or one a
//!    reorder put behind a later one is signaled anyway (a premature
//!    signal). Conversely the device can complete fences the guest never
//!    counts as signaled (after a guest timeout). Error responses give no
//!    equality either: the driver signals the fence normally whatever the
//!    response type, so `D.errored` has no guest-side count to match.
//!
//! Findings (reported, not failures): premature signals; error responses
//! the guest saw as successful signals (`D.errored` beyond the guest's
//! fence errors); fences that never signaled because the device hung them
//! as the plan asked (the upstream driver has no job timeout), which then
//! excuse the guest's timeouts.

use crate::report::{Accounting, DeviceSummary, Finding, ResultLine};

/// The outcome of the cross-check.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub failures: Vec<String>,
    pub findings: Vec<Finding>,
}

/// True when every guest timeout is explained by a fence the device hung
/// (forever, or until released, or abandoned at reset) and nothing else
/// went wrong in the guest: what a hang plan asks for, against a driver
/// without a job timeout.
pub fn timeouts_explained_by_hangs(guest: &ResultLine, device: Option<&DeviceSummary>) -> bool {
    let Some(d) = device.and_then(DeviceSummary::submit_3d) else {
        return false;
    };
    guest.fence_timeouts > 0
        && guest.fence_errors == 0
        && guest.out_of_order == 0
        && guest.fence_timeouts <= d.hung + d.abandoned
}

/// Cross-checks `guest` against `device` (see the module docs).
pub fn check(guest: Option<&ResultLine>, device: &DeviceSummary) -> Verdict {
    let mut v = Verdict::default();
    let Some(d) = device.submit_3d() else {
        v.failures.push(
            "accounting: the device summary has no accounting_by_command (is fencelab-device current?)"
                .into(),
        );
        return v;
    };
    invariant("SUBMIT_3D", &d, &mut v.failures);
    if let Some(total) = &device.accounting {
        invariant("all commands", total, &mut v.failures);
    }
    for (timeline, a) in &device.timelines {
        invariant(&format!("timeline {timeline}"), a, &mut v.failures);
    }
    let Some(g) = guest else {
        return v;
    };

    // A fence the driver cut off with -ENODEV while it unbound (unload-live,
    // reset) may never have reached the device: its submit ioctl raced the
    // unbind. Each such fence explains one fence the device did not see.
    let cut_off = g.errors_by_errno.get("ENODEV").copied().unwrap_or(0);
    let sent = g.fences_sent();
    let never_arrived = sent.saturating_sub(d.submitted);
    if d.submitted > sent || never_arrived > cut_off {
        v.failures.push(format!(
            "accounting: the device accepted {} SUBMIT_3D fences, the guest sent {} ({} submitted, {} ioctls failed, {} cut off with ENODEV)",
            d.submitted, sent, g.fences_submitted, g.submit_failures, cut_off
        ));
    }

    let left_behind = d.hung + d.pending + d.abandoned;
    let complete = g.fence_timeouts == 0 && g.fence_errors == 0;
    if complete && left_behind == 0 && never_arrived > 0 && never_arrived <= cut_off {
        if g.fences_signaled > d.completed + never_arrived {
            v.failures.push(format!(
                "accounting: the guest saw {} fences signaled, more than the {} the device completed and the {never_arrived} cut off before they reached it",
                g.fences_signaled, d.completed
            ));
        }
    } else if complete && left_behind == 0 {
        if g.fences_signaled != d.completed {
            v.failures.push(format!(
                "accounting: the guest saw {} fences signaled, the device completed {} (and left none hung or pending)",
                g.fences_signaled, d.completed
            ));
        }
    } else if g.write_checks > 0 {
        let proven = g.fences_signaled.saturating_sub(g.premature_signals);
        if proven > d.completed {
            v.failures.push(format!(
                "accounting: the guest read back the WRITEs of {proven} signaled fences, but the device completed only {}",
                d.completed
            ));
        }
    }

    if g.premature_signals > 0 {
        v.findings.push(Finding {
            kind: "premature_signal".into(),
            count: g.premature_signals,
            fences: g.premature_fences.clone(),
            detail: format!(
                "{} of {} fences read back as signaled before the device completed them (WRITE not landed); device SUBMIT_3D at exit: {}",
                g.premature_signals,
                g.write_checks,
                d.one_line()
            ),
        });
    }
    if g.out_of_order > 0 {
        v.findings.push(Finding {
            kind: "out_of_order_signal".into(),
            count: g.out_of_order,
            fences: Vec::new(),
            detail: format!(
                "{} fences were seen signaled before an earlier fence of their timeline (dma_fence requires one context's fences to signal in order); device SUBMIT_3D at exit: {}",
                g.out_of_order,
                d.one_line()
            ),
        });
    }
    let errors_unseen = d.errored.saturating_sub(g.fence_errors);
    if errors_unseen > 0 {
        v.findings.push(Finding {
            kind: "error_signaled_as_success".into(),
            count: errors_unseen,
            fences: Vec::new(),
            detail: format!(
                "the device answered {} SUBMIT_3D fences with an error response; the guest saw {} fence errors",
                d.errored, g.fence_errors
            ),
        });
    }
    if timeouts_explained_by_hangs(g, Some(device)) {
        v.findings.push(Finding {
            kind: "hung_fence_never_signaled".into(),
            count: g.fence_timeouts,
            fences: Vec::new(),
            detail: format!(
                "{} fences never signaled; the device hung {} and abandoned {} as the plan asked, and nothing completed after them to signal them",
                g.fence_timeouts, d.hung, d.abandoned
            ),
        });
    }
    v
}

fn invariant(what: &str, a: &Accounting, failures: &mut Vec<String>) {
    if a.submitted != a.accounted() {
        failures.push(format!(
            "accounting: device {what}: {} submitted but {} completed + {} hung + {} pending + {} abandoned = {}",
            a.submitted,
            a.completed,
            a.hung,
            a.pending,
            a.abandoned,
            a.accounted()
        ));
    }
    for (part, name) in [(a.errored, "errored"), (a.flushed, "flushed")] {
        if part > a.completed {
            failures.push(format!(
                "accounting: device {what}: {part} {name} but only {} completed",
                a.completed
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn guest(submitted: u64, signaled: u64) -> ResultLine {
        serde_json::from_value(serde_json::json!({
            "workload": "smoke",
            "fences_submitted": submitted,
            "fences_signaled": signaled,
            "fence_errors": 0,
            "write_checks": signaled,
            "ok": submitted == signaled,
        }))
        .unwrap()
    }

    fn acct(submitted: u64, completed: u64) -> Accounting {
        Accounting {
            submitted,
            completed,
            ..Accounting::default()
        }
    }

    fn device(submit_3d: Accounting) -> DeviceSummary {
        let mut total = submit_3d;
        // The kernel's own fences (resource creation, fbdev).
        total.submitted += 5;
        total.completed += 5;
        DeviceSummary {
            fences_submitted: total.submitted,
            fences_completed: total.completed,
            commands: serde_json::Value::Null,
            error_responses: serde_json::Value::Null,
            seed: Some(7),
            accounting: Some(total),
            accounting_by_command: Some(BTreeMap::from([("SUBMIT_3D".to_string(), submit_3d)])),
            timelines: BTreeMap::from([("1.0".to_string(), submit_3d)]),
        }
    }

    #[test]
    fn a_clean_run_passes_with_no_findings() {
        let v = check(Some(&guest(100, 100)), &device(acct(100, 100)));
        assert_eq!(v, Verdict::default());
    }

    #[test]
    fn a_device_that_saw_fewer_fences_than_the_guest_sent_fails() {
        let v = check(Some(&guest(100, 100)), &device(acct(99, 99)));
        assert_eq!(v.failures.len(), 2, "{:?}", v.failures);
        assert!(v.failures[0].contains("accepted 99 SUBMIT_3D fences, the guest sent 100"));
        assert!(v.failures[1].contains("saw 100 fences signaled, the device completed 99"));
    }

    #[test]
    fn fences_cut_off_by_an_unbind_may_never_reach_the_device() {
        let mut g = guest(100, 100);
        g.errors_by_errno.insert("ENODEV".into(), 3);
        let v = check(Some(&g), &device(acct(98, 98)));
        assert!(v.failures.is_empty(), "{:?}", v.failures);
        // More missing than were cut off: lost fences.
        let v = check(Some(&g), &device(acct(96, 96)));
        assert!(
            v.failures[0].contains("accepted 96 SUBMIT_3D fences, the guest sent 100"),
            "{:?}",
            v.failures
        );
        // Signaled fences the device neither completed nor missed.
        let mut g = g.clone();
        g.fences_signaled = 101;
        let v = check(Some(&g), &device(acct(98, 98)));
        assert!(
            v.failures[0].contains("more than the 98 the device completed"),
            "{:?}",
            v.failures
        );
    }

    #[test]
    fn fences_signaled_out_of_order_are_a_finding() {
        let mut g = guest(100, 100);
        g.out_of_order = 4;
        let v = check(Some(&g), &device(acct(100, 100)));
        assert!(v.failures.is_empty(), "{:?}", v.failures);
        assert_eq!(v.findings[0].kind, "out_of_order_signal");
        assert_eq!(v.findings[0].count, 4);
    }

    #[test]
    fn failed_ioctls_never_reach_the_device() {
        let mut g = guest(100, 99);
        g.fence_errors = 1;
        g.submit_failures = 1;
        let v = check(Some(&g), &device(acct(99, 99)));
        assert!(v.failures.is_empty(), "{:?}", v.failures);
    }

    #[test]
    fn the_device_invariant_is_checked_everywhere() {
        let mut d = device(acct(100, 100));
        d.timelines.insert("0.0".into(), acct(3, 2));
        d.accounting.as_mut().unwrap().pending = 1;
        let v = check(Some(&guest(100, 100)), &d);
        assert_eq!(v.failures.len(), 2, "{:?}", v.failures);
        assert!(v.failures[0].starts_with("accounting: device all commands: 105 submitted"));
        assert!(v.failures[1].contains("timeline 0.0: 3 submitted but 2 completed"));
    }

    #[test]
    fn flushed_fences_are_part_of_completed() {
        let flushed = |n| Accounting {
            flushed: n,
            ..acct(100, 100)
        };
        let v = check(Some(&guest(100, 100)), &device(flushed(97)));
        assert!(v.failures.is_empty(), "{:?}", v.failures);
        let v = check(Some(&guest(100, 100)), &device(flushed(101)));
        assert_eq!(v.failures.len(), 2, "SUBMIT_3D and its timeline");
        assert!(
            v.failures[0].contains("SUBMIT_3D: 101 flushed but only 100 completed"),
            "{:?}",
            v.failures
        );
    }

    #[test]
    fn premature_signals_of_hung_fences_are_findings() {
        // 100 fences, 2 hung forever by the plan; the driver signaled both
        // when later fences completed, and the guest caught it.
        let mut g = guest(100, 100);
        g.premature_signals = 2;
        g.premature_fences = vec![10, 50];
        let d = device(Accounting {
            submitted: 100,
            completed: 98,
            hung: 2,
            ..Accounting::default()
        });
        let v = check(Some(&g), &d);
        assert!(v.failures.is_empty(), "{:?}", v.failures);
        assert_eq!(v.findings.len(), 1);
        assert_eq!(v.findings[0].kind, "premature_signal");
        assert_eq!(v.findings[0].count, 2);
        assert_eq!(v.findings[0].fences, vec![10, 50]);
    }

    #[test]
    fn signals_the_device_cannot_account_for_fail() {
        // Two hung fences signaled, but the guest claims it read back every
        // WRITE: more proven completions than the device made.
        let g = guest(100, 100);
        let d = device(Accounting {
            submitted: 100,
            completed: 98,
            hung: 2,
            ..Accounting::default()
        });
        let v = check(Some(&g), &d);
        assert_eq!(v.failures.len(), 1, "{:?}", v.failures);
        assert!(v.failures[0].contains("WRITEs of 100 signaled fences"));
    }

    #[test]
    fn without_read_backs_faulty_runs_only_get_the_equalities() {
        let mut g = guest(100, 100);
        g.write_checks = 0;
        let d = device(Accounting {
            submitted: 100,
            completed: 98,
            pending: 2,
            ..Accounting::default()
        });
        assert!(check(Some(&g), &d).failures.is_empty());
    }

    #[test]
    fn error_responses_signaled_as_success_are_findings() {
        let d = device(Accounting {
            submitted: 100,
            completed: 100,
            errored: 3,
            ..Accounting::default()
        });
        let v = check(Some(&guest(100, 100)), &d);
        assert!(v.failures.is_empty(), "{:?}", v.failures);
        assert_eq!(v.findings.len(), 1);
        assert_eq!(v.findings[0].kind, "error_signaled_as_success");
        assert_eq!(v.findings[0].count, 3);

        // A driver that reports the errors as fence errors has no finding.
        let mut g = guest(100, 97);
        g.fence_errors = 3;
        let v = check(Some(&g), &d);
        assert!(v.findings.is_empty(), "{:?}", v.findings);
    }

    #[test]
    fn timeouts_of_hung_fences_are_excused_as_findings() {
        let mut g = guest(100, 99);
        g.fence_timeouts = 1;
        let hung = device(Accounting {
            submitted: 100,
            completed: 99,
            hung: 1,
            ..Accounting::default()
        });
        assert!(timeouts_explained_by_hangs(&g, Some(&hung)));
        let v = check(Some(&g), &hung);
        assert!(v.failures.is_empty(), "{:?}", v.failures);
        assert_eq!(v.findings[0].kind, "hung_fence_never_signaled");

        // Pending is not hung: a fence the device still meant to complete
        // must not time out in the guest.
        let pending = device(Accounting {
            submitted: 100,
            completed: 99,
            pending: 1,
            ..Accounting::default()
        });
        assert!(!timeouts_explained_by_hangs(&g, Some(&pending)));
        // Nor does a hang excuse more timeouts than it explains, or errors.
        g.fence_timeouts = 2;
        assert!(!timeouts_explained_by_hangs(&g, Some(&hung)));
        g.fence_timeouts = 1;
        g.fence_errors = 1;
        assert!(!timeouts_explained_by_hangs(&g, Some(&hung)));
        assert!(!timeouts_explained_by_hangs(&g, None));
    }

    #[test]
    fn a_device_without_accounting_fails_the_check() {
        let mut d = device(acct(1, 1));
        d.accounting_by_command = None;
        let v = check(Some(&guest(1, 1)), &d);
        assert_eq!(v.failures.len(), 1);
        assert!(v.failures[0].contains("no accounting_by_command"));
    }

    #[test]
    fn summary_lines_parse_with_and_without_the_new_keys() {
        let line = r#"{"commands":10,"commands_by_type":{"SUBMIT_3D":4},"fences_submitted":5,
            "fences_completed":5,"error_responses":0,"dropped":0,"fences_pending":0,"seed":42,
            "accounting":{"submitted":5,"completed":5,"errored":0,"hung":0,"pending":0,
              "abandoned":0,"released":0,"irq_dropped":0,"irq_spurious":0,
              "deadline_hints":0,"deadline_boosts":0},
            "accounting_by_command":{"SUBMIT_3D":{"submitted":4,"completed":4},
              "RESOURCE_CREATE_3D":{"submitted":1,"completed":1}},
            "timelines":{"0.0":{"submitted":1,"completed":1},"1.0":{"submitted":4,"completed":4}}}"#;
        let d: DeviceSummary = serde_json::from_str(line).unwrap();
        assert_eq!(d.seed, Some(42));
        assert_eq!(d.submit_3d(), Some(acct(4, 4)));
        assert_eq!(d.timelines["1.0"].completed, 4);
        assert!(check(Some(&guest(4, 4)), &d).failures.is_empty());

        let old: DeviceSummary =
            serde_json::from_str(r#"{"fences_submitted":1,"fences_completed":1}"#).unwrap();
        assert_eq!(old.submit_3d(), None);
        assert_eq!(old.seed, None);
    }
}
