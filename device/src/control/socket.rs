//! Binding the control socket so that only the device's user can connect.
//!
//! The socket's permission bits are set on the socket *before* it is bound
//! (`fchmod` on an unbound socket, which Linux honours at `bind`), so the
//! file never exists with a wider mode, and the process umask — shared by
//! every thread — is left alone.

use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use socket2::{Domain, SockAddr, Socket, Type};
use tracing::info;

/// The only mode the control socket may have: read/write for its owner.
pub const SOCKET_MODE: u32 = 0o600;

/// A bound, listening control socket and the file it created.
#[derive(Debug)]
pub struct BoundSocket {
    pub listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file, so that removing it never
    /// removes a socket some later process bound at the same path.
    identity: (u64, u64),
}

impl BoundSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file if it is still the one this process bound.
    pub fn remove_file(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.identity => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), "cannot remove control socket: {e}");
                }
            }
            _ => {}
        }
    }
}

/// Binds and listens on `path` with mode 0600, owned by the running user.
///
/// A stale socket file (nobody listening) is replaced; a live one, or a
/// path that is not a socket, is refused.
pub fn bind_private(path: &Path) -> anyhow::Result<BoundSocket> {
    let what = || format!("cannot bind control socket {}", path.display());
    remove_if_stale(path).with_context(what)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None)
        .context("cannot create a unix socket")
        .with_context(what)?;
    // SAFETY: fchmod on a file descriptor owned by `socket`, alive here.
    if unsafe { libc::fchmod(socket.as_raw_fd(), SOCKET_MODE) } != 0 {
        return Err(io::Error::last_os_error())
            .context("cannot set the socket's mode before binding")
            .with_context(what);
    }
    let address = SockAddr::unix(path)
        .context("bad socket path (a unix socket path is at most 107 bytes)")
        .with_context(what)?;
    socket.bind(&address).with_context(what)?;
    let bound = finish_binding(socket, path);
    if bound.is_err() {
        let _ = std::fs::remove_file(path);
    }
    bound.with_context(what)
}

fn finish_binding(socket: Socket, path: &Path) -> anyhow::Result<BoundSocket> {
    let meta = std::fs::symlink_metadata(path).context("cannot stat the new socket")?;
    check_owner_only(path, &meta)?;
    socket.listen(128).context("cannot listen")?;
    Ok(BoundSocket {
        listener: socket.into(),
        path: path.to_path_buf(),
        identity: (meta.dev(), meta.ino()),
    })
}

/// Checks the new socket is ours and owner-only. A umask stricter than 0077
/// can leave it narrower than 0600 (unusable even by its owner): widen it to
/// 0600, never more.
fn check_owner_only(path: &Path, meta: &std::fs::Metadata) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        anyhow::bail!(
            "socket is owned by uid {}, not by this process (uid {euid})",
            meta.uid()
        );
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        anyhow::bail!("socket came out with mode {mode:o}, wider than {SOCKET_MODE:o}");
    }
    if mode != SOCKET_MODE {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).with_context(
            || format!("cannot change the socket's mode from {mode:o} to {SOCKET_MODE:o}"),
        )?;
    }
    Ok(())
}

/// Removes `path` if it is a socket nobody listens on.
fn remove_if_stale(path: &Path) -> anyhow::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        anyhow::bail!("path exists and is not a socket");
    }
    if is_live(path) {
        anyhow::bail!("another process is listening on it (is another fencelab-device running?)");
    }
    std::fs::remove_file(path).context("cannot remove the stale socket")?;
    info!(path = %path.display(), "removed stale control socket");
    Ok(())
}

/// True when some process listens on the socket at `path`.
///
/// `/proc/net/unix` first, as `backend::bind` does, because a probe
/// connection would be taken by a single-connection listener as its client.
/// It lists the path as the binder spelled it, so a socket bound through a
/// relative path from another directory is missed there; a connect probe
/// covers that case (refused = stale).
fn is_live(path: &Path) -> bool {
    crate::socket_probe::is_listening(path) || UnixStream::connect(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fencelab-sock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn binds_owner_only_and_refuses_a_live_socket() {
        let dir = scratch_dir("live");
        let path = dir.join("ctl");
        let bound = bind_private(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        // SAFETY: geteuid has no preconditions and cannot fail.
        assert_eq!(meta.uid(), unsafe { libc::geteuid() });
        let err = format!("{:#}", bind_private(&path).unwrap_err());
        assert!(err.contains("another process is listening"), "{err}");
        bound.remove_file();
        assert!(!path.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn replaces_a_stale_socket_and_refuses_other_files() {
        let dir = scratch_dir("stale");
        let path = dir.join("ctl");
        drop(UnixListener::bind(&path).unwrap()); // leaves the file behind
        let bound = bind_private(&path).unwrap();
        assert!(UnixStream::connect(&path).is_ok());
        drop(bound);

        let file = dir.join("plain");
        std::fs::write(&file, "x").unwrap();
        let err = format!("{:#}", bind_private(&file).unwrap_err());
        assert!(err.contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn removing_leaves_a_newer_socket_alone() {
        let dir = scratch_dir("newer");
        let path = dir.join("ctl");
        let old = bind_private(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let _newer = UnixListener::bind(&path).unwrap();
        old.remove_file();
        assert!(path.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
