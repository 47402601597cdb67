//! `cargo xtask boot`: the main job. Setup, kernel, image; start
//! fencelab-device on a private socket; boot QEMU; run the workload; read the
//! kernel's verdict from the console; stop everything; report.

use crate::console::{self, ConsoleReport, RESULT_MARKER, WORKLOAD_END_MARKER};
use crate::guest::{self, Companion, Guest};
use crate::qemu::{Accel, GuestSpec};
use crate::report::{DeviceSummary, GuestResult, KernelInfo, Summary};
use crate::supervise::Supervised;
use crate::{image, kernel, paths, setup};
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
    /// Fences the workload submits.
    #[arg(long, default_value_t = 2000)]
    pub fences: u32,
    /// Completion latency of every fence in fencelab-device (e.g. 0, 100us, 2ms).
    #[arg(long, default_value = "0")]
    pub latency: String,
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
    /// Harness self-test: SIGKILL fencelab-device once the workload starts
    /// (the run must fail and leave nothing behind).
    #[arg(long, hide = true)]
    pub kill_device_mid_run: bool,
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

impl BootArgs {
    /// The one command that repeats this run.
    fn reproduce(&self) -> String {
        let mut words = vec![
            "cargo xtask boot".to_owned(),
            format!("--workload {}", self.workload),
            format!("--fences {}", self.fences),
            format!("--latency {}", self.latency),
        ];
        words.extend(self.hammer_args.iter().map(|a| format!("--hammer-arg={a}")));
        words.join(" ")
    }
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
    Ok(())
}

fn step(message: impl AsRef<str>) {
    eprintln!("boot: {}", message.as_ref());
}

/// The last `n` lines of the device log above debug level: what it said
/// about its own state, without the per-fence chatter.
fn device_log_tail(path: &Path) -> String {
    crate::cmd::tail_matching(path, 5, |l| {
        !l.contains(" DEBUG ") && !l.contains(" TRACE ")
    })
}

