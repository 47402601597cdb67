//! sync_file fds: wait for them with poll(2), read them with
//! `SYNC_IOC_FILE_INFO`, merge them and set their deadlines.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::uapi;

/// At most this many fences are read from one sync_file (ours hold one; a
/// merged one a handful).
pub const MAX_FENCES: u32 = 256;

#[derive(Debug, Error)]
pub enum SyncFileError {
    #[error("fd {fd} is not a sync_file: SYNC_IOC_FILE_INFO failed with ENOTTY ({source})")]
    NotSyncFile { fd: RawFd, source: io::Error },
    #[error("SYNC_IOC_FILE_INFO (num_fences={num_fences}) on fd {fd} failed: {source}")]
    FileInfo {
        fd: RawFd,
        num_fences: u32,
        source: io::Error,
    },
    #[error("sync_file fd {fd} holds {count} fences, more than the {MAX_FENCES} this tool reads")]
    TooManyFences { fd: RawFd, count: u32 },
    #[error("sync_file fd {fd} changed its fence count from {first} to {second} between two reads")]
    FenceCountChanged { fd: RawFd, first: u32, second: u32 },
    #[error("poll() on {nfds} sync_file fd(s) failed: {source}")]
    Poll { nfds: usize, source: io::Error },
}

/// The kernel's sync_files (see `workloads::SyncFiles`).
#[derive(Debug, Clone, Copy)]
pub struct Kernel;

/// What poll(2) said about one fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// `POLLIN`: for a sync_file, the fence is signaled (possibly with an error).
    Ready,
    /// Not ready when the pass that returned sampled it.
    Pending,
    /// `POLLERR`, `POLLHUP` or `POLLNVAL` without `POLLIN` (raw revents).
    Failed(i16),
}

/// Polls every fd in `fds` for `POLLIN`, waiting at most `timeout` for the
/// first to become ready (zero: do not wait). `EINTR` restarts the wait with
/// the remaining time.
///
/// The result is in the order of `fds`. Linux evaluates the fds of one
/// poll() pass in array order and returns the states of a single pass, so
/// `fds[i]` was sampled before `fds[i + 1]`. Callers checking signal order
/// put the newest fence first: then "a newer one ready, an older one not"
/// cannot be an artifact of sampling.
pub fn poll_in(fds: &[BorrowedFd<'_>], timeout: Duration) -> Result<Vec<Readiness>, SyncFileError> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Round up so that a sub-millisecond remainder still sleeps instead
        // of spinning; clamp to poll's int range.
        let ms = left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `pfds` is a live, exclusively borrowed array of exactly
        // `pfds.len()` pollfd structs; every fd in it is borrowed from the
        // caller for the duration of this call.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if rc >= 0 {
            break;
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return Err(SyncFileError::Poll {
            nfds: pfds.len(),
            source: err,
        });
    }
    Ok(pfds
        .iter()
        .map(|p| {
            if p.revents & libc::POLLIN != 0 {
                Readiness::Ready
            } else if p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                Readiness::Failed(p.revents)
            } else {
                Readiness::Pending
            }
        })
        .collect())
}

/// Waits at most `timeout` for one fd.
#[allow(dead_code)] // convenience for later workloads
pub fn wait(fd: BorrowedFd<'_>, timeout: Duration) -> Result<Readiness, SyncFileError> {
    Ok(poll_in(&[fd], timeout)?[0])
}

/// The status of a sync_file or of one of its fences, as the kernel encodes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Active,
    Signaled,
    /// Signaled with an error; the value is the negative errno.
    Error(i32),
}

impl Status {
    pub fn from_raw(raw: i32) -> Self {
        match raw {
            0 => Status::Active,
            r if r > 0 => Status::Signaled,
            r => Status::Error(r),
        }
    }
}

/// One `struct sync_fence_info`, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceInfo {
    /// The timeline name (`obj_name`).
    pub timeline: String,
    pub driver: String,
    pub status: Status,
    pub flags: u32,
    /// CLOCK_MONOTONIC signal time; 0 while active.
    pub timestamp_ns: u64,
}

