//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/` (the virtio-gpu
//! decoder with the fencelab command stream, the GPU state machine, fault
//! plans, control requests).
//!
//! - `--smoke`: every target replays its committed corpus (and the project's
//!   fixtures) and then fuzzes for [`SMOKE_SECONDS`]; what `cargo xtask test`
//!   runs.
//! - `TARGET --duration 10m`: a long run whose new inputs go to a scratch
//!   folder under `target/fencelab-runs/`, or are minimised back into
//!   `fuzz/corpus/TARGET` with `--merge-corpus`.
//!
//! cargo-fuzz passes `-Z` flags (`-Zsanitizer=address`) that only a nightly
//! rustc accepts; the machines have stable 1.95 and cannot fetch nightly, so
//! every cargo-fuzz command runs with `RUSTC_BOOTSTRAP=1`, which makes
//! stable rustc accept them (its AddressSanitizer runtime ships with stable's
//! rust-std). cargo-fuzz itself is installed into the cache on first use
//! ([`crate::setup::ensure_cargo_fuzz`]). Fuzzing runs one libFuzzer process
//! (no `-jobs`), under `nice -n 19`: the machines have two shared cores.

use crate::{cmd, guest, paths, setup};
use anyhow::{Context, Result, bail};
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The targets, as `fuzz/Cargo.toml` names them.
pub const TARGETS: &[&str] = &["decode", "gpu", "plan", "control"];
/// How long `--smoke` fuzzes each target after replaying its corpus.
pub const SMOKE_SECONDS: u64 = 10;
/// libFuzzer's per-input time limit: an input slower than this is a finding.
const INPUT_TIMEOUT_SECONDS: u64 = 10;
/// libFuzzer's memory limit per process.
const RSS_LIMIT_MB: u64 = 2048;
/// How often a long run prints libFuzzer's latest status line.
const PROGRESS_EVERY: Duration = Duration::from_secs(60);
/// What a committed corpus should stay under (files, bytes).
const CORPUS_LIMITS: (usize, u64) = (200, 1 << 20);

#[derive(clap::Args, Debug, Clone)]
pub struct FuzzArgs {
    /// The target to fuzz; omit with --smoke (which runs them all).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS),
          required_unless_present = "smoke", conflicts_with = "smoke")]
    pub target: Option<String>,
    /// Every target: replay its corpus, then fuzz a few seconds (the test suite's stage).
    #[arg(long)]
    pub smoke: bool,
    /// How long a single target's run lasts.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m",
          conflicts_with = "smoke")]
    pub duration: Duration,
    /// Minimise the run's corpus and the committed one back into fuzz/corpus/TARGET.
    #[arg(long, conflicts_with = "smoke")]
    pub merge_corpus: bool,
}

pub fn run(args: &FuzzArgs) -> Result<()> {
    if args.smoke {
        return smoke();
    }
    let target = args
        .target
        .as_deref()
        .context("a target is required without --smoke")?;
    let fuzz = Fuzz::prepare()?;
    let dir = guest::new_run_dir(&format!("fuzz-{target}"))?;
    let scratch = dir.join("corpus");
    let result = fuzz.run(target, &scratch, &dir, args.duration)?;
    println!("{}", result.line());
    if let Some(crash) = &result.crash {
        bail!("{}", fuzz.crash_report(target, crash, &dir));
    }
    if args.merge_corpus {
        fuzz.merge(target, &scratch, &dir)?;
    } else {
        eprintln!(
            "fuzz: new inputs are in {} (not merged; --merge-corpus minimises them into {})",
            scratch.display(),
            fuzz.corpus(target).display()
        );
    }
    Ok(())
}

