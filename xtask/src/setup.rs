//! `cargo xtask setup`: installs what the build needs, idempotently.
//!
//! - apt suites bookworm-backports and trixie-backports (never trixie main),
//! - apt packages: QEMU 10 from bookworm-backports; clang/LLVM 19 and the
//!   kernel build tools from bookworm,
//! - the Linux 7.3 source (`linux-source-7.3`, trixie-backports) unpacked,
//!   pristine, into the cache,
//! - Debian's `rust-src` matching `rustc --version` unpacked into the cache,
//! - `bindgen-cli` 0.71.1 installed into the cache;
//! - and, on first use of `cargo xtask fuzz` only, `cargo-fuzz` 0.13.2
//!   ([`ensure_cargo_fuzz`]).
//!
//! Every check is local and cheap (dpkg-query, files, `--version`), so a run
//! on a prepared machine takes about a second; apt is called only when
//! something is missing.

use crate::cmd::{self, FileLock, Logged};
use crate::paths;
use anyhow::{Context, Result, bail};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// What the kernel build and the boot need, as installed by [`run`].
#[derive(Debug, Clone)]
pub struct Toolchain {
    /// The pristine Linux source tree (never modified; patches go to a copy).
    pub linux_src: PathBuf,
    /// Upstream kernel version of `linux_src`, e.g. `7.3.4`.
    pub linux_version: String,
    /// Exact Debian version of the `linux-source-7.3` package it came from.
    pub linux_package_version: String,
    /// `RUST_LIB_SRC` for the kernel build (`…/rustlib/src/rust/library`).
    pub rust_lib_src: PathBuf,
    /// Exact Debian version of the `rust-src` package it came from.
    pub rust_src_package_version: String,
    /// `rustc --version`, e.g. `rustc 1.95.0 (59807616e 2026-04-14)`.
    pub rustc_version: String,
    /// The `bindgen` binary (0.71.1).
    pub bindgen: PathBuf,
    /// First line of `bindgen --version`.
    pub bindgen_version: String,
    /// `LLVM=` for the kernel's make, e.g. `-19`.
    pub llvm_suffix: String,
    /// First line of `clang-19 --version`.
    pub clang_version: String,
    /// `LIBCLANG_PATH` for bindgen.
    pub libclang_path: PathBuf,
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// First line of `qemu-system-x86_64 --version`.
    pub qemu_version: String,
    /// The static busybox that goes into the initramfs.
    pub busybox: PathBuf,
}

const LLVM_SUFFIX: &str = "-19";
const LIBCLANG_PATH: &str = "/usr/lib/llvm-19/lib";
const BINDGEN_VERSION: &str = "0.71.1";
const LINUX_SOURCE_PACKAGE: &str = "linux-source-7.3";
const SOURCES_FILE: &str = "/etc/apt/sources.list.d/fencelab.sources";
const PREFERENCES_FILE: &str = "/etc/apt/preferences.d/fencelab";
const QEMU: &str = "/usr/bin/qemu-system-x86_64";
const BUSYBOX: &str = "/bin/busybox";
/// QEMU from bookworm-backports: bookworm's own 7.2 conflicts with the
/// preinstalled qemu-utils 10 and lacks what `vhost-user-gpu-pci` needs.
const QEMU_PACKAGE: &str = "qemu-system-x86";
const QEMU_VERSION_PREFIX: &str = "1:10.";
/// From bookworm main (`apt-cache policy` shows clang-19 there).
const MAIN_PACKAGES: &[&str] = &[
    "clang-19",
    "lld-19",
    "llvm-19",
    "libclang-19-dev",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "cpio",
    "kmod",
    "busybox-static",
    "xz-utils",
    "binutils",
    "make",
    "patch",
];

fn step(name: &str, outcome: impl AsRef<str>) {
    eprintln!("setup: {name} ... {}", outcome.as_ref());
}

