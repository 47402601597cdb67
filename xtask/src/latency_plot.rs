//! `latency.svg`: one panel per timeline, the distribution of the latency
//! the plan injected against the one the guest observed, as step histograms
//! over log-spaced buckets (ten per decade), so a 2 ms plan and a 40 µs
//! device overhead are both readable.

use crate::latency::{Distributions, Latencies, fences, human_us};
use anyhow::{Context, Result, anyhow};
use hdrhistogram::Histogram;
use plotters::prelude::*;
use std::path::Path;

/// Panels drawn; beyond that the smallest timelines share the last one.
const MAX_PANELS: usize = 8;
const WIDTH: u32 = 960;
const PANEL_HEIGHT: u32 = 280;
const TITLE_HEIGHT: u32 = 50;
const BUCKETS_PER_DECADE: f64 = 10.0;
/// The x axis starts no lower than this (µs); anything below is drawn in
/// the first bucket (a plan of 0 ns injects "nothing").
const MIN_AXIS_US: f64 = 0.1;

const INJECTED: RGBColor = RGBColor(31, 119, 180);
const OBSERVED: RGBColor = RGBColor(214, 39, 40);

/// Renders the SVG for `latencies` to `path`; `title` heads the figure.
pub fn write_svg(latencies: &Latencies, title: &str, path: &Path) -> Result<()> {
    let svg = render_svg(latencies, title)?;
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}

/// The SVG document for `latencies`.
pub fn render_svg(latencies: &Latencies, title: &str) -> Result<String> {
    let panels = panels(latencies);
    let height = TITLE_HEIGHT + PANEL_HEIGHT * panels.len().max(1) as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let (head, body) = root.split_vertically(TITLE_HEIGHT);
        head.draw(&Text::new(
            title.to_owned(),
            (10, 8),
            ("sans-serif", 18).into_font(),
        ))
        .map_err(draw_error)?;
        for (x, color, label) in [
            (10, INJECTED, "injected: the plan's latency (due − arrival)"),
            (380, OBSERVED, "observed: completion − arrival"),
        ] {
            head.draw(&PathElement::new(
                vec![(x, 37), (x + 24, 37)],
                color.stroke_width(3),
            ))
            .map_err(draw_error)?;
            head.draw(&Text::new(
                label.to_owned(),
                (x + 30, 30),
                ("sans-serif", 13).into_font(),
            ))
            .map_err(draw_error)?;
        }
        if panels.is_empty() {
            body.draw(&Text::new(
                "no fences in the trace".to_owned(),
                (10, 20),
                ("sans-serif", 14).into_font(),
            ))
            .map_err(draw_error)?;
        }
        let areas = body.split_evenly((panels.len().max(1), 1));
        for (area, panel) in areas.iter().zip(&panels) {
            draw_panel(area, panel)?;
        }
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

fn draw_error<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow!("drawing the latency figure: {e}")
}

/// What one panel shows.
struct Panel {
    caption: String,
    injected: Histogram<u64>,
    observed: Histogram<u64>,
}

/// One panel per timeline, the largest first when they do not all fit;
/// the rest are summed into the last panel.
fn panels(latencies: &Latencies) -> Vec<Panel> {
    let mut timelines: Vec<(&str, &Distributions)> = latencies.timelines().collect();
    if timelines.len() > MAX_PANELS {
        timelines.sort_by_key(|(name, d)| (std::cmp::Reverse(d.observed.len()), *name));
    }
    let own = timelines.len().min(if timelines.len() > MAX_PANELS {
        MAX_PANELS - 1
    } else {
        MAX_PANELS
    });
    let mut panels: Vec<Panel> = timelines[..own]
        .iter()
        .map(|(name, d)| Panel {
            caption: caption(&format!("timeline {name}"), &d.injected, &d.observed),
            injected: d.injected.clone(),
            observed: d.observed.clone(),
        })
        .collect();
    if let Some(((_, first), rest)) = timelines[own..].split_first() {
        let (mut injected, mut observed) = (first.injected.clone(), first.observed.clone());
        for (_, d) in rest {
            // Same bounds and precision everywhere: adding cannot fail.
            let _ = injected.add(&d.injected);
            let _ = observed.add(&d.observed);
        }
        let label = format!("{} other timelines", timelines.len() - own);
        panels.push(Panel {
            caption: caption(&label, &injected, &observed),
            injected,
            observed,
        });
    }
    panels
}

