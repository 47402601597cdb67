//! The control server: a current-thread tokio runtime on its own OS thread
//! (the rest of the device is not async), one task per connection.
//!
//! Framing: one request per line, one reply per line, in order. A line
//! longer than [`MAX_LINE_BYTES`] gets an error reply and the connection is
//! closed (the rest of the line cannot be told from a next request); a line
//! cut off by end of input gets an error reply and is not carried out; so
//! does a line whose rest has not come [`REQUEST_STALL`] after its first
//! byte, and that connection is closed (a client stalled mid-line would
//! otherwise hold one of the [`MAX_CONNECTIONS`] slots for ever). A client
//! idle *between* requests keeps its connection. Every other bad line gets
//! an error reply and the connection carries on.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{
    AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader,
};
use tokio::net::UnixListener;
use tokio::sync::{Semaphore, oneshot};
use tracing::{debug, info, warn};

use super::dispatch::handle_line;
use super::protocol::{MAX_LINE_BYTES, Response};
use super::socket::{BoundSocket, bind_private};
use crate::fault::DeviceControl;

/// Connections served at once; more are told so and closed.
pub const MAX_CONNECTIONS: usize = 64;

/// How long the rest of a request line may take once its first byte has
/// come. Generous: `fencelab-ctl` and scripts write a line at once.
pub const REQUEST_STALL: Duration = Duration::from_secs(10);

/// How long stopping waits for device calls already under way.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// A running control server. Dropping it stops it and removes its socket.
pub struct ControlServer {
    socket: Arc<BoundSocket>,
    path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Binds `path` (mode 0600; a live socket there is refused, a stale one
    /// replaced) and serves it on a new thread, talking to `device`.
    pub fn start(path: &Path, device: Arc<dyn DeviceControl>) -> anyhow::Result<ControlServer> {
        let socket = Arc::new(bind_private(path)?);
        let started = Self::spawn(socket.clone(), device);
        if started.is_err() {
            socket.remove_file();
        }
        let (stop, thread) = started?;
        info!(path = %path.display(), "control socket listening");
        Ok(ControlServer {
            socket,
            path: path.to_path_buf(),
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn spawn(
        socket: Arc<BoundSocket>,
        device: Arc<dyn DeviceControl>,
    ) -> anyhow::Result<(oneshot::Sender<()>, JoinHandle<()>)> {
        let listener = socket
            .listener
            .try_clone()
            .context("cannot duplicate the control socket")?;
        listener
            .set_nonblocking(true)
            .context("cannot make the control socket non-blocking")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("control-blocking")
            .build()
            .context("cannot build the control plane's runtime")?;
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match UnixListener::from_std(listener) {
                        Ok(listener) => accept_loop(listener, device, stopped).await,
                        Err(e) => warn!("control socket unusable: {e}"),
                    }
                });
                runtime.shutdown_timeout(STOP_GRACE);
            })
            .context("cannot start the control thread")?;
        Ok((stop, thread))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file (if still this server's) so no new client can
    /// connect; for a process about to exit without running destructors.
    pub fn remove_socket(&self) {
        self.socket.remove_file();
    }

    /// Stops serving (open connections are dropped), waits for the thread
    /// and removes the socket file.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                warn!("the control thread panicked");
            }
            self.socket.remove_file();
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

async fn accept_loop(
    listener: UnixListener,
    device: Arc<dyn DeviceControl>,
    mut stopped: oneshot::Receiver<()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let next_id = AtomicU64::new(1);
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Typically out of file descriptors: back off instead of spinning.
                warn!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let device = device.clone();
                tokio::spawn(async move {
                    debug!(connection = id, "control client connected");
                    if let Err(e) = serve_connection(stream, device).await {
                        debug!(connection = id, "control connection ended: {e}");
                    }
                    drop(slot);
                });
            }
            Err(_) => {
                tokio::spawn(refuse(stream));
            }
        }
    }
    debug!("control server stopping");
}

async fn refuse(mut stream: tokio::net::UnixStream) {
    let reply = Response::Err(format!(
        "too many control connections (at most {MAX_CONNECTIONS}); try again later"
    ));
    let _ = stream.write_all(reply.to_line().as_bytes()).await;
}

/// What reading one request line found.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    /// A whole line, now in the buffer without its newline.
    Line,
    /// End of input between requests.
    End,
    /// End of input in the middle of a line.
    Truncated,
    /// More than the line limit without a newline.
    TooLong,
    /// A line begun, then no newline within the stall limit.
    Stalled,
}

