//! [`PlanDecider`]: applies a [`Plan`] to arriving fences.
//!
//! All randomness comes from one ChaCha8 generator seeded with the run's
//! seed, drawn in a fixed order for each fence:
//!
//! 1. for each rule in plan order whose other conditions hold and that has a
//!    `probability`: one uniform draw;
//! 2. the latency, unless it is fixed;
//! 3. the cross-timeline jitter, if any;
//! 4. the permutation of a reorder block the fence opens, if it opens one.
//!
//! So the same sequence of [`FenceInfo`]s under the same plan and seed gets
//! the same [`Decision`]s, which is what makes a run replayable.

use std::collections::HashMap;
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::fault::{Decide, Decision, FenceInfo, Hang, IrqFault, ReorderSlot, TimelineId};
use crate::plan::merge::merge_patch;
use crate::plan::{Actions, Latency, Plan, Reorder};

/// The seed a run uses: `--seed` if given, else the plan's, else a fresh
/// random one (which the device prints, so the run can be repeated). Random
/// seeds stay below 2^63 so they can be pasted into a plan's `seed` (TOML
/// integers are signed 64-bit).
pub fn choose_seed(cli: Option<u64>, plan: &Plan) -> u64 {
    cli.or(plan.seed())
        .unwrap_or_else(|| rand::random::<u64>() >> 1)
}

/// Decides every fence from a plan and a seeded RNG.
#[derive(Debug)]
pub struct PlanDecider {
    plan: Plan,
    seed: u64,
    rng: ChaCha8Rng,
    reorder: HashMap<TimelineId, TimelineBlocks>,
}

/// Reorder state of one timeline.
#[derive(Debug, Default)]
struct TimelineBlocks {
    next_block: u64,
    open: Option<OpenBlock>,
}

/// A reorder block still taking members.
#[derive(Debug)]
struct OpenBlock {
    block: u64,
    /// `ranks[position]`: a permutation of `0..size`.
    ranks: Vec<u32>,
    next_position: u32,
    hold_ns: u64,
}

impl OpenBlock {
    fn size(&self) -> u32 {
        self.ranks.len() as u32
    }

    /// The slot of the next arrival; `None` once the block is full.
    fn admit(&mut self) -> Option<ReorderSlot> {
        let position = self.next_position;
        let rank = *self.ranks.get(position as usize)?;
        self.next_position += 1;
        Some(ReorderSlot {
            block: self.block,
            size: self.size(),
            rank,
            position,
            hold_ns: self.hold_ns,
        })
    }

    fn is_full(&self) -> bool {
        self.next_position >= self.size()
    }
}

/// The actions in force for one fence, borrowed from the plan.
#[derive(Default)]
struct Effective<'p> {
    latency: Option<&'p Latency>,
    reorder: Option<Reorder>,
    jitter_ns: Option<u64>,
    hang: Option<Hang>,
    error: Option<u32>,
    irq: IrqFault,
}

impl<'p> Effective<'p> {
    fn apply(&mut self, a: &'p Actions) {
        if let Some(l) = &a.latency {
            self.latency = Some(l);
        }
        if a.reorder.is_some() {
            self.reorder = a.reorder;
        }
        if a.jitter_ns.is_some() {
            self.jitter_ns = a.jitter_ns;
        }
        if let Some(h) = a.hang {
            self.hang = h;
        }
        if let Some(e) = a.error {
            self.error = e;
        }
        if let Some(i) = a.irq {
            self.irq = i;
        }
    }
}

