//! fencelab_drm's debugfs file: the driver's own counters (ordering
//! violations, job timeouts, deadline hints sent and dropped), read at the
//! end of a workload so the report can say what the driver did, not only
//! what userspace and the device saw.

use fencelab_report::DriverTotals;

/// The driver's debugfs file: one line per timeline, then the totals.
pub const TIMELINES: &str = "/sys/kernel/debug/fencelab_drm/timelines";

/// Reads the totals; `None` when fencelab_drm is not loaded (or debugfs is
/// not mounted) or the file has no totals line.
pub fn read_totals() -> Option<DriverTotals> {
    parse_totals(&std::fs::read_to_string(TIMELINES).ok()?)
}

/// Parses the `total key=value ...` line of the file.
pub fn parse_totals(text: &str) -> Option<DriverTotals> {
    let line = text.lines().find(|l| l.starts_with("total "))?;
    let value = |key: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
    };
    Some(DriverTotals {
        ordering_violations: value("ordering_violations")?,
        timeouts: value("timeouts")?,
        hints_sent: value("hints_sent")?,
        hints_dropped: value("hints_dropped")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_parse_the_debugfs_line() {
        let text = "device_ctx fence_ctx last_submitted\n1 5 3 2 1 2 0 0 1\ntotal submitted=3 completed=2 errors=0 timeouts=4 cancelled=0 ordering_violations=7 pending=1 late_answers=0 bad_answers=0 unfenced_errors=0 hints_sent=9 hints_dropped=2\n";
        let t = parse_totals(text).unwrap();
        assert_eq!(
            (
                t.ordering_violations,
                t.timeouts,
                t.hints_sent,
                t.hints_dropped
            ),
            (7, 4, 9, 2)
        );
        assert!(parse_totals("no totals here").is_none());
        assert!(parse_totals("total submitted=1").is_none());
    }
}