/// Installs whatever is missing and describes the toolchain.
pub fn run() -> Result<Toolchain> {
    let started = Instant::now();
    let cache = paths::cache_dir();
    fs::create_dir_all(&cache)
        .with_context(|| format!("creating the cache {}", cache.display()))?;
    let _lock = FileLock::acquire(&cache.join("setup.lock"), "setup")?;
    let root = unsafe { libc::geteuid() } == 0;
    let logs = cache.join("logs");

    // bindgen only needs cargo and crates.io: build it while apt works.
    let bindgen_job = {
        let cache = cache.clone();
        std::thread::spawn(move || ensure_bindgen(&cache))
    };

    // 1. apt suites.
    let suites_changed = ensure_apt_suites(root)?;

    // 2. apt packages (local check first).
    let missing_main = missing_packages(MAIN_PACKAGES)?;
    let qemu_ok = qemu_installed()?;
    let mut apt = Apt {
        root,
        updated: false,
        log: logs.join("apt.log"),
    };
    if suites_changed {
        apt.update()?;
    }
    if !missing_main.is_empty() || !qemu_ok {
        apt.update()?;
    }

    // 3. Sources from trixie-backports: resolve versions (apt-cache is local).
    let rustc_version = rustc_version()?;
    let linux_pkg_version = match newest_in_suite(LINUX_SOURCE_PACKAGE, "trixie-backports")? {
        Some(v) => v,
        None => {
            apt.update()?;
            newest_in_suite(LINUX_SOURCE_PACKAGE, "trixie-backports")?.with_context(|| {
                format!("apt knows no {LINUX_SOURCE_PACKAGE} in trixie-backports even after apt-get update\n{}", manual_help())
            })?
        }
    };
    let rust_src_version = match rust_src_version_for(&rustc_version)? {
        Some(v) => v,
        None if !apt.updated => {
            apt.update()?;
            rust_src_version_for(&rustc_version)?.with_context(|| no_rust_src(&rustc_version))?
        }
        None => bail!(no_rust_src(&rustc_version)),
    };

    // Downloads and unpacking do not take dpkg's lock: run them next to apt-get install.
    let sources_job = {
        let cache = cache.clone();
        let (linux_pkg_version, rust_src_version) =
            (linux_pkg_version.clone(), rust_src_version.clone());
        std::thread::spawn(move || -> Result<(PathBuf, String, PathBuf)> {
            let (linux_src, linux_version) = ensure_linux_source(&cache, &linux_pkg_version)?;
            let rust_lib_src = ensure_rust_src(&cache, &rust_src_version)?;
            Ok((linux_src, linux_version, rust_lib_src))
        })
    };

    let install_result = (|| -> Result<()> {
        if missing_main.is_empty() {
            step("apt packages (bookworm)", "ok (already present)");
        } else {
            apt.install(&missing_main, None)?;
            step(
                "apt packages (bookworm)",
                format!("ok (installed {})", missing_main.join(" ")),
            );
        }
        if qemu_ok {
            step(
                "qemu-system-x86 10 (bookworm-backports)",
                "ok (already present)",
            );
        } else {
            apt.install(&[QEMU_PACKAGE], Some("bookworm-backports"))?;
            if !qemu_installed()? {
                bail!(
                    "{QEMU_PACKAGE} from bookworm-backports is not version 10 after installing it"
                );
            }
            step("qemu-system-x86 10 (bookworm-backports)", "ok (installed)");
        }
        Ok(())
    })();
    let sources = sources_job
        .join()
        .map_err(|_| anyhow::anyhow!("source download thread panicked"))?;
    install_result?;
    let (linux_src, linux_version, rust_lib_src) = sources?;
    let bindgen = bindgen_job
        .join()
        .map_err(|_| anyhow::anyhow!("bindgen thread panicked"))??;

    // 4. Final facts (and a check that the tools run).
    let clang_version = first_line(&cmd::stdout(
        Command::new(format!("clang{LLVM_SUFFIX}")).arg("--version"),
    )?);
    let bindgen_version = bindgen_version_of(&bindgen)?.context("bindgen --version failed")?;
    let qemu_version = first_line(&cmd::stdout(Command::new(QEMU).arg("--version"))?);
    check_vhost_user_gpu()?;
    if !Path::new(BUSYBOX).exists() {
        bail!("{BUSYBOX} is missing although busybox-static is installed");
    }
    let toolchain = Toolchain {
        linux_src,
        linux_version,
        linux_package_version: linux_pkg_version,
        rust_lib_src,
        rust_src_package_version: rust_src_version,
        rustc_version,
        bindgen,
        bindgen_version,
        llvm_suffix: LLVM_SUFFIX.to_owned(),
        clang_version,
        libclang_path: PathBuf::from(LIBCLANG_PATH),
        qemu: PathBuf::from(QEMU),
        qemu_version,
        busybox: PathBuf::from(BUSYBOX),
    };
    eprintln!(
        "setup: done in {} ({})",
        cmd::human_duration(started.elapsed()),
        toolchain.summary()
    );
    Ok(toolchain)
}