impl PlanDecider {
    pub fn new(plan: Plan, seed: u64) -> Self {
        tracing::info!(
            origin = plan.origin(),
            sha256 = plan.sha256_hex(),
            rules = plan.rules().len(),
            seed,
            "plan in force"
        );
        PlanDecider {
            plan,
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            reorder: HashMap::new(),
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Replaces the plan; the RNG and open reorder blocks carry on.
    pub fn replace_plan(&mut self, plan: Plan) {
        tracing::info!(
            origin = plan.origin(),
            sha256 = plan.sha256_hex(),
            rules = plan.rules().len(),
            "plan replaced"
        );
        self.plan = plan;
    }

    fn reorder_slot(
        &mut self,
        timeline: TimelineId,
        wanted: Option<Reorder>,
    ) -> Option<ReorderSlot> {
        let blocks = self.reorder.entry(timeline).or_default();
        if let Some(open) = &mut blocks.open {
            let slot = open.admit();
            if open.is_full() {
                blocks.open = None;
            }
            return slot;
        }
        let r = wanted?;
        let mut ranks: Vec<u32> = (0..r.window).collect();
        ranks.shuffle(&mut self.rng);
        let mut open = OpenBlock {
            block: blocks.next_block,
            ranks,
            next_position: 0,
            hold_ns: r.hold_ns,
        };
        blocks.next_block += 1;
        let slot = open.admit();
        if !open.is_full() {
            blocks.open = Some(open);
        }
        slot
    }
}

impl Decide for PlanDecider {
    fn decide(&mut self, fence: &FenceInfo) -> Decision {
        let plan = &self.plan;
        let rng = &mut self.rng;
        let mut effective = Effective::default();
        effective.apply(plan.default_actions());
        let mut matched: Vec<&str> = Vec::new();
        for rule in plan.rules() {
            let m = &rule.matcher;
            if !m.matches_fixed(fence) {
                continue;
            }
            if let Some(p) = m.probability
                && rng.random::<f64>() >= p
            {
                continue;
            }
            matched.push(&rule.name);
            effective.apply(&rule.actions);
        }
        let latency_ns = effective.latency.map_or(0, |l| l.sample(rng));
        let jitter_ns = effective
            .jitter_ns
            .map_or(0, |j| rng.random_range(0..j.max(1)));
        let rule = (!matched.is_empty()).then(|| matched.join(","));
        let Effective {
            reorder,
            hang,
            error,
            irq,
            ..
        } = effective;
        let reorder = self.reorder_slot(fence.timeline, reorder);
        Decision {
            rule,
            latency_ns,
            jitter_ns,
            hang,
            error,
            reorder,
            irq,
        }
    }

    fn seed(&self) -> u64 {
        self.seed
    }

    fn deadline_boost(&self) -> Option<Duration> {
        self.plan.deadline_boost()
    }

    fn irq_rescue(&self) -> Option<Duration> {
        self.plan.irq_rescue()
    }

    fn load_plan(&mut self, source: &str, origin: &str) -> Result<(), String> {
        let plan = Plan::parse(source, origin).map_err(|e| e.to_string())?;
        self.replace_plan(plan);
        Ok(())
    }

    fn patch_plan(&mut self, patch: &serde_json::Value) -> Result<(), String> {
        let mut merged = self.plan.to_json();
        merge_patch(&mut merged, patch);
        let base = self.plan.origin();
        let origin = if base.ends_with(" (patched)") {
            base.to_string()
        } else {
            format!("{base} (patched)")
        };
        let plan = Plan::from_json(&merged, &origin).map_err(|e| e.to_string())?;
        self.replace_plan(plan);
        Ok(())
    }

    fn plan_json(&self) -> serde_json::Value {
        self.plan.to_json()
    }

    fn plan_sha256(&self) -> String {
        self.plan.sha256_hex().to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::protocol::RESP_ERR_UNSPEC;
    use crate::testing::fence_on;

    fn plan(source: &str) -> Plan {
        Plan::parse(source, "test.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    /// `n` fences on one timeline, fence ids from 1.
    fn fences(n: u64) -> Vec<FenceInfo> {
        (0..n).map(|i| fence_on(1, i + 1, i)).collect()
    }

    fn decide_all(d: &mut PlanDecider, fences: &[FenceInfo]) -> Vec<Decision> {
        fences.iter().map(|f| d.decide(f)).collect()
    }

    const RICH: &str = r#"
[default]
latency = { dist = "lognormal", median = "1ms", sigma = 0.5 }

[[rule]]
name = "jitter"
match = { probability = 0.5 }
cross_reorder = { jitter = "2ms" }

[[rule]]
name = "shuffle"
match = { every = 7 }
reorder = { window = 3, hold = "1ms" }

[[rule]]
name = "drop"
match = { probability = 0.1 }
irq = "drop"
"#;

    #[test]
    fn default_only_fences_name_no_rule() {
        let mut d = PlanDecider::new(plan("[default]\nlatency = \"100us\""), 1);
        let got = d.decide(&fence_on(1, 1, 0));
        assert_eq!(
            got,
            Decision {
                latency_ns: 100_000,
                ..Decision::default()
            }
        );
        let mut none = PlanDecider::new(plan(""), 1);
        assert_eq!(none.decide(&fence_on(1, 1, 0)), Decision::default());
    }

    #[test]
    fn later_rules_override_earlier_and_all_matches_are_named() {
        let mut d = PlanDecider::new(
            plan(
                r#"
[default]
latency = "1us"
irq = "spurious"
[[rule]]
name = "ctx 1"
match = { ctx = 1 }
latency = "2us"
hang = "forever"
[[rule]]
name = "first fences"
match = { fence = { to = 5 } }
latency = "3us"
hang = "none"
error = "ERR_UNSPEC"
"#,
            ),
            1,
        );
        let both = d.decide(&fence_on(1, 5, 0));
        assert_eq!(both.rule.as_deref(), Some("ctx 1,first fences"));
        assert_eq!(both.latency_ns, 3_000);
        assert_eq!(both.hang, None);
        assert_eq!(both.error, Some(RESP_ERR_UNSPEC));
        assert_eq!(both.irq, IrqFault::Spurious { count: 1 });

        let first = d.decide(&fence_on(1, 6, 1));
        assert_eq!(first.rule.as_deref(), Some("ctx 1"));
        assert_eq!(first.latency_ns, 2_000);
        assert_eq!(first.hang, Some(Hang::Forever));
        assert_eq!(first.error, None);

        let second = d.decide(&fence_on(2, 1, 0));
        assert_eq!(second.rule.as_deref(), Some("first fences"));
        assert_eq!(second.latency_ns, 3_000);
    }

    #[test]
    fn every_hundredth_fence_errors() {
        let mut d = PlanDecider::new(
            Plan::load(concat!(env!("CARGO_MANIFEST_DIR"), "/plans/error.toml")).unwrap(),
            6,
        );
        let errored: Vec<u64> = fences(1000)
            .iter()
            .filter(|f| d.decide(f).error.is_some())
            .map(|f| f.index)
            .collect();
        assert_eq!(errored, (1..=10).map(|k| k * 100 - 1).collect::<Vec<_>>());
    }

    #[test]
    fn probability_matches_about_that_share() {
        for p in [0.05, 0.25, 0.9] {
            let mut d = PlanDecider::new(
                plan(&format!(
                    "[[rule]]\nname = \"p\"\nmatch = {{ probability = {p} }}\nirq = \"drop\""
                )),
                42,
            );
            let n = 20_000;
            let hits = decide_all(&mut d, &fences(n))
                .iter()
                .filter(|x| x.irq == IrqFault::Drop)
                .count();
            let share = hits as f64 / n as f64;
            assert!((share - p).abs() < 0.02, "p {p}: share {share}");
        }
        let mut never = PlanDecider::new(
            plan("[[rule]]\nname = \"p\"\nmatch = { probability = 0.0 }\nirq = \"drop\""),
            1,
        );
        assert!(
            decide_all(&mut never, &fences(1000))
                .iter()
                .all(|x| x.rule.is_none())
        );
        let mut always = PlanDecider::new(
            plan("[[rule]]\nname = \"p\"\nmatch = { probability = 1.0 }\nirq = \"drop\""),
            1,
        );
        assert!(
            decide_all(&mut always, &fences(1000))
                .iter()
                .all(|x| x.rule.is_some())
        );
    }

    #[test]
    fn jitter_is_uniform_below_its_bound() {
        let mut d = PlanDecider::new(plan("[default]\ncross_reorder = { jitter = \"1ms\" }"), 3);
        let jitters: Vec<u64> = decide_all(&mut d, &fences(10_000))
            .iter()
            .map(|x| x.jitter_ns)
            .collect();
        assert!(jitters.iter().all(|&j| j < 1_000_000));
        let mean = jitters.iter().sum::<u64>() as f64 / jitters.len() as f64;
        assert!((mean - 500_000.0).abs() < 20_000.0, "mean {mean}");
    }

    /// Groups a timeline's slots by block and checks each block's shape.
    fn check_blocks(
        decisions: &[Decision],
        window: u32,
    ) -> BTreeMap<u64, Vec<(usize, ReorderSlot)>> {
        let mut blocks: BTreeMap<u64, Vec<(usize, ReorderSlot)>> = BTreeMap::new();
        for (i, d) in decisions.iter().enumerate() {
            if let Some(slot) = d.reorder {
                blocks.entry(slot.block).or_default().push((i, slot));
            }
        }
        for (block, members) in &blocks {
            assert_eq!(members.len(), window as usize, "block {block}");
            let start = members[0].0;
            let mut ranks: Vec<u32> = Vec::new();
            for (k, (arrival, slot)) in members.iter().enumerate() {
                assert_eq!(*arrival, start + k, "block {block}: consecutive arrivals");
                assert_eq!(slot.position as usize, k);
                assert_eq!(slot.size, window);
                let completes_at = start + slot.rank as usize;
                assert!(completes_at.abs_diff(*arrival) < window as usize);
                ranks.push(slot.rank);
            }
            ranks.sort_unstable();
            assert_eq!(
                ranks,
                (0..window).collect::<Vec<_>>(),
                "block {block}: a permutation"
            );
        }
        blocks
    }

    #[test]
    fn reorder_blocks_are_permutations_of_consecutive_arrivals() {
        let mut d = PlanDecider::new(
            plan("[default]\nreorder = { window = 4, hold = \"2ms\" }"),
            9,
        );
        let decisions = decide_all(&mut d, &fences(400));
        assert!(
            decisions
                .iter()
                .all(|x| x.reorder.is_some_and(|s| s.hold_ns == 2_000_000))
        );
        let blocks = check_blocks(&decisions, 4);
        assert_eq!(blocks.len(), 100);
        assert_eq!(
            blocks.keys().copied().collect::<Vec<_>>(),
            (0..100).collect::<Vec<_>>()
        );
        let distinct: std::collections::HashSet<Vec<u32>> = blocks
            .values()
            .map(|m| m.iter().map(|(_, s)| s.rank).collect())
            .collect();
        assert!(
            distinct.len() > 10,
            "only {} permutations drawn",
            distinct.len()
        );
    }

    #[test]
    fn a_block_takes_the_next_arrivals_matched_or_not() {
        let mut d = PlanDecider::new(
            plan("[[rule]]\nname = \"s\"\nmatch = { every = 10 }\nreorder = { window = 3 }"),
            4,
        );
        // 102 fences: the block opened by fence 99 fills up.
        let decisions = decide_all(&mut d, &fences(102));
        let blocks = check_blocks(&decisions, 3);
        assert_eq!(blocks.len(), 10);
        for (block, members) in blocks {
            assert_eq!(members[0].0 as u64, block * 10 + 9);
        }
        // Fences 9, 10, 11 are a block; only 9 matched the rule.
        assert_eq!(decisions[9].rule.as_deref(), Some("s"));
        assert_eq!(decisions[10].rule, None);
        assert!(decisions[10].reorder.is_some() && decisions[12].reorder.is_none());
    }

    #[test]
    fn timelines_have_their_own_blocks() {
        let mut d = PlanDecider::new(plan("[default]\nreorder = { window = 2 }"), 5);
        let mut per_timeline: BTreeMap<u32, Vec<Decision>> = BTreeMap::new();
        // Interleave two timelines: a, b, a, b, …
        for i in 0..200u64 {
            let ctx = 1 + (i % 2) as u32;
            let decision = d.decide(&fence_on(ctx, i + 1, i / 2));
            per_timeline.entry(ctx).or_default().push(decision);
        }
        for decisions in per_timeline.values() {
            assert_eq!(check_blocks(decisions, 2).len(), 50);
        }
    }

    #[test]
    fn same_seed_same_decisions_other_seed_others() {
        let run = |seed| decide_all(&mut PlanDecider::new(plan(RICH), seed), &fences(2000));
        let a = run(11);
        assert_eq!(a, run(11));
        assert_ne!(a, run(12));
        // The rich plan exercised everything it has.
        assert!(a.iter().any(|x| x.jitter_ns > 0));
        assert!(a.iter().any(|x| x.reorder.is_some()));
        assert!(a.iter().any(|x| x.irq == IrqFault::Drop));
        let latencies: std::collections::HashSet<u64> = a.iter().map(|x| x.latency_ns).collect();
        assert!(latencies.len() > 1000);
    }

    #[test]
    fn a_plan_without_seed_gets_the_cli_seed_or_a_random_one() {
        let seeded = plan("seed = 7");
        assert_eq!(choose_seed(Some(3), &seeded), 3);
        assert_eq!(choose_seed(None, &seeded), 7);
        let unseeded = plan("");
        let draws: std::collections::HashSet<u64> =
            (0..4).map(|_| choose_seed(None, &unseeded)).collect();
        assert!(draws.len() > 1, "random seeds repeat: {draws:?}");
        for seed in draws {
            let pasted = plan(&format!("seed = {seed}"));
            assert_eq!(pasted.seed(), Some(seed));
        }
    }

    #[test]
    fn loading_a_plan_replaces_it_and_the_rng_carries_on() {
        let all = fences(300);
        let mut straight = PlanDecider::new(plan(RICH), 21);
        let want = decide_all(&mut straight, &all);

        let mut reloaded = PlanDecider::new(plan(RICH), 21);
        let mut got = decide_all(&mut reloaded, &all[..100]);
        reloaded.load_plan(RICH, "again.toml").unwrap();
        assert_eq!(reloaded.plan().origin(), "again.toml");
        got.extend(decide_all(&mut reloaded, &all[100..]));
        assert_eq!(got, want);

        // A top-level key after a table header belongs to the table.
        let misplaced = reloaded
            .load_plan(
                "[default]\nlatency = \"5us\"\nirq_rescue = \"never\"",
                "simple.toml",
            )
            .unwrap_err();
        assert!(
            misplaced.starts_with("simple.toml:3:1: default.irq_rescue: unknown field"),
            "{misplaced}"
        );
        assert_eq!(reloaded.plan().origin(), "again.toml");
        reloaded
            .load_plan(
                "irq_rescue = \"never\"\n[default]\nlatency = \"5us\"",
                "simple.toml",
            )
            .unwrap();
        assert_eq!(reloaded.irq_rescue(), None);
        let next = reloaded.decide(&fence_on(9, 1, 0));
        assert_eq!(next.latency_ns, 5_000);
    }

    #[test]
    fn a_refused_plan_changes_nothing() {
        let mut d = PlanDecider::new(plan(RICH), 1);
        let before = d.plan_json();
        let err = d
            .load_plan("[[rule]]\nname = \"x\"\nmatch = { every = 0 }", "bad.toml")
            .unwrap_err();
        assert_eq!(
            err,
            "bad.toml:3:19: rule \"x\": match.every: must be at least 1"
        );
        let err = d
            .patch_plan(&json!({"rule": [{"name": "x", "reorder": {"window": 1}}]}))
            .unwrap_err();
        assert_eq!(
            err,
            "test.toml (patched): rule \"x\": reorder.window: 1 is not in [2, 1024]"
        );
        assert_eq!(d.plan_json(), before);
        assert_eq!(d.plan().origin(), "test.toml");
    }

    #[test]
    fn patches_merge_onto_the_plan() {
        let mut d = PlanDecider::new(plan(RICH), 1);
        d.patch_plan(&json!({"default": {"latency": "7us"}, "deadline_boost": "1ms"}))
            .unwrap();
        assert_eq!(d.deadline_boost(), Some(Duration::from_millis(1)));
        assert_eq!(d.plan().origin(), "test.toml (patched)");
        assert_eq!(d.plan_json()["default"]["latency"], json!("7us"));
        assert_eq!(d.plan().rules().len(), 3);
        d.patch_plan(&json!({"rule": null})).unwrap();
        assert_eq!(d.plan().origin(), "test.toml (patched)");
        assert!(d.plan().rules().is_empty());
        let x = d.decide(&fence_on(1, 1, 0));
        assert_eq!((x.latency_ns, x.rule), (7_000, None));
    }
}
