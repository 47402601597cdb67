//! `cargo xtask test`: the README's test command and what CI runs. The
//! workspace's unit tests first (fast, no QEMU), then a real boot smoke test
//! (a Linux 7.3 guest sends fenced work through QEMU to fencelab-device),
//! then the KUnit suites of the kernel patch series on the same kernel.

use crate::boot::{self, BootArgs};
use crate::paths;
use anyhow::{Context, Result, bail};
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
    println!("boot-smoke: 1 passed, 0 failed");
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

/// Harness self-test: when fencelab-device dies mid-run, boot must fail
/// saying so, and neither QEMU nor the backend may survive the run.
fn backend_death_is_reported() -> Result<()> {
    eprintln!("test: harness fault test (fencelab-device killed mid-run)");
    let args = BootArgs {
        // Far more than can finish before the kill.
        fences: 1_000_000,
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