/// A sync_file as `SYNC_IOC_FILE_INFO` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    pub name: String,
    /// From the `num_fences = 0` call: the status of the whole sync_file.
    pub status: Status,
    pub fences: Vec<FenceInfo>,
}

fn file_info_raw(fd: BorrowedFd<'_>, info: &mut uapi::SyncFileInfo) -> Result<(), SyncFileError> {
    let num_fences = info.num_fences;
    // SAFETY: SYNC_IOC_FILE_INFO takes a `struct sync_file_info *`; when
    // `num_fences` is non-zero, `sync_fence_info` points at that many
    // writable `struct sync_fence_info` (guaranteed by the callers below).
    match unsafe { uapi::ioctl(fd, uapi::SYNC_IOC_FILE_INFO, info) } {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => Err(SyncFileError::NotSyncFile {
            fd: fd.as_raw_fd(),
            source: e,
        }),
        Err(e) => Err(SyncFileError::FileInfo {
            fd: fd.as_raw_fd(),
            num_fences,
            source: e,
        }),
    }
}

/// `SYNC_IOC_MERGE`: a new sync_file named `name` (truncated to 31 bytes)
/// that signals once both `a` and `b` have; the kernel keeps the later fence
/// of each fence context, so fences of different contexts make a
/// `dma_fence_array`.
pub fn merge(a: BorrowedFd<'_>, b: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    let mut data = uapi::SyncMergeData {
        fd2: b.as_raw_fd(),
        fence: -1,
        ..Default::default()
    };
    let len = name.len().min(data.name.len() - 1);
    data.name[..len].copy_from_slice(&name.as_bytes()[..len]);
    // SAFETY: SYNC_IOC_MERGE takes a `struct sync_merge_data *`, which holds
    // no pointers; `fd2` is borrowed for the duration of the call.
    unsafe { uapi::ioctl(a, uapi::SYNC_IOC_MERGE, &mut data)? };
    if data.fence < 0 {
        return Err(io::Error::other(format!(
            "SYNC_IOC_MERGE succeeded but returned fence {}",
            data.fence
        )));
    }
    // SAFETY: on success the kernel installed a new sync_file fd in our
    // table and handed ownership of it to us.
    Ok(unsafe { OwnedFd::from_raw_fd(data.fence) })
}

/// `SYNC_IOC_SET_DEADLINE`: asks that `fence` signal by `deadline_ns`
/// (CLOCK_MONOTONIC, see [`monotonic_ns`]).
pub fn set_deadline(fence: BorrowedFd<'_>, deadline_ns: u64) -> io::Result<()> {
    let mut arg = uapi::SyncSetDeadline {
        deadline_ns,
        pad: 0,
    };
    // SAFETY: SYNC_IOC_SET_DEADLINE takes a `struct sync_set_deadline *`,
    // which holds no pointers.
    unsafe { uapi::ioctl(fence, uapi::SYNC_IOC_SET_DEADLINE, &mut arg)? };
    Ok(())
}

