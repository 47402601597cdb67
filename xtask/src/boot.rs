//! `cargo xtask boot`: the main job. Setup, kernel, image; start
//! fencelab-device on a private socket; boot QEMU; run the workload; read the
//! kernel's verdict from the console; stop everything; report.

use crate::console::{self, ConsoleReport, RESULT_MARKER, WORKLOAD_END_MARKER};
use crate::guest::{self, Attempt, Companion, Guest};
use crate::qemu::{Accel, GuestSpec};
use crate::report::{
    self, DeviceSummary, EarlyBootStall, Finding, KernelInfo, ResultLine, RunInfo, Summary,
};
use crate::supervise::Supervised;
use crate::{crosscheck, image, kernel, paths, setup};
use anyhow::{Context, Result, bail};
use clap::Parser;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct BootArgs {
    /// Guest workload run by fence-hammer.
    #[arg(long, default_value = "smoke")]
    pub workload: String,
    /// DRM driver the guest loads for the device.
    #[arg(long, value_enum, default_value_t = Driver::VirtioGpu)]
    pub driver: Driver,
    /// The vhost-user backend behind the guest's GPU.
    #[arg(long, value_enum, default_value_t = Backend::Fencelab)]
    pub backend: Backend,
    /// Fences the workload submits [default: 2000; unload-live: 10000].
    #[arg(long)]
    pub fences: Option<u32>,
    /// Completion latency of every fence in fencelab-device (e.g. 0, 100us, 2ms).
    #[arg(long, default_value = "0", conflicts_with = "plan")]
    pub latency: String,
    /// Fault plan for fencelab-device (TOML, see device/plans/README.md).
    #[arg(long, value_name = "FILE")]
    pub plan: Option<PathBuf>,
    /// Seed for the plan's random decisions [default: the device picks one
    /// and the report shows it].
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Exit non-zero when the run found something about the driver (such as
    /// premature signals), not only on harness failures.
    #[arg(long)]
    pub fail_on_findings: bool,
    /// CPU emulation; KVM does not boot on the build VMs (DESIGN.md §3).
    #[arg(long, value_enum, default_value_t = Accel::Tcg)]
    pub accel: Accel,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 2048)]
    pub memory_mib: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Give up on the guest after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout_secs: u64,
    /// Extra argument for fence-hammer (repeatable), e.g. --hammer-arg=--inflight=1.
    #[arg(long = "hammer-arg", allow_hyphen_values = true)]
    pub hammer_args: Vec<String>,
    /// Echo the guest console to stderr while it runs.
    #[arg(long)]
    pub console: bool,
    /// Print the summary as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// Build fencelab_drm with this deliberate bug in (harness self-test;
    /// `cargo xtask scenario --list-bugs` lists them). Needs `--driver fencelab`.
    #[arg(long, value_name = "BUG")]
    pub inject_bug: Option<String>,
    /// Fence errors with this errno name (e.g. ETIMEDOUT) are what the run
    /// is for, not a failure (repeatable).
    #[arg(long = "allow-fence-errors", value_name = "ERRNO")]
    pub allow_fence_errors: Vec<String>,
    /// Harness self-test: SIGKILL fencelab-device once the workload starts
    /// (the run must fail and leave nothing behind).
    #[arg(long, hide = true)]
    pub kill_device_mid_run: bool,
}

/// The guest's DRM driver for the virtio-gpu device.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// The upstream C driver, `virtio_gpu.ko`.
    VirtioGpu,
    /// fencelab's Rust driver, `fencelab_drm.ko` (guest-driver/ series).
    Fencelab,
}

impl Driver {
    /// The module the guest's init loads (`fencelab.driver=`).
    pub fn module(self) -> &'static str {
        match self {
            Driver::VirtioGpu => "virtio_gpu",
            Driver::Fencelab => "fencelab_drm",
        }
    }
}

/// The vhost-user virtio-gpu backend a boot runs against.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Backend {
    /// fencelab-device, with its fault plans, trace and accounting.
    #[value(name = "fencelab")]
    #[serde(rename = "fencelab-device")]
    Fencelab,
    /// rust-vmm's vhost-device-gpu 0.2.0 in null mode, for comparison: no
    /// faults, no trace, no accounting (installed into the cache on first use).
    #[value(name = "vhost-device-gpu")]
    #[serde(rename = "vhost-device-gpu")]
    VhostDeviceGpu,
}

