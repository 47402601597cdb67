//! What the process costs: resident memory, CPU time of the whole process
//! (getrusage) and of each thread (`/proc/self/task/<tid>/stat`).

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// `VmRSS` of this process, in KiB.
pub fn rss_kib() -> Result<u64> {
    let status =
        fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("/proc/self/status has no VmRSS line")?;
    let kib = line.trim().trim_end_matches("kB").trim();
    kib.parse()
        .with_context(|| format!("VmRSS value {kib:?} is not a number"))
}

/// User + system CPU time of the whole process, every thread included.
pub fn process_cpu() -> Result<Duration> {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer to a rusage we own.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrusage(RUSAGE_SELF)");
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Ok(tv(ru.ru_utime) + tv(ru.ru_stime))
}

/// One thread's name and user + system CPU time so far.
#[derive(Clone, Debug)]
pub struct ThreadCpu {
    pub name: String,
    pub cpu: Duration,
}

/// CPU time of every live thread of this process, by thread id.
pub fn threads_cpu() -> Result<BTreeMap<u32, ThreadCpu>> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks <= 0 {
        bail!("sysconf(_SC_CLK_TCK) returned {ticks}");
    }
    let mut out = BTreeMap::new();
    for entry in fs::read_dir("/proc/self/task").context("cannot list /proc/self/task")? {
        let entry = entry.context("cannot list /proc/self/task")?;
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A thread may exit between the listing and the read.
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (name, ticks_used) = parse_stat(&stat)
            .with_context(|| format!("cannot parse /proc/self/task/{tid}/stat: {stat:?}"))?;
        let cpu = Duration::from_secs_f64(ticks_used as f64 / ticks as f64);
        out.insert(tid, ThreadCpu { name, cpu });
    }
    Ok(out)
}

/// (comm, utime + stime in clock ticks) of a `stat` line. The name is in
/// parentheses and may itself hold spaces or parentheses: fields are
/// counted after the last `)`.
fn parse_stat(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_string();
    // After the name: state (field 3), …, utime (14), stime (15).
    let mut rest = stat.get(close + 1..)?.split_whitespace().skip(11);
    let utime: u64 = rest.next()?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some((name, utime + stime))
}

/// CPU used by each thread between two [`threads_cpu`] snapshots (threads
/// that started in between count from zero).
pub fn threads_delta(
    before: &BTreeMap<u32, ThreadCpu>,
    after: &BTreeMap<u32, ThreadCpu>,
) -> Vec<(u32, ThreadCpu)> {
    after
        .iter()
        .map(|(tid, t)| {
            let base = before.get(tid).map_or(Duration::ZERO, |b| b.cpu);
            let delta = ThreadCpu {
                name: t.name.clone(),
                cpu: t.cpu.saturating_sub(base),
            };
            (*tid, delta)
        })
        .collect()
}
