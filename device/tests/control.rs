//! The control plane against a fake device that records every call: each
//! request kind, each class of bad request, framing limits, permissions,
//! concurrency, and the `fencelab-device ctl` client's exit codes.

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::process::{BINARY, Scratch, ctl};
use fencelab_device::control::protocol::MAX_LINE_BYTES;
use fencelab_device::control::server::MAX_CONNECTIONS;
use fencelab_device::control::{Client, ClientError, ControlServer, PlanSource, Request, Response};
use fencelab_device::decide::PlanDecider;
use fencelab_device::fault::{
    Accounting, DeviceControl, PlanView, ReleaseTarget, TimelineId, TraceEvent,
};
use fencelab_device::plan::Plan;
use serde_json::{Value, json};

/// A call the fake device received.
#[derive(Clone, Debug, PartialEq)]
enum Call {
    LoadPlan { source: String, origin: String },
    PatchPlan(Value),
    Plan,
    Release(ReleaseTarget),
    SetPaused(bool),
    Stats,
    Accounting,
    FlushTrace,
}

/// A plan view whose hash is a stand-in named after the plan.
fn view(plan: Value) -> PlanView {
    PlanView {
        sha256: format!("sha of {plan}"),
        plan,
    }
}

/// A device that records calls. A plan whose text contains `bad` and a
/// patch with a `"bad"` key are refused (recorded all the same), as is a
/// release of fence 13.
#[derive(Default)]
struct FakeDevice {
    calls: Mutex<Vec<Call>>,
}

