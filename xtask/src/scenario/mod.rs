//! `cargo xtask scenario`: the catalogue of DESIGN.md §4 as data
//! (`scenarios/*.toml`, see [`spec`]), run on one or both drivers, judged
//! ([`judge`]) and reported as a table, JSON and JUnit XML ([`output`]).

pub mod judge;
pub mod output;
pub mod run;
pub mod spec;

use anyhow::{Result, bail};
use std::path::PathBuf;

use crate::boot::Driver;
use crate::bugs;
use judge::Verdict;
use run::{Outcome, Request};
use spec::Scenario;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct ScenarioArgs {
    /// Scenario to run (a file stem in scenarios/); with --inject-bug it
    /// defaults to the scenario that targets the bug.
    pub name: Option<String>,
    /// Run every scenario.
    #[arg(long, conflicts_with = "name")]
    pub all: bool,
    /// Only this driver [default: every driver the scenario supports].
    #[arg(long, value_enum)]
    pub driver: Option<Driver>,
    /// Seed for the device's random decisions [default: the device picks
    /// one and the report shows it].
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Device plan instead of the scenario's own.
    #[arg(long, value_name = "FILE")]
    pub plan: Option<PathBuf>,
    /// Fences instead of the scenario's count.
    #[arg(long, value_name = "N")]
    pub fences: Option<u32>,
    /// List the scenarios and the drivers that run them.
    #[arg(long, conflicts_with_all = ["name", "all"])]
    pub list: bool,
    /// Print the injectable driver bugs, one name per line.
    #[arg(long, conflicts_with_all = ["name", "all", "list"])]
    pub list_bugs: bool,
    /// Build fencelab_drm with this deliberate bug and run the scenario
    /// that targets it; exits non-zero when the harness catches it.
    #[arg(long, value_name = "BUG", conflicts_with = "all")]
    pub inject_bug: Option<String>,
    /// Echo the guest console while it runs.
    #[arg(long)]
    pub console: bool,
    /// Print the results as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &ScenarioArgs) -> Result<()> {
    if args.list_bugs {
        for bug in bugs::BUGS {
            println!("{}", bug.name);
        }
        return Ok(());
    }
    if args.list {
        for scenario in spec::load_all()? {
            println!("{}", output::list_line(&scenario));
        }
        return Ok(());
    }
    let bug = args.inject_bug.as_deref().map(bugs::find).transpose()?;
    if bug.is_some() && args.driver == Some(Driver::VirtioGpu) {
        bail!("--inject-bug: the bugs are in fencelab_drm; drop --driver virtio-gpu");
    }
    let scenarios: Vec<Scenario> = match (&args.name, args.all, bug) {
        (Some(name), _, _) => vec![spec::find(name)?],
        (None, true, _) => spec::load_all()?,
        (None, false, Some(bug)) => vec![spec::find(bug.scenario)?],
        (None, false, None) => {
            bail!("name a scenario, or --all (--list shows them, --list-bugs the injectable bugs)")
        }
    };
    if let Some(plan) = &args.plan {
        if !plan.is_file() {
            bail!("--plan {}: no such file", plan.display());
        }
    }
    let drivers: Vec<Driver> = match (args.driver, bug) {
        (Some(d), _) => vec![d],
        (None, Some(_)) => vec![Driver::Fencelab],
        (None, None) => vec![Driver::VirtioGpu, Driver::Fencelab],
    };
    let report_dir = crate::guest::new_run_dir("scenarios")?;
    let mut outcomes = Vec::new();
    for scenario in &scenarios {
        for &driver in &drivers {
            eprintln!(
                "scenario: {} on {}",
                scenario.name,
                spec::driver_key(driver)
            );
            let outcome = run::run(&Request {
                scenario,
                driver,
                seed: args.seed,
                plan: args.plan.clone(),
                fences: args.fences,
                inject_bug: bug,
                console: args.console,
            })?;
            eprintln!("scenario: {}", output::one_line(&outcome));
            outcomes.push(outcome);
            if crate::supervise::was_interrupted() {
                output::write_reports(&report_dir, &outcomes)?;
                bail!(
                    "interrupted; the results so far are in {}",
                    report_dir.display()
                );
            }
        }
    }
    let files = output::write_reports(&report_dir, &outcomes)?;
    output::print(&outcomes, &files, args.json);
    exit_verdict(&outcomes, bug)
}

/// The exit status: without a bug, any failed run fails; with one, the
/// command fails exactly when the harness caught the bug (so a bug that
/// slips through is the "success" a CI job must not accept).
fn exit_verdict(outcomes: &[Outcome], bug: Option<&bugs::Bug>) -> Result<()> {
    if let Some(bug) = bug {
        let caught = outcomes.iter().filter(|o| o.caught_bug()).count();
        let failed = outcomes
            .iter()
            .filter(|o| o.verdict == Verdict::Fail)
            .count();
        if caught > 0 {
            bail!(
                "bug {} caught: the scenario failed with a splat of class {}",
                bug.name,
                bug.expect_splats.join(" / ")
            );
        }
        if failed > 0 {
            bail!(
                "bug {} made the scenario fail, but without a splat of class {}: see the reasons above",
                bug.name,
                bug.expect_splats.join(" / ")
            );
        }
        eprintln!(
            "scenario: bug {} was NOT caught: every run passed",
            bug.name
        );
        return Ok(());
    }
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| o.verdict == Verdict::Fail)
        .map(|o| format!("{} on {}", o.scenario, o.driver))
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} scenario run(s) failed: {}",
            failed.len(),
            failed.join(", ")
        );
    }
    Ok(())
}