/// Everything up to the summary; `Err` only when the run could not start.
pub fn execute(args: &BootArgs) -> Result<Summary> {
    let started = Instant::now();
    step("setup");
    let toolchain = setup::run()?;
    step("kernel");
    let kernel = kernel::build(&toolchain, &kernel::KernelArgs::default())?;
    step("image");
    let initramfs = image::build(&kernel)?;
    if args.accel == Accel::Kvm {
        probe_kvm(&kernel.bzimage, &initramfs)?;
    }
    step("building fencelab-device");
    let device_bin = build_device()?;

    let run_dir = guest::new_run_dir(&args.workload)?;
    let socket_dir = SocketDir::create()?;
    let socket = socket_dir.path().join("gpu.sock");
    step(format!("run folder {}", run_dir.display()));
    let prepared_secs = started.elapsed().as_secs_f64();

    let device_log = run_dir.join("device.log");
    let mut device = start_device(&device_bin, &socket, &args.latency, &device_log)?;
    wait_for_socket(&socket, &mut device, &device_log)?;

    let mut cmdline_extra = vec![format!("fencelab.workload={}", args.workload)];
    let mut hammer_args = vec![format!("--fences={}", args.fences)];
    hammer_args.extend(args.hammer_args.iter().cloned());
    cmdline_extra.push(format!("fencelab.args={}", hammer_args.join(",")));
    let spec = GuestSpec {
        kernel: kernel.bzimage.clone(),
        initramfs,
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
        name: "fencelab-device",
        log: &device_log,
        last_words: device_log_tail,
        kill_when_workload_starts: args.kill_device_mid_run,
    };
    guest.supervise(
        Some(companion),
        Duration::from_secs(args.timeout_secs),
        &mut failures,
    )?;
    let outcome = guest.finish()?;
    let device_status = match device.wait_for(Duration::from_secs(10))? {
        Some(status) => status,
        None => {
            failures.push("fencelab-device did not exit after QEMU disconnected".into());
            device.stop(Duration::from_secs(3))?
        }
    };
    let report = console::parse(&outcome.console);
    let device_summary = DeviceSummary::from_log(&device_log);

    let guest = judge_guest(args, &report, &mut failures);
    judge_device(
        &device_summary,
        guest.as_ref(),
        device_status.success(),
        &mut failures,
    );

    Ok(Summary::new(
        args,
        KernelInfo::from(&kernel),
        report,
        guest,
        device_summary,
        outcome.marks.result_after.map(|d| d.as_millis() as u64),
        prepared_secs,
        outcome.status.code(),
        run_dir,
        args.reproduce(),
        failures,
    ))
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
    probe.supervise(None, Duration::from_secs(PROBE_SECS), &mut failures)?;
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

/// Reads the guest result and checks what issue 2's contract requires.
fn judge_guest(
    args: &BootArgs,
    report: &ConsoleReport,
    failures: &mut Vec<String>,
) -> Option<GuestResult> {
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
    let guest: GuestResult = match serde_json::from_str(json) {
        Ok(guest) => guest,
        Err(error) => {
            failures.push(format!("unreadable {}line: {error}: {json}", RESULT_MARKER));
            return None;
        }
    };
    if !guest.ok {
        failures.push(format!(
            "workload {} reported failure: {}",
            guest.workload,
            guest.first_error.as_deref().unwrap_or("no error given")
        ));
    }
    if guest.fences_submitted != u64::from(args.fences) {
        failures.push(format!(
            "fence-hammer submitted {} fences, {} requested",
            guest.fences_submitted, args.fences
        ));
    }
    if guest.fences_signaled != guest.fences_submitted || guest.fence_errors != 0 {
        failures.push(format!(
            "fences: {} submitted, {} signaled, {} errors",
            guest.fences_submitted, guest.fences_signaled, guest.fence_errors
        ));
    }
    match report.workload_exit {
        Some(0) => {}
        Some(rc) => failures.push(format!("fence-hammer exited with {rc}")),
        None => failures.push(format!("the guest printed no {WORKLOAD_END_MARKER} line")),
    }
    Some(guest)
}

/// Cross-checks the device's own accounting against the guest's counts.
fn judge_device(
    device: &Option<DeviceSummary>,
    guest: Option<&GuestResult>,
    exited_ok: bool,
    failures: &mut Vec<String>,
) {
    let Some(device) = device else {
        failures.push("fencelab-device printed no summary line".into());
        return;
    };
    if !exited_ok {
        failures.push("fencelab-device exited with an error".into());
    }
    if let Some(guest) = guest {
        // The upstream driver also fences its own commands (display updates),
        // so the device may complete more fences than the workload submitted.
        if device.fences_completed < guest.fences_signaled {
            failures.push(format!(
                "accounting: the guest saw {} fences signaled but the device completed only {}",
                guest.fences_signaled, device.fences_completed
            ));
        }
    }
}

fn build_device() -> Result<PathBuf> {
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
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::workspace_root().join("target"));
    Ok(target.join("release").join("fencelab-device"))
}

/// Where this process puts the backend's socket; QEMU's and the backend's
/// command lines both name it, which is how leftovers can be found.
pub fn socket_dir_path() -> PathBuf {
    std::env::temp_dir().join(format!("fencelab-{}", std::process::id()))
}

/// A private, short socket folder (unix socket paths are limited to 108
/// bytes, and a clone may live deep in the file system), removed on drop.
struct SocketDir(PathBuf);

impl SocketDir {
    fn create() -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = socket_dir_path();
        let _ = fs::remove_dir_all(&dir);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating socket folder {}", dir.display()))?;
        Ok(Self(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn start_device(binary: &Path, socket: &Path, latency: &str, log: &Path) -> Result<Supervised> {
    step(format!(
        "starting fencelab-device (latency {latency}), log {}",
        log.display()
    ));
    let mut command = Command::new(binary);
    command
        .arg("--socket")
        .arg(socket)
        .arg("--latency")
        .arg(latency)
        .env(
            "RUST_LOG",
            std::env::var("FENCELAB_DEVICE_LOG")
                .unwrap_or_else(|_| "info,fencelab_device=debug".into()),
        )
        .stdin(Stdio::null())
        .stdout(File::create(log).with_context(|| format!("creating {}", log.display()))?)
        .stderr(File::options().append(true).open(log)?);
    Supervised::spawn("fencelab-device", command)
}

fn wait_for_socket(socket: &Path, device: &mut Supervised, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if socket.exists() {
            return Ok(());
        }
        if let Some(status) = device.try_status()? {
            bail!(
                "fencelab-device exited before listening ({status}):\n{}",
                device_log_tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "fencelab-device did not create {} within 10 s:\n{}",
        socket.display(),
        device_log_tail(log)
    )
}
