//! Tests of plan parsing, validation and the JSON form.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use super::*;
use crate::fault::{Hang, IrqFault, TimelineId};

fn plans_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("plans")
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

fn error_of(source: &str) -> String {
    Plan::parse(source, "t.toml").unwrap_err().to_string()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn every_example_plan_parses_and_round_trips_through_json() {
    let files = toml_files(&plans_dir());
    assert!(files.len() >= 11, "examples missing: {files:?}");
    for file in files {
        let plan = Plan::load(&file).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            plan.seed().is_some(),
            "{}: examples pin a seed",
            file.display()
        );
        let again = Plan::from_json(&plan.to_json(), "json").unwrap();
        assert_eq!(again.body, plan.body, "{}", file.display());
        assert_eq!(again.to_json(), plan.to_json());
    }
}

#[test]
fn example_plans_say_what_their_names_say() {
    let load = |name: &str| Plan::load(plans_dir().join(name)).unwrap();
    let only_rule = |plan: &Plan| {
        assert_eq!(plan.rules().len(), 1, "{}", plan.origin());
        plan.rules()[0].clone()
    };

    let fixed = load("latency-fixed.toml");
    assert_eq!(
        fixed.default_actions().latency,
        Some(Latency::fixed(100_000))
    );
    assert!(fixed.rules().is_empty());

    let reorder = only_rule(&load("reorder.toml"));
    assert_eq!(
        reorder.actions.reorder,
        Some(Reorder {
            window: 4,
            hold_ns: 2_000_000
        })
    );
    assert_eq!(reorder.matcher.command, Some(vec!["SUBMIT_3D".to_string()]));

    let hang = only_rule(&load("hang.toml"));
    assert_eq!(hang.actions.hang, Some(Some(Hang::For { ns: 300_000_000 })));

    let error = only_rule(&load("error.toml"));
    assert_eq!(error.matcher.every, Some(100));
    assert_eq!(
        error.actions.error,
        Some(Some(crate::protocol::RESP_ERR_UNSPEC))
    );

    let drop = only_rule(&load("irq-drop.toml"));
    assert_eq!(drop.matcher.probability, Some(0.05));
    assert_eq!(drop.actions.irq, Some(IrqFault::Drop));

    let boost = load("deadline-boost.toml");
    assert_eq!(boost.deadline_boost(), Some(Duration::from_micros(100)));
}

/// Each file in `plans/broken/` starts with `# expect: ` and the message
/// after the origin (`plans/broken/NAME.toml`).
#[test]
fn broken_plans_are_refused_with_file_line_and_field() {
    let files = toml_files(&plans_dir().join("broken"));
    assert!(files.len() >= 20, "broken examples missing: {files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: no `# expect: ` line", file.display()));
        let name = file.file_name().unwrap().to_string_lossy();
        let origin = format!("plans/broken/{name}");
        let err = Plan::parse(&text, &origin).expect_err(&origin);
        assert_eq!(err.to_string(), format!("{origin}{expect}"));
        let invalid = err.invalid().unwrap();
        assert!(invalid.position.is_some(), "{origin}: no position");
    }
}

#[test]
fn the_agreed_example_parses() {
    let plan = Plan::parse(
        r#"
seed = 42
irq_rescue = "50ms"
deadline_boost = "100us"

[default]
latency = "100us"

[[rule]]
name = "slow tail"
latency = { dist = "lognormal", median = "1ms", sigma = 0.5 }
reorder = { window = 4, hold = "2ms" }
cross_reorder = { jitter = "2ms" }
hang = "until_released"
error = "ERR_UNSPEC"
irq = { storm = 10 }
[rule.match]
ctx = [1, 2]
timeline = ["1.0"]
fence = { from = 100, to = 200 }
index = { from = 0, to = 999 }
every = 10
probability = 0.25
command = "SUBMIT_3D"
"#,
        "agreed.toml",
    )
    .unwrap();
    assert_eq!(plan.seed(), Some(42));
    assert_eq!(plan.irq_rescue(), Some(ms(50)));
    assert_eq!(plan.deadline_boost(), Some(Duration::from_micros(100)));
    assert_eq!(plan.origin(), "agreed.toml");
    let rule = &plan.rules()[0];
    assert_eq!(rule.name, "slow tail");
    let m = &rule.matcher;
    assert_eq!(m.ctx, Some(vec![1, 2]));
    assert_eq!(m.timeline, Some(vec![TimelineId { ctx: 1, ring: 0 }]));
    assert_eq!(m.fence, Some(100..=200));
    assert_eq!(m.index, Some(0..=999));
    assert_eq!(m.every, Some(10));
    assert_eq!(m.probability, Some(0.25));
    let a = &rule.actions;
    assert!(matches!(
        a.latency,
        Some(Latency {
            dist: Dist::LogNormal(_),
            max_ns: None
        })
    ));
    assert_eq!(a.jitter_ns, Some(2_000_000));
    assert_eq!(a.hang, Some(Some(Hang::UntilReleased)));
    assert_eq!(a.irq, Some(IrqFault::Spurious { count: 10 }));
}

