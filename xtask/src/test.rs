//! `cargo xtask test`: the README's test command and what CI runs. The
//! workspace's unit tests first (fast, no QEMU), a few seconds of fuzzing
//! of each fuzz target after replaying its corpus, then a real boot smoke test
//! (a Linux 7.3 guest sends fenced work through QEMU to fencelab-device),
//! a boot with each example fault plan, every scenario of the catalogue on
//! both drivers, each injected driver bug (which must be caught), a short
//! resumed soak, the harness fault test, the lifecycle checks (backend
//! killed and restarted, QMP system_reset; `lifecycle`), then the KUnit
//! suites of the kernel patch series on the same kernel.

use crate::boot::{self, BootArgs};
use crate::paths;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct TestArgs {
    /// Only the unit tests; skip the fuzz smoke, the kernel and the boots.
    #[arg(long)]
    pub no_boot: bool,
}

pub fn run(args: &TestArgs) -> Result<()> {
    unit_tests()?;
    if args.no_boot {
        eprintln!("test: fuzz smoke and boots skipped (--no-boot)");
        return Ok(());
    }
    eprintln!("test: fuzz smoke (cargo xtask fuzz --smoke)");
    crate::fuzz::smoke()?;
    eprintln!("test: boot smoke test (cargo xtask boot --workload smoke)");
    let boot_args = BootArgs::default();
    let summary = boot::execute(&boot_args)?;
    crate::report::print(&summary, false);
    if !summary.ok {
        println!("boot-smoke: 0 passed, 1 failed");
        bail!(
            "boot smoke test failed: {} failure(s), listed above as FAILURE lines",
            summary.failures.len()
        );
    }
    println!("boot-smoke: 1 passed, 0 failed{}", stall_note(&summary));
    plan_boots()?;
    scenario_runs()?;
    injected_bugs_are_caught()?;
    soak_resumes()?;
    backend_death_is_reported()?;
    crate::lifecycle::run()?;
    eprintln!("test: KUnit suites of the guest-driver series (cargo xtask kunit)");
    crate::kunit::run(&crate::kunit::KunitArgs::default())
}

fn unit_tests() -> Result<()> {
    cargo_test(&["--workspace"], "cargo test --workspace")?;
    // The fuzz targets' properties are plain functions with tests of their
    // own; the fuzz crate is a workspace of its own (cargo-fuzz's layout).
    cargo_test(
        &["--manifest-path", "fuzz/Cargo.toml"],
        "cargo test --manifest-path fuzz/Cargo.toml",
    )
}

fn cargo_test(args: &[&str], what: &str) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .arg("test")
        .args(args)
        .current_dir(paths::workspace_root());
    // CI must test exactly the dependency versions that were committed.
    if std::env::var_os("CI").is_some() {
        command.arg("--locked");
    }
    eprintln!("test: {what}");
    let status = command
        .status()
        .with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("unit tests failed: {what} ({status})");
    }
    Ok(())
}

/// The seed every plan is booted with, so that a failure here repeats.
const PLAN_SEED: u64 = 1;
/// Fences per plan boot: enough for every rule of the example plans to fire
/// (hang.toml stalls arrival 500); the boot, not the fences, is what makes
/// each plan take half a minute under TCG.
const PLAN_FENCES: u32 = 600;

/// Boots every example plan in `device/plans/` (not `broken/`, which holds
/// plans that must be refused). Harness failures fail the stage; findings
/// about the driver (premature signals…) are printed, not failed.
fn plan_boots() -> Result<()> {
    let dir = paths::workspace_root().join("device").join("plans");
    let plans = plan_files(&dir)?;
    eprintln!(
        "test: {} plan(s) from {} (seed {PLAN_SEED}, {PLAN_FENCES} fences each)",
        plans.len(),
        dir.display()
    );
    let (mut passed, mut failed) = (0, 0);
    for plan in &plans {
        let name = plan.file_name().map_or_else(
            || plan.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        eprintln!("test: plan {name}");
        let args = BootArgs {
            plan: Some(plan.clone()),
            seed: Some(PLAN_SEED),
            fences: Some(PLAN_FENCES),
            ..BootArgs::default()
        };
        let summary = boot::execute(&args)?;
        if crate::supervise::was_interrupted() {
            crate::report::print(&summary, false);
            bail!("interrupted during plan {name}; the remaining plans were not booted");
        }
        let findings: Vec<String> = summary
            .findings
            .iter()
            .map(|f| format!("{} ×{}", f.kind, f.count))
            .collect();
        if summary.ok {
            passed += 1;
            println!(
                "plan {name}: PASS ({} fences, findings: {}){}",
                summary.fences_signaled,
                if findings.is_empty() {
                    "none".into()
                } else {
                    findings.join(", ")
                },
                stall_note(&summary)
            );
        } else {
            failed += 1;
            crate::report::print(&summary, false);
            println!("plan {name}: FAIL");
        }
    }
    println!("plans: {passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} plan boot(s) failed; their FAILURE lines are above");
    }
    Ok(())
}

/// Every scenario of the catalogue on every driver that supports it
/// (`cargo xtask scenario --all`): harness failures and broken expectations
/// fail the stage; upstream virtio_gpu's findings are reported, labelled.
fn scenario_runs() -> Result<()> {
    eprintln!("test: every scenario on every driver (cargo xtask scenario --all)");
    let args = crate::scenario::ScenarioArgs {
        all: true,
        seed: Some(PLAN_SEED),
        ..Default::default()
    };
    let result = crate::scenario::run(&args);
    println!(
        "scenarios: {}",
        if result.is_ok() {
            "all passed"
        } else {
            "FAILED"
        }
    );
    result
}

