//! From the file's [`RawPlan`] to the checked [`PlanBody`]: every semantic
//! rule of the plan format, each failure naming the field at fault.

use std::collections::HashMap;
use std::time::Duration;

use rand_distr::{Exp, LogNormal, Normal};

use crate::fault::{Hang, IrqFault, TimelineId};
use crate::protocol::type_name;

use super::latency::{Dist, Latency};
use super::locate::FieldPath;
use super::model::{Actions, Match, Reorder, Rule};
use super::raw::{
    NameOrNumber, OneOrMany, RawActions, RawIrq, RawLatency, RawMatch, RawPlan, RawRange,
    RawReorder, StrOr,
};

/// Reorder windows above this are refused: a block's permutation is held
/// in memory and a fence can wait for the whole block.
pub const MAX_REORDER_WINDOW: u64 = 1024;
/// Storms above this many extra interrupts per completion are refused.
pub const MAX_STORM: u64 = 10_000;
/// Hold of a reorder block when `hold` is not given.
pub const DEFAULT_REORDER_HOLD: Duration = Duration::from_millis(1);
/// `irq_rescue` when not given.
pub const DEFAULT_IRQ_RESCUE: Duration = Duration::from_millis(50);

/// The checked content of a plan.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanBody {
    pub seed: Option<u64>,
    pub irq_rescue: Option<Duration>,
    pub deadline_boost: Option<Duration>,
    pub default: Actions,
    pub rules: Vec<Rule>,
}

/// A semantic error: the field and what is wrong with it.
#[derive(Clone, Debug, PartialEq)]
pub struct Invalid {
    pub path: FieldPath,
    pub message: String,
}

type Checked<T> = Result<T, Invalid>;

fn invalid<T>(path: &FieldPath, message: impl Into<String>) -> Checked<T> {
    Err(Invalid {
        path: path.clone(),
        message: message.into(),
    })
}

pub fn validate(raw: &RawPlan) -> Checked<PlanBody> {
    let root = FieldPath::root();
    let irq_rescue = match raw.irq_rescue.as_deref() {
        None => Some(DEFAULT_IRQ_RESCUE),
        Some("never") => None,
        Some(s) => {
            let path = root.key("irq_rescue");
            let d = duration(&path, s)?;
            if d.is_zero() {
                return invalid(&path, "must be more than 0 (or \"never\")");
            }
            Some(d)
        }
    };
    let deadline_boost = raw
        .deadline_boost
        .as_deref()
        .map(|s| duration(&root.key("deadline_boost"), s))
        .transpose()?;
    let default = match &raw.default {
        Some(a) => actions(&root.key("default"), a)?,
        None => Actions::default(),
    };

    let mut rules = Vec::with_capacity(raw.rules.len());
    let mut first_use: HashMap<&str, usize> = HashMap::new();
    for (i, r) in raw.rules.iter().enumerate() {
        let path = root.key("rule").index(i);
        let name_path = path.key("name");
        if r.name.trim().is_empty() {
            return invalid(&name_path, "must not be empty");
        }
        if let Some(first) = first_use.insert(&r.name, i) {
            return invalid(
                &name_path,
                format!("duplicate rule name (rule #{} has it too)", first + 1),
            );
        }
        rules.push(Rule {
            name: r.name.clone(),
            matcher: match &r.matcher {
                Some(m) => matcher(&path.key("match"), m)?,
                None => Match::default(),
            },
            actions: actions(&path, &r.actions())?,
        });
    }

    Ok(PlanBody {
        seed: raw.seed,
        irq_rescue,
        deadline_boost,
        default,
        rules,
    })
}