/// `cargo xtask fuzz --smoke`: each target replays its committed corpus
/// and fixtures, then fuzzes [`SMOKE_SECONDS`]. Prints one line per target
/// and `fuzz-smoke: N passed, M failed`; fails naming each crash input and
/// the command that reproduces it.
pub fn smoke() -> Result<()> {
    let fuzz = Fuzz::prepare()?;
    let dir = guest::new_run_dir("fuzz-smoke")?;
    let mut failures = Vec::new();
    for target in TARGETS {
        let scratch = dir.join("corpus").join(target);
        let result = fuzz.run(target, &scratch, &dir, Duration::from_secs(SMOKE_SECONDS))?;
        println!("{}", result.line());
        if let Some(crash) = &result.crash {
            failures.push(fuzz.crash_report(target, crash, &dir));
        }
    }
    let passed = TARGETS.len() - failures.len();
    println!("fuzz-smoke: {passed} passed, {} failed", failures.len());
    if !failures.is_empty() {
        bail!("fuzz smoke found crashes:\n{}", failures.join("\n"));
    }
    Ok(())
}

/// cargo-fuzz, installed and with the targets built.
struct Fuzz {
    cargo_fuzz: PathBuf,
    fuzz_dir: PathBuf,
}

/// What one libFuzzer run did.
#[derive(Debug, Clone, PartialEq, Default)]
struct RunResult {
    target: String,
    elapsed: Duration,
    /// libFuzzer's last status line (`#N DONE cov: … ft: … exec/s: …`).
    status: Option<Status>,
    /// The input libFuzzer wrote when the target crashed, timed out or ran out of memory.
    crash: Option<Crash>,
}

#[derive(Debug, Clone, PartialEq, Default)]
struct Status {
    execs: u64,
    cov: Option<u64>,
    ft: Option<u64>,
    corpus: Option<String>,
    exec_per_sec: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
struct Crash {
    /// `crash`, `timeout`, `oom`, `leak`, `slow-unit`.
    kind: String,
    input: PathBuf,
    /// The panic message or sanitizer summary, when the log has one.
    reason: Option<String>,
}

impl RunResult {
    fn line(&self) -> String {
        let verdict = match &self.crash {
            Some(c) => format!("FAIL ({})", c.kind),
            None => "ok".to_string(),
        };
        let figures = self.status.as_ref().map_or_else(
            || "no status line".to_string(),
            |s| {
                let opt = |v: Option<u64>| v.map_or("?".into(), |v| v.to_string());
                format!(
                    "{} execs, {} exec/s, cov {}, ft {}, corpus {}",
                    s.execs,
                    opt(s.exec_per_sec),
                    opt(s.cov),
                    opt(s.ft),
                    s.corpus.as_deref().unwrap_or("?")
                )
            },
        );
        format!(
            "fuzz: {} {verdict} in {}: {figures}",
            self.target,
            cmd::human_duration(self.elapsed)
        )
    }
}

impl Fuzz {
    /// Installs cargo-fuzz if needed and builds every target.
    fn prepare() -> Result<Fuzz> {
        let cargo_fuzz = setup::ensure_cargo_fuzz()?;
        let fuzz = Fuzz {
            cargo_fuzz,
            fuzz_dir: paths::workspace_root().join("fuzz"),
        };
        let log = paths::runs_dir().join("fuzz-build.log");
        let logged = cmd::Logged {
            every: Some(Duration::from_secs(60)),
            ..cmd::Logged::new("fuzz: building the targets (cargo fuzz build)", &log)
        };
        let started = Instant::now();
        eprintln!("fuzz: building the targets (log: {})", log.display());
        cmd::run_logged(fuzz.build_command(), &logged)?;
        eprintln!(
            "fuzz: targets built in {}",
            cmd::human_duration(started.elapsed())
        );
        Ok(fuzz)
    }

    fn cargo_fuzz(&self) -> Command {
        cargo_fuzz_command(&self.cargo_fuzz)
    }

    fn build_command(&self) -> Command {
        let mut c = self.cargo_fuzz();
        c.args(["build", "--debug-assertions", "--fuzz-dir"])
            .arg(&self.fuzz_dir);
        c
    }

