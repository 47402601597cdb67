//! The lifecycle checks. They boot at most one guest at a time and return
//! what they established; an early-boot stall (`guest::EARLY_BOOT_STALL`)
//! is retried like every other boot's. `system-reset` runs on the device
//! that `backend-killed` restarted (with `--reconnect`): the restarted
//! backend must serve the next QEMU as well as a fresh one.

use super::backend::Backend;
use super::machine::{Machine, Waited};
use super::{Prepared, Verdict};
use crate::boot::{Driver, SocketDir};
use crate::console::{self, BOOT_MARKER, RESULT_MARKER};
use crate::guest::{self, Attempt};
use crate::qemu::Extras;
use crate::qmp::Qmp;
use crate::report::EarlyBootStall;
use anyhow::{Result, bail};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Up to the workload: a TCG boot takes 30–60 s, more on a loaded host.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// QEMU with `reconnect-ms` on the GPU chardev: vhost-user-gpu-pci cannot
/// start (see the module docs of `lifecycle`). The check proves QEMU still
/// refuses, so the day a QEMU upgrade makes it work, this fails and the
/// lifecycle tests and `scenarios/backend-crash.toml` can be extended.
pub fn reconnect_ms(prepared: &Prepared) -> Result<Verdict> {
    let (run_dir, mut verdict, mut backend) = begin(prepared, "lifecycle-reconnect-ms", "0")?;
    let spec = prepared.guest(&backend.gpu_socket(), Driver::VirtioGpu, &["--fences=10"]);
    let extras = Extras {
        gpu_reconnect_ms: Some(500),
        ..Extras::default()
    };
    let mut machine = Machine::launch(&spec, &extras, &run_dir)?;
    let status = machine.wait_exit(Duration::from_secs(60))?;
    let qemu_log = machine.qemu_log();
    match status {
        None => {
            machine.stop()?;
            verdict.failures.push(
                "QEMU with reconnect-ms=500 still ran after 60 s: vhost-user-gpu-pci started, which \
                 QEMU 10.0.2 does not do; extend the lifecycle checks and backend-crash.toml"
                    .into(),
            );
        }
        Some(status) => {
            verdict.check(!status.success(), || {
                format!("QEMU with reconnect-ms=500 exited {status}, expected a failure")
            });
            verdict.check(qemu_log.contains("vhost-user-gpu-pci"), || {
                format!("QEMU's error does not name vhost-user-gpu-pci: {qemu_log:?}")
            });
            verdict.check(!machine.console().contains(BOOT_MARKER), || {
                "the guest booted although QEMU failed".into()
            });
            verdict.notes.push(format!(
                "QEMU with -chardev socket,…,reconnect-ms=500 exits at startup ({status}): {}",
                one_line(&qemu_log)
            ));
        }
    }
    backend.process.stop(Duration::from_secs(3))?;
    Ok(verdict)
}

/// fencelab-device SIGKILLed with fences in flight, then restarted on the
/// same socket; fencelab_drm in the guest.
///
/// Expected, and why: QEMU does not reconnect (no `reconnect-ms`, which
/// [`reconnect_ms`] shows it cannot use, and no re-handshake on a new
/// connection either), so the fences in flight are lost. fencelab_drm's
/// job timeout (10 s) signals them with `ETIMEDOUT` (fence-hammer waits
/// 30 s, so none is left to its own timeout); every fence submitted after
/// the kill meets the same end, which is why the workload is 16 fences.
/// The guest powers off normally and QEMU exits 0; the restarted device
/// (`--reconnect`, returned for [`system_reset`]) never sees a connection.
pub fn backend_killed(prepared: &Prepared) -> Result<(Verdict, Backend)> {
    let ((mut verdict, restarted), stalls) =
        guest::retry_early_boot_stalls("lifecycle backend-killed", || {
            backend_killed_once(prepared)
        })?;
    note_stalls(&mut verdict, stalls.len());
    Ok((verdict, restarted))
}

