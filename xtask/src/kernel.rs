//! `cargo xtask kernel`: the guest kernel (Linux 7.3, Rust, KASAN, lockdep),
//! built out of tree with LLVM 19 and cached outside the clone.
//!
//! Cache layout under `<cache>/kernel/`:
//! - `src/`: the tree that is built: a hard-link copy of the pristine
//!   `linux-source-7.3.x` with the guest-driver patch series applied;
//!   `src.json` records which patches are applied and which files they touched,
//!   so that a changed series restores and re-patches only those files (and
//!   the build stays incremental);
//! - `build/`: the persistent out-of-tree build folder (`make O=`);
//! - `<key16>/`: one finished kernel per cache key: `bzImage`, `.config`,
//!   `modules/lib/modules/<release>/` and `build.json`;
//! - `logs/`: the make logs.
//!
//! The key is a SHA-256 over the source package version, the config fragment,
//! the patch series and the toolchain versions (see [`KeyInputs`]).

use crate::cmd::{self, FileLock, Logged};
use crate::paths;
use crate::setup::Toolchain;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Bumped when the way xtask builds the kernel changes in a way the other
/// inputs do not show.
const RECIPE_VERSION: u32 = 1;

#[derive(clap::Args, Default, Debug, Clone)]
pub struct KernelArgs {
    /// Rebuild even if the cache has this kernel (incrementally, in the persistent build folder).
    #[arg(long)]
    pub force: bool,
}

/// A built kernel in the cache.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `<cache>/kernel/<key16>/bzImage`.
    pub bzimage: PathBuf,
    /// `<cache>/kernel/<key16>/modules/lib/modules/<release>` (holds modules.dep).
    pub modules_dir: PathBuf,
    /// `make kernelrelease`, e.g. `7.3.4`.
    pub release: String,
    /// The final `.config`.
    pub config_path: PathBuf,
    /// SHA-256 of the final `.config`.
    pub config_sha256: String,
    /// Full cache key (hex SHA-256); the folder is named by its first 16 digits.
    pub key: String,
    /// Seconds the build took if it started from an empty build folder.
    pub cold_build_secs: Option<f64>,
}

/// Everything the kernel depends on, recorded in `build.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeyInputs {
    pub recipe: u32,
    pub linux_package_version: String,
    pub fragment_sha256: String,
    /// (file name, SHA-256) of the guest-driver series file and patches, in order.
    pub patches: Vec<(String, String)>,
    pub rustc: String,
    pub clang: String,
    pub bindgen: String,
}

impl KeyInputs {
    /// The cache key: SHA-256 over a canonical rendering of the inputs.
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!("recipe {}\n", self.recipe));
        h.update(format!("linux-source {}\n", self.linux_package_version));
        h.update(format!("fragment {}\n", self.fragment_sha256));
        for (name, sha) in &self.patches {
            h.update(format!("patch {name} {sha}\n"));
        }
        h.update(format!("rustc {}\n", self.rustc));
        h.update(format!("clang {}\n", self.clang));
        h.update(format!("bindgen {}\n", self.bindgen));
        hex::encode(h.finalize())
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct BuildJson {
    key: String,
    kernel_release: String,
    config_sha256: String,
    cold_build_secs: Option<f64>,
    build_secs: f64,
    built_at: String,
    inputs: KeyInputs,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn say(message: impl AsRef<str>) {
    eprintln!("kernel: {}", message.as_ref());
}

/// (file name, SHA-256 hex).
type NamedHash = (String, String);

/// A patch of the guest-driver series.
#[derive(Debug, Clone)]
struct Patch {
    name: String,
    path: PathBuf,
    sha256: String,
}

/// The guest-driver patch series, in order: `series` (one patch file name a
/// line, `#` comments) if it exists, else every `*.patch` sorted by name.
/// Also returns the key entries: the series file itself and every patch.
fn read_series(dir: &Path) -> Result<(Vec<Patch>, Vec<NamedHash>)> {
    let mut found = Vec::new();
    if dir.is_dir() {
        collect_patch_files(dir, dir, &mut found)?;
    }
    found.sort();
    let mut key_entries = Vec::new();
    let mut by_name = BTreeMap::new();
    let mut series_text = None;
    for rel in &found {
        let bytes =
            fs::read(dir.join(rel)).with_context(|| format!("reading guest-driver/{rel}"))?;
        key_entries.push((rel.clone(), sha256_hex(&bytes)));
        if rel == "series" || rel.ends_with("/series") {
            series_text = Some((rel.clone(), String::from_utf8_lossy(&bytes).into_owned()));
        } else {
            by_name.insert(rel.clone(), sha256_hex(&bytes));
        }
    }
    let make = |rel: &str| -> Result<Patch> {
        let sha = by_name
            .get(rel)
            .with_context(|| format!("guest-driver series names {rel}, which does not exist"))?;
        Ok(Patch {
            name: rel.to_owned(),
            path: dir.join(rel),
            sha256: sha.clone(),
        })
    };
    let patches = match series_text {
        Some((series_rel, text)) => {
            let base = Path::new(&series_rel)
                .parent()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            series_entries(&text)
                .into_iter()
                .map(|name| {
                    if base.is_empty() {
                        make(&name)
                    } else {
                        make(&format!("{base}/{name}"))
                    }
                })
                .collect::<Result<Vec<_>>>()?
        }
        None => by_name
            .keys()
            .map(|rel| make(rel))
            .collect::<Result<Vec<_>>>()?,
    };
    Ok((patches, key_entries))
}

fn series_entries(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| l.split_whitespace().next().unwrap_or(l).to_owned())
        .collect()
}

