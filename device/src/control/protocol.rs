//! The control protocol's messages: one JSON object per line each way.
//!
//! Requests are parsed by hand rather than with a derived `Deserialize` so
//! that every way a request can be wrong gets its own precise message, and
//! so that unknown and duplicate fields are refused (serde's
//! `deny_unknown_fields` does not combine with the internally tagged
//! [`ReleaseTarget`]). `CONTROL.md` documents every request and reply.

use std::fmt;
use std::path::PathBuf;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::fault::{ReleaseTarget, TimelineId};

/// The longest request line the server accepts, newline excluded.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Every request name, in the order `CONTROL.md` lists them.
pub const COMMANDS: &[&str] = &[
    "load_plan",
    "patch_plan",
    "plan",
    "release",
    "pause",
    "resume",
    "stats",
    "accounting",
    "flush_trace",
];

/// Where a `load_plan` request takes its TOML from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanSource {
    /// A file the device reads (relative paths are relative to the device's
    /// working directory; `ctl` sends absolute paths).
    Path(PathBuf),
    /// The plan's text itself.
    Toml(String),
}

/// One control request.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    LoadPlan(PlanSource),
    /// A JSON merge patch (RFC 7386); always an object.
    PatchPlan(Value),
    Plan,
    Release(ReleaseTarget),
    Pause,
    Resume,
    Stats,
    Accounting,
    FlushTrace,
}

/// Why a request line was refused. The `Display` text is what the client
/// sees in `{"ok":false,"error":…}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("empty request line: expected a JSON object such as {{\"cmd\":\"stats\"}}")]
    Empty,
    #[error("request is not valid UTF-8 (first bad byte at offset {offset})")]
    NotUtf8 { offset: usize },
    #[error("request is not valid JSON: {0}")]
    NotJson(String),
    #[error("request must be a JSON object, got {got}")]
    NotObject { got: &'static str },
    #[error("request has no \"cmd\" field; expected one of: {}", COMMANDS.join(", "))]
    MissingCmd,
    #[error("unknown cmd {0:?}; expected one of: {known}", known = COMMANDS.join(", "))]
    UnknownCmd(String),
    #[error("{cmd}: missing field {field:?}")]
    MissingField { cmd: String, field: &'static str },
    #[error("{cmd}: unknown field {field:?} (allowed: {allowed})")]
    UnknownField {
        cmd: String,
        field: String,
        allowed: String,
    },
    #[error("{cmd}: field {field:?} must be {expected}, got {got}")]
    WrongType {
        cmd: String,
        field: &'static str,
        expected: &'static str,
        got: String,
    },
    #[error("{cmd}: {message}")]
    BadValue { cmd: String, message: String },
}

impl Request {
    /// Parses one request line (without its newline).
    pub fn parse(line: &[u8]) -> Result<Request, RequestError> {
        let text = std::str::from_utf8(line).map_err(|e| RequestError::NotUtf8 {
            offset: e.valid_up_to(),
        })?;
        if text.trim().is_empty() {
            return Err(RequestError::Empty);
        }
        let StrictJson(value) =
            serde_json::from_str(text).map_err(|e| RequestError::NotJson(e.to_string()))?;
        let Value::Object(mut object) = value else {
            return Err(RequestError::NotObject {
                got: json_kind(&value),
            });
        };
        let cmd = match object.remove("cmd") {
            None => return Err(RequestError::MissingCmd),
            Some(Value::String(cmd)) => cmd,
            Some(other) => {
                return Err(RequestError::WrongType {
                    cmd: "request".into(),
                    field: "cmd",
                    expected: "a string",
                    got: describe(&other),
                });
            }
        };
        let mut fields = Fields { cmd, object };
        let request = match fields.cmd.as_str() {
            "load_plan" => Request::LoadPlan(fields.plan_source()?),
            "patch_plan" => Request::PatchPlan(fields.take_object("patch")?),
            "plan" => Request::Plan,
            "release" => Request::Release(fields.release_target()?),
            "pause" => Request::Pause,
            "resume" => Request::Resume,
            "stats" => Request::Stats,
            "accounting" => Request::Accounting,
            "flush_trace" => Request::FlushTrace,
            _ => return Err(RequestError::UnknownCmd(fields.cmd)),
        };
        fields.finish(&request)?;
        Ok(request)
    }

    /// The request's `cmd` name.
    pub fn name(&self) -> &'static str {
        match self {
            Request::LoadPlan(_) => "load_plan",
            Request::PatchPlan(_) => "patch_plan",
            Request::Plan => "plan",
            Request::Release(_) => "release",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Stats => "stats",
            Request::Accounting => "accounting",
            Request::FlushTrace => "flush_trace",
        }
    }

    /// The fields (besides `cmd`) this request kind accepts.
    fn allowed_fields(&self) -> &'static [&'static str] {
        match self {
            Request::LoadPlan(_) => &["path", "toml"],
            Request::PatchPlan(_) => &["patch"],
            Request::Release(ReleaseTarget::Fence { .. }) => &["target", "fence"],
            Request::Release(ReleaseTarget::Timeline { .. }) => &["target", "timeline"],
            Request::Release(ReleaseTarget::All) => &["target"],
            _ => &[],
        }
    }

    /// The request as the JSON object sent on the wire.
    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        object.insert("cmd".into(), self.name().into());
        match self {
            Request::LoadPlan(PlanSource::Path(path)) => {
                object.insert("path".into(), path.to_string_lossy().into_owned().into());
            }
            Request::LoadPlan(PlanSource::Toml(toml)) => {
                object.insert("toml".into(), toml.clone().into());
            }
            Request::PatchPlan(patch) => {
                object.insert("patch".into(), patch.clone());
            }
            Request::Release(target) => {
                if let Ok(Value::Object(target)) = serde_json::to_value(target) {
                    object.extend(target);
                }
            }
            _ => {}
        }
        Value::Object(object)
    }
}

