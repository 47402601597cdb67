//! The bench's printed table: one section per item of issue 7, each with
//! what limits its figures.

use super::guest_runs::ErrorUs;
use super::{Figures, LatencyAccuracy, RoundTrip};
use crate::latency::human_us;
use fencelab_report::RttUs;
use std::fmt::Write;

/// Left-aligned columns, two spaces apart, each row indented by two.
fn columns(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows.iter().map(Vec::len).max().unwrap_or(0))
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
            .collect();
        let _ = writeln!(out, "  {}", cells.join("  ").trim_end());
    }
    out
}

fn or_dash<T>(value: Option<T>, show: impl Fn(T) -> String) -> String {
    value.map_or_else(|| "-".into(), show)
}

fn us(value: Option<f64>) -> String {
    or_dash(value, |v| {
        if v < 0.0 {
            format!("-{}", human_us(-v))
        } else {
            human_us(v)
        }
    })
}

/// `p50 / p99 / max` of round trips.
fn rtt_triple(rtt: &RttUs) -> String {
    let at = |v: Option<u64>| us(v.map(|v| v as f64));
    format!("{} / {} / {}", at(rtt.p50), at(rtt.p99), at(rtt.max))
}

/// `p50 / p99 / max` of errors.
fn error_triple(e: &ErrorUs) -> String {
    format!("{} / {} / {}", us(e.p50), us(e.p99), us(e.max))
}

