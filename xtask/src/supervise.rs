//! Child processes that never outlive the run: each is killed when its guard
//! drops (normal exit, error, Ctrl-C) and, through `PR_SET_PDEATHSIG`, when
//! xtask itself dies.

use anyhow::{Context, Result};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A running child process, killed and reaped when dropped.
pub struct Supervised {
    name: &'static str,
    child: Child,
    status: Option<ExitStatus>,
}

impl Supervised {
    /// Spawns `command`, asking the kernel to SIGKILL it if xtask dies.
    pub fn spawn(name: &'static str, mut command: Command) -> Result<Self> {
        // SAFETY: the closure runs between fork and exec and only calls
        // prctl(2), which is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", command.get_program()))?;
        Ok(Self {
            name,
            child,
            status: None,
        })
    }

    /// The child's stdout, if it was piped and not yet taken.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// The exit status if the child has exited, without blocking.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.status)
    }

    /// Waits up to `grace` for the child to exit by itself.
    pub fn wait_for(&mut self, grace: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_status()? {
                return Ok(Some(status));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(None)
    }

    /// SIGKILL now, without reaping: the supervisor notices the death the
    /// way it would notice a crash. For the harness's own fault tests.
    pub fn kill(&mut self) -> Result<()> {
        self.child
            .kill()
            .with_context(|| format!("killing {}", self.name))
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the final status.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_status()? {
            return Ok(status);
        }
        // SAFETY: kill(2) on the pid of a child we have not reaped yet, so
        // the pid cannot have been reused.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        if let Some(status) = self.wait_for(grace)? {
            return Ok(status);
        }
        self.child
            .kill()
            .with_context(|| format!("killing {}", self.name))?;
        let status = self
            .child
            .wait()
            .with_context(|| format!("reaping {}", self.name))?;
        self.status = Some(status);
        Ok(status)
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Set once SIGINT/SIGTERM arrives; the boot loop polls it and tears down.
pub fn interrupted() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let handler_flag = flag.clone();
        // A second handler cannot be installed; if one exists the flag just
        // never flips and the children still die with us (PDEATHSIG).
        let _ = ctrlc::set_handler(move || handler_flag.store(true, Ordering::SeqCst));
        flag
    })
}

pub fn was_interrupted() -> bool {
    interrupted().load(Ordering::SeqCst)
}