impl Backend {
    /// The process name in logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Fencelab => "fencelab-device",
            Backend::VhostDeviceGpu => crate::peer::CRATE,
        }
    }
}

impl Default for BootArgs {
    fn default() -> Self {
        #[derive(Parser)]
        struct Defaults {
            #[command(flatten)]
            args: BootArgs,
        }
        Defaults::parse_from(["boot"]).args
    }
}

/// fence-hammer's workload that unloads fencelab_drm under load; it brings
/// its own defaults (more fences, and a device plan that keeps them pending).
const UNLOAD_LIVE: &str = "unload-live";

impl BootArgs {
    /// `--fences`, else the workload's default.
    pub fn fences(&self) -> u32 {
        self.fences.unwrap_or(if self.workload == UNLOAD_LIVE {
            10_000
        } else {
            2000
        })
    }

    /// The arguments with the workload's defaults filled in: unload-live runs
    /// with `images/fence-hammer/plans/unload-live.toml` unless `--plan` or a
    /// non-zero `--latency` is given.
    fn with_workload_defaults(&self) -> Self {
        let mut args = self.clone();
        args.fences = Some(self.fences());
        if self.workload == UNLOAD_LIVE && self.plan.is_none() && self.latency == "0" {
            args.plan =
                Some(paths::workspace_root().join("images/fence-hammer/plans/unload-live.toml"));
        }
        args
    }

    /// The one command that repeats this run; `seed` is the one the device
    /// used (which pins a plan's random decisions).
    fn reproduce(&self, seed: Option<u64>) -> String {
        let mut words = vec![
            "cargo xtask boot".to_owned(),
            format!("--workload {}", self.workload),
            format!("--fences {}", self.fences()),
        ];
        if self.driver == Driver::Fencelab {
            words.push("--driver fencelab".to_owned());
        }
        if self.backend == Backend::VhostDeviceGpu {
            words.push("--backend vhost-device-gpu".to_owned());
        }
        match &self.plan {
            Some(plan) => words.push(format!("--plan {}", shown_path(plan))),
            None => words.push(format!("--latency {}", self.latency)),
        }
        if let Some(seed) = seed.or(self.seed) {
            words.push(format!("--seed {seed}"));
        }
        if let Some(bug) = &self.inject_bug {
            words.push(format!("--inject-bug {bug}"));
        }
        words.extend(
            self.allow_fence_errors
                .iter()
                .map(|e| format!("--allow-fence-errors {e}")),
        );
        words.extend(self.hammer_args.iter().map(|a| format!("--hammer-arg={a}")));
        words.join(" ")
    }

    /// Refuses what the peer backend cannot do, before anything is built.
    fn check_backend(&self) -> Result<()> {
        if self.backend == Backend::Fencelab {
            return Ok(());
        }
        let asked: Vec<&str> = [
            (self.plan.is_some(), "--plan"),
            (self.latency != "0", "--latency"),
            (self.seed.is_some(), "--seed"),
            (self.kill_device_mid_run, "--kill-device-mid-run"),
        ]
        .into_iter()
        .filter_map(|(given, flag)| given.then_some(flag))
        .collect();
        if !asked.is_empty() {
            bail!(
                "--backend {}: it injects no faults and cannot take {}; use --backend fencelab",
                self.backend.name(),
                asked.join(", ")
            );
        }
        Ok(())
    }

    /// Refuses a plan file that is not there, before anything is built.
    fn check_plan(&self) -> Result<()> {
        if let Some(plan) = &self.plan {
            let meta = fs::metadata(plan)
                .with_context(|| format!("--plan {}: cannot read the plan file", plan.display()))?;
            if !meta.is_file() {
                bail!("--plan {}: not a file", plan.display());
            }
        }
        Ok(())
    }
}