impl Toolchain {
    /// One line naming every version that matters.
    pub fn summary(&self) -> String {
        format!(
            "Linux {} [{}], rust-src {}, {}, {}, {}, {} ({}), busybox {}",
            self.linux_version,
            self.linux_package_version,
            self.rust_src_package_version,
            self.rustc_version,
            self.clang_version,
            self.bindgen_version,
            self.qemu_version,
            self.qemu.display(),
            self.busybox.display()
        )
    }
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or("").trim().to_owned()
}

fn no_rust_src(rustc_version: &str) -> String {
    format!(
        "no Debian rust-src package matches `{rustc_version}` (apt-cache madison rust-src lists the versions \
         trixie-backports has; it carries 1.94.1, 1.95.0 and 1.96.1): install one of those rustc versions with rustup"
    )
}

/// What to do by hand when setup cannot do it (not root, no network, apt fails).
fn manual_help() -> String {
    let cache = paths::cache_dir();
    format!(
        "To install by hand, as root:\n\
         1. create {SOURCES_FILE} with:\n{}\n\
         2. apt-get update\n\
         3. apt-get install -y --no-install-recommends {}\n\
         4. apt-get install -y --no-install-recommends -t bookworm-backports {QEMU_PACKAGE}\n\
         5. cd {cache}/downloads && apt-get download {LINUX_SOURCE_PACKAGE} rust-src=<the version matching rustc -V>\n\
         6. cargo install bindgen-cli --version {BINDGEN_VERSION} --locked --root {cache}/tools\n\
         then run `cargo xtask setup` again: it unpacks the downloads into {cache}.",
        sources_file_content(&debian_mirror()),
        MAIN_PACKAGES.join(" "),
        cache = cache.display(),
    )
}

// ---------------------------------------------------------------- apt suites

/// The Debian mirror of the existing bookworm sources (deb822), or deb.debian.org.
fn debian_mirror() -> String {
    let text = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    mirror_from_deb822(&text).unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

/// The `URIs:` of the first stanza whose suites include `bookworm`.
fn mirror_from_deb822(text: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
        };
        let suites = field("Suites:").unwrap_or_default();
        if suites.split_whitespace().any(|s| s == "bookworm") {
            return field("URIs:").and_then(|u| u.split_whitespace().next().map(str::to_owned));
        }
    }
    None
}

