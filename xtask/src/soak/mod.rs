//! `cargo xtask soak`: scenarios in a loop for a set time, each run with a
//! plan derived from the soak's seed ([`plan_gen`]). It keeps going after a
//! failure, counts each finding once per signature ([`state`]), saves its
//! state after every run (`--resume`), and splits the work into shards
//! (`--shard i/n`) that CI runs side by side.

pub mod plan_gen;
pub mod state;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::boot::Driver;
use crate::scenario::judge::Verdict;
use crate::scenario::run::{self, Outcome, Request};
use crate::scenario::spec::{self, Scenario};
use state::{Seen, Shard, State};

#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    /// How long to soak, e.g. 30m, 2h (a run in progress is finished).
    #[arg(long, value_parser = humantime::parse_duration, required_unless_present = "resume")]
    pub duration: Option<Duration>,
    /// Seed every run's seed and plan derive from [default: random, printed].
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Run only this shard's share of the iterations: INDEX/COUNT.
    #[arg(long, default_value = "0/1")]
    pub shard: Shard,
    /// Only scenarios on this driver [default: both].
    #[arg(long, value_enum)]
    pub driver: Option<Driver>,
    /// Stop after this many runs even if time is left.
    #[arg(long, value_name = "N")]
    pub max_runs: Option<u64>,
    /// Continue the soak saved in this folder (its seed, shard and duration).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["seed", "shard", "duration"])]
    pub resume: Option<PathBuf>,
    /// Keep the run folders of passing runs (default: only failing runs'
    /// folders are kept, so a long soak holds its disk use flat).
    #[arg(long)]
    pub keep_passing_runs: bool,
}

/// Every scenario × driver a soak cycles through, in a fixed order.
fn pairs(driver: Option<Driver>) -> Result<Vec<(Scenario, Driver)>> {
    let drivers = match driver {
        Some(d) => vec![d],
        None => vec![Driver::VirtioGpu, Driver::Fencelab],
    };
    let mut pairs = Vec::new();
    for scenario in spec::load_all()? {
        for &d in &drivers {
            if scenario.for_driver(d).is_ok() {
                pairs.push((scenario.clone(), d));
            }
        }
    }
    if pairs.is_empty() {
        bail!("no scenario supports the driver chosen");
    }
    Ok(pairs)
}

/// Seed of global iteration `i` of a soak seeded `seed` (SplitMix64 step),
/// below 2^63 so it pastes into plans and command lines.
pub fn iteration_seed(seed: u64, i: u64) -> u64 {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) >> 1
}

pub fn run(args: &SoakArgs) -> Result<()> {
    let (dir, mut state) = match &args.resume {
        Some(dir) => {
            let state = State::load(&dir.join("state.json"))?;
            eprintln!(
                "soak: resuming {} (seed {}, shard {}, {} runs, {:.0} of {} s done)",
                dir.display(),
                state.seed,
                state.shard,
                state.runs,
                state.elapsed_secs,
                state.duration_secs
            );
            (dir.clone(), state)
        }
        None => {
            let seed = args.seed.unwrap_or_else(|| rand::random::<u64>() >> 1);
            let duration = args.duration.context("--duration is required")?;
            let dir = crate::paths::runs_dir().join(format!(
                "soak-{seed}-shard-{}-of-{}",
                args.shard.index, args.shard.count
            ));
            if dir.join("state.json").exists() {
                bail!(
                    "{} holds a soak already: resume it with --resume {0}, or remove it",
                    dir.display()
                );
            }
            std::fs::create_dir_all(dir.join("plans"))
                .with_context(|| format!("creating {}", dir.display()))?;
            let state = State::new(seed, args.shard, duration.as_secs(), state::rss_kib());
            (dir, state)
        }
    };
    println!(
        "soak: seed {} shard {} for {} s; state in {}",
        state.seed,
        state.shard,
        state.duration_secs,
        dir.join("state.json").display()
    );
    let pairs = pairs(args.driver)?;
    let bar = progress_bar(&state);
    let session_start = Instant::now();
    let elapsed_before = state.elapsed_secs;
    let mut runs_this_session = 0;
    while state.elapsed_secs < state.duration_secs as f64
        && args.max_runs.is_none_or(|max| runs_this_session < max)
    {
        let j = state.next;
        let i = j * state.shard.count + state.shard.index;
        let (scenario, driver) = &pairs[((j + state.shard.index) % pairs.len() as u64) as usize];
        let outcome = one_run(&dir, &state, i, scenario, *driver)?;
        record(&mut state, i, &outcome);
        if !args.keep_passing_runs && outcome.verdict == Verdict::Pass {
            if let Some(run_dir) = &outcome.run_dir {
                let _ = std::fs::remove_dir_all(run_dir);
            }
        }
        state.next += 1;
        runs_this_session += 1;
        state.elapsed_secs = elapsed_before + session_start.elapsed().as_secs_f64();
        state.rss_kib_last = state::rss_kib();
        state.save(&dir.join("state.json"))?;
        bar.set_position(state.elapsed_secs.min(state.duration_secs as f64) as u64);
        bar.set_message(counts_line(&state));
        let line = format!("soak: #{i} {}", crate::scenario::output::one_line(&outcome));
        // indicatif draws nothing when stderr is not a terminal (CI logs):
        // then each run gets a plain line with the counts.
        if bar.is_hidden() {
            eprintln!("{line}  [{}]", counts_line(&state));
        } else {
            bar.println(line);
        }
        if crate::supervise::was_interrupted() {
            bar.abandon();
            bail!(
                "interrupted after {} runs; resume with: cargo xtask soak --resume {}",
                state.runs,
                dir.display()
            );
        }
    }
    bar.finish_and_clear();
    write_final_reports(&dir, &state)?;
    print_summary(&dir, &state);
    Ok(())
}