fn matcher(path: &FieldPath, m: &RawMatch) -> Checked<Match> {
    let ctx = m
        .ctx
        .as_ref()
        .map(|c| non_empty(&path.key("ctx"), c.to_vec()))
        .transpose()?;
    let timeline = match &m.timeline {
        None => None,
        Some(t) => {
            let tpath = path.key("timeline");
            let list = non_empty(&tpath, t.to_vec())?;
            let many = matches!(t, OneOrMany::Many(_));
            let ids = list
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let p = if many { tpath.index(i) } else { tpath.clone() };
                    s.parse::<TimelineId>()
                        .or_else(|e| invalid(&p, e.to_string()))
                })
                .collect::<Checked<Vec<_>>>()?;
            Some(ids)
        }
    };
    let fence = m
        .fence
        .as_ref()
        .map(|r| range(&path.key("fence"), r))
        .transpose()?;
    let index = m
        .index
        .as_ref()
        .map(|r| range(&path.key("index"), r))
        .transpose()?;
    if let Some(0) = m.every {
        return invalid(&path.key("every"), "must be at least 1");
    }
    if let Some(p) = m.probability
        && !(0.0..=1.0).contains(&p)
    {
        return invalid(&path.key("probability"), format!("{p} is not in [0, 1]"));
    }
    let command = match &m.command {
        None => None,
        Some(c) => {
            let cpath = path.key("command");
            let names = non_empty(&cpath, c.to_vec())?;
            for name in &names {
                if !command_names().any(|known| known == name) {
                    let known: Vec<_> = command_names().collect();
                    return invalid(
                        &cpath,
                        format!(
                            "unknown command {name:?}; commands are {}",
                            known.join(", ")
                        ),
                    );
                }
            }
            Some(names)
        }
    };
    Ok(Match {
        ctx,
        timeline,
        fence,
        index,
        every: m.every,
        probability: m.probability,
        command,
    })
}

fn actions(path: &FieldPath, a: &RawActions) -> Checked<Actions> {
    Ok(Actions {
        latency: a
            .latency
            .as_ref()
            .map(|l| latency(&path.key("latency"), l))
            .transpose()?,
        reorder: a
            .reorder
            .as_ref()
            .map(|r| reorder(&path.key("reorder"), r))
            .transpose()?,
        jitter_ns: match &a.cross_reorder {
            None => None,
            Some(c) => {
                let p = path.key("cross_reorder").key("jitter");
                let ns = nanos(&p, duration(&p, &c.jitter)?)?;
                if ns == 0 {
                    return invalid(&p, "must be more than 0");
                }
                Some(ns)
            }
        },
        hang: a
            .hang
            .as_ref()
            .map(|h| hang(&path.key("hang"), h))
            .transpose()?,
        error: a
            .error
            .as_ref()
            .map(|e| error_code(&path.key("error"), e))
            .transpose()?,
        irq: a
            .irq
            .as_ref()
            .map(|i| irq(&path.key("irq"), i))
            .transpose()?,
    })
}