fn sources_file_content(mirror: &str) -> String {
    format!(
        "# Written by `cargo xtask setup` (fencelab). Backports only: never trixie main.\n\
         # bookworm-backports: QEMU 10. trixie-backports: linux-source-7.3 and rust-src\n\
         # (downloaded, never installed).\n\
         Types: deb\n\
         URIs: {mirror}\n\
         Suites: bookworm-backports trixie-backports\n\
         Components: main\n\
         Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
}

/// Backports are NotAutomatic already; this pin makes sure that nothing from
/// trixie-backports is ever installed or upgraded, only downloaded by version.
const PREFERENCES_CONTENT: &str = "# Written by `cargo xtask setup` (fencelab): trixie-backports packages are\n\
# only downloaded (linux-source-7.3, rust-src), never installed.\n\
Package: *\n\
Pin: release n=trixie-backports\n\
Pin-Priority: 1\n";

/// Writes the sources and preferences files if they differ; true if changed.
fn ensure_apt_suites(root: bool) -> Result<bool> {
    let sources = sources_file_content(&debian_mirror());
    let same =
        |path: &str, want: &str| fs::read_to_string(path).map(|t| t == want).unwrap_or(false);
    if same(SOURCES_FILE, &sources) && same(PREFERENCES_FILE, PREFERENCES_CONTENT) {
        step(
            "apt suites bookworm-backports trixie-backports",
            "ok (already present)",
        );
        return Ok(false);
    }
    if !root {
        bail!(
            "the apt suites bookworm-backports and trixie-backports are missing and setup is not root\n{}",
            manual_help()
        );
    }
    fs::write(SOURCES_FILE, &sources).with_context(|| format!("writing {SOURCES_FILE}"))?;
    fs::write(PREFERENCES_FILE, PREFERENCES_CONTENT)
        .with_context(|| format!("writing {PREFERENCES_FILE}"))?;
    step(
        "apt suites bookworm-backports trixie-backports",
        format!("ok (added {SOURCES_FILE})"),
    );
    Ok(true)
}

// ---------------------------------------------------------------- apt packages

/// Packages of `names` that dpkg does not report as installed.
fn missing_packages(names: &[&str]) -> Result<Vec<String>> {
    let out = cmd::output_raw(
        Command::new("dpkg-query")
            .args(["-W", "-f", "${Package} ${Status}\n"])
            .args(names),
    )?;
    // Exit status 1 just means some names are unknown; those are missing too.
    let installed = installed_from_dpkg_query(&String::from_utf8_lossy(&out.stdout));
    Ok(names
        .iter()
        .filter(|n| !installed.iter().any(|i| i == *n))
        .map(|n| (*n).to_owned())
        .collect())
}

/// Names whose status is `install ok installed` in `dpkg-query -W -f '${Package} ${Status}\n'` output.
fn installed_from_dpkg_query(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_suffix(" install ok installed"))
        .map(|name| name.split(':').next().unwrap_or(name).to_owned())
        .collect()
}

fn qemu_installed() -> Result<bool> {
    let out = cmd::output_raw(Command::new("dpkg-query").args([
        "-W",
        "-f",
        "${Status} ${Version}",
        QEMU_PACKAGE,
    ]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .strip_prefix("install ok installed ")
        .is_some_and(|v| v.starts_with(QEMU_VERSION_PREFIX))
        && Path::new(QEMU).exists())
}

struct Apt {
    root: bool,
    updated: bool,
    log: PathBuf,
}

impl Apt {
    fn command(&self) -> Command {
        let mut c = Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive");
        c
    }

    fn update(&mut self) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        if !self.root {
            bail!(
                "apt-get update is needed and setup is not root\n{}",
                manual_help()
            );
        }
        let t = Instant::now();
        let mut c = self.command();
        c.arg("update");
        cmd::run_logged(c, &Logged::new("setup: apt-get update", &self.log)).map_err(|e| {
            e.context(format!(
                "apt-get update failed (network?)\n{}",
                manual_help()
            ))
        })?;
        self.updated = true;
        step(
            "apt-get update",
            format!("ok ({})", cmd::human_duration(t.elapsed())),
        );
        Ok(())
    }

    fn install(&self, packages: &[impl AsRef<str>], target: Option<&str>) -> Result<()> {
        let names: Vec<&str> = packages.iter().map(AsRef::as_ref).collect();
        if !self.root {
            bail!(
                "apt packages missing and setup is not root: {}\n{}",
                names.join(" "),
                manual_help()
            );
        }
        let mut c = self.command();
        c.args(["install", "-y", "--no-install-recommends"]);
        if let Some(t) = target {
            c.args(["-t", t]);
        }
        c.args(&names);
        let logged = Logged {
            every: Some(Duration::from_secs(20)),
            ..Logged::new("setup: apt-get install", &self.log)
        };
        cmd::run_logged(c, &logged).map_err(|e| {
            e.context(format!(
                "apt-get install {} failed\n{}",
                names.join(" "),
                manual_help()
            ))
        })?;
        Ok(())
    }
}