/// `path` relative to the workspace root when it lies below it (so that a
/// reproduce line works from a fresh clone), else as given.
pub fn shown_path(path: &Path) -> String {
    let absolute = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let root =
        fs::canonicalize(paths::workspace_root()).unwrap_or_else(|_| paths::workspace_root());
    absolute
        .strip_prefix(&root)
        .unwrap_or(path)
        .display()
        .to_string()
}

pub fn run(args: &BootArgs) -> Result<()> {
    let summary = execute(args)?;
    crate::report::print(&summary, args.json);
    if !summary.ok {
        bail!(
            "boot failed: {} failure(s), listed above as FAILURE lines",
            summary.failures.len()
        );
    }
    if args.fail_on_findings && !summary.findings.is_empty() {
        bail!(
            "--fail-on-findings: {} finding(s) about the driver, listed above",
            summary.findings.len()
        );
    }
    Ok(())
}

fn step(message: impl AsRef<str>) {
    eprintln!("boot: {}", message.as_ref());
}

/// The last `n` lines of the device log above debug level: what it said
/// about its own state, without the per-fence chatter.
pub(crate) fn device_log_tail(path: &Path) -> String {
    crate::cmd::tail_matching(path, 5, |l| {
        !l.contains(" DEBUG ") && !l.contains(" TRACE ")
    })
}

/// Everything up to the summary; `Err` only when the run could not start.
pub fn execute(args: &BootArgs) -> Result<Summary> {
    let started = Instant::now();
    let args = &args.with_workload_defaults();
    args.check_backend()?;
    args.check_plan()?;
    // Refused before anything is built.
    if let Some(name) = &args.inject_bug {
        if args.driver != Driver::Fencelab {
            bail!("--inject-bug {name}: the bugs are in fencelab_drm; add --driver fencelab");
        }
        crate::bugs::find(name)?;
    }
    step("setup");
    let toolchain = setup::run()?;
    step("kernel");
    let kernel = kernel::build(&toolchain, &kernel::KernelArgs::default())?;
    step("image");
    let initramfs = match &args.inject_bug {
        None => image::build(&kernel)?,
        Some(name) => {
            let bug = crate::bugs::find(name)?;
            step(format!(
                "building fencelab_drm with bug {name} ({})",
                bug.summary
            ));
            let module = crate::bugs::build_module(&toolchain, &kernel, bug)?;
            crate::bugs::initramfs_with_module(&kernel, &module)?
        }
    };
    if args.accel == Accel::Kvm {
        probe_kvm(&kernel.bzimage, &initramfs)?;
    }
    let device_bin = match args.backend {
        Backend::Fencelab => {
            step("building fencelab-device");
            build_device()?
        }
        Backend::VhostDeviceGpu => crate::peer::ensure_installed()?,
    };
    let prepared = Prepared {
        kernel,
        initramfs,
        device_bin,
        prepare_secs: started.elapsed().as_secs_f64(),
    };

    let (mut summary, stalls) =
        guest::retry_early_boot_stalls(&args.workload, || run_once(args, &prepared))?;
    summary.early_boot_stalls = stalls;
    let reports = crate::run_report::write_run_reports(&summary)?;
    reports.attach(&mut summary);
    step(format!(
        "reports {} {}{}",
        reports.report_json.display(),
        reports.junit_xml.display(),
        reports
            .latency_note
            .as_deref()
            .map_or(String::new(), |note| format!(" (no latency plot: {note})"))
    ));
    Ok(*summary)
}

/// What every attempt of one `execute` shares.
struct Prepared {
    kernel: kernel::Kernel,
    initramfs: PathBuf,
    device_bin: PathBuf,
    /// Setup, kernel, image and device build, before the first attempt.
    prepare_secs: f64,
}