/// Each deliberate fencelab_drm bug must make the scenario that targets it
/// fail with a splat of the bug's class (the clean build passed the same
/// scenario in [`scenario_runs`]).
fn injected_bugs_are_caught() -> Result<()> {
    use crate::scenario::{run, spec};
    let (mut caught, mut missed) = (0, Vec::new());
    for bug in crate::bugs::BUGS {
        eprintln!(
            "test: bug {} must be caught by scenario {}",
            bug.name, bug.scenario
        );
        let scenario = spec::find(bug.scenario)?;
        let outcome = run::run(&run::Request {
            scenario: &scenario,
            driver: crate::boot::Driver::Fencelab,
            seed: Some(PLAN_SEED),
            plan: None,
            fences: None,
            inject_bug: Some(bug),
            console: false,
        })?;
        // The details quote the splat that caught it (or say nothing did).
        println!("{}", crate::scenario::output::one_line(&outcome));
        print!("{}", crate::scenario::output::details(&outcome));
        if outcome.caught_bug() {
            caught += 1;
        } else {
            missed.push(bug.name);
        }
        if crate::supervise::was_interrupted() {
            bail!("interrupted during bug {}", bug.name);
        }
    }
    println!("injected bugs: {caught} caught, {} missed", missed.len());
    if !missed.is_empty() {
        bail!("the harness missed injected bug(s): {}", missed.join(", "));
    }
    Ok(())
}

/// A two-run soak, stopped after one run and resumed: the derived plans
/// boot, the state is saved and picked up again.
fn soak_resumes() -> Result<()> {
    use crate::soak::{self, SoakArgs, state::Shard};
    eprintln!("test: soak, one run, then resumed for one more");
    let seed = PLAN_SEED;
    let dir = paths::runs_dir().join(format!("soak-{seed}-shard-0-of-1"));
    let _ = std::fs::remove_dir_all(&dir);
    let first = SoakArgs {
        duration: Some(std::time::Duration::from_secs(3600)),
        seed: Some(seed),
        shard: Shard { index: 0, count: 1 },
        driver: None,
        max_runs: Some(1),
        resume: None,
        keep_passing_runs: false,
    };
    soak::run(&first)?;
    soak::run(&SoakArgs {
        duration: None,
        seed: None,
        resume: Some(dir.clone()),
        ..first
    })?;
    let state = soak::state::State::load(&dir.join("state.json"))?;
    if state.runs != 2 || state.next != 2 {
        bail!(
            "the resumed soak counted {} runs (next {}), expected 2",
            state.runs,
            state.next
        );
    }
    if state.failed > 0 {
        bail!(
            "{} soak run(s) failed; see {}",
            state.failed,
            dir.join("report.json").display()
        );
    }
    println!("soak: 2 runs over a resume, {} fences", state.fences);
    Ok(())
}

/// Says when a passing boot needed more than one attempt (see
/// `guest::EARLY_BOOT_STALL`), so that the retries stay visible.
fn stall_note(summary: &crate::report::Summary) -> String {
    match summary.early_boot_stalls.len() {
        0 => String::new(),
        n => format!(" after {n} early-boot stall(s), booted again"),
    }
}

/// The `*.toml` files directly in `dir`, sorted by name.
fn plan_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("listing plans in {}", dir.display()))?;
    let mut plans = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("listing plans in {}", dir.display()))?
            .path();
        if path.is_file() && path.extension().is_some_and(|e| e == "toml") {
            plans.push(path);
        }
    }
    plans.sort();
    Ok(plans)
}

/// Harness self-test: when fencelab-device dies mid-run, boot must fail
/// saying so, and neither QEMU nor the backend may survive the run.
fn backend_death_is_reported() -> Result<()> {
    eprintln!("test: harness fault test (fencelab-device killed mid-run)");
    let args = BootArgs {
        // Far more than can finish before the kill.
        fences: Some(1_000_000),
        kill_device_mid_run: true,
        ..BootArgs::default()
    };
    let summary = boot::execute(&args)?;
    let reported = summary
        .failures
        .iter()
        .any(|f| f.starts_with("fencelab-device exited while the workload ran"));
    let socket = boot::socket_dir_path().join("gpu.sock");
    let survivors = processes_naming(&socket.to_string_lossy());
    if summary.ok || !reported || !survivors.is_empty() {
        println!("backend-death: 0 passed, 1 failed");
        bail!(
            "killing fencelab-device mid-run: run ok={} (must be false), failure reported={reported}, \
             processes left behind: {survivors:?}; failures: {:?}",
            summary.ok,
            summary.failures
        );
    }
    println!("backend-death: 1 passed, 0 failed");
    Ok(())
}

/// Pids of live processes whose command line contains `needle`.
fn processes_naming(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmdline| String::from_utf8_lossy(&cmdline).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_files_are_the_tomls_directly_in_the_folder() {
        let dir = std::env::temp_dir().join(format!("fencelab-plans-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("broken")).unwrap();
        for name in ["reorder.toml", "hang.toml", "README.md", "broken/bad.toml"] {
            std::fs::write(dir.join(name), "").unwrap();
        }
        std::fs::create_dir(dir.join("dir.toml")).unwrap();
        let plans = plan_files(&dir).unwrap();
        let names: Vec<_> = plans
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["hang.toml", "reorder.toml"]);
        std::fs::remove_dir_all(&dir).unwrap();
        let err = format!("{:#}", plan_files(&dir).unwrap_err());
        assert!(err.contains("listing plans in"), "{err}");
    }
}