/// `vhost-user-gpu-pci` is what fencelab boots with: make sure this QEMU has it.
fn check_vhost_user_gpu() -> Result<()> {
    let out = cmd::output_raw(Command::new(QEMU).args(["-device", "help"]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !text.contains("\"vhost-user-gpu-pci\"") {
        bail!("{QEMU} has no vhost-user-gpu-pci device (`{QEMU} -device help`)");
    }
    Ok(())
}

// ---------------------------------------------------------------- versions

fn rustc_version() -> Result<String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    Ok(first_line(&cmd::stdout(
        Command::new(rustc).arg("--version"),
    )?))
}

/// `apt-cache madison` lines as (version, where) pairs.
fn madison(package: &str) -> Result<Vec<(String, String)>> {
    let out = cmd::output_raw(Command::new("apt-cache").args(["madison", package]))?;
    Ok(parse_madison(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_madison(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.split('|').map(str::trim);
            let _name = parts.next()?;
            let version = parts.next()?;
            let origin = parts.next()?;
            Some((version.to_owned(), origin.to_owned()))
        })
        .collect()
}

/// True if `origin` (madison's third column) is from `suite` exactly.
fn origin_in_suite(origin: &str, suite: &str) -> bool {
    origin
        .split_whitespace()
        .any(|w| w == suite || w.starts_with(&format!("{suite}/")))
}

/// The newest version of `package` in `suite` (madison lists newest first).
fn newest_in_suite(package: &str, suite: &str) -> Result<Option<String>> {
    Ok(madison(package)?
        .into_iter()
        .find(|(_, o)| origin_in_suite(o, suite))
        .map(|(v, _)| v))
}

/// The upstream part of a Debian version: no epoch, no revision, no `+dfsg`/`~` suffix.
fn upstream_version(debian_version: &str) -> &str {
    let no_epoch = debian_version
        .split_once(':')
        .map_or(debian_version, |(_, v)| v);
    let no_rev = no_epoch.rsplit_once('-').map_or(no_epoch, |(v, _)| v);
    let end = no_rev
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(no_rev.len());
    &no_rev[..end]
}

/// The `x.y.z` of `rustc x.y.z (hash date)`.
fn rustc_semver(rustc_version: &str) -> Option<&str> {
    rustc_version
        .split_whitespace()
        .nth(1)
        .map(|v| v.split('-').next().unwrap_or(v))
}

/// The Debian `rust-src` version (from madison output) whose upstream equals rustc's.
fn matching_rust_src(rustc_version: &str, madison: &[(String, String)]) -> Option<String> {
    let want = rustc_semver(rustc_version)?;
    madison
        .iter()
        .map(|(v, _)| v)
        .find(|v| upstream_version(v) == want)
        .cloned()
}

fn rust_src_version_for(rustc_version: &str) -> Result<Option<String>> {
    Ok(matching_rust_src(rustc_version, &madison("rust-src")?))
}

// ---------------------------------------------------------------- downloads

/// `apt-get download package=version` into a fresh folder; the .deb's path.
fn download_deb(cache: &Path, package: &str, version: &str) -> Result<PathBuf> {
    let dir = cache
        .join("downloads")
        .join(format!("{package}_{}", sanitize(version)));
    if let Some(deb) = find_deb(&dir)? {
        return Ok(deb);
    }
    let partial = dir.with_extension("partial");
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let mut c = Command::new("apt-get");
    c.current_dir(&partial)
        .args(["download", &format!("{package}={version}")]);
    let log = cache.join("logs").join(format!("download-{package}.log"));
    cmd::run_logged(
        c,
        &Logged::new(&format!("setup: apt-get download {package}"), &log),
    )
    .map_err(|e| {
        e.context(format!(
            "downloading {package} {version} failed (network?)\n{}",
            manual_help()
        ))
    })?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&partial, &dir)?;
    find_deb(&dir)?.with_context(|| format!("apt-get download left no .deb in {}", dir.display()))
}

fn find_deb(dir: &Path) -> Result<Option<PathBuf>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

fn sanitize(version: &str) -> String {
    version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".+-_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `<cache>/linux-source-7.3.<x>/`, unpacked from the package; (path, upstream version).
fn ensure_linux_source(cache: &Path, package_version: &str) -> Result<(PathBuf, String)> {
    let upstream = upstream_version(package_version).to_owned();
    let dir = cache.join(format!("linux-source-{upstream}"));
    let stamp = cache.join(format!("linux-source-{upstream}.package-version"));
    let what = format!("{LINUX_SOURCE_PACKAGE} {package_version} (trixie-backports)");
    if dir.join("Makefile").is_file()
        && fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == package_version)
    {
        step(&what, format!("ok (already present: {})", dir.display()));
        return Ok((dir, upstream));
    }
    let t = Instant::now();
    let deb = download_deb(cache, LINUX_SOURCE_PACKAGE, package_version)?;
    let work = cache.join(format!("linux-source-{upstream}.unpacking"));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let debroot = work.join("deb");
    cmd::stdout(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&debroot))?;
    let tarball = fs::read_dir(debroot.join("usr/src"))
        .with_context(|| format!("{} holds no usr/src", deb.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().is_some_and(|n| {
                n.to_string_lossy().starts_with("linux-source-")
                    && n.to_string_lossy().contains(".tar")
            })
        })
        .with_context(|| format!("no linux-source-*.tar.* in {}", deb.display()))?;
    let tree = work.join("tree");
    fs::create_dir_all(&tree)?;
    cmd::stdout(
        Command::new("tar")
            .arg("-xf")
            .arg(&tarball)
            .arg("-C")
            .arg(&tree),
    )
    .with_context(|| format!("unpacking {}", tarball.display()))?;
    let top = fs::read_dir(&tree)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.join("Makefile").is_file())
        .with_context(|| format!("{} has no top-level kernel tree", tarball.display()))?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&top, &dir).with_context(|| format!("moving the tree to {}", dir.display()))?;
    fs::write(&stamp, format!("{package_version}\n"))?;
    fs::remove_dir_all(&work)?;
    step(
        &what,
        format!(
            "ok (unpacked into {} in {})",
            dir.display(),
            cmd::human_duration(t.elapsed())
        ),
    );
    Ok((dir, upstream))
}

