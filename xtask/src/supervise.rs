//! Child processes that never outlive the run: each is killed when its guard
//! drops (normal exit, error, Ctrl-C) and, through `PR_SET_PDEATHSIG`, when
//! xtask itself dies.

use anyhow::{Context, Result};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A running child process, killed and reaped when dropped.
///
/// It is reaped with wait4(2), so that its CPU time and peak memory are
/// known once it has exited ([`Supervised::usage`]).
pub struct Supervised {
    name: &'static str,
    child: Child,
    status: Option<ExitStatus>,
    usage: Option<ResourceUsage>,
    /// CPU time (ms) read by [`Supervised::mark_cpu`].
    cpu_ms_at_mark: Option<f64>,
}

/// What an exited child cost, from wait4(2)'s `rusage`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ResourceUsage {
    /// User plus system CPU time, in milliseconds.
    pub cpu_ms: f64,
    /// The part of `cpu_ms` spent after [`Supervised::mark_cpu`] (e.g. from
    /// the workload's start on, without the idle boot), when it was called.
    pub cpu_ms_after_mark: Option<f64>,
    /// Peak resident set size, in KiB.
    pub max_rss_kib: u64,
}

impl ResourceUsage {
    fn from_rusage(r: &libc::rusage, cpu_ms_at_mark: Option<f64>) -> Self {
        let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
        let cpu_ms = ms(r.ru_utime) + ms(r.ru_stime);
        Self {
            cpu_ms,
            cpu_ms_after_mark: cpu_ms_at_mark.map(|mark| (cpu_ms - mark).max(0.0)),
            max_rss_kib: u64::try_from(r.ru_maxrss).unwrap_or(0),
        }
    }
}

/// User plus system CPU time of a live process, in ms, from
/// `/proc/<pid>/stat` (clock-tick resolution, 10 ms at USER_HZ 100).
fn cpu_ms_of(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after its `)` do not.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15, the 12th and 13th after `)`.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf(3) has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 * 1000.0 / hz as f64)
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
            usage: None,
            cpu_ms_at_mark: None,
        })
    }

    /// The child's stdout, if it was piped and not yet taken.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// The exit status if the child has exited, without blocking.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.reap(libc::WNOHANG)?;
        }
        Ok(self.status)
    }

    /// CPU time and peak memory of the child, once it has exited.
    pub fn usage(&self) -> Option<ResourceUsage> {
        self.usage
    }

    /// Notes the child's CPU time now, once, so that [`ResourceUsage`] can
    /// tell what it spent after this point.
    pub fn mark_cpu(&mut self) {
        if self.cpu_ms_at_mark.is_none() && self.status.is_none() {
            self.cpu_ms_at_mark = cpu_ms_of(self.child.id());
        }
    }

    /// wait4(2) on the child with `options`; records status and usage when
    /// it has exited.
    fn reap(&mut self, options: libc::c_int) -> Result<()> {
        let mut raw_status = 0;
        // SAFETY: a zeroed rusage is a valid value of that plain C struct.
        let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
        let pid = self.child.id() as libc::pid_t;
        loop {
            // SAFETY: wait4(2) on our own unreaped child, with pointers to
            // locals that live across the call.
            let got = unsafe { libc::wait4(pid, &mut raw_status, options, &mut rusage) };
            if got == pid {
                self.status = Some(ExitStatus::from_raw(raw_status));
                self.usage = Some(ResourceUsage::from_rusage(&rusage, self.cpu_ms_at_mark));
                return Ok(());
            }
            if got == 0 {
                return Ok(());
            }
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                return Err(error).with_context(|| format!("waiting for {}", self.name));
            }
        }
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
        self.reap(0)
            .with_context(|| format!("reaping {}", self.name))?;
        self.status
            .with_context(|| format!("{} was not reaped", self.name))
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if matches!(self.try_status(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.reap(0);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exited_child_reports_its_status_cpu_time_and_peak_memory() {
        let mut busy = Command::new("sh");
        busy.args([
            "-c",
            "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; exit 3",
        ]);
        let mut child = Supervised::spawn("busy", busy).unwrap();
        assert_eq!(child.usage(), None, "no usage before the exit");
        child.mark_cpu();
        let status = child.wait_for(Duration::from_secs(60)).unwrap().unwrap();
        assert_eq!(status.code(), Some(3));
        let usage = child.usage().expect("usage after the exit");
        assert!(usage.cpu_ms > 1.0, "a busy loop costs CPU: {usage:?}");
        let after = usage.cpu_ms_after_mark.expect("marked while it ran");
        assert!(after <= usage.cpu_ms && after > 0.0, "{usage:?}");
        assert!(usage.max_rss_kib > 100, "{usage:?}");
    }

    #[test]
    fn a_stopped_child_is_reaped_with_its_usage() {
        let mut sleeper = Command::new("sleep");
        sleeper.arg("30");
        let mut child = Supervised::spawn("sleeper", sleeper).unwrap();
        let status = child.stop(Duration::from_secs(5)).unwrap();
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        let usage = child.usage().expect("usage");
        assert_eq!(usage.cpu_ms_after_mark, None, "never marked");
        // Asking again gives the same answer, not ECHILD.
        assert_eq!(child.try_status().unwrap(), Some(status));
    }
}
