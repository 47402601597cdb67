//! The plan file as written: serde types that mirror the TOML (and the JSON
//! of the control plane) one to one. Every table denies unknown keys, values
//! stay as the user wrote them (durations are strings), and nothing is
//! checked beyond types: [`super::validate`] turns these into a
//! [`super::Plan`] and reports semantic errors with the field's path.
//!
//! Serializing a `RawPlan` gives back the user's notation, which is what
//! [`super::Plan::to_json`] shows and what a merge patch applies to.

use std::fmt;
use std::marker::PhantomData;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{self, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlan {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub irq_rescue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_boost: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<RawActions>,
    #[serde(default, rename = "rule", skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RawRule>,
}

/// The actions of `[default]`. [`RawRule`] repeats these keys (serde cannot
/// flatten a struct that denies unknown fields).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawActions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<StrOr<RawLatency>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reorder: Option<RawReorder>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_reorder: Option<RawCrossReorder>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hang: Option<StrOr<RawHang>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<NameOrNumber>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub irq: Option<StrOr<RawIrq>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: String,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matcher: Option<RawMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<StrOr<RawLatency>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reorder: Option<RawReorder>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_reorder: Option<RawCrossReorder>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hang: Option<StrOr<RawHang>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<NameOrNumber>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub irq: Option<StrOr<RawIrq>>,
}

impl RawRule {
    pub fn actions(&self) -> RawActions {
        RawActions {
            latency: self.latency.clone(),
            reorder: self.reorder.clone(),
            cross_reorder: self.cross_reorder.clone(),
            hang: self.hang.clone(),
            error: self.error.clone(),
            irq: self.irq.clone(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctx: Option<OneOrMany<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<OneOrMany<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<RawRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<RawRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probability: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<OneOrMany<String>>,
}

/// `{ from = A, to = B }`, both inclusive, either may be left out.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u64>,
}

/// The table form of `latency`; which keys apply depends on `dist`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLatency {
    pub dist: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stddev: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub median: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigma: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReorder {
    pub window: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCrossReorder {
    pub jitter: String,
}

/// `hang = { for = "200ms" }`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHang {
    #[serde(rename = "for")]
    pub for_: String,
}

/// `irq = { storm = N }`, `{ coalesce = "1ms" }` or `{ delay = "2ms" }`:
/// exactly one key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIrq {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storm: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coalesce: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<String>,
}

/// A value written either as a string shorthand or as a table.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum StrOr<T> {
    Str(String),
    Table(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for StrOr<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = StrOr<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a table")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(StrOr::Str(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(StrOr::Table)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// A `VIRTIO_GPU_RESP_ERR_*` given by name or number.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum NameOrNumber {
    Name(String),
    Number(i64),
}

impl<'de> Deserialize<'de> for NameOrNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = NameOrNumber;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an error name such as \"ERR_UNSPEC\" or a response code")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(NameOrNumber::Name(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(NameOrNumber::Number(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                i64::try_from(v)
                    .map(NameOrNumber::Number)
                    .map_err(|_| E::custom(format!("{v} is not a response code")))
            }
        }
        d.deserialize_any(V)
    }
}

/// `key = X` or `key = [X, Y]`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> V<T> {
            fn one<E: de::Error, X: IntoDeserializer<'de, E>>(x: X) -> Result<OneOrMany<T>, E> {
                T::deserialize(x.into_deserializer()).map(OneOrMany::One)
            }
        }
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a value or an array of values")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Vec::<T>::deserialize(SeqAccessDeserializer::new(seq)).map(OneOrMany::Many)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Self::one(v)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Self::one(v)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Self::one(v)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Self::one(v)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Self::one(v.to_string())
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}