/// `<cache>/rust-src-<version>/…/library`, unpacked from Debian's rust-src.
fn ensure_rust_src(cache: &Path, package_version: &str) -> Result<PathBuf> {
    let dir = cache.join(format!("rust-src-{}", sanitize(package_version)));
    let library = dir.join("usr/lib/rustlib/src/rust/library");
    let what = format!("rust-src {package_version} (trixie-backports)");
    if library.join("core/src/lib.rs").is_file() {
        step(
            &what,
            format!("ok (already present: {})", library.display()),
        );
        return Ok(library);
    }
    let deb = download_deb(cache, "rust-src", package_version)?;
    let partial = dir.with_extension("unpacking");
    let _ = fs::remove_dir_all(&partial);
    cmd::stdout(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&partial, &dir)?;
    if !library.join("core/src/lib.rs").is_file() {
        bail!(
            "{} does not contain usr/lib/rustlib/src/rust/library/core",
            deb.display()
        );
    }
    step(&what, format!("ok (unpacked into {})", dir.display()));
    Ok(library)
}

// ---------------------------------------------------------------- bindgen

fn bindgen_version_of(bindgen: &Path) -> Result<Option<String>> {
    if !bindgen.is_file() {
        return Ok(None);
    }
    let out = cmd::output_raw(
        Command::new(bindgen)
            .arg("--version")
            .env("LIBCLANG_PATH", LIBCLANG_PATH),
    )?;
    Ok(Some(first_line(&String::from_utf8_lossy(&out.stdout))).filter(|l| !l.is_empty()))
}