fn latency(path: &FieldPath, spec: &StrOr<RawLatency>) -> Checked<Latency> {
    let t = match spec {
        StrOr::Str(s) => return Ok(Latency::fixed(nanos(path, duration(path, s)?)?)),
        StrOr::Table(t) => t,
    };
    let (takes, required): (&[&str], &[&str]) = match t.dist.as_str() {
        "fixed" => (&["value", "max"], &["value"]),
        "uniform" => (&["min", "max"], &["min", "max"]),
        "exponential" => (&["mean", "max"], &["mean"]),
        "normal" => (&["mean", "stddev", "max"], &["mean", "stddev"]),
        "lognormal" => (&["median", "sigma", "max"], &["median", "sigma"]),
        other => {
            return invalid(
                &path.key("dist"),
                format!(
                    "unknown distribution {other:?}; use fixed, uniform, exponential, normal or lognormal"
                ),
            );
        }
    };
    let given = [
        ("value", t.value.is_some()),
        ("min", t.min.is_some()),
        ("max", t.max.is_some()),
        ("mean", t.mean.is_some()),
        ("stddev", t.stddev.is_some()),
        ("median", t.median.is_some()),
        ("sigma", t.sigma.is_some()),
    ];
    // Unexpected keys first: a misnamed parameter also leaves one missing.
    for (key, present) in given {
        if present && !takes.contains(&key) {
            return invalid(
                &path.key(key),
                format!(
                    "not a parameter of dist {:?} (it takes {})",
                    t.dist,
                    takes.join(", ")
                ),
            );
        }
    }
    for (key, present) in given {
        if !present && required.contains(&key) {
            return invalid(&path.key(key), format!("dist {:?} needs {key}", t.dist));
        }
    }
    let ns = |key: &str, v: &Option<String>| -> Checked<u64> {
        let p = path.key(key);
        nanos(&p, duration(&p, v.as_deref().unwrap_or_default())?)
    };
    let max_ns = t.max.as_ref().map(|_| ns("max", &t.max)).transpose()?;
    let dist = match t.dist.as_str() {
        "fixed" => Dist::Fixed(ns("value", &t.value)?),
        "uniform" => {
            let min = ns("min", &t.min)?;
            let max = ns("max", &t.max)?;
            if min > max {
                return invalid(
                    &path.key("min"),
                    format!("min {} is more than max {}", show(min), show(max)),
                );
            }
            Dist::Uniform { min, max }
        }
        "exponential" => {
            let mean = ns("mean", &t.mean)?;
            if mean == 0 {
                return invalid(&path.key("mean"), "must be more than 0");
            }
            Dist::Exponential(
                Exp::new(1.0 / mean as f64)
                    .or_else(|e| invalid(&path.key("mean"), e.to_string()))?,
            )
        }
        "normal" => {
            let mean = ns("mean", &t.mean)?;
            let stddev = ns("stddev", &t.stddev)?;
            Dist::Normal(
                Normal::new(mean as f64, stddev as f64)
                    .or_else(|e| invalid(&path.key("stddev"), e.to_string()))?,
            )
        }
        _ => {
            let median = ns("median", &t.median)?;
            if median == 0 {
                return invalid(&path.key("median"), "must be more than 0");
            }
            let sigma = t.sigma.unwrap_or_default();
            if !(sigma > 0.0 && sigma.is_finite()) {
                return invalid(
                    &path.key("sigma"),
                    format!("must be more than 0 (got {sigma})"),
                );
            }
            Dist::LogNormal(
                LogNormal::new((median as f64).ln(), sigma)
                    .or_else(|e| invalid(&path.key("sigma"), e.to_string()))?,
            )
        }
    };
    Ok(Latency { dist, max_ns })
}

fn reorder(path: &FieldPath, r: &RawReorder) -> Checked<Reorder> {
    if !(2..=MAX_REORDER_WINDOW).contains(&r.window) {
        return invalid(
            &path.key("window"),
            format!("{} is not in [2, {MAX_REORDER_WINDOW}]", r.window),
        );
    }
    let hold_ns = match &r.hold {
        Some(s) => {
            let p = path.key("hold");
            nanos(&p, duration(&p, s)?)?
        }
        None => DEFAULT_REORDER_HOLD.as_nanos() as u64,
    };
    Ok(Reorder {
        window: r.window as u32,
        hold_ns,
    })
}

fn hang(path: &FieldPath, h: &StrOr<super::raw::RawHang>) -> Checked<Option<Hang>> {
    match h {
        StrOr::Str(s) => match s.as_str() {
            "forever" => Ok(Some(Hang::Forever)),
            "until_released" => Ok(Some(Hang::UntilReleased)),
            "none" => Ok(None),
            other => invalid(
                path,
                format!(
                    "{other:?} is not one of \"forever\", \"until_released\", \"none\" or {{ for = \"DURATION\" }}"
                ),
            ),
        },
        StrOr::Table(t) => {
            let p = path.key("for");
            Ok(Some(Hang::For {
                ns: nanos(&p, duration(&p, &t.for_)?)?,
            }))
        }
    }
}

/// The `VIRTIO_GPU_RESP_ERR_*` codes: `0x1200..=0x12ff`.
const ERROR_CODES: std::ops::RangeInclusive<u32> = 0x1200..=0x12ff;

fn error_code(path: &FieldPath, e: &NameOrNumber) -> Checked<Option<u32>> {
    match e {
        NameOrNumber::Number(n) => match u32::try_from(*n) {
            Ok(code) if ERROR_CODES.contains(&code) => Ok(Some(code)),
            _ => invalid(
                path,
                format!("{n} ({n:#x}) is not an error response code (0x1200..=0x12ff)"),
            ),
        },
        NameOrNumber::Name(name) if name.eq_ignore_ascii_case("none") => Ok(None),
        NameOrNumber::Name(name) => {
            let wanted = name.to_ascii_uppercase();
            let wanted = wanted.strip_prefix("VIRTIO_GPU_RESP_").unwrap_or(&wanted);
            match ERROR_CODES.clone().find(|&c| type_name(c) == wanted) {
                Some(code) => Ok(Some(code)),
                None => {
                    let known: Vec<_> = ERROR_CODES
                        .map(type_name)
                        .filter(|n| *n != "UNKNOWN")
                        .collect();
                    invalid(
                        path,
                        format!(
                            "unknown error {name:?}; use one of {} or a code in 0x1200..=0x12ff",
                            known.join(", ")
                        ),
                    )
                }
            }
        }
    }
}

