//! The fence pipeline: submit a range of fences on one timeline, at most
//! `--inflight` outstanding, and check each as it signals. `smoke` is this
//! pipeline alone; `signal-storm` runs one per thread, `deadline-race` one
//! with a deadline setter beside it.
//!
//! Waiting: all outstanding out-fences are polled together, newest first
//! (see [`sync_file::poll_in`]), with the timeout of the oldest. Each pass
//! returns the set of signaled fences; on one timeline that set must be a
//! prefix of the outstanding fences in submission order. A fence that is
//! ready while an older one is not, or whose kernel signal timestamp is
//! earlier than an older fence's, counts as out of order. Ready fences are
//! read with SYNC_IOC_FILE_INFO; a fence still unsignaled `--timeout-ms`
//! after its submission counts as timed out, and then no new fence is
//! submitted (the timeline is stuck; the outstanding ones still get their
//! full timeout).
//!
//! Signaled once: a fence read as signaled is kept open a little longer
//! (until `--inflight` more have signaled, or the end) and read again; its
//! status and signal timestamp must not have changed.
//!
//! WRITE read-back (unless `--no-write`): each fence's stream also carries
//! a `WRITE` of its own value into its slot of the write buffer (see
//! [`crate::readback`]). The slots of the fences a poll pass found ready are
//! read right after that pass; a fence that then reads as signaled (without
//! error) but whose value is missing was signaled prematurely. Premature
//! signals are counted and listed, not treated as errors: the upstream
//! driver signals every earlier fence of its timeline whenever one
//! completes, so a device that completes out of order makes it signal fences
//! early, and measuring that is the point.

use std::collections::VecDeque;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use super::{FenceSource, Params};
use crate::order::{TimestampOrder, ready_before_older};
use crate::readback::{self, SlotMemory};
use crate::report::{Counts, Outcome, RttPhases};
use crate::sync_file::{self, FileInfo, Readiness, Status};

/// Progress line every this many submissions.
const PROGRESS_EVERY: u64 = 500;

/// One timeline's fences, submitted and checked.
pub struct Pipeline<'a> {
    pub source: &'a mut dyn FenceSource,
    pub slots: Option<&'a dyn SlotMemory>,
    pub params: Params,
    /// Name used in progress lines.
    pub label: String,
    /// The driver signals one timeline's fences in order
    /// ([`Lanes::signals_in_order`](crate::lanes::Lanes::signals_in_order)):
    /// only then does an out-of-order signal fail the run. It is counted
    /// either way.
    pub order_promised: bool,
}