fn caption(what: &str, injected: &Histogram<u64>, observed: &Histogram<u64>) -> String {
    let p = |h: &Histogram<u64>, q: f64| {
        if h.is_empty() {
            "-".to_owned()
        } else {
            human_us(h.value_at_quantile(q) as f64 / 1000.0)
        }
    };
    format!(
        "{what}: {} · injected p50 {} / p99 {} · observed p50 {} / p99 {}",
        fences(observed.len()),
        p(injected, 0.5),
        p(injected, 0.99),
        p(observed, 0.5),
        p(observed, 0.99)
    )
}

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    panel: &Panel,
) -> Result<()> {
    let (lo_us, hi_us) = axis_range(&[&panel.injected, &panel.observed]);
    let edges = bucket_edges(lo_us, hi_us);
    let injected = steps(&panel.injected, &edges);
    let observed = steps(&panel.observed, &edges);
    let top = injected
        .iter()
        .chain(&observed)
        .map(|&(_, y)| y)
        .fold(0.0_f64, f64::max)
        .max(1.0)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.caption, ("sans-serif", 15))
        .margin(8)
        .margin_right(30)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d((lo_us..hi_us).log_scale(), 0.0..top)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc("latency (log scale)")
        .y_desc("fences (%)")
        .x_label_formatter(&|&us| human_us(us))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .y_labels(6)
        .light_line_style(BLACK.mix(0.04))
        .draw()
        .map_err(draw_error)?;
    for (points, color) in [(injected, INJECTED), (observed, OBSERVED)] {
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(draw_error)?;
    }
    Ok(())
}

/// Whole decades (µs) around every recorded value.
fn axis_range(histograms: &[&Histogram<u64>]) -> (f64, f64) {
    let present: Vec<&&Histogram<u64>> = histograms.iter().filter(|h| !h.is_empty()).collect();
    let min_us = present
        .iter()
        .map(|h| h.min() as f64 / 1000.0)
        .fold(f64::INFINITY, f64::min);
    let max_us = present
        .iter()
        .map(|h| h.max() as f64 / 1000.0)
        .fold(0.0_f64, f64::max);
    if present.is_empty() {
        return (1.0, 1000.0);
    }
    let lo = 10f64.powf(min_us.max(MIN_AXIS_US).log10().floor());
    let hi = 10f64.powf(max_us.max(lo).log10().floor() + 1.0);
    (lo, hi)
}

/// Log-spaced bucket edges (µs) from `lo` to `hi`.
fn bucket_edges(lo: f64, hi: f64) -> Vec<f64> {
    let steps = ((hi / lo).log10() * BUCKETS_PER_DECADE).round() as i32;
    (0..=steps)
        .map(|k| lo * 10f64.powf(f64::from(k) / BUCKETS_PER_DECADE))
        .collect()
}

