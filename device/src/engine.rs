//! The fence engine: carries out the plan's decisions on its own thread.
//!
//! The vring handler never waits for it. It decides, writes the response,
//! and [`Engine::submit`]s a [`Submission`]; deadline hints, releases, pause
//! and flush/reset arrive the same way, through one ordered inbox. The
//! engine thread feeds them to the [`Scheduler`] (the policy: timelines,
//! reorder blocks, hangs, deadlines, interrupts), which completes fences
//! through a [`Sink`] (the backend's puts descriptors on the used ring and
//! notifies the guest).
//!
//! The loop is an `event-manager` [`EventManager`] with two event sources:
//! an `EventFd` written with every request, and a `TimerFd` armed for the
//! scheduler's earliest event. No busy waiting: between events the thread
//! sleeps in `epoll_wait`. The thread asks for 1 ns timer slack so that a
//! completion goes within microseconds of its due time on an idle host.
//!
//! All times are ns since the device started, on one [`Clock`].

mod block;
mod irq;
mod schedule;
mod timers;

pub use irq::{Notifier, SPURIOUS_SPACING_NS};
pub use schedule::{Scheduler, Sink, Submission, base_due, planned_due};

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtOrd};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use tracing::{debug, error, warn};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::timerfd::TimerFd;

use crate::fault::{ReleaseTarget, Tracer};
use crate::stats::Stats;

/// Identifies a fence inside the engine (arrival order, never reused).
pub type Key = u64;

/// Longest the timer sleeps at once; farther events are re-armed for.
const MAX_TIMER_WAIT: Duration = Duration::from_secs(3600);

/// The device clock: nanoseconds since the backend started.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    pub fn start() -> Self {
        Clock {
            epoch: Instant::now(),
        }
    }

    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The instant `ns` after the epoch, if it is representable.
    pub fn instant(&self, ns: u64) -> Option<Instant> {
        self.epoch.checked_add(Duration::from_nanos(ns))
    }
}

enum Request<T> {
    Submit {
        submission: Submission<T>,
        rescue_ns: Option<u64>,
    },
    Deadline {
        fence: u64,
        hint_ns: u64,
        boost_ns: Option<u64>,
    },
    Release {
        target: ReleaseTarget,
        reply: mpsc::Sender<Result<u64, String>>,
    },
    Pause {
        paused: bool,
        reply: mpsc::Sender<()>,
    },
    Flush {
        reply: mpsc::Sender<()>,
    },
    Reset {
        reply: mpsc::Sender<u64>,
    },
}

/// State shared between the handle and the engine thread.
struct Shared<T> {
    inbox: Mutex<Vec<Request<T>>>,
    wake: EventFd,
    stop: AtomicBool,
    running: AtomicBool,
    /// Fences submitted and neither completed nor abandoned, as of the
    /// engine's last wake-up plus submissions since.
    outstanding: AtomicUsize,
}

fn lock<X>(m: &Mutex<X>) -> MutexGuard<'_, X> {
    // A panic elsewhere must not take fence completion down with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Error of a request the engine thread can no longer answer.
const ENGINE_GONE: &str = "the fence engine has stopped";

/// Handle to the engine thread.
pub struct Engine<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    thread: Option<JoinHandle<()>>,
    clock: Clock,
}