fn header(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

fn round_trip_rows(rows: &[RoundTrip]) -> String {
    let mut table = vec![header(&[
        "backend",
        "guest driver",
        "timelines",
        "fences/s",
        "round trip p50 / p99 / max",
        "backend CPU per 1000 fences",
        "backend peak RSS",
    ])];
    let mut errors = String::new();
    for r in rows {
        table.push(vec![
            r.backend.name().into(),
            r.driver.into(),
            r.timelines.to_string(),
            or_dash(r.fences_per_s, |v| format!("{v:.0}")),
            rtt_triple(&r.rtt_us),
            or_dash(r.backend_cpu_ms_per_1000_fences, |v| format!("{v:.1} ms")),
            or_dash(r.backend_peak_rss_kib, |v| format!("{v} KiB")),
        ]);
        if let Some(error) = &r.error {
            let _ = writeln!(
                errors,
                "  ! {} / {} / {} timeline(s): {error}{}",
                r.backend.name(),
                r.driver,
                r.timelines,
                r.run_dir
                    .as_ref()
                    .map_or(String::new(), |d| format!(" ({})", d.display()))
            );
        }
    }
    columns(&table) + &errors
}

fn latency_rows(rows: &[LatencyAccuracy]) -> String {
    let mut table = vec![header(&[
        "injected",
        "guest round trip p50 / p99 / max",
        "guest error p50 / p99 / max",
        "device error p50 / p99 / max",
    ])];
    let mut errors = String::new();
    for r in rows {
        table.push(vec![
            r.injected.clone(),
            rtt_triple(&r.guest_rtt_us),
            error_triple(&r.guest_error_us),
            error_triple(&r.device_error_us),
        ]);
        if let Some(error) = &r.error {
            let _ = writeln!(errors, "  ! {}: {error}", r.injected);
        }
    }
    columns(&table) + &errors
}

/// What limits the figures, printed under them.
const LIMITS: &str = "\
limits:
  - the guest runs under TCG (no KVM on these machines): every guest-side figure (fences/s, round trips,
    guest error) is dominated by emulated interrupt delivery and the guest's scheduler, not by the backend;
    compare backends within one run, not across machines
  - round trips are with one fence in flight per timeline and no WRITE read-back (the peer runs no fencelab
    command stream); virtio_gpu puts every context on one fence timeline and signals in order
  - device error is the engine's timer (timerfd, 1 ns slack) plus its wake-up on a loaded 2-core host;
    guest error adds the virtqueue, the interrupt and fence-hammer's poll() wake-up
  - backend CPU per 1000 fences counts from the workload's start (/proc stat, 10 ms ticks) to the backend's
    exit, so it includes the guest's power-off and, for fencelab-device, its trace and debug log; the
    in-process figure excludes the guest entirely
  - criterion figures vary by about ±10–15 % on this shared machine
";

pub fn render(f: &Figures) -> String {
    let mut out = String::new();
    if !f.round_trip.is_empty() {
        out += "fence round trip (zero injected latency, one fence in flight per timeline)\n";
        out += &round_trip_rows(&f.round_trip);
        let ratio = |timelines| {
            or_dash(
                super::guest_runs::ratio_to_peer(&f.round_trip, timelines),
                |r| format!("{r:.2}×"),
            )
        };
        let _ = writeln!(
            out,
            "  fences/s of fencelab-device over vhost-device-gpu through virtio_gpu: {} on 1 timeline, {} on 4",
            ratio(1),
            ratio(4)
        );
    }
    if !f.latency.is_empty() {
        out += "\nlatency-injection accuracy (fencelab-device, virtio_gpu, 1 timeline; error = observed − injected)\n";
        out += &latency_rows(&f.latency);
    }
    out += "\nbackend cost\n";
    let mut cost = Vec::new();
    if let Some(m) = &f.memory {
        cost.push(vec![
            "RSS after 10 k / 1 M fences (in-process)".into(),
            format!(
                "{} KiB / {} KiB (growth {} KiB; trace: {})",
                m.rss_kib_after_small, m.rss_kib_after_large, m.rss_growth_kib, m.trace
            ),
        ]);
        cost.push(vec![
            "CPU per 1000 fences (in-process)".into(),
            format!(
                "{:.1} ms backend threads, {:.1} ms with the frontend; {:.0} fences/s",
                m.backend_cpu_ms_per_1000_fences, m.cpu_ms_per_1000_fences, m.fences_per_s
            ),
        ]);
    }
    cost.push(vec![
        "CPU per 1000 fences (in a boot)".into(),
        "the \"backend CPU\" column above".into(),
    ]);
    out += &columns(&cost);
    out += "\nboot\n";
    out += &columns(&[
        vec![
            "warm boot → first result (median)".into(),
            or_dash(f.boot.warm_boot_to_result_s, |s| format!("{s:.1} s")),
        ],
        vec![
            "QEMU start → workload (median)".into(),
            or_dash(f.boot.qemu_to_workload_ms_p50, |ms| {
                format!("{:.1} s", ms as f64 / 1000.0)
            }),
        ],
        vec![
            "cold kernel build".into(),
            or_dash(f.boot.cold_kernel_build_s, |s| {
                format!(
                    "{}{}",
                    crate::cmd::human_duration(std::time::Duration::from_secs_f64(s)),
                    f.boot
                        .cold_kernel_build_record
                        .as_ref()
                        .map_or(String::new(), |r| format!(" ({r})"))
                )
            }),
        ],
    ]);
    if !f.criterion.is_empty() {
        out += "\nin-process (criterion, median)\n";
        let rows: Vec<Vec<String>> = f
            .criterion
            .iter()
            .map(|c| {
                vec![
                    c.id.clone(),
                    format!("{:.0} ns", c.median_ns),
                    or_dash(c.per_s, |p| format!("{:.2} M/s", p / 1e6)),
                ]
            })
            .collect();
        out += &columns(&rows);
    }
    if !f.unavailable.is_empty() {
        out += "\nnot measured\n";
        for why in &f.unavailable {
            let _ = writeln!(out, "  - {why}");
        }
    }
    let _ = writeln!(out, "\n{LIMITS}\nbench took {:.0} s", f.elapsed_s);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::Backend;

    #[test]
    fn columns_line_up_and_rows_may_be_short() {
        let text = columns(&[
            vec!["a".into(), "bbb".into(), "c".into()],
            vec!["dddd".into(), "e".into()],
        ]);
        assert_eq!(text, "  a     bbb  c\n  dddd  e\n");
    }

    #[test]
    fn failed_runs_show_their_error_and_missing_figures_a_dash() {
        let ok = RoundTrip {
            fences: 1000,
            fences_per_s: Some(312.4),
            rtt_us: RttUs {
                p50: Some(2900),
                p99: Some(6100),
                max: Some(12000),
            },
            backend_cpu_ms_per_1000_fences: Some(41.25),
            backend_peak_rss_kib: Some(9000),
            ..RoundTrip::unmeasured(Backend::Fencelab, "virtio_gpu", 1)
        };
        let failed = RoundTrip {
            error: Some("QEMU exited".into()),
            ..RoundTrip::unmeasured(Backend::VhostDeviceGpu, "virtio_gpu", 1)
        };
        let text = round_trip_rows(&[ok, failed]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].contains("312"), "{text}");
        assert!(lines[1].contains("2.9 ms / 6.1 ms / 12 ms"), "{text}");
        assert!(lines[1].contains("41.2 ms"), "{text}");
        assert!(lines[2].contains("- / - / -"), "{text}");
        assert_eq!(
            lines[3],
            "  ! vhost-device-gpu / virtio_gpu / 1 timeline(s): QEMU exited"
        );

        let row = LatencyAccuracy {
            injected: "50us".into(),
            injected_us: 50.0,
            fences: 300,
            guest_rtt_us: RttUs {
                p50: Some(3050),
                p99: Some(5050),
                max: Some(9050),
            },
            guest_error_us: ErrorUs {
                p50: Some(3000.0),
                p99: Some(5000.0),
                max: Some(9000.0),
            },
            device_error_us: ErrorUs {
                p50: Some(-0.5),
                p99: Some(80.0),
                max: None,
            },
            run_dir: None,
            error: None,
        };
        let text = latency_rows(&[row]);
        assert!(text.contains("3 ms / 5 ms / 9 ms"), "{text}");
        assert!(text.contains("-0.5 µs / 80 µs / -"), "{text}");
    }
}
