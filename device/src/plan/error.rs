//! Why a plan was refused.

use std::fmt;

/// A plan that could not be read or is not valid. The message names the
/// origin (file), the position when known, and the field at fault:
/// `plans/bad.toml:12:15: rule "slow tail": match.probability: 1.5 is not in [0, 1]`.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{origin}: cannot read the plan: {source}")]
    Read {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(Box<InvalidPlan>),
}

/// Where and why a plan is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidPlan {
    /// The file name (or other origin, e.g. `control-plane patch`).
    pub origin: String,
    /// 1-based line and column, for plans read from TOML text.
    pub position: Option<(usize, usize)>,
    /// The field as the user reads it, e.g. `rule "slow": match.ctx`;
    /// `None` for syntax errors.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for InvalidPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        write!(f, ": ")?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl PlanError {
    /// The details of an invalid plan (`None` for read errors).
    pub fn invalid(&self) -> Option<&InvalidPlan> {
        match self {
            PlanError::Invalid(i) => Some(i),
            PlanError::Read { .. } => None,
        }
    }
}