    fn corpus(&self, target: &str) -> PathBuf {
        self.fuzz_dir.join("corpus").join(target)
    }

    /// Read-only inputs besides the committed corpus: the project's
    /// fixtures, so that a new example or broken plan is fuzzed from day one.
    fn fixtures(&self, target: &str) -> Vec<PathBuf> {
        let plans = paths::workspace_root().join("device").join("plans");
        match target {
            "plan" => vec![plans.join("broken"), plans],
            _ => Vec::new(),
        }
    }

    /// The command that fuzzes `target` for `seconds`, new inputs going to
    /// `scratch` (the first corpus folder, the only one libFuzzer writes).
    fn run_command(&self, target: &str, scratch: &Path, artifacts: &Path, seconds: u64) -> Command {
        let mut corpora = vec![scratch.to_path_buf(), self.corpus(target)];
        corpora.extend(self.fixtures(target));
        let mut c = nice(self.cargo_fuzz());
        c.args(["run", "--debug-assertions", "--fuzz-dir"])
            .arg(&self.fuzz_dir)
            .arg(target)
            .args(&corpora)
            .arg("--")
            .args(libfuzzer_flags(seconds, artifacts));
        c
    }

    fn run(
        &self,
        target: &str,
        scratch: &Path,
        dir: &Path,
        duration: Duration,
    ) -> Result<RunResult> {
        let artifacts = dir.join("artifacts").join(target);
        for d in [scratch, &artifacts, &self.corpus(target)] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let log = dir.join(format!("{target}.log"));
        let seconds = duration.as_secs().max(1);
        eprintln!(
            "fuzz: {target}: replaying {} and fuzzing for {} (log: {})",
            self.corpus(target).display(),
            cmd::human_duration(duration),
            log.display()
        );
        let started = Instant::now();
        let status = watch(
            self.run_command(target, scratch, &artifacts, seconds),
            &log,
            target,
        )?;
        let text = fs::read(&log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .with_context(|| format!("reading {}", log.display()))?;
        let result = RunResult {
            target: target.to_string(),
            elapsed: started.elapsed(),
            status: last_status(&text),
            crash: find_crash(&text),
        };
        if !status.success() && result.crash.is_none() {
            bail!(
                "cargo fuzz run {target} failed ({status}) without a crash input:\n{}",
                cmd::tail(&log, 30)
            );
        }
        Ok(result)
    }

    fn crash_report(&self, target: &str, crash: &Crash, dir: &Path) -> String {
        format!(
            "fuzz target {target}: {kind}{reason}\n  input: {input}\n  log: {log}\n  reproduce: RUSTC_BOOTSTRAP=1 {cargo_fuzz} fuzz run --fuzz-dir {fuzz_dir} {target} {input}",
            kind = crash.kind,
            reason = crash
                .reason
                .as_deref()
                .map_or(String::new(), |r| format!(": {r}")),
            input = crash.input.display(),
            log = dir.join(format!("{target}.log")).display(),
            cargo_fuzz = self.cargo_fuzz.display(),
            fuzz_dir = self.fuzz_dir.display(),
        )
    }

    /// The command that writes into the empty folder `merged` a small set of
    /// inputs from the committed corpus and `scratch` covering everything
    /// they cover.
    fn merge_command(&self, target: &str, merged: &Path, scratch: &Path, dir: &Path) -> Command {
        let mut c = nice(self.cargo_fuzz());
        c.args(["run", "--debug-assertions", "--fuzz-dir"])
            .arg(&self.fuzz_dir)
            .arg(target)
            .arg(merged)
            .arg(self.corpus(target))
            .arg(scratch)
            .args(["--", "-set_cover_merge=1", "-use_counters=0"])
            .arg(format!("-artifact_prefix={}/", dir.display()));
        c
    }

    /// Minimises the committed corpus plus `scratch` into a fresh folder
    /// and puts it in place of `fuzz/corpus/TARGET`. libFuzzer's
    /// `-set_cover_merge=1 -use_counters=0` keeps a small set of inputs
    /// that together reach every edge the others reach, ignoring hit
    /// counts: on the gpu target after 10 minutes, 107 files / 76 KB, where
    /// `-merge=1` kept 904 files / 840 KB (hit-count variety comes back
    /// within seconds of fuzzing; the repository keeps the edges).
    fn merge(&self, target: &str, scratch: &Path, dir: &Path) -> Result<()> {
        let corpus = self.corpus(target);
        let merged = dir.join("merged").join(target);
        fs::create_dir_all(&merged).with_context(|| format!("creating {}", merged.display()))?;
        let c = self.merge_command(target, &merged, scratch, dir);
        let log = dir.join(format!("{target}-merge.log"));
        cmd::run_logged(c, &cmd::Logged::new("fuzz: merging the corpus", &log))?;
        let before = corpus_size(&corpus)?;
        fs::remove_dir_all(&corpus).with_context(|| format!("removing {}", corpus.display()))?;
        copy_dir(&merged, &corpus)?;
        let after = corpus_size(&corpus)?;
        eprintln!(
            "fuzz: {} minimised: {} files / {} bytes before, {} files / {} bytes now",
            corpus.display(),
            before.0,
            before.1,
            after.0,
            after.1
        );
        if after.0 > CORPUS_LIMITS.0 || after.1 > CORPUS_LIMITS.1 {
            eprintln!(
                "fuzz: warning: {} is over the {} files / {} bytes kept in the repository",
                corpus.display(),
                CORPUS_LIMITS.0,
                CORPUS_LIMITS.1
            );
        }
        Ok(())
    }
}

/// `cargo-fuzz fuzz …` with the flag that lets stable rustc take `-Z`.
/// (cargo runs a subcommand binary with the subcommand's name as its first
/// argument; running it directly does the same.)
fn cargo_fuzz_command(cargo_fuzz: &Path) -> Command {
    let mut c = Command::new(cargo_fuzz);
    c.arg("fuzz").env("RUSTC_BOOTSTRAP", "1");
    c
}

/// `command` run under `nice -n 19`.
fn nice(command: Command) -> Command {
    let mut c = Command::new("nice");
    c.args(["-n", "19"]).arg(command.get_program());
    c.args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(v) => c.env(key, v),
            None => c.env_remove(key),
        };
    }
    if let Some(dir) = command.get_current_dir() {
        c.current_dir(dir);
    }
    c
}

