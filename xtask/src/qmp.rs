//! A small client of QEMU's machine protocol (QMP): JSON lines over a unix
//! socket. Connect (QEMU greets, the client sends `qmp_capabilities`), then
//! execute commands one at a time; asynchronous events that arrive in
//! between (`RESET`, `SHUTDOWN`…) are kept for the caller.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A QMP session in command mode.
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, waiting up to `timeout` for it
    /// to appear (QEMU creates it as it starts), and enters command mode.
    /// Each later reply must come within `timeout` too.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("connecting to QMP at {} for {timeout:?}", path.display())
                    });
                }
            }
        };
        stream
            .set_read_timeout(Some(timeout))
            .context("setting the QMP read timeout")?;
        let writer = stream.try_clone().context("cloning the QMP socket")?;
        let mut qmp = Self {
            path: path.to_owned(),
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            bail!(
                "QMP at {} did not greet with {{\"QMP\": …}}: {greeting}",
                path.display()
            );
        }
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    /// Runs `command` (no arguments) and returns its `return` value.
    pub fn execute(&mut self, command: &str) -> Result<Value> {
        let request = json!({ "execute": command }).to_string();
        writeln!(self.writer, "{request}")
            .with_context(|| format!("sending {command} to QMP at {}", self.path.display()))?;
        loop {
            let message = self
                .read_message()
                .with_context(|| format!("waiting for the reply to {command}"))?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                bail!(
                    "QMP {command} failed: {}: {}",
                    error["class"].as_str().unwrap_or("?"),
                    error["desc"].as_str().unwrap_or("?")
                );
            }
            if message.get("event").is_some() {
                self.events.push(message);
                continue;
            }
            bail!("QMP {command}: unexpected message {message}");
        }
    }

    /// The events (`{"event": NAME, …}`) received so far, in order.
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .with_context(|| format!("reading from QMP at {}", self.path.display()))?;
        if n == 0 {
            bail!("QMP at {} closed the connection", self.path.display());
        }
        serde_json::from_str(line.trim())
            .with_context(|| format!("QMP at {} sent non-JSON: {line:?}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread;

    /// A fake QEMU: greets, then answers each request line with the next
    /// scripted reply lines (several per request: events before the reply).
    fn fake_qemu(
        name: &str,
        replies: Vec<Vec<&'static str>>,
    ) -> (PathBuf, thread::JoinHandle<Vec<String>>) {
        let path =
            std::env::temp_dir().join(format!("fencelab-qmp-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let server = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut out = stream.try_clone().unwrap();
            writeln!(out, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut requests = Vec::new();
            let mut reader = BufReader::new(stream);
            for lines in replies {
                let mut request = String::new();
                if reader.read_line(&mut request).unwrap() == 0 {
                    break;
                }
                requests.push(request.trim().to_owned());
                for line in lines {
                    writeln!(out, "{line}").unwrap();
                }
            }
            requests
        });
        (path, server)
    }

    #[test]
    fn negotiates_then_executes_keeping_events() {
        let (path, server) = fake_qemu(
            "ok",
            vec![
                vec![r#"{"return": {}}"#],
                vec![
                    r#"{"event": "RESET", "data": {"guest": false}}"#,
                    r#"{"return": {}}"#,
                ],
                vec![r#"{"return": {"status": "running", "running": true}}"#],
            ],
        );
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(qmp.execute("system_reset").unwrap(), json!({}));
        let status = qmp.execute("query-status").unwrap();
        assert_eq!(status["status"], "running");
        assert_eq!(qmp.events().len(), 1);
        assert_eq!(qmp.events()[0]["event"], "RESET");
        drop(qmp);
        let requests = server.join().unwrap();
        assert_eq!(
            requests,
            [
                r#"{"execute":"qmp_capabilities"}"#,
                r#"{"execute":"system_reset"}"#,
                r#"{"execute":"query-status"}"#
            ]
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn errors_name_the_command_and_qemu_s_reason() {
        let (path, server) = fake_qemu(
            "error",
            vec![
                vec![r#"{"return": {}}"#],
                vec![
                    r#"{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
                ],
            ],
        );
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let err = qmp.execute("nope").unwrap_err().to_string();
        assert_eq!(
            err,
            "QMP nope failed: CommandNotFound: The command nope has not been found"
        );
        drop(qmp);
        server.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_closed_connection_and_a_missing_socket_are_errors() {
        // QEMU quits after the greeting and capabilities.
        let (path, server) = fake_qemu("closed", vec![vec![r#"{"return": {}}"#]]);
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        server.join().unwrap();
        // Either the request or the reply meets the closed socket.
        let err = format!("{:#}", qmp.execute("system_reset").unwrap_err());
        assert!(err.contains("system_reset"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        let _ = std::fs::remove_file(&path);

        let missing = std::env::temp_dir().join("fencelab-qmp-missing.sock");
        let err = format!(
            "{:#}",
            Qmp::connect(&missing, Duration::from_millis(100))
                .err()
                .unwrap()
        );
        assert!(err.contains("connecting to QMP at"), "{err}");
    }
}