fn backend_killed_once(prepared: &Prepared) -> Result<Attempt<(Verdict, Backend)>> {
    // 1 s per fence: the ones in flight are still there when the kill lands.
    let (run_dir, mut verdict, mut first) = begin(prepared, "lifecycle-backend-killed", "1s")?;
    let spec = prepared.guest(
        &first.gpu_socket(),
        Driver::Fencelab,
        &["--fences=16", "--inflight=8", "--timeout-ms=30000"],
    );
    let mut machine = Machine::launch(&spec, &Extras::default(), &run_dir)?;
    let in_flight = |_: &str| first.outstanding() > 0;
    if let Some(stall) = boot_until(&mut machine, &run_dir, "a fence in flight", in_flight)? {
        return Ok(Attempt::Stalled(stall));
    }
    let in_flight = first.outstanding();
    first.process.kill()?;
    let killed = first.process.wait_for(Duration::from_secs(5))?;
    verdict.check(killed.is_some(), || "the killed device did not die".into());
    let Backend { sockets, .. } = first;
    let restarted = Backend::start(
        prepared,
        sockets,
        RESET_LATENCY,
        &run_dir.join("device-restarted.log"),
        true,
    )?;
    verdict.notes.push(format!(
        "fencelab-device SIGKILLed with {in_flight} fence(s) in flight, restarted on the same socket"
    ));

    powered_off(&mut machine, Duration::from_secs(180), &mut verdict)?;
    let console = machine.console();
    let report = console::parse(&console);
    splats(&report, &mut verdict);
    match result_line(&report) {
        Some(result) => {
            let etimedout = result["errors_by_errno"]["ETIMEDOUT"].as_u64().unwrap_or(0);
            verdict.check(etimedout >= 1, || {
                format!("no fence ended with ETIMEDOUT (fencelab_drm's job timeout): {result}")
            });
            verdict.check(result["fence_timeouts"] == 0, || {
                format!("fences were left to fence-hammer's timeout: {result}")
            });
            verdict.check(result["premature_signals"] == 0, || {
                format!("premature signals: {result}")
            });
            verdict.notes.push(format!(
                "guest survived: {} of {} fences signaled, {etimedout} ended by fencelab_drm's job timeout (ETIMEDOUT)",
                result["fences_signaled"], result["fences_submitted"]
            ));
        }
        None => verdict.failures.push(format!(
            "the guest printed no result line; see {}",
            run_dir.display()
        )),
    }
    let reconnected = std::fs::read_to_string(&restarted.log)
        .unwrap_or_default()
        .contains("frontend connected");
    verdict.check(!reconnected, || {
        "QEMU connected to the restarted device: vhost-user-gpu reconnects now; extend this check \
         (the lost fences might complete) and backend-crash.toml"
            .into()
    });
    let commands = restarted.stats().map(|s| s["commands"].clone());
    verdict.check(matches!(&commands, Ok(c) if *c == 0), || {
        format!("the restarted device's commands: {commands:?}, expected 0")
    });
    verdict.notes.push(format!(
        "QEMU never reconnected (the restarted device served 0 commands); QEMU said: {}",
        one_line(&machine.qemu_log())
    ));
    Ok(Attempt::Done((verdict, restarted)))
}

/// QMP `system_reset` with fences in flight; upstream virtio_gpu; on
/// `restarted`, the device `backend_killed` left (a fresh `--reconnect`
/// device if that check failed).
///
/// Expected, and why: the reset stops the vhost device (QEMU's
/// `vhost_user_gpu_reset` → `vhost_dev_stop` → `GET_VRING_BASE`, where the
/// device completes what it holds), the connection stays, the guest reboots
/// (QEMU runs without `-no-reboot` here), and the init runs the workload
/// again against the same device: that second run must pass, with no splat
/// in either boot. When QEMU exits the `--reconnect` device keeps serving;
/// its SIGTERM summary counts the connection and every fence completed.
pub fn system_reset(prepared: &Prepared, restarted: Option<Backend>) -> Result<Verdict> {
    let run_dir = guest::new_run_dir("lifecycle-system-reset")?;
    let mut backend = match restarted {
        Some(backend) => backend,
        None => Backend::start(
            prepared,
            SocketDir::create()?,
            RESET_LATENCY,
            &run_dir.join("device.log"),
            true,
        )?,
    };
    let (mut verdict, stalls) = guest::retry_early_boot_stalls("lifecycle system-reset", || {
        system_reset_once(prepared, &backend, &run_dir)
    })?;
    note_stalls(&mut verdict, stalls.len());
    // One connection per boot attempt, each ended by QEMU's exit.
    verdict_on_device(&mut backend, stalls.len() as u64 + 1, &mut verdict)?;
    Ok(verdict)
}

