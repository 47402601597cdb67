//! What a workload counted, and the one `FENCELAB_RESULT {json}` line the
//! host reads from the guest console (its type, [`ResultLine`], is
//! `fencelab-report`'s, which xtask reads it with).

use std::collections::BTreeMap;
use std::time::Duration;

pub use fencelab_report::ResultLine;
use fencelab_report::{
    ArrayOrderReport, CallbackRaceReport, DeadlineRaceReport, RESULT_MARKER, ResetReport, RttUs,
    UnloadReport, round_to,
};

use crate::errno;
use crate::readback::{MAX_PREMATURE_LISTED, PrematureCheck};

/// Counters of one workload run.
///
/// Every submission attempt ends in exactly one of signaled, errored or
/// timed out, so at the end `submitted == signaled + errors + timeouts`.
/// `out_of_order` counts fences that signaled before an older one; they are
/// also counted in one of the three. `submit_failures` counts the attempts
/// whose EXECBUFFER ioctl failed (never reached the device); they are also
/// in `errors`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub submitted: u64,
    pub signaled: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub out_of_order: u64,
    pub submit_failures: u64,
}

impl Counts {
    /// Every fence submitted signaled, without error, none timed out.
    pub fn all_signaled(&self) -> bool {
        self.submitted == self.signaled && self.errors == 0 && self.timeouts == 0
    }

    fn add(&mut self, other: Self) {
        self.submitted += other.submitted;
        self.signaled += other.signaled;
        self.errors += other.errors;
        self.timeouts += other.timeouts;
        self.out_of_order += other.out_of_order;
        self.submit_failures += other.submit_failures;
    }
}

/// The result of one workload run.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub counts: Counts,
    /// Round trip (submit to poll returning ready) of each fence that
    /// signaled without error, in ns.
    pub rtt_ns: Vec<u64>,
    pub first_error: Option<String>,
    /// The timeline name from SYNC_IOC_FILE_INFO of the first fence read.
    pub timeline_name: Option<String>,
    pub elapsed: Duration,
    /// Error messages written to stderr so far.
    pub errors_logged: u64,
    /// WRITE read-backs and the premature signals they caught.
    pub premature: PrematureCheck,
    /// Fences seen signaled with an error, by errno name (expected errors
    /// such as unload-live's `-ENODEV` included).
    pub errors_by_errno: BTreeMap<String, u64>,
    /// Threads that submitted fences.
    pub threads: u64,
    /// Out-of-order signals are counted but break no invariant: the driver
    /// does not promise order (fencelab_drm signals each fence when the
    /// device answers it, see [`crate::lanes::Lanes::signals_in_order`]).
    pub order_not_promised: bool,
    /// Broken invariants of the workload's own (a leaked fd, a merged fence
    /// with the wrong status, …), each also noted as an error message.
    pub violations: u64,
    pub unload: Option<UnloadReport>,
    pub deadline_race: Option<DeadlineRaceReport>,
    pub callbacks: Option<CallbackRaceReport>,
    pub array_order: Option<ArrayOrderReport>,
    pub reset: Option<ResetReport>,
    /// Round trips split by fence number into `--rtt-phases` equal, contiguous
    /// phases (empty unless asked): a bench varies the device's latency by
    /// phase and reads each phase's own percentiles.
    pub rtt_phases: RttPhases,
}

/// Round trips (ns) of the signaled fences, by phase of the run.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RttPhases {
    /// Fences of the whole run (every thread's), which the phases split.
    pub fences: u64,
    pub samples: Vec<Vec<u64>>,
}

impl RttPhases {
    /// `phases` empty phases of `fences` fences; none when `phases` < 2.
    pub fn new(fences: u64, phases: usize) -> Self {
        if phases < 2 {
            return Self::default();
        }
        Self {
            fences,
            samples: vec![Vec::new(); phases],
        }
    }

    /// Files the round trip of fence `seq` under its phase.
    pub fn record(&mut self, seq: u64, rtt_ns: u64) {
        let phases = self.samples.len() as u64;
        if phases == 0 || self.fences == 0 {
            return;
        }
        let phase = (u128::from(seq.min(self.fences - 1)) * u128::from(phases)
            / u128::from(self.fences)) as usize;
        self.samples[phase].push(rtt_ns);
    }

