//! Interrupt faults through the real vhost-user socket, observed on the
//! call eventfd the backend signals (read without blocking: the counter is
//! the number of writes since the last read).

mod common;

use std::time::Duration;

use common::*;
use fencelab_device::fault::{Decision, IrqFault, NotifyKind, TraceEvent};

const MS: u64 = 1_000_000;

fn with_irq(irq: IrqFault) -> Decision {
    Decision {
        irq,
        ..Decision::default()
    }
}

/// (kind, covers, t_ns) of every notify the engine sent.
fn notifies(rig: &Rig) -> Vec<(NotifyKind, u32, u64)> {
    rig.trace
        .events()
        .into_iter()
        .filter_map(|e| match e {
            TraceEvent::Notify { kind, covers, t_ns } => Some((kind, covers, t_ns)),
            _ => None,
        })
        .collect()
}

/// Waits until the engine has sent `n` notifies of `kind` (of any kind
/// when `None`), or more.
fn wait_notifies(rig: &Rig, kind: Option<NotifyKind>, n: usize) {
    let what = format!("{n} notifies of kind {kind:?}");
    rig.wait_trace(&what, |ev| {
        ev.iter()
            .filter(|e| match e {
                TraceEvent::Notify { kind: k, .. } => kind.is_none_or(|kind| *k == kind),
                _ => false,
            })
            .count()
            >= n
    });
}

fn completed_at(rig: &Rig, fence: u64) -> u64 {
    completions(&rig.trace)
        .iter()
        .find(|c| c.0 == fence)
        .map(|c| c.1)
        .expect("completed")
}

#[test]
fn a_dropped_interrupt_advances_the_used_ring_without_a_call() {
    let script = Script::table(vec![(1, with_irq(IrqFault::Drop))], Decision::default());
    let mut rig = Rig::start("irq-drop", script, false);
    rig.post_fenced(1, None, 1, &[]);
    rig.kick();
    assert_eq!(rig.wait_fences(1), vec![1], "the used ring advanced");
    rig.wait_completions(1);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(rig.calls(), 0, "no call-eventfd write");
    assert!(notifies(&rig).is_empty());
    assert_eq!(rig.gpu.stats().accounting().irq_dropped, 1);

    // A later normal completion's notify covers the dropped one.
    rig.post_fenced(1, None, 2, &[]);
    rig.kick();
    assert_eq!(rig.wait_fences(1), vec![2]);
    wait_notifies(&rig, None, 1);
    assert_eq!(rig.calls(), 1);
    assert_eq!(notifies(&rig)[0].1, 2, "it covers both completions");
    rig.finish();
}

#[test]
fn the_rescue_notify_comes_when_nothing_else_notified() {
    let mut script = Script::new(|_| with_irq(IrqFault::Drop));
    script.rescue = Some(Duration::from_millis(200));
    let mut rig = Rig::start("irq-rescue", script, false);
    rig.post_fenced(1, None, 1, &[]);
    rig.kick();
    assert_eq!(rig.wait_fences(1), vec![1]);
    wait_notifies(&rig, Some(NotifyKind::Rescue), 1);
    let (_, covers, t) = notifies(&rig)[0];
    assert_eq!(covers, 1);
    assert!(
        t - completed_at(&rig, 1) >= 200 * MS,
        "not before irq_rescue"
    );
    assert_eq!(rig.calls(), 1, "exactly one call-eventfd write");
    rig.finish();
}

#[test]
fn spurious_notifies_follow_the_real_one() {
    let script = Script::new(|_| with_irq(IrqFault::Spurious { count: 2 }));
    let mut rig = Rig::start("irq-spurious", script, false);
    rig.post_fenced(1, None, 1, &[]);
    rig.kick();
    assert_eq!(rig.wait_fences(1), vec![1]);
    wait_notifies(&rig, Some(NotifyKind::Spurious), 2);
    assert_eq!(rig.calls(), 3, "the real notify and two with nothing new");
    let kinds: Vec<(NotifyKind, u32)> = notifies(&rig).iter().map(|n| (n.0, n.1)).collect();
    assert_eq!(
        kinds,
        vec![
            (NotifyKind::Normal, 1),
            (NotifyKind::Spurious, 0),
            (NotifyKind::Spurious, 0)
        ]
    );
    assert_eq!(rig.gpu.stats().accounting().irq_spurious, 2);
    rig.finish();
}

#[test]
fn spurious_notifies_bypass_event_idx_suppression() {
    let script = Script::new(|_| with_irq(IrqFault::Spurious { count: 3 }));
    let mut rig = Rig::start("irq-spurious-idx", script, true);
    // The driver asks to be told only after used entry 0x7fff.
    rig.drv.set_used_event(0x7fff);
    rig.post_fenced(1, None, 1, &[]);
    rig.kick();
    assert_eq!(rig.wait_fences(1), vec![1]);
    wait_notifies(&rig, Some(NotifyKind::Spurious), 3);
    assert_eq!(rig.calls(), 3, "the real notify was suppressed, not these");
    rig.finish();
}

#[test]
fn coalescing_merges_completions_into_one_call() {
    let window = Duration::from_secs(1);
    let script = Script::new(move |f| Decision {
        latency_ns: f.index * 10 * MS,
        irq: IrqFault::Coalesce {
            window_ns: window.as_nanos() as u64,
        },
        ..Decision::default()
    });
    let mut rig = Rig::start("irq-coalesce", script, false);
    for fence in 1..=5 {
        rig.post_fenced(1, None, fence, &[]);
    }
    rig.kick();
    assert_eq!(rig.wait_fences(5), vec![1, 2, 3, 4, 5]);
    wait_notifies(&rig, None, 1);
    assert_eq!(
        rig.calls(),
        1,
        "one call-eventfd write for five completions"
    );
    let n = notifies(&rig);
    assert_eq!((n.len(), n[0].0, n[0].1), (1, NotifyKind::Coalesced, 5));
    assert!(n[0].2 - completed_at(&rig, 1) >= window.as_nanos() as u64);
    rig.finish();
}

#[test]
fn a_delayed_notify_comes_delay_after_the_used_ring_update() {
    let script = Script::new(|_| with_irq(IrqFault::Delay { delay_ns: 150 * MS }));
    let mut rig = Rig::start("irq-delay", script, false);
    rig.post_fenced(1, None, 1, &[]);
    rig.kick();
    assert_eq!(rig.wait_fences(1), vec![1]);
    wait_notifies(&rig, None, 1);
    let n = notifies(&rig);
    assert_eq!((n[0].0, n[0].1), (NotifyKind::Delayed, 1));
    assert!(n[0].2 - completed_at(&rig, 1) >= 150 * MS);
    assert_eq!(rig.calls(), 1);
    rig.finish();
}
