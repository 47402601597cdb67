//! `cargo xtask`: fencelab's build, boot and test driver.
//!
//! Every step is plain Rust; external tools (apt, make, QEMU) are run as child
//! processes with their output shown or logged, never through shell scripts.

mod bench;
mod boot;
mod bugs;
mod cmd;
mod console;
mod cpio;
mod crosscheck;
mod fuzz;
mod guest;
mod image;
mod junit;
mod kernel;
mod ktap;
mod kunit;
mod latency;
mod latency_plot;
mod lifecycle;
mod paths;
mod peer;
mod qemu;
mod qmp;
mod report;
mod run_report;
mod scenario;
mod setup;
mod soak;
mod supervise;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, boot and test fencelab", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the build needs (apt packages, Linux 7.3 source, rust-src, bindgen); idempotent.
    Setup,
    /// Build the guest kernel and modules (cached outside the clone).
    Kernel(kernel::KernelArgs),
    /// Build the initramfs (busybox, modules, fence-hammer, init).
    Image,
    /// The main job: setup, kernel, image, start fencelab-device, boot QEMU, run a workload, report.
    Boot(boot::BootArgs),
    /// Boot the kernel with KUnit enabled and report the patch series' KUnit suites.
    Kunit(kunit::KunitArgs),
    /// Run scenarios of the catalogue (scenarios/*.toml) and judge them; inject driver bugs.
    Scenario(scenario::ScenarioArgs),
    /// Loop scenarios with plans derived from a seed, for a set time (sharded, resumable).
    Soak(soak::SoakArgs),
    /// Benchmarks: fence round trips against rust-vmm's vhost-device-gpu,
    /// latency-injection accuracy, backend cost, boot time, criterion benches.
    Bench(bench::BenchArgs),
    /// cargo-fuzz targets: `--smoke` (seconds per target) or one target for `--duration`.
    Fuzz(fuzz::FuzzArgs),
    /// The test suite: unit tests, boots (smoke, plans, every scenario, injected bugs, soak), KUnit.
    Test(test::TestArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the whole context chain on one line; a backtrace
            // would only show xtask's own frames, not the failing tool's.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Setup => setup::run().map(drop),
        Command::Kernel(args) => {
            let toolchain = setup::run()?;
            kernel::build(&toolchain, &args).map(drop)
        }
        Command::Image => {
            let toolchain = setup::run()?;
            let kernel = kernel::build(&toolchain, &kernel::KernelArgs::default())?;
            image::build(&kernel).map(drop)
        }
        Command::Boot(args) => boot::run(&args),
        Command::Kunit(args) => kunit::run(&args),
        Command::Scenario(args) => scenario::run(&args),
        Command::Soak(args) => soak::run(&args),
        Command::Test(args) => test::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
        Command::Bench(args) => bench::run(&args),
    }
}
