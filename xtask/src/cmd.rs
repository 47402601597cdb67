//! Running child processes: captured (short tools such as `dpkg-query`) or
//! logged to a file with a periodic progress line (apt, cargo install, make).

use anyhow::{Context, Result, bail};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `program arg arg…` for messages.
pub fn describe(cmd: &Command) -> String {
    let mut words = vec![cmd.get_program().to_string_lossy().into_owned()];
    words.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    words.join(" ")
}

/// Asks the kernel to SIGKILL the child if xtask dies, so that a killed
/// `cargo xtask kernel` does not leave a `make -j` running.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls prctl(2),
    // which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs `cmd` with stdout and stderr captured; the raw output whatever the exit status.
pub fn output_raw(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null());
    cmd.output()
        .with_context(|| format!("cannot run `{}`", describe(cmd)))
}

/// Runs `cmd`, returns its stdout; fails with its stderr when it exits non-zero.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    let out = output_raw(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A close-on-exec pipe (read end, write end); `std::io::pipe` is newer than
/// the workspace's rust-version.
fn pipe() -> Result<(File, File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating a pipe");
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// Line statistics of a logged run, shared with the progress callback.
#[derive(Default, Clone)]
pub struct LogStats {
    pub lines: u64,
    /// Lines the `classify` function recognised (e.g. compiled objects).
    pub counted: u64,
    /// The last thing `classify` returned.
    pub last: String,
}

/// How to run a long child process.
pub struct Logged<'a> {
    /// Prefix of the progress lines, e.g. `kernel: building`.
    pub what: &'a str,
    /// Where the combined stdout/stderr go (appended).
    pub log: &'a Path,
    /// How often to print a progress line; `None` prints none.
    pub every: Option<Duration>,
    /// Recognises interesting lines (`Some(label)` counts the line).
    pub classify: fn(&str) -> Option<String>,
    /// Lines of the log shown when the command fails.
    pub tail_on_failure: usize,
}

impl Logged<'_> {
    pub fn new<'a>(what: &'a str, log: &'a Path) -> Logged<'a> {
        Logged {
            what,
            log,
            every: None,
            classify: |_| None,
            tail_on_failure: 40,
        }
    }
}

/// Formats a duration as `3m15s` / `42s`.
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// The last `n` lines of a file (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    tail_matching(path, n, |_| true)
}

/// The last `n` lines of a file among those `keep` accepts.
pub fn tail_matching(path: &Path, n: usize, keep: impl Fn(&str) -> bool) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| keep(l)).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `cmd` with stdout+stderr appended to `opts.log`, printing a progress
/// line every `opts.every`; on failure prints the log's tail and fails.
pub fn run_logged(mut cmd: Command, opts: &Logged) -> Result<LogStats> {
    if let Some(dir) = opts.log.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(opts.log)
        .with_context(|| format!("opening log {}", opts.log.display()))?;
    let described = describe(&cmd);
    writeln!(log, "\n$ {described}")?;
    let (reader, writer) = pipe()?;
    cmd.stdin(Stdio::null())
        .stdout(writer.try_clone().context("duplicating a pipe")?)
        .stderr(writer);
    die_with_parent(&mut cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run `{described}`"))?;
    // The Command holds the parent's copies of the pipe's write end: drop them
    // so that the reader sees EOF when the child exits.
    drop(cmd);

    let stats = Arc::new(Mutex::new(LogStats::default()));
    let reader_stats = Arc::clone(&stats);
    let classify = opts.classify;
    let pump = std::thread::spawn(move || -> std::io::Result<()> {
        let mut reader = BufReader::new(reader);
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                return Ok(());
            }
            log.write_all(&line)?;
            let text = String::from_utf8_lossy(&line);
            let mut s = reader_stats.lock().unwrap();
            s.lines += 1;
            if let Some(label) = classify(text.trim_end()) {
                s.counted += 1;
                s.last = label;
            }
        }
    });

    let started = Instant::now();
    let mut next_tick = opts.every.map(|every| started + every);
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for a child")? {
            break status;
        }
        if let (Some(tick), Some(every)) = (next_tick, opts.every) {
            if Instant::now() >= tick {
                let s = stats.lock().unwrap().clone();
                let mut line = format!("{} ... {}", opts.what, human_duration(started.elapsed()));
                if s.counted > 0 {
                    line.push_str(&format!(
                        ", {} objects compiled, last: {}",
                        s.counted, s.last
                    ));
                } else {
                    line.push_str(&format!(", {} lines of output", s.lines));
                }
                eprintln!("{line}");
                next_tick = Some(tick + every);
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    pump.join()
        .map_err(|_| anyhow::anyhow!("log pump panicked"))?
        .with_context(|| format!("writing {}", opts.log.display()))?;
    let s = stats.lock().unwrap().clone();
    if !status.success() {
        eprintln!(
            "--- last {} lines of {} ---",
            opts.tail_on_failure,
            opts.log.display()
        );
        eprintln!("{}", tail(opts.log, opts.tail_on_failure));
        eprintln!("---");
        bail!(
            "`{described}` failed ({status}); full log: {}",
            opts.log.display()
        );
    }
    Ok(s)
}

/// An exclusive advisory lock on a file, released on drop. Serialises setup
/// and kernel builds between concurrent `cargo xtask` runs.
pub struct FileLock {
    _file: File,
}

impl FileLock {
    pub fn acquire(path: &Path, who: &str) -> Result<FileLock> {
        use std::os::fd::AsRawFd;
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock {}", path.display()))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            eprintln!(
                "{who}: waiting for another cargo xtask holding {}",
                path.display()
            );
            // SAFETY: as above.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .context(format!("locking {}", path.display()));
            }
        }
        Ok(FileLock { _file: file })
    }
}

/// Seconds since the epoch as an RFC 3339 UTC timestamp.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(Duration::from_secs(195)), "3m15s");
        assert_eq!(human_duration(Duration::from_millis(4200)), "4.2s");
    }

    #[test]
    fn timestamp_shape() {
        let t = utc_now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }
}
