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
