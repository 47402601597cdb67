//! Where things live: the workspace, and the cache outside the clone.

use std::path::PathBuf;

/// The workspace root (the folder holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// The cache for expensive artefacts (kernel source, rust-src, kernel builds).
/// It lives outside the clone so that a fresh clone on a warm machine reuses it:
/// `$FENCELAB_CACHE`, else `$XDG_CACHE_HOME/fencelab`, else `~/.cache/fencelab`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FENCELAB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("fencelab");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("fencelab")
}

/// Per-run scratch space (sockets, console logs, device logs) inside the
/// workspace's `target/` so that it is never committed and is easy to find.
pub fn runs_dir() -> PathBuf {
    workspace_root().join("target").join("fencelab-runs")
}

/// Cargo's target folder: `$CARGO_TARGET_DIR`, else the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}