impl<T: Send + 'static> Engine<T> {
    /// Starts the engine thread; `sink` runs on it.
    pub fn spawn<S>(
        clock: Clock,
        sink: S,
        stats: Arc<Stats>,
        tracer: Arc<dyn Tracer>,
    ) -> io::Result<Self>
    where
        S: Sink<Item = T> + Send + 'static,
    {
        let shared = Arc::new(Shared {
            inbox: Mutex::new(Vec::new()),
            wake: EventFd::new(EFD_NONBLOCK)?,
            stop: AtomicBool::new(false),
            running: AtomicBool::new(true),
            outstanding: AtomicUsize::new(0),
        });
        let worker = Worker {
            shared: shared.clone(),
            wake: shared.wake.try_clone()?,
            timer: TimerFd::new()?,
            clock,
            scheduler: Scheduler::new(stats, tracer),
            sink,
        };
        let mut manager: EventManager<Worker<T, S>> =
            EventManager::new().map_err(|e| io::Error::other(format!("event manager: {e:?}")))?;
        manager.add_subscriber(worker);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fence-engine".into())
            .spawn(move || {
                reduce_timer_slack();
                while !thread_shared.stop.load(AtOrd::Acquire) {
                    if let Err(e) = manager.run() {
                        error!("fence engine event loop failed: {e:?}");
                        break;
                    }
                }
                thread_shared.running.store(false, AtOrd::Release);
                // Drop queued requests: their repliers see the engine gone.
                lock(&thread_shared.inbox).clear();
            })?;
        Ok(Engine {
            shared,
            thread: Some(thread),
            clock,
        })
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Queues a fence. Never blocks on the engine. `rescue_ns` is the
    /// plan's current [`crate::fault::Decide::irq_rescue`].
    pub fn submit(&self, submission: Submission<T>, rescue_ns: Option<u64>) {
        self.shared.outstanding.fetch_add(1, AtOrd::AcqRel);
        self.send(Request::Submit {
            submission,
            rescue_ns,
        });
    }

    /// Queues a `DEADLINE` hint; `boost_ns` is the plan's current
    /// [`crate::fault::Decide::deadline_boost`].
    pub fn deadline(&self, fence: u64, hint_ns: u64, boost_ns: Option<u64>) {
        self.send(Request::Deadline {
            fence,
            hint_ns,
            boost_ns,
        });
    }

    /// Releases hung fences; returns how many.
    pub fn release(&self, target: ReleaseTarget) -> Result<u64, String> {
        self.call(|reply| Request::Release { target, reply })?
    }

    /// Pauses or resumes completion; in effect when this returns.
    pub fn set_paused(&self, paused: bool) -> Result<(), String> {
        self.call(|reply| Request::Pause { paused, reply })
    }

    /// Completes every fence that is not hung forever or until released,
    /// now, and returns once that is done (or the engine is gone). Used when
    /// the frontend stops the queue: descriptors must be back before it
    /// reads the ring state.
    pub fn flush(&self) {
        if let Err(e) = self.call(|reply| Request::Flush { reply }) {
            warn!("flush: {e}");
        }
    }

    /// A device reset: flushes, then abandons the hung fences. Returns how
    /// many were abandoned.
    pub fn reset(&self) -> u64 {
        self.call(|reply| Request::Reset { reply })
            .unwrap_or_else(|e| {
                warn!("reset: {e}");
                0
            })
    }

    /// Fences submitted and neither completed nor abandoned.
    pub fn outstanding(&self) -> usize {
        self.shared.outstanding.load(AtOrd::Acquire)
    }

    /// Stops the engine thread; outstanding fences are dropped uncompleted.
    /// Returns how many there were.
    pub fn shutdown(mut self) -> usize {
        self.stop();
        self.outstanding()
    }

    fn send(&self, request: Request<T>) {
        lock(&self.shared.inbox).push(request);
        self.kick();
    }

    /// Sends a request and waits for its answer.
    fn call<R>(&self, make: impl FnOnce(mpsc::Sender<R>) -> Request<T>) -> Result<R, String> {
        let (tx, rx) = mpsc::channel();
        self.send(make(tx));
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(r) => return Ok(r),
                Err(RecvTimeoutError::Disconnected) => return Err(ENGINE_GONE.into()),
                Err(RecvTimeoutError::Timeout) => {
                    if !self.shared.running.load(AtOrd::Acquire) {
                        return Err(ENGINE_GONE.into());
                    }
                }
            }
        }
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

