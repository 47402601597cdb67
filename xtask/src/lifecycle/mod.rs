//! `cargo xtask test`'s lifecycle stage (issue 8): what a guest sees when
//! its GPU backend dies and comes back, and when the machine is reset
//! mid-flight, under QEMU 10.0.2's `vhost-user-gpu-pci`. Three checks, two
//! of them boots (three kernels: the reset reboots), about 2½ minutes;
//! [`checks`] says what each expects and why:
//!
//! - `reconnect-ms`: QEMU with the chardev's reconnect option cannot even
//!   start the device. The socket chardev connects asynchronously when
//!   reconnecting is on, and vhost-user-gpu's realize sends its first
//!   messages before the connection exists ("Failed to set msg fds",
//!   "vhost_backend_init failed: Protocol error"); QEMU exits.
//! - `backend-killed`: fencelab-device is SIGKILLed with fences in flight
//!   and restarted on the same socket. QEMU never talks to it again:
//!   vhost-user-gpu (through `backends/vhost-user.c`) registers no chardev
//!   event handler, so nothing re-runs the vhost-user handshake (unlike
//!   vhost-user-blk's `vhost_user_blk_event`). The guest survives; the lost
//!   fences end by fencelab_drm's job timeout (`ETIMEDOUT`); the guest
//!   powers off normally and QEMU exits 0.
//! - `system-reset`, on the device `backend-killed` restarted (it runs with
//!   `--reconnect`): QMP `system_reset` while fences are in flight. QEMU
//!   stops the vhost device (`GET_VRING_BASE`: the device completes what it
//!   holds), the guest reboots, and its init runs the workload again on the
//!   same backend connection: that second workload must pass. When QEMU
//!   exits the device keeps serving; its SIGTERM summary counts the
//!   connection and every fence completed.

mod backend;
mod checks;
mod machine;

use crate::boot::{self, BootArgs, Driver};
use crate::qemu::{Accel, GuestSpec};
use crate::{image, kernel, setup};
use anyhow::{Result, bail};
use std::path::{Path, PathBuf};

/// What every check boots with.
pub struct Prepared {
    kernel: PathBuf,
    initramfs: PathBuf,
    device_bin: PathBuf,
}

impl Prepared {
    /// Builds (or finds cached) the kernel, the initramfs and the device.
    fn build() -> Result<Self> {
        let toolchain = setup::run()?;
        let kernel = kernel::build(&toolchain, &kernel::KernelArgs::default())?;
        let initramfs = image::build(&kernel)?;
        Ok(Self {
            kernel: kernel.bzimage,
            initramfs,
            device_bin: boot::build_device()?,
        })
    }

    /// A guest running fence-hammer's smoke workload with `hammer` arguments
    /// on `driver`, its GPU on `socket`.
    fn guest(&self, socket: &Path, driver: Driver, hammer: &[&str]) -> GuestSpec {
        let defaults = BootArgs::default();
        let mut hammer: Vec<&str> = hammer.to_vec();
        if driver == Driver::Fencelab {
            hammer.push("--driver=fencelab");
        }
        GuestSpec {
            kernel: self.kernel.clone(),
            initramfs: self.initramfs.clone(),
            gpu_socket: Some(socket.to_owned()),
            memory_mib: defaults.memory_mib,
            cpus: defaults.cpus,
            accel: Accel::Tcg,
            cmdline_extra: vec![
                "fencelab.workload=smoke".to_owned(),
                format!("fencelab.driver={}", driver.module()),
                format!("fencelab.args={}", hammer.join(",")),
            ],
        }
    }
}

/// How one check went.
#[derive(Debug, Default)]
pub struct Verdict {
    /// What the check established (printed on success too).
    pub notes: Vec<String>,
    pub failures: Vec<String>,
    /// Where its logs are.
    pub run_dir: Option<PathBuf>,
}

impl Verdict {
    fn check(&mut self, ok: bool, failure: impl FnOnce() -> String) {
        if !ok {
            self.failures.push(failure());
        }
    }
}

/// Runs every check; fails when any fails.
pub fn run() -> Result<()> {
    eprintln!(
        "test: lifecycle (backend killed and restarted, QMP system_reset, chardev reconnect)"
    );
    let prepared = Prepared::build()?;
    let mut failed = Vec::new();
    let mut report = |name: &'static str, result: Result<Verdict>| -> Result<()> {
        let verdict = result.unwrap_or_else(|e| Verdict {
            failures: vec![format!("{e:#}")],
            ..Verdict::default()
        });
        print(name, &verdict);
        if !verdict.failures.is_empty() {
            failed.push(name);
        }
        if crate::supervise::was_interrupted() {
            bail!("interrupted during lifecycle check {name}");
        }
        Ok(())
    };
    eprintln!("test: lifecycle reconnect-ms");
    report("reconnect-ms", checks::reconnect_ms(&prepared))?;
    eprintln!("test: lifecycle backend-killed");
    let restarted = match checks::backend_killed(&prepared) {
        Ok((verdict, restarted)) => {
            report("backend-killed", Ok(verdict))?;
            Some(restarted)
        }
        Err(e) => {
            report("backend-killed", Err(e))?;
            None
        }
    };
    eprintln!("test: lifecycle system-reset (on the restarted device)");
    report("system-reset", checks::system_reset(&prepared, restarted))?;
    const CHECKS: usize = 3;
    println!(
        "lifecycle: {} passed, {} failed",
        CHECKS - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        bail!("lifecycle check(s) failed: {}", failed.join(", "));
    }
    Ok(())
}

fn print(name: &str, verdict: &Verdict) {
    let status = if verdict.failures.is_empty() {
        "PASS"
    } else {
        "FAIL"
    };
    let folder = verdict
        .run_dir
        .as_deref()
        .map_or(String::new(), |d| format!(" ({})", boot::shown_path(d)));
    println!("lifecycle {name}: {status}{folder}");
    for note in &verdict.notes {
        println!("  {note}");
    }
    for failure in &verdict.failures {
        println!("  FAILURE: {failure}");
    }
}