/// The device's latency in `system-reset`.
const RESET_LATENCY: &str = "2ms";

/// Fences each boot's workload submits: several seconds of work under TCG,
/// so the reset lands mid-flight.
const RESET_FENCES: u64 = 3000;
/// The reset comes once the device has taken this many.
const RESET_AFTER: u64 = 200;

fn system_reset_once(
    prepared: &Prepared,
    backend: &Backend,
    run_dir: &Path,
) -> Result<Attempt<Verdict>> {
    let mut verdict = Verdict {
        run_dir: Some(run_dir.to_owned()),
        ..Verdict::default()
    };
    let spec = prepared.guest(
        &backend.gpu_socket(),
        Driver::VirtioGpu,
        &[&format!("--fences={RESET_FENCES}")],
    );
    let qmp_socket = backend.sockets.path().join("qmp.sock");
    let extras = Extras {
        qmp_socket: Some(qmp_socket.clone()),
        allow_reboot: true,
        ..Extras::default()
    };
    let mut machine = Machine::launch(&spec, &extras, run_dir)?;
    let mut qmp = Qmp::connect(&qmp_socket, Duration::from_secs(10))?;
    let submitted_before = backend.submitted();
    let in_flight = |_: &str| backend.submitted() >= submitted_before + RESET_AFTER;
    if let Some(stall) = boot_until(&mut machine, run_dir, "fences in flight", in_flight)? {
        return Ok(Attempt::Stalled(stall));
    }
    let before = backend.submitted() - submitted_before;
    qmp.execute("system_reset")?;
    verdict.notes.push(format!(
        "QMP system_reset after the device had taken {before} fences of this guest"
    ));

    let rebooted = |console: &str| console.matches(BOOT_MARKER).count() >= 2;
    if let Waited::Seen = machine.wait_until("the guest's second boot", BOOT_TIMEOUT, rebooted)? {
        // Reading the status also collects the events QEMU sent meanwhile.
        let status = qmp.execute("query-status")?;
        let reset = qmp
            .events()
            .iter()
            .find(|e| e["event"] == "RESET")
            .map(|e| e["data"]["reason"].clone());
        verdict.check(reset.is_some(), || {
            format!("QEMU sent no RESET event (events: {:?})", qmp.events())
        });
        verdict.notes.push(format!(
            "QEMU: RESET event, reason {}; the guest rebooted (status {})",
            reset.unwrap_or_default(),
            status["status"]
        ));
    }
    let second_result = |console: &str| {
        console
            .match_indices(BOOT_MARKER)
            .nth(1)
            .is_some_and(|(at, _)| console[at..].contains(RESULT_MARKER))
    };
    match machine.wait_until("the rebooted guest's result", BOOT_TIMEOUT, second_result)? {
        Waited::Seen => {}
        Waited::Exited(status) => verdict.failures.push(format!(
            "QEMU exited ({status}) before the rebooted guest's result"
        )),
        Waited::Stalled(stall) => verdict.failures.push(format!(
            "the console went quiet after the reset (line {}: {})",
            stall.after_line, stall.last_line
        )),
    }
    powered_off(&mut machine, Duration::from_secs(60), &mut verdict)?;

    let console = machine.console();
    let boots: Vec<usize> = console
        .match_indices(BOOT_MARKER)
        .map(|(at, _)| at)
        .collect();
    verdict.check(boots.len() == 2, || {
        format!("the guest booted {} times, expected 2", boots.len())
    });
    let first = console::parse(&console[..boots.get(1).copied().unwrap_or(console.len())]);
    verdict.check(
        first.workload_started && first.result_json.is_none(),
        || "the reset did not interrupt the first workload".into(),
    );
    splats(&console::parse(&console), &mut verdict);
    if let Some(&at) = boots.get(1) {
        match result_line(&console::parse(&console[at..])) {
            Some(result) => {
                verdict.check(result["ok"] == true, || {
                    format!("the workload after the reset failed: {result}")
                });
                verdict.notes.push(format!(
                    "after the reboot the workload passed: {} of {} fences signaled",
                    result["fences_signaled"], result["fences_submitted"]
                ));
            }
            None => verdict
                .failures
                .push("the rebooted guest printed no result line".into()),
        }
    }
    Ok(Attempt::Done(verdict))
}