/// Asks for 1 ns timer slack on this thread (the default is 50 µs).
fn reduce_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and touches only
    // the calling thread's scheduling attributes.
    let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    if rc != 0 {
        debug!("cannot reduce timer slack: {}", io::Error::last_os_error());
    }
}

const TOKEN_WAKE: u32 = 1;
const TOKEN_TIMER: u32 = 2;

/// The engine thread's state.
struct Worker<T, S> {
    shared: Arc<Shared<T>>,
    wake: EventFd,
    timer: TimerFd,
    clock: Clock,
    scheduler: Scheduler<T>,
    sink: S,
}

impl<T: Send + 'static, S: Sink<Item = T>> Worker<T, S> {
    /// Applies new requests, completes what is due and re-arms the timer.
    fn tick(&mut self) {
        let requests = std::mem::take(&mut *lock(&self.shared.inbox));
        for request in requests {
            self.apply(request);
        }
        let now = self.clock.now_ns();
        self.scheduler.advance(now, &mut self.sink);
        self.publish_outstanding();
        self.arm_timer();
    }

    /// Updates the handle's count: the scheduler's plus submissions still
    /// in the inbox (counted when submitted). Done before every reply, so
    /// a caller that waited on one sees a count at least that fresh.
    fn publish_outstanding(&self) {
        let inbox = lock(&self.shared.inbox);
        let queued = inbox
            .iter()
            .filter(|r| matches!(r, Request::Submit { .. }))
            .count();
        // Under the inbox lock: a concurrent submit either is in `queued` or
        // increments after this store.
        self.shared
            .outstanding
            .store(self.scheduler.outstanding() + queued, AtOrd::Release);
    }

    fn apply(&mut self, request: Request<T>) {
        let now = self.clock.now_ns();
        match request {
            Request::Submit {
                submission,
                rescue_ns,
            } => {
                self.scheduler.set_rescue(rescue_ns);
                self.scheduler.submit(now, submission);
            }
            Request::Deadline {
                fence,
                hint_ns,
                boost_ns,
            } => self.scheduler.deadline(now, fence, hint_ns, boost_ns),
            Request::Release { target, reply } => {
                let released = self.scheduler.release(now, target);
                let _ = reply.send(released);
            }
            Request::Pause { paused, reply } => {
                self.scheduler.set_paused(now, paused, &mut self.sink);
                self.publish_outstanding();
                let _ = reply.send(());
            }
            Request::Flush { reply } => {
                self.scheduler.flush(now, &mut self.sink);
                self.publish_outstanding();
                let _ = reply.send(());
            }
            Request::Reset { reply } => {
                let abandoned = self.scheduler.reset(now, &mut self.sink);
                self.publish_outstanding();
                let _ = reply.send(abandoned);
            }
        }
    }

    fn arm_timer(&mut self) {
        // Re-arming also resets the timer's expiration count, so a level-
        // triggered timer event does not fire again for an old expiry.
        let res = match self.scheduler.next_event_at() {
            Some(at) => {
                let wait = self
                    .clock
                    .instant(at)
                    .map_or(MAX_TIMER_WAIT, |due| {
                        due.saturating_duration_since(Instant::now())
                    })
                    // A zero duration would disarm the timer.
                    .clamp(Duration::from_nanos(1), MAX_TIMER_WAIT);
                self.timer.reset(wait, None)
            }
            None => self.timer.clear(),
        };
        if let Err(e) = res {
            error!("cannot arm fence engine timer: {e}");
        }
    }
}