/// Now on CLOCK_MONOTONIC, in ns: the clock of sync_file signal timestamps
/// and deadlines.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    // CLOCK_MONOTONIC always exists on Linux; the call cannot fail with a
    // valid pointer.
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Reads a sync_file: first with `num_fences = 0` (status and fence count),
/// then with a buffer for every fence (timeline, driver, status, timestamp).
pub fn file_info(fd: BorrowedFd<'_>) -> Result<FileInfo, SyncFileError> {
    let mut head = uapi::SyncFileInfo::default();
    file_info_raw(fd, &mut head)?;
    let count = head.num_fences;
    if count > MAX_FENCES {
        return Err(SyncFileError::TooManyFences {
            fd: fd.as_raw_fd(),
            count,
        });
    }
    let mut fences = vec![uapi::SyncFenceInfo::default(); count as usize];
    if count > 0 {
        let mut full = uapi::SyncFileInfo {
            num_fences: count,
            sync_fence_info: fences.as_mut_ptr() as u64,
            ..Default::default()
        };
        file_info_raw(fd, &mut full)?;
        if full.num_fences != count {
            return Err(SyncFileError::FenceCountChanged {
                fd: fd.as_raw_fd(),
                first: count,
                second: full.num_fences,
            });
        }
    }
    Ok(FileInfo {
        name: uapi::c_field_to_string(&head.name),
        status: Status::from_raw(head.status),
        fences: fences
            .iter()
            .map(|f| FenceInfo {
                timeline: uapi::c_field_to_string(&f.obj_name),
                driver: uapi::c_field_to_string(&f.driver_name),
                status: Status::from_raw(f.status),
                flags: f.flags,
                timestamp_ns: f.timestamp_ns,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    fn pipe() -> (OwnedFd, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a writable array of two ints, as pipe2 requires.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
        // SAFETY: pipe2 succeeded, so both fds are new and owned by us.
        unsafe {
            (
                OwnedFd::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        }
    }

    fn eventfd() -> OwnedFd {
        // SAFETY: plain syscall wrapper without pointers.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: eventfd returned a new fd that we own.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    #[test]
    fn poll_times_out_on_a_silent_fd() {
        let (r, _w) = pipe();
        let t0 = Instant::now();
        let got = poll_in(&[r.as_fd()], Duration::from_millis(60)).unwrap();
        let waited = t0.elapsed();
        assert_eq!(got, vec![Readiness::Pending]);
        assert!(
            waited >= Duration::from_millis(55),
            "returned early after {waited:?}"
        );
        assert!(waited < Duration::from_secs(5), "overslept: {waited:?}");
    }

    #[test]
    fn poll_reports_readiness_per_fd_in_order() {
        let (r1, _w1) = pipe();
        let (r2, mut w2) = pipe();
        w2.write_all(b"x").unwrap();
        let t0 = Instant::now();
        let got = poll_in(&[r1.as_fd(), r2.as_fd()], Duration::from_secs(5)).unwrap();
        assert!(t0.elapsed() < Duration::from_secs(1));
        assert_eq!(got, vec![Readiness::Pending, Readiness::Ready]);
        let got = poll_in(&[r2.as_fd(), r1.as_fd()], Duration::ZERO).unwrap();
        assert_eq!(got, vec![Readiness::Ready, Readiness::Pending]);
    }

    #[test]
    fn poll_reports_hangup_as_failed() {
        let (r, w) = pipe();
        drop(w);
        let got = poll_in(&[r.as_fd()], Duration::ZERO).unwrap();
        assert!(
            matches!(got[0], Readiness::Failed(ev) if ev & libc::POLLHUP != 0),
            "{got:?}"
        );
    }

    #[test]
    fn file_info_on_non_sync_fds_is_a_precise_error() {
        let (r, _w) = pipe();
        let err = file_info(r.as_fd()).unwrap_err();
        assert!(
            matches!(&err, SyncFileError::NotSyncFile { fd, source }
                if *fd == r.as_raw_fd() && source.raw_os_error() == Some(libc::ENOTTY)),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("is not a sync_file"), "{msg}");
        assert!(msg.contains(&format!("fd {}", r.as_raw_fd())), "{msg}");

        let e = eventfd();
        assert!(matches!(
            file_info(e.as_fd()),
            Err(SyncFileError::NotSyncFile { .. })
        ));
    }

    #[test]
    fn merge_and_set_deadline_refuse_non_sync_fds() {
        let (r1, _w1) = pipe();
        let (r2, _w2) = pipe();
        let err = merge(r1.as_fd(), r2.as_fd(), "x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTTY), "{err}");
        let err = set_deadline(r1.as_fd(), monotonic_ns()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTTY), "{err}");
    }

    #[test]
    fn monotonic_ns_advances() {
        let a = monotonic_ns();
        std::thread::sleep(Duration::from_millis(2));
        let b = monotonic_ns();
        assert!(b >= a + 2_000_000, "{a} -> {b}");
    }

    #[test]
    fn status_decoding() {
        assert_eq!(Status::from_raw(1), Status::Signaled);
        assert_eq!(Status::from_raw(0), Status::Active);
        assert_eq!(
            Status::from_raw(-libc::ETIMEDOUT),
            Status::Error(-libc::ETIMEDOUT)
        );
    }
}