/// Called with each fence just submitted (its number and out-fence).
pub type OnSubmit<'f> = &'f mut dyn FnMut(u64, BorrowedFd<'_>);

struct InFlight {
    seq: u64,
    fence: OwnedFd,
    submitted_at: Instant,
    deadline: Instant,
}

impl Pipeline<'_> {
    /// Submits fences `seqs` (their numbers: WRITE slots and values, and the
    /// names in messages) and checks them; `on_submit` sees each new
    /// out-fence before the pipeline waits for it.
    pub fn run(&mut self, seqs: Range<u64>, on_submit: OnSubmit<'_>) -> Outcome {
        let p = self.params;
        let total = seqs.end.saturating_sub(seqs.start);
        let slot_map = self.slots.map(|m| m.map());
        let mut out = Outcome::one_thread();
        out.rtt_phases = RttPhases::new(p.fences, p.rtt_phases);
        out.order_not_promised = !self.order_promised;
        let mut ts_order = TimestampOrder::default();
        let mut recheck = Recheck::new(p.inflight);
        let mut queue: VecDeque<InFlight> = VecDeque::with_capacity(p.inflight);
        let mut next_seq = seqs.start;
        let mut stuck = false;
        let start = Instant::now();

        loop {
            // Top up to `inflight` outstanding fences, never reusing the WRITE
            // slot of one still outstanding.
            while !stuck
                && next_seq < seqs.end
                && queue.len() < p.inflight
                && slot_map.is_none_or(|m| m.is_free(next_seq, queue.front().map(|f| f.seq)))
            {
                let seq = next_seq;
                next_seq += 1;
                out.counts.submitted += 1;
                let command = readback::command(seq, p.work_ns, self.slots);
                let submitted_at = Instant::now();
                match self.source.submit(&command) {
                    Ok(fence) => {
                        if seq == seqs.start {
                            self.log_live_names(fence.as_fd());
                        }
                        on_submit(seq, fence.as_fd());
                        queue.push_back(InFlight {
                            seq,
                            fence,
                            submitted_at,
                            deadline: submitted_at + p.timeout,
                        });
                    }
                    Err(e) => {
                        out.counts.errors += 1;
                        out.counts.submit_failures += 1;
                        out.note_error(format!("fence #{seq}: submission failed: {e}"));
                    }
                }
                if out.counts.submitted % PROGRESS_EVERY == 0 {
                    self.progress(&out.counts, total);
                }
            }
            let Some(oldest_deadline) = queue.iter().map(|f| f.deadline).min() else {
                break;
            };

            // Wait for any of them; sample the newest first.
            let newest_first: Vec<BorrowedFd<'_>> =
                queue.iter().rev().map(|f| f.fence.as_fd()).collect();
            let wait = oldest_deadline.saturating_duration_since(Instant::now());
            let states = match sync_file::poll_in(&newest_first, wait) {
                Ok(mut s) => {
                    s.reverse();
                    s
                }
                Err(e) => {
                    // Cannot wait any more: the outstanding fences end as errors.
                    out.counts.errors += queue.len() as u64;
                    out.note_error(format!("{e}; {} fence(s) abandoned", queue.len()));
                    break;
                }
            };
            drop(newest_first);
            let polled_at = Instant::now();
            // Read the WRITE slots of the ready fences first: the sooner after
            // the signal, the smaller the chance that a late completion hides
            // a premature signal.
            let observed: Vec<Option<u64>> = queue
                .iter()
                .zip(&states)
                .map(|(f, state)| match (state, self.slots) {
                    (Readiness::Ready, Some(m)) => readback::observe(f.seq, m),
                    _ => None,
                })
                .collect();
            let ready: Vec<bool> = states.iter().map(|s| *s != Readiness::Pending).collect();
            let early = ready_before_older(&ready);

            let mut still = VecDeque::with_capacity(queue.len());
            for (((f, state), early), observed) in
                queue.drain(..).zip(states).zip(early).zip(observed)
            {
                match state {
                    Readiness::Pending if polled_at >= f.deadline => {
                        out.counts.timeouts += 1;
                        out.note_error(format!(
                            "fence #{}: not signaled {} ms after submission",
                            f.seq,
                            p.timeout.as_millis()
                        ));
                        stuck = true;
                    }
                    Readiness::Pending => still.push_back(f),
                    Readiness::Failed(revents) => {
                        out.counts.errors += 1;
                        out.note_error(format!(
                            "fence #{}: poll revents {revents:#x} without POLLIN",
                            f.seq
                        ));
                    }
                    Readiness::Ready => {
                        let seen = Seen {
                            polled_at,
                            signaled_before_older: early,
                            slot_value: observed,
                        };
                        if let Some(read) = self.complete(&mut out, &mut ts_order, &f, seen) {
                            recheck.push(self.source, &mut out, f.seq, f.fence, read);
                        }
                    }
                }
            }
            queue = still;
        }
        recheck.finish(self.source, &mut out);

        out.elapsed = start.elapsed();
        self.progress(&out.counts, total);
        out
    }

    /// One progress line to stderr.
    fn progress(&self, c: &Counts, total: u64) {
        eprintln!(
            "fence-hammer: {}: {}/{} submitted, {} signaled, {} errors, {} timeouts, {} out of order",
            self.label, c.submitted, total, c.signaled, c.errors, c.timeouts, c.out_of_order
        );
    }

    /// Reads a signaled fence and counts it; returns what was read of it
    /// when it had signaled (for the second read).
    fn complete(
        &mut self,
        out: &mut Outcome,
        ts_order: &mut TimestampOrder,
        f: &InFlight,
        seen: Seen,
    ) -> Option<FileInfo> {
        let Seen {
            polled_at,
            signaled_before_older,
            slot_value,
        } = seen;
        let seq = f.seq;
        let info = match self.source.info(f.fence.as_fd()) {
            Ok(info) => info,
            Err(e) => {
                out.counts.errors += 1;
                out.note_error(format!("fence #{seq}: {e}"));
                return None;
            }
        };
        let fence = info.fences.first();
        if out.timeline_name.is_none() {
            out.timeline_name = fence.map(|f| f.timeline.clone());
        }
        let rtt = polled_at.duration_since(f.submitted_at);
        let checked_slot = self.slots.map(|_| slot_value);
        tally_signaled(&self.label, out, seq, info.status, rtt, checked_slot);

        let mut why = Vec::new();
        if signaled_before_older {
            why.push("was signaled while an older fence was not".to_string());
        }
        if let Some(fence) = fence {
            if fence.status != Status::Active && fence.timestamp_ns != 0 {
                if let Some((older, older_ts)) = ts_order.check(seq, fence.timestamp_ns) {
                    why.push(format!(
                        "signal timestamp {} ns is before fence #{older}'s {older_ts} ns",
                        fence.timestamp_ns
                    ));
                }
            }
        }
        if !why.is_empty() {
            out.counts.out_of_order += 1;
            out.note_error(format!("fence #{seq} out of order: {}", why.join(", ")));
        }
        (info.status != Status::Active).then_some(info)
    }

    /// The timeline and driver names of a live fence, for the log: once a
    /// fence has signaled, Linux reports placeholder names for it instead.
    fn log_live_names(&mut self, fence: BorrowedFd<'_>) {
        let label = &self.label;
        match self.source.info(fence) {
            Ok(info) => match info.fences.first() {
                Some(f) => eprintln!(
                    "fence-hammer: {label}: first fence: sync_file {:?}, timeline {:?}, driver {:?}, status {:?}",
                    info.name, f.timeline, f.driver, f.status
                ),
                None => eprintln!(
                    "fence-hammer: {label}: first fence: sync_file {:?} holds no fences",
                    info.name
                ),
            },
            Err(e) => eprintln!("fence-hammer: {label}: first fence: {e}"),
        }
    }
}