fn progress_bar(state: &State) -> ProgressBar {
    let bar = ProgressBar::new(state.duration_secs);
    bar.set_style(
        ProgressStyle::with_template("soak [{elapsed_precise}] {wide_bar} {pos}/{len} s  {msg}")
            .expect("a valid template"),
    );
    bar.set_position(state.elapsed_secs as u64);
    bar.set_message(counts_line(state));
    bar.enable_steady_tick(Duration::from_secs(1));
    bar
}

fn counts_line(s: &State) -> String {
    format!(
        "runs {} · pass {} · driver findings {} · fail {} · signatures {} · fences {} · rss {} KiB",
        s.runs,
        s.passed,
        s.with_driver_findings,
        s.failed,
        s.findings.len(),
        s.fences,
        s.rss_kib_last
    )
}

/// Derives iteration `i`'s plan and seed, writes the plan, runs the scenario.
fn one_run(
    dir: &Path,
    state: &State,
    i: u64,
    scenario: &Scenario,
    driver: Driver,
) -> Result<Outcome> {
    let seed = iteration_seed(state.seed, i);
    let base = match scenario.plan_path() {
        Some(path) => Some(
            std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
        ),
        None => None,
    };
    let derived = plan_gen::derive(base.as_deref(), seed)
        .with_context(|| format!("deriving iteration {i}'s plan from {}", scenario.name))?;
    let plan = dir
        .join("plans")
        .join(format!("{i:06}-{}.toml", scenario.name));
    std::fs::write(
        &plan,
        format!(
            "# soak seed {} iteration {i}: {} on {}; added: {}\n{}",
            state.seed,
            scenario.name,
            spec::driver_key(driver),
            derived.added.join(", "),
            derived.toml
        ),
    )
    .with_context(|| format!("writing {}", plan.display()))?;
    run::run(&Request {
        scenario,
        driver,
        seed: Some(seed),
        plan: Some(plan),
        fences: None,
        inject_bug: None,
        console: false,
    })
}

/// Normalises text for a signature: numbers and hex vary between runs of
/// the same problem, so they become `N`.
pub fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_number = false;
    for word in text.split_inclusive(|c: char| !c.is_ascii_alphanumeric() && c != '_') {
        let (core, sep) = word.split_at(
            word.trim_end_matches(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                .len(),
        );
        let numeric = !core.is_empty()
            && (core.bytes().all(|b| b.is_ascii_digit())
                || (core.starts_with("0x")
                    && core.len() > 2
                    && core[2..].bytes().all(|b| b.is_ascii_hexdigit()))
                || (core.len() >= 8 && core.bytes().all(|b| b.is_ascii_hexdigit())));
        if numeric {
            if !in_number {
                out.push('N');
            }
            in_number = sep.is_empty();
        } else {
            out.push_str(core);
            in_number = false;
        }
        out.push_str(sep);
    }
    out
}