/// The histogram as a step line: per bucket, the percentage of its values
/// in it (values below the first edge count in the first bucket, above the
/// last in the last).
fn steps(histogram: &Histogram<u64>, edges: &[f64]) -> Vec<(f64, f64)> {
    let buckets = edges.len() - 1;
    let mut counts = vec![0u64; buckets];
    for value in histogram.iter_recorded() {
        let us = histogram.median_equivalent(value.value_iterated_to()) as f64 / 1000.0;
        let bucket = edges[1..]
            .partition_point(|&edge| edge <= us)
            .min(buckets - 1);
        counts[bucket] += value.count_at_value();
    }
    let total = histogram.len().max(1) as f64;
    let mut points = vec![(edges[0], 0.0)];
    for (pair, count) in edges.windows(2).zip(counts) {
        let percent = 100.0 * count as f64 / total;
        points.push((pair[0], percent));
        points.push((pair[1], percent));
    }
    points.push((edges[buckets], 0.0));
    points
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::junit::tests::{Element, parse};
    use crate::latency::tests::synthetic_trace;

    fn texts(element: &Element, out: &mut Vec<String>) {
        if !element.text.trim().is_empty() {
            out.push(element.text.trim().to_owned());
        }
        for child in &element.children {
            texts(child, out);
        }
    }

    #[test]
    fn the_svg_is_well_formed_and_names_every_timeline() {
        let latencies = Latencies::from_reader(synthetic_trace().as_bytes(), "synthetic").unwrap();
        let svg = render_svg(&latencies, "run 1795249174-smoke & <friends>").unwrap();
        let root = parse(&svg);
        assert_eq!(root.name, "svg");
        let mut all = Vec::new();
        texts(&root, &mut all);
        let all = all.join("\n");
        for wanted in [
            "run 1795249174-smoke & <friends>",
            "timeline 1.0: 1000 fences · injected p50 500 µs / p99 990 µs · observed p50 550 µs / p99 1.04 ms",
            "timeline 2.0: 201 fences",
            "latency (log scale)",
            "fences (%)",
            "injected: the plan's latency (due − arrival)",
            "observed: completion − arrival",
        ] {
            assert!(
                all.contains(wanted),
                "no {wanted:?} in the SVG's text:\n{all}"
            );
        }
        // Two panels, each with an injected and an observed line, and the
        // legend marks in the header.
        assert_eq!(svg.matches("stroke=\"#1F77B4\"").count(), 3, "{svg}");
        assert_eq!(svg.matches("stroke=\"#D62728\"").count(), 3, "{svg}");
    }

    #[test]
    fn buckets_put_each_value_once_and_steps_sum_to_all_of_them() {
        let latencies = Latencies::from_reader(synthetic_trace().as_bytes(), "synthetic").unwrap();
        let (_, one) = latencies.timelines().next().unwrap();
        let (lo, hi) = axis_range(&[&one.injected, &one.observed]);
        assert_eq!((lo, hi), (1.0, 10_000.0));
        let edges = bucket_edges(lo, hi);
        assert_eq!(edges.len(), 41);
        for histogram in [&one.injected, &one.observed] {
            let points = steps(histogram, &edges);
            let sum: f64 = points[1..points.len() - 1]
                .iter()
                .step_by(2)
                .map(|p| p.1)
                .sum();
            assert!((sum - 100.0).abs() < 1e-6, "{sum}");
        }
    }

    #[test]
    fn many_timelines_share_the_last_panel_and_an_empty_trace_says_so() {
        let mut trace = String::new();
        for ctx in 1..=12u64 {
            for fence in 0..ctx {
                let (t, id) = (1000 * fence, ctx * 100 + fence);
                trace.push_str(&format!(
                    "{{\"event\":\"decide\",\"t_ns\":{t},\"timeline\":\"{ctx}.0\",\"fence\":{id},\"due_ns\":{}}}\n\
                     {{\"event\":\"complete\",\"t_ns\":{},\"timeline\":\"{ctx}.0\",\"fence\":{id},\"due_ns\":{}}}\n",
                    t + 5000, t + 6000, t + 5000
                ));
            }
        }
        let latencies = Latencies::from_reader(trace.as_bytes(), "many").unwrap();
        let panels = panels(&latencies);
        assert_eq!(panels.len(), MAX_PANELS);
        assert!(panels[0].caption.starts_with("timeline 12.0: 12 fences"));
        assert!(
            panels[7]
                .caption
                .starts_with("5 other timelines: 15 fences"),
            "{}",
            panels[7].caption
        );

        let empty = Latencies::from_reader("".as_bytes(), "empty").unwrap();
        let svg = render_svg(&empty, "nothing").unwrap();
        assert!(svg.contains("no fences in the trace"));
        parse(&svg);
    }
}
