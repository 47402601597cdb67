//! Per-timeline latency of a run, read from the device's decision trace
//! (`trace.jsonl`, written by `device/src/trace.rs`): for every fence, the
//! latency the plan injected (`decide.due_ns − decide.t_ns`) and the one the
//! guest got (`complete.t_ns − decide.t_ns`), and how far the device's actual
//! completion was from its planned time (`complete.t_ns − complete.due_ns`).
//!
//! The trace is streamed: memory is the histograms (fixed size per timeline)
//! plus the fences in flight, however many million lines the file has.

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

/// Latencies above an hour are recorded as an hour.
const MAX_NS: u64 = 3_600_000_000_000;
/// Three significant digits: 0.1 % resolution at any scale.
const SIGNIFICANT_DIGITS: u8 = 3;

/// The figures of one timeline, for the report table and `report.json`.
/// Times are microseconds; `None` where nothing was measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelineLatency {
    /// `"CTX.RING"`, as the device names timelines.
    pub timeline: String,
    /// Fences that arrived and completed.
    pub fences: u64,
    /// Fences that arrived and never completed (hung, abandoned by a reset,
    /// still pending when the trace ended).
    pub unfinished: u64,
    /// Completions returned early by a queue stop or reset (not counted in
    /// `max_error_us`).
    pub flushed: u64,
    pub injected_p50_us: Option<f64>,
    pub injected_p99_us: Option<f64>,
    pub observed_p50_us: Option<f64>,
    pub observed_p99_us: Option<f64>,
    /// The largest distance between a completion and its planned time.
    pub max_error_us: Option<f64>,
}

/// A duration in microseconds, in the unit that reads best:
/// `850 µs`, `2.4 ms`, `117 ms`, `1.05 s` (three significant digits).
pub fn human_us(us: f64) -> String {
    let trimmed = |v: f64, decimals: usize| {
        let text = format!("{v:.decimals$}");
        if text.contains('.') {
            text.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            text
        }
    };
    // Three significant digits.
    let significant = |v: f64| {
        trimmed(
            v,
            if v >= 100.0 {
                0
            } else if v >= 10.0 {
                1
            } else {
                2
            },
        )
    };
    if us >= 1_000_000.0 {
        format!("{} s", significant(us / 1_000_000.0))
    } else if us >= 1000.0 {
        format!("{} ms", significant(us / 1000.0))
    } else if us < 1.0 {
        format!("{} µs", trimmed(us, 1))
    } else {
        format!("{} µs", trimmed(us, 0))
    }
}

/// `1 fence`, `4000 fences`.
pub fn fences(n: u64) -> String {
    format!("{n} fence{}", if n == 1 { "" } else { "s" })
}

impl TimelineLatency {
    /// `4000 fences · injected p50 2 ms / p99 2 ms · observed p50 2.4 ms / p99 3.9 ms · max error 1.9 ms`
    pub fn one_line(&self) -> String {
        let us = |v: Option<f64>| v.map_or("-".to_owned(), human_us);
        let mut line = format!(
            "{} · injected p50 {} / p99 {} · observed p50 {} / p99 {} · max error {}",
            fences(self.fences),
            us(self.injected_p50_us),
            us(self.injected_p99_us),
            us(self.observed_p50_us),
            us(self.observed_p99_us),
            us(self.max_error_us)
        );
        if self.unfinished > 0 {
            line.push_str(&format!(" · {} unfinished", self.unfinished));
        }
        if self.flushed > 0 {
            line.push_str(&format!(" · {} flushed early", self.flushed));
        }
        line
    }
}

/// The two distributions of one timeline, in nanoseconds.
pub struct Distributions {
    pub injected: Histogram<u64>,
    pub observed: Histogram<u64>,
    max_error_ns: Option<u64>,
    unfinished: u64,
    flushed: u64,
}