/// Boots the guest once with a fresh device.
fn run_once(args: &BootArgs, prepared: &Prepared) -> Result<Attempt<Box<Summary>>> {
    let Prepared {
        kernel,
        initramfs,
        device_bin,
        prepare_secs,
    } = prepared;
    let run_dir = guest::new_run_dir(&args.workload)?;
    let socket_dir = SocketDir::create()?;
    let socket = socket_dir.path().join("gpu.sock");
    step(format!("run folder {}", run_dir.display()));

    let device_log = run_dir.join("device.log");
    let trace = run_dir.join("trace.jsonl");
    let device_spec = DeviceSpec {
        binary: device_bin,
        socket: &socket,
        control_socket: &socket_dir.path().join("ctl.sock"),
        faults: match &args.plan {
            Some(plan) => Faults::Plan(plan),
            None => Faults::Latency(&args.latency),
        },
        seed: args.seed,
        trace: &trace,
        log: &device_log,
    };
    let mut device = match args.backend {
        Backend::Fencelab => start_device(&device_spec)?,
        Backend::VhostDeviceGpu => start_peer(&device_spec)?,
    };
    wait_for_socket(args.backend, &socket, &mut device, &device_log)?;

    let mut cmdline_extra = vec![format!("fencelab.workload={}", args.workload)];
    cmdline_extra.push(format!("fencelab.driver={}", args.driver.module()));
    let mut hammer_args = vec![format!("--fences={}", args.fences())];
    if args.driver == Driver::Fencelab {
        hammer_args.push("--driver=fencelab".to_owned());
    }
    hammer_args.extend(args.hammer_args.iter().cloned());
    cmdline_extra.push(format!("fencelab.args={}", hammer_args.join(",")));
    let spec = GuestSpec {
        kernel: kernel.bzimage.clone(),
        initramfs: initramfs.clone(),
        gpu_socket: Some(socket.clone()),
        memory_mib: args.memory_mib,
        cpus: args.cpus,
        accel: args.accel,
        cmdline_extra,
    };
    let mut guest = Guest::launch(&spec, &run_dir, args.console)?;
    let mut failures = Vec::new();
    let companion = Companion {
        process: &mut device,
        name: args.backend.name(),
        log: &device_log,
        last_words: device_log_tail,
        kill_when_workload_starts: args.kill_device_mid_run,
    };
    let ended = guest.supervise(
        Some(companion),
        Duration::from_secs(args.timeout_secs),
        &mut failures,
    )?;
    let outcome = guest.finish()?;
    if let guest::Ended::StalledBeforeInit {
        after_line,
        last_line,
    } = ended
    {
        // The device saw no driver yet; it exits on QEMU's disconnect.
        if device.wait_for(Duration::from_secs(10))?.is_none() {
            device.stop(Duration::from_secs(3))?;
        }
        return Ok(Attempt::Stalled(EarlyBootStall {
            run_dir,
            after_line,
            last_line,
        }));
    }
    let device_status = match (device.wait_for(Duration::from_secs(10))?, args.backend) {
        (Some(status), _) => status,
        (None, Backend::Fencelab) => {
            failures.push("fencelab-device did not exit after QEMU disconnected".into());
            device.stop(Duration::from_secs(3))?
        }
        // It serves the next frontend after a disconnect.
        (None, Backend::VhostDeviceGpu) => device.stop(Duration::from_secs(3))?,
    };
    let report = console::parse(&outcome.console);
    let device_summary = DeviceSummary::from_log(&device_log);
    let seed = device_summary
        .as_ref()
        .and_then(|d| d.seed)
        .or_else(|| report::seed_from_log(&device_log));

    let guest = read_guest(&report, &mut failures);
    let hangs_explain_timeouts = guest
        .as_ref()
        .is_some_and(|g| crosscheck::timeouts_explained_by_hangs(g, device_summary.as_ref()));
    judge_guest(
        args,
        &report,
        guest.as_ref(),
        hangs_explain_timeouts,
        &mut failures,
    );
    let mut findings = Vec::new();
    if args.backend == Backend::Fencelab {
        judge_device(
            &device_summary,
            guest.as_ref(),
            device_status.success(),
            &mut failures,
            &mut findings,
        );
    }

    let run = RunInfo {
        boot_to_workload_ms: outcome.marks.workload_started.map(|d| d.as_millis() as u64),
        boot_to_result_ms: outcome.marks.result_after.map(|d| d.as_millis() as u64),
        backend_usage: device.usage(),
        prepare_secs: *prepare_secs,
        qemu_exit: outcome.status.code(),
        run_dir,
        seed,
        trace: trace.exists().then_some(trace),
        reproduce: args.reproduce(seed),
        findings,
        failures,
    };
    Ok(Attempt::Done(Box::new(Summary::new(
        args,
        KernelInfo::from(kernel),
        report,
        guest,
        device_summary,
        run,
    ))))
}

