//! Fence faults through the real vhost-user socket: latency, reordering,
//! hangs, deadline boosts, WRITE ordering, pause, error injection, stop and
//! reset, and the accounting after a mixed run. Decisions come from scripted
//! deciders, so every expectation is exact except wall-clock lateness, which
//! is measured and only bounded generously.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fencelab_device::fault::{
    DeadlineOutcome, Decision, DeviceControl, Hang, ReleaseTarget, ReorderSlot, TimelineId,
    TraceEvent,
};
use fencelab_device::protocol::*;
use fencelab_stream::Op;
use vhost::VhostBackend;
use vhost::vhost_user::VhostUserFrontend;
use vm_memory::{Bytes, GuestAddress};

const MS: u64 = 1_000_000;
/// How late a completion may be on a loaded 2-core machine before a test
/// calls it a failure (idle hosts measure tens of µs).
const LATE_BOUND: Duration = Duration::from_millis(500);

fn hung(h: Hang) -> Decision {
    Decision {
        hang: Some(h),
        ..Decision::default()
    }
}

fn holds(a: &fencelab_device::fault::Accounting) -> bool {
    a.submitted == a.completed + a.hung + a.pending + a.abandoned
}

#[test]
fn fences_complete_no_earlier_than_due_and_lateness_is_small() {
    let lat = Duration::from_millis(20);
    let mut rig = Rig::start("latency", Script::new(move |_| latency(lat)), false);
    let mut worst_guest = Duration::ZERO;
    for fence in 1..=10 {
        let kicked = Instant::now();
        rig.post_fenced(1, None, fence, &[]);
        rig.kick();
        let seen = rig.wait_call(Duration::from_secs(10)).expect("notified");
        rig.calls();
        assert_eq!(rig.wait_fences(1), vec![fence]);
        let after = seen - kicked;
        assert!(after >= lat, "fence {fence} seen after {after:?} < {lat:?}");
        worst_guest = worst_guest.max(after - lat);
    }
    let completions = completions(&rig.trace);
    assert_eq!(completions.len(), 10);
    let mut late: Vec<u64> = Vec::new();
    for (fence, t, due, _) in &completions {
        let due = due.expect("planned");
        assert!(*t >= due, "fence {fence} completed at {t} before due {due}");
        late.push(t - due);
    }
    late.sort_unstable();
    let worst_engine = late[late.len() - 1];
    println!(
        "latency {lat:?}: engine late after due by median {} µs, max {} µs; guest saw the notify at most {:?} after kick + latency",
        late[late.len() / 2] / 1_000,
        worst_engine / 1_000,
        worst_guest
    );
    assert!(Duration::from_nanos(worst_engine) < LATE_BOUND);
    assert!(worst_guest < LATE_BOUND);
    let stats = DeviceControl::stats(&*rig.gpu);
    let j = stats["timelines"]["1.0"].clone();
    assert_eq!(j["injected_us"]["count"], 10);
    let p50 = j["injected_us"]["p50"].as_u64().unwrap();
    assert!((19_900..=20_100).contains(&p50), "injected p50 {p50} µs");
    rig.finish();
}

#[test]
fn reorder_blocks_complete_in_rank_order_and_never_leave_their_block() {
    const PERMS: [[u32; 4]; 2] = [[2, 0, 3, 1], [3, 2, 1, 0]];
    let script = Script::new(|f| Decision {
        reorder: Some(ReorderSlot {
            block: f.index / 4,
            size: 4,
            rank: PERMS[(f.index / 4) as usize % 2][(f.index % 4) as usize],
            position: (f.index % 4) as u32,
            hold_ns: 5_000 * MS,
        }),
        ..latency(Duration::from_millis(5))
    });
    let mut rig = Rig::start("reorder", script, false);
    for fence in 0..8 {
        rig.post_fenced(1, None, fence, &[]);
    }
    rig.kick();
    let order = rig.wait_fences(8);
    // Block 0: positions by rank 1, 3, 0, 2; block 1 reversed.
    assert_eq!(order, vec![1, 3, 0, 2, 7, 6, 5, 4]);
    for (slot, fence) in order.iter().enumerate() {
        assert!(slot.abs_diff(*fence as usize) < 4, "{order:?}");
    }
    rig.finish();
}