    fn absorb(&mut self, other: RttPhases) {
        if self.samples.is_empty() {
            *self = other;
            return;
        }
        for (mine, theirs) in self.samples.iter_mut().zip(other.samples) {
            mine.extend(theirs);
        }
    }
}

/// Error messages beyond this many are counted but not printed (a device
/// refusing every EXECBUFFER would otherwise flood a slow serial console).
pub const MAX_ERRORS_LOGGED: u64 = 20;

impl Outcome {
    /// An empty outcome of a run with one submitting thread.
    pub fn one_thread() -> Self {
        Self {
            threads: 1,
            ..Self::default()
        }
    }

    /// The run held every invariant. Premature signals (see
    /// [`crate::readback`]) and the findings of a workload's own figures are
    /// not among them: they are findings about the driver, which the host
    /// reports; the run itself still worked.
    pub fn ok(&self) -> bool {
        self.counts.all_signaled()
            && (self.counts.out_of_order == 0 || self.order_not_promised)
            && self.violations == 0
    }

    /// Counts a fence seen signaled with `errno` (either sign).
    pub fn count_errno(&mut self, errno: i32) {
        *self.errors_by_errno.entry(errno::name(errno)).or_default() += 1;
    }

    /// Counts a broken invariant and notes why.
    pub fn violation(&mut self, msg: String) {
        self.violations += 1;
        self.note_error(msg);
    }

    /// Adds the counts of `other`, a part of the same run that ran beside
    /// this one (another thread): counters add up, samples join, the first
    /// error and timeline name are kept if this part has none. The elapsed
    /// time and the workload's figures are the caller's to set.
    pub fn absorb(&mut self, other: Outcome) {
        self.counts.add(other.counts);
        self.rtt_ns.extend(other.rtt_ns);
        self.rtt_phases.absorb(other.rtt_phases);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        if self.timeline_name.is_none() {
            self.timeline_name = other.timeline_name;
        }
        self.errors_logged += other.errors_logged;
        self.premature.checks += other.premature.checks;
        self.premature.premature += other.premature.premature;
        let room = MAX_PREMATURE_LISTED.saturating_sub(self.premature.first.len());
        self.premature
            .first
            .extend(other.premature.first.into_iter().take(room));
        for (name, n) in other.errors_by_errno {
            *self.errors_by_errno.entry(name).or_default() += n;
        }
        self.threads += other.threads;
        self.violations += other.violations;
    }

    /// Keeps the first error message and logs the first
    /// [`MAX_ERRORS_LOGGED`] to stderr.
    pub fn note_error(&mut self, msg: String) {
        self.errors_logged += 1;
        if self.errors_logged <= MAX_ERRORS_LOGGED {
            eprintln!("fence-hammer: error: {msg}");
        }
        if self.errors_logged == MAX_ERRORS_LOGGED {
            eprintln!("fence-hammer: further errors are counted but not printed");
        }
        if self.first_error.is_none() {
            self.first_error = Some(msg);
        }
    }
}

/// The result line of a run that got as far as its workload.
pub fn result_line(workload: &str, device: &str, driver: &str, o: &Outcome) -> ResultLine {
    let secs = o.elapsed.as_secs_f64();
    let per_s = if secs > 0.0 {
        o.counts.signaled as f64 / secs
    } else {
        0.0
    };
    ResultLine {
        workload: Some(workload.to_string()),
        device: Some(device.to_string()),
        driver: Some(driver.to_string()),
        fences_submitted: o.counts.submitted,
        fences_signaled: o.counts.signaled,
        fence_errors: o.counts.errors,
        fence_timeouts: o.counts.timeouts,
        out_of_order: o.counts.out_of_order,
        elapsed_ms: round_to(secs * 1e3, 3),
        fences_per_s: round_to(per_s, 1),
        rtt_us: RttUs::from_ns(&o.rtt_ns),
        rtt_us_by_phase: o
            .rtt_phases
            .samples
            .iter()
            .map(|s| RttUs::from_ns(s))
            .collect(),
        first_error: o.first_error.clone(),
        timeline_name: o.timeline_name.clone(),
        premature_signals: o.premature.premature,
        premature_fences: o.premature.first.clone(),
        write_checks: o.premature.checks,
        submit_failures: o.counts.submit_failures,
        errors_by_errno: o.errors_by_errno.clone(),
        threads: o.threads,
        unload: o.unload.clone(),
        deadline_race: o.deadline_race,
        callbacks: o.callbacks,
        array_order: o.array_order,
        reset: o.reset,
        ok: o.ok(),
    }
}

