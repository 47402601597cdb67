//! The QEMU command line for a fencelab guest: q35 with shared memfd RAM (the
//! vhost-user backend maps guest memory), `vhost-user-gpu-pci` on the
//! backend's socket, no display, serial console on stdio.

use std::path::{Path, PathBuf};
use std::process::Command;

pub const QEMU: &str = "qemu-system-x86_64";

/// How the guest CPU is emulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Multi-threaded TCG: works everywhere, including nested-virt-less VMs.
    Tcg,
    /// KVM, after a probe boot proves a guest gets to its init under it
    /// (on the build VMs it hangs at "Decompressing Linux...").
    Kvm,
}

/// Everything that varies between boots.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The fencelab-device socket; `None` boots without a GPU (KUnit runs).
    pub gpu_socket: Option<PathBuf>,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accel: Accel,
    /// Extra `key=value` words for the kernel command line (read by /init).
    pub cmdline_extra: Vec<String>,
}

/// QEMU options beyond the guest itself, for the lifecycle tests
/// (`xtask/src/lifecycle.rs`); every other boot uses the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extras {
    /// Serve QMP on this unix socket (`system_reset`, `query-status`…).
    pub qmp_socket: Option<PathBuf>,
    /// The GPU chardev's `reconnect-ms` (QEMU 10's spelling of the older
    /// `reconnect` seconds): reconnect to the backend socket this often
    /// after losing it. QEMU 10.0.2's vhost-user-gpu-pci cannot start with
    /// it (`lifecycle.rs` checks what happens).
    pub gpu_reconnect_ms: Option<u32>,
    /// Let a guest reset reboot the guest. Without it (`-no-reboot`, the
    /// default) any reset, QMP's `system_reset` included, ends QEMU.
    pub allow_reboot: bool,
}

impl GuestSpec {
    /// The kernel command line: serial console, no reboot on panic (QEMU
    /// exits instead, and we report it), plus the workload parameters.
    pub fn cmdline(&self) -> String {
        let mut words = vec![
            "console=ttyS0".to_owned(),
            "panic=-1".to_owned(),
            "kasan.fault=report".to_owned(),
            // Under TCG on a loaded host the IO-APIC timer check can miss
            // its ticks and panic ("IO-APIC + timer doesn't work!") before
            // the init; virtual machines skip that check.
            "no_timer_check".to_owned(),
            "rdinit=/init".to_owned(),
        ];
        words.extend(self.cmdline_extra.iter().cloned());
        words.join(" ")
    }

    /// Arguments after the program name.
    pub fn args(&self) -> Vec<String> {
        self.args_with(&Extras::default())
    }

    /// Arguments after the program name, with `extras`.
    pub fn args_with(&self, extras: &Extras) -> Vec<String> {
        let accel = match self.accel {
            Accel::Tcg => "tcg,thread=multi",
            Accel::Kvm => "kvm",
        };
        // 5-level paging (la57) made KASAN+Rust kernels report wild accesses
        // during early boot under TCG on these machines, and `-cpu host`
        // aborts on them (MSR 0x10a): `max` without la57 for both (DESIGN.md §3).
        let cpu = "max,-la57";
        let mem = format!("{}M", self.memory_mib);
        let mut args: Vec<String> = vec!["-machine".into()];
        match &self.gpu_socket {
            // The vhost-user backend maps guest RAM, so it must be a shared memfd.
            Some(socket) => args.extend([
                "q35,memory-backend=mem".into(),
                "-object".into(),
                format!("memory-backend-memfd,id=mem,size={mem},share=on"),
                "-chardev".into(),
                match extras.gpu_reconnect_ms {
                    Some(ms) => {
                        format!("socket,id=vgpu,path={},reconnect-ms={ms}", path_arg(socket))
                    }
                    None => format!("socket,id=vgpu,path={}", path_arg(socket)),
                },
                "-device".into(),
                "vhost-user-gpu-pci,chardev=vgpu".into(),
            ]),
            None => args.push("q35".into()),
        }
        args.extend([
            "-accel".into(),
            accel.into(),
            "-cpu".into(),
            cpu.into(),
            "-smp".into(),
            self.cpus.to_string(),
            "-m".into(),
            mem,
            "-display".into(),
            "none".into(),
            "-nodefaults".into(),
            "-no-user-config".into(),
        ]);
        if !extras.allow_reboot {
            args.push("-no-reboot".into());
        }
        if let Some(qmp) = &extras.qmp_socket {
            args.extend([
                "-qmp".into(),
                format!("unix:{},server=on,wait=off", path_arg(qmp)),
            ]);
        }
        args.extend([
            "-monitor".into(),
            "none".into(),
            "-serial".into(),
            "stdio".into(),
            "-kernel".into(),
            path_arg(&self.kernel),
            "-initrd".into(),
            path_arg(&self.initramfs),
            "-append".into(),
            self.cmdline(),
        ]);
        args
    }

