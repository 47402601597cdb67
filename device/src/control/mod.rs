//! The control plane: a unix socket (mode 0600) through which a running
//! device is driven — plans loaded and patched, hung fences released,
//! completion paused and resumed, stats and accounting read, the trace
//! flushed. `device/CONTROL.md` documents the protocol.
//!
//! - [`protocol`]: request and reply messages (newline-delimited JSON).
//! - [`socket`]: binding the socket owner-only, refusing a live one.
//! - [`dispatch`]: a request carried out on a [`crate::fault::DeviceControl`].
//! - [`server`]: the tokio server on its own thread.
//! - [`client`]: a blocking client.
//! - [`ctl`]: `fencelab-device ctl`, the command-line client.

pub mod client;
pub mod ctl;
pub mod dispatch;
pub mod protocol;
pub mod server;
pub mod socket;

pub use client::{Client, ClientError};
pub use protocol::{PlanSource, Request, RequestError, Response};
pub use server::ControlServer;

use std::path::{Path, PathBuf};

/// The default control socket for a vhost-user socket: `<socket>.ctl`.
pub fn default_socket_path(vhost_socket: &Path) -> PathBuf {
    let mut path = vhost_socket.as_os_str().to_owned();
    path.push(".ctl");
    PathBuf::from(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_socket_sits_next_to_the_vhost_socket() {
        assert_eq!(
            default_socket_path(Path::new("/run/gpu.sock")),
            Path::new("/run/gpu.sock.ctl")
        );
    }
}