/// The fields of a request object still to be consumed.
struct Fields {
    cmd: String,
    object: Map<String, Value>,
}

impl Fields {
    fn wrong_type(&self, field: &'static str, expected: &'static str, got: &Value) -> RequestError {
        RequestError::WrongType {
            cmd: self.cmd.clone(),
            field,
            expected,
            got: describe(got),
        }
    }

    fn bad_value(&self, message: impl Into<String>) -> RequestError {
        RequestError::BadValue {
            cmd: self.cmd.clone(),
            message: message.into(),
        }
    }

    fn take(&mut self, field: &'static str) -> Result<Value, RequestError> {
        self.object
            .remove(field)
            .ok_or_else(|| RequestError::MissingField {
                cmd: self.cmd.clone(),
                field,
            })
    }

    fn take_string(&mut self, field: &'static str) -> Result<String, RequestError> {
        match self.take(field)? {
            Value::String(s) => Ok(s),
            other => Err(self.wrong_type(field, "a string", &other)),
        }
    }

    fn take_u64(&mut self, field: &'static str) -> Result<u64, RequestError> {
        let value = self.take(field)?;
        value
            .as_u64()
            .ok_or_else(|| self.wrong_type(field, "an unsigned 64-bit integer", &value))
    }

    fn take_object(&mut self, field: &'static str) -> Result<Value, RequestError> {
        match self.take(field)? {
            value @ Value::Object(_) => Ok(value),
            other => Err(self.wrong_type(field, "a JSON object (a merge patch)", &other)),
        }
    }

    fn plan_source(&mut self) -> Result<PlanSource, RequestError> {
        match (self.object.contains_key("path"), self.object.contains_key("toml")) {
            (true, true) => Err(self.bad_value("give either \"path\" or \"toml\", not both")),
            (false, false) => Err(self.bad_value(
                "missing the plan: give \"path\" (a file the device reads) or \"toml\" (the plan text)",
            )),
            (true, false) => {
                let path = self.take_string("path")?;
                if path.is_empty() {
                    return Err(self.bad_value("\"path\" is empty"));
                }
                Ok(PlanSource::Path(path.into()))
            }
            (false, true) => Ok(PlanSource::Toml(self.take_string("toml")?)),
        }
    }

    fn release_target(&mut self) -> Result<ReleaseTarget, RequestError> {
        let target = self.take_string("target")?;
        match target.as_str() {
            "fence" => Ok(ReleaseTarget::Fence {
                fence: self.take_u64("fence")?,
            }),
            "timeline" => {
                let text = self.take_string("timeline")?;
                let timeline: TimelineId =
                    text.parse().map_err(|e| self.bad_value(format!("{e}")))?;
                Ok(ReleaseTarget::Timeline { timeline })
            }
            "all" => Ok(ReleaseTarget::All),
            other => Err(self.bad_value(format!(
                "unknown release target {other:?}; expected \"fence\", \"timeline\" or \"all\""
            ))),
        }
    }