/// Counts the run and notes each of its problems under its signature.
fn record(state: &mut State, i: u64, outcome: &Outcome) {
    state.runs += 1;
    state.fences += outcome.fences_submitted;
    let pair = format!("{} on {}", outcome.scenario, outcome.driver);
    let count = state.pairs.entry(pair).or_default();
    count.runs += 1;
    match outcome.verdict {
        Verdict::Pass => state.passed += 1,
        Verdict::DriverFindings => state.with_driver_findings += 1,
        Verdict::Fail | Verdict::Unsupported => {
            state.failed += 1;
            count.failed += 1;
        }
    }
    let seen = |kind: &str, evidence: Vec<String>| Seen {
        kind: kind.into(),
        count: 1,
        first_iteration: i,
        scenario: outcome.scenario.clone(),
        driver: outcome.driver.into(),
        reproduce: outcome.reproduce.clone(),
        evidence,
        run_dir: outcome.run_dir.as_ref().map(|d| d.display().to_string()),
    };
    for splat in &outcome.splats {
        state.note(format!("splat {}", splat.signature()), || {
            seen("splat", splat.excerpt.iter().take(15).cloned().collect())
        });
    }
    for finding in &outcome.driver_findings {
        state.note(
            format!(
                "driver-finding {} {} {}",
                outcome.driver, outcome.scenario, finding.kind
            ),
            || {
                seen(
                    "driver-finding",
                    vec![format!(
                        "{} ×{}: {}",
                        finding.kind, finding.count, finding.detail
                    )],
                )
            },
        );
    }
    if outcome.verdict == Verdict::Fail {
        for reason in outcome
            .reasons
            .iter()
            .filter(|r| !r.starts_with("kernel splat:"))
        {
            state.note(
                format!(
                    "failure {} {} {}",
                    outcome.driver,
                    outcome.scenario,
                    normalise(reason)
                ),
                || seen("failure", vec![reason.clone()]),
            );
        }
    }
}

fn write_final_reports(dir: &Path, state: &State) -> Result<()> {
    let report = dir.join("report.json");
    std::fs::write(&report, serde_json::to_string_pretty(state)?)
        .with_context(|| format!("writing {}", report.display()))?;
    let mut cases = Vec::new();
    for (pair, count) in &state.pairs {
        let problems: Vec<String> = state
            .findings
            .iter()
            .filter(|(_, s)| {
                format!("{} on {}", s.scenario, s.driver) == *pair && s.kind != "driver-finding"
            })
            .map(|(sig, s)| {
                format!(
                    "{sig} ×{}\n  reproduce: {}\n  {}",
                    s.count,
                    s.reproduce,
                    s.evidence.join("\n  ")
                )
            })
            .collect();
        cases.push(crate::junit::Case {
            name: pair.clone(),
            classname: format!("soak.shard{}", state.shard.index),
            time_secs: 0.0,
            outcome: if count.failed == 0 {
                crate::junit::Outcome::Passed
            } else {
                crate::junit::Outcome::Failed {
                    message: format!("{} of {} runs failed", count.failed, count.runs),
                    text: problems.join("\n"),
                }
            },
            system_out: None,
        });
    }
    crate::junit::write(&dir.join("junit.xml"), "fencelab soak", &cases)
}

fn print_summary(dir: &Path, s: &State) {
    println!(
        "soak: seed {} shard {}: {} runs in {:.0} s ({} passed, {} with driver findings, {} failed), {} fences",
        s.seed,
        s.shard,
        s.runs,
        s.elapsed_secs,
        s.passed,
        s.with_driver_findings,
        s.failed,
        s.fences
    );
    println!(
        "soak: harness memory: {} KiB at start, {} KiB at the end",
        s.rss_kib_start, s.rss_kib_last
    );
    for (signature, seen) in &s.findings {
        println!(
            "soak: [{}] ×{} {signature}\n      first: iteration {} ({} on {}); reproduce: {}",
            seen.kind, seen.count, seen.first_iteration, seen.scenario, seen.driver, seen.reproduce
        );
    }
    if s.signatures_not_kept > 0 {
        println!(
            "soak: {} more signatures were counted but not kept",
            s.signatures_not_kept
        );
    }
    println!(
        "soak: reports {} {}",
        dir.join("report.json").display(),
        dir.join("junit.xml").display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iteration_seeds_are_distinct_stable_and_below_2_63() {
        let seeds: std::collections::BTreeSet<u64> =
            (0..1000).map(|i| iteration_seed(42, i)).collect();
        assert_eq!(seeds.len(), 1000);
        assert!(seeds.iter().all(|s| *s < 1 << 63));
        assert_eq!(iteration_seed(42, 7), iteration_seed(42, 7));
        assert_ne!(iteration_seed(42, 7), iteration_seed(43, 7));
    }

    #[test]
    fn normalise_hides_numbers_and_addresses_only() {
        assert_eq!(
            normalise("fences: 600 submitted, 599 signaled at 0xffff8880 pid 1234"),
            "fences: N submitted, N signaled at N pid N"
        );
        assert_eq!(normalise("ETIMEDOUT in smoke_2"), "ETIMEDOUT in smoke_2");
        assert_eq!(normalise("deadbeefcafe01 x"), "N x");
    }
}
