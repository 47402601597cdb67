//! `cargo xtask kunit`: boots the cached kernel (the same build the boot
//! smoke test uses) with `kunit.enable=1` and a suite filter, without a GPU,
//! and reports every KUnit case. The kernel's own verdict counts too: a splat
//! during the tests fails the run even when every case passed.

use crate::console;
use crate::guest::{self, Guest};
use crate::ktap::{self, Outcome};
use crate::qemu::{Accel, GuestSpec};
use crate::{image, kernel, setup};
use anyhow::{Result, bail};
use std::time::Duration;

/// The suites of fencelab's kernel patch series.
pub const DEFAULT_FILTER: &str = "rust_dma_fence*";

#[derive(clap::Args, Debug, Clone)]
pub struct KunitArgs {
    /// KUnit suites to run (`kunit.filter_glob`).
    #[arg(long, default_value = DEFAULT_FILTER)]
    pub filter: String,
    /// Guest vCPUs (the race tests want at least two).
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Give up on the guest after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout_secs: u64,
    /// Echo the guest console to stderr while it runs.
    #[arg(long)]
    pub console: bool,
}

impl Default for KunitArgs {
    fn default() -> Self {
        Self {
            filter: DEFAULT_FILTER.into(),
            cpus: 2,
            timeout_secs: 900,
            console: false,
        }
    }
}

pub fn run(args: &KunitArgs) -> Result<()> {
    let toolchain = setup::run()?;
    let kernel = kernel::build(&toolchain, &kernel::KernelArgs::default())?;
    let initramfs = image::build(&kernel)?;
    let run_dir = guest::new_run_dir("kunit")?;
    eprintln!(
        "kunit: suites {}; run folder {}",
        args.filter,
        run_dir.display()
    );
    let spec = GuestSpec {
        kernel: kernel.bzimage.clone(),
        initramfs,
        gpu_socket: None,
        memory_mib: 1024,
        cpus: args.cpus,
        accel: Accel::Tcg,
        cmdline_extra: vec![
            "kunit.enable=1".into(),
            format!("kunit.filter_glob={}", args.filter),
            // The init powers off at once: built-in suites ran before it.
            "fencelab.workload=kunit".into(),
        ],
    };
    let mut guest = Guest::launch(&spec, &run_dir, args.console)?;
    let mut failures = Vec::new();
    guest.supervise(None, Duration::from_secs(args.timeout_secs), &mut failures)?;
    let outcome = guest.finish()?;

    let results = ktap::parse(&outcome.console);
    let verdict = console::parse(&outcome.console);
    for case in &results.cases {
        let label = match case.outcome {
            Outcome::Pass => "PASS",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "SKIP",
        };
        println!("{label} {}.{}", case.suite, case.name);
        for line in &case.detail {
            println!("     {line}");
        }
    }
    if results.cases.is_empty() {
        failures.push(format!(
            "no KUnit results for suites {:?}: is the suite built into kernel {} ({})?",
            args.filter, kernel.release, kernel.key
        ));
    }
    for suite in results.suites.iter().filter(|s| s.outcome == Outcome::Fail) {
        if !results
            .cases
            .iter()
            .any(|c| c.suite == suite.name && c.outcome == Outcome::Fail)
        {
            failures.push(format!("suite {} failed (init or exit)", suite.name));
        }
    }
    for splat in &verdict.splats {
        failures.push(format!("kernel splat: {}", splat.summary()));
        for line in splat.excerpt.iter().take(12) {
            println!("     {line}");
        }
    }
    if verdict.booted_release.is_none() {
        failures.push("the guest never reached its init after the KUnit suites".into());
    }
    let failed = results.count(Outcome::Fail);
    let passed = results.count(Outcome::Pass);
    let skipped = results.count(Outcome::Skip);
    println!("console: {}", run_dir.join("console.log").display());
    for failure in &failures {
        println!("FAILURE: {failure}");
    }
    println!("kunit: {passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 || !failures.is_empty() {
        bail!(
            "kunit: {failed} case(s) failed, {} other failure(s)",
            failures.len()
        );
    }
    Ok(())
}
