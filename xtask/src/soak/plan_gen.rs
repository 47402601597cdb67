//! Plans derived from a soak iteration's seed: the scenario's own plan with
//! extra faults added — interrupt faults, timelines moved against each
//! other, in-ring reordering, random job times — each only where the
//! scenario's plan does not already decide that action, so the scenario's
//! point (a hang, slow jobs for deadlines) and its expectations survive.

use anyhow::{Context, Result};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use toml::{Table, Value};

/// A generated plan: its TOML and a one-line description of what was added.
pub struct Derived {
    pub toml: String,
    pub added: Vec<String>,
}

/// Derives a plan from `base` (a plan file's text, or `None` for "every
/// fence completes at once") and `seed`. The device's own parser checks the
/// result, so a generated plan is never refused at boot.
pub fn derive(base: Option<&str>, seed: u64) -> Result<Derived> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut plan: Table = match base {
        Some(text) => toml::from_str(text).context("reading the scenario's plan")?,
        None => Table::new(),
    };
    plan.insert("seed".into(), Value::Integer((seed >> 1) as i64));
    let decided = |action: &str, plan: &Table| -> bool {
        plan.get("rule")
            .and_then(Value::as_array)
            .is_some_and(|rules| rules.iter().any(|r| r.get(action).is_some()))
            || plan.get("default").and_then(|d| d.get(action)).is_some()
    };
    let mut added = Vec::new();
    let mut rules: Vec<Value> = Vec::new();
    let us = |n: u64| Value::String(format!("{n}us"));
    // A rule for the workload's fences (`SUBMIT_3D`), more match keys in `extra`.
    let mut push = |name: &str, extra: Vec<(&str, Value)>, action: &str, value: Value| {
        let mut matching = table(vec![("command", "SUBMIT_3D".into())]);
        matching.extend(table(extra));
        rules.push(Value::Table(table(vec![
            ("name", name.into()),
            ("match", Value::Table(matching)),
            (action, value),
        ])));
    };
    let tab = |pairs: Vec<(&str, Value)>| Value::Table(table(pairs));

    if !decided("latency", &plan) && rng.random_bool(0.5) {
        let mean = rng.random_range(20..=1500u64);
        let dist = tab(vec![
            ("dist", "exponential".into()),
            ("mean", us(mean)),
            ("max", us(mean * 10)),
        ]);
        push("soak: job times", vec![], "latency", dist);
        added.push(format!("exponential job times, mean {mean} µs"));
    }
    if !decided("cross_reorder", &plan) && rng.random_bool(0.4) {
        let jitter = rng.random_range(100..=2000u64);
        push(
            "soak: timelines jitter",
            vec![],
            "cross_reorder",
            tab(vec![("jitter", us(jitter))]),
        );
        added.push(format!("cross-timeline jitter {jitter} µs"));
    }
    if !decided("reorder", &plan) && rng.random_bool(0.3) {
        let window = rng.random_range(2..=8i64);
        let reorder = tab(vec![
            ("window", Value::Integer(window)),
            ("hold", "2ms".into()),
        ]);
        push("soak: reorder", vec![], "reorder", reorder);
        added.push(format!("in-ring reorder window {window}"));
    }
    if !decided("irq", &plan) && rng.random_bool(0.6) {
        let probability = f64::from(rng.random_range(1..=10u32)) / 100.0;
        let (what, irq) = match rng.random_range(0..4u32) {
            0 => ("drop", "drop".into()),
            1 => ("spurious", "spurious".into()),
            2 => (
                "coalesce",
                tab(vec![("coalesce", us(rng.random_range(100..=1000u64)))]),
            ),
            _ => (
                "delay",
                tab(vec![("delay", us(rng.random_range(100..=2000u64)))]),
            ),
        };
        push(
            "soak: interrupts",
            vec![("probability", Value::Float(probability))],
            "irq",
            irq,
        );
        added.push(format!(
            "irq {what} on {:.0}% of fences",
            probability * 100.0
        ));
    }
    if !rules.is_empty() {
        let all = plan
            .entry("rule")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(existing) = all {
            existing.extend(rules);
        }
    }
    if added.is_empty() {
        added.push("the scenario's plan as it is".into());
    }
    let toml = toml::to_string(&plan).context("writing the derived plan")?;
    fencelab_device::plan::Plan::parse(&toml, "derived plan")
        .map_err(|e| anyhow::anyhow!("the derived plan is invalid (a soak bug): {e}\n{toml}"))?;
    Ok(Derived { toml, added })
}

/// A TOML table of `pairs`, in order.
fn table(pairs: Vec<(&str, Value)>) -> Table {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HANG: &str = r#"
[default]
latency = "50us"

[[rule]]
name = "hang one"
match = { command = "SUBMIT_3D", index = { from = 100, to = 100 } }
hang = "forever"
"#;

    #[test]
    fn the_same_seed_gives_the_same_plan_and_seeds_differ() {
        let a = derive(Some(HANG), 7).unwrap();
        assert_eq!(a.toml, derive(Some(HANG), 7).unwrap().toml);
        let distinct: std::collections::BTreeSet<String> = (0..20)
            .map(|s| derive(Some(HANG), s).unwrap().toml)
            .collect();
        assert!(
            distinct.len() > 10,
            "{} distinct plans of 20",
            distinct.len()
        );
    }

    #[test]
    fn the_scenarios_own_rules_survive_and_decided_actions_are_not_added() {
        for seed in 0..50 {
            let derived = derive(Some(HANG), seed).unwrap();
            let plan: Table = toml::from_str(&derived.toml).unwrap();
            let rules = plan["rule"].as_array().unwrap();
            assert_eq!(rules[0]["name"].as_str(), Some("hang one"));
            assert_eq!(rules[0]["hang"].as_str(), Some("forever"));
            // The default decides latency, so no job-time rule is added.
            assert!(
                rules.iter().all(|r| r.get("latency").is_none()),
                "{}",
                derived.toml
            );
        }
    }

    #[test]
    fn every_derived_plan_is_valid_and_faults_appear() {
        let mut kinds = std::collections::BTreeSet::new();
        for seed in 0..200 {
            let derived = derive(None, seed).unwrap();
            for a in &derived.added {
                kinds.insert(a.split_whitespace().next().unwrap().to_owned());
            }
        }
        for kind in ["exponential", "cross-timeline", "in-ring", "irq"] {
            assert!(kinds.contains(kind), "{kind} never derived: {kinds:?}");
        }
    }
}
