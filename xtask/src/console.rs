//! Reading the guest's serial console: the init's markers, the workload's
//! result line, and the kernel's own verdict (splats, see [`splat`]).
//!
//! Each splat records whether it happened before the workload started
//! (boot), during it or after it, because a boot-time splat is a finding
//! about the kernel, not about the fence paths under test.

mod prefix;
mod signature;
mod splat;
#[cfg(test)]
mod splat_fixtures;

use std::collections::BTreeMap;

pub use splat::{Phase, Splat};

/// Marker lines printed by `images/init` and fence-hammer.
pub const BOOT_MARKER: &str = "FENCELAB_BOOT";
pub const CONFIG_MARKER: &str = "FENCELAB_CONFIG ";
pub const WORKLOAD_START_MARKER: &str = "FENCELAB_WORKLOAD_START";
pub const WORKLOAD_END_MARKER: &str = "FENCELAB_WORKLOAD_END";
pub use fencelab_report::RESULT_MARKER;
pub const ERROR_MARKER: &str = "FENCELAB_ERROR";

/// Everything the host learns from the console.
#[derive(Debug, Default)]
pub struct ConsoleReport {
    pub booted_release: Option<String>,
    pub guest_config: BTreeMap<String, String>,
    pub workload_started: bool,
    pub workload_exit: Option<i32>,
    pub result_json: Option<String>,
    pub init_errors: Vec<String>,
    pub splats: Vec<Splat>,
}

/// The message of a console line: after the printk log level, timestamp
/// (`[   12.345678]`) and caller id (`[  T123]`), when it has them.
/// Indentation after the separating space is kept: KTAP nests by it.
pub fn printk_body(line: &str) -> &str {
    prefix::split(line).body
}