/// libFuzzer's flags for a run of `seconds` writing crash inputs to `artifacts`.
fn libfuzzer_flags(seconds: u64, artifacts: &Path) -> Vec<OsString> {
    let mut artifact_prefix = OsString::from("-artifact_prefix=");
    artifact_prefix.push(artifacts.as_os_str());
    artifact_prefix.push("/");
    vec![
        format!("-max_total_time={seconds}").into(),
        format!("-timeout={INPUT_TIMEOUT_SECONDS}").into(),
        format!("-rss_limit_mb={RSS_LIMIT_MB}").into(),
        "-print_final_stats=1".into(),
        artifact_prefix,
    ]
}

/// Runs `command` with its output in `log`, printing libFuzzer's latest
/// status line every [`PROGRESS_EVERY`].
fn watch(mut command: Command, log: &Path, target: &str) -> Result<std::process::ExitStatus> {
    let file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let described = cmd::describe(&command);
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone().context("duplicating the log file")?)
        .stderr(file);
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot run `{described}`"))?;
    let started = Instant::now();
    let mut next = started + PROGRESS_EVERY;
    loop {
        if let Some(status) = child.try_wait().context("waiting for cargo fuzz")? {
            return Ok(status);
        }
        if Instant::now() >= next {
            let last = cmd::tail_matching(log, 1, |l| l.starts_with('#'));
            eprintln!(
                "fuzz: {target} ... {} {last}",
                cmd::human_duration(started.elapsed())
            );
            next += PROGRESS_EVERY;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The last libFuzzer status line (`#123 pulse cov: 5 ft: 6 corp: 3/40b
/// exec/s: 100 rss: 30Mb`), with `stat::number_of_executed_units` when the
/// final stats are there.
fn last_status(log: &str) -> Option<Status> {
    let line = log.lines().rev().find(|l| {
        l.starts_with('#')
            && l[1..]
                .split_whitespace()
                .next()
                .is_some_and(|n| n.parse::<u64>().is_ok())
    })?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |key: &str| {
        words
            .iter()
            .position(|w| *w == key)
            .and_then(|i| words.get(i + 1))
            .copied()
    };
    let number = |key: &str| after(key).and_then(|v| v.parse().ok());
    let mut status = Status {
        execs: words[0][1..].parse().ok()?,
        cov: number("cov:"),
        ft: number("ft:"),
        corpus: after("corp:").map(str::to_string),
        exec_per_sec: number("exec/s:"),
    };
    let stat = |key: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    if let Some(execs) = stat("stat::number_of_executed_units:") {
        status.execs = execs;
    }
    if let Some(rate) = stat("stat::average_exec_per_sec:") {
        status.exec_per_sec = Some(rate);
    }
    Some(status)
}

/// The input libFuzzer saved when it stopped on a finding, and why.
fn find_crash(log: &str) -> Option<Crash> {
    let input = log
        .lines()
        .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))?;
    let file = Path::new(input).file_name()?.to_string_lossy().into_owned();
    let kind = file.split('-').next().unwrap_or("crash").to_string();
    let reason = log
        .lines()
        .find_map(|l| {
            l.split_once("panicked at ")
                .map(|(_, rest)| format!("panicked at {}", rest.trim()))
        })
        .map(|at| {
            // The message is the line after "panicked at FILE:LINE:COL:".
            let message = log
                .lines()
                .skip_while(|l| !l.contains("panicked at "))
                .nth(1)
                .unwrap_or("")
                .trim();
            format!("{at} {message}").trim().to_string()
        })
        .or_else(|| {
            log.lines()
                .find(|l| l.starts_with("SUMMARY: ") || l.starts_with("==") && l.contains("ERROR"))
                .map(|l| l.trim().to_string())
        });
    Some(Crash {
        kind,
        input: PathBuf::from(input),
        reason,
    })
}

