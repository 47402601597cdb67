//! A blocking control-plane client (what `fencelab-device ctl` uses).

use std::io::{self, BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::protocol::{Request, Response};

/// How long the client waits for a reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Failures to talk to the device (as opposed to the device refusing a
/// request, which is an `{"ok":false}` reply).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to control socket {}: {source}{}", path.display(), connect_hint(source))]
    Connect { path: PathBuf, source: io::Error },
    #[error("lost the connection to control socket {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("no reply from control socket {} within {}s", path.display(), REPLY_TIMEOUT.as_secs())]
    Timeout { path: PathBuf },
    #[error("control socket {} closed the connection without replying", path.display())]
    Closed { path: PathBuf },
    #[error("control socket {} sent something that is not a reply: {message}", path.display())]
    BadReply { path: PathBuf, message: String },
    #[error("a request must be one line; this one contains a newline")]
    MultiLine,
}

fn connect_hint(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::NotFound => " (no such socket: the device may not be running; its control \
             socket is <vhost socket>.ctl unless it was started with --control-socket)"
            .into(),
        io::ErrorKind::ConnectionRefused => {
            " (nobody is listening: the device that created it is no longer running)".into()
        }
        io::ErrorKind::PermissionDenied => {
            " (the socket is owner-only: run as the user that runs the device)".into()
        }
        _ => String::new(),
    }
}

/// One connection to a device's control socket.
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let connect_error = |source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect_error)?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(connect_error)?;
        let writer = stream.try_clone().map_err(connect_error)?;
        Ok(Client {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends a request and returns the reply.
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        let reply = self.send_line(&request.to_json().to_string())?;
        Response::from_json(reply).map_err(|message| ClientError::BadReply {
            path: self.path.clone(),
            message,
        })
    }

    /// Sends one line as it is (a newline is added) and returns the reply's
    /// JSON, whatever it says.
    pub fn send_line(&mut self, line: &str) -> Result<Value, ClientError> {
        let reply = self.exchange(line)?;
        serde_json::from_str(&reply).map_err(|e| ClientError::BadReply {
            path: self.path.clone(),
            message: format!("{e}"),
        })
    }

    /// Sends one line as it is (a newline is added) and returns the reply
    /// line as the device wrote it, without its newline.
    pub fn exchange(&mut self, line: &str) -> Result<String, ClientError> {
        if line.contains('\n') {
            return Err(ClientError::MultiLine);
        }
        let io_error = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let mut message = Vec::with_capacity(line.len() + 1);
        message.extend_from_slice(line.as_bytes());
        message.push(b'\n');
        // A server that refuses an oversized line closes without reading
        // the rest; its reply may still be waiting, so read before failing.
        let sent = self
            .writer
            .write_all(&message)
            .and_then(|()| self.writer.flush());
        let mut reply = String::new();
        match self.reader.read_line(&mut reply) {
            Ok(0) => {
                return Err(match sent {
                    Err(source) => io_error(source),
                    Ok(()) => ClientError::Closed {
                        path: self.path.clone(),
                    },
                });
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ClientError::Timeout {
                    path: self.path.clone(),
                });
            }
            Err(e) => return Err(io_error(e)),
        }
        if !reply.ends_with('\n') {
            return Err(ClientError::BadReply {
                path: self.path.clone(),
                message: "the reply was cut off".into(),
            });
        }
        reply.pop();
        Ok(reply)
    }
}