#[test]
fn hangs_do_not_block_their_timeline_and_end_as_planned() {
    let script = Script::table(
        vec![
            (1, hung(Hang::UntilReleased)),
            (3, hung(Hang::Forever)),
            (
                4,
                Decision {
                    hang: Some(Hang::For { ns: 80 * MS }),
                    ..Decision::default()
                },
            ),
        ],
        Decision::default(),
    );
    let mut rig = Rig::start("hang", script, false);
    let start = Instant::now();
    for fence in 1..=4 {
        rig.post_fenced(1, None, fence, &[]);
    }
    rig.kick();
    assert_eq!(rig.wait_fences(1), vec![2], "the hung ones do not block 2");
    assert_eq!(rig.wait_fences(1), vec![4]);
    assert!(start.elapsed() >= Duration::from_millis(80), "For{{80ms}}");
    rig.wait_completions(2);
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(rig.unseen_used(), 0, "nothing else completes by itself");
    let a = rig.gpu.accounting();
    assert_eq!((a.hung, a.completed, a.pending), (2, 2, 0));

    let err = rig
        .gpu
        .release(ReleaseTarget::Fence { fence: 3 })
        .unwrap_err();
    assert!(err.contains("hung forever"), "{err}");
    assert_eq!(rig.gpu.release(ReleaseTarget::Fence { fence: 1 }), Ok(1));
    assert_eq!(rig.wait_fences(1), vec![1]);
    rig.wait_completions(3);
    let a = rig.gpu.accounting();
    assert_eq!((a.hung, a.released, a.completed), (1, 1, 3));

    // A device reset abandons the one hung forever; its chain never returns.
    rig.fe.reset_device().unwrap();
    let a = rig.gpu.accounting();
    assert_eq!((a.hung, a.abandoned, a.submitted), (0, 1, 4));
    assert!(holds(&a));
    assert!(rig.trace.events().iter().any(|e| matches!(
        e,
        TraceEvent::Abandoned { fences, .. } if fences == &vec![3]
    )));
    assert!(
        rig.trace
            .events()
            .iter()
            .any(|e| matches!(e, TraceEvent::Release { fence: 1, .. }))
    );
    assert_eq!(rig.unseen_used(), 0);
    rig.finish();
}

#[test]
fn stopping_the_queue_returns_pending_fences_and_keeps_hung_ones() {
    let script = Script::table(
        vec![(2, hung(Hang::UntilReleased))],
        latency(Duration::from_secs(3600)),
    );
    let mut rig = Rig::start("stop", script, false);
    rig.post_fenced(1, None, 1, &[]);
    rig.post_fenced(1, None, 2, &[]);
    rig.kick();
    rig.wait_trace("both decided", |ev| {
        ev.iter()
            .filter(|e| matches!(e, TraceEvent::Decide { .. }))
            .count()
            == 2
    });
    // GET_VRING_BASE stops the ring: the hour-long fence comes back now.
    rig.fe.get_vring_base(0).unwrap();
    assert_eq!(rig.wait_fences(1), vec![1]);
    let a = rig.gpu.accounting();
    assert_eq!((a.completed, a.hung, a.pending), (1, 1, 0));
    assert_eq!(a.flushed, 1, "returned an hour early");
    assert_eq!(flushed_completions(&rig), vec![(1, true)]);
    rig.finish();
}