/// Files and bytes in a corpus folder.
fn corpus_size(dir: &Path) -> Result<(usize, u64)> {
    let mut files = 0;
    let mut bytes = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let meta = entry?.metadata()?;
        if meta.is_file() {
            files += 1;
            bytes += meta.len();
        }
    }
    Ok((files, bytes))
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let path = entry?.path();
        if path.is_file() {
            let dest = to.join(path.file_name().context("a file has a name")?);
            fs::copy(&path, &dest)
                .with_context(|| format!("copying {} to {}", path.display(), dest.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: FuzzArgs,
    }

    fn parse(args: &[&str]) -> Result<FuzzArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("fuzz").chain(args.iter().copied())).map(|c| c.args)
    }

    fn args_of(c: &Command) -> Vec<String> {
        c.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn fuzz() -> Fuzz {
        Fuzz {
            cargo_fuzz: PathBuf::from("/cache/tools/bin/cargo-fuzz"),
            fuzz_dir: PathBuf::from("/repo/fuzz"),
        }
    }

    #[test]
    fn smoke_needs_no_target_and_a_run_needs_one() {
        let a = parse(&["--smoke"]).unwrap();
        assert!(a.smoke && a.target.is_none());
        assert!(parse(&[]).is_err());
        let a = parse(&["gpu", "--duration", "10m", "--merge-corpus"]).unwrap();
        assert_eq!(a.target.as_deref(), Some("gpu"));
        assert_eq!(a.duration, Duration::from_secs(600));
        assert!(a.merge_corpus);
        assert_eq!(parse(&["plan"]).unwrap().duration, Duration::from_secs(600));
    }

    #[test]
    fn unknown_targets_and_smoke_with_a_target_are_refused() {
        assert!(parse(&["nope"]).is_err());
        assert!(parse(&["--smoke", "gpu"]).is_err());
        assert!(parse(&["--smoke", "--merge-corpus"]).is_err());
        assert!(parse(&["gpu", "--duration", "ten minutes"]).is_err());
    }

    #[test]
    fn every_target_is_a_fuzz_binary() {
        let manifest = fs::read_to_string(paths::workspace_root().join("fuzz/Cargo.toml")).unwrap();
        for target in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{target}\"")),
                "{target} missing from fuzz/Cargo.toml"
            );
            assert!(
                paths::workspace_root()
                    .join("fuzz/fuzz_targets")
                    .join(format!("{target}.rs"))
                    .is_file()
            );
        }
    }

    #[test]
    fn commands_let_stable_rustc_take_z_flags() {
        let f = fuzz();
        let build = f.build_command();
        assert_eq!(build.get_program(), "/cache/tools/bin/cargo-fuzz");
        assert_eq!(
            args_of(&build),
            [
                "fuzz",
                "build",
                "--debug-assertions",
                "--fuzz-dir",
                "/repo/fuzz"
            ]
        );
        let run = f.run_command("decode", Path::new("/s/corpus"), Path::new("/s/art"), 10);
        for c in [&build, &run] {
            assert!(
                c.get_envs()
                    .any(|(k, v)| k == "RUSTC_BOOTSTRAP" && v == Some("1".as_ref())),
                "{}",
                cmd::describe(c)
            );
        }
    }

    #[test]
    fn a_run_replays_the_committed_corpus_and_writes_only_to_scratch() {
        let run = fuzz().run_command("decode", Path::new("/s/corpus"), Path::new("/s/art"), 10);
        assert_eq!(run.get_program(), "nice");
        assert_eq!(
            args_of(&run),
            [
                "-n",
                "19",
                "/cache/tools/bin/cargo-fuzz",
                "fuzz",
                "run",
                "--debug-assertions",
                "--fuzz-dir",
                "/repo/fuzz",
                "decode",
                "/s/corpus",
                "/repo/fuzz/corpus/decode",
                "--",
                "-max_total_time=10",
                "-timeout=10",
                "-rss_limit_mb=2048",
                "-print_final_stats=1",
                "-artifact_prefix=/s/art/",
            ]
        );
    }

    #[test]
    fn the_plan_target_also_reads_the_plan_fixtures() {
        let run = fuzz().run_command("plan", Path::new("/s/c"), Path::new("/s/a"), 5);
        let args = args_of(&run);
        let dash = args.iter().position(|a| a == "--").unwrap();
        let root = paths::workspace_root();
        assert_eq!(
            args[9..dash],
            [
                "/s/c".to_string(),
                "/repo/fuzz/corpus/plan".into(),
                root.join("device/plans/broken").display().to_string(),
                root.join("device/plans").display().to_string(),
            ]
        );
    }

    #[test]
    fn a_merge_minimises_committed_and_scratch_into_an_empty_folder() {
        let c = fuzz().merge_command(
            "gpu",
            Path::new("/r/merged"),
            Path::new("/r/corpus"),
            Path::new("/r"),
        );
        assert_eq!(
            args_of(&c)[3..],
            [
                "fuzz",
                "run",
                "--debug-assertions",
                "--fuzz-dir",
                "/repo/fuzz",
                "gpu",
                "/r/merged",
                "/repo/fuzz/corpus/gpu",
                "/r/corpus",
                "--",
                "-set_cover_merge=1",
                "-use_counters=0",
                "-artifact_prefix=/r/",
            ]
        );
    }

    const DONE_LOG: &str = "\
INFO: Seed: 42
#2\tINITED cov: 10 ft: 12 corp: 1/1b exec/s: 0 rss: 30Mb
#1048576\tpulse  cov: 620 ft: 780 corp: 104/5604b lim: 4096 exec/s: 80000 rss: 494Mb
#1716370\tDONE   cov: 620 ft: 783 corp: 104/5604b lim: 4096 exec/s: 81731 rss: 494Mb
Done 1716370 runs in 21 second(s)
stat::number_of_executed_units: 1716370
stat::average_exec_per_sec:     81731
stat::new_units_added:          320
";

    #[test]
    fn the_last_status_line_gives_the_figures() {
        let s = last_status(DONE_LOG).unwrap();
        assert_eq!(
            s,
            Status {
                execs: 1_716_370,
                cov: Some(620),
                ft: Some(783),
                corpus: Some("104/5604b".into()),
                exec_per_sec: Some(81_731),
            }
        );
        assert!(find_crash(DONE_LOG).is_none());
        assert!(last_status("no libFuzzer here\n#not-a-status\n").is_none());
    }

    #[test]
    fn a_panic_is_reported_with_its_input_and_message() {
        let log = "\
#4096\tpulse  cov: 300 ft: 400 corp: 50/2b exec/s: 2048 rss: 40Mb

thread '<unnamed>' panicked at src/gpu.rs:120:9:
written bytes differ from the WRITE values
==1234== ERROR: libFuzzer: deadly signal
SUMMARY: libFuzzer: deadly signal
MS: 1 ChangeBit-; base unit: 0000
artifact_prefix='/s/art/'; Test unit written to /s/art/crash-0a1b2c
Base64: AAAA
";
        let crash = find_crash(log).unwrap();
        assert_eq!(crash.kind, "crash");
        assert_eq!(crash.input, Path::new("/s/art/crash-0a1b2c"));
        assert_eq!(
            crash.reason.as_deref(),
            Some("panicked at src/gpu.rs:120:9: written bytes differ from the WRITE values")
        );
        let result = RunResult {
            target: "gpu".into(),
            elapsed: Duration::from_secs(3),
            status: last_status(log),
            crash: Some(crash.clone()),
        };
        assert!(
            result
                .line()
                .starts_with("fuzz: gpu FAIL (crash) in 3.0s: 4096 execs")
        );
        let report = fuzz().crash_report("gpu", &crash, Path::new("/runs/x"));
        assert!(report.contains("input: /s/art/crash-0a1b2c"), "{report}");
        assert!(
            report.contains(
                "reproduce: RUSTC_BOOTSTRAP=1 /cache/tools/bin/cargo-fuzz fuzz run --fuzz-dir /repo/fuzz gpu /s/art/crash-0a1b2c"
            ),
            "{report}"
        );
    }

    #[test]
    fn timeouts_and_ooms_are_findings_too() {
        let log = "==9== ERROR: libFuzzer: timeout after 10 seconds\n\
                   SUMMARY: libFuzzer: timeout\n\
                   artifact_prefix='a/'; Test unit written to a/timeout-ff00\n";
        let crash = find_crash(log).unwrap();
        assert_eq!(crash.kind, "timeout");
        assert_eq!(
            crash.reason.as_deref(),
            Some("==9== ERROR: libFuzzer: timeout after 10 seconds")
        );
        let oom = "==9== ERROR: libFuzzer: out-of-memory (used: 2100Mb; exceeds: 2048Mb)\n\
                   Test unit written to a/oom-11\n";
        assert_eq!(find_crash(oom).unwrap().kind, "oom");
    }

    #[test]
    fn nice_keeps_the_program_arguments_and_environment() {
        let mut inner = Command::new("prog");
        inner.args(["a", "b"]).env("K", "V");
        let outer = nice(inner);
        assert_eq!(outer.get_program(), "nice");
        assert_eq!(args_of(&outer), ["-n", "19", "prog", "a", "b"]);
        assert!(
            outer
                .get_envs()
                .any(|(k, v)| k == "K" && v == Some("V".as_ref()))
        );
    }
}
