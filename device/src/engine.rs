//! The fence engine: completes fenced commands at their due time.
//!
//! The vring handler never waits. It answers a fenced command, wraps what is
//! needed to return it to the guest in an item, and [`Engine::submit`]s it
//! with a due time. The engine thread keeps pending items in a min-heap keyed
//! by `(due, arrival)`, sleeps on a `TimerFd` armed for the earliest due
//! time, and hands everything that is due, in that order, to a
//! [`Completer`] in one batch (the backend's completer puts the descriptors
//! on the used ring and notifies the guest once per batch).
//!
//! The loop is an `event-manager` [`EventManager`] with two event sources:
//! an `EventFd` written by `submit` (or `flush`/`shutdown`) and the timer.
//! Completion policy lives in [`Timeline::tick`] and the completer, so fault
//! injection (reordering, hangs, dropped or coalesced interrupts) can slot in
//! there without touching the vring side.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering as AtOrd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use tracing::{error, warn};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::timerfd::TimerFd;

/// Receives due items on the engine thread, in `(due, arrival)` order.
pub trait Completer<T>: Send + 'static {
    fn complete(&mut self, batch: Vec<T>);
}

impl<T, F: FnMut(Vec<T>) + Send + 'static> Completer<T> for F {
    fn complete(&mut self, batch: Vec<T>) {
        self(batch)
    }
}

/// An item waiting for its due time.
#[derive(Debug)]
pub struct Pending<T> {
    pub due: Instant,
    pub item: T,
}

/// State shared between the handle and the engine thread.
struct Shared<T> {
    inbox: Mutex<Vec<Pending<T>>>,
    wake: EventFd,
    stop: AtomicBool,
    running: AtomicBool,
    /// Items submitted and not yet completed.
    pending: AtomicUsize,
    flush_requested: AtomicU64,
    flush_done: Mutex<u64>,
    flush_cv: Condvar,
}

fn lock<X>(m: &Mutex<X>) -> MutexGuard<'_, X> {
    // A panic elsewhere must not take fence completion down with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Handle to the engine thread.
