//! What a soak has done so far, saved after every run so that it can be
//! resumed (`--resume DIR`) and read while it goes. Memory stays flat: per
//! run only counters change; findings are kept once per signature.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Distinct signatures kept in full; later new ones are only counted, so a
/// soak that finds a new signature on every run still holds memory flat.
pub const MAX_SIGNATURES: usize = 500;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub seed: u64,
    pub shard: Shard,
    pub duration_secs: u64,
    /// Time spent running, over every resume.
    pub elapsed_secs: f64,
    /// This shard's next iteration (the global iteration is
    /// `next * shard.count + shard.index`).
    pub next: u64,
    pub runs: u64,
    pub passed: u64,
    pub with_driver_findings: u64,
    pub failed: u64,
    pub fences: u64,
    /// Keyed by signature.
    pub findings: BTreeMap<String, Seen>,
    /// New signatures past [`MAX_SIGNATURES`].
    pub signatures_not_kept: u64,
    /// Per `scenario on driver`: runs and failed runs.
    pub pairs: BTreeMap<String, PairCount>,
    pub rss_kib_start: u64,
    pub rss_kib_last: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: a shard is INDEX/COUNT, e.g. 0/4"))?;
        let index: u64 = i
            .parse()
            .map_err(|_| format!("{s:?}: {i:?} is not a number"))?;
        let count: u64 = n
            .parse()
            .map_err(|_| format!("{s:?}: {n:?} is not a number"))?;
        if count == 0 || index >= count {
            return Err(format!("{s:?}: INDEX must be below COUNT (0/4 … 3/4)"));
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// One deduplicated finding or failure.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Seen {
    /// "splat", "driver-finding" or "failure".
    pub kind: String,
    pub count: u64,
    pub first_iteration: u64,
    pub scenario: String,
    pub driver: String,
    pub reproduce: String,
    /// The first run's evidence (splat excerpt, finding detail, reason).
    pub evidence: Vec<String>,
    pub run_dir: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PairCount {
    pub runs: u64,
    pub failed: u64,
}

impl State {
    pub fn new(seed: u64, shard: Shard, duration_secs: u64, rss_kib: u64) -> Self {
        State {
            seed,
            shard,
            duration_secs,
            elapsed_secs: 0.0,
            next: 0,
            runs: 0,
            passed: 0,
            with_driver_findings: 0,
            failed: 0,
            fences: 0,
            findings: BTreeMap::new(),
            signatures_not_kept: 0,
            pairs: BTreeMap::new(),
            rss_kib_start: rss_kib,
            rss_kib_last: rss_kib,
        }
    }

    /// Counts one sighting of `signature`; the first keeps its evidence.
    pub fn note(&mut self, signature: String, first: impl FnOnce() -> Seen) {
        if let Some(seen) = self.findings.get_mut(&signature) {
            seen.count += 1;
        } else if self.findings.len() < MAX_SIGNATURES {
            self.findings.insert(signature, first());
        } else {
            self.signatures_not_kept += 1;
        }
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading soak state {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("soak state {}", path.display()))
    }

    /// Writes the state atomically (a crash leaves the old or the new one).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }
}

/// Resident memory of this process in KiB (0 where /proc does not say).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_bad_ones_say_why() {
        assert_eq!("1/4".parse::<Shard>(), Ok(Shard { index: 1, count: 4 }));
        assert!("4/4".parse::<Shard>().unwrap_err().contains("below COUNT"));
        assert!("x/4".parse::<Shard>().unwrap_err().contains("not a number"));
        assert!("3".parse::<Shard>().unwrap_err().contains("INDEX/COUNT"));
    }

    #[test]
    fn state_round_trips_and_signatures_are_counted_once_kept_bounded() {
        let mut s = State::new(9, Shard { index: 0, count: 1 }, 60, 1000);
        let seen = |i| Seen {
            kind: "splat".into(),
            count: 1,
            first_iteration: i,
            scenario: "smoke".into(),
            driver: "fencelab".into(),
            reproduce: "r".into(),
            evidence: vec!["e".into()],
            run_dir: None,
        };
        s.note("a".into(), || seen(1));
        s.note("a".into(), || seen(2));
        assert_eq!(s.findings["a"].count, 2);
        assert_eq!(s.findings["a"].first_iteration, 1);
        for i in 0..(MAX_SIGNATURES as u64 + 5) {
            s.note(format!("sig{i}"), || seen(i));
        }
        assert_eq!(s.findings.len(), MAX_SIGNATURES);
        assert_eq!(s.signatures_not_kept, 6);
        let path = std::env::temp_dir().join(format!("soak-state-{}.json", std::process::id()));
        s.save(&path).unwrap();
        assert_eq!(State::load(&path).unwrap(), s);
        std::fs::remove_file(&path).unwrap();
        assert!(rss_kib() > 0);
    }
}
