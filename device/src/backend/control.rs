//! [`DeviceControl`] for [`FencelabGpu`]: what the control plane can do to
//! a running device. Plan changes go to the decider under its mutex (the
//! vring thread takes the same one per fence); releases and pause go to the
//! engine and are in effect when the call returns.

use serde_json::Value;
use sha2::{Digest, Sha256};
use tracing::warn;

use super::{FencelabGpu, lock};
use crate::fault::{Accounting, DeviceControl, ReleaseTarget, TraceEvent};

/// Lower-case hex SHA-256 of `bytes`.
fn sha256_hex(bytes: &[u8]) -> String {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::DeviceConfig;
    use crate::decide::PlanDecider;
    use crate::plan::Plan;
    use crate::stats::Stats;
    use crate::trace::MemoryTrace;

    fn device() -> (FencelabGpu, Arc<MemoryTrace>) {
        let log = Arc::new(MemoryTrace::default());
        let gpu = FencelabGpu::new(DeviceConfig {
            decider: Box::new(PlanDecider::new(
                Plan::fixed_latency(std::time::Duration::from_millis(1)),
                99,
            )),
            tracer: log.clone(),
            stats: Arc::new(Stats::new()),
        })
        .unwrap();
        (gpu, log)
    }

    #[test]
    fn sha256_is_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn plan_changes_go_to_the_decider_and_the_trace() {
        let (gpu, log) = device();
        let before = gpu.plan();
        let err = gpu.load_plan("[default]\nlatency = 12\n", "bad.toml");
        assert!(err.is_err(), "{err:?}");
        assert_eq!(gpu.plan(), before, "a refused plan changes nothing");
        assert!(log.events().is_empty());

        let source = "[default]\nlatency = \"3ms\"\n";
        let plan = gpu.load_plan(source, "new.toml").unwrap();
        assert_eq!(plan, gpu.plan());
        let patched = gpu
            .patch_plan(&serde_json::json!({"default": {"latency": "5ms"}}))
            .unwrap();
        assert_ne!(patched, plan);
        let events = log.events();
        match &events[..] {
            [
                TraceEvent::PlanLoaded {
                    origin,
                    plan_sha256,
                    ..
                },
                TraceEvent::PlanLoaded { origin: o2, .. },
            ] => {
                assert_eq!(origin, "new.toml");
                assert_eq!(plan_sha256, &sha256_hex(source.as_bytes()));
                assert_eq!(o2, "patch");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn control_calls_report_and_refuse_precisely() {
        let (gpu, _) = device();
        let err = gpu.release(ReleaseTarget::Fence { fence: 5 }).unwrap_err();
        assert!(err.contains("fence 5"), "{err}");
        assert_eq!(gpu.release(ReleaseTarget::All), Ok(0));
        gpu.set_paused(true);
        let s = DeviceControl::stats(&gpu);
        assert_eq!(
            (s["seed"].as_u64(), s["paused"].as_bool()),
            (Some(99), Some(true))
        );
        assert_eq!(DeviceControl::accounting(&gpu), Accounting::default());
        assert_eq!(gpu.flush_trace(), Ok(()));
        assert_eq!(gpu.summary()["seed"], 99);
    }
}
