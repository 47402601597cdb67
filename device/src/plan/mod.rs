//! Fault plans: what the device does to each fence, read from TOML.
//!
//! A plan has a `[default]` set of actions and ordered `[[rule]]`s, each
//! with a `[rule.match]` and actions of its own; `device/plans/README.md`
//! documents the format. [`Plan::parse`] refuses an invalid plan with the
//! file, line, column and field at fault. The decider
//! ([`crate::decide::PlanDecider`]) applies a plan to arriving fences.
//!
//! - [`raw`]: the file format as serde types;
//! - [`validate`]: the semantic checks, raw to [`model`];
//! - [`locate`]: field paths and positions for error messages;
//! - [`latency`]: the latency distributions;
//! - [`merge`]: JSON merge patch for the control plane.

pub mod error;
pub mod latency;
pub mod locate;
pub mod merge;
pub mod model;
pub mod raw;
pub mod validate;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

pub use error::{InvalidPlan, PlanError};
pub use latency::{Dist, Latency};
pub use model::{Actions, Match, Reorder, Rule};

use locate::{FieldPath, SourceMap};
use raw::{RawActions, RawPlan, StrOr};
use validate::{DEFAULT_IRQ_RESCUE, PlanBody};

/// A checked plan, with the text it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    origin: String,
    /// The TOML text the plan was read from (generated for JSON plans).
    source: String,
    sha256: String,
    raw: RawPlan,
    body: PlanBody,
}

impl Plan {
    /// Parses and checks a plan. `origin` names it in errors (a file name).
    pub fn parse(source: &str, origin: &str) -> Result<Plan, PlanError> {
        Self::parse_located(source, origin, true)
    }

    /// Reads and parses the plan file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Plan, PlanError> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        let source = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
            origin: origin.clone(),
            source,
        })?;
        Self::parse(&source, &origin)
    }

    /// The plan `--latency D` stands for: every fence completes `D` after it
    /// arrives, no faults.
    pub fn fixed_latency(latency: Duration) -> Plan {
        let shown = humantime::format_duration(latency).to_string();
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let source = format!("[default]\nlatency = \"{shown}\"\n");
        Plan {
            origin: format!("--latency {shown}"),
            sha256: sha256_hex(&source),
            source,
            raw: RawPlan {
                default: Some(RawActions {
                    latency: Some(StrOr::Str(shown)),
                    ..RawActions::default()
                }),
                ..RawPlan::default()
            },
            body: PlanBody {
                seed: None,
                irq_rescue: Some(DEFAULT_IRQ_RESCUE),
                deadline_boost: None,
                default: Actions {
                    latency: Some(Latency::fixed(ns)),
                    ..Actions::default()
                },
                rules: Vec::new(),
            },
        }
    }

    /// The plan as JSON, in the user's notation (what [`Plan::from_json`]
    /// reads back and what a merge patch applies to).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(&self.raw).unwrap_or_else(|e| {
            tracing::error!("plan {} does not serialize: {e}", self.origin);
            Value::Null
        })
    }

    /// A plan from its JSON form, checked like a file. Errors name fields
    /// but no positions.
    pub fn from_json(value: &Value, origin: &str) -> Result<Plan, PlanError> {
        let refuse = |field: Option<String>, message: String| {
            PlanError::Invalid(Box::new(InvalidPlan {
                origin: origin.to_string(),
                position: None,
                field,
                message,
            }))
        };
        if !value.is_object() {
            return Err(refuse(None, "a plan must be a JSON object".into()));
        }
        if let Some(path) = first_null(value, &FieldPath::root()) {
            return Err(refuse(
                Some(path.to_string()),
                "null is not a value (in a merge patch, null removes a key)".into(),
            ));
        }
        let source = toml::to_string(value)
            .map_err(|e| refuse(None, format!("cannot be written as TOML: {e}")))?;
        Self::parse_located(&source, origin, false)
    }

    /// The seed the plan asks for (`--seed` overrides it).
    pub fn seed(&self) -> Option<u64> {
        self.body.seed
    }

    /// SHA-256 of the plan's TOML text, lowercase hex: for a file, what
    /// `sha256sum FILE` prints.
    pub fn sha256_hex(&self) -> &str {
        &self.sha256
    }

    /// Where the plan came from: a file name, `--latency 2ms`, …
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The TOML text the plan was read from.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn irq_rescue(&self) -> Option<Duration> {
        self.body.irq_rescue
    }

    pub fn deadline_boost(&self) -> Option<Duration> {
        self.body.deadline_boost
    }

    pub fn default_actions(&self) -> &Actions {
        &self.body.default
    }

    pub fn rules(&self) -> &[Rule] {
        &self.body.rules
    }

    fn parse_located(source: &str, origin: &str, show_positions: bool) -> Result<Plan, PlanError> {
        let map = SourceMap::new(source);
        let refuse = |span: Option<std::ops::Range<usize>>, path: Option<FieldPath>, message| {
            PlanError::Invalid(Box::new(InvalidPlan {
                origin: origin.to_string(),
                position: span
                    .filter(|_| show_positions)
                    .map(|s| map.line_column(s.start)),
                field: path
                    .filter(|p| !p.segments().is_empty())
                    .map(|p| p.describe(|i| map.rule_name(i))),
                message,
            }))
        };
        let raw: RawPlan = toml::from_str(source).map_err(|e| {
            // With no span to place it, the error is about the whole file
            // (e.g. a missing top-level key).
            let path = e.span().map(|s| map.path_at(&s));
            refuse(e.span(), path, e.message().trim_end().to_string())
        })?;
        let body = validate::validate(&raw)
            .map_err(|e| refuse(map.span_of(&e.path), Some(e.path), e.message))?;
        Ok(Plan {
            origin: origin.to_string(),
            source: source.to_string(),
            sha256: sha256_hex(source),
            raw,
            body,
        })
    }
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn first_null(value: &Value, path: &FieldPath) -> Option<FieldPath> {
    match value {
        Value::Null => Some(path.clone()),
        Value::Object(m) => m.iter().find_map(|(k, v)| first_null(v, &path.key(k))),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, v)| first_null(v, &path.index(i))),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