/// Parses a complete console log.
pub fn parse(console: &str) -> ConsoleReport {
    let mut report = ConsoleReport::default();
    let mut phase = Phase::Boot;
    let mut splats = splat::Scanner::default();
    for (index, raw) in console.lines().enumerate() {
        let split = prefix::split(raw);
        let line = split.body.trim_start();
        if let Some(rest) = line.strip_prefix(BOOT_MARKER) {
            report.booted_release = rest.trim().strip_prefix("release=").map(str::to_owned);
            continue;
        }
        if let Some(rest) = line.strip_prefix(CONFIG_MARKER) {
            if let Some((key, value)) = rest.trim().split_once('=') {
                report.guest_config.insert(key.to_owned(), value.to_owned());
            }
            continue;
        }
        if line.starts_with(WORKLOAD_START_MARKER) {
            report.workload_started = true;
            phase = Phase::Workload;
            continue;
        }
        if let Some(rest) = line.strip_prefix(WORKLOAD_END_MARKER) {
            report.workload_exit = rest
                .trim()
                .strip_prefix("rc=")
                .and_then(|rc| rc.parse().ok());
            phase = Phase::Shutdown;
            continue;
        }
        if let Some(json) = line.strip_prefix(RESULT_MARKER) {
            report.result_json = Some(json.trim().to_owned());
            continue;
        }
        if line.starts_with(ERROR_MARKER) {
            report.init_errors.push(line.to_owned());
            continue;
        }
        splats.feed(index, split, phase);
    }
    report.splats = splats.finish();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    const KASAN_DURING: &str = "\
[    1.000000] Run /init as init process
FENCELAB_BOOT release=7.3.4
FENCELAB_CONFIG CONFIG_RUST=y
FENCELAB_CONFIG CONFIG_KASAN=y
FENCELAB_WORKLOAD_START workload=smoke
[   12.101010] ==================================================================
[   12.101011] BUG: KASAN: slab-use-after-free in dma_fence_signal_timestamp_locked+0x2c/0x300
[   12.101012] Read of size 8 at addr ffff888003a1c2d8 by task kworker/0:1/23
[   12.101013] 
[   12.101014] CPU: 0 UID: 0 PID: 23 Comm: kworker/0:1 Not tainted 7.3.4 #1
[   12.101015] Call Trace:
[   12.101016]  <TASK>
[   12.101017]  dump_stack_lvl+0x73/0xb0
[   12.101018]  print_report+0xd1/0x650
[   12.101019] WARNING: this line is part of the report, not a new splat
[   12.101020] ==================================================================
FENCELAB_RESULT {\"ok\":true}
FENCELAB_WORKLOAD_END rc=0
";

    #[test]
    fn finds_kasan_during_workload_once() {
        let report = parse(KASAN_DURING);
        assert_eq!(report.booted_release.as_deref(), Some("7.3.4"));
        assert_eq!(
            report.guest_config.get("CONFIG_RUST").map(String::as_str),
            Some("y")
        );
        assert!(report.workload_started);
        assert_eq!(report.workload_exit, Some(0));
        assert_eq!(report.result_json.as_deref(), Some("{\"ok\":true}"));
        assert_eq!(report.splats.len(), 1, "{:#?}", report.splats);
        let splat = &report.splats[0];
        assert_eq!(splat.class, "kasan");
        assert_eq!(splat.phase, Phase::Workload);
        assert!(
            splat
                .title
                .starts_with("BUG: KASAN: slab-use-after-free in dma_fence_signal")
        );
        assert!(splat.excerpt.iter().any(|l| l.contains("Read of size 8")));
    }

    #[test]
    fn warning_with_cut_here_block_is_one_splat_before_workload() {
        let log = "\
[    0.500000] ------------[ cut here ]------------
[    0.500001] WARNING: CPU: 1 PID: 1 at drivers/dma-buf/dma-fence.c:1042 dma_fence_set_deadline+0x5a/0x80
[    0.500002] Modules linked in:
[    0.500003] RIP: 0010:dma_fence_set_deadline+0x5a/0x80
[    0.500004] ---[ end trace 0000000000000000 ]---
FENCELAB_WORKLOAD_START workload=smoke
";
        let report = parse(log);
        assert_eq!(report.splats.len(), 1);
        assert_eq!(report.splats[0].class, "warning");
        assert_eq!(report.splats[0].phase, Phase::Boot);
        // The cut-here line belongs to the splat: its excerpt starts there.
        assert_eq!(report.splats[0].line, 1);
        assert_eq!(
            report.splats[0].excerpt[0],
            "------------[ cut here ]------------"
        );
        assert_eq!(
            report.splats[0].title,
            "WARNING: CPU: 1 PID: 1 at drivers/dma-buf/dma-fence.c:1042 dma_fence_set_deadline+0x5a/0x80"
        );
        assert!(report.splats[0].summary().contains("before workload"));
    }

    #[test]
    fn recognises_lockdep_rcu_hung_task_and_oops() {
        let log = "\
FENCELAB_WORKLOAD_START workload=smoke
[   20.0] ======================================================
[   20.1] WARNING: possible circular locking dependency detected
[   20.2] 7.3.4 #1 Not tainted
[   20.3] ------------------------------------------------------
";
        let report = parse(log);
        // The lockdep banner carries `WARNING:` too; the specific class wins.
        assert_eq!(report.splats[0].class, "lockdep-circular");

        let cases = [
            ("[ 5.0] WARNING: suspicious RCU usage", "suspicious-rcu"),
            (
                "[ 5.0] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
                "rcu-stall",
            ),
            (
                "[ 5.0] INFO: task fence-hammer:80 blocked for more than 122 seconds.",
                "hung-task",
            ),
            (
                "[ 5.0] Oops: general protection fault, probably for non-canonical address",
                "gpf",
            ),
            ("[ 5.0] Oops: 0000 [#1] PREEMPT SMP KASAN", "oops"),
            (
                "[ 5.0] BUG: sleeping function called from invalid context at kernel/locking/mutex.c:580",
                "sleep-in-atomic",
            ),
            (
                "[ 5.0] Kernel panic - not syncing: Fatal exception",
                "panic",
            ),
            (
                "[ 5.0] kernel BUG at drivers/dma-buf/dma-fence.c:100!",
                "kernel-bug",
            ),
        ];
        for (line, class) in cases {
            let report = parse(line);
            assert_eq!(report.splats.len(), 1, "{line}");
            assert_eq!(report.splats[0].class, class, "{line}");
        }
    }

    #[test]
    fn clean_log_has_no_splats_and_keeps_markers() {
        let log = "\
[    0.000000] Linux version 7.3.4 (root@host) (Debian clang version 19.1.7)
[    2.000000] [drm] features: +virgl +edid -resource_blob -host_visible
FENCELAB_BOOT release=7.3.4
FENCELAB_ERROR modprobe virtio_gpu failed
";
        let report = parse(log);
        assert!(report.splats.is_empty(), "{:?}", report.splats);
        assert_eq!(
            report.init_errors,
            vec!["FENCELAB_ERROR modprobe virtio_gpu failed"]
        );
        assert!(!report.workload_started);
        assert!(report.result_json.is_none());
    }

    #[test]
    fn strips_printk_prefixes_only() {
        assert_eq!(printk_body("[   12.345678] BUG: x"), "BUG: x");
        assert_eq!(printk_body("[   12.345678][  T123] BUG: x"), "BUG: x");
        assert_eq!(printk_body("[drm] features"), "[drm] features");
    }
}
