//! The fencelab-device of a lifecycle check: started in a socket folder of
//! its own (or in the folder of the device it replaces), asked for its live
//! statistics over the control socket.

use super::Prepared;
use crate::boot::{self, DeviceSpec, Faults, SocketDir};
use crate::report::DEVICE_SUMMARY_MARKER;
use crate::supervise::Supervised;
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A fencelab-device in a socket folder of its own.
pub struct Backend {
    pub sockets: SocketDir,
    pub process: Supervised,
    /// Its log (stdout and stderr: the summary line is there).
    pub log: PathBuf,
}

impl Backend {
    pub fn gpu_socket(&self) -> PathBuf {
        self.sockets.path().join("gpu.sock")
    }

    fn control_socket(&self) -> PathBuf {
        self.sockets.path().join("ctl.sock")
    }

    /// Starts the device with `latency`, logging to `log`, in `sockets`
    /// (a fresh folder, or the one of a device it replaces); with
    /// `reconnect`, it serves one QEMU after another (`--reconnect`).
    pub fn start(
        prepared: &Prepared,
        sockets: SocketDir,
        latency: &str,
        log: &Path,
        reconnect: bool,
    ) -> Result<Self> {
        let socket = sockets.path().join("gpu.sock");
        let control = sockets.path().join("ctl.sock");
        let trace = log.with_extension("trace.jsonl");
        let spec = DeviceSpec {
            binary: &prepared.device_bin,
            socket: &socket,
            control_socket: &control,
            faults: Faults::Latency(latency),
            seed: Some(1),
            trace: &trace,
            log,
        };
        let mut process = if reconnect {
            let mut command = Command::new(spec.binary);
            command.args(spec.args()).arg("--reconnect");
            boot::log_to(&mut command, log)?;
            Supervised::spawn("fencelab-device", command)?
        } else {
            boot::start_device(&spec)?
        };
        // The device removes a dead one's socket and binds its own: wait
        // until something accepts on it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&control).is_err() {
            if let Some(status) = process.try_status()? {
                bail!(
                    "fencelab-device exited before listening ({status}):\n{}",
                    boot::device_log_tail(log)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "fencelab-device did not listen on {} within 10 s",
                    control.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            sockets,
            process,
            log: log.to_owned(),
        })
    }

    /// The summary the device printed when it exited, all its keys.
    pub fn summary(&self) -> Option<Value> {
        let text = std::fs::read_to_string(&self.log).ok()?;
        let line = text
            .lines()
            .rev()
            .find_map(|l| l.split_once(DEVICE_SUMMARY_MARKER))?;
        serde_json::from_str(line.1.trim()).ok()
    }

    /// The device's live statistics (`{"cmd":"stats"}` on the control socket).
    pub fn stats(&self) -> Result<Value> {
        let path = self.control_socket();
        let mut stream = UnixStream::connect(&path)
            .with_context(|| format!("connecting to {}", path.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        writeln!(stream, r#"{{"cmd":"stats"}}"#)?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        let reply: Value = serde_json::from_str(&line)
            .with_context(|| format!("control socket reply {line:?}"))?;
        Ok(reply["stats"].clone())
    }

    /// Fences the device has taken so far (0 when it cannot be asked).
    pub fn submitted(&self) -> u64 {
        self.stats()
            .ok()
            .and_then(|s| s["accounting"]["submitted"].as_u64())
            .unwrap_or(0)
    }

    /// Fences the device holds right now (0 when it cannot be asked).
    pub fn outstanding(&self) -> u64 {
        self.stats()
            .ok()
            .and_then(|s| s["fences_outstanding"].as_u64())
            .unwrap_or(0)
    }
}