fn collect_patch_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect_patch_files(root, &path, out)?;
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "series" || name.ends_with(".patch") {
            out.push(
                path.strip_prefix(root)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    Ok(())
}

/// Builds (or finds in the cache) the guest kernel.
pub fn build(toolchain: &Toolchain, args: &KernelArgs) -> Result<Kernel> {
    let started = Instant::now();
    let root = paths::workspace_root();
    let kcache = paths::cache_dir().join("kernel");
    let fragment_path = root.join("images/kernel/fencelab.config");
    let fragment = fs::read_to_string(&fragment_path)
        .with_context(|| format!("reading {}", fragment_path.display()))?;
    let (patches, patch_entries) = read_series(&root.join("guest-driver"))?;
    let inputs = KeyInputs {
        recipe: RECIPE_VERSION,
        linux_package_version: toolchain.linux_package_version.clone(),
        fragment_sha256: sha256_hex(fragment.as_bytes()),
        patches: patch_entries,
        rustc: toolchain.rustc_version.clone(),
        clang: toolchain.clang_version.clone(),
        bindgen: toolchain.bindgen_version.clone(),
    };
    let key = inputs.key();
    let key16 = key[..16].to_owned();
    let out = kcache.join(&key16);

    if !args.force {
        if let Some(kernel) = cached(&out)? {
            let cold = kernel
                .cold_build_secs
                .map(|s| {
                    format!(
                        "; its cold build took {}",
                        cmd::human_duration(Duration::from_secs_f64(s))
                    )
                })
                .unwrap_or_default();
            say(format!(
                "cache hit {key16} ({}) in {}{cold}",
                kernel.release,
                cmd::human_duration(started.elapsed())
            ));
            return Ok(kernel);
        }
    }
    let _lock = FileLock::acquire(&kcache.join("build.lock"), "kernel")?;
    if !args.force {
        // Another xtask may have built it while we waited for the lock.
        if let Some(kernel) = cached(&out)? {
            say(format!(
                "cache hit {key16} ({}) after waiting",
                kernel.release
            ));
            return Ok(kernel);
        }
    }
    say(format!(
        "{} {key16}: building Linux {} ({} patches) in {}",
        if args.force {
            "rebuilding (--force)"
        } else {
            "cache miss"
        },
        toolchain.linux_version,
        patches.len(),
        kcache.join("build").display()
    ));

    let src = kcache.join("src");
    let build_dir = kcache.join("build");
    prepare_source(toolchain, &kcache, &src, &build_dir, &patches)?;
    let log = kcache.join("logs").join(format!("{key16}.log"));
    let _ = fs::remove_file(&log);
    let make = Make {
        toolchain,
        src: &src,
        build: &build_dir,
        log: &log,
    };

    let config_started = Instant::now();
    configure(&make, &fragment)?;
    say(format!(
        "config ok ({}): {}",
        cmd::human_duration(config_started.elapsed()),
        build_dir.join(".config").display()
    ));

    let cold = !build_dir.join("vmlinux").exists();
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    say(format!(
        "building bzImage and modules with -j{jobs} ({}); log: {}",
        if cold { "cold" } else { "incremental" },
        log.display()
    ));
    let build_started = Instant::now();
    let logged = Logged {
        every: Some(Duration::from_secs(15)),
        classify: compiled_object,
        ..Logged::new("kernel: building", &log)
    };
    let stats = cmd::run_logged(
        make.command(&[&format!("-j{jobs}"), "bzImage", "modules"]),
        &logged,
    )?;
    let build_secs = build_started.elapsed().as_secs_f64();
    say(format!(
        "built in {} ({} objects compiled)",
        cmd::human_duration(build_started.elapsed()),
        stats.counted
    ));

    // Install into a fresh folder, then move it into place.
    let release = last_line(&cmd::stdout(&mut make.command(&["-s", "kernelrelease"]))?);
    if release.is_empty() {
        bail!("make kernelrelease printed nothing");
    }
    let staging = kcache.join(format!("{key16}.partial"));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)?;
    fs::copy(
        build_dir.join("arch/x86/boot/bzImage"),
        staging.join("bzImage"),
    )
    .context("copying bzImage")?;
    let config = fs::read(build_dir.join(".config"))?;
    fs::write(staging.join(".config"), &config)?;
    let mut install = make.command(&["modules_install"]);
    install.arg(format!(
        "INSTALL_MOD_PATH={}",
        staging.join("modules").display()
    ));
    if Path::new("/usr/sbin/depmod").exists() {
        install.arg("DEPMOD=/usr/sbin/depmod");
    }
    cmd::run_logged(install, &Logged::new("kernel: modules_install", &log))?;
    let modules_dir = staging.join("modules/lib/modules").join(&release);
    if !modules_dir.join("modules.dep").is_file() {
        bail!(
            "modules_install produced no {}",
            modules_dir.join("modules.dep").display()
        );
    }
    // A forced, incremental rebuild of the same key keeps the cold time on record.
    let previous_cold = fs::read_to_string(out.join("build.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<BuildJson>(&t).ok())
        .and_then(|r| r.cold_build_secs);
    let cold_build_secs = if cold {
        Some(build_secs)
    } else {
        previous_cold
    };
    let record = BuildJson {
        key: key.clone(),
        kernel_release: release.clone(),
        config_sha256: sha256_hex(&config),
        cold_build_secs,
        build_secs,
        built_at: cmd::utc_now(),
        inputs,
    };
    fs::write(
        staging.join("build.json"),
        serde_json::to_string_pretty(&record)? + "\n",
    )?;
    let _ = fs::remove_dir_all(&out);
    fs::rename(&staging, &out)
        .with_context(|| format!("moving the kernel into {}", out.display()))?;
    say(format!(
        "{} {key16} ({release}) in {}{}",
        out.display(),
        cmd::human_duration(started.elapsed()),
        if cold {
            format!(
                ", cold build {}",
                cmd::human_duration(Duration::from_secs_f64(build_secs))
            )
        } else {
            String::new()
        }
    ));
    cached(&out)?.context("the kernel just built is not readable from the cache")
}

/// A cold kernel build on record: how long it took, which cache entry,
/// and when.
#[derive(Debug, Clone, PartialEq)]
pub struct ColdBuild {
    pub secs: f64,
    pub key16: String,
    pub built_at: String,
}

/// The most recent cold build recorded in `<cache>/kernel/*/build.json`.
/// A later kernel built incrementally on the same build folder (a patch
/// changed) records none of its own, so this is what a fresh machine of
/// this kind costs.
pub fn latest_cold_build(kernel_cache: &Path) -> Option<ColdBuild> {
    let entries = fs::read_dir(kernel_cache).ok()?;
    entries
        .filter_map(|entry| {
            let dir = entry.ok()?.path();
            let text = fs::read_to_string(dir.join("build.json")).ok()?;
            let record: BuildJson = serde_json::from_str(&text).ok()?;
            Some(ColdBuild {
                secs: record.cold_build_secs?,
                key16: dir.file_name()?.to_string_lossy().into_owned(),
                built_at: record.built_at,
            })
        })
        .max_by(|a, b| a.built_at.cmp(&b.built_at))
}

fn last_line(text: &str) -> String {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// The kernel in `<cache>/kernel/<key16>` if it is complete.
fn cached(out: &Path) -> Result<Option<Kernel>> {
    let json = out.join("build.json");
    let Ok(text) = fs::read_to_string(&json) else {
        return Ok(None);
    };
    let record: BuildJson = match serde_json::from_str(&text) {
        Ok(r) => r,
        Err(e) => {
            say(format!("ignoring unreadable {} ({e})", json.display()));
            return Ok(None);
        }
    };
    let kernel = Kernel {
        bzimage: out.join("bzImage"),
        modules_dir: out.join("modules/lib/modules").join(&record.kernel_release),
        release: record.kernel_release,
        config_path: out.join(".config"),
        config_sha256: record.config_sha256,
        key: record.key,
        cold_build_secs: record.cold_build_secs,
    };
    let complete = kernel.bzimage.is_file()
        && kernel.config_path.is_file()
        && kernel.modules_dir.join("modules.dep").is_file();
    Ok(complete.then_some(kernel))
}

/// Recognises make's "  CC      path" lines: the compiled object.
fn compiled_object(line: &str) -> Option<String> {
    let mut words = line.split_whitespace();
    let verb = words.next()?;
    if !matches!(verb, "CC" | "RUSTC" | "AS" | "BINDGEN") {
        return None;
    }
    let last = words.last()?;
    (last.contains('/') || last.ends_with(".o")).then(|| last.to_owned())
}

/// `make -C <src> O=<build> LLVM=-19 …` with the toolchain's environment.
struct Make<'a> {
    toolchain: &'a Toolchain,
    src: &'a Path,
    build: &'a Path,
    log: &'a Path,
}

impl Make<'_> {
    fn command(&self, targets: &[&str]) -> Command {
        let tc = self.toolchain;
        let mut c = Command::new("make");
        c.arg("-C")
            .arg(self.src)
            .arg(format!("O={}", self.build.display()))
            .arg(format!("LLVM={}", tc.llvm_suffix))
            .arg(format!("RUST_LIB_SRC={}", tc.rust_lib_src.display()))
            .arg(format!("BINDGEN={}", tc.bindgen.display()))
            .args(targets)
            .env("LIBCLANG_PATH", &tc.libclang_path);
        // Flags meant for cargo or an outer make must not leak into Kbuild.
        for var in [
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "MAKEFLAGS",
            "MFLAGS",
            "MAKELEVEL",
            "ARCH",
            "CROSS_COMPILE",
        ] {
            c.env_remove(var);
        }
        c
    }

    fn run(&self, targets: &[&str]) -> Result<()> {
        cmd::run_logged(
            self.command(targets),
            &Logged::new("kernel: make", self.log),
        )
        .map(drop)
    }
}

/// defconfig + kvm_guest.config + the fragment, olddefconfig, then verification.
fn configure(make: &Make, fragment: &str) -> Result<()> {
    fs::create_dir_all(make.build)?;
    // CONFIG_RUST silently disappears when the toolchain does not pass
    // `rustavailable`: ask first and show why.
    let out = cmd::output_raw(&mut make.command(&["rustavailable"]))?;
    if !out.status.success() {
        bail!(
            "`make LLVM={} rustavailable` failed, so CONFIG_RUST cannot be enabled:\n{}{}",
            make.toolchain.llvm_suffix,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    make.run(&["defconfig", "kvm_guest.config"])?;
    let config_path = make.build.join(".config");
    let base = fs::read_to_string(&config_path).context("reading the defconfig .config")?;
    fs::write(&config_path, merge_fragment(&base, fragment))?;
    make.run(&["olddefconfig"])?;
    let fin = fs::read_to_string(&config_path)?;
    let report = verify_config(fragment, &fin);
    for w in &report.warnings {
        say(format!("config note: {w}"));
    }
    if !report.errors.is_empty() {
        let mut msg = format!(
            "the final .config ({}) lacks what images/kernel/fencelab.config asks for:\n  {}",
            config_path.display(),
            report.errors.join("\n  ")
        );
        if report.errors.iter().any(|e| e.starts_with("CONFIG_RUST=")) {
            msg.push_str("\nCONFIG_RUST depends on RUST_IS_AVAILABLE, !MODVERSIONS, !RANDSTRUCT, !DEBUG_INFO_BTF… (init/Kconfig)");
        }
        bail!(msg);
    }
    Ok(())
}

/// `.config`-style lines as symbol → value (`n` for "is not set").
fn parse_config(text: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some(sym) = rest.strip_suffix(" is not set") {
                if sym.starts_with("CONFIG_") {
                    map.insert(sym.to_owned(), "n".to_owned());
                }
            }
        } else if let Some((sym, value)) = line.split_once('=') {
            if sym.starts_with("CONFIG_") {
                map.insert(sym.to_owned(), value.to_owned());
            }
        }
    }
    map
}

/// The fragment merged onto `base`: every symbol the fragment names is
/// removed from `base` and the fragment's lines appended (what
/// `merge_config.sh -m` does).
fn merge_fragment(base: &str, fragment: &str) -> String {
    let wanted = parse_config(fragment);
    let mut out = String::new();
    for line in base.lines() {
        let sym = line
            .trim()
            .strip_prefix("# ")
            .and_then(|r| r.strip_suffix(" is not set"))
            .or_else(|| line.split_once('=').map(|(s, _)| s.trim()));
        if sym.is_some_and(|s| wanted.contains_key(s)) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.push_str("# --- images/kernel/fencelab.config ---\n");
    for (sym, value) in &wanted {
        if value == "n" {
            out.push_str(&format!("# {sym} is not set\n"));
        } else {
            out.push_str(&format!("{sym}={value}\n"));
        }
    }
    out
}

#[derive(Debug, Default)]
struct Verification {
    errors: Vec<String>,
    warnings: Vec<String>,
}

/// Checks that `config` has every value `fragment` sets; symbols the fragment
/// switches off but that stayed on (selected by something else) are warnings.
fn verify_config(fragment: &str, config: &str) -> Verification {
    let have = parse_config(config);
    let mut v = Verification::default();
    for (sym, want) in parse_config(fragment) {
        let got = have.get(&sym).map(String::as_str).unwrap_or("n");
        if want == "n" {
            if got != "n" {
                v.warnings
                    .push(format!("{sym}={got} although the fragment switches it off"));
            }
        } else if got != want {
            v.errors.push(format!(
                "{sym}={want} wanted, the final .config has {sym}={got}"
            ));
        }
    }
    v
}

// ---------------------------------------------------------------- source tree

/// What `src/` holds, in `src.json`.
#[derive(Debug, Serialize, Deserialize, Default, PartialEq)]
struct SourceState {
    pristine: PathBuf,
    linux_package_version: String,
    /// (name, SHA-256) of the applied patches, in order.
    applied: Vec<(String, String)>,
    /// Every file any applied (or half-applied) patch touched, relative to the tree.
    touched: Vec<String>,
}

/// Makes `src` the pristine tree plus `patches`, touching as few files as possible.
fn prepare_source(
    tc: &Toolchain,
    kcache: &Path,
    src: &Path,
    build: &Path,
    patches: &[Patch],
) -> Result<()> {
    let state_path = kcache.join("src.json");
    let state: Option<SourceState> = fs::read_to_string(&state_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let same_base = state.as_ref().is_some_and(|s| {
        s.pristine == tc.linux_src && s.linux_package_version == tc.linux_package_version
    }) && src.join("Makefile").is_file();
    let mut state = match state {
        Some(s) if same_base => s,
        _ => {
            // New kernel version (or first run): fresh copy, fresh build folder.
            let t = Instant::now();
            let _ = fs::remove_dir_all(src);
            let _ = fs::remove_dir_all(build);
            let tmp = kcache.join("src.partial");
            let _ = fs::remove_dir_all(&tmp);
            fs::create_dir_all(kcache)?;
            // Hard links: instant and no extra space. Patching replaces files
            // (see unshare) so the pristine tree is never written through them.
            cmd::stdout(Command::new("cp").arg("-al").arg(&tc.linux_src).arg(&tmp))
                .context("copying the pristine tree")?;
            fs::rename(&tmp, src)?;
            let s = SourceState {
                pristine: tc.linux_src.clone(),
                linux_package_version: tc.linux_package_version.clone(),
                ..SourceState::default()
            };
            write_state(&state_path, &s)?;
            say(format!(
                "source tree {} ready ({})",
                src.display(),
                cmd::human_duration(t.elapsed())
            ));
            s
        }
    };
    let wanted: Vec<(String, String)> = patches
        .iter()
        .map(|p| (p.name.clone(), p.sha256.clone()))
        .collect();
    if state.applied == wanted {
        return Ok(());
    }
    // Restore what the previous series touched (a fresh copy: new mtime, so
    // make rebuilds what depends on it), then apply the new series.
    for rel in std::mem::take(&mut state.touched) {
        let (dst, orig) = (src.join(&rel), tc.linux_src.join(&rel));
        let _ = fs::remove_file(&dst);
        if orig.is_file() {
            fs::copy(&orig, &dst).with_context(|| format!("restoring {rel}"))?;
        }
    }
    state.applied.clear();
    let mut touched: Vec<String> = Vec::new();
    for patch in patches {
        let text = fs::read_to_string(&patch.path)
            .with_context(|| format!("reading {}", patch.path.display()))?;
        let files = patched_files(&text);
        touched.extend(files.iter().cloned());
        touched.sort();
        touched.dedup();
        // Record before applying: a half-applied patch is undone next time.
        state.touched = touched.clone();
        write_state(&state_path, &state)?;
        for rel in &files {
            unshare(&src.join(rel))?;
        }
        let out = cmd::output_raw(
            Command::new("patch")
                .current_dir(src)
                .args([
                    "-p1",
                    "--forward",
                    "--batch",
                    "--no-backup-if-mismatch",
                    "--reject-file=-",
                    "-i",
                ])
                .arg(&patch.path),
        )?;
        if !out.status.success() {
            bail!(
                "patch {} does not apply to Linux {}:\n{}{}",
                patch.name,
                tc.linux_version,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        state
            .applied
            .push((patch.name.clone(), patch.sha256.clone()));
        write_state(&state_path, &state)?;
    }
    say(format!(
        "applied {} patches ({} files touched)",
        patches.len(),
        state.touched.len()
    ));
    Ok(())
}

fn write_state(path: &Path, state: &SourceState) -> Result<()> {
    fs::write(path, serde_json::to_string_pretty(state)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// Replaces a hard link into the pristine tree by a private copy of the file.
fn unshare(path: &Path) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let tmp = path.with_extension("fencelab-unshare");
    fs::copy(path, &tmp).with_context(|| format!("copying {}", path.display()))?;
    fs::rename(&tmp, path)?;
    Ok(())
}

/// Files a unified diff (`git format-patch` output) touches, relative to the tree.
fn patched_files(patch: &str) -> Vec<String> {
    let mut files = Vec::new();
    for line in patch.lines() {
        let path = line
            .strip_prefix("--- a/")
            .or_else(|| line.strip_prefix("+++ b/"))
            .or_else(|| line.strip_prefix("rename from "))
            .or_else(|| line.strip_prefix("rename to "));
        if let Some(p) = path {
            let p = p.split('\t').next().unwrap_or(p).trim().to_owned();
            if !files.contains(&p) {
                files.push(p);
            }
        }
    }
    files
}

// ------------------------------------------------------- out-of-tree modules

/// The source tree and build folder a cached kernel was built in, locked
/// against kernel builds while this lives: what an out-of-tree module build
/// (`make M=`) compiles against. See [`built_tree`].
pub struct BuiltTree {
    _lock: FileLock,
    /// The patched source tree, `<cache>/kernel/src`.
    pub src: PathBuf,
    /// The build folder, `<cache>/kernel/build`.
    pub build: PathBuf,
}

/// Locks the kernel build folder and checks that it still holds `kernel`:
/// the source tree has the patches `kernel` was built from and the folder's
/// bzImage is the cached one (a build of another series or config since
/// would have replaced both).
pub fn built_tree(kernel: &Kernel) -> Result<BuiltTree> {
    let kcache = paths::cache_dir().join("kernel");
    let lock = FileLock::acquire(&kcache.join("build.lock"), "kernel")?;
    let (src, build) = (kcache.join("src"), kcache.join("build"));
    let kernel_dir = kernel
        .bzimage
        .parent()
        .context("the kernel's bzImage has no folder")?;
    let json = kernel_dir.join("build.json");
    let record: BuildJson = serde_json::from_str(
        &fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?,
    )
    .with_context(|| format!("parsing {}", json.display()))?;
    let state_path = kcache.join("src.json");
    let state: SourceState = serde_json::from_str(
        &fs::read_to_string(&state_path)
            .with_context(|| format!("reading {}", state_path.display()))?,
    )
    .with_context(|| format!("parsing {}", state_path.display()))?;
    let same_patches = same_patch_set(&record.inputs.patches, &state.applied);
    let built_bzimage = fs::read(build.join("arch/x86/boot/bzImage")).ok();
    let cached_bzimage = fs::read(&kernel.bzimage)
        .with_context(|| format!("reading {}", kernel.bzimage.display()))?;
    if !same_patches || built_bzimage.as_deref() != Some(cached_bzimage.as_slice()) {
        bail!(
            "the kernel build folder {} no longer holds kernel {} ({}); \
             `cargo xtask kernel --force` builds it there again",
            build.display(),
            &kernel.key[..16],
            if same_patches {
                "its bzImage differs"
            } else {
                "its source tree has another patch series"
            }
        );
    }
    Ok(BuiltTree {
        _lock: lock,
        src,
        build,
    })
}

/// Whether the key entries of a kernel (the series file and every patch,
/// see [`read_series`]) name the patches a source tree has applied.
fn same_patch_set(key_entries: &[NamedHash], applied: &[NamedHash]) -> bool {
    let mut wanted: Vec<&NamedHash> = key_entries
        .iter()
        .filter(|(name, _)| name != "series" && !name.ends_with("/series"))
        .collect();
    let mut have: Vec<&NamedHash> = applied.iter().collect();
    wanted.sort();
    have.sort();
    wanted == have
}

/// `make M=<module_src> MO=<module_out> modules <vars…>` against `tree`:
/// builds the out-of-tree module in `module_src` with the kernel's own
/// toolchain, configuration and flags, so that it loads in that kernel.
pub fn external_module_command(
    toolchain: &Toolchain,
    tree: &BuiltTree,
    module_src: &Path,
    module_out: &Path,
    vars: &[String],
) -> Command {
    let make = Make {
        toolchain,
        src: &tree.src,
        build: &tree.build,
        log: Path::new("/dev/null"),
    };
    let mut c = make.command(&["modules"]);
    c.arg(format!("M={}", module_src.display()))
        .arg(format!("MO={}", module_out.display()))
        .args(vars);
    c
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_latest_cold_build_on_record_is_found_across_keys() {
        let cache = std::env::temp_dir().join(format!("fencelab-cold-{}", std::process::id()));
        let _ = fs::remove_dir_all(&cache);
        let record = |key16: &str, cold: Option<f64>, at: &str| {
            let dir = cache.join(key16);
            fs::create_dir_all(&dir).unwrap();
            let json = serde_json::json!({
                "key": key16, "kernel_release": "7.3.4", "config_sha256": "00",
                "cold_build_secs": cold, "build_secs": 60.0, "built_at": at,
                "inputs": {"recipe": 1, "linux_package_version": "v", "fragment_sha256": "f",
                           "patches": [], "rustc": "r", "clang": "c", "bindgen": "b"}
            });
            fs::write(dir.join("build.json"), json.to_string()).unwrap();
        };
        assert_eq!(latest_cold_build(&cache), None, "no cache folder");
        record("aaaa", Some(900.0), "2026-11-20T05:00:00Z");
        record("bbbb", Some(990.5), "2026-11-21T05:00:00Z");
        record("cccc", None, "2026-11-21T09:00:00Z"); // incremental, later
        fs::create_dir_all(cache.join("build")).unwrap(); // the shared build folder
        assert_eq!(
            latest_cold_build(&cache),
            Some(ColdBuild {
                secs: 990.5,
                key16: "bbbb".into(),
                built_at: "2026-11-21T05:00:00Z".into()
            })
        );
        fs::remove_dir_all(&cache).unwrap();
    }
    use super::*;

    fn inputs() -> KeyInputs {
        KeyInputs {
            recipe: 1,
            linux_package_version: "7.3.4-1~bpo13+1".into(),
            fragment_sha256: sha256_hex(b"CONFIG_RUST=y\n"),
            patches: vec![],
            rustc: "rustc 1.95.0 (59807616e 2026-04-14)".into(),
            clang: "Debian clang version 19.1.7 (3~deb12u1)".into(),
            bindgen: "bindgen 0.71.1".into(),
        }
    }

    #[test]
    fn key_is_stable_and_sensitive() {
        let base = inputs();
        assert_eq!(base.key(), inputs().key());
        assert_eq!(base.key().len(), 64);
        type Change = Box<dyn Fn(&mut KeyInputs)>;
        let variants: Vec<Change> = vec![
            Box::new(|i| i.recipe = 2),
            Box::new(|i| i.linux_package_version = "7.3.5-1~bpo13+1".into()),
            Box::new(|i| i.fragment_sha256 = sha256_hex(b"CONFIG_RUST=n\n")),
            Box::new(|i| i.patches.push(("0001-x.patch".into(), "00".into()))),
            Box::new(|i| i.rustc = "rustc 1.96.1".into()),
            Box::new(|i| i.clang = "clang 20".into()),
            Box::new(|i| i.bindgen = "bindgen 0.72.0".into()),
        ];
        let mut keys = vec![base.key()];
        for change in variants {
            let mut i = inputs();
            change(&mut i);
            keys.push(i.key());
        }
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), keys.len(), "every input must change the key");
        // Patch order matters.
        let mut a = inputs();
        a.patches = vec![("1".into(), "a".into()), ("2".into(), "b".into())];
        let mut b = inputs();
        b.patches = vec![("2".into(), "b".into()), ("1".into(), "a".into())];
        assert_ne!(a.key(), b.key());
    }

    #[test]
    fn merge_replaces_and_appends() {
        let base = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=m\nCONFIG_S=\"x\"\n";
        let frag = "# comment\nCONFIG_B=y\n# CONFIG_A is not set\nCONFIG_D=5\n";
        let merged = merge_fragment(base, frag);
        let m = parse_config(&merged);
        assert_eq!(m["CONFIG_A"], "n");
        assert_eq!(m["CONFIG_B"], "y");
        assert_eq!(m["CONFIG_C"], "m");
        assert_eq!(m["CONFIG_D"], "5");
        assert_eq!(m["CONFIG_S"], "\"x\"");
        assert_eq!(merged.matches("CONFIG_A").count(), 1);
    }

    #[test]
    fn verification_catches_lost_symbols() {
        let frag = "CONFIG_RUST=y\nCONFIG_DRM_VIRTIO_GPU=m\n# CONFIG_NET is not set\nCONFIG_RCU_CPU_STALL_TIMEOUT=60\n";
        let good = "CONFIG_RUST=y\nCONFIG_DRM_VIRTIO_GPU=m\n# CONFIG_NET is not set\nCONFIG_RCU_CPU_STALL_TIMEOUT=60\n";
        let v = verify_config(frag, good);
        assert!(v.errors.is_empty() && v.warnings.is_empty(), "{v:?}");
        let bad = "CONFIG_DRM_VIRTIO_GPU=y\nCONFIG_NET=y\nCONFIG_RCU_CPU_STALL_TIMEOUT=21\n";
        let v = verify_config(frag, bad);
        assert_eq!(v.errors.len(), 3, "{v:?}");
        assert!(v.errors.iter().any(|e| e.starts_with("CONFIG_RUST=y")));
        assert_eq!(v.warnings.len(), 1);
    }

    #[test]
    fn the_fragment_parses() {
        let text =
            fs::read_to_string(paths::workspace_root().join("images/kernel/fencelab.config"))
                .unwrap();
        let m = parse_config(&text);
        for sym in [
            "CONFIG_RUST",
            "CONFIG_KASAN",
            "CONFIG_PROVE_LOCKING",
            "CONFIG_IKCONFIG_PROC",
            "CONFIG_SW_SYNC",
        ] {
            assert_eq!(m.get(sym).map(String::as_str), Some("y"), "{sym}");
        }
        assert_eq!(m["CONFIG_DRM_VIRTIO_GPU"], "m");
        assert_eq!(m["CONFIG_MODVERSIONS"], "n");
    }

    #[test]
    fn objects_are_recognised() {
        assert_eq!(
            compiled_object("  CC      drivers/gpu/drm/drm_file.o").as_deref(),
            Some("drivers/gpu/drm/drm_file.o")
        );
        assert_eq!(
            compiled_object("  CC [M]  drivers/gpu/drm/virtio/virtgpu_drv.o").as_deref(),
            Some("drivers/gpu/drm/virtio/virtgpu_drv.o")
        );
        assert_eq!(
            compiled_object("  RUSTC L rust/core.o").as_deref(),
            Some("rust/core.o")
        );
        assert_eq!(compiled_object("  LD      vmlinux.o"), None);
        assert_eq!(compiled_object("make[1]: Entering directory"), None);
    }

    #[test]
    fn patch_sets_ignore_the_series_file_and_order() {
        let entry = |n: &str, h: &str| (n.to_owned(), h.to_owned());
        let key = [
            entry("patches/0001-a.patch", "1"),
            entry("patches/0002-b.patch", "2"),
            entry("patches/series", "s"),
        ];
        let applied = [
            entry("patches/0002-b.patch", "2"),
            entry("patches/0001-a.patch", "1"),
        ];
        assert!(same_patch_set(&key, &applied));
        assert!(!same_patch_set(&key, &applied[..1]));
        let changed = [
            entry("patches/0001-a.patch", "1"),
            entry("patches/0002-b.patch", "2x"),
        ];
        assert!(!same_patch_set(&key, &changed));
    }

    #[test]
    fn series_and_patched_files() {
        assert_eq!(
            series_entries("# the series\n0001-a.patch\n\n0002-b.patch # why\n"),
            vec!["0001-a.patch", "0002-b.patch"]
        );
        let diff = "From x\n---\n--- a/rust/kernel/lib.rs\n+++ b/rust/kernel/lib.rs\n@@ -1 +1 @@\n\
                    --- /dev/null\n+++ b/rust/kernel/dma_fence.rs\n";
        assert_eq!(
            patched_files(diff),
            vec!["rust/kernel/lib.rs", "rust/kernel/dma_fence.rs"]
        );
    }

    #[test]
    fn series_file_orders_patches() {
        let dir = std::env::temp_dir().join(format!("fencelab-series-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("patches")).unwrap();
        fs::write(dir.join("README.md"), "not a patch").unwrap();
        fs::write(dir.join("patches/0001-b.patch"), "b").unwrap();
        fs::write(dir.join("patches/0002-a.patch"), "a").unwrap();
        fs::write(dir.join("patches/series"), "0002-a.patch\n0001-b.patch\n").unwrap();
        let (patches, entries) = read_series(&dir).unwrap();
        assert_eq!(
            patches.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["patches/0002-a.patch", "patches/0001-b.patch"]
        );
        assert_eq!(entries.len(), 3);
        fs::write(dir.join("patches/series"), "0003-missing.patch\n").unwrap();
        assert!(read_series(&dir).is_err());
        fs::remove_dir_all(&dir).unwrap();
        let (none, entries) = read_series(&dir).unwrap();
        assert!(none.is_empty() && entries.is_empty());
    }
}

#[cfg(test)]
mod source_tests {
    use super::*;

    fn toolchain(pristine: &Path) -> Toolchain {
        Toolchain {
            linux_src: pristine.to_owned(),
            linux_version: "7.3.4".into(),
            linux_package_version: "7.3.4-1~bpo13+1".into(),
            rust_lib_src: PathBuf::new(),
            rust_src_package_version: String::new(),
            rustc_version: String::new(),
            bindgen: PathBuf::new(),
            bindgen_version: String::new(),
            llvm_suffix: "-19".into(),
            clang_version: String::new(),
            libclang_path: PathBuf::new(),
            qemu: PathBuf::new(),
            qemu_version: String::new(),
            busybox: PathBuf::new(),
        }
    }

    fn patch(dir: &Path, name: &str, text: &str) -> Patch {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        Patch {
            name: name.into(),
            path,
            sha256: sha256_hex(text.as_bytes()),
        }
    }

    #[test]
    fn patches_apply_to_a_copy_and_are_swapped_incrementally() {
        let base = std::env::temp_dir().join(format!("fencelab-src-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let pristine = base.join("pristine");
        fs::create_dir_all(pristine.join("lib")).unwrap();
        fs::write(pristine.join("Makefile"), "all:\n").unwrap();
        fs::write(pristine.join("lib/a.c"), "one\n").unwrap();
        fs::write(pristine.join("lib/b.c"), "bee\n").unwrap();
        let tc = toolchain(&pristine);
        let kcache = base.join("kernel");
        let (src, build) = (kcache.join("src"), kcache.join("build"));

        let p1 = patch(
            &base,
            "0001-a.patch",
            "--- a/lib/a.c\n+++ b/lib/a.c\n@@ -1 +1 @@\n-one\n+two\n\
             --- /dev/null\n+++ b/lib/new.c\n@@ -0,0 +1 @@\n+new\n",
        );
        prepare_source(&tc, &kcache, &src, &build, std::slice::from_ref(&p1)).unwrap();
        assert_eq!(fs::read_to_string(src.join("lib/a.c")).unwrap(), "two\n");
        assert_eq!(fs::read_to_string(src.join("lib/new.c")).unwrap(), "new\n");
        assert_eq!(
            fs::read_to_string(pristine.join("lib/a.c")).unwrap(),
            "one\n",
            "pristine untouched"
        );
        assert!(!pristine.join("lib/new.c").exists());

        // Same series again: nothing changes.
        prepare_source(&tc, &kcache, &src, &build, std::slice::from_ref(&p1)).unwrap();
        assert_eq!(fs::read_to_string(src.join("lib/a.c")).unwrap(), "two\n");

        // Another series: a.c and new.c are restored, b.c is patched.
        let p2 = patch(
            &base,
            "0001-b.patch",
            "--- a/lib/b.c\n+++ b/lib/b.c\n@@ -1 +1 @@\n-bee\n+wasp\n",
        );
        prepare_source(&tc, &kcache, &src, &build, std::slice::from_ref(&p2)).unwrap();
        assert_eq!(fs::read_to_string(src.join("lib/a.c")).unwrap(), "one\n");
        assert!(!src.join("lib/new.c").exists());
        assert_eq!(fs::read_to_string(src.join("lib/b.c")).unwrap(), "wasp\n");
        assert_eq!(
            fs::read_to_string(pristine.join("lib/b.c")).unwrap(),
            "bee\n",
            "pristine untouched"
        );

        // A patch that does not apply names itself.
        let bad = patch(
            &base,
            "0002-bad.patch",
            "--- a/lib/a.c\n+++ b/lib/a.c\n@@ -1 +1 @@\n-zzz\n+yyy\n",
        );
        let err = prepare_source(&tc, &kcache, &src, &build, &[p2.clone(), bad]).unwrap_err();
        assert!(format!("{err:#}").contains("0002-bad.patch"), "{err:#}");
        assert!(!src.join("lib/a.c.rej").exists());
        // …and the next run recovers.
        prepare_source(&tc, &kcache, &src, &build, &[]).unwrap();
        assert_eq!(fs::read_to_string(src.join("lib/b.c")).unwrap(), "bee\n");
        assert_eq!(fs::read_to_string(src.join("lib/a.c")).unwrap(), "one\n");
        fs::remove_dir_all(&base).unwrap();
    }
}