/// What the poll pass that found a fence ready saw of it.
struct Seen {
    polled_at: Instant,
    /// Ready while an older fence was not.
    signaled_before_older: bool,
    /// Its WRITE slot, read right after the pass (`None` without a buffer).
    slot_value: Option<u64>,
}

/// Counts fence `seq`, seen signaled with `status` after `rtt`: signaled
/// (its round trip kept; with `checked_slot`, what its WRITE slot held, the
/// premature-signal check), or an error (by errno), or, when FILE_INFO
/// calls it active although poll said ready, an error.
pub fn tally_signaled(
    label: &str,
    out: &mut Outcome,
    seq: u64,
    status: Status,
    rtt: std::time::Duration,
    checked_slot: Option<Option<u64>>,
) {
    match status {
        Status::Signaled => {
            out.counts.signaled += 1;
            out.rtt_ns.push(rtt.as_nanos() as u64);
            out.rtt_phases.record(seq, rtt.as_nanos() as u64);
            if let Some(slot_value) = checked_slot {
                if out.premature.record(seq, slot_value) {
                    note_premature(label, out, seq, slot_value);
                }
            }
        }
        Status::Error(errno) => {
            out.counts.errors += 1;
            out.count_errno(errno);
            out.note_error(format!(
                "fence #{seq}: signaled with error {errno} ({})",
                std::io::Error::from_raw_os_error(-errno)
            ));
        }
        Status::Active => {
            out.counts.errors += 1;
            out.note_error(format!(
                "fence #{seq}: poll reported POLLIN but SYNC_IOC_FILE_INFO status is 0 (active)"
            ));
        }
    }
}

/// Logs the first premature signals (they are findings, not errors).
fn note_premature(label: &str, out: &Outcome, seq: u64, slot_value: Option<u64>) {
    let n = out.premature.premature;
    if n <= readback::MAX_PREMATURE_LISTED as u64 {
        let found = match slot_value {
            Some(0) => "nothing written yet".to_string(),
            Some(v) => format!("{v:#x}"),
            None => "an unreadable slot".to_string(),
        };
        eprintln!(
            "fence-hammer: {label}: premature signal #{n}: fence #{seq} signaled, its WRITE slot holds {found}, not {:#x}",
            readback::SlotMap::value(seq)
        );
    }
}

/// Signaled fences kept open for a second read: a fence signals once, so
/// its status and signal timestamp never change afterwards.
struct Recheck {
    held: VecDeque<(u64, OwnedFd, FileInfo)>,
    keep: usize,
}

impl Recheck {
    fn new(keep: usize) -> Self {
        Self {
            held: VecDeque::with_capacity(keep + 1),
            keep,
        }
    }

    /// Holds fence `seq` as first read; reads the oldest held one again
    /// when more than `keep` are held.
    fn push(
        &mut self,
        source: &mut dyn FenceSource,
        out: &mut Outcome,
        seq: u64,
        fence: OwnedFd,
        first: FileInfo,
    ) {
        self.held.push_back((seq, fence, first));
        while self.held.len() > self.keep {
            let (seq, fence, first) = self.held.pop_front().expect("non-empty");
            check_unchanged(source, out, seq, fence.as_fd(), &first);
        }
    }

    /// Reads every fence still held again.
    fn finish(&mut self, source: &mut dyn FenceSource, out: &mut Outcome) {
        for (seq, fence, first) in self.held.drain(..) {
            check_unchanged(source, out, seq, fence.as_fd(), &first);
        }
    }
}

fn check_unchanged(
    source: &mut dyn FenceSource,
    out: &mut Outcome,
    seq: u64,
    fence: BorrowedFd<'_>,
    first: &FileInfo,
) {
    let signal = |info: &FileInfo| {
        (
            info.status,
            info.fences
                .iter()
                .map(|f| (f.status, f.timestamp_ns))
                .collect::<Vec<_>>(),
        )
    };
    match source.info(fence) {
        Ok(again) if signal(&again) == signal(first) => {}
        Ok(again) => out.violation(format!(
            "fence #{seq} changed after it signaled (signaled twice?): status and (fence status, timestamp ns) {:?} then {:?}",
            signal(first),
            signal(&again)
        )),
        Err(e) => out.violation(format!("fence #{seq}: second read: {e}")),
    }
}
