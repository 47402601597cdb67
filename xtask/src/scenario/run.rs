//! One scenario on one driver: the boot it makes, and its judged result.

use anyhow::Result;
use serde::Serialize;
use std::path::PathBuf;

use super::judge::{self, Judgement, Verdict};
use super::spec::{self, Scenario};
use crate::boot::{self, BootArgs, Driver};
use crate::bugs::Bug;
use crate::console::Splat;
use crate::report::{Finding, Summary};

/// What to run.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub scenario: &'a Scenario,
    pub driver: Driver,
    pub seed: Option<u64>,
    /// Replaces the scenario's plan.
    pub plan: Option<PathBuf>,
    /// Replaces the scenario's fence count.
    pub fences: Option<u32>,
    pub inject_bug: Option<&'static Bug>,
    /// Echo the guest console.
    pub console: bool,
}

/// The outcome of one run, as reported (JSON, JUnit, the table).
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub scenario: String,
    pub driver: &'static str,
    /// What the scenario requires (from its file).
    pub must_hold: String,
    pub verdict: Verdict,
    /// With `--inject-bug`: whether a splat of the bug's class was seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bug: Option<BugOutcome>,
    /// Why it failed, or why the driver cannot run it.
    pub reasons: Vec<String>,
    pub driver_findings: Vec<Finding>,
    pub splats: Vec<Splat>,
    pub fences_submitted: u64,
    pub fences_signaled: u64,
    pub seed: Option<u64>,
    /// The one command that repeats this run on a clone of this commit.
    pub reproduce: String,
    /// First 16 hex digits of the kernel cache key the run booted.
    pub kernel: Option<String>,
    pub run_dir: Option<PathBuf>,
    pub seconds: f64,
}

/// Whether an injected bug was caught.
#[derive(Debug, Clone, Serialize)]
pub struct BugOutcome {
    pub name: &'static str,
    pub expected_splats: &'static [&'static str],
    /// The first splat of an expected class, if any.
    pub caught_by: Option<String>,
}

impl Outcome {
    /// A driver that cannot run the scenario.
    pub fn unsupported(scenario: &Scenario, driver: Driver, reason: String) -> Self {
        Outcome {
            scenario: scenario.name.clone(),
            driver: spec::driver_key(driver),
            must_hold: scenario.must_hold.clone(),
            verdict: Verdict::Unsupported,
            bug: None,
            reasons: vec![reason],
            driver_findings: Vec::new(),
            splats: Vec::new(),
            fences_submitted: 0,
            fences_signaled: 0,
            seed: None,
            reproduce: String::new(),
            kernel: None,
            run_dir: None,
            seconds: 0.0,
        }
    }

    /// An injected bug that the run caught with a splat of its class.
    pub fn caught_bug(&self) -> bool {
        self.bug.as_ref().is_some_and(|b| b.caught_by.is_some())
    }
}

/// Boots the scenario once and judges it. `Err` only when the run could not
/// start (a plan that is not there, a kernel that does not build).
pub fn run(req: &Request) -> Result<Outcome> {
    let scenario = req.scenario;
    let driver_spec = match scenario.for_driver(req.driver) {
        Ok(spec) => spec,
        Err(reason) => return Ok(Outcome::unsupported(scenario, req.driver, reason)),
    };
    let started = std::time::Instant::now();
    let mut hammer_args = scenario.workload.args.clone();
    hammer_args.extend(driver_spec.args.iter().cloned());
    let mut args = BootArgs {
        workload: scenario.workload.name.clone(),
        driver: req.driver,
        fences: Some(req.fences.unwrap_or(scenario.workload.fences)),
        plan: req.plan.clone().or_else(|| scenario.plan_path()),
        seed: req.seed,
        hammer_args,
        console: req.console,
        inject_bug: req.inject_bug.map(|b| b.name.to_owned()),
        allow_fence_errors: driver_spec.expect.errors_allowed.clone(),
        ..BootArgs::default()
    };
    if let Some(secs) = scenario.workload.timeout_secs {
        args.timeout_secs = secs;
    }
    let summary = boot::execute(&args)?;
    let guest = summary
        .guest
        .as_ref()
        .and_then(|g| serde_json::to_value(g).ok());
    let Judgement {
        verdict,
        reasons,
        driver_findings,
    } = judge::judge(
        &driver_spec.expect,
        req.driver,
        &judge::Evidence::of(&summary, guest.as_ref()),
    );
    let bug = req.inject_bug.map(|bug| BugOutcome {
        name: bug.name,
        expected_splats: bug.expect_splats,
        caught_by: summary
            .splat_details
            .iter()
            .find(|s| bug.expect_splats.contains(&s.class))
            .map(Splat::summary),
    });
    Ok(Outcome {
        scenario: scenario.name.clone(),
        driver: spec::driver_key(req.driver),
        must_hold: scenario.must_hold.clone(),
        verdict,
        bug,
        reasons,
        driver_findings,
        splats: summary.splat_details.clone(),
        fences_submitted: summary.fences_submitted,
        fences_signaled: summary.fences_signaled,
        seed: summary.seed,
        reproduce: reproduce(req, &summary),
        kernel: Some(summary.kernel.cache_key.chars().take(16).collect()),
        run_dir: Some(summary.run_dir.clone()),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `cargo xtask scenario …` with everything that pins the run: the seed the
/// device used, the plan when it was not the scenario's, the bug.
fn reproduce(req: &Request, summary: &Summary) -> String {
    let mut words = vec![
        "cargo xtask scenario".to_owned(),
        req.scenario.name.clone(),
        format!("--driver {}", driver_value(req.driver)),
    ];
    if let Some(seed) = summary.seed.or(req.seed) {
        words.push(format!("--seed {seed}"));
    }
    if let Some(plan) = &req.plan {
        words.push(format!("--plan {}", boot::shown_path(plan)));
    }
    if let Some(fences) = req.fences {
        words.push(format!("--fences {fences}"));
    }
    if let Some(bug) = req.inject_bug {
        words.push(format!("--inject-bug {}", bug.name));
    }
    words.join(" ")
}

/// The `--driver` value naming `driver` on xtask's command line.
pub fn driver_value(driver: Driver) -> &'static str {
    match driver {
        Driver::VirtioGpu => "virtio-gpu",
        Driver::Fencelab => "fencelab",
    }
}
