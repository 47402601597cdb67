//! The `FENCELAB_RESULT {json}` line: what a guest workload run counted.

use serde::{Deserialize, Serialize};

use crate::{RttUs, UnloadReport};

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
    /// `unload-live`'s own figures; absent for the other workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unload: Option<UnloadReport>,
    pub ok: bool,
}

impl ResultLine {
    /// Fences that reached the device: every submission attempt except the
    /// ioctls that failed.
    pub fn fences_sent(&self) -> u64 {
        self.fences_submitted.saturating_sub(self.submit_failures)
    }
}