impl FakeDevice {
    fn record(&self, call: Call) {
        self.calls.lock().unwrap().push(call);
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

impl DeviceControl for FakeDevice {
    fn load_plan(&self, source: &str, origin: &str) -> Result<PlanView, String> {
        self.record(Call::LoadPlan {
            source: source.into(),
            origin: origin.into(),
        });
        if source.contains("bad") {
            return Err(format!("{origin}:1:1: bad plan"));
        }
        Ok(view(json!({"loaded": source})))
    }
    fn patch_plan(&self, patch: &Value) -> Result<PlanView, String> {
        self.record(Call::PatchPlan(patch.clone()));
        if patch.get("bad").is_some() {
            return Err("patch: field `bad` is not a plan field".into());
        }
        Ok(view(json!({"patched": patch})))
    }
    fn plan(&self) -> PlanView {
        self.record(Call::Plan);
        view(json!({"default": {"latency": "1ms"}}))
    }
    fn release(&self, target: ReleaseTarget) -> Result<u64, String> {
        self.record(Call::Release(target));
        match target {
            ReleaseTarget::Fence { fence: 13 } => Err("fence 13 is not hung".into()),
            ReleaseTarget::Fence { .. } => Ok(1),
            ReleaseTarget::Timeline { .. } => Ok(2),
            ReleaseTarget::All => Ok(5),
        }
    }
    fn set_paused(&self, paused: bool) {
        self.record(Call::SetPaused(paused));
    }
    fn stats(&self) -> Value {
        self.record(Call::Stats);
        json!({"timelines": {"3.0": {"submitted": 4}}})
    }
    fn accounting(&self) -> Accounting {
        self.record(Call::Accounting);
        Accounting {
            submitted: 7,
            completed: 6,
            hung: 1,
            ..Accounting::default()
        }
    }
    fn flush_trace(&self) -> Result<(), String> {
        self.record(Call::FlushTrace);
        Ok(())
    }
}

struct Running {
    device: Arc<FakeDevice>,
    server: ControlServer,
    scratch: Scratch,
}

fn start(name: &str) -> Running {
    let scratch = Scratch::new(name);
    let device = Arc::new(FakeDevice::default());
    let server = ControlServer::start(&scratch.path("ctl"), device.clone()).unwrap();
    Running {
        device,
        server,
        scratch,
    }
}

/// A raw connection for sending arbitrary bytes.
struct Raw {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Raw {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// The next reply, or `None` at end of input.
    fn reply(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line).unwrap() {
            0 => None,
            _ => Some(serde_json::from_str(&line).unwrap()),
        }
    }

    fn ask(&mut self, bytes: &[u8]) -> Value {
        let mut line = bytes.to_vec();
        line.push(b'\n');
        self.send(&line);
        self.reply().expect("a reply")
    }
}

/// The reply to a plan request: the plan and its (stand-in) hash.
fn plan_reply(plan: Value) -> Value {
    json!({"ok": true, "plan_sha256": view(plan.clone()).sha256, "plan": plan})
}

fn error_of(reply: &Value) -> &str {
    assert_eq!(reply["ok"], false, "expected an error reply: {reply}");
    reply["error"].as_str().expect("an error message")
}

#[test]
fn every_request_kind_reaches_the_device_and_replies() {
    let run = start("kinds");
    let plan_file = run.scratch.path("plan.toml");
    std::fs::write(&plan_file, "[default]\nlatency = \"2ms\"\n").unwrap();
    let mut client = Client::connect(run.server.path()).unwrap();
    let timeline = TimelineId { ctx: 3, ring: 0 };
    let cases: Vec<(Request, Call, Value)> = vec![
        (
            Request::LoadPlan(PlanSource::Path(plan_file.clone())),
            Call::LoadPlan {
                source: "[default]\nlatency = \"2ms\"\n".into(),
                origin: plan_file.display().to_string(),
            },
            plan_reply(json!({"loaded": "[default]\nlatency = \"2ms\"\n"})),
        ),
        (
            Request::LoadPlan(PlanSource::Toml("seed = 1\n".into())),
            Call::LoadPlan {
                source: "seed = 1\n".into(),
                origin: "<load_plan toml>".into(),
            },
            plan_reply(json!({"loaded": "seed = 1\n"})),
        ),
        (
            Request::PatchPlan(json!({"default": {"latency": "5ms"}})),
            Call::PatchPlan(json!({"default": {"latency": "5ms"}})),
            plan_reply(json!({"patched": {"default": {"latency": "5ms"}}})),
        ),
        (
            Request::Plan,
            Call::Plan,
            plan_reply(json!({"default": {"latency": "1ms"}})),
        ),
        (
            Request::Release(ReleaseTarget::Fence { fence: 9 }),
            Call::Release(ReleaseTarget::Fence { fence: 9 }),
            json!({"ok": true, "released": 1}),
        ),
        (
            Request::Release(ReleaseTarget::Timeline { timeline }),
            Call::Release(ReleaseTarget::Timeline { timeline }),
            json!({"ok": true, "released": 2}),
        ),
        (
            Request::Release(ReleaseTarget::All),
            Call::Release(ReleaseTarget::All),
            json!({"ok": true, "released": 5}),
        ),
        (
            Request::Pause,
            Call::SetPaused(true),
            json!({"ok": true, "paused": true}),
        ),
        (
            Request::Resume,
            Call::SetPaused(false),
            json!({"ok": true, "paused": false}),
        ),
        (
            Request::Stats,
            Call::Stats,
            json!({"ok": true, "stats": {"timelines": {"3.0": {"submitted": 4}}}}),
        ),
        (Request::FlushTrace, Call::FlushTrace, json!({"ok": true})),
    ];
    for (request, call, reply) in cases {
        let response = client.call(&request).unwrap();
        assert_eq!(response.to_json(), reply, "{request:?}");
        assert_eq!(run.device.calls().last(), Some(&call), "{request:?}");
    }
    let accounting = client.call(&Request::Accounting).unwrap().to_json();
    assert_eq!(accounting["accounting"]["submitted"], 7);
    assert_eq!(accounting["accounting"]["hung"], 1);
    assert_eq!(run.device.calls().len(), 12);
}

#[test]
fn device_refusals_come_back_as_error_replies() {
    let run = start("refusals");
    let mut client = Client::connect(run.server.path()).unwrap();
    let refused = [
        (
            Request::LoadPlan(PlanSource::Toml("bad".into())),
            "<load_plan toml>:1:1: bad plan",
        ),
        (
            Request::PatchPlan(json!({"bad": 1})),
            "patch: field `bad` is not a plan field",
        ),
        (
            Request::Release(ReleaseTarget::Fence { fence: 13 }),
            "fence 13 is not hung",
        ),
    ];
    for (request, message) in refused {
        assert_eq!(
            client.call(&request).unwrap(),
            Response::Err(message.into())
        );
    }
}

#[test]
fn a_plan_file_the_device_cannot_read_is_refused_before_the_device_sees_it() {
    let run = start("unreadable");
    let mut raw = Raw::connect(run.server.path());
    let missing = run.scratch.path("missing.toml");
    let request = json!({"cmd": "load_plan", "path": missing}).to_string();
    let message = error_of(&raw.ask(request.as_bytes())).to_string();
    assert!(
        message.contains(&format!("cannot read plan file {}", missing.display())),
        "{message}"
    );
    let binary = run.scratch.path("binary.toml");
    std::fs::write(&binary, b"seed = \xff\n").unwrap();
    let request = json!({"cmd": "load_plan", "path": binary}).to_string();
    assert!(error_of(&raw.ask(request.as_bytes())).contains("not UTF-8"));
    let request = json!({"cmd": "load_plan", "path": run.scratch.dir()}).to_string();
    assert!(error_of(&raw.ask(request.as_bytes())).contains("not a regular file"));
    assert_eq!(run.device.calls(), []);
}

#[test]
fn bad_requests_of_every_class_change_nothing_and_the_connection_survives() {
    let run = start("bad");
    let mut raw = Raw::connect(run.server.path());
    let bad: &[(&[u8], &str)] = &[
        (b"pause", "not valid JSON"),
        (b"{\"cmd\":\"pause\"", "not valid JSON"),
        (b"{\"cmd\":\"pause\"} {\"cmd\":\"pause\"}", "not valid JSON"),
        (b"", "empty request"),
        (b"\"pause\"", "must be a JSON object"),
        (b"{\"cmd\":\"p\xe4use\"}", "not valid UTF-8"),
        (b"{\"command\":\"pause\"}", "no \"cmd\" field"),
        (b"{\"cmd\":\"halt\"}", "unknown cmd \"halt\""),
        (b"{\"cmd\":[\"pause\"]}", "\"cmd\" must be a string"),
        (b"{\"cmd\":\"pause\",\"now\":true}", "unknown field \"now\""),
        (b"{\"cmd\":\"pause\",\"cmd\":\"pause\"}", "duplicate key"),
        (b"{\"cmd\":\"patch_plan\"}", "missing field \"patch\""),
        (
            b"{\"cmd\":\"patch_plan\",\"patch\":\"x\"}",
            "must be a JSON object",
        ),
        (
            b"{\"cmd\":\"load_plan\",\"toml\":1}",
            "\"toml\" must be a string",
        ),
        (
            b"{\"cmd\":\"release\",\"target\":\"fence\",\"fence\":-3}",
            "unsigned 64-bit",
        ),
        (
            b"{\"cmd\":\"release\",\"target\":\"timeline\",\"timeline\":\"a\"}",
            "bad timeline",
        ),
        (
            b"{\"cmd\":\"release\",\"target\":\"all\",\"fence\":1}",
            "unknown field \"fence\"",
        ),
    ];
    for (line, expected) in bad {
        let reply = raw.ask(line);
        let message = error_of(&reply);
        assert!(
            message.contains(expected),
            "{:?}: {message}",
            String::from_utf8_lossy(line)
        );
        // Still usable: a good request on the same connection works.
        assert_eq!(raw.ask(b"{\"cmd\":\"plan\"}")["ok"], true);
    }
    assert!(run.device.calls().iter().all(|c| *c == Call::Plan));
    assert_eq!(run.device.calls().len(), bad.len());
}

#[test]
fn an_oversized_line_gets_an_error_then_the_connection_closes() {
    let run = start("oversized");
    let mut raw = Raw::connect(run.server.path());
    assert_eq!(raw.ask(b"{\"cmd\":\"stats\"}")["ok"], true);
    // One byte over the limit, then a request that must not run.
    let mut line = vec![b' '; MAX_LINE_BYTES + 1];
    line.extend(b"{\"cmd\":\"pause\"}\n");
    // The server stops reading at the limit, so writing the tail may fail.
    let writer = raw.writer.try_clone().unwrap();
    let sender = std::thread::spawn(move || (&writer).write_all(&line).is_ok());
    let reply = raw.reply().expect("an error reply");
    assert!(
        error_of(&reply).contains(&format!("longer than {MAX_LINE_BYTES} bytes")),
        "{reply}"
    );
    assert_eq!(raw.reply(), None, "the connection is closed");
    sender.join().unwrap();
    assert_eq!(run.device.calls(), [Call::Stats]);

    // A line of exactly the limit is fine.
    let mut raw = Raw::connect(run.server.path());
    let request = b"{\"cmd\":\"plan\"}";
    let mut line = vec![b' '; MAX_LINE_BYTES - request.len()];
    line.extend(request);
    assert_eq!(raw.ask(&line)["ok"], true);
}

#[test]
fn a_request_cut_off_by_a_disconnect_never_reaches_the_device() {
    let run = start("cutoff");
    // Half-closed: the client can still read the error.
    let mut raw = Raw::connect(run.server.path());
    raw.send(b"{\"cmd\":\"pause\"}");
    raw.writer.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(error_of(&raw.reply().unwrap()).contains("truncated request"));
    assert_eq!(raw.reply(), None);
    // Gone altogether.
    let mut gone = UnixStream::connect(run.server.path()).unwrap();
    gone.write_all(b"{\"cmd\":\"release\",\"target\":\"al")
        .unwrap();
    drop(gone);
    // A whole request whose sender leaves without reading the reply is
    // carried out whole.
    let mut hasty = UnixStream::connect(run.server.path()).unwrap();
    hasty.write_all(b"{\"cmd\":\"resume\"}\n").unwrap();
    drop(hasty);
    let mut client = Client::connect(run.server.path()).unwrap();
    // Replies are in order per connection, but connections are concurrent:
    // wait (generously) for the hasty request to land.
    for _ in 0..3000 {
        if run.device.calls().contains(&Call::SetPaused(false)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(client.call(&Request::Plan).unwrap().is_ok());
    let calls = run.device.calls();
    assert!(!calls.contains(&Call::SetPaused(true)), "{calls:?}");
    assert!(
        !calls.iter().any(|c| matches!(c, Call::Release(_))),
        "{calls:?}"
    );
    assert!(calls.contains(&Call::SetPaused(false)), "{calls:?}");
}

#[test]
fn the_socket_is_owner_only_and_removed_at_stop() {
    let run = start("mode");
    let path = run.server.path().to_path_buf();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "mode {:o}", meta.mode());
    // SAFETY: geteuid cannot fail.
    assert_eq!(meta.uid(), unsafe { libc::geteuid() });
    // A second server on a live socket is refused and the first keeps working.
    let second = ControlServer::start(&path, run.device.clone());
    let message = format!("{:#}", second.err().unwrap());
    assert!(
        message.contains("another process is listening"),
        "{message}"
    );
    assert!(
        Client::connect(&path)
            .unwrap()
            .call(&Request::Plan)
            .unwrap()
            .is_ok()
    );
    run.server.stop();
    assert!(!path.exists());
    assert!(matches!(
        Client::connect(&path),
        Err(ClientError::Connect { .. })
    ));
}

#[test]
fn many_clients_at_once() {
    let run = start("concurrent");
    const CLIENTS: usize = 12;
    const REQUESTS: usize = 40;
    // An idle connection must not hold anyone up.
    let _idle = UnixStream::connect(run.server.path()).unwrap();
    let path = run.server.path().to_path_buf();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut client = Client::connect(&path).unwrap();
                for n in 0..REQUESTS {
                    let fence = (i * REQUESTS + n) as u64 + 100;
                    let request = Request::Release(ReleaseTarget::Fence { fence });
                    assert_eq!(
                        client.call(&request).unwrap(),
                        Response::ok_with("released", 1.into())
                    );
                    if n % 10 == 0 {
                        assert!(client.send_line("{oops").unwrap()["ok"] == false);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let mut fences: Vec<u64> = run
        .device
        .calls()
        .into_iter()
        .map(|c| match c {
            Call::Release(ReleaseTarget::Fence { fence }) => fence,
            other => panic!("unexpected call {other:?}"),
        })
        .collect();
    fences.sort_unstable();
    let expected: Vec<u64> = (100..100 + (CLIENTS * REQUESTS) as u64).collect();
    assert_eq!(fences, expected);
}

#[test]
fn connections_beyond_the_limit_are_told_and_closed() {
    let run = start("limit");
    // Each connection has been served once, so it holds its slot.
    let mut held: Vec<Raw> = (0..MAX_CONNECTIONS)
        .map(|_| {
            let mut raw = Raw::connect(run.server.path());
            assert_eq!(raw.ask(b"{\"cmd\":\"plan\"}")["ok"], true);
            raw
        })
        .collect();
    let mut extra = Raw::connect(run.server.path());
    let reply = extra.reply().expect("a refusal");
    assert!(
        error_of(&reply).contains("too many control connections"),
        "{reply}"
    );
    assert_eq!(extra.reply(), None);
    // A slot frees when its connection ends.
    drop(held.pop());
    let mut again = None;
    for _ in 0..3000 {
        let mut raw = Raw::connect(run.server.path());
        raw.send(b"{\"cmd\":\"stats\"}\n");
        match raw.reply() {
            Some(reply) if reply["ok"] == true => {
                again = Some(reply);
                break;
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    assert!(again.is_some(), "no slot came free");
}

fn stdout_json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)))
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn ctl_exits_0_on_ok_1_on_refusal_2_when_unreachable() {
    let run = start("ctl");
    let path = run.server.path();

    let ok = ctl(path, &["release", "--timeline", "3"]);
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    assert_eq!(stdout_json(&ok), json!({"ok": true, "released": 2}));
    assert!(
        ok.stdout.starts_with(b"{\"ok\":true,"),
        "the verdict comes first"
    );
    assert_eq!(
        run.device.calls().last(),
        Some(&Call::Release(ReleaseTarget::Timeline {
            timeline: TimelineId { ctx: 3, ring: 0 }
        }))
    );

    let pretty = ctl(path, &["--pretty", "stats"]);
    assert_eq!(pretty.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&pretty.stdout).lines().count() > 3);
    assert_eq!(
        stdout_json(&pretty)["stats"]["timelines"]["3.0"]["submitted"],
        4
    );

    let refused = ctl(path, &["release", "--fence", "13"]);
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(stderr(&refused), "error: fence 13 is not hung\n");
    assert_eq!(stdout_json(&refused)["ok"], false);

    let raw = ctl(path, &["raw", "{\"cmd\":\"pause\",\"x\":1}"]);
    assert_eq!(raw.status.code(), Some(1));
    assert!(
        stderr(&raw).contains("pause: unknown field \"x\""),
        "{}",
        stderr(&raw)
    );
    let raw = ctl(path, &["raw", "{\"cmd\":\"resume\"}"]);
    assert_eq!(raw.status.code(), Some(0));
    assert_eq!(stdout_json(&raw), json!({"ok": true, "paused": false}));

    let calls_before = run.device.calls().len();
    let bad_patch = ctl(path, &["patch-plan", "{not json"]);
    assert_eq!(bad_patch.status.code(), Some(1));
    assert!(stderr(&bad_patch).contains("patch-plan: the patch is not valid JSON"));
    assert_eq!(run.device.calls().len(), calls_before);

    let missing = run.scratch.path("nobody-home");
    let unreachable = ctl(&missing, &["stats"]);
    assert_eq!(unreachable.status.code(), Some(2));
    let message = stderr(&unreachable);
    assert!(
        message.contains(&missing.display().to_string()),
        "{message}"
    );
    assert!(message.contains("may not be running"), "{message}");
    assert!(unreachable.stdout.is_empty());
}

#[test]
fn ctl_sends_load_plan_paths_absolute() {
    let run = start("ctl-path");
    std::fs::write(run.scratch.path("p.toml"), "seed = 3\n").unwrap();
    let output = Command::new(BINARY)
        .current_dir(run.scratch.dir())
        .args(["ctl", "--socket"])
        .arg(run.server.path())
        .args(["load-plan", "p.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        run.device.calls(),
        [Call::LoadPlan {
            source: "seed = 3\n".into(),
            origin: run.scratch.path("p.toml").display().to_string(),
        }]
    );
}

#[test]
fn ctl_release_needs_exactly_one_target() {
    let run = start("ctl-release");
    for args in [&["release"][..], &["release", "--all", "--fence", "1"]] {
        let output = ctl(run.server.path(), args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
    }
    let all = ctl(run.server.path(), &["release", "--all"]);
    assert_eq!(stdout_json(&all)["released"], 5);
    assert_eq!(run.device.calls(), [Call::Release(ReleaseTarget::All)]);
}

/// The first fenced `SUBMIT_3D` of every timeline hangs until released.
const HELD_PLAN: &str = r#"
[default]
latency = "0ms"

[[rule]]
name = "held"
match = { command = "SUBMIT_3D", index = { from = 0, to = 0 } }
hang = "until_released"
"#;

/// The real device behind a vhost-user frontend, with one fence (id 5)
/// hung until released, and its control server.
fn held_device(name: &str) -> (common::Rig, ControlServer, Scratch) {
    let scratch = Scratch::new(name);
    let plan = Plan::parse(HELD_PLAN, "held.toml").unwrap();
    let mut rig = common::Rig::start(name, PlanDecider::new(plan, 3), false);
    let server = ControlServer::start(&scratch.path("ctl"), rig.gpu.clone()).unwrap();
    rig.post_fenced(1, None, 5, &[]);
    rig.kick();
    rig.wait_until("fence 5 is hung", || rig.stats.accounting().hung == 1);
    (rig, server, scratch)
}

#[test]
fn the_real_device_refuses_what_does_not_exist_and_keeps_its_plan() {
    let (mut rig, server, scratch) = held_device("ctl-real");
    let mut raw = Raw::connect(server.path());
    let plan_before = raw.ask(br#"{"cmd":"plan"}"#);
    assert_eq!(plan_before["ok"], true);
    let broken_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("plans/broken/hang-mode.toml");
    let nul_path = format!("{}/x\\u0000y.toml", scratch.dir().display());
    let refused: Vec<(String, &str)> = vec![
        (
            r#"{"cmd":"release","target":"fence","fence":6}"#.into(),
            "fence 6 is not outstanding (never seen, or completed)",
        ),
        (
            format!(
                r#"{{"cmd":"release","target":"fence","fence":{}}}"#,
                u64::MAX
            ),
            "is not outstanding",
        ),
        (
            r#"{"cmd":"release","target":"timeline","timeline":"1.256"}"#.into(),
            "bad timeline",
        ),
        (
            r#"{"cmd":"release","target":"timeline","timeline":"4294967296"}"#.into(),
            "bad timeline",
        ),
        (
            r#"{"cmd":"load_plan","toml":"[default\nlatency = \"1ms\"\n"}"#.into(),
            "<load_plan toml>:1:",
        ),
        (
            r#"{"cmd":"load_plan","toml":"seed = 1\u0000\n"}"#.into(),
            "<load_plan toml>:1:",
        ),
        (
            format!(
                r#"{{"cmd":"load_plan","path":"{}"}}"#,
                broken_file.display()
            ),
            r#"hang: "sometimes" is not one of"#,
        ),
        (
            format!(r#"{{"cmd":"load_plan","path":"{nul_path}"}}"#),
            "cannot read plan file",
        ),
        (
            r#"{"cmd":"patch_plan","patch":{"default":{"latency":"soon"}}}"#.into(),
            "soon",
        ),
        (
            r#"{"cmd":"patch_plan","patch":{"rule":[{"name":"x","hang":"sometimes"}]}}"#.into(),
            r#""sometimes" is not one of"#,
        ),
    ];
    for (line, expected) in &refused {
        let reply = raw.ask(line.as_bytes());
        let message = error_of(&reply);
        assert!(message.contains(expected), "{line}: {message}");
        // Nothing changed: the same plan, the fence still hung, nothing
        // returned to the guest.
        assert_eq!(raw.ask(br#"{"cmd":"plan"}"#), plan_before, "{line}");
        assert_eq!(rig.stats.accounting().hung, 1, "{line}");
        assert_eq!(rig.unseen_used(), 0, "{line}");
    }
    // No plan change reached the trace.
    assert!(
        !rig.trace
            .events()
            .iter()
            .any(|e| matches!(e, TraceEvent::PlanLoaded { .. })),
    );
    // A timeline the device never saw has nothing to release (documented:
    // not an error), and releasing it releases nothing.
    assert_eq!(
        raw.ask(br#"{"cmd":"release","target":"timeline","timeline":"77.3"}"#),
        json!({"ok": true, "released": 0})
    );
    assert_eq!(rig.stats.accounting().hung, 1);
    // The fence that does exist is released and comes back.
    assert_eq!(
        raw.ask(br#"{"cmd":"release","target":"fence","fence":5}"#),
        json!({"ok": true, "released": 1})
    );
    assert_eq!(rig.wait_fences(1), [5]);
    server.stop();
    rig.finish();
}

#[test]
fn nul_bytes_are_refused_wherever_they_are() {
    let run = start("nul");
    let mut raw = Raw::connect(run.server.path());
    let bad: &[(&[u8], &str)] = &[
        (b"\0", "not valid JSON"),
        (b"\0{\"cmd\":\"pause\"}", "not valid JSON"),
        (b"{\"cmd\":\"pause\"}\0", "not valid JSON"),
        (b"{\"cmd\":\"pa\0use\"}", "not valid JSON"),
        (b"{\"cmd\":\"pause\\u0000\"}", "unknown cmd"),
        (b"{\"cmd\":\"pause\",\"\\u0000\":1}", "unknown field"),
    ];
    for (line, expected) in bad {
        let message = error_of(&raw.ask(line)).to_string();
        assert!(message.contains(expected), "{line:?}: {message}");
    }
    // The connection is still in step: the next reply is this request's.
    assert_eq!(raw.ask(b"{\"cmd\":\"pause\"}")["paused"], true);
    assert_eq!(run.device.calls(), [Call::SetPaused(true)]);
}

#[test]
fn ten_mib_without_a_newline_is_cut_off_at_the_limit_while_others_are_served() {
    let run = start("flood");
    let mut raw = Raw::connect(run.server.path());
    let flood = vec![b'{'; 10 << 20];
    let writer = raw.writer.try_clone().unwrap();
    // The server stops reading at the limit: the rest may never be taken.
    let sender = std::thread::spawn(move || (&writer).write_all(&flood).is_ok());
    // Another client is served meanwhile.
    let mut other = Client::connect(run.server.path()).unwrap();
    assert!(other.call(&Request::Stats).unwrap().is_ok());
    let reply = raw.reply().expect("an error reply");
    assert!(
        error_of(&reply).contains(&format!("longer than {MAX_LINE_BYTES} bytes")),
        "{reply}"
    );
    // Closed with the flood unread, so the end may come as a reset.
    let mut rest = String::new();
    match raw.reader.read_line(&mut rest) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the connection is still open: {other:?} {rest:?}"),
    }
    assert!(
        !sender.join().unwrap(),
        "the server took all 10 MiB instead of closing at the limit"
    );
    assert!(other.call(&Request::Plan).unwrap().is_ok());
    assert_eq!(run.device.calls(), [Call::Stats, Call::Plan]);
}

#[test]
fn a_client_stalled_mid_request_holds_up_no_one() {
    let run = start("stalled");
    let mut stalled = Raw::connect(run.server.path());
    stalled.send(b"{\"cmd\":\"release\",\"target\":\"fe");
    let mut client = Client::connect(run.server.path()).unwrap();
    for fence in 100..120 {
        let request = Request::Release(ReleaseTarget::Fence { fence });
        assert_eq!(
            client.call(&request).unwrap(),
            Response::ok_with("released", 1.into())
        );
    }
    // Its half line was kept apart from the other connection's requests:
    // finished, it is carried out as written.
    stalled.send(b"nce\",\"fence\":77}\n");
    assert_eq!(stalled.reply().unwrap()["released"], 1);
    let calls = run.device.calls();
    assert_eq!(calls.len(), 21);
    assert_eq!(
        calls.last(),
        Some(&Call::Release(ReleaseTarget::Fence { fence: 77 }))
    );
}

#[test]
fn the_control_socket_is_0600_even_under_umask_000() {
    use std::os::unix::process::CommandExt as _;
    let scratch = Scratch::new("umask");
    let control = scratch.path("gpu.sock.ctl");
    let mut command = Command::new(BINARY);
    command
        .arg("--socket")
        .arg(scratch.path("gpu.sock"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: umask(2) is async-signal-safe and cannot fail.
    unsafe {
        command.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !control.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the device exited");
        assert!(std::time::Instant::now() < deadline, "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let meta = std::fs::symlink_metadata(&control).unwrap();
    let vhost_mode = std::fs::symlink_metadata(scratch.path("gpu.sock"))
        .map(|m| format!("{:o}", m.mode() & 0o777))
        .unwrap_or_else(|e| e.to_string());
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "mode {:o}", meta.mode());
    // SAFETY: geteuid cannot fail.
    assert_eq!(meta.uid(), unsafe { libc::geteuid() });
    eprintln!("under umask 000: vhost-user socket mode {vhost_mode}");
}
