//! Running one guest to completion: start QEMU, copy its serial console to a
//! file while noting the init's markers, watch it (and a companion process
//! such as the GPU backend) until it powers off, dies, times out or the user
//! interrupts, and stop it.

use crate::console::{BOOT_MARKER, RESULT_MARKER, WORKLOAD_END_MARKER, WORKLOAD_START_MARKER};
use crate::paths;
use crate::qemu::GuestSpec;
use crate::report::EarlyBootStall;
use crate::supervise::{Supervised, was_interrupted};
use anyhow::{Context, Result};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

fn step(message: impl AsRef<str>) {
    eprintln!("guest: {}", message.as_ref());
}

/// A fresh folder for one run's logs, below `target/fencelab-runs/`.
pub fn new_run_dir(label: &str) -> Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let dir = paths::runs_dir().join(format!("{stamp}-{label}-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// A process that must stay alive while the guest runs.
pub struct Companion<'a> {
    pub process: &'a mut Supervised,
    pub name: &'static str,
    pub log: &'a Path,
    /// Lines of its log worth quoting when it dies.
    pub last_words: fn(&Path) -> String,
    /// Harness self-test: SIGKILL the companion once the workload starts.
    pub kill_when_workload_starts: bool,
}

/// What the console reader has seen so far.
#[derive(Debug, Clone, Default)]
pub struct Marks {
    pub lines: usize,
    /// When the last console line arrived (host clock, from QEMU start).
    pub last_line_at: Option<Duration>,
    /// The last console line, for reports.
    pub last_line: String,
    /// The init announced itself: the kernel finished booting.
    pub reached_init: bool,
    pub workload_started: Option<Duration>,
    pub result_after: Option<Duration>,
    pub workload_ended: bool,
}

/// How long the kernel may print nothing before it reaches the init before
/// the boot counts as stalled. A healthy TCG boot with KASAN and lockdep
/// reaches the init in 15–40 s and never pauses its console for more than a
/// few seconds; the stalls seen on loaded 2-core hosts (both vCPUs spinning
/// right after SMP bring-up, QEMU 10.0.2 multi-threaded TCG) never resume.
pub const EARLY_BOOT_STALL: Duration = Duration::from_secs(120);

/// How often a boot whose kernel stalls early is started again.
pub const MAX_EARLY_BOOT_RETRIES: usize = 2;

/// One boot attempt: its result, or an early-boot stall worth retrying
/// (nothing of ours had run yet).
pub enum Attempt<T> {
    Done(T),
    Stalled(EarlyBootStall),
}

/// Runs `attempt` again after each early-boot stall, at most
/// [`MAX_EARLY_BOOT_RETRIES`] times; returns the result and the stalls it
/// took to get there. `what` names the boot in messages.
pub fn retry_early_boot_stalls<T>(
    what: &str,
    mut attempt: impl FnMut() -> Result<Attempt<T>>,
) -> Result<(T, Vec<EarlyBootStall>)> {
    let mut stalls: Vec<EarlyBootStall> = Vec::new();
    loop {
        match attempt()? {
            Attempt::Done(result) => return Ok((result, stalls)),
            Attempt::Stalled(stall) => {
                let retry = stalls.len() < MAX_EARLY_BOOT_RETRIES;
                stalls.push(stall);
                if !retry {
                    anyhow::bail!(
                        "{what}: the guest kernel stalled early in boot {} times in a row (runs: {}); \
                         the host may be overloaded (QEMU's multi-threaded TCG)",
                        stalls.len(),
                        stalls
                            .iter()
                            .map(|s| s.run_dir.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                step(format!(
                    "{what}: booting again ({} of {MAX_EARLY_BOOT_RETRIES} retries): the kernel stalled before anything of the run had started",
                    stalls.len()
                ));
            }
        }
    }
}

/// How supervision ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Powered off, died, timed out or was interrupted; any abnormal end is
    /// in the failures.
    Finished,
    /// The kernel stopped printing before it reached the init; QEMU was
    /// stopped. Nothing of ours has run yet, so the caller may boot again.
    StalledBeforeInit {
        after_line: usize,
        last_line: String,
    },
}

/// How the guest ended.
pub struct Outcome {
    pub status: ExitStatus,
    pub marks: Marks,
    pub console: String,
}

/// A running QEMU guest.
pub struct Guest {
    qemu: Supervised,
    tracker: ConsoleTracker,
    console_log: PathBuf,
}

impl Guest {
    /// Starts QEMU for `spec`, logging to `run_dir` (`qemu.cmdline`,
    /// `qemu.log`, `console.log`).
    pub fn launch(spec: &GuestSpec, run_dir: &Path, echo_console: bool) -> Result<Self> {
        fs::write(run_dir.join("qemu.cmdline"), shell_words(spec))?;
        step(format!(
            "booting QEMU ({:?}, {} vCPUs, {} MiB)",
            spec.accel, spec.cpus, spec.memory_mib
        ));
        let qemu_log = run_dir.join("qemu.log");
        let mut command = spec.command();
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(
            File::create(&qemu_log).with_context(|| format!("creating {}", qemu_log.display()))?,
        );
        let started = Instant::now();
        let mut qemu = Supervised::spawn("QEMU", command).context(
            "cannot start qemu-system-x86_64: is it installed? `cargo xtask setup` installs it from bookworm-backports",
        )?;
        let stdout = qemu.take_stdout().context("QEMU stdout was not captured")?;
        let console_log = run_dir.join("console.log");
        let tracker = ConsoleTracker::start(stdout, &console_log, started, echo_console)?;
        Ok(Self {
            qemu,
            tracker,
            console_log,
        })
    }

    /// Watches the guest until it powers off, the companion dies, `timeout`
    /// passes or the user interrupts; each abnormal end is a failure. A
    /// kernel that prints nothing for [`EARLY_BOOT_STALL`] before reaching
    /// the init ends supervision with [`Ended::StalledBeforeInit`] instead.
    pub fn supervise(
        &mut self,
        mut companion: Option<Companion<'_>>,
        timeout: Duration,
        failures: &mut Vec<String>,
    ) -> Result<Ended> {
        let started = Instant::now();
        let mut next_progress = Duration::from_secs(15);
        loop {
            if was_interrupted() {
                failures.push("interrupted by the user".into());
                return Ok(Ended::Finished);
            }
            if self.qemu.try_status()?.is_some() {
                return Ok(Ended::Finished);
            }
            if let Some(companion) = companion.as_mut()
                && self.tracker.marks().workload_started.is_some()
            {
                // What the companion spends from here on is the workload's.
                companion.process.mark_cpu();
            }
            if let Some(companion) = companion.as_mut()
                && companion.kill_when_workload_starts
                && self.tracker.marks().workload_started.is_some()
            {
                step(format!("killing {} (harness fault test)", companion.name));
                companion.process.kill()?;
                companion.kill_when_workload_starts = false;
            }
            if let Some(companion) = companion.as_mut()
                && let Some(status) = companion.process.try_status()?
            {
                let marks = self.tracker.marks();
                // After the workload the guest powers off and the companion
                // exits on disconnect; that order can race with our poll.
                if marks.workload_ended && self.qemu.wait_for(Duration::from_secs(5))?.is_some() {
                    return Ok(Ended::Finished);
                }
                let stage = if marks.workload_started.is_some() {
                    "while the workload ran"
                } else {
                    "before the workload started"
                };
                failures.push(format!(
                    "{} exited {stage} ({status}); QEMU was stopped. Log: {}{}",
                    companion.name,
                    companion.log.display(),
                    indented(&(companion.last_words)(companion.log))
                ));
                return Ok(Ended::Finished);
            }
            let elapsed = started.elapsed();
            let marks = self.tracker.marks();
            let quiet_since = marks.last_line_at.unwrap_or_default();
            if !marks.reached_init && elapsed.saturating_sub(quiet_since) > EARLY_BOOT_STALL {
                step(format!(
                    "the kernel printed nothing for {} s before reaching the init (after console line {}: {:?}); stopping QEMU",
                    EARLY_BOOT_STALL.as_secs(),
                    marks.lines,
                    marks.last_line.trim_end()
                ));
                return Ok(Ended::StalledBeforeInit {
                    after_line: marks.lines,
                    last_line: marks.last_line.trim_end().to_owned(),
                });
            }
            if elapsed > timeout {
                failures.push(format!(
                    "the guest did not finish within {} s",
                    timeout.as_secs()
                ));
                return Ok(Ended::Finished);
            }
            if elapsed >= next_progress {
                let marks = self.tracker.marks();
                let stage = if marks.workload_ended {
                    "powering off"
                } else if marks.workload_started.is_some() {
                    "workload running"
                } else {
                    "booting"
                };
                step(format!(
                    "{stage}, {} s, {} console lines",
                    elapsed.as_secs(),
                    marks.lines
                ));
                next_progress += Duration::from_secs(15);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops QEMU if it still runs and returns what the guest left behind.
    pub fn finish(mut self) -> Result<Outcome> {
        let status = self.qemu.stop(Duration::from_secs(5))?;
        let marks = self.tracker.finish();
        let console = fs::read_to_string(&self.console_log)
            .with_context(|| format!("reading {}", self.console_log.display()))?;
        Ok(Outcome {
            status,
            marks,
            console,
        })
    }
}

fn indented(text: &str) -> String {
    text.lines().map(|l| format!("\n    {l}")).collect()
}

fn shell_words(spec: &GuestSpec) -> String {
    let mut words = vec![crate::qemu::QEMU.to_owned()];
    words.extend(
        spec.args()
            .into_iter()
            .map(|a| if a.contains(' ') { format!("'{a}'") } else { a }),
    );
    words.join(" ") + "\n"
}

/// Copies the serial console to a file, line by line, noting when the
/// workload starts and when its result arrives (host clock, from QEMU start).
struct ConsoleTracker {
    marks: Arc<Mutex<Marks>>,
    reader: JoinHandle<()>,
}

impl ConsoleTracker {
    fn start(
        stdout: std::process::ChildStdout,
        log: &Path,
        since: Instant,
        echo: bool,
    ) -> Result<Self> {
        let mut file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let marks = Arc::new(Mutex::new(Marks::default()));
        let shared = marks.clone();
        let reader = std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let line = String::from_utf8_lossy(&buf);
                let _ = file.write_all(line.as_bytes());
                if echo {
                    eprint!("console: {line}");
                }
                let mut marks = shared.lock().unwrap_or_else(|p| p.into_inner());
                marks.lines += 1;
                marks.last_line_at = Some(since.elapsed());
                marks.last_line = line.chars().take(200).collect();
                if line.contains(BOOT_MARKER) {
                    marks.reached_init = true;
                }
                if line.contains(WORKLOAD_START_MARKER) {
                    marks.workload_started = Some(since.elapsed());
                    step("workload started");
                } else if line.contains(RESULT_MARKER) {
                    marks.result_after = Some(since.elapsed());
                } else if line.contains(WORKLOAD_END_MARKER) {
                    marks.workload_ended = true;
                }
                buf.clear();
            }
            let _ = file.flush();
        });
        Ok(Self { marks, reader })
    }

    fn marks(&self) -> Marks {
        self.marks.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn finish(self) -> Marks {
        let _ = self.reader.join();
        self.marks.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stall(n: usize) -> EarlyBootStall {
        EarlyBootStall {
            run_dir: PathBuf::from(format!("/runs/{n}")),
            after_line: 169,
            last_line: "smpboot: x86: Booting SMP configuration:".into(),
        }
    }

    #[test]
    fn early_boot_stalls_are_retried_a_bounded_number_of_times() {
        let mut calls = 0;
        let (result, stalls) = retry_early_boot_stalls("test", || {
            calls += 1;
            Ok(if calls <= MAX_EARLY_BOOT_RETRIES {
                Attempt::Stalled(stall(calls))
            } else {
                Attempt::Done(calls)
            })
        })
        .unwrap();
        assert_eq!(result, MAX_EARLY_BOOT_RETRIES + 1);
        assert_eq!(stalls.len(), MAX_EARLY_BOOT_RETRIES);

        let mut calls = 0;
        let err = retry_early_boot_stalls::<()>("test", || {
            calls += 1;
            Ok(Attempt::Stalled(stall(calls)))
        })
        .unwrap_err();
        assert_eq!(calls, MAX_EARLY_BOOT_RETRIES + 1);
        assert!(err.to_string().contains("/runs/3"), "{err}");

        let (result, stalls) = retry_early_boot_stalls("test", || Ok(Attempt::Done(7))).unwrap();
        assert_eq!((result, stalls.len()), (7, 0));
    }

    /// The console reader notes the last line, when it came, and whether
    /// the init announced itself: what the early-boot stall check reads.
    #[test]
    fn console_tracker_notes_the_init_and_the_last_line() {
        let dir = std::env::temp_dir().join(format!("fencelab-guest-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("console.log");
        let run = |script: &str| {
            let mut child = std::process::Command::new("sh")
                .args(["-c", script])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let tracker =
                ConsoleTracker::start(child.stdout.take().unwrap(), &log, Instant::now(), false)
                    .unwrap();
            child.wait().unwrap();
            tracker.finish()
        };

        let stalled = run("echo '[    1.0] smp: Brought up 1 node, 2 CPUs'");
        assert!(!stalled.reached_init);
        assert_eq!(stalled.lines, 1);
        assert!(stalled.last_line.contains("Brought up"));
        assert!(stalled.last_line_at.is_some());

        let booted = run("echo 'early line'; echo 'FENCELAB_BOOT release=7.3.4'; echo after");
        assert!(booted.reached_init);
        assert_eq!(booted.lines, 3);
        assert_eq!(booted.last_line.trim_end(), "after");
        assert_eq!(fs::read_to_string(&log).unwrap().lines().count(), 3);
        let _ = fs::remove_dir_all(&dir);
    }
}