/// Proves that a guest boots to its init under KVM before a run relies on
/// it: `/dev/kvm` opening is not enough on VMs without nested
/// virtualisation, where a KVM guest hangs at "Decompressing Linux...".
fn probe_kvm(kernel: &Path, initramfs: &Path) -> Result<()> {
    const PROBE_SECS: u64 = 60;
    File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .context("--accel kvm: cannot open /dev/kvm; use --accel tcg")?;
    step(format!(
        "probing KVM: the guest must reach its init within {PROBE_SECS} s"
    ));
    let run_dir = guest::new_run_dir("kvm-probe")?;
    let spec = GuestSpec {
        kernel: kernel.to_path_buf(),
        initramfs: initramfs.to_path_buf(),
        gpu_socket: None,
        memory_mib: 512,
        cpus: 1,
        accel: Accel::Kvm,
        cmdline_extra: vec!["fencelab.workload=none".into()],
    };
    let mut probe = Guest::launch(&spec, &run_dir, false)?;
    let mut failures = Vec::new();
    if let guest::Ended::StalledBeforeInit { last_line, .. } =
        probe.supervise(None, Duration::from_secs(PROBE_SECS), &mut failures)?
    {
        failures.push(format!(
            "the KVM probe guest stalled before its init ({last_line})"
        ));
    }
    let outcome = probe.finish()?;
    if console::parse(&outcome.console).booted_release.is_none() {
        bail!(
            "--accel kvm: a probe guest did not reach its init under KVM ({}; console: {}); use --accel tcg",
            if failures.is_empty() {
                format!("QEMU {}", outcome.status)
            } else {
                failures.join("; ")
            },
            run_dir.join("console.log").display()
        );
    }
    step("KVM probe booted; using KVM");
    Ok(())
}

/// Notes the init's errors and the kernel's splats, and reads fence-hammer's
/// result line.
fn read_guest(report: &ConsoleReport, failures: &mut Vec<String>) -> Option<ResultLine> {
    failures.extend(
        report
            .init_errors
            .iter()
            .map(|e| format!("guest init: {e}")),
    );
    for splat in &report.splats {
        failures.push(format!("kernel splat: {}", splat.summary()));
    }
    for key in ["CONFIG_RUST", "CONFIG_KASAN", "CONFIG_PROVE_LOCKING"] {
        match report.guest_config.get(key).map(String::as_str) {
            Some("y") => {}
            other => failures.push(format!(
                "guest /proc/config.gz: {key}={}",
                other.unwrap_or("<missing>")
            )),
        }
    }
    let Some(json) = report.result_json.as_deref() else {
        failures.push(format!(
            "the guest printed no {} line (workload started: {})",
            RESULT_MARKER.trim(),
            report.workload_started
        ));
        return None;
    };
    match serde_json::from_str(json) {
        Ok(guest) => Some(guest),
        Err(error) => {
            failures.push(format!("unreadable {}line: {error}: {json}", RESULT_MARKER));
            None
        }
    }
}

