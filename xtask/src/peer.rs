//! rust-vmm's `vhost-device-gpu`, the backend fencelab is measured against
//! (DESIGN.md §5): installed from crates.io into the cache on first use and
//! run in its `null` mode, which completes every fence as soon as its
//! command is read and has no renderer, so what it costs is the vhost-user
//! plumbing alone.

use crate::paths;
use crate::setup::{CargoInstall, cargo_install};
use anyhow::{Context, Result};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The crate and version the benchmarks compare against.
pub const CRATE: &str = "vhost-device-gpu";
pub const VERSION: &str = "0.2.0";

/// Where the peer is installed: its own `cargo install --root`, so that a
/// version change installs beside the old one.
fn install_root(cache: &Path) -> PathBuf {
    cache.join("tools").join(format!("{CRATE}-{VERSION}"))
}

/// The installed binary, building it first if it is missing (about a
/// minute on 2 cores). Without default features it needs neither
/// virglrenderer nor gfxstream: only its `null` mode is built.
pub fn ensure_installed() -> Result<PathBuf> {
    let cache = paths::cache_dir();
    let root = install_root(&cache);
    let binary = root.join("bin").join(CRATE);
    if binary.is_file() {
        return Ok(binary);
    }
    eprintln!("peer: installing {CRATE} {VERSION} (--no-default-features), a minute or so");
    let install = CargoInstall {
        krate: CRATE,
        version: VERSION,
        root,
        args: &["--no-default-features"],
        envs: &[],
    };
    cargo_install(&cache, &install)
        .with_context(|| format!("cannot build the peer backend {CRATE} {VERSION}"))?;
    Ok(binary)
}

/// The peer's arguments: its vhost-user socket and the `null` renderer.
pub fn args(socket: &Path) -> Vec<OsString> {
    vec![
        "--socket-path".into(),
        socket.into(),
        "--gpu-mode".into(),
        "null".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_runs_in_null_mode_on_the_given_socket() {
        let words: Vec<String> = args(Path::new("/tmp/f/gpu.sock"))
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            words.join(" "),
            "--socket-path /tmp/f/gpu.sock --gpu-mode null"
        );
    }

    #[test]
    fn each_version_has_its_own_install_root() {
        let root = install_root(Path::new("/cache"));
        assert_eq!(root, Path::new("/cache/tools/vhost-device-gpu-0.2.0"));
    }
}