/// (fence, flushed) of every traced completion, in order.
fn flushed_completions(rig: &Rig) -> Vec<(u64, bool)> {
    rig.trace
        .events()
        .into_iter()
        .filter_map(|e| match e {
            TraceEvent::Complete { fence, flushed, .. } => Some((fence, flushed)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_device_reset_counts_the_fences_it_returned_early_as_flushed() {
    let script = Script::table(
        vec![(1, latency(Duration::from_millis(1)))],
        latency(Duration::from_secs(3600)),
    );
    let mut rig = Rig::start("reset-flush", script, false);
    rig.ctx_create(2);
    rig.post_fenced(1, None, 1, &[]);
    rig.post_fenced(1, None, 2, &[]);
    rig.post_fenced(2, None, 3, &[]);
    rig.kick();
    assert_eq!(rig.wait_fences(1), vec![1], "1 ms, in its own time");
    rig.wait_completions(1);
    assert_eq!(rig.gpu.accounting().flushed, 0);

    rig.fe.reset_device().unwrap();
    let mut early = rig.wait_fences(2);
    early.sort_unstable();
    assert_eq!(early, vec![2, 3]);
    let a = rig.gpu.accounting();
    assert!(holds(&a), "{a:?}");
    assert_eq!((a.submitted, a.completed, a.flushed), (3, 3, 2));
    let mut traced = flushed_completions(&rig);
    traced.sort_unstable();
    assert_eq!(traced, vec![(1, false), (2, true), (3, true)]);
    let s = rig.gpu.summary();
    assert_eq!(s["accounting_by_command"]["SUBMIT_3D"]["flushed"], 2);
    assert_eq!(
        (
            s["timelines"]["1.0"]["flushed"].as_u64(),
            s["timelines"]["2.0"]["flushed"].as_u64()
        ),
        (Some(1), Some(1))
    );
    rig.finish();
}

#[test]
fn a_deadline_hint_pulls_a_ten_second_fence_in() {
    let mut script = Script::new(|_| latency(Duration::from_secs(10)));
    script.boost = Some(Duration::from_millis(20));
    let mut rig = Rig::start("deadline", script, false);
    rig.post_fenced(1, None, 10, &[]);
    rig.post_fenced(1, None, 11, &[]);
    rig.post_fenced(1, None, 12, &[]);
    rig.kick();
    let start = Instant::now();
    rig.post_unfenced(&[Op::Deadline {
        fence: 11,
        ns: 1_000_000,
    }]);
    rig.kick();
    assert_eq!(
        rig.wait_fences(3),
        vec![0, 10, 11],
        "11 and its predecessor"
    );
    let took = start.elapsed();
    println!("boosted fences completed {took:?} after the hint");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(rig.unseen_used(), 0, "12 keeps its 10 s");
    let deadline = rig
        .trace
        .events()
        .into_iter()
        .find_map(|e| match e {
            TraceEvent::Deadline {
                fence: 11,
                outcome,
                hint_ns,
                ..
            } => Some((outcome, hint_ns)),
            _ => None,
        })
        .expect("hint traced");
    assert_eq!(deadline, (DeadlineOutcome::Boosted, 1_000_000));
    let a = rig.gpu.accounting();
    assert_eq!((a.deadline_hints, a.deadline_boosts), (1, 1));
    rig.finish();
}

#[test]
fn writes_land_in_guest_memory_just_before_the_fence_completes() {
    let script = Script::new(|_| latency(Duration::from_millis(1500)));
    let mut rig = Rig::start("write", script, false);
    rig.backed_resource(5);
    let (a, b, c) = (0xfeed_0000_0000_0001u64, 0xfeed_0000_0000_0002, 0x77);
    let target = |off: u64| GuestAddress(SCRATCH + off);
    rig.post_fenced(
        1,
        None,
        20,
        &[
            Op::Write {
                resource: 5,
                offset: 64,
                value: a,
            },
            Op::Write {
                resource: 5,
                offset: 64,
                value: b,
            },
            Op::Write {
                resource: 5,
                offset: 72,
                value: c,
            },
        ],
    );
    let before = rig.drv.used_idx();
    rig.kick();
    std::thread::sleep(Duration::from_millis(100));
    let used = rig.drv.used_idx();
    let early: u64 = rig.drv.mem.read_obj(target(64)).unwrap();
    if used == before {
        assert_eq!(early, 0, "a WRITE landed while its fence was pending");
    }
    // Spin until the used entry appears, then the values must be there.
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.drv.used_idx() == before {
        assert!(Instant::now() < deadline, "fence never completed");
        std::hint::spin_loop();
    }
    let at64: u64 = rig.drv.mem.read_obj(target(64)).unwrap();
    let at72: u64 = rig.drv.mem.read_obj(target(72)).unwrap();
    assert_eq!(
        (at64, at72),
        (b, c),
        "writes in order, before the used entry"
    );
    // The trace records a completion just after its used entry.
    rig.wait_trace("the completion", |ev| {
        ev.iter()
            .any(|e| matches!(e, TraceEvent::Complete { fence: 20, .. }))
    });
    let writes = rig
        .trace
        .events()
        .into_iter()
        .find_map(|e| match e {
            TraceEvent::Complete {
                fence: 20, writes, ..
            } => Some(writes),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        writes,
        vec![(SCRATCH + 64, a), (SCRATCH + 64, b), (SCRATCH + 72, c)]
    );
    rig.finish();
}

#[test]
fn pause_holds_completions_and_resume_releases_them() {
    let mut rig = Rig::start("pause", Script::new(|_| Decision::default()), false);
    rig.gpu.set_paused(true);
    for fence in 1..=3 {
        rig.post_fenced(1, None, fence, &[]);
    }
    rig.kick();
    rig.wait_until("3 fences pending", || rig.gpu.accounting().pending == 3);
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(rig.unseen_used(), 0, "nothing completes while paused");
    assert_eq!(DeviceControl::stats(&*rig.gpu)["paused"], true);
    rig.gpu.set_paused(false);
    assert_eq!(rig.wait_fences(3), vec![1, 2, 3]);
    let events = rig.trace.events();
    let paused = events
        .iter()
        .position(|e| matches!(e, TraceEvent::Paused { .. }))
        .unwrap();
    let resumed = events
        .iter()
        .position(|e| matches!(e, TraceEvent::Resumed { .. }))
        .unwrap();
    let first_complete = events
        .iter()
        .position(|e| matches!(e, TraceEvent::Complete { .. }))
        .unwrap();
    assert!(paused < resumed && resumed < first_complete);
    rig.finish();
}

#[test]
fn an_injected_error_is_the_response_the_guest_reads() {
    let script = Script::table(
        vec![(
            30,
            Decision {
                error: Some(RESP_ERR_OUT_OF_MEMORY),
                ..Decision::default()
            },
        )],
        Decision::default(),
    );
    let mut rig = Rig::start("error", script, false);
    let bad = rig.post_fenced(1, None, 30, &[]);
    let good = rig.post_fenced(1, None, 31, &[]);
    rig.kick();
    assert_eq!(rig.wait_fences(2), vec![30, 31]);
    let h = rig.drv.resp_hdr(bad);
    assert_eq!(
        (h.type_, h.fence_id, h.ctx_id),
        (RESP_ERR_OUT_OF_MEMORY, 30, 1)
    );
    assert_eq!(rig.drv.resp_hdr(good).type_, RESP_OK_NODATA);
    rig.wait_completions(2);
    let a = rig.gpu.accounting();
    assert_eq!((a.completed, a.errored), (2, 1));
    let responses: Vec<(u64, u32)> = completions(&rig.trace).iter().map(|c| (c.0, c.3)).collect();
    assert_eq!(
        responses,
        vec![(30, RESP_ERR_OUT_OF_MEMORY), (31, RESP_OK_NODATA)]
    );
    rig.finish();
}

/// Two timelines (one named by ring index), errors, hangs, releases, a
/// dropped interrupt and deadline hints: every bucket adds up, and the
/// summary has the agreed keys.
#[test]
fn accounting_adds_up_after_a_mixed_run() {
    let script = Script::table(
        vec![
            (
                2,
                Decision {
                    error: Some(RESP_ERR_UNSPEC),
                    ..Decision::default()
                },
            ),
            (3, hung(Hang::UntilReleased)),
            (4, hung(Hang::Forever)),
            (
                5,
                Decision {
                    irq: fencelab_device::fault::IrqFault::Drop,
                    ..Decision::default()
                },
            ),
            (
                7,
                Decision {
                    error: Some(RESP_ERR_INVALID_PARAMETER),
                    ..latency(Duration::from_millis(5))
                },
            ),
            (8, hung(Hang::UntilReleased)),
        ],
        latency(Duration::from_millis(2)),
    );
    let mut rig = Rig::start("mixed", script, false);
    rig.ctx_create(2);
    for fence in 1..=5 {
        rig.post_fenced(1, None, fence, &[]);
    }
    for fence in 6..=9 {
        rig.post_fenced(2, Some(1), fence, &[]);
    }
    rig.post_unfenced(&[
        Op::Deadline { fence: 3, ns: 5 },
        Op::Deadline { fence: 99, ns: 5 },
    ]);
    rig.kick();
    // 1, 2, 5, 6, 7, 9 and the unfenced submit.
    let mut done = rig.wait_fences(7);
    done.sort_unstable();
    assert_eq!(done, vec![0, 1, 2, 5, 6, 7, 9]);
    assert_eq!(
        rig.gpu.release(ReleaseTarget::Timeline {
            timeline: TimelineId { ctx: 2, ring: 1 }
        }),
        Ok(1)
    );
    assert_eq!(rig.wait_fences(1), vec![8]);
    rig.wait_completions(7);

    let total = rig.gpu.accounting();
    assert!(holds(&total), "{total:?}");
    assert_eq!(
        (total.submitted, total.completed, total.errored, total.hung),
        (9, 7, 2, 2)
    );
    assert_eq!((total.released, total.irq_dropped), (1, 1));
    assert_eq!(total.flushed, 0, "nothing was returned early");
    assert_eq!((total.deadline_hints, total.deadline_boosts), (2, 0));

    let s = rig.gpu.summary();
    assert_summary_keys(&s);
    assert_eq!(s["seed"], 42);
    assert_eq!(s["fences_pending"], 2);
    let t1 = &s["timelines"]["1.0"];
    let t2 = &s["timelines"]["2.1"];
    assert_eq!(
        (t1["submitted"].as_u64(), t2["submitted"].as_u64()),
        (Some(5), Some(4))
    );
    assert_eq!(
        (t1["hung"].as_u64(), t2["hung"].as_u64()),
        (Some(2), Some(0))
    );
    assert_eq!(
        t1["deadline_hints"], 1,
        "the hint for fence 3; 99 is unknown"
    );
    assert_eq!(t2["released"], 1);
    let cmd = &s["accounting_by_command"]["SUBMIT_3D"];
    assert_eq!(
        (cmd["submitted"].as_u64(), cmd["errored"].as_u64()),
        (Some(9), Some(2))
    );
    for bucket in s["timelines"]
        .as_object()
        .unwrap()
        .values()
        .chain(s["accounting_by_command"].as_object().unwrap().values())
    {
        let a: fencelab_device::fault::Accounting = serde_json::from_value(bucket.clone()).unwrap();
        assert!(holds(&a), "{a:?}");
    }
    let outcomes: Vec<DeadlineOutcome> = rig
        .trace
        .events()
        .into_iter()
        .filter_map(|e| match e {
            TraceEvent::Deadline { outcome, .. } => Some(outcome),
            _ => None,
        })
        .collect();
    assert_eq!(
        outcomes,
        vec![DeadlineOutcome::Hung, DeadlineOutcome::Unknown]
    );
    rig.finish();
}
