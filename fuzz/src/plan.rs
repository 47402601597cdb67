//! The `plan` target: arbitrary text as a fault plan.
//!
//! Properties:
//! - a plan that parses survives its JSON form: `to_json` → `from_json`
//!   gives a plan with the same JSON and the same effect (seed, rescue,
//!   boost, default actions, rules), and the TOML that JSON plan was built
//!   from parses again to the same SHA-256;
//! - a plan that parses decides fences without panicking, the same way
//!   before and after the JSON round trip (a run replays from plan + seed),
//!   with every reorder slot inside its block;
//! - a refused plan says where: a line and column inside the text, and the
//!   origin's name.

use fencelab_device::decide::PlanDecider;
use fencelab_device::fault::{Decide, Decision, FenceInfo, TimelineId};
use fencelab_device::plan::Plan;

const ORIGIN: &str = "fuzz.toml";
/// Fences each valid plan decides: enough to fill and cross reorder blocks
/// of a few timelines and to reach `every`/fence-range rules.
const FENCES: u64 = 48;
/// The seed used when the plan has none.
const SEED: u64 = 1;

pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Plan::parse(text, ORIGIN) {
        Ok(plan) => check_round_trip(&plan),
        Err(e) => {
            let invalid = e.invalid().expect("parsing text never fails to read");
            assert_eq!(invalid.origin, ORIGIN);
            let (line, column) = invalid
                .position
                .unwrap_or_else(|| panic!("refused without a position: {e}"));
            let lines = text.split('\n').count();
            assert!(
                (1..=lines).contains(&line) && column >= 1,
                "position {line}:{column} outside the {lines}-line text: {e}"
            );
            assert!(!invalid.message.is_empty(), "empty message: {e}");
        }
    }
}

fn check_round_trip(plan: &Plan) {
    let json = plan.to_json();
    let again = Plan::from_json(&json, "json")
        .unwrap_or_else(|e| panic!("the JSON form of a valid plan is refused: {e}\n{json}"));
    assert_eq!(again.to_json(), json, "JSON form changed on the way back");
    assert_same_effect(plan, &again);
    let third = Plan::parse(again.source(), "again")
        .unwrap_or_else(|e| panic!("generated TOML refused: {e}\n{}", again.source()));
    assert_eq!(third.sha256_hex(), again.sha256_hex());
    assert_same_effect(plan, &third);
    assert_eq!(
        decisions(plan),
        decisions(&again),
        "decisions changed on the JSON round trip"
    );
}

/// The fence the decider sees `i`-th: three timelines, two commands.
fn fence(i: u64) -> FenceInfo {
    FenceInfo {
        timeline: TimelineId {
            ctx: (i % 3) as u32,
            ring: 0,
        },
        fence_id: i + 1,
        index: i / 3,
        command: if i % 5 == 4 {
            "RESOURCE_FLUSH"
        } else {
            "SUBMIT_3D"
        },
        work_ns: i * 1_000,
    }
}

/// What `plan` decides for [`FENCES`] fences.
fn decisions(plan: &Plan) -> Vec<Decision> {
    let mut decider = PlanDecider::new(plan.clone(), plan.seed().unwrap_or(SEED));
    (0..FENCES)
        .map(|i| {
            let d = decider.decide(&fence(i));
            if let Some(slot) = &d.reorder {
                assert!(
                    slot.rank < slot.size && slot.position < slot.size,
                    "reorder slot outside its block: {slot:?}"
                );
            }
            d
        })
        .collect()
}

fn assert_same_effect(a: &Plan, b: &Plan) {
    assert_eq!(a.seed(), b.seed(), "seed");
    assert_eq!(a.irq_rescue(), b.irq_rescue(), "irq_rescue");
    assert_eq!(a.deadline_boost(), b.deadline_boost(), "deadline_boost");
    assert_eq!(a.default_actions(), b.default_actions(), "default actions");
    assert_eq!(a.rules(), b.rules(), "rules");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeds;

    #[test]
    fn every_example_and_broken_plan_passes() {
        let plans = seeds::plans().expect("device/plans readable");
        assert!(plans.len() >= 30, "{} plans", plans.len());
        for (name, text) in plans {
            eprintln!("{name}");
            check(text.as_bytes());
        }
    }

    #[test]
    fn non_utf8_is_skipped() {
        check(&[0xff, 0xfe, b'[']);
    }
}