fn ensure_bindgen(cache: &Path) -> Result<PathBuf> {
    let root = cache.join("tools");
    let bindgen = root.join("bin").join("bindgen");
    let what = format!("bindgen-cli {BINDGEN_VERSION}");
    if bindgen_version_of(&bindgen)?
        .is_some_and(|v| v.split_whitespace().any(|w| w == BINDGEN_VERSION))
    {
        step(&what, "ok (already present)");
        return Ok(bindgen);
    }
    let install = CargoInstall {
        krate: "bindgen-cli",
        version: BINDGEN_VERSION,
        root: cache.join("tools"),
        args: &[],
        envs: &[("LIBCLANG_PATH", LIBCLANG_PATH)],
    };
    cargo_install(cache, &install).map_err(|e| e.context(manual_help()))?;
    Ok(bindgen)
}

/// A crate `cargo install` builds into the cache.
pub struct CargoInstall<'a> {
    pub krate: &'a str,
    pub version: &'a str,
    /// `--root`: the cache's `tools/`, or a folder of the crate's own.
    pub root: PathBuf,
    /// More `cargo install` arguments, e.g. `--no-default-features`.
    pub args: &'a [&'a str],
    pub envs: &'a [(&'a str, &'a str)],
}

/// `cargo install KRATE --version VERSION --locked` into `root`, with a
/// progress line every 30 s and the output in `<cache>/logs/KRATE-install.log`.
pub fn cargo_install(cache: &Path, install: &CargoInstall<'_>) -> Result<()> {
    let CargoInstall {
        krate,
        version,
        root,
        args,
        envs,
    } = install;
    let t = Instant::now();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut c = Command::new(cargo);
    c.args([
        "install",
        krate,
        "--version",
        version,
        "--locked",
        "--force",
    ])
    .args(args.iter())
    .arg("--root")
    .arg(root)
    .envs(envs.iter().copied());
    let log = cache.join("logs").join(format!("{krate}-install.log"));
    let what = format!("setup: cargo install {krate}");
    let logged = Logged {
        every: Some(Duration::from_secs(30)),
        ..Logged::new(&what, &log)
    };
    cmd::run_logged(c, &logged).map_err(|e| {
        e.context(format!(
            "cargo install {krate} {version} failed (crates.io reachable?)"
        ))
    })?;
    step(
        &format!("{krate} {version}"),
        format!(
            "ok (installed into {} in {})",
            root.display(),
            cmd::human_duration(t.elapsed())
        ),
    );
    Ok(())
}

// ---------------------------------------------------------------- cargo-fuzz