pub struct Engine<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    thread: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> Engine<T> {
    /// Starts the engine thread; `completer` runs on it.
    pub fn spawn<C: Completer<T>>(completer: C) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            inbox: Mutex::new(Vec::new()),
            wake: EventFd::new(EFD_NONBLOCK)?,
            stop: AtomicBool::new(false),
            running: AtomicBool::new(true),
            pending: AtomicUsize::new(0),
            flush_requested: AtomicU64::new(0),
            flush_done: Mutex::new(0),
            flush_cv: Condvar::new(),
        });
        let timeline = Timeline {
            shared: shared.clone(),
            wake: shared.wake.try_clone()?,
            timer: TimerFd::new()?,
            heap: BinaryHeap::new(),
            seq: 0,
            completer,
        };
        let mut manager: EventManager<Timeline<T, C>> =
            EventManager::new().map_err(|e| io::Error::other(format!("event manager: {e:?}")))?;
        manager.add_subscriber(timeline);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fence-engine".into())
            .spawn(move || {
                while !thread_shared.stop.load(AtOrd::Acquire) {
                    if let Err(e) = manager.run() {
                        error!("fence engine event loop failed: {e:?}");
                        break;
                    }
                }
                thread_shared.running.store(false, AtOrd::Release);
                // Wake any flush() still waiting.
                let _guard = lock(&thread_shared.flush_done);
                thread_shared.flush_cv.notify_all();
            })?;
        Ok(Engine {
            shared,
            thread: Some(thread),
        })
    }

    /// Queues `item` for completion at `due`. Never blocks on the engine.
    pub fn submit(&self, due: Instant, item: T) {
        self.shared.pending.fetch_add(1, AtOrd::AcqRel);
        lock(&self.shared.inbox).push(Pending { due, item });
        self.kick();
    }

    /// Items submitted and not yet completed.
    pub fn pending(&self) -> usize {
        self.shared.pending.load(AtOrd::Acquire)
    }

    /// Completes everything pending now, regardless of due time, and returns
    /// once that is done (or the engine thread is gone). Used when the
    /// frontend stops the queue: descriptors must be back before it reads the
    /// ring state.
    pub fn flush(&self) {
        let ticket = self.shared.flush_requested.fetch_add(1, AtOrd::AcqRel) + 1;
        self.kick();
        let mut done = lock(&self.shared.flush_done);
        while *done < ticket && self.shared.running.load(AtOrd::Acquire) {
            done = match self
                .shared
                .flush_cv
                .wait_timeout(done, Duration::from_millis(100))
            {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Stops the engine thread; pending items are dropped uncompleted.
    /// Returns how many there were.
    pub fn shutdown(mut self) -> usize {
        self.stop();
        self.pending()
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, AtOrd::Release);
        self.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn kick(&self) {
        if let Err(e) = self.shared.wake.write(1) {
            // EAGAIN means the counter is saturated: the engine is awake anyway.
            if e.kind() != io::ErrorKind::WouldBlock {
                error!("cannot wake fence engine: {e}");
            }
        }
    }
}

impl<T: Send + 'static> Drop for Engine<T> {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Entry<T> {
    due: Instant,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

const TOKEN_WAKE: u32 = 1;
const TOKEN_TIMER: u32 = 2;

/// The engine thread's state: one global timeline of pending completions.
struct Timeline<T, C> {
    shared: Arc<Shared<T>>,
    wake: EventFd,
    timer: TimerFd,
    heap: BinaryHeap<Reverse<Entry<T>>>,
    /// Arrival counter: breaks ties between equal due times.
    seq: u64,
    completer: C,
}

impl<T: Send + 'static, C: Completer<T>> Timeline<T, C> {
    /// Takes new arrivals, completes what is due and re-arms the timer.
    fn tick(&mut self) {
        for p in std::mem::take(&mut *lock(&self.shared.inbox)) {
            self.heap.push(Reverse(Entry {
                due: p.due,
                seq: self.seq,
                item: p.item,
            }));
            self.seq = self.seq.wrapping_add(1);
        }

        let flush_to = self.shared.flush_requested.load(AtOrd::Acquire);
        let flushing = flush_to > *lock(&self.shared.flush_done);
        let now = Instant::now();
        let mut batch = Vec::new();
        while let Some(Reverse(top)) = self.heap.peek() {
            if !flushing && top.due > now {
                break;
            }
            if let Some(Reverse(e)) = self.heap.pop() {
                batch.push(e.item);
            }
        }
        if !batch.is_empty() {
            let n = batch.len();
            self.completer.complete(batch);
            self.shared.pending.fetch_sub(n, AtOrd::AcqRel);
        }
        if flushing {
            let mut done = lock(&self.shared.flush_done);
            *done = flush_to;
            self.shared.flush_cv.notify_all();
        }

        // Re-arming also resets the timer's expiration count, so a level-
        // triggered timer event does not fire again for an old expiry.
        let res = match self.heap.peek() {
            Some(Reverse(top)) => {
                // A zero duration would disarm the timer: wait at least 1ns.
                let wait = top
                    .due
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_nanos(1));
                self.timer.reset(wait, None)
            }
            None => self.timer.clear(),
        };
        if let Err(e) = res {
            error!("cannot arm fence engine timer: {e}");
        }
    }
}

