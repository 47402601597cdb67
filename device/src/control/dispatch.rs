//! Carrying out one request on the device.

use std::io::Read as _;
use std::path::Path;
use std::sync::Arc;

use serde_json::Map;
use tracing::{debug, info, warn};

use super::protocol::{PlanSource, Request, Response};
use crate::fault::{DeviceControl, PlanView};

/// Plan files larger than this are refused unread.
pub const MAX_PLAN_FILE_BYTES: u64 = 16 << 20;

/// The origin named in errors and the trace for a plan sent inline.
pub const INLINE_PLAN_ORIGIN: &str = "<load_plan toml>";

/// Parses and carries out one request line; never fails, errors are replies.
pub async fn handle_line(line: &[u8], device: &Arc<dyn DeviceControl>) -> Response {
    match Request::parse(line) {
        Ok(request) => execute(request, device.clone()).await,
        Err(e) => {
            debug!("refused request: {e}");
            Response::Err(e.to_string())
        }
    }
}

/// Carries out a request off the async thread.
///
/// `DeviceControl` calls take the device's locks, which the vring and engine
/// threads hold while they work, and `load_plan` reads a file; run on the
/// single-threaded runtime they would stall every other connection, so each
/// goes to the blocking pool. A call that has started always runs to the
/// end, even if its client disconnects meanwhile: a request is applied
/// whole or (when it never fully arrived) not at all.
pub async fn execute(request: Request, device: Arc<dyn DeviceControl>) -> Response {
    let name = request.name();
    match tokio::task::spawn_blocking(move || apply(request, device.as_ref())).await {
        Ok(response) => response,
        Err(e) => {
            warn!(cmd = name, "control request failed inside the device: {e}");
            Response::Err(format!("{name}: internal error in the device ({e})"))
        }
    }
}

/// Carries out a request on the calling thread.
pub fn apply(request: Request, device: &dyn DeviceControl) -> Response {
    let name = request.name();
    let response = match request {
        Request::LoadPlan(source) => load_plan(&source, device),
        Request::PatchPlan(patch) => device
            .patch_plan(&patch)
            .map(plan_reply)
            .unwrap_or_else(Response::Err),
        Request::Plan => plan_reply(device.plan()),
        Request::Release(target) => device
            .release(target)
            .map(|n| Response::ok_with("released", n.into()))
            .unwrap_or_else(Response::Err),
        Request::Pause => {
            device.set_paused(true);
            Response::ok_with("paused", true.into())
        }
        Request::Resume => {
            device.set_paused(false);
            Response::ok_with("paused", false.into())
        }
        Request::Stats => Response::ok_with("stats", device.stats()),
        Request::Accounting => match serde_json::to_value(device.accounting()) {
            Ok(accounting) => Response::ok_with("accounting", accounting),
            Err(e) => Response::Err(format!("accounting: cannot encode: {e}")),
        },
        Request::FlushTrace => match device.flush_trace() {
            Ok(()) => Response::Ok(Map::new()),
            Err(e) => Response::Err(e),
        },
    };
    match &response {
        Response::Err(e) => info!(cmd = name, "control request refused: {e}"),
        Response::Ok(_) if is_read_only(name) => debug!(cmd = name, "control request done"),
        Response::Ok(_) => info!(cmd = name, "control request done"),
    }
    response
}

/// `{"ok":true,"plan":{…},"plan_sha256":"…"}`: the hash is the one the
/// trace records for this plan.
fn plan_reply(view: PlanView) -> Response {
    let mut fields = Map::new();
    fields.insert("plan".into(), view.plan);
    fields.insert("plan_sha256".into(), view.sha256.into());
    Response::Ok(fields)
}

fn is_read_only(name: &str) -> bool {
    matches!(name, "plan" | "stats" | "accounting")
}

fn load_plan(source: &PlanSource, device: &dyn DeviceControl) -> Response {
    let loaded = match source {
        PlanSource::Toml(toml) => device.load_plan(toml, INLINE_PLAN_ORIGIN),
        PlanSource::Path(path) => match read_plan_file(path) {
            Ok(toml) => device.load_plan(&toml, &path.display().to_string()),
            Err(e) => Err(e),
        },
    };
    match loaded {
        Ok(plan) => plan_reply(plan),
        Err(e) => Response::Err(e),
    }
}

/// Reads a plan file, refusing anything but a regular UTF-8 file of sane size.
pub fn read_plan_file(path: &Path) -> Result<String, String> {
    let fail = |why: String| format!("cannot read plan file {}: {why}", path.display());
    let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    if meta.len() > MAX_PLAN_FILE_BYTES {
        return Err(fail(format!(
            "{} bytes, more than the {MAX_PLAN_FILE_BYTES} a plan may have",
            meta.len()
        )));
    }
    let mut bytes = Vec::new();
    file.take(MAX_PLAN_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(e.to_string()))?;
    String::from_utf8(bytes).map_err(|e| {
        fail(format!(
            "not UTF-8 (first bad byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })
}