#[test]
fn value_forms() {
    let rule = |body: &str| {
        let plan = Plan::parse(&format!("[[rule]]\nname = \"r\"\n{body}\n"), "t.toml")
            .unwrap_or_else(|e| panic!("{e}"));
        plan.rules()[0].clone()
    };
    assert_eq!(rule("match = { ctx = 3 }").matcher.ctx, Some(vec![3]));
    assert_eq!(
        rule("match = { timeline = \"2.1\" }").matcher.timeline,
        Some(vec![TimelineId { ctx: 2, ring: 1 }])
    );
    assert_eq!(
        rule("match = { fence = { from = 5 } }").matcher.fence,
        Some(5..=u64::MAX)
    );
    assert_eq!(
        rule("match = { index = { to = 5 } }").matcher.index,
        Some(0..=5)
    );
    assert_eq!(
        rule("match = { command = [\"SUBMIT_3D\", \"RESOURCE_FLUSH\"] }")
            .matcher
            .command
            .map(|c| c.len()),
        Some(2)
    );
    assert_eq!(
        rule("hang = \"forever\"").actions.hang,
        Some(Some(Hang::Forever))
    );
    assert_eq!(rule("hang = \"none\"").actions.hang, Some(None));
    assert_eq!(rule("error = \"none\"").actions.error, Some(None));
    assert_eq!(rule("error = 0x1203").actions.error, Some(Some(0x1203)));
    assert_eq!(
        rule("error = \"virtio_gpu_resp_err_out_of_memory\"")
            .actions
            .error,
        Some(Some(crate::protocol::RESP_ERR_OUT_OF_MEMORY))
    );
    assert_eq!(rule("irq = \"normal\"").actions.irq, Some(IrqFault::Normal));
    assert_eq!(
        rule("irq = \"spurious\"").actions.irq,
        Some(IrqFault::Spurious { count: 1 })
    );
    assert_eq!(
        rule("irq = { coalesce = \"1ms\" }").actions.irq,
        Some(IrqFault::Coalesce {
            window_ns: 1_000_000
        })
    );
    assert_eq!(
        rule("irq = { delay = \"2ms\" }").actions.irq,
        Some(IrqFault::Delay {
            delay_ns: 2_000_000
        })
    );
    assert_eq!(
        rule("reorder = { window = 3 }").actions.reorder,
        Some(Reorder {
            window: 3,
            hold_ns: validate::DEFAULT_REORDER_HOLD.as_nanos() as u64
        })
    );
    let latency = |spec: &str| rule(&format!("latency = {spec}")).actions.latency.unwrap();
    assert_eq!(
        latency("{ dist = \"fixed\", value = \"3ms\" }"),
        Latency::fixed(3_000_000)
    );
    assert_eq!(
        latency("{ dist = \"uniform\", min = \"1us\", max = \"2us\" }").dist,
        Dist::Uniform {
            min: 1000,
            max: 2000
        }
    );
    let exp = latency("{ dist = \"exponential\", mean = \"1ms\", max = \"5ms\" }");
    assert!(matches!(exp.dist, Dist::Exponential(_)));
    assert_eq!(exp.max_ns, Some(5_000_000));
    assert!(matches!(
        latency("{ dist = \"normal\", mean = \"1ms\", stddev = \"0s\" }").dist,
        Dist::Normal(_)
    ));
}