/// The cargo-fuzz `cargo xtask fuzz` drives.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz, installed into the cache's `tools/` on first use (it is
/// needed only by `cargo xtask fuzz`, not by the kernel build).
pub fn ensure_cargo_fuzz() -> Result<PathBuf> {
    let cache = paths::cache_dir();
    let _lock = FileLock::acquire(&cache.join("setup.lock"), "setup")?;
    let cargo_fuzz = cache.join("tools").join("bin").join("cargo-fuzz");
    let what = format!("cargo-fuzz {CARGO_FUZZ_VERSION}");
    let present = cargo_fuzz.is_file()
        && cmd::stdout(Command::new(&cargo_fuzz).args(["fuzz", "--version"]))
            .is_ok_and(|v| v.split_whitespace().any(|w| w == CARGO_FUZZ_VERSION));
    if present {
        step(&what, "ok (already present)");
    } else {
        eprintln!("setup: {what}: installing with cargo (a few minutes on first use)");
        let install = CargoInstall {
            krate: "cargo-fuzz",
            version: CARGO_FUZZ_VERSION,
            root: cache.join("tools"),
            args: &[],
            envs: &[],
        };
        cargo_install(&cache, &install)?;
    }
    Ok(cargo_fuzz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_versions() {
        assert_eq!(upstream_version("1.95.0+dfsg1-1~bpo13+1"), "1.95.0");
        assert_eq!(upstream_version("1:10.0.2+ds-2+deb13u1~bpo12+1"), "10.0.2");
        assert_eq!(upstream_version("7.3.4-1~bpo13+1"), "7.3.4");
        assert_eq!(upstream_version("1.63.0+dfsg1-2"), "1.63.0");
        assert_eq!(upstream_version("1.96.1~beta.1-1"), "1.96.1");
    }

    #[test]
    fn rust_src_matches_rustc_exactly() {
        let madison = parse_madison(
            "  rust-src | 1.96.1+dfsg1-1~bpo13+1 | http://deb.debian.org/debian trixie-backports/main all Packages\n\
               rust-src | 1.95.0+dfsg1-1~bpo13+1 | http://deb.debian.org/debian trixie-backports/main all Packages\n\
               rust-src | 1.94.1+dfsg1-1~bpo13+1 | http://deb.debian.org/debian trixie-backports/main all Packages\n\
               rust-src | 1.63.0+dfsg1-2 | http://deb.debian.org/debian bookworm/main all Packages\n",
        );
        assert_eq!(madison.len(), 4);
        let v = matching_rust_src("rustc 1.95.0 (59807616e 2026-04-14)", &madison);
        assert_eq!(v.as_deref(), Some("1.95.0+dfsg1-1~bpo13+1"));
        assert_eq!(
            matching_rust_src("rustc 1.95.1 (x 2026-05-01)", &madison),
            None
        );
        assert_eq!(
            matching_rust_src("rustc 1.9.0 (x 2016-05-01)", &madison),
            None
        );
        assert_eq!(
            matching_rust_src("rustc 1.96.1-nightly (x 2026-05-01)", &madison).as_deref(),
            Some("1.96.1+dfsg1-1~bpo13+1")
        );
    }

    #[test]
    fn suites_are_told_apart() {
        let o = "http://deb.debian.org/debian trixie-backports/main all Packages";
        assert!(origin_in_suite(o, "trixie-backports"));
        assert!(!origin_in_suite(o, "trixie"));
        assert!(!origin_in_suite(
            "http://deb.debian.org/debian bookworm-backports/main amd64 Packages",
            "bookworm"
        ));
    }

    #[test]
    fn dpkg_query_status() {
        let text = "clang-19 install ok installed\nflex unknown ok not-installed\nlibssl-dev:amd64 install ok installed\n";
        assert_eq!(
            installed_from_dpkg_query(text),
            vec!["clang-19", "libssl-dev"]
        );
    }

    #[test]
    fn mirror_is_taken_from_debian_sources() {
        let text = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                    Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_from_deb822(text).as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(mirror_from_deb822(""), None);
        assert!(
            sources_file_content("http://m/debian")
                .contains("Suites: bookworm-backports trixie-backports\n")
        );
        assert!(!sources_file_content("http://m/debian").contains("Suites: trixie\n"));
    }
}
