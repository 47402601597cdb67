//! The real `fencelab-device` binary, end to end without QEMU: startup
//! checks, the control socket of a running device driven with `ctl`, the
//! seed, the trace's start event, and the summary at exit.

mod common;

use std::fs::File;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::assert_summary_keys;
use common::process::{BINARY, Scratch, ctl};
use serde_json::{Value, json};

fn plans() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("plans")
}

/// A running device; killed if the test ends early.
struct Device {
    child: Option<Child>,
    socket: PathBuf,
    control: PathBuf,
    stderr: PathBuf,
}

impl Device {
    /// Starts the device on `dir/gpu.sock` with `args` and waits (up to a
    /// generous 60 s) for its sockets.
    fn start(dir: &Scratch, args: &[&str]) -> Device {
        let socket = dir.path("gpu.sock");
        let stderr = dir.path("stderr");
        let child = Command::new(BINARY)
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut device = Device {
            child: Some(child),
            control: dir.path("gpu.sock.ctl"),
            socket,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !device.socket.exists() {
            if let Some(status) = device.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("device exited with {status}: {}", device.stderr_text());
            }
            assert!(
                Instant::now() < deadline,
                "device did not start: {}",
                device.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        device
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn ctl(&self, args: &[&str]) -> Output {
        ctl(&self.control, args)
    }

    /// `ctl` that must succeed; its reply.
    fn ask(&self, args: &[&str]) -> Value {
        let output = self.ctl(args);
        assert_eq!(
            output.status.code(),
            Some(0),
            "ctl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// SIGTERM, then the exit status and everything on stderr.
    fn terminate(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        // SAFETY: kill(2) on our own child's pid, which has not been reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = child.wait().unwrap();
        (status, self.stderr_text())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The JSON of the `fencelab-device: summary {json}` line.
fn summary_of(stderr: &str) -> Value {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("fencelab-device: summary "))
        .unwrap_or_else(|| panic!("no summary line in: {stderr}"));
    serde_json::from_str(line).unwrap()
}

fn run_to_exit(args: &[&str]) -> Output {
    Command::new(BINARY).args(args).output().unwrap()
}

#[test]
fn a_running_device_is_driven_over_its_control_socket() {
    let dir = Scratch::new("driven");
    let plan = plans().join("hang.toml");
    let trace = dir.path("trace.jsonl");
    let device = Device::start(
        &dir,
        &[
            "--plan",
            plan.to_str().unwrap(),
            "--trace",
            trace.to_str().unwrap(),
        ],
    );
    let meta = std::fs::symlink_metadata(&device.control).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);

    let plan_reply = device.ask(&["plan"]);
    assert_eq!(plan_reply["plan"]["seed"], 5, "{plan_reply}");
    assert_eq!(plan_reply["plan"]["rule"][0]["name"], "stall");
    let file_sha = sha256sum(&std::fs::read(&plan).unwrap());
    assert_eq!(plan_reply["plan_sha256"], file_sha, "{plan_reply}");

    assert_eq!(device.ask(&["pause"]), json!({"ok": true, "paused": true}));
    let stats = device.ask(&["stats"]);
    assert_eq!(stats["stats"]["paused"], true, "{stats}");
    assert_eq!(stats["stats"]["seed"], 5);
    let accounting = device.ask(&["accounting"]);
    assert_eq!(accounting["accounting"]["submitted"], 0);

    // A broken plan is refused with its file and line; the plan stays.
    let broken = plans().join("broken/syntax.toml");
    let refused = device.ctl(&["load-plan", broken.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains(&format!("{}:3:", broken.display())),
        "{message}"
    );
    assert_eq!(device.ask(&["plan"]), plan_reply);

    let patched = device.ask(&["patch-plan", r#"{"default":{"latency":"1ms"}}"#]);
    assert_eq!(patched["plan"]["default"]["latency"], "1ms");
    assert_ne!(patched["plan_sha256"], file_sha);
    assert_eq!(device.ask(&["plan"])["plan_sha256"], patched["plan_sha256"]);
    assert_eq!(device.ask(&["release", "--all"])["released"], 0);
    assert_eq!(device.ask(&["flush-trace"]), json!({"ok": true}));

    let (status, stderr) = device.terminate();
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("fencelab-device: seed 5\n"), "{stderr}");
    let summary = summary_of(&stderr);
    assert_summary_keys(&summary);
    assert_eq!(summary["seed"], 5);
    assert!(
        !dir.path("gpu.sock.ctl").exists(),
        "control socket left behind"
    );
    assert!(
        !dir.path("gpu.sock").exists(),
        "vhost-user socket left behind"
    );

    let events = read_events(&trace);
    assert_eq!(events[0]["event"], "start");
    assert_eq!(events[0]["seed"], 5);
    assert_eq!(events[0]["plan"], plan.display().to_string());
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert!(kinds.contains(&"paused"), "{kinds:?}");
    // One hash per plan everywhere: `start`, `ctl plan`, `plan_loaded`.
    assert_eq!(events[0]["plan_sha256"], file_sha);
    let loaded: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "plan_loaded")
        .collect();
    assert_eq!(loaded.len(), 1, "{loaded:?}");
    assert_eq!(loaded[0]["origin"], "patch");
    assert_eq!(loaded[0]["plan_sha256"], patched["plan_sha256"]);
}

#[test]
fn a_broken_plan_stops_the_device_before_it_starts() {
    let dir = Scratch::new("broken");
    let socket = dir.path("gpu.sock");
    let broken = plans().join("broken/unknown-key.toml");
    let output = run_to_exit(&[
        "--socket",
        socket.to_str().unwrap(),
        "--plan",
        broken.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let located = stderr
        .lines()
        .find(|l| l.starts_with("fencelab-device: error: "))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        located.contains(&format!("{}:", broken.display())),
        "{located}"
    );
    // file:LINE:COLUMN
    let after = &located[located.find(".toml:").unwrap() + 6..];
    assert!(after.starts_with(|c: char| c.is_ascii_digit()), "{located}");
    assert!(!stderr.contains("fencelab-device: seed"), "{stderr}");
    assert!(!socket.exists() && !dir.path("gpu.sock.ctl").exists());

    let missing = run_to_exit(&[
        "--socket",
        socket.to_str().unwrap(),
        "--plan",
        "/nonexistent.toml",
    ]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent.toml"));
}

#[test]
fn contradictory_arguments_are_refused_before_anything_starts() {
    let dir = Scratch::new("both");
    let plan = plans().join("hang.toml");
    let output = run_to_exit(&[
        "--socket",
        dir.path("gpu.sock").to_str().unwrap(),
        "--plan",
        plan.to_str().unwrap(),
        "--latency",
        "1ms",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--latency and --plan cannot be combined"),
        "{stderr}"
    );
    assert!(stderr.contains("[default]"), "{stderr}");

    let same = dir.path("same.sock");
    let output = run_to_exit(&[
        "--socket",
        same.to_str().unwrap(),
        "--control-socket",
        same.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--control-socket must differ from --socket"),
        "{stderr}"
    );
    assert!(!same.exists());
}

#[test]
fn seed_and_latency_from_the_command_line_and_a_live_control_socket_is_kept() {
    let dir = Scratch::new("seed");
    let control = dir.path("my.ctl");
    let mut device = Device::start(
        &dir,
        &[
            "--latency",
            "1ms",
            "--seed",
            "42",
            "--control-socket",
            control.to_str().unwrap(),
        ],
    );
    device.control = control;
    assert_eq!(device.ask(&["plan"])["plan"]["default"]["latency"], "1ms");
    assert_eq!(device.ask(&["stats"])["stats"]["seed"], 42);

    // A second device on the same control socket is refused and leaves the
    // first one's socket alone.
    let second = run_to_exit(&[
        "--socket",
        dir.path("other.sock").to_str().unwrap(),
        "--control-socket",
        device.control.to_str().unwrap(),
    ]);
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("another process is listening"), "{stderr}");
    assert!(!dir.path("other.sock").exists());
    assert_eq!(device.ask(&["resume"])["paused"], false);

    let (status, stderr) = device.terminate();
    assert!(status.success());
    assert!(stderr.contains("fencelab-device: seed 42\n"), "{stderr}");
    assert_eq!(summary_of(&stderr)["seed"], 42);
}

/// Lowercase hex SHA-256, as `sha256sum` prints it.
fn sha256sum(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The events of the trace at `path`.
fn read_events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_replay_takes_the_seed_and_plan_of_its_trace() {
    let dir = Scratch::new("replay");
    let plan = plans().join("hang.toml");
    let trace = dir.path("first.jsonl");
    let first = Device::start(
        &dir,
        &[
            "--plan",
            plan.to_str().unwrap(),
            "--seed",
            "77",
            "--trace",
            trace.to_str().unwrap(),
        ],
    );
    let (status, _) = first.terminate();
    assert!(status.success());

    let replay = Device::start(&dir, &["--replay", trace.to_str().unwrap()]);
    assert_eq!(replay.ask(&["plan"])["plan"]["rule"][0]["name"], "stall");
    let (status, stderr) = replay.terminate();
    assert!(status.success());
    assert!(stderr.contains("fencelab-device: seed 77\n"), "{stderr}");
    let replaying = format!("fencelab-device: replaying {} (seed 77);", trace.display());
    assert!(
        stderr.contains(&format!("{replaying} fallback seed 77\n")),
        "without --seed or --plan the fallback keeps the trace's seed: {stderr}"
    );
}

/// One seed for a replay everywhere it shows (printed line, `Start`,
/// `stats`, summary): the trace's. `--seed` or the `--plan`'s seed seed
/// only the fallback for fences beyond the trace, printed on its own.
#[test]
fn a_replay_shows_the_traces_seed_everywhere_and_seed_only_seeds_the_fallback() {
    let dir = Scratch::new("replay-seed");
    let plan = plans().join("hang.toml"); // seed = 5
    let recorded = dir.path("recorded.jsonl");
    let first = Device::start(
        &dir,
        &[
            "--latency",
            "1ms",
            "--seed",
            "77",
            "--trace",
            recorded.to_str().unwrap(),
        ],
    );
    assert!(first.terminate().0.success());

    for (args, fallback) in [
        (vec!["--seed", "9"], 9),
        (vec!["--plan", plan.to_str().unwrap()], 5),
    ] {
        let again = dir.path("again.jsonl");
        let mut all = vec![
            "--replay",
            recorded.to_str().unwrap(),
            "--trace",
            again.to_str().unwrap(),
        ];
        all.extend(&args);
        let replay = Device::start(&dir, &all);
        assert_eq!(replay.ask(&["stats"])["stats"]["seed"], 77, "{args:?}");
        let (status, stderr) = replay.terminate();
        assert!(status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains("fencelab-device: seed 77\n"), "{stderr}");
        let line = format!(
            "fencelab-device: replaying {} (seed 77); fallback seed {fallback}\n",
            recorded.display()
        );
        assert!(stderr.contains(&line), "{args:?}: {stderr}");
        assert_eq!(summary_of(&stderr)["seed"], 77, "{args:?}");
        let start = &read_events(&again)[0];
        assert_eq!(start["event"], "start");
        assert_eq!(start["seed"], 77, "{args:?}: {start}");
        assert_eq!(start["replay"], recorded.display().to_string());
    }
}
