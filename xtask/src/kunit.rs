//! `cargo xtask kunit`: boots the cached kernel (the same build the boot
//! smoke test uses) with `kunit.enable=1` and a suite filter, without a GPU,
//! and reports every KUnit case. The kernel's own verdict counts too: a splat
//! during the tests fails the run even when every case passed.

use crate::console;
use crate::guest::{self, Attempt, Guest};
use crate::ktap::{self, Outcome};
use crate::qemu::{Accel, GuestSpec};
use crate::report::EarlyBootStall;
use crate::{image, kernel, setup};
use anyhow::{Result, bail};
use std::time::Duration;

/// The KUnit tests of fencelab's kernel patch series: its own suites, and
/// its rustdoc examples, which the kernel turns into cases of the one
/// `rust_doctests_kernel` suite shared by the whole kernel crate.
pub const DEFAULT_FILTERS: [&str; 2] = [
    "rust_dma_fence*",
    "rust_doctests_kernel.rust_doctest_kernel_dma_buf_*",
];

#[derive(clap::Args, Debug, Clone)]
pub struct KunitArgs {
    /// KUnit tests to run, as `kunit.filter_glob` globs (`suite` or
    /// `suite.test`); repeatable, one guest boot per glob, since the kernel
    /// takes one glob per boot.
    #[arg(long = "filter", default_values_t = DEFAULT_FILTERS.map(String::from))]
    pub filters: Vec<String>,
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
            filters: DEFAULT_FILTERS.map(String::from).to_vec(),
            cpus: 2,
            timeout_secs: 900,
            console: false,
        }
    }
}

pub fn run(args: &KunitArgs) -> Result<()> {
    if args.filters.is_empty() {
        bail!("kunit: no --filter given");
    }
    let toolchain = setup::run()?;
    let kernel = kernel::build(&toolchain, &kernel::KernelArgs::default())?;
    let initramfs = image::build(&kernel)?;
    let (mut passed, mut failed, mut skipped, mut other) = (0, 0, 0, 0);
    for filter in &args.filters {
        let counts = run_filter(args, filter, &kernel, &initramfs)?;
        passed += counts.passed;
        failed += counts.failed;
        skipped += counts.skipped;
        other += counts.other_failures;
    }
    println!("kunit: {passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 || other > 0 {
        bail!("kunit: {failed} case(s) failed, {other} other failure(s)");
    }
    Ok(())
}

struct Counts {
    passed: usize,
    failed: usize,
    skipped: usize,
    other_failures: usize,
}

/// One boot with `kunit.filter_glob=filter`; prints each case.
fn run_filter(
    args: &KunitArgs,
    filter: &str,
    kernel: &kernel::Kernel,
    initramfs: &std::path::Path,
) -> Result<Counts> {
    let (counts, _stalls) = guest::retry_early_boot_stalls(&format!("kunit {filter}"), || {
        boot_filter(args, filter, kernel, initramfs)
    })?;
    Ok(counts)
}

fn boot_filter(
    args: &KunitArgs,
    filter: &str,
    kernel: &kernel::Kernel,
    initramfs: &std::path::Path,
) -> Result<Attempt<Counts>> {
    let run_dir = guest::new_run_dir("kunit")?;
    eprintln!("kunit: {filter}; run folder {}", run_dir.display());
    let spec = GuestSpec {
        kernel: kernel.bzimage.clone(),
        initramfs: initramfs.to_path_buf(),
        gpu_socket: None,
        memory_mib: 1024,
        cpus: args.cpus,
        accel: Accel::Tcg,
        cmdline_extra: vec![
            "kunit.enable=1".into(),
            format!("kunit.filter_glob={filter}"),
            // The init powers off at once: built-in suites ran before it.
            "fencelab.workload=kunit".into(),
        ],
    };
    let mut guest = Guest::launch(&spec, &run_dir, args.console)?;
    let mut failures = Vec::new();
    let ended = guest.supervise(None, Duration::from_secs(args.timeout_secs), &mut failures)?;
    let outcome = guest.finish()?;
    if let crate::guest::Ended::StalledBeforeInit {
        after_line,
        last_line,
    } = ended
    {
        // Before the first KTAP line nothing of the suites has run: a TCG
        // stall, boot again. Once they started, a silent kernel is a hang in
        // the code under test and a failure.
        if !outcome.console.contains("KTAP version") {
            return Ok(Attempt::Stalled(EarlyBootStall {
                run_dir,
                after_line,
                last_line,
            }));
        }
        failures.push(format!(
            "the kernel went silent after console line {after_line} ({last_line}) while the suites ran"
        ));
    }

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
            "no KUnit results for {filter:?}: is it built into kernel {} ({})?",
            kernel.release, kernel.key
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
    println!("console: {}", run_dir.join("console.log").display());
    for failure in &failures {
        println!("FAILURE: {failure}");
    }
    Ok(Attempt::Done(Counts {
        passed: results.count(Outcome::Pass),
        failed: results.count(Outcome::Fail),
        skipped: results.count(Outcome::Skip),
        other_failures: failures.len(),
    }))
}
