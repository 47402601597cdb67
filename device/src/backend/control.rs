//! [`DeviceControl`] for [`FencelabGpu`]: what the control plane can do to
//! a running device. Plan changes go to the decider under its mutex (the
//! vring thread takes the same one per fence); releases and pause go to the
//! engine and are in effect when the call returns.

use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use tracing::warn;

use super::{FencelabGpu, lock};
use crate::fault::{
    Accounting, Decide, Decision, DeviceControl, FenceInfo, ReleaseTarget, TraceEvent,
};

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl DeviceControl for FencelabGpu {
    fn load_plan(&self, source: &str, origin: &str) -> Result<Value, String> {
        let plan = {
            let mut desk = lock(&self.desk);
            desk.decider.load_plan(source, origin)?;
            desk.decider.plan_json()
        };
        self.tracer.record(TraceEvent::PlanLoaded {
            t_ns: self.clock.now_ns(),
            origin: origin.to_string(),
            plan_sha256: sha256_hex(source.as_bytes()),
        });
        Ok(plan)
    }

    /// The trace records the SHA-256 of the patched plan's JSON (there is no
    /// source text).
    fn patch_plan(&self, patch: &Value) -> Result<Value, String> {
        let plan = {
            let mut desk = lock(&self.desk);
            desk.decider.patch_plan(patch)?;
            desk.decider.plan_json()
        };
        self.tracer.record(TraceEvent::PlanLoaded {
            t_ns: self.clock.now_ns(),
            origin: "patch".to_string(),
            plan_sha256: sha256_hex(plan.to_string().as_bytes()),
        });
        Ok(plan)
    }

    fn plan(&self) -> Value {
        lock(&self.desk).decider.plan_json()
    }

    fn release(&self, target: ReleaseTarget) -> Result<u64, String> {
        self.engine.release(target)
    }

    fn set_paused(&self, paused: bool) {
        match self.engine.set_paused(paused) {
            Ok(()) => self
                .paused
                .store(paused, std::sync::atomic::Ordering::Release),
            Err(e) => warn!(
                "cannot {} the engine: {e}",
                if paused { "pause" } else { "resume" }
            ),
        }
    }

    /// [`crate::stats::Stats::json`] plus `seed` and `paused`.
    fn stats(&self) -> Value {
        let mut j = self.stats.json();
        j["seed"] = self.seed().into();
        j["paused"] = self
            .paused
            .load(std::sync::atomic::Ordering::Acquire)
            .into();
        j["fences_outstanding"] = self.stats.fences_outstanding().into();
        j
    }

    fn accounting(&self) -> Accounting {
        self.stats.accounting()
    }

    fn flush_trace(&self) -> Result<(), String> {
        self.tracer
            .flush()
            .map_err(|e| format!("cannot flush the trace: {e}"))
    }
}

/// Every fence completes `latency` (plus its `WORK`) after it arrived.
///
/// TEMPORARY: keeps `--latency` working until `plan::Plan::fixed_latency`
/// and `decide::PlanDecider` land; remove it then.
#[derive(Debug, Clone, Copy)]
pub struct FixedLatency {
    latency: Duration,
}

impl FixedLatency {
    pub fn new(latency: Duration) -> Self {
        FixedLatency { latency }
    }
}

impl Decide for FixedLatency {
    fn decide(&mut self, _fence: &FenceInfo) -> Decision {
        Decision {
            latency_ns: u64::try_from(self.latency.as_nanos()).unwrap_or(u64::MAX),
            ..Decision::default()
        }
    }

    fn seed(&self) -> u64 {
        0
    }

    fn deadline_boost(&self) -> Option<Duration> {
        None
    }

    fn irq_rescue(&self) -> Option<Duration> {
        None
    }

    fn load_plan(&mut self, _source: &str, origin: &str) -> Result<(), String> {
        Err(format!(
            "cannot load plan {origin}: this device runs a fixed latency, without a plan engine"
        ))
    }

    fn patch_plan(&mut self, _patch: &Value) -> Result<(), String> {
        Err("cannot patch the plan: this device runs a fixed latency, without a plan engine".into())
    }

    fn plan_json(&self) -> Value {
        serde_json::json!({ "latency_ns": self.latency.as_nanos() as u64 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_is_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
