//! `cargo xtask test`: the README's test command and what CI runs. The
//! workspace's unit tests first (fast, no QEMU), then a real boot smoke test
//! (a Linux 7.3 guest sends fenced work through QEMU to fencelab-device),
//! a boot with each example fault plan, boots with the fencelab_drm driver
//! (smoke, unload-live, deadlines), the harness fault test, then the
//! KUnit suites of the kernel patch series on the same kernel.

use crate::boot::{self, BootArgs};
use crate::paths;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct TestArgs {
    /// Only the unit tests; skip building the kernel and booting guests.
    #[arg(long)]
    pub no_boot: bool,
}

pub fn run(args: &TestArgs) -> Result<()> {
    unit_tests()?;
    if args.no_boot {
        eprintln!("test: boot smoke test skipped (--no-boot)");
        return Ok(());
    }
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
    fencelab_drm_boots()?;
    backend_death_is_reported()?;
    eprintln!("test: KUnit suites of the guest-driver series (cargo xtask kunit)");
    crate::kunit::run(&crate::kunit::KunitArgs::default())
}

fn unit_tests() -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args(["test", "--workspace"])
        .current_dir(paths::workspace_root());
    // CI must test exactly the dependency versions that were committed.
    if std::env::var_os("CI").is_some() {
        command.arg("--locked");
    }
    eprintln!("test: cargo test --workspace");
    let status = command.status().context("running cargo test")?;
    if !status.success() {
        bail!("unit tests failed ({status})");
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

/// One boot of the `fencelab_drm` stage: what it runs, and what must hold
/// beyond the boot's own verdict.
struct DriverBoot {
    name: &'static str,
    args: BootArgs,
    /// The device must have pulled fences in on the guest's deadlines.
    expect_boosts: bool,
}

/// Boots the guest with fencelab_drm instead of virtio_gpu: smoke, a short
/// unload-live (rmmod with fences pending and their sync_files open, then
/// FILE_INFO/poll on each), and unload-live against the deadline-boost plan,
/// which must show the guest's `SYNC_IOC_SET_DEADLINE` reaching the device
/// as boosts.
fn fencelab_drm_boots() -> Result<()> {
    use crate::boot::Driver;
    let root = paths::workspace_root();
    let unload = |fences: u32, rounds: u32| BootArgs {
        driver: Driver::Fencelab,
        workload: "unload-live".into(),
        fences: Some(fences),
        hammer_args: vec![format!("--rounds={rounds}")],
        ..BootArgs::default()
    };
    let boots = [
        DriverBoot {
            name: "smoke",
            args: BootArgs {
                driver: Driver::Fencelab,
                fences: Some(PLAN_FENCES),
                ..BootArgs::default()
            },
            expect_boosts: false,
        },
        DriverBoot {
            name: "unload-live",
            args: unload(1000, 5),
            expect_boosts: false,
        },
        DriverBoot {
            name: "unload-live + deadline-boost.toml",
            args: BootArgs {
                plan: Some(root.join("device/plans/deadline-boost.toml")),
                seed: Some(PLAN_SEED),
                ..unload(400, 2)
            },
            expect_boosts: true,
        },
    ];
    let (mut passed, mut failed) = (0, 0);
    for boot in boots {
        eprintln!("test: fencelab_drm {}", boot.name);
        let summary = boot::execute(&boot.args)?;
        if crate::supervise::was_interrupted() {
            crate::report::print(&summary, false);
            bail!("interrupted during fencelab_drm {}", boot.name);
        }
        let boosts = summary
            .device
            .as_ref()
            .and_then(|d| d.accounting.as_ref())
            .map_or(0, |a| a.deadline_boosts);
        let mut problems = Vec::new();
        if !summary.ok {
            problems.push("the boot failed (FAILURE lines above)".to_string());
        }
        if boot.expect_boosts && boosts == 0 {
            problems.push(
                "the device boosted no fence: deadlines set in the guest did not reach it".into(),
            );
        }
        if problems.is_empty() {
            passed += 1;
            println!(
                "fencelab_drm {}: PASS ({} fences, {boosts} deadline boosts){}",
                boot.name,
                summary.fences_signaled,
                stall_note(&summary)
            );
        } else {
            failed += 1;
            crate::report::print(&summary, false);
            println!("fencelab_drm {}: FAIL: {}", boot.name, problems.join("; "));
        }
    }
    println!("fencelab_drm: {passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} fencelab_drm boot(s) failed");
    }
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
