//! placeholder, being written
use crate::setup::Toolchain;
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Default, Debug, Clone)]
pub struct KernelArgs {
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone)]
pub struct Kernel {
    pub bzimage: PathBuf,
    pub modules_dir: PathBuf,
    pub release: String,
    pub config_path: PathBuf,
    pub config_sha256: String,
    pub key: String,
    pub cold_build_secs: Option<f64>,
}

pub fn build(_t: &Toolchain, _a: &KernelArgs) -> Result<Kernel> {
    anyhow::bail!("not yet")
}