    /// Refuses whatever fields the request kind did not consume.
    fn finish(self, request: &Request) -> Result<(), RequestError> {
        let Some(field) = self.object.keys().next() else {
            return Ok(());
        };
        let allowed = request.allowed_fields();
        Err(RequestError::UnknownField {
            cmd: self.cmd.clone(),
            field: field.clone(),
            allowed: if allowed.is_empty() {
                "none besides \"cmd\"".into()
            } else {
                allowed.join(", ")
            },
        })
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value's kind and, if short, the value itself, for error messages.
fn describe(value: &Value) -> String {
    let text = value.to_string();
    if text.len() <= 40 {
        format!("{} {text}", json_kind(value))
    } else {
        json_kind(value).to_string()
    }
}

/// A reply: `{"ok":true, …fields…}` or `{"ok":false,"error":…}`.
#[derive(Clone, Debug, PartialEq)]
pub enum Response {
    Ok(Map<String, Value>),
    Err(String),
}

impl Response {
    /// A success carrying one named result.
    pub fn ok_with(key: &str, value: Value) -> Response {
        let mut fields = Map::new();
        fields.insert(key.into(), value);
        Response::Ok(fields)
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, Response::Ok(_))
    }

    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        match self {
            Response::Ok(fields) => {
                object.insert("ok".into(), true.into());
                object.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            Response::Err(message) => {
                object.insert("ok".into(), false.into());
                object.insert("error".into(), message.clone().into());
            }
        }
        Value::Object(object)
    }

    /// The reply as one line, newline included, `"ok"` first so a person
    /// reading it sees the verdict first (JSON objects are otherwise
    /// written with sorted keys).
    pub fn to_line(&self) -> String {
        let rest = match self {
            Response::Ok(fields) => Value::Object(fields.clone()),
            Response::Err(message) => serde_json::json!({ "error": message }),
        }
        .to_string();
        let ok = self.is_ok();
        match rest.strip_prefix('{').filter(|r| *r != "}") {
            Some(rest) => format!("{{\"ok\":{ok},{rest}\n"),
            None => format!("{{\"ok\":{ok}}}\n"),
        }
    }

    /// Reads a reply the server sent.
    pub fn from_json(value: Value) -> Result<Response, String> {
        let Value::Object(mut object) = value else {
            return Err(format!("reply is not a JSON object: {}", describe(&value)));
        };
        match object.remove("ok") {
            Some(Value::Bool(true)) => Ok(Response::Ok(object)),
            Some(Value::Bool(false)) => match object.remove("error") {
                Some(Value::String(message)) => Ok(Response::Err(message)),
                _ => Err("reply has \"ok\":false but no \"error\" string".into()),
            },
            _ => Err("reply has no boolean \"ok\" field".into()),
        }
    }
}

/// A JSON value that refuses duplicate object keys at any depth (plain
/// `serde_json::Value` keeps the last one silently, which would let
/// `{"cmd":"pause","cmd":"resume"}` mean something surprising).
struct StrictJson(Value);

impl<'de> Deserialize<'de> for StrictJson {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictJson)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        StrictJson::deserialize(d).map(|StrictJson(v)| v)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictJson(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
            let StrictJson(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(line: &str) -> Result<Request, RequestError> {
        Request::parse(line.as_bytes())
    }

    fn error(line: &[u8]) -> String {
        Request::parse(line).unwrap_err().to_string()
    }

    #[test]
    fn every_request_kind_round_trips_through_its_json() {
        let requests = [
            Request::LoadPlan(PlanSource::Path("/tmp/plan.toml".into())),
            Request::LoadPlan(PlanSource::Toml("[default]\n".into())),
            Request::PatchPlan(json!({"default": {"latency": "3ms"}, "rules": null})),
            Request::Plan,
            Request::Release(ReleaseTarget::Fence { fence: u64::MAX }),
            Request::Release(ReleaseTarget::Timeline {
                timeline: TimelineId { ctx: 3, ring: 1 },
            }),
            Request::Release(ReleaseTarget::All),
            Request::Pause,
            Request::Resume,
            Request::Stats,
            Request::Accounting,
            Request::FlushTrace,
        ];
        let mut names: Vec<&str> = requests.iter().map(Request::name).collect();
        names.dedup();
        assert_eq!(names, COMMANDS);
        for request in requests {
            let line = request.to_json().to_string();
            assert_eq!(parse(&line).as_ref(), Ok(&request), "{line}");
        }
    }

    #[test]
    fn the_documented_examples_parse() {
        assert_eq!(
            parse(r#"{"cmd":"release","target":"fence","fence":42}"#),
            Ok(Request::Release(ReleaseTarget::Fence { fence: 42 }))
        );
        assert_eq!(
            parse(r#"{"cmd":"release","target":"timeline","timeline":"3"}"#),
            Ok(Request::Release(ReleaseTarget::Timeline {
                timeline: TimelineId { ctx: 3, ring: 0 }
            }))
        );
        assert_eq!(parse(" {\"cmd\":\"stats\"}\r"), Ok(Request::Stats));
    }

    #[test]
    fn framing_and_syntax_errors_are_named() {
        assert!(error(b"").contains("empty request"));
        assert!(error(b"  ").contains("empty request"));
        assert!(
            error(b"{\"cmd\":\"st\xffats\"}")
                .contains("not valid UTF-8 (first bad byte at offset 10)")
        );
        assert!(error(b"{\"cmd\":").contains("not valid JSON"));
        assert!(error(b"{\"cmd\":\"stats\"} x").contains("not valid JSON"));
        assert!(error(b"[1]").contains("must be a JSON object, got an array"));
        assert!(error(b"{}").contains("no \"cmd\" field"));
        assert!(error(b"{\"cmd\":7}").contains("\"cmd\" must be a string, got a number 7"));
        let unknown = error(b"{\"cmd\":\"explode\"}");
        assert!(unknown.contains("unknown cmd \"explode\""), "{unknown}");
        assert!(unknown.contains("load_plan, patch_plan"), "{unknown}");
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        assert!(error(br#"{"cmd":"pause","cmd":"resume"}"#).contains("duplicate key \"cmd\""));
        let nested = error(br#"{"cmd":"patch_plan","patch":{"a":{"b":1,"b":2}}}"#);
        assert!(nested.contains("duplicate key \"b\""), "{nested}");
    }

    #[test]
    fn field_errors_name_the_command_and_field() {
        assert_eq!(
            error(br#"{"cmd":"stats","verbose":true}"#),
            "stats: unknown field \"verbose\" (allowed: none besides \"cmd\")"
        );
        assert_eq!(
            error(br#"{"cmd":"patch_plan"}"#),
            "patch_plan: missing field \"patch\""
        );
        assert!(error(br#"{"cmd":"patch_plan","patch":[1]}"#).contains("must be a JSON object"));
        assert!(error(br#"{"cmd":"load_plan"}"#).contains("give \"path\""));
        assert!(error(br#"{"cmd":"load_plan","path":"a","toml":""}"#).contains("not both"));
        assert!(error(br#"{"cmd":"load_plan","path":""}"#).contains("\"path\" is empty"));
        assert!(error(br#"{"cmd":"load_plan","path":3}"#).contains("\"path\" must be a string"));
        assert!(error(br#"{"cmd":"release"}"#).contains("missing field \"target\""));
        assert!(error(br#"{"cmd":"release","target":"some"}"#).contains("unknown release target"));
        assert!(
            error(br#"{"cmd":"release","target":"fence"}"#).contains("missing field \"fence\"")
        );
        for bad in ["-1", "1.5", "\"7\"", "18446744073709551616"] {
            let line = format!(r#"{{"cmd":"release","target":"fence","fence":{bad}}}"#);
            assert!(
                error(line.as_bytes()).contains("unsigned 64-bit integer"),
                "{line}"
            );
        }
        assert!(
            error(br#"{"cmd":"release","target":"timeline","timeline":"x.1"}"#)
                .contains("bad timeline \"x.1\"")
        );
        assert_eq!(
            error(br#"{"cmd":"release","target":"all","fence":3}"#),
            "release: unknown field \"fence\" (allowed: target)"
        );
        assert!(
            error(br#"{"cmd":"release","target":"fence","fence":3,"timeline":"1"}"#)
                .contains("unknown field \"timeline\" (allowed: target, fence)")
        );
    }

    #[test]
    fn responses_have_the_documented_shape() {
        let ok = Response::ok_with("released", 3.into());
        assert_eq!(ok.to_line(), "{\"ok\":true,\"released\":3}\n");
        assert_eq!(Response::Ok(Map::new()).to_line(), "{\"ok\":true}\n");
        let err = Response::Err("no \"quotes\"\n".into());
        assert_eq!(
            err.to_line(),
            "{\"ok\":false,\"error\":\"no \\\"quotes\\\"\\n\"}\n"
        );
        assert_eq!(
            serde_json::from_str::<Value>(&ok.to_line()).unwrap(),
            ok.to_json()
        );
        assert_eq!(
            err.to_json(),
            json!({"ok": false, "error": "no \"quotes\"\n"})
        );
        assert_eq!(Response::from_json(ok.to_json()), Ok(ok));
        assert_eq!(Response::from_json(err.to_json()), Ok(err));
        assert!(Response::from_json(json!({"ok": false})).is_err());
        assert!(Response::from_json(json!([true])).is_err());
    }
}