impl<T: Send + 'static, C: Completer<T>> MutEventSubscriber for Timeline<T, C> {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() == TOKEN_WAKE {
            // Non-blocking: EAGAIN just means someone else consumed it.
            let _ = self.wake.read();
        }
        if !events.event_set().contains(EventSet::IN) {
            warn!(
                "fence engine: unexpected event set {:?}",
                events.event_set()
            );
        }
        self.tick();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let wake = Events::with_data(&self.wake, TOKEN_WAKE, EventSet::IN);
        let timer = Events::with_data_raw(self.timer.as_raw_fd(), TOKEN_TIMER, EventSet::IN);
        if let Err(e) = ops.add(wake).and_then(|()| ops.add(timer)) {
            error!("fence engine cannot watch its fds: {e:?}");
            self.shared.stop.store(true, AtOrd::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    type Batches = mpsc::Receiver<Vec<(u32, Instant)>>;

    fn collecting() -> (impl Completer<(u32, Instant)>, Batches) {
        let (tx, rx) = mpsc::channel();
        let c = move |batch: Vec<(u32, Instant)>| {
            let _ = tx.send(batch);
        };
        (c, rx)
    }

    /// Receives `n` completions (with completion instants), in order.
    fn recv_n(rx: &Batches, n: usize) -> Vec<(u32, Instant, Instant)> {
        let mut out = Vec::new();
        while out.len() < n {
            let batch = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("engine completed everything within 10 s");
            let at = Instant::now();
            out.extend(batch.into_iter().map(|(id, due)| (id, due, at)));
        }
        out
    }

    #[test]
    fn completes_in_due_order() {
        let (c, rx) = collecting();
        let engine = Engine::spawn(c).unwrap();
        let t0 = Instant::now();
        for (id, ms) in [(1, 60), (2, 20), (3, 40), (4, 0)] {
            let due = t0 + Duration::from_millis(ms);
            engine.submit(due, (id, due));
        }
        let got = recv_n(&rx, 4);
        let ids: Vec<u32> = got.iter().map(|g| g.0).collect();
        assert_eq!(ids, vec![4, 2, 3, 1]);
        for (id, due, at) in &got {
            assert!(at >= due, "fence {id} completed before it was due");
        }
        assert_eq!(engine.pending(), 0);
        assert!(rx.try_recv().is_err(), "nothing completed twice");
    }

    #[test]
    fn equal_due_times_keep_arrival_order() {
        let (c, rx) = collecting();
        let engine = Engine::spawn(c).unwrap();
        let due = Instant::now() + Duration::from_millis(30);
        for id in 0..100 {
            engine.submit(due, (id, due));
        }
        let ids: Vec<u32> = recv_n(&rx, 100).iter().map(|g| g.0).collect();
        assert_eq!(ids, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn latency_is_respected() {
        let (c, rx) = collecting();
        let engine = Engine::spawn(c).unwrap();
        let start = Instant::now();
        let latency = Duration::from_millis(50);
        for id in 0..10 {
            let due = Instant::now() + latency;
            engine.submit(due, (id, due));
        }
        let got = recv_n(&rx, 10);
        assert_eq!(got.len(), 10);
        assert!(start.elapsed() >= latency);
        for (_, _, at) in got {
            assert!(at.duration_since(start) >= latency);
        }
    }

    #[test]
    fn past_due_items_complete_immediately_and_later_ones_wait() {
        let (c, rx) = collecting();
        let engine = Engine::spawn(c).unwrap();
        let now = Instant::now();
        engine.submit(now, (1, now));
        let first = recv_n(&rx, 1);
        assert_eq!(first[0].0, 1);
        // A later submission with an earlier due time than one already
        // pending overtakes it.
        let late = Instant::now() + Duration::from_millis(200);
        let soon = Instant::now() + Duration::from_millis(20);
        engine.submit(late, (2, late));
        engine.submit(soon, (3, soon));
        let got = recv_n(&rx, 2);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![3, 2]);
        assert!(got[1].2 >= late);
    }

    #[test]
    fn flush_completes_everything_now() {
        let (c, rx) = collecting();
        let engine = Engine::spawn(c).unwrap();
        let far = Instant::now() + Duration::from_secs(3600);
        engine.submit(far, (1, far));
        engine.submit(far, (2, far));
        assert_eq!(engine.pending(), 2);
        engine.flush();
        assert_eq!(engine.pending(), 0);
        let mut ids = Vec::new();
        while let Ok(b) = rx.try_recv() {
            ids.extend(b.into_iter().map(|x| x.0));
        }
        assert_eq!(ids, vec![1, 2]);
    }

    #[test]
    fn shutdown_reports_what_was_left() {
        let (c, _rx) = collecting();
        let engine = Engine::spawn(c).unwrap();
        let far = Instant::now() + Duration::from_secs(3600);
        engine.submit(far, (1, far));
        assert_eq!(engine.shutdown(), 1);
    }
}
