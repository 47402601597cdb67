//! [`DeviceControl`] for [`FencelabGpu`]: what the control plane can do to
//! a running device. Plan changes go to the decider under its mutex (the
//! vring thread takes the same one per fence); releases and pause go to the
//! engine and are in effect when the call returns.

use serde_json::Value;
use tracing::warn;

use super::{FenceDesk, FencelabGpu, lock};
use crate::fault::{Accounting, DeviceControl, PlanView, ReleaseTarget, TraceEvent};

/// The decider's plan and its hash, read under one lock.
fn view(desk: &FenceDesk) -> PlanView {
    PlanView {
        plan: desk.decider.plan_json(),
        sha256: desk.decider.plan_sha256(),
    }
}

impl FencelabGpu {
    /// Traces a plan change with the same hash `Start` uses
    /// ([`crate::plan::Plan::sha256_hex`]).
    fn trace_plan_loaded(&self, origin: &str, plan: &PlanView) {
        self.tracer.record(TraceEvent::PlanLoaded {
            t_ns: self.clock.now_ns(),
            origin: origin.to_string(),
            plan_sha256: plan.sha256.clone(),
        });
    }
}

impl DeviceControl for FencelabGpu {
    fn load_plan(&self, source: &str, origin: &str) -> Result<PlanView, String> {
        let plan = {
            let mut desk = lock(&self.desk);
            desk.decider.load_plan(source, origin)?;
            view(&desk)
        };
        self.trace_plan_loaded(origin, &plan);
        Ok(plan)
    }

    fn patch_plan(&self, patch: &Value) -> Result<PlanView, String> {
        let plan = {
            let mut desk = lock(&self.desk);
            desk.decider.patch_plan(patch)?;
            view(&desk)
        };
        self.trace_plan_loaded("patch", &plan);
        Ok(plan)
    }

    fn plan(&self) -> PlanView {
        view(&lock(&self.desk))
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
    fn plan_changes_go_to_the_decider_and_the_trace() {
        let (gpu, log) = device();
        let before = gpu.plan();
        assert_eq!(
            before.sha256,
            Plan::fixed_latency(std::time::Duration::from_millis(1)).sha256_hex()
        );
        let err = gpu.load_plan("[default]\nlatency = 12\n", "bad.toml");
        assert!(err.is_err(), "{err:?}");
        assert_eq!(gpu.plan(), before, "a refused plan changes nothing");
        assert!(log.events().is_empty());

        let source = "[default]\nlatency = \"3ms\"\n";
        let plan = gpu.load_plan(source, "new.toml").unwrap();
        assert_eq!(plan, gpu.plan());
        let parsed = Plan::parse(source, "new.toml").unwrap();
        assert_eq!(plan.sha256, parsed.sha256_hex());
        let patched = gpu
            .patch_plan(&serde_json::json!({"default": {"latency": "5ms"}}))
            .unwrap();
        assert_eq!(patched, gpu.plan());
        assert_ne!(patched.sha256, plan.sha256);
        // A patched plan's hash is the plan module's (of the TOML it was
        // checked as), not one of its JSON.
        let rebuilt = Plan::from_json(&patched.plan, "new.toml (patched)").unwrap();
        assert_eq!(patched.sha256, rebuilt.sha256_hex());
        let events = log.events();
        match &events[..] {
            [
                TraceEvent::PlanLoaded {
                    origin,
                    plan_sha256,
                    ..
                },
                TraceEvent::PlanLoaded {
                    origin: o2,
                    plan_sha256: sha2,
                    ..
                },
            ] => {
                assert_eq!(origin, "new.toml");
                assert_eq!(plan_sha256, &plan.sha256);
                assert_eq!(o2, "patch");
                assert_eq!(sha2, &patched.sha256);
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