/// Checks what issue 2's contract requires of the workload. When every
/// fence that never signaled was hung by the device on purpose
/// (`hangs_explain_timeouts`), the workload's own failure (timeouts, fewer
/// fences submitted after it stopped, exit status 1) is a finding reported
/// by [`crosscheck`], not a failure.
fn judge_guest(
    args: &BootArgs,
    report: &ConsoleReport,
    guest: Option<&ResultLine>,
    hangs_explain_timeouts: bool,
    failures: &mut Vec<String>,
) {
    let Some(guest) = guest else {
        return;
    };
    // Fence errors the run asked for (--allow-fence-errors): a hung fence
    // ended by the driver's job timeout, say. They make fence-hammer report
    // failure and exit 1, which is then the run working.
    let allowed: u64 = args
        .allow_fence_errors
        .iter()
        .filter_map(|errno| guest.errors_by_errno.get(errno))
        .sum();
    let errors_explained = guest.fence_errors > 0 && guest.fence_errors <= allowed;
    let explained = hangs_explain_timeouts || errors_explained;
    if !guest.ok && !explained {
        failures.push(format!(
            "workload {} reported failure: {}",
            guest.workload.as_deref().unwrap_or(&args.workload),
            guest.first_error.as_deref().unwrap_or("no error given")
        ));
    }
    if guest.fences_submitted != u64::from(args.fences()) && !hangs_explain_timeouts {
        failures.push(format!(
            "fence-hammer submitted {} fences, {} requested",
            guest.fences_submitted,
            args.fences()
        ));
    }
    let unsignaled_ok = hangs_explain_timeouts
        && guest.fences_signaled + guest.fence_timeouts == guest.fences_submitted;
    // fence-hammer counts a fence that ended with an error apart from the
    // signaled ones: with the errors explained, both together are every fence.
    let ended = guest.fences_signaled
        + if errors_explained {
            guest.fence_errors
        } else {
            0
        };
    let errors_ok = guest.fence_errors == 0 || errors_explained;
    if (ended != guest.fences_submitted || !errors_ok) && !unsignaled_ok {
        failures.push(format!(
            "fences: {} submitted, {} signaled, {} errors ({}), {} timeouts",
            guest.fences_submitted,
            guest.fences_signaled,
            guest.fence_errors,
            errno_counts(guest),
            guest.fence_timeouts
        ));
    }
    match report.workload_exit {
        Some(0) => {}
        Some(1) if explained => {}
        Some(rc) => failures.push(format!("fence-hammer exited with {rc}")),
        None => failures.push(format!("the guest printed no {WORKLOAD_END_MARKER} line")),
    }
}