/// The result line of a run that never started (bad usage, no device).
pub fn setup_error_line(
    workload: Option<&str>,
    device: Option<&str>,
    driver: Option<&str>,
    error: String,
) -> ResultLine {
    ResultLine {
        workload: workload.map(str::to_string),
        device: device.map(str::to_string),
        driver: driver.map(str::to_string),
        fences_submitted: 0,
        fences_signaled: 0,
        fence_errors: 0,
        fence_timeouts: 0,
        out_of_order: 0,
        elapsed_ms: 0.0,
        fences_per_s: 0.0,
        rtt_us: RttUs::default(),
        rtt_us_by_phase: Vec::new(),
        first_error: Some(error),
        timeline_name: None,
        premature_signals: 0,
        premature_fences: Vec::new(),
        write_checks: 0,
        submit_failures: 0,
        errors_by_errno: BTreeMap::new(),
        threads: 0,
        unload: None,
        deadline_race: None,
        callbacks: None,
        array_order: None,
        reset: None,
        ok: false,
    }
}

/// `FENCELAB_RESULT {json}`, one line (serde_json escapes newlines).
pub fn to_line(line: &ResultLine) -> String {
    let json = serde_json::to_string(line).expect("ResultLine always serializes");
    format!("{RESULT_MARKER}{json}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn ok_needs_every_fence_signaled_and_no_violation() {
        let ok = |counts: Counts| {
            Outcome {
                counts,
                ..Default::default()
            }
            .ok()
        };
        let good = Counts {
            submitted: 5,
            signaled: 5,
            ..Default::default()
        };
        assert!(ok(good));
        assert!(!ok(Counts {
            signaled: 4,
            errors: 1,
            ..good
        }));
        assert!(!ok(Counts {
            signaled: 4,
            timeouts: 1,
            ..good
        }));
        assert!(!ok(Counts {
            out_of_order: 1,
            ..good
        }));
        assert!(!ok(Counts {
            signaled: 4,
            ..good
        }));
    }

    fn parse(line: &str) -> serde_json::Map<String, Value> {
        assert!(!line.contains('\n'));
        let json = line.strip_prefix(RESULT_MARKER).expect("prefix");
        match serde_json::from_str::<Value>(json).unwrap() {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    const KEYS: [&str; 20] = [
        "workload",
        "device",
        "driver",
        "fences_submitted",
        "fences_signaled",
        "fence_errors",
        "fence_timeouts",
        "out_of_order",
        "elapsed_ms",
        "fences_per_s",
        "rtt_us",
        "first_error",
        "timeline_name",
        "premature_signals",
        "premature_fences",
        "write_checks",
        "submit_failures",
        "errors_by_errno",
        "threads",
        "ok",
    ];

    #[test]
    fn phases_split_fence_numbers_evenly_and_join_across_threads() {
        let mut a = RttPhases::new(10, 3);
        for seq in 0..5 {
            a.record(seq, 100 + seq);
        }
        let mut b = RttPhases::new(10, 3);
        for seq in 5..12 {
            b.record(seq, 100 + seq);
        }
        a.absorb(b);
        // 0..=3 → phase 0, 4..=6 → 1, 7..=9 (and beyond the end) → 2.
        assert_eq!(
            a.samples,
            [
                vec![100, 101, 102, 103],
                vec![104, 105, 106],
                vec![107, 108, 109, 110, 111]
            ]
        );
        let mut none = RttPhases::new(10, 1);
        none.record(3, 1);
        assert!(none.samples.is_empty());
    }

    #[test]
    fn result_line_shape() {
        let o = Outcome {
            counts: Counts {
                submitted: 4,
                signaled: 4,
                ..Default::default()
            },
            rtt_ns: vec![1_000_000, 2_000_000, 3_000_000, 4_000_000],
            first_error: None,
            timeline_name: Some("signaled-timeline".into()),
            elapsed: Duration::from_millis(2),
            errors_logged: 0,
            premature: PrematureCheck {
                checks: 4,
                premature: 2,
                first: vec![1, 3],
            },
            threads: 1,
            ..Default::default()
        };
        let line = to_line(&result_line(
            "smoke",
            "/dev/dri/renderD128",
            "virtio_gpu",
            &o,
        ));
        let m = parse(&line);
        let keys: Vec<&str> = m.keys().map(String::as_str).collect();
        let mut want = KEYS.to_vec();
        want.sort();
        assert_eq!(keys, want, "serde_json's map is sorted");
        // Key order in the text is the documented order.
        let positions: Vec<usize> = KEYS
            .iter()
            .map(|k| line.find(&format!("\"{k}\":")).unwrap())
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{line}");

        assert_eq!(m["workload"], "smoke");
        assert_eq!(m["device"], "/dev/dri/renderD128");
        assert_eq!(m["driver"], "virtio_gpu");
        assert_eq!(m["fences_submitted"], 4);
        assert_eq!(m["fences_signaled"], 4);
        assert_eq!(m["elapsed_ms"], 2.0);
        assert_eq!(m["fences_per_s"], 2000.0);
        assert_eq!(m["rtt_us"]["p50"], 2000);
        assert_eq!(m["rtt_us"]["p99"], 4000);
        assert_eq!(m["rtt_us"]["max"], 4000);
        assert_eq!(m["first_error"], Value::Null);
        assert_eq!(m["timeline_name"], "signaled-timeline");
        assert_eq!(m["premature_signals"], 2);
        assert_eq!(m["premature_fences"], serde_json::json!([1, 3]));
        assert_eq!(m["write_checks"], 4);
        assert_eq!(m["submit_failures"], 0);
        assert_eq!(m["errors_by_errno"], serde_json::json!({}));
        assert_eq!(m["threads"], 1);
        assert_eq!(
            m["ok"], true,
            "premature signals are findings, not failures"
        );
    }

    #[test]
    fn the_unload_object_comes_before_ok_when_there_is_one() {
        let o = Outcome {
            counts: Counts {
                submitted: 2,
                signaled: 2,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut line = result_line("unload-live", "/d", "fencelab_drm", &o);
        assert!(!to_line(&line).contains("\"unload\""), "absent when None");
        let report = fencelab_report::UnloadReport {
            rounds: 1,
            pending_at_rmmod: fencelab_report::PendingAtRmmod {
                min: Some(1),
                max: Some(1),
                total: 1,
            },
            completed_before_rmmod: 1,
            cut_off_enodev: 1,
            other_errors: 0,
            unsignaled_after_rmmod: 0,
            deadlines_set: 1,
            rmmod_ms: fencelab_report::MsPercentiles::from_ms(&[2.0]),
            load_to_first_submit_ms: fencelab_report::MsPercentiles::from_ms(&[]),
            driver: Default::default(),
        };
        line.unload = Some(report);
        let text = to_line(&line);
        let m = parse(&text);
        assert_eq!(m["unload"]["cut_off_enodev"], 1);
        assert_eq!(m["unload"]["rmmod_ms"]["max"], 2.0);
        assert_eq!(m["unload"]["load_to_first_submit_ms"]["p50"], Value::Null);
        assert!(text.find("\"unload\":").unwrap() < text.find("\"ok\":").unwrap());
        assert!(text.find("\"submit_failures\":").unwrap() < text.find("\"unload\":").unwrap());
    }

    #[test]
    fn failed_run_line_is_not_ok() {
        let mut o = Outcome {
            counts: Counts {
                submitted: 3,
                signaled: 2,
                timeouts: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        o.note_error("fence #2: not signaled after 10000 ms".into());
        for i in 0..MAX_ERRORS_LOGGED + 5 {
            o.note_error(format!("later error {i}"));
        }
        assert_eq!(o.errors_logged, MAX_ERRORS_LOGGED + 6);
        let m = parse(&to_line(&result_line("smoke", "/d", "virtio_gpu", &o)));
        assert_eq!(m["ok"], false);
        assert_eq!(m["fence_timeouts"], 1);
        assert_eq!(m["first_error"], "fence #2: not signaled after 10000 ms");
        assert_eq!(
            m["fences_per_s"], 0.0,
            "zero elapsed must not divide by zero"
        );
        assert_eq!(m["rtt_us"]["p50"], Value::Null);
    }

    #[test]
    fn setup_error_line_has_every_key() {
        let line = setup_error_line(
            Some("smoke"),
            None,
            None,
            "no virtio_gpu render node:\n/dev/dri has no renderD* entries".into(),
        );
        let line = to_line(&line);
        let m = parse(&line);
        assert_eq!(m.len(), KEYS.len());
        assert_eq!(m["ok"], false);
        assert_eq!(m["device"], Value::Null);
        assert_eq!(m["fences_submitted"], 0);
        assert!(m["first_error"].as_str().unwrap().contains("renderD*"));
    }

    #[test]
    fn errors_are_counted_by_errno_name() {
        let mut o = Outcome::default();
        o.count_errno(-libc::ETIMEDOUT);
        o.count_errno(-libc::ETIMEDOUT);
        o.count_errno(-libc::ENODEV);
        let m = parse(&to_line(&result_line("smoke", "/d", "fencelab_drm", &o)));
        assert_eq!(
            m["errors_by_errno"],
            serde_json::json!({"ENODEV": 1, "ETIMEDOUT": 2})
        );
    }

    #[test]
    fn workload_figures_are_written_only_when_measured() {
        let mut o = Outcome {
            counts: Counts {
                submitted: 1,
                signaled: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        let text = to_line(&result_line("smoke", "/d", "virtio_gpu", &o));
        for key in ["deadline_race", "callbacks", "array_order", "reset"] {
            assert!(!text.contains(key), "{key} absent: {text}");
        }
        o.deadline_race = Some(DeadlineRaceReport {
            deadlines_set: 5,
            ..Default::default()
        });
        o.reset = Some(ResetReport {
            rounds: 2,
            ..Default::default()
        });
        let text = to_line(&result_line("deadline-race", "/d", "virtio_gpu", &o));
        let m = parse(&text);
        assert_eq!(m["deadline_race"]["deadlines_set"], 5);
        assert_eq!(m["reset"]["rounds"], 2);
        assert!(text.find("\"reset\":").unwrap() < text.find("\"ok\":").unwrap());
        assert!(text.find("\"threads\":").unwrap() < text.find("\"deadline_race\":").unwrap());
    }

    #[test]
    fn violations_and_unpromised_order() {
        let clean = Outcome {
            counts: Counts {
                submitted: 3,
                signaled: 3,
                out_of_order: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(!clean.ok(), "out of order breaks the run by default");
        let tolerated = Outcome {
            order_not_promised: true,
            ..clean.clone()
        };
        assert!(
            tolerated.ok(),
            "counted, not a failure, where order is not promised"
        );
        let mut broken = tolerated.clone();
        broken.violation("fd leaked".into());
        assert!(!broken.ok());
        assert_eq!(broken.first_error.as_deref(), Some("fd leaked"));
    }

    #[test]
    fn absorbing_a_part_adds_it_up() {
        let mut a = Outcome {
            counts: Counts {
                submitted: 2,
                signaled: 2,
                ..Default::default()
            },
            rtt_ns: vec![1, 2],
            threads: 1,
            premature: PrematureCheck {
                checks: 2,
                premature: 1,
                first: vec![0],
            },
            ..Default::default()
        };
        a.count_errno(-libc::EIO);
        let mut b = Outcome {
            counts: Counts {
                submitted: 3,
                signaled: 2,
                timeouts: 1,
                ..Default::default()
            },
            rtt_ns: vec![3],
            threads: 1,
            first_error: Some("fence #7: not signaled".into()),
            timeline_name: Some("t".into()),
            premature: PrematureCheck {
                checks: 2,
                premature: 2,
                first: vec![5, 6],
            },
            ..Default::default()
        };
        b.count_errno(-libc::EIO);
        b.violations = 1;
        a.absorb(b);
        assert_eq!(
            (a.counts.submitted, a.counts.signaled, a.counts.timeouts),
            (5, 4, 1)
        );
        assert_eq!(a.rtt_ns, vec![1, 2, 3]);
        assert_eq!(a.threads, 2);
        assert_eq!(a.violations, 1);
        assert_eq!(a.first_error.as_deref(), Some("fence #7: not signaled"));
        assert_eq!(a.timeline_name.as_deref(), Some("t"));
        assert_eq!((a.premature.checks, a.premature.premature), (4, 3));
        assert_eq!(a.premature.first, vec![0, 5, 6]);
        assert_eq!(a.errors_by_errno["EIO"], 2);
    }
}