#[test]
fn top_level_defaults() {
    let empty = Plan::parse("", "empty.toml").unwrap();
    assert_eq!(empty.seed(), None);
    assert_eq!(empty.irq_rescue(), Some(ms(50)));
    assert_eq!(empty.deadline_boost(), None);
    assert_eq!(empty.default_actions(), &Actions::default());
    // Known answer: SHA-256 of the empty string.
    assert_eq!(
        empty.sha256_hex(),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    let never = Plan::parse("irq_rescue = \"never\"", "t.toml").unwrap();
    assert_eq!(never.irq_rescue(), None);
    assert_eq!(
        error_of("irq_rescue = \"0s\""),
        "t.toml:1:14: irq_rescue: must be more than 0 (or \"never\")"
    );
}

#[test]
fn the_hash_is_of_the_text() {
    let a = Plan::parse("seed = 1\n", "a").unwrap();
    let b = Plan::parse("seed = 1 # same plan, other text\n", "b").unwrap();
    assert_eq!(a.body, b.body);
    assert_ne!(a.sha256_hex(), b.sha256_hex());
    assert_eq!(a.sha256_hex().len(), 64);
    assert_eq!(a.source(), "seed = 1\n");
}

#[test]
fn fixed_latency_is_the_plain_default() {
    let plan = Plan::fixed_latency(Duration::from_micros(2500));
    assert_eq!(plan.origin(), "--latency 2ms 500us");
    assert_eq!(
        plan.default_actions().latency,
        Some(Latency::fixed(2_500_000))
    );
    assert!(plan.rules().is_empty());
    assert_eq!(plan.seed(), None);
    assert_eq!(plan.irq_rescue(), Some(ms(50)));
    // Its text parses to the same plan.
    let parsed = Plan::parse(plan.source(), plan.origin()).unwrap();
    assert_eq!(parsed, plan);
    assert_eq!(plan.to_json(), json!({"default": {"latency": "2ms 500us"}}));
}

#[test]
fn load_names_the_file() {
    let missing = plans_dir().join("no-such-plan.toml");
    let err = Plan::load(&missing).unwrap_err();
    assert!(matches!(err, PlanError::Read { .. }));
    let msg = err.to_string();
    assert!(msg.starts_with(&missing.display().to_string()), "{msg}");
    assert!(msg.contains("cannot read the plan"), "{msg}");

    let bad = plans_dir().join("broken/probability.toml");
    let msg = Plan::load(&bad).unwrap_err().to_string();
    assert!(
        msg.starts_with(&format!("{}:15:15: rule \"slow tail\"", bad.display())),
        "{msg}"
    );
}

#[test]
fn errors_inside_rules_name_the_rule() {
    let two = "[[rule]]\nname = \"a\"\n[[rule]]\nname = \"b\"\n";
    assert_eq!(
        error_of(&format!(
            "{two}latency = {{ dist = \"normal\", mean = \"1ms\" }}\n"
        )),
        "t.toml:5:11: rule \"b\": latency.stddev: dist \"normal\" needs stddev"
    );
    assert_eq!(
        error_of(&format!("{two}[rule.match]\nctx = []\n")),
        "t.toml:6:7: rule \"b\": match.ctx: must not be an empty list (leave the key out to match any)"
    );
    assert_eq!(
        error_of(&format!("{two}[rule.match]\nfence = {{}}\n")),
        "t.toml:6:9: rule \"b\": match.fence: give from, to or both"
    );
    assert_eq!(
        error_of(&format!("{two}cross_reorder = {{ jitter = \"0s\" }}\n")),
        "t.toml:5:28: rule \"b\": cross_reorder.jitter: must be more than 0"
    );
    assert_eq!(
        error_of(&format!("{two}hang = {{ for = \"1 fortnight\" }}\n")),
        "t.toml:5:16: rule \"b\": hang.for: invalid duration \"1 fortnight\": unknown time unit \"fortnight\", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations) (write e.g. \"250us\", \"2ms\", \"1s\")"
    );
    assert_eq!(
        error_of("[[rule]]\nname = \"  \"\n"),
        "t.toml:2:8: rule \"  \": name: must not be empty"
    );
    assert_eq!(
        error_of("[[rule]]\nname = \"a\"\nmatch = { probability = nan }\n"),
        "t.toml:3:25: rule \"a\": match.probability: NaN is not in [0, 1]"
    );
    assert_eq!(
        error_of("[[rule]]\nname = \"a\"\nreorder = { window = 5000 }\n"),
        "t.toml:3:22: rule \"a\": reorder.window: 5000 is not in [2, 1024]"
    );
    assert_eq!(
        error_of("[[rule]]\nname = \"a\"\nirq = { sneeze = 1 }\n"),
        "t.toml:3:9: rule \"a\": irq.sneeze: unknown field `sneeze`, expected one of `storm`, `coalesce`, `delay`"
    );
    assert_eq!(
        error_of("[default]\nlatency = { dist = \"exponential\", mean = \"0s\" }\n"),
        "t.toml:2:42: default.latency.mean: must be more than 0"
    );
    assert_eq!(
        error_of("[default]\nlatency = \"600 years\"\n"),
        "t.toml:2:11: default.latency: duration is too long (at most 584 years)"
    );
    assert_eq!(
        error_of("rule = 3\n"),
        "t.toml:1:8: rule: invalid type: integer `3`, expected a sequence"
    );
}

#[test]
fn json_round_trip_and_errors_without_positions() {
    let plan = Plan::load(plans_dir().join("irq-spurious.toml")).unwrap();
    let json = plan.to_json();
    assert_eq!(json["rule"][1]["irq"], json!({"storm": 20}));
    assert_eq!(json["rule"][0]["match"]["probability"], json!(0.1));
    assert_eq!(json["default"]["latency"], json!("100us"));

    let mut bad = json.clone();
    bad["rule"][1]["match"]["probability"] = json!(2);
    let err = Plan::from_json(&bad, "patch").unwrap_err();
    assert_eq!(
        err.to_string(),
        "patch: rule \"storm\": match.probability: 2 is not in [0, 1]"
    );
    assert_eq!(err.invalid().unwrap().position, None);

    let mut bad = json.clone();
    bad["rule"][0]["irq"] = json!(7);
    assert_eq!(
        Plan::from_json(&bad, "patch").unwrap_err().to_string(),
        "patch: rule \"spurious\": irq: invalid type: integer `7`, expected a string or a table"
    );

    let mut bad = json.clone();
    bad["rule"][0]["match"]["ctx"] = json!([1, null]);
    assert_eq!(
        Plan::from_json(&bad, "patch").unwrap_err().to_string(),
        "patch: rule[0].match.ctx[1]: null is not a value (in a merge patch, null removes a key)"
    );
    assert_eq!(
        Plan::from_json(&json!([1]), "patch")
            .unwrap_err()
            .to_string(),
        "patch: a plan must be a JSON object"
    );
    assert_eq!(
        Plan::from_json(&json!({"seeed": 1}), "patch")
            .unwrap_err()
            .to_string(),
        "patch: seeed: unknown field `seeed`, expected one of `seed`, `irq_rescue`, `deadline_boost`, `default`, `rule`"
    );
}

#[test]
fn merge_patch_then_revalidate() {
    let plan = Plan::load(plans_dir().join("irq-drop.toml")).unwrap();
    let mut merged = plan.to_json();
    merge::merge_patch(
        &mut merged,
        &json!({"irq_rescue": null, "default": {"latency": "2ms"}, "deadline_boost": "1ms"}),
    );
    let patched = Plan::from_json(&merged, "patched").unwrap();
    assert_eq!(
        patched.irq_rescue(),
        Some(ms(50)),
        "null restores the default"
    );
    assert_eq!(patched.deadline_boost(), Some(ms(1)));
    assert_eq!(
        patched.default_actions().latency,
        Some(Latency::fixed(2_000_000))
    );
    assert_eq!(patched.rules(), plan.rules());
    assert_eq!(patched.seed(), plan.seed());
}