/// `ETIMEDOUT ×3, ENODEV ×1`, or `none by errno`, for the errors of a result line.
fn errno_counts(guest: &ResultLine) -> String {
    if guest.errors_by_errno.is_empty() {
        return "none by errno".into();
    }
    guest
        .errors_by_errno
        .iter()
        .map(|(errno, n)| format!("{errno} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Cross-checks the device's own accounting against the guest's counts
/// (the rules are in [`crosscheck`]).
fn judge_device(
    device: &Option<DeviceSummary>,
    guest: Option<&ResultLine>,
    exited_ok: bool,
    failures: &mut Vec<String>,
    findings: &mut Vec<Finding>,
) {
    let Some(device) = device else {
        failures.push("fencelab-device printed no summary line".into());
        return;
    };
    if !exited_ok {
        failures.push("fencelab-device exited with an error".into());
    }
    let verdict = crosscheck::check(guest, device);
    failures.extend(verdict.failures);
    findings.extend(verdict.findings);
}

pub(crate) fn build_device() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--package", "fencelab-device"])
        .current_dir(paths::workspace_root())
        .stdout(Stdio::null())
        .status()
        .context("running cargo build for fencelab-device")?;
    if !status.success() {
        bail!("cargo build --release --package fencelab-device failed ({status})");
    }
    Ok(paths::target_dir().join("release").join("fencelab-device"))
}

/// Where this process puts the backend's socket; QEMU's and the backend's
/// command lines both name it, which is how leftovers can be found.
pub fn socket_dir_path() -> PathBuf {
    std::env::temp_dir().join(format!("fencelab-{}", std::process::id()))
}

/// A private, short socket folder (unix socket paths are limited to 108
/// bytes, and a clone may live deep in the file system), removed on drop.
pub(crate) struct SocketDir(PathBuf);

impl SocketDir {
    pub(crate) fn create() -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = socket_dir_path();
        let _ = fs::remove_dir_all(&dir);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating socket folder {}", dir.display()))?;
        Ok(Self(dir))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// How fencelab-device decides when fences complete.
pub(crate) enum Faults<'a> {
    /// Every fence after this fixed latency (`--latency`).
    Latency(&'a str),
    /// A fault plan (`--plan`).
    Plan(&'a Path),
}

/// Everything fencelab-device is started with.
pub(crate) struct DeviceSpec<'a> {
    pub(crate) binary: &'a Path,
    pub(crate) socket: &'a Path,
    pub(crate) control_socket: &'a Path,
    pub(crate) faults: Faults<'a>,
    pub(crate) seed: Option<u64>,
    pub(crate) trace: &'a Path,
    pub(crate) log: &'a Path,
}

impl DeviceSpec<'_> {
    /// The device's arguments (the CLI in device/src/main.rs).
    pub(crate) fn args(&self) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec!["--socket".into(), self.socket.into()];
        match self.faults {
            Faults::Latency(latency) => args.extend(["--latency".into(), latency.into()]),
            Faults::Plan(plan) => args.extend(["--plan".into(), plan.into()]),
        }
        if let Some(seed) = self.seed {
            args.extend(["--seed".into(), seed.to_string().into()]);
        }
        args.extend([
            "--trace".into(),
            self.trace.into(),
            "--control-socket".into(),
            self.control_socket.into(),
        ]);
        args
    }
}

/// Starts rust-vmm's vhost-device-gpu on the spec's socket (its faults,
/// seed, trace and control socket do not apply: `check_backend` refused them).
fn start_peer(spec: &DeviceSpec<'_>) -> Result<Supervised> {
    step(format!(
        "starting {} {} (null mode), log {}",
        crate::peer::CRATE,
        crate::peer::VERSION,
        spec.log.display()
    ));
    let mut command = Command::new(spec.binary);
    command
        .args(crate::peer::args(spec.socket))
        .env("RUST_LOG", "info");
    log_to(&mut command, spec.log)?;
    Supervised::spawn(crate::peer::CRATE, command)
}

/// Both output streams of `command` into `log`, stdin closed.
pub(crate) fn log_to(command: &mut Command, log: &Path) -> Result<()> {
    command
        .stdin(Stdio::null())
        .stdout(File::create(log).with_context(|| format!("creating {}", log.display()))?)
        .stderr(
            File::options()
                .append(true)
                .open(log)
                .with_context(|| format!("opening {}", log.display()))?,
        );
    Ok(())
}

pub(crate) fn start_device(spec: &DeviceSpec<'_>) -> Result<Supervised> {
    step(format!(
        "starting fencelab-device ({}), log {}",
        match spec.faults {
            Faults::Latency(latency) => format!("latency {latency}"),
            Faults::Plan(plan) => format!("plan {}", plan.display()),
        },
        spec.log.display()
    ));
    let mut command = Command::new(spec.binary);
    command.args(spec.args()).env(
        "RUST_LOG",
        std::env::var("FENCELAB_DEVICE_LOG")
            .unwrap_or_else(|_| "info,fencelab_device=debug".into()),
    );
    log_to(&mut command, spec.log)?;
    Supervised::spawn("fencelab-device", command)
}

fn wait_for_socket(
    backend: Backend,
    socket: &Path,
    device: &mut Supervised,
    log: &Path,
) -> Result<()> {
    let name = backend.name();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if socket.exists() {
            return Ok(());
        }
        if let Some(status) = device.try_status()? {
            bail!(
                "{name} exited before listening ({status}):\n{}",
                device_log_tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "{name} did not create {} within 10 s:\n{}",
        socket.display(),
        device_log_tail(log)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BootArgs,
    }

    fn parse(words: &[&str]) -> Result<BootArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("boot").chain(words.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn latency_and_plan_are_mutually_exclusive() {
        let err = parse(&["--latency", "2ms", "--plan", "device/plans/reorder.toml"])
            .expect_err("conflict");
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        let args = parse(&["--plan", "p.toml", "--seed", "9"]).unwrap();
        assert_eq!(args.plan.as_deref(), Some(Path::new("p.toml")));
        assert_eq!(args.seed, Some(9));
        assert_eq!(args.latency, "0", "the default does not conflict");
    }

    #[test]
    fn unload_live_brings_its_fences_and_plan() {
        let args = parse(&["--workload", "unload-live", "--driver", "fencelab"])
            .unwrap()
            .with_workload_defaults();
        assert_eq!(args.fences, Some(10_000));
        assert_eq!(args.driver.module(), "fencelab_drm");
        let plan = args.plan.expect("the workload's plan");
        assert!(plan.ends_with("images/fence-hammer/plans/unload-live.toml"));
        assert!(plan.is_file(), "{} is missing", plan.display());

        let args = parse(&["--workload", "unload-live", "--latency", "2ms"])
            .unwrap()
            .with_workload_defaults();
        assert_eq!(args.plan, None, "an explicit latency wins");
        let args = parse(&["--fences", "30"]).unwrap().with_workload_defaults();
        assert_eq!((args.fences, args.plan), (Some(30), None));
        assert_eq!(parse(&[]).unwrap().fences(), 2000);
        assert_eq!(parse(&[]).unwrap().driver.module(), "virtio_gpu");
    }

    #[test]
    fn reproduce_names_the_plan_and_the_device_seed() {
        let plan = paths::workspace_root().join("device/plans/x.toml");
        let args = BootArgs {
            plan: Some(plan),
            fences: Some(300),
            hammer_args: vec!["--inflight=1".into()],
            ..BootArgs::default()
        };
        assert_eq!(
            args.reproduce(Some(42)),
            "cargo xtask boot --workload smoke --fences 300 --plan device/plans/x.toml --seed 42 --hammer-arg=--inflight=1"
        );
        let args = BootArgs {
            latency: "2ms".into(),
            ..BootArgs::default()
        };
        assert_eq!(
            args.reproduce(None),
            "cargo xtask boot --workload smoke --fences 2000 --latency 2ms"
        );
        // A seed given on the command line is kept when the device printed none.
        let args = BootArgs {
            seed: Some(5),
            ..args
        };
        assert!(args.reproduce(None).ends_with("--latency 2ms --seed 5"));
    }

    #[test]
    fn the_peer_backend_refuses_what_only_fencelab_device_can_do() {
        let peer = ["--backend", "vhost-device-gpu"];
        let plain = parse(&peer).unwrap();
        assert_eq!(plain.backend.name(), "vhost-device-gpu");
        plain.check_backend().expect("a plain run is fine");
        assert!(
            plain
                .reproduce(None)
                .contains(" --backend vhost-device-gpu ")
        );
        let faulty = parse(&[&peer[..], &["--latency", "1ms", "--seed", "3"]].concat()).unwrap();
        let err = format!("{:#}", faulty.check_backend().unwrap_err());
        assert_eq!(
            err,
            "--backend vhost-device-gpu: it injects no faults and cannot take --latency, --seed; use --backend fencelab"
        );
        let ours = parse(&["--latency", "1ms"]).unwrap();
        assert_eq!(ours.backend, Backend::Fencelab);
        ours.check_backend().unwrap();
    }

    #[test]
    fn a_missing_plan_is_refused_before_anything_is_built() {
        let args = parse(&["--plan", "/nonexistent/fencelab/plan.toml"]).unwrap();
        let err = format!("{:#}", args.check_plan().unwrap_err());
        assert!(
            err.starts_with("--plan /nonexistent/fencelab/plan.toml: cannot read the plan file"),
            "{err}"
        );
        let dir = parse(&["--plan", "/"]).unwrap();
        assert!(format!("{:#}", dir.check_plan().unwrap_err()).contains("not a file"));
        assert!(BootArgs::default().check_plan().is_ok());
    }

    #[test]
    fn the_device_gets_plan_seed_trace_and_control_socket() {
        let spec = DeviceSpec {
            binary: Path::new("/bin/fencelab-device"),
            socket: Path::new("/tmp/f/gpu.sock"),
            control_socket: Path::new("/tmp/f/ctl.sock"),
            faults: Faults::Plan(Path::new("/w/device/plans/reorder.toml")),
            seed: Some(3),
            trace: Path::new("/runs/1/trace.jsonl"),
            log: Path::new("/runs/1/device.log"),
        };
        let words: Vec<String> = spec
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            words.join(" "),
            "--socket /tmp/f/gpu.sock --plan /w/device/plans/reorder.toml --seed 3 \
             --trace /runs/1/trace.jsonl --control-socket /tmp/f/ctl.sock"
        );
        let spec = DeviceSpec {
            faults: Faults::Latency("100us"),
            seed: None,
            ..spec
        };
        let words: Vec<String> = spec
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            words[..4].join(" "),
            "--socket /tmp/f/gpu.sock --latency 100us"
        );
        assert!(!words.contains(&"--seed".to_string()));
    }
}