    pub fn command(&self) -> Command {
        self.command_with(&Extras::default())
    }

    /// [`GuestSpec::command`] with `extras`.
    pub fn command_with(&self, extras: &Extras) -> Command {
        let mut command = Command::new(QEMU);
        command.args(self.args_with(extras));
        command
    }
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> GuestSpec {
        GuestSpec {
            kernel: "/c/bzImage".into(),
            initramfs: "/c/init.cpio.gz".into(),
            gpu_socket: Some("/r/gpu.sock".into()),
            memory_mib: 2048,
            cpus: 2,
            accel: Accel::Tcg,
            cmdline_extra: vec!["fencelab.workload=smoke".into()],
        }
    }

    fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn memory_is_shared_memfd_backing_the_machine() {
        let args = spec().args();
        assert_eq!(value_after(&args, "-machine"), ["q35,memory-backend=mem"]);
        assert_eq!(
            value_after(&args, "-object"),
            ["memory-backend-memfd,id=mem,size=2048M,share=on"]
        );
        assert_eq!(value_after(&args, "-m"), ["2048M"]);
    }

    #[test]
    fn gpu_is_vhost_user_on_the_backend_socket() {
        let args = spec().args();
        assert_eq!(
            value_after(&args, "-chardev"),
            ["socket,id=vgpu,path=/r/gpu.sock"]
        );
        assert_eq!(
            value_after(&args, "-device"),
            ["vhost-user-gpu-pci,chardev=vgpu"]
        );
        assert_eq!(value_after(&args, "-display"), ["none"]);
    }

    #[test]
    fn without_a_gpu_there_is_no_vhost_user_device() {
        let spec = GuestSpec {
            gpu_socket: None,
            ..spec()
        };
        let args = spec.args();
        assert_eq!(value_after(&args, "-machine"), ["q35"]);
        assert!(value_after(&args, "-device").is_empty());
        assert!(value_after(&args, "-object").is_empty());
    }

    #[test]
    fn extras_add_qmp_reconnect_and_allow_reboot() {
        let plain = spec().args();
        assert!(plain.iter().any(|a| a == "-no-reboot"));
        assert!(value_after(&plain, "-qmp").is_empty());
        assert_eq!(plain, spec().args_with(&Extras::default()));

        let extras = Extras {
            qmp_socket: Some("/r/qmp.sock".into()),
            gpu_reconnect_ms: Some(500),
            allow_reboot: true,
        };
        let args = spec().args_with(&extras);
        assert_eq!(
            value_after(&args, "-qmp"),
            ["unix:/r/qmp.sock,server=on,wait=off"]
        );
        assert_eq!(
            value_after(&args, "-chardev"),
            ["socket,id=vgpu,path=/r/gpu.sock,reconnect-ms=500"]
        );
        assert!(!args.iter().any(|a| a == "-no-reboot"));
        // QMP replaces neither the serial console nor the disabled monitor.
        assert_eq!(value_after(&args, "-serial"), ["stdio"]);
        assert_eq!(value_after(&args, "-monitor"), ["none"]);
    }

    #[test]
    fn tcg_avoids_la57_and_cmdline_carries_workload() {
        let args = spec().args();
        assert_eq!(value_after(&args, "-accel"), ["tcg,thread=multi"]);
        assert_eq!(value_after(&args, "-cpu"), ["max,-la57"]);
        let cmdline = value_after(&args, "-append")[0];
        assert!(cmdline.starts_with("console=ttyS0 panic=-1"));
        assert!(cmdline.ends_with("fencelab.workload=smoke"));
    }
}
