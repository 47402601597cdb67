//! placeholder, being written
use crate::kernel::Kernel;
use anyhow::Result;
use std::path::PathBuf;

pub fn build(_k: &Kernel) -> Result<PathBuf> {
    anyhow::bail!("not yet")
}
