//! One QEMU process of a lifecycle check, watched through its files: the
//! serial console goes straight to `console.log`, QEMU's own messages to
//! `qemu.log`. The checks act on what the console says (kill the backend
//! once the workload runs, reset the machine, count boots), so the watcher
//! reads the file rather than a pipe that only one reader may own.

use crate::console::BOOT_MARKER;
use crate::guest::EARLY_BOOT_STALL;
use crate::qemu::{Extras, GuestSpec};
use crate::report::EarlyBootStall;
use crate::supervise::{Supervised, was_interrupted};
use anyhow::{Context, Result, bail};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running guest.
pub struct Machine {
    qemu: Supervised,
    run_dir: PathBuf,
    console: PathBuf,
    qemu_log: PathBuf,
    /// Console size when it last grew, and when.
    grew: (u64, Instant),
}

/// Why [`Machine::wait_until`] returned.
#[derive(Debug)]
pub enum Waited {
    /// The condition holds.
    Seen,
    /// QEMU exited first.
    Exited(ExitStatus),
    /// The kernel went quiet before the init (the known TCG early-boot
    /// stall, `guest::EARLY_BOOT_STALL`); QEMU was stopped.
    Stalled(EarlyBootStall),
}

impl Machine {
    /// Starts QEMU for `spec` with `extras`, its files in `run_dir`.
    pub fn launch(spec: &GuestSpec, extras: &Extras, run_dir: &Path) -> Result<Self> {
        let console = run_dir.join("console.log");
        let qemu_log = run_dir.join("qemu.log");
        let args = spec.args_with(extras);
        fs::write(
            run_dir.join("qemu.cmdline"),
            format!("{} {}\n", crate::qemu::QEMU, args.join(" ")),
        )?;
        let mut command = spec.command_with(extras);
        command
            .stdin(Stdio::null())
            .stdout(
                File::create(&console)
                    .with_context(|| format!("creating {}", console.display()))?,
            )
            .stderr(
                File::create(&qemu_log)
                    .with_context(|| format!("creating {}", qemu_log.display()))?,
            );
        let qemu = Supervised::spawn("QEMU", command)?;
        Ok(Self {
            qemu,
            run_dir: run_dir.to_owned(),
            console,
            qemu_log,
            grew: (0, Instant::now()),
        })
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        read_lossy(&self.console)
    }

    /// QEMU's own messages (stderr) so far.
    pub fn qemu_log(&self) -> String {
        read_lossy(&self.qemu_log)
    }

    /// Polls every 50 ms until `done` holds for the console, QEMU exits,
    /// the boot stalls early, or `timeout` passes (an error).
    pub fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&str) -> bool,
    ) -> Result<Waited> {
        let deadline = Instant::now() + timeout;
        loop {
            if was_interrupted() {
                bail!("interrupted while waiting for {what}");
            }
            let console = self.console();
            if done(&console) {
                return Ok(Waited::Seen);
            }
            if let Some(status) = self.qemu.try_status()? {
                return Ok(Waited::Exited(status));
            }
            if let Some(stall) = self.stalled(&console) {
                self.qemu.stop(Duration::from_secs(3))?;
                return Ok(Waited::Stalled(stall));
            }
            if Instant::now() > deadline {
                bail!(
                    "no {what} within {} s (run folder {})",
                    timeout.as_secs(),
                    self.run_dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `timeout` for QEMU to exit by itself (the guest powers
    /// off); `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        self.qemu.wait_for(timeout)
    }

    /// Stops QEMU if it still runs.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.qemu.stop(Duration::from_secs(3))
    }

    /// An early-boot stall: no init yet and a console quiet for
    /// [`EARLY_BOOT_STALL`].
    fn stalled(&mut self, console: &str) -> Option<EarlyBootStall> {
        let size = console.len() as u64;
        if size != self.grew.0 {
            self.grew = (size, Instant::now());
            return None;
        }
        if console.contains(BOOT_MARKER) || self.grew.1.elapsed() < EARLY_BOOT_STALL {
            return None;
        }
        Some(EarlyBootStall {
            run_dir: self.run_dir.clone(),
            after_line: console.lines().count(),
            last_line: console.lines().last().unwrap_or("").to_owned(),
        })
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}