impl<T: Send + 'static, S: Sink<Item = T>> MutEventSubscriber for Worker<T, S> {
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
    use crate::fault::{Decision, Hang, NoTrace, TimelineId};
    use std::sync::mpsc::{Receiver, Sender};

    /// Sends each completion (item, when) to the test thread.
    struct Channel(Sender<(u32, Instant)>);

    impl Notifier for Channel {
        fn notify(&mut self) -> bool {
            true
        }
        fn notify_forced(&mut self) -> bool {
            true
        }
    }

    impl Sink for Channel {
        type Item = u32;
        fn complete(&mut self, item: u32) -> Result<Vec<(u64, u64)>, String> {
            let _ = self.0.send((item, Instant::now()));
            Ok(Vec::new())
        }
    }

    fn engine() -> (Engine<u32>, Receiver<(u32, Instant)>, Arc<Stats>) {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Stats::new());
        let e = Engine::spawn(
            Clock::start(),
            Channel(tx),
            stats.clone(),
            Arc::new(NoTrace),
        )
        .unwrap();
        (e, rx, stats)
    }

    fn submission(e: &Engine<u32>, id: u32, decision: Decision) -> Submission<u32> {
        Submission {
            timeline: TimelineId { ctx: 1, ring: 0 },
            fence_id: u64::from(id),
            command: "SUBMIT_3D",
            arrival_ns: e.clock().now_ns(),
            work_ns: 0,
            decision,
            response: 0x1100,
            errored: false,
            item: id,
        }
    }

    fn latency(d: Duration) -> Decision {
        Decision {
            latency_ns: d.as_nanos() as u64,
            ..Decision::default()
        }
    }

    fn recv_n(rx: &Receiver<(u32, Instant)>, n: usize) -> Vec<(u32, Instant)> {
        (0..n)
            .map(|_| {
                rx.recv_timeout(Duration::from_secs(10))
                    .expect("engine completed within 10 s")
            })
            .collect()
    }

    #[test]
    fn completes_each_fence_after_its_due_time() {
        let (e, rx, _) = engine();
        let start = Instant::now();
        let lat = Duration::from_millis(30);
        for id in 0..10 {
            e.submit(submission(&e, id, latency(lat)), None);
        }
        let got = recv_n(&rx, 10);
        assert_eq!(
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
        let late = got
            .iter()
            .map(|(_, at)| at.duration_since(start))
            .min()
            .unwrap();
        assert!(late >= lat, "completed after {late:?}, before {lat:?}");
        println!("engine thread: first completion {late:?} after submit");
        e.flush();
        assert_eq!(e.outstanding(), 0);
    }

    #[test]
    fn flush_completes_everything_now_and_release_answers() {
        let (e, rx, stats) = engine();
        e.submit(submission(&e, 1, latency(Duration::from_secs(3600))), None);
        let hung = Decision {
            hang: Some(Hang::UntilReleased),
            ..Decision::default()
        };
        e.submit(submission(&e, 2, hung), None);
        e.flush();
        assert_eq!(rx.try_recv().map(|r| r.0), Ok(1));
        assert!(rx.try_recv().is_err(), "the hung one stays");
        assert_eq!(e.outstanding(), 1);
        assert_eq!(e.release(ReleaseTarget::Fence { fence: 2 }), Ok(1));
        assert_eq!(recv_n(&rx, 1)[0].0, 2);
        assert!(e.release(ReleaseTarget::Fence { fence: 2 }).is_err());
        assert_eq!(stats.accounting().released, 1);
    }

    #[test]
    fn pause_is_in_effect_when_set_paused_returns() {
        let (e, rx, _) = engine();
        e.set_paused(true).unwrap();
        e.submit(submission(&e, 1, latency(Duration::ZERO)), None);
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        e.set_paused(false).unwrap();
        assert_eq!(recv_n(&rx, 1)[0].0, 1);
    }

    #[test]
    fn reset_abandons_the_hung_and_shutdown_reports_what_was_left() {
        let (e, _rx, stats) = engine();
        let forever = Decision {
            hang: Some(Hang::Forever),
            ..Decision::default()
        };
        e.submit(submission(&e, 1, forever), None);
        assert_eq!(e.reset(), 1);
        assert_eq!(stats.accounting().abandoned, 1);
        e.submit(submission(&e, 2, latency(Duration::from_secs(3600))), None);
        assert_eq!(e.shutdown(), 1);
    }
}