/// What a connection may send: the longest line and how long the rest of a
/// line may take once it has begun.
#[derive(Debug, Clone, Copy)]
struct Limits {
    line_bytes: usize,
    stall: Duration,
}

async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    buf: &mut Vec<u8>,
    limits: Limits,
) -> io::Result<Frame> {
    buf.clear();
    // Between requests a client may stay silent as long as it likes.
    if reader.fill_buf().await?.is_empty() {
        return Ok(Frame::End);
    }
    let limit = limits.line_bytes;
    let max = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    let read = tokio::time::timeout(limits.stall, reader.take(max).read_until(b'\n', buf)).await;
    let Ok(n) = read else {
        return Ok(Frame::Stalled);
    };
    let n = n?;
    Ok(if n == 0 {
        Frame::End
    } else if buf.last() == Some(&b'\n') {
        buf.pop();
        Frame::Line
    } else if buf.len() > limit {
        Frame::TooLong
    } else {
        Frame::Truncated
    })
}

/// Serves requests on one connection until it ends.
pub async fn serve_connection<S: AsyncRead + AsyncWrite>(
    stream: S,
    device: Arc<dyn DeviceControl>,
) -> io::Result<()> {
    let limits = Limits {
        line_bytes: MAX_LINE_BYTES,
        stall: REQUEST_STALL,
    };
    serve_with_limits(stream, device, limits).await
}

