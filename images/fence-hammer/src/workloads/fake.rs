//! Test stand-ins for the GPU and the kernel's sync_files: fences made of
//! pipes (a fence is signaled when a byte is written to its pipe, so poll(2)
//! sees it), merged fences made of pipes too.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use super::{Context, FenceSource, Params, SyncFiles};
use crate::lanes::{Lane, Lanes};
use crate::readback::SlotMemory;
use crate::readback::tests::FakeSlots;
use crate::sync_file::{FenceInfo, FileInfo, Status, SyncFileError};

pub type SignalPolicy = Box<dyn Fn(u64) -> Vec<u64> + Send>;

/// A GPU of pipes. `on_submit(seq)` names the fences to signal right after
/// fence `seq` (the `seq`-th submission, from 0) is submitted.
pub struct FakeGpu {
    pub on_submit: SignalPolicy,
    pub fail_submit: HashSet<u64>,
    /// The status fences are signaled with (default 1, success).
    pub status: HashMap<u64, i32>,
    pub timestamp: Box<dyn Fn(u64) -> u64 + Send>,
    pub writers: HashMap<u64, File>,
    pub by_fd: HashMap<RawFd, u64>,
    pub signaled: HashSet<u64>,
    pub next: u64,
    pub commands: Vec<Vec<u8>>,
    /// The write buffer: a fence's WRITEs land in it when it is
    /// signaled, unless the fence is in `premature`.
    pub memory: Option<Arc<FakeSlots>>,
    /// Fences signaled without their WRITEs (as a driver signaling a
    /// fence the device has not completed would).
    pub premature: HashSet<u64>,
    /// Merged fences, by index.
    pub merged: Vec<FakeMerge>,
    pub merged_by_fd: HashMap<RawFd, usize>,
    /// A broken fence array: a merged fence signals with its first
    /// signaled component instead of its last.
    pub early_arrays: bool,
    /// `set_deadline` calls.
    pub deadline_calls: u64,
    /// `set_deadline` fails with this errno.
    pub deadline_error: Option<i32>,
}

/// A merged fence: signaled once all its components are (see
/// [`FakeGpu::early_arrays`]).
pub struct FakeMerge {
    pub components: Vec<u64>,
    writer: File,
    pub fired: bool,
}

fn pipe() -> (OwnedFd, File) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a writable array of two ints.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 succeeded; both fds are new and ours.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

impl FakeGpu {
    pub fn new(on_submit: SignalPolicy) -> Self {
        Self {
            on_submit,
            fail_submit: HashSet::new(),
            status: HashMap::new(),
            timestamp: Box::new(|seq| 1_000 + seq * 10),
            writers: HashMap::new(),
            by_fd: HashMap::new(),
            signaled: HashSet::new(),
            next: 0,
            commands: Vec::new(),
            memory: None,
            premature: HashSet::new(),
            merged: Vec::new(),
            merged_by_fd: HashMap::new(),
            early_arrays: false,
            deadline_calls: 0,
            deadline_error: None,
        }
    }

    pub fn in_order() -> Self {
        Self::new(Box::new(|seq| vec![seq]))
    }

    pub fn signal(&mut self, seq: u64) {
        if let Some(memory) = &self.memory {
            if !self.premature.contains(&seq) {
                memory.apply(&self.commands[seq as usize]);
            }
        }
        if self.signaled.insert(seq) {
            // A reader already closed is fine (EPIPE).
            let _ = self
                .writers
                .get_mut(&seq)
                .expect("signal a submitted fence")
                .write_all(b"!");
        }
        for i in 0..self.merged.len() {
            self.fire_if_due(i);
        }
    }

    fn fire_if_due(&mut self, i: usize) {
        let m = &self.merged[i];
        let signaled = |c: &u64| self.signaled.contains(c);
        let due = if self.early_arrays {
            m.components.iter().any(signaled)
        } else {
            m.components.iter().all(signaled)
        };
        if due && !m.fired {
            let m = &mut self.merged[i];
            m.fired = true;
            let _ = m.writer.write_all(b"!");
        }
    }

