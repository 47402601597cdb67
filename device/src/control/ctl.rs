//! `fencelab-device ctl --socket CTL <command>`: sends one request to a
//! running device and prints the reply.
//!
//! Exit status: 0 when the device answered `"ok":true`; 1 when it refused
//! (or the request could not be built), with `error: …` on stderr; 2 when
//! the device could not be reached.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::Value;

use super::client::Client;
use super::protocol::{PlanSource, Request};
use crate::fault::{ReleaseTarget, TimelineId};

pub const EXIT_OK: u8 = 0;
pub const EXIT_REFUSED: u8 = 1;
pub const EXIT_UNREACHABLE: u8 = 2;

/// Talk to a running fencelab-device over its control socket.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The device's control socket (`<vhost socket>.ctl` unless the device
    /// was started with --control-socket).
    #[arg(long, value_name = "CTL")]
    pub socket: PathBuf,
    /// Pretty-print the reply.
    #[arg(long)]
    pub pretty: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Replace the plan with a TOML file (read by the device).
    LoadPlan { file: PathBuf },
    /// Apply a JSON merge patch (RFC 7386) to the plan.
    PatchPlan { json: String },
    /// Print the current plan.
    Plan,
    /// Release hung fences.
    Release(ReleaseArgs),
    /// Hold every completion until `resume`.
    Pause,
    /// Complete fences again.
    Resume,
    /// Per-timeline accounting and latency histograms.
    Stats,
    /// Fence totals over all timelines.
    Accounting,
    /// Write buffered trace events to the trace file.
    FlushTrace,
    /// Send LINE as it is and print the reply.
    Raw { line: String },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ReleaseArgs {
    /// Release this fence id.
    #[arg(long, value_name = "N")]
    pub fence: Option<u64>,
    /// Release every hung fence of this timeline (`CTX` or `CTX.RING`).
    #[arg(long, value_name = "T")]
    pub timeline: Option<TimelineId>,
    /// Release every hung fence.
    #[arg(long)]
    pub all: bool,
}

enum Outgoing {
    Request(Request),
    Raw(String),
}

fn build(command: CtlCommand) -> Result<Outgoing, String> {
    Ok(Outgoing::Request(match command {
        CtlCommand::LoadPlan { file } => {
            // The device reads the file from its own working directory.
            let file = std::path::absolute(&file)
                .map_err(|e| format!("load-plan: cannot resolve {}: {e}", file.display()))?;
            if file.to_str().is_none() {
                return Err(format!(
                    "load-plan: {} is not valid UTF-8 and cannot be sent in JSON",
                    file.display()
                ));
            }
            Request::LoadPlan(PlanSource::Path(file))
        }
        CtlCommand::PatchPlan { json } => {
            let patch: Value = serde_json::from_str(&json)
                .map_err(|e| format!("patch-plan: the patch is not valid JSON: {e}"))?;
            if !patch.is_object() {
                return Err("patch-plan: the patch must be a JSON object".into());
            }
            Request::PatchPlan(patch)
        }
        CtlCommand::Plan => Request::Plan,
        CtlCommand::Release(ReleaseArgs {
            fence,
            timeline,
            all,
        }) => Request::Release(match (fence, timeline) {
            (Some(fence), _) => ReleaseTarget::Fence { fence },
            (None, Some(timeline)) => ReleaseTarget::Timeline { timeline },
            (None, None) if all => ReleaseTarget::All,
            (None, None) => return Err("release: give --fence N, --timeline T or --all".into()),
        }),
        CtlCommand::Pause => Request::Pause,
        CtlCommand::Resume => Request::Resume,
        CtlCommand::Stats => Request::Stats,
        CtlCommand::Accounting => Request::Accounting,
        CtlCommand::FlushTrace => Request::FlushTrace,
        CtlCommand::Raw { line } => return Ok(Outgoing::Raw(line)),
    }))
}

/// Runs one `ctl` invocation; returns the process's exit status.
pub fn run(args: CtlArgs) -> ExitCode {
    ExitCode::from(run_code(args))
}

fn run_code(args: CtlArgs) -> u8 {
    let outgoing = match build(args.command) {
        Ok(outgoing) => outgoing,
        Err(e) => return fail(EXIT_REFUSED, &e),
    };
    let exchanged = Client::connect(&args.socket).and_then(|mut client| match outgoing {
        Outgoing::Request(request) => client.exchange(&request.to_json().to_string()),
        Outgoing::Raw(line) => client.exchange(&line),
    });
    let text = match exchanged {
        Ok(text) => text,
        Err(e) => return fail(EXIT_UNREACHABLE, &e.to_string()),
    };
    let reply: Value = match serde_json::from_str(&text) {
        Ok(reply) => reply,
        Err(e) => {
            let message = format!("the device's reply is not JSON ({e}): {text}");
            return fail(EXIT_UNREACHABLE, &message);
        }
    };
    let shown = if args.pretty {
        serde_json::to_string_pretty(&reply).unwrap_or(text)
    } else {
        text
    };
    // Not println!: it panics when stdout is closed.
    let _ = writeln!(std::io::stdout(), "{shown}");
    match reply.get("ok") {
        Some(Value::Bool(true)) => EXIT_OK,
        _ => {
            let message = reply
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("the device refused the request without saying why");
            fail(EXIT_REFUSED, message)
        }
    }
}

fn fail(code: u8, message: &str) -> u8 {
    let _ = writeln!(std::io::stderr(), "error: {message}");
    code
}
