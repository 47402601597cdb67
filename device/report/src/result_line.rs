//! The `FENCELAB_RESULT {json}` line: what a guest workload run counted.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    ArrayOrderReport, CallbackRaceReport, DeadlineRaceReport, ResetReport, RttUs, UnloadReport,
};

/// Prefix of the result line on the guest's stdout (and so on the console).
pub const RESULT_MARKER: &str = "FENCELAB_RESULT ";

/// The JSON object of the result line. Field order is the key order.
///
/// Reading is tolerant of older and newer writers: unknown keys are
/// ignored and every key but the fence counts and `ok` may be missing
/// (it reads as 0 / empty / `None`); a line without those is not a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultLine {
    /// `None` when the run failed before its workload was known.
    #[serde(default)]
    pub workload: Option<String>,
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default)]
    pub driver: Option<String>,
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
    pub rtt_us: RttUs,
    /// Round trips by phase (fence-hammer `--rtt-phases N`: the fences split
    /// by number into N equal, contiguous phases); absent without it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rtt_us_by_phase: Vec<RttUs>,
    #[serde(default)]
    pub first_error: Option<String>,
    /// The timeline name from SYNC_IOC_FILE_INFO of the first fence read.
    #[serde(default)]
    pub timeline_name: Option<String>,
    /// Fences seen signaled before their WRITE landed (driver findings).
    #[serde(default)]
    pub premature_signals: u64,
    /// The first few of them, by fence number (0-based submission order).
    #[serde(default)]
    pub premature_fences: Vec<u64>,
    /// WRITE read-backs done (0 with `--no-write`).
    #[serde(default)]
    pub write_checks: u64,
    /// EXECBUFFER ioctls that failed (also in `fence_errors`): these never
    /// reached the device.
    #[serde(default)]
    pub submit_failures: u64,
    /// Fences seen signaled with an error, by errno name (`"ETIMEDOUT"`;
    /// `"ERRNO_n"` for a number without a name), whether or not the
    /// workload expected that error: `unload-live`'s and `reset`'s `-ENODEV`
    /// cut-offs are here too, though not in `fence_errors`. Always written,
    /// `{}` when none.
    #[serde(default)]
    pub errors_by_errno: BTreeMap<String, u64>,
    /// How many threads submitted fences (`signal-storm`: `--threads`;
    /// the other workloads: 1; 0 when the run never started).
    #[serde(default)]
    pub threads: u64,
    /// `unload-live`'s own figures; absent for the other workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unload: Option<UnloadReport>,
    /// `deadline-race`'s own figures; absent for the other workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_race: Option<DeadlineRaceReport>,
    /// `callback-vs-release`'s own figures; absent for the other workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callbacks: Option<CallbackRaceReport>,
    /// `array-order`'s own figures; absent for the other workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array_order: Option<ArrayOrderReport>,
    /// `reset`'s own figures; absent for the other workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset: Option<ResetReport>,
    pub ok: bool,
}

impl ResultLine {
    /// Fences that reached the device: every submission attempt except the
    /// ioctls that failed.
    pub fn fences_sent(&self) -> u64 {
        self.fences_submitted.saturating_sub(self.submit_failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_line_reads_with_empty_new_fields() {
        let line: ResultLine = serde_json::from_str(
            r#"{"workload":"smoke","fences_submitted":3,"fences_signaled":3,"fence_errors":0,"ok":true}"#,
        )
        .unwrap();
        assert!(line.errors_by_errno.is_empty());
        assert_eq!(line.threads, 0);
        assert_eq!(
            (
                line.deadline_race,
                line.callbacks,
                line.array_order,
                line.reset
            ),
            (None, None, None, None)
        );
    }

    #[test]
    fn new_fields_read_back() {
        let line: ResultLine = serde_json::from_str(
            r#"{"fences_submitted":3,"fences_signaled":3,"fence_errors":3,"ok":false,
                "errors_by_errno":{"ETIMEDOUT":3},"threads":4,
                "deadline_race":{"deadlines_set":7,"set_after_signal":2},
                "array_order":{"arrays":1,"components":4,"violations":0,"lag_us":{"p50":3,"p99":null}},
                "reset":{"rounds":2,"cut_off":5},"future_key":1}"#,
        )
        .unwrap();
        assert_eq!(line.errors_by_errno["ETIMEDOUT"], 3);
        assert_eq!(line.threads, 4);
        let d = line.deadline_race.unwrap();
        assert_eq!(
            (d.deadlines_set, d.set_after_signal, d.set_errors),
            (7, 2, 0)
        );
        let a = line.array_order.unwrap();
        assert_eq!(
            (a.components, a.lag_us.p50, a.lag_us.p99),
            (4, Some(3), None)
        );
        assert_eq!(line.reset.unwrap().cut_off, 5);
        assert_eq!(line.callbacks, None);
    }
}