async fn serve_with_limits<S: AsyncRead + AsyncWrite>(
    stream: S,
    device: Arc<dyn DeviceControl>,
    limits: Limits,
) -> io::Result<()> {
    let (reader, mut writer) = tokio::io::split(stream);
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        let frame = read_frame(&mut reader, &mut line, limits).await?;
        let (reply, more) = match frame {
            Frame::End => return Ok(()),
            Frame::Line => (handle_line(&line, &device).await, true),
            Frame::Truncated => (
                Response::Err(format!(
                    "truncated request: input ended after {} bytes without a newline; nothing was done",
                    line.len()
                )),
                false,
            ),
            Frame::TooLong => (
                Response::Err(format!(
                    "request line longer than {} bytes; nothing was done and the connection is closed",
                    limits.line_bytes
                )),
                false,
            ),
            Frame::Stalled => (
                Response::Err(format!(
                    "request stalled: {} bytes came, then no newline for {} ms; nothing was done and the connection is closed",
                    line.len(),
                    limits.stall.as_millis()
                )),
                false,
            ),
        };
        writer.write_all(reply.to_line().as_bytes()).await?;
        writer.flush().await?;
        if !more {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::{Accounting, PlanView, ReleaseTarget};
    use std::sync::Mutex;

    fn empty_plan() -> PlanView {
        PlanView {
            plan: serde_json::json!({}),
            sha256: String::new(),
        }
    }

    /// Counts calls; everything succeeds.
    #[derive(Default)]
    struct Counting(Mutex<Vec<String>>);

    impl DeviceControl for Counting {
        fn load_plan(&self, _: &str, origin: &str) -> Result<PlanView, String> {
            self.0.lock().unwrap().push(format!("load_plan {origin}"));
            Ok(empty_plan())
        }
        fn patch_plan(&self, _: &serde_json::Value) -> Result<PlanView, String> {
            self.0.lock().unwrap().push("patch_plan".into());
            Ok(empty_plan())
        }
        fn plan(&self) -> PlanView {
            self.0.lock().unwrap().push("plan".into());
            empty_plan()
        }
        fn release(&self, _: ReleaseTarget) -> Result<u64, String> {
            self.0.lock().unwrap().push("release".into());
            Ok(0)
        }
        fn set_paused(&self, paused: bool) {
            self.0.lock().unwrap().push(format!("paused {paused}"));
        }
        fn stats(&self) -> serde_json::Value {
            self.0.lock().unwrap().push("stats".into());
            serde_json::json!({})
        }
        fn accounting(&self) -> Accounting {
            self.0.lock().unwrap().push("accounting".into());
            Accounting::default()
        }
        fn flush_trace(&self) -> Result<(), String> {
            self.0.lock().unwrap().push("flush_trace".into());
            Ok(())
        }
    }

    /// Sends `input` (then end of input) on an in-memory connection with a
    /// `limit`-byte line limit; returns the replies and the device's calls.
    async fn converse(input: &[u8], limit: usize) -> (Vec<serde_json::Value>, Vec<String>) {
        let device = Arc::new(Counting::default());
        let (client, server) = tokio::io::duplex(64);
        let limits = Limits {
            line_bytes: limit,
            stall: REQUEST_STALL,
        };
        let served = tokio::spawn(serve_with_limits(server, device.clone(), limits));
        let (read, mut write) = tokio::io::split(client);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            // The server may close early (oversized line): ignore the error.
            let _ = write.write_all(&input).await;
            let _ = write.shutdown().await;
        });
        let mut replies = Vec::new();
        let mut lines = BufReader::new(read).lines();
        while let Some(line) = lines.next_line().await.unwrap() {
            replies.push(serde_json::from_str(&line).unwrap());
        }
        writer.await.unwrap();
        served.await.unwrap().unwrap();
        let calls = device.0.lock().unwrap().clone();
        (replies, calls)
    }

    #[tokio::test]
    async fn one_reply_per_line_in_order_and_bad_lines_do_nothing() {
        let input = b"{\"cmd\":\"pause\"}\nnot json\n{\"cmd\":\"stats\"}\r\n\n{\"cmd\":\"resume\",\"x\":1}\n{\"cmd\":\"resume\"}\n";
        let (replies, calls) = converse(input, 100).await;
        let oks: Vec<bool> = replies.iter().map(|r| r["ok"].as_bool().unwrap()).collect();
        assert_eq!(oks, [true, false, true, false, false, true]);
        assert_eq!(replies[0]["paused"], true);
        assert_eq!(calls, ["paused true", "stats", "paused false"]);
    }

    #[tokio::test]
    async fn a_line_cut_off_by_end_of_input_is_not_carried_out() {
        let (replies, calls) = converse(b"{\"cmd\":\"stats\"}\n{\"cmd\":\"pause\"}", 100).await;
        assert_eq!(replies.len(), 2);
        assert_eq!(replies[0]["ok"], true);
        assert_eq!(replies[1]["ok"], false);
        assert!(
            replies[1]["error"]
                .as_str()
                .unwrap()
                .contains("truncated request")
        );
        assert_eq!(calls, ["stats"]);
    }

    #[tokio::test]
    async fn an_oversized_line_is_refused_and_ends_the_connection() {
        let mut input = b"{\"cmd\":\"stats\"}\n".to_vec();
        input.extend(std::iter::repeat_n(b' ', 200));
        input.extend(b"{\"cmd\":\"pause\"}\n{\"cmd\":\"pause\"}\n");
        let (replies, calls) = converse(&input, 100).await;
        assert_eq!(replies.len(), 2, "{replies:?}");
        assert!(
            replies[1]["error"]
                .as_str()
                .unwrap()
                .contains("longer than 100 bytes")
        );
        assert_eq!(calls, ["stats"]);
    }

    #[tokio::test]
    async fn a_line_exactly_at_the_limit_is_accepted() {
        let request = b"{\"cmd\":\"stats\"}";
        let mut input = vec![b' '; 100 - request.len()];
        input.extend(request);
        input.push(b'\n');
        let (replies, calls) = converse(&input, 100).await;
        assert_eq!(replies[0]["ok"], true, "{replies:?}");
        assert_eq!(calls, ["stats"]);
        input.insert(0, b' ');
        let (replies, calls) = converse(&input, 100).await;
        assert_eq!(replies[0]["ok"], false, "{replies:?}");
        assert!(calls.is_empty());
    }

    #[tokio::test]
    async fn a_line_stalled_midway_is_refused_and_an_idle_client_is_not() {
        let device = Arc::new(Counting::default());
        let (client, server) = tokio::io::duplex(64);
        let limits = Limits {
            line_bytes: 100,
            stall: Duration::from_millis(200),
        };
        let served = tokio::spawn(serve_with_limits(server, device.clone(), limits));
        let (read, mut write) = tokio::io::split(client);
        let mut replies = BufReader::new(read).lines();
        // Idle for longer than the stall limit before a request: fine.
        tokio::time::sleep(Duration::from_millis(400)).await;
        write.write_all(b"{\"cmd\":\"stats\"}\n").await.unwrap();
        let reply: serde_json::Value =
            serde_json::from_str(&replies.next_line().await.unwrap().unwrap()).unwrap();
        assert_eq!(reply["ok"], true, "{reply}");
        // Half a request, then nothing.
        write.write_all(b"{\"cmd\":\"pa").await.unwrap();
        let reply: serde_json::Value =
            serde_json::from_str(&replies.next_line().await.unwrap().unwrap()).unwrap();
        let error = reply["error"].as_str().unwrap();
        assert!(
            error.contains("request stalled: 10 bytes came") && error.contains("200 ms"),
            "{error}"
        );
        assert_eq!(replies.next_line().await.unwrap(), None, "closed");
        served.await.unwrap().unwrap();
        assert_eq!(*device.0.lock().unwrap(), ["stats"]);
    }
}
