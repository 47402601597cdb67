//! Deliberate driver bugs for the harness's self-test (issue 6 item 6):
//! fencelab_drm built with one bug class in, which the scenario that targets
//! it must catch with the right splat.
//!
//! SCAFFOLD: the catalogue and the builder are being written; until then
//! every entry point refuses with an error that says so.

use crate::kernel::Kernel;
use crate::setup::Toolchain;
use anyhow::{Result, bail};
use std::path::{Path, PathBuf};

/// One injectable bug.
#[derive(Debug)]
pub struct Bug {
    /// `--inject-bug` name, kebab-case.
    pub name: &'static str,
    /// The scenario that targets it (a file stem under `scenarios/`).
    pub scenario: &'static str,
    /// One line: what the bug does.
    pub summary: &'static str,
    /// Console splat classes (`console::SPLAT_CLASSES` names), any of which
    /// proves the harness caught it.
    pub expect_splats: &'static [&'static str],
}

/// Every injectable bug.
pub const BUGS: &[Bug] = &[];

/// Looks a bug up by name; an unknown name lists the known ones.
pub fn find(name: &str) -> Result<&'static Bug> {
    match BUGS.iter().find(|b| b.name == name) {
        Some(bug) => Ok(bug),
        None => bail!(
            "unknown bug {name:?}; known bugs: {}",
            BUGS.iter().map(|b| b.name).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// Builds fencelab_drm.ko with `bug` in, against `kernel` (cached).
pub fn build_module(_toolchain: &Toolchain, _kernel: &Kernel, bug: &Bug) -> Result<PathBuf> {
    bail!("building fencelab_drm with bug {} is not implemented yet", bug.name)
}

/// The initramfs of `kernel` with `module` in place of the in-tree fencelab_drm.ko.
pub fn initramfs_with_module(_kernel: &Kernel, module: &Path) -> Result<PathBuf> {
    bail!(
        "an initramfs with {} is not implemented yet",
        module.display()
    )
}