impl Distributions {
    fn new() -> Self {
        Distributions {
            injected: histogram(),
            observed: histogram(),
            max_error_ns: None,
            unfinished: 0,
            flushed: 0,
        }
    }

    fn figures(&self, timeline: &str) -> TimelineLatency {
        let quantile =
            |h: &Histogram<u64>, q: f64| (!h.is_empty()).then(|| micros(h.value_at_quantile(q)));
        TimelineLatency {
            timeline: timeline.to_owned(),
            fences: self.observed.len(),
            unfinished: self.unfinished,
            flushed: self.flushed,
            injected_p50_us: quantile(&self.injected, 0.5),
            injected_p99_us: quantile(&self.injected, 0.99),
            observed_p50_us: quantile(&self.observed, 0.5),
            observed_p99_us: quantile(&self.observed, 0.99),
            max_error_us: self.max_error_ns.map(micros),
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

fn micros(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// A fence between its `decide` and its `complete`.
struct InFlight {
    arrived_ns: u64,
    /// Where its figures go (see [`Latencies::group`]).
    group: String,
}

/// Every timeline of one trace.
#[derive(Default)]
pub struct Latencies {
    timelines: BTreeMap<String, Distributions>,
    /// Keep each injected latency of a timeline apart, as
    /// `"CTX.RING @ 50 µs"` (a bench that changes the latency by phase).
    by_injected: bool,
}

/// The fields of a trace line this module reads; the rest is skipped.
#[derive(Deserialize)]
struct Line<'a> {
    event: &'a str,
    t_ns: Option<u64>,
    timeline: Option<&'a str>,
    fence: Option<u64>,
    due_ns: Option<u64>,
    #[serde(default)]
    flushed: bool,
    /// `abandoned`: the fences a reset dropped (`irq_dropped` has a count).
    fences: Option<Fences>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Fences {
    List(Vec<u64>),
    /// Anything else (`irq_dropped`'s count).
    Other(serde::de::IgnoredAny),
}

impl Latencies {
    /// Reads the trace at `path`.
    pub fn from_trace(path: &Path) -> Result<Self> {
        Self::read_trace(path, false)
    }

    /// Reads the trace at `path`, one group per timeline and injected
    /// latency (`"CTX.RING @ 50 µs"`; a hung fence's is `@ hung`).
    pub fn from_trace_by_injected(path: &Path) -> Result<Self> {
        Self::read_trace(path, true)
    }

    fn read_trace(path: &Path, by_injected: bool) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Self::read_from(
            BufReader::with_capacity(1 << 16, file),
            &path.display().to_string(),
            by_injected,
        )
    }

    /// Reads a trace from `input`; `name` is used in errors. A cut-off last
    /// line (a run killed mid-write) is ignored, any other bad line is an
    /// error naming it.
    #[cfg(test)]
    pub fn from_reader(input: impl BufRead, name: &str) -> Result<Self> {
        Self::read_from(input, name, false)
    }

    fn read_from(mut input: impl BufRead, name: &str, by_injected: bool) -> Result<Self> {
        let mut latencies = Latencies {
            by_injected,
            ..Latencies::default()
        };
        let mut in_flight: HashMap<(String, u64), InFlight> = HashMap::new();
        let mut buf = String::new();
        for number in 1.. {
            buf.clear();
            let read = input
                .read_line(&mut buf)
                .with_context(|| format!("{name}:{number}: reading the trace"))?;
            if read == 0 {
                break;
            }
            if buf.trim().is_empty() {
                continue;
            }
            let line: Line = match serde_json::from_str(&buf) {
                Ok(line) => line,
                Err(_) if !buf.ends_with('\n') => break,
                Err(e) => bail!("{name}:{number}: not a trace event: {e}"),
            };
            latencies.take(line, &mut in_flight);
        }
        for fence in in_flight.values() {
            latencies.timeline(&fence.group).unfinished += 1;
        }
        Ok(latencies)
    }

    /// The figures' group of a fence of `timeline` with `injected` ns.
    fn group(&self, timeline: &str, injected: Option<u64>) -> String {
        if !self.by_injected {
            return timeline.to_owned();
        }
        match injected {
            Some(ns) => format!("{timeline} @ {}", human_us(micros(ns))),
            None => format!("{timeline} @ hung"),
        }
    }

    fn timeline(&mut self, timeline: &str) -> &mut Distributions {
        if !self.timelines.contains_key(timeline) {
            self.timelines
                .insert(timeline.to_owned(), Distributions::new());
        }
        self.timelines
            .get_mut(timeline)
            .expect("inserted just above")
    }

    fn take(&mut self, line: Line<'_>, in_flight: &mut HashMap<(String, u64), InFlight>) {
        match (line.event, line.timeline, line.fence, line.t_ns) {
            ("decide", Some(timeline), Some(fence), Some(t_ns)) => {
                let injected = line.due_ns.map(|due| due.saturating_sub(t_ns).max(1));
                let group = self.group(timeline, injected);
                let arrival = InFlight {
                    arrived_ns: t_ns,
                    group: group.clone(),
                };
                let distributions = self.timeline(&group);
                if let Some(injected) = injected {
                    distributions.injected.saturating_record(injected);
                }
                if let Some(earlier) = in_flight.insert((timeline.to_owned(), fence), arrival) {
                    // The driver reused a fence id (a module reload): the
                    // earlier fence never completed.
                    self.timeline(&earlier.group).unfinished += 1;
                }
            }
            ("complete", Some(timeline), Some(fence), Some(t_ns)) => {
                let Some(arrival) = in_flight.remove(&(timeline.to_owned(), fence)) else {
                    return; // decided before the trace started (replay of a cut trace)
                };
                let distributions = self.timeline(&arrival.group);
                distributions
                    .observed
                    .saturating_record(t_ns.saturating_sub(arrival.arrived_ns).max(1));
                if line.flushed {
                    distributions.flushed += 1;
                } else if let Some(due) = line.due_ns {
                    let error = t_ns.abs_diff(due);
                    distributions.max_error_ns =
                        Some(distributions.max_error_ns.map_or(error, |m| m.max(error)));
                }
            }
            ("abandoned", ..) => {
                let Some(Fences::List(fences)) = &line.fences else {
                    return;
                };
                for fence in fences {
                    let dropped: Vec<(String, u64)> = in_flight
                        .keys()
                        .filter(|(_, f)| f == fence)
                        .cloned()
                        .collect();
                    for key in dropped {
                        if let Some(fence) = in_flight.remove(&key) {
                            self.timeline(&fence.group).unfinished += 1;
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// The figures of every timeline, in timeline order.
    pub fn figures(&self) -> Vec<TimelineLatency> {
        self.timelines
            .iter()
            .map(|(name, d)| d.figures(name))
            .collect()
    }

    /// The timelines and their distributions, in timeline order.
    pub fn timelines(&self) -> impl Iterator<Item = (&str, &Distributions)> {
        self.timelines.iter().map(|(n, d)| (n.as_str(), d))
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::fmt::Write as _;

    /// A trace with known distributions:
    /// - `1.0`: 1000 fences, injected latency k µs (k = 1..=1000), each
    ///   completed 50 µs after its planned time;
    /// - `2.0`: 200 fences injected 2 ms and completed on time, one more
    ///   hung forever, one flushed early by a reset, one abandoned.
    pub fn synthetic_trace() -> String {
        let mut out = String::from(
            "{\"event\":\"start\",\"seed\":7,\"plan\":\"test\",\"plan_sha256\":\"00\"}\n",
        );
        let mut t = 1_000_000_000u64;
        let decide = |out: &mut String, t: u64, tl: &str, fence: u64, due: Option<u64>| {
            let due = due.map_or("null".to_owned(), |d| d.to_string());
            writeln!(
                out,
                "{{\"event\":\"decide\",\"t_ns\":{t},\"timeline\":\"{tl}\",\"fence\":{fence},\"index\":0,\
                 \"command\":\"SUBMIT_3D\",\"work_ns\":0,\"decision\":{{\"latency_ns\":0,\"irq\":{{\"kind\":\"normal\"}}}},\"due_ns\":{due}}}"
            )
            .unwrap();
        };
        let complete = |out: &mut String, t: u64, tl: &str, fence: u64, due: u64, flushed: bool| {
            let flushed = if flushed { ",\"flushed\":true" } else { "" };
            writeln!(
                out,
                "{{\"event\":\"complete\",\"t_ns\":{t},\"timeline\":\"{tl}\",\"fence\":{fence},\"due_ns\":{due},\"response\":4352{flushed}}}"
            )
            .unwrap();
        };
        for k in 1..=1000u64 {
            let due = t + k * 1000;
            decide(&mut out, t, "1.0", k, Some(due));
            complete(&mut out, due + 50_000, "1.0", k, due, false);
            t += 10_000_000;
        }
        for k in 0..200u64 {
            let fence = 5000 + k;
            decide(&mut out, t, "2.0", fence, Some(t + 2_000_000));
            out.push_str("{\"event\":\"notify\",\"t_ns\":1,\"kind\":\"normal\",\"covers\":1}\n");
            out.push_str("{\"event\":\"irq_dropped\",\"t_ns\":2,\"fences\":1}\n");
            complete(&mut out, t + 2_000_000, "2.0", fence, t + 2_000_000, false);
            t += 3_000_000;
        }
        decide(&mut out, t, "2.0", 9000, None); // hung forever
        decide(&mut out, t, "2.0", 9001, Some(t + 2_000_000));
        complete(&mut out, t + 100, "2.0", 9001, t + 2_000_000, true);
        decide(&mut out, t, "2.0", 9002, None);
        out.push_str("{\"event\":\"abandoned\",\"t_ns\":5,\"fences\":[9002]}\n");
        out.push_str("{\"event\":\"complete\",\"t_ns\":9"); // killed mid-write
        out
    }

    fn close(actual: Option<f64>, expected: f64) {
        let actual = actual.expect("a value");
        assert!(
            (actual - expected).abs() <= expected * 0.002 + 0.001,
            "{actual} is not {expected}"
        );
    }

    #[test]
    fn known_distributions_give_known_percentiles() {
        let trace = synthetic_trace();
        let figures = Latencies::from_reader(trace.as_bytes(), "synthetic")
            .unwrap()
            .figures();
        assert_eq!(figures.len(), 2);
        let (one, two) = (&figures[0], &figures[1]);
        assert_eq!(one.timeline, "1.0");
        assert_eq!((one.fences, one.unfinished, one.flushed), (1000, 0, 0));
        close(one.injected_p50_us, 500.0);
        close(one.injected_p99_us, 990.0);
        close(one.observed_p50_us, 550.0);
        close(one.observed_p99_us, 1040.0);
        close(one.max_error_us, 50.0);

        assert_eq!(two.timeline, "2.0");
        // 200 on time + the flushed one; the hung and the abandoned never completed.
        assert_eq!((two.fences, two.unfinished, two.flushed), (201, 2, 1));
        close(two.injected_p50_us, 2000.0);
        close(two.injected_p99_us, 2000.0);
        close(two.observed_p50_us, 2000.0);
        close(two.max_error_us, 0.0);
        assert!(two.one_line().contains("2 unfinished · 1 flushed early"));
        assert!(
            one.one_line().starts_with(
                "1000 fences · injected p50 500 µs / p99 990 µs · observed p50 550 µs / p99 1.04 ms"
            ),
            "{}",
            one.one_line()
        );
    }

    #[test]
    fn by_injected_keeps_each_latency_of_a_timeline_apart() {
        let trace = synthetic_trace();
        let figures = Latencies::read_from(trace.as_bytes(), "synthetic", true)
            .unwrap()
            .figures();
        let names: Vec<&str> = figures.iter().map(|f| f.timeline.as_str()).collect();
        // Timeline 1.0 injects 1..=1000 µs (a group each); 2.0 injects 2 ms,
        // plus the two fences it hung.
        assert_eq!(names.len(), 1000 + 2, "{:?}", &names[..5]);
        let two_ms = figures.iter().find(|f| f.timeline == "2.0 @ 2 ms").unwrap();
        assert_eq!((two_ms.fences, two_ms.flushed), (201, 1));
        close(two_ms.observed_p50_us, 2000.0);
        let hung = figures.iter().find(|f| f.timeline == "2.0 @ hung").unwrap();
        assert_eq!((hung.fences, hung.unfinished), (0, 2));
        let one = figures
            .iter()
            .find(|f| f.timeline == "1.0 @ 500 µs")
            .unwrap();
        assert_eq!(one.fences, 1);
        close(one.observed_p50_us, 550.0);
    }

    #[test]
    fn durations_read_in_their_unit() {
        for (us, text) in [
            (0.0, "0 µs"),
            (0.1, "0.1 µs"),
            (100.0, "100 µs"),
            (850.4, "850 µs"),
            (1000.0, "1 ms"),
            (2400.0, "2.4 ms"),
            (1_050_673.0, "1.05 s"),
            (117_309.0, "117 ms"),
            (12_345.0, "12.3 ms"),
            (10_000_000.0, "10 s"),
        ] {
            assert_eq!(human_us(us), text, "{us}");
        }
    }

    #[test]
    fn a_bad_line_in_the_middle_is_an_error_naming_it() {
        let trace = "{\"event\":\"start\"}\nnot json\n{\"event\":\"start\"}\n";
        let err = Latencies::from_reader(trace.as_bytes(), "t.jsonl")
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").starts_with("t.jsonl:2: not a trace event"),
            "{err:#}"
        );
        assert!(Latencies::from_trace(Path::new("/nonexistent/trace.jsonl")).is_err());
    }

    #[test]
    fn generated_fences_stream_through_with_none_left_in_flight() {
        // 400 000 lines generated on the fly (never held in memory):
        // every fence is matched to its completion, none is left in flight.
        struct Generated {
            k: u64,
            line: Vec<u8>,
            at: usize,
        }
        impl std::io::Read for Generated {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.at == self.line.len() {
                    if self.k == 400_000 {
                        return Ok(0);
                    }
                    let (t, fence) = (self.k * 1000, self.k / 2);
                    self.line = if self.k % 2 == 0 {
                        format!("{{\"event\":\"decide\",\"t_ns\":{t},\"timeline\":\"1.0\",\"fence\":{fence},\"due_ns\":{}}}\n", t + 500)
                    } else {
                        format!("{{\"event\":\"complete\",\"t_ns\":{t},\"timeline\":\"1.0\",\"fence\":{fence},\"due_ns\":{t}}}\n")
                    }
                    .into_bytes();
                    self.at = 0;
                    self.k += 1;
                }
                let n = buf.len().min(self.line.len() - self.at);
                buf[..n].copy_from_slice(&self.line[self.at..self.at + n]);
                self.at += n;
                Ok(n)
            }
        }
        let input = BufReader::new(Generated {
            k: 0,
            line: Vec::new(),
            at: 0,
        });
        let latencies = Latencies::from_reader(input, "generated").unwrap();
        let figures = latencies.figures();
        assert_eq!(figures[0].fences, 200_000);
        assert_eq!(figures[0].unfinished, 0);
        close(figures[0].observed_p50_us, 1.0);
        close(figures[0].injected_p99_us, 0.5);
    }
}