    /// How many of the fds this GPU handed out (fences and merged fences)
    /// are still open somewhere: a pipe's write end reports POLLERR once
    /// its read end is closed.
    pub fn readers_open(&self) -> usize {
        let writers = self
            .writers
            .values()
            .chain(self.merged.iter().map(|m| &m.writer));
        writers
            .filter(|w| {
                let mut p = libc::pollfd {
                    fd: w.as_raw_fd(),
                    events: 0,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, no wait.
                let rc = unsafe { libc::poll(&mut p, 1, 0) };
                rc == 0 || p.revents & libc::POLLERR == 0
            })
            .count()
    }

    /// The fences behind `fd`: itself, or a merged fence's components.
    fn components(&self, fd: RawFd) -> Vec<u64> {
        match self.merged_by_fd.get(&fd) {
            Some(&i) => self.merged[i].components.clone(),
            None => vec![self.by_fd[&fd]],
        }
    }

    fn fence_info(&self, seq: u64) -> FenceInfo {
        let signaled = self.signaled.contains(&seq);
        FenceInfo {
            timeline: if signaled {
                "signaled-timeline"
            } else {
                "fake"
            }
            .into(),
            driver: "fake".into(),
            status: Status::from_raw(self.raw_status(seq)),
            flags: 0,
            timestamp_ns: if signaled { (self.timestamp)(seq) } else { 0 },
        }
    }

    fn raw_status(&self, seq: u64) -> i32 {
        if self.signaled.contains(&seq) {
            *self.status.get(&seq).unwrap_or(&1)
        } else {
            0
        }
    }

    fn read(&self, fd: BorrowedFd<'_>) -> FileInfo {
        let fd = fd.as_raw_fd();
        if let Some(&i) = self.merged_by_fd.get(&fd) {
            let m = &self.merged[i];
            // As dma_fence_array: the first component error, else success.
            let error = m
                .components
                .iter()
                .map(|&c| self.raw_status(c))
                .find(|s| *s < 0);
            let raw = if m.fired { error.unwrap_or(1) } else { 0 };
            return FileInfo {
                name: format!("merged-{i}"),
                status: Status::from_raw(raw),
                fences: m.components.iter().map(|&c| self.fence_info(c)).collect(),
            };
        }
        let seq = self.by_fd[&fd];
        let fence = self.fence_info(seq);
        FileInfo {
            name: format!("fake-{seq}"),
            status: fence.status,
            fences: vec![fence],
        }
    }
}

impl FenceSource for FakeGpu {
    fn submit(&mut self, command: &[u8]) -> io::Result<OwnedFd> {
        let seq = self.next;
        self.next += 1;
        self.commands.push(command.to_vec());
        if self.fail_submit.contains(&seq) {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        let (r, w) = pipe();
        self.writers.insert(seq, w);
        self.merged_by_fd.remove(&r.as_raw_fd());
        self.by_fd.insert(r.as_raw_fd(), seq);
        for s in (self.on_submit)(seq) {
            self.signal(s);
        }
        Ok(r)
    }

    fn info(&mut self, fence: BorrowedFd<'_>) -> Result<FileInfo, SyncFileError> {
        Ok(self.read(fence))
    }
}

/// A [`FakeGpu`] shared by lanes (each lane submits to it) and standing in
/// for the kernel's sync_files.
#[derive(Clone)]
pub struct FakeLanes {
    pub gpu: Arc<Mutex<FakeGpu>>,
    pub in_order: bool,
}

impl FakeLanes {
    pub fn new(gpu: FakeGpu) -> Self {
        Self {
            gpu: Arc::new(Mutex::new(gpu)),
            in_order: true,
        }
    }

    /// Lanes for a workload that opens none.
    pub fn unused() -> Self {
        Self::new(FakeGpu::new(Box::new(|_| panic!("no lane was opened"))))
    }

    pub fn gpu(&self) -> std::sync::MutexGuard<'_, FakeGpu> {
        self.gpu.lock().unwrap()
    }

    /// A context whose lanes and sync_files are these, `source` the node.
    pub fn context<'a>(
        &'a self,
        source: &'a mut dyn FenceSource,
        slots: Option<&'a FakeSlots>,
        params: Params,
        label: &'a str,
    ) -> Context<'a> {
        Context {
            source,
            slots: slots.map(|s| s as &dyn SlotMemory),
            lanes: self,
            sync_files: self,
            params,
            label,
        }
    }

    /// A source submitting to the shared GPU.
    pub fn source(&self) -> SharedFake {
        SharedFake(self.gpu.clone())
    }
}

impl Lanes for FakeLanes {
    fn open(&self, n: usize) -> anyhow::Result<Vec<Lane>> {
        Ok((0..n)
            .map(|_| Box::new(SharedFake(self.gpu.clone())) as Lane)
            .collect())
    }

    fn signals_in_order(&self) -> bool {
        self.in_order
    }
}

impl SyncFiles for FakeLanes {
    fn info(&self, fd: BorrowedFd<'_>) -> Result<FileInfo, SyncFileError> {
        Ok(self.gpu().read(fd))
    }

    fn merge(&self, a: BorrowedFd<'_>, b: BorrowedFd<'_>, _name: &str) -> io::Result<OwnedFd> {
        let mut gpu = self.gpu();
        let mut components = gpu.components(a.as_raw_fd());
        for c in gpu.components(b.as_raw_fd()) {
            if !components.contains(&c) {
                components.push(c);
            }
        }
        let (r, writer) = pipe();
        gpu.merged.push(FakeMerge {
            components,
            writer,
            fired: false,
        });
        let i = gpu.merged.len() - 1;
        gpu.by_fd.remove(&r.as_raw_fd());
        gpu.merged_by_fd.insert(r.as_raw_fd(), i);
        gpu.fire_if_due(i);
        Ok(r)
    }

    fn set_deadline(&self, _fd: BorrowedFd<'_>, _deadline_ns: u64) -> io::Result<()> {
        let mut gpu = self.gpu();
        gpu.deadline_calls += 1;
        match gpu.deadline_error {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }
}

/// One lane of [`FakeLanes`].
pub struct SharedFake(Arc<Mutex<FakeGpu>>);

impl FenceSource for SharedFake {
    fn submit(&mut self, command: &[u8]) -> io::Result<OwnedFd> {
        self.0.lock().unwrap().submit(command)
    }

    fn info(&mut self, fence: BorrowedFd<'_>) -> Result<FileInfo, SyncFileError> {
        Ok(self.0.lock().unwrap().read(fence))
    }
}

/// A device completing one fence at a time: every `every`, the oldest
/// submitted fence not yet signaled is signaled. Stops when dropped.
pub struct Ticker {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    pub fn start(lanes: &FakeLanes, every: std::time::Duration) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gpu = lanes.gpu.clone();
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(every);
                let mut gpu = gpu.lock().unwrap();
                let oldest = (0..gpu.next)
                    .find(|s| gpu.writers.contains_key(s) && !gpu.signaled.contains(s));
                if let Some(seq) = oldest {
                    gpu.signal(seq);
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