fn irq(path: &FieldPath, i: &StrOr<RawIrq>) -> Checked<IrqFault> {
    let t = match i {
        StrOr::Str(s) => {
            return match s.as_str() {
                "normal" => Ok(IrqFault::Normal),
                "drop" => Ok(IrqFault::Drop),
                "spurious" => Ok(IrqFault::Spurious { count: 1 }),
                other => invalid(
                    path,
                    format!(
                        "{other:?} is not one of \"normal\", \"drop\", \"spurious\", {{ storm = N }}, {{ coalesce = \"DURATION\" }} or {{ delay = \"DURATION\" }}"
                    ),
                ),
            };
        }
        StrOr::Table(t) => t,
    };
    let given = [t.storm.is_some(), t.coalesce.is_some(), t.delay.is_some()];
    if given.iter().filter(|&&g| g).count() != 1 {
        return invalid(
            path,
            "give exactly one of storm, coalesce or delay".to_string(),
        );
    }
    if let Some(n) = t.storm {
        if !(1..=MAX_STORM).contains(&n) {
            return invalid(
                &path.key("storm"),
                format!("{n} is not in [1, {MAX_STORM}]"),
            );
        }
        return Ok(IrqFault::Spurious { count: n as u32 });
    }
    let (key, value) = match (&t.coalesce, &t.delay) {
        (Some(c), _) => ("coalesce", c),
        (_, Some(d)) => ("delay", d),
        _ => return invalid(path, "give exactly one of storm, coalesce or delay"),
    };
    let p = path.key(key);
    let ns = nanos(&p, duration(&p, value)?)?;
    if ns == 0 {
        return invalid(&p, "must be more than 0");
    }
    Ok(if key == "coalesce" {
        IrqFault::Coalesce { window_ns: ns }
    } else {
        IrqFault::Delay { delay_ns: ns }
    })
}

fn range(path: &FieldPath, r: &RawRange) -> Checked<std::ops::RangeInclusive<u64>> {
    let from = r.from.unwrap_or(0);
    let to = r.to.unwrap_or(u64::MAX);
    if r.from.is_none() && r.to.is_none() {
        return invalid(path, "give from, to or both");
    }
    if from > to {
        return invalid(
            &path.key("from"),
            format!("from {from} is more than to {to}"),
        );
    }
    Ok(from..=to)
}

fn non_empty<T>(path: &FieldPath, v: Vec<T>) -> Checked<Vec<T>> {
    if v.is_empty() {
        invalid(
            path,
            "must not be an empty list (leave the key out to match any)",
        )
    } else {
        Ok(v)
    }
}

/// Names of the commands a rule can match, e.g. `SUBMIT_3D`.
pub fn command_names() -> impl Iterator<Item = &'static str> {
    [0x0100u32..=0x01ff, 0x0200..=0x02ff, 0x0300..=0x03ff]
        .into_iter()
        .flatten()
        .map(type_name)
        .filter(|n| *n != "UNKNOWN")
}

pub fn duration(path: &FieldPath, s: &str) -> Checked<Duration> {
    humantime::parse_duration(s.trim()).or_else(|e| {
        invalid(
            path,
            format!("invalid duration {s:?}: {e} (write e.g. \"250us\", \"2ms\", \"1s\")"),
        )
    })
}

fn nanos(path: &FieldPath, d: Duration) -> Checked<u64> {
    u64::try_from(d.as_nanos())
        .or_else(|_| invalid(path, "duration is too long (at most 584 years)"))
}

fn show(ns: u64) -> String {
    humantime::format_duration(Duration::from_nanos(ns)).to_string()
}
