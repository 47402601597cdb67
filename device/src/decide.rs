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
/// random one (which the device prints, so the run can be repeated).
pub fn choose_seed(cli: Option<u64>, plan: &Plan) -> u64 {
    cli.or(plan.seed()).unwrap_or_else(rand::random)
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
}

#[cfg(test)]
mod tests {
    use super::*;
}