/// The `--reconnect` device once its QEMU has exited: still serving, and
/// its SIGTERM summary counts `connections` and every fence completed.
fn verdict_on_device(backend: &mut Backend, connections: u64, verdict: &mut Verdict) -> Result<()> {
    // Time to see the disconnect and end the connection.
    let exited = backend.process.wait_for(Duration::from_secs(2))?;
    verdict.check(exited.is_none(), || {
        format!("the --reconnect device exited when QEMU left ({exited:?})")
    });
    let status = backend.process.stop(Duration::from_secs(5))?;
    verdict.check(status.success(), || {
        format!("the device did not exit 0 on SIGTERM: {status}")
    });
    let Some(summary) = backend.summary() else {
        verdict
            .failures
            .push(format!("no summary in {}", backend.log.display()));
        return Ok(());
    };
    let count = |key: &str| summary[key].as_u64().unwrap_or(0);
    let (submitted, completed) = (count("fences_submitted"), count("fences_completed"));
    verdict.check(count("connections") == connections, || {
        format!(
            "the device counted {} ended connection(s), expected {connections}",
            summary["connections"]
        )
    });
    verdict.check(completed == submitted && submitted > RESET_FENCES, || {
        format!(
            "device accounting: {submitted} fences submitted, {completed} completed \
             (expected all of more than {RESET_FENCES})"
        )
    });
    verdict.notes.push(format!(
        "the restarted device (--reconnect) kept serving after QEMU left; at SIGTERM: \
         {connections} connection(s), all {submitted} fences completed"
    ));
    Ok(())
}

/// A check's run folder, its verdict so far, and a fresh device with
/// `latency` logging to `device.log` there.
fn begin(prepared: &Prepared, name: &str, latency: &str) -> Result<(PathBuf, Verdict, Backend)> {
    let run_dir = guest::new_run_dir(name)?;
    let verdict = Verdict {
        run_dir: Some(run_dir.clone()),
        ..Verdict::default()
    };
    let backend = Backend::start(
        prepared,
        SocketDir::create()?,
        latency,
        &run_dir.join("device.log"),
        false,
    )?;
    Ok((run_dir, verdict, backend))
}

/// Waits through the boot until `ready` holds: `Some` after an early-boot
/// stall (to be retried); QEMU exiting first is an error.
fn boot_until(
    machine: &mut Machine,
    run_dir: &Path,
    what: &str,
    ready: impl FnMut(&str) -> bool,
) -> Result<Option<EarlyBootStall>> {
    match machine.wait_until(what, BOOT_TIMEOUT, ready)? {
        Waited::Seen => Ok(None),
        Waited::Stalled(stall) => Ok(Some(stall)),
        Waited::Exited(status) => bail!(
            "QEMU exited ({status}) before {what}; see {}",
            run_dir.display()
        ),
    }
}

/// Waits up to `timeout` for the guest to power off, which must end QEMU
/// with status 0; stops QEMU if it does not.
fn powered_off(machine: &mut Machine, timeout: Duration, verdict: &mut Verdict) -> Result<()> {
    let status = machine.wait_exit(timeout)?;
    verdict.check(status.is_some_and(|s| s.success()), || {
        format!("QEMU did not exit 0 (the guest powering off) within {timeout:?}: {status:?}")
    });
    if status.is_none() {
        machine.stop()?;
    }
    Ok(())
}

/// Says when a check needed more than one boot attempt.
fn note_stalls(verdict: &mut Verdict, stalls: usize) {
    if stalls > 0 {
        verdict
            .notes
            .push(format!("booted again after {stalls} early-boot stall(s)"));
    }
}

fn splats(report: &console::ConsoleReport, verdict: &mut Verdict) {
    for splat in &report.splats {
        verdict
            .failures
            .push(format!("kernel splat: {}", splat.summary()));
    }
    for error in &report.init_errors {
        verdict.failures.push(format!("guest init: {error}"));
    }
}

fn result_line(report: &console::ConsoleReport) -> Option<Value> {
    serde_json::from_str(report.result_json.as_deref()?).ok()
}

/// The first lines of QEMU's messages, joined, for a note.
fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(3)
        .collect();
    if lines.is_empty() {
        "(nothing)".into()
    } else {
        lines.join(" | ")
    }
}
