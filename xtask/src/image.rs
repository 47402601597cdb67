//! `cargo xtask image`: the guest initramfs (gzip'd newc cpio).
//!
//! Contents: `/init` (images/init), `/bin/busybox` (Debian's busybox-static),
//! `/bin/fence-hammer` (static), `/lib/modules/<release>/` (the kernel's whole
//! modules tree: only the DRM/virtio-gpu helpers are modules), `/dev/console`
//! and the mount points. Cached as `<cache>/images/<key16>.cpio.gz`, keyed by
//! the kernel's key and the bytes of init, fence-hammer and busybox.

use crate::cmd::{self, Logged};
use crate::cpio::{self, Entry};
use crate::kernel::Kernel;
use crate::paths;
use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Bumped when the image layout changes in a way the inputs do not show.
const RECIPE_VERSION: u32 = 1;
const BUSYBOX: &str = "/bin/busybox";
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

fn say(message: impl AsRef<str>) {
    eprintln!("image: {}", message.as_ref());
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Builds (or finds in the cache) the initramfs for `kernel`.
pub fn build(kernel: &Kernel) -> Result<PathBuf> {
    build_image(kernel, None)
}

/// Builds (or finds in the cache) the initramfs for `kernel` with `module`
/// in place of the kernel's own module of the same file name (e.g. a
/// `fencelab_drm.ko` built with a deliberate bug, see `bugs.rs`).
pub fn build_replacing_module(kernel: &Kernel, module: &Path) -> Result<PathBuf> {
    build_image(kernel, Some(module))
}

/// The cache key of an image whose `image_key` is `base`, with a module
/// replaced by one of these bytes.
fn replaced_module_key(base: &str, module: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(format!(
        "image {base}
replaced module {}
",
        sha256_hex(module)
    ));
    hex::encode(h.finalize())
}

/// Puts `module`'s bytes in place of the one file of `entries` with the same
/// file name; fails unless exactly one has it.
fn replace_module(entries: &mut BTreeMap<String, Entry>, module: &Path) -> Result<()> {
    let file_name = module
        .file_name()
        .with_context(|| format!("{} has no file name", module.display()))?
        .to_string_lossy()
        .into_owned();
    let suffix = format!("/{file_name}");
    let matches: Vec<String> = entries
        .keys()
        .filter(|name| name.ends_with(&suffix))
        .cloned()
        .collect();
    let [name] = matches.as_slice() else {
        bail!(
            "the kernel's modules have {} files named {file_name}, so {} replaces none: {matches:?}",
            matches.len(),
            module.display()
        );
    };
    let bytes = fs::read(module).with_context(|| format!("reading {}", module.display()))?;
    let perm = entries[name].mode & 0o777;
    entries.insert(name.clone(), Entry::file(name, perm, bytes));
    Ok(())
}

fn build_image(kernel: &Kernel, replacement: Option<&Path>) -> Result<PathBuf> {
    let started = Instant::now();
    let root = paths::workspace_root();
    let init_path = root.join("images/init");
    let init = fs::read(&init_path).with_context(|| format!("reading {}", init_path.display()))?;
    let hammer_path = build_fence_hammer(&root)?;
    let hammer = fs::read(&hammer_path)?;
    check_static(&hammer)
        .with_context(|| format!("{} must be statically linked", hammer_path.display()))?;
    let busybox =
        fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX} (package busybox-static)"))?;
    check_static(&busybox).with_context(|| {
        format!("{BUSYBOX} must be the static busybox (package busybox-static)")
    })?;

    let mut key = image_key(&kernel.key, &init, &hammer, &busybox);
    if let Some(module) = replacement {
        let bytes = fs::read(module).with_context(|| format!("reading {}", module.display()))?;
        key = replaced_module_key(&key, &bytes);
    }
    let out_dir = paths::cache_dir().join("images");
    let out = out_dir.join(format!("{}.cpio.gz", &key[..16]));
    if out.is_file() {
        let size = fs::metadata(&out)?.len();
        say(format!("{} ({}) cached", out.display(), human_size(size)));
        return Ok(out);
    }

    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    let mut add = |e: Entry| {
        // Parents first: BTreeMap order puts "a" before "a/b".
        let mut parent = Path::new(&e.name).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            let name = p.to_string_lossy().into_owned();
            entries
                .entry(name.clone())
                .or_insert_with(|| Entry::dir(&name, 0o755));
            parent = p.parent();
        }
        entries.insert(e.name.clone(), e);
    };
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "sys/kernel/debug",
        "tmp",
        "run",
        "etc",
        "root",
    ] {
        add(Entry::dir(dir, if dir == "tmp" { 0o1777 } else { 0o755 }));
    }
    add(Entry::char_dev("dev/console", 0o600, 5, 1));
    add(Entry::file("init", 0o755, init));
    add(Entry::file("bin/busybox", 0o755, busybox));
    add(Entry::symlink("bin/sh", "busybox"));
    add(Entry::file("bin/fence-hammer", 0o755, hammer));
    let mut module_files = 0;
    let modules_prefix = format!("lib/modules/{}", kernel.release);
    for e in tree_entries(&kernel.modules_dir, &modules_prefix)? {
        module_files += usize::from(e.mode & 0o170000 == cpio::S_IFREG);
        add(e);
    }
    if module_files == 0 {
        bail!("{} holds no modules", kernel.modules_dir.display());
    }
    if let Some(module) = replacement {
        replace_module(&mut entries, module)?;
    }

    fs::create_dir_all(&out_dir)?;
    let tmp = out.with_extension("partial");
    let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let gz = flate2::write::GzEncoder::new(
        std::io::BufWriter::new(file),
        flate2::Compression::default(),
    );
    let mut writer = cpio::Writer::new(gz);
    for e in entries.values() {
        writer
            .add(e)
            .with_context(|| format!("writing {}", e.name))?;
    }
    let mut buf = writer.finish()?.finish()?;
    buf.flush()?;
    drop(buf);
    fs::rename(&tmp, &out)?;
    let size = fs::metadata(&out)?.len();
    say(format!(
        "{} ({}; {} entries, {module_files} module files; {})",
        out.display(),
        human_size(size),
        entries.len(),
        cmd::human_duration(started.elapsed())
    ));
    Ok(out)
}

fn image_key(kernel_key: &str, init: &[u8], hammer: &[u8], busybox: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(format!("recipe {RECIPE_VERSION}\nkernel {kernel_key}\n"));
    h.update(format!("init {}\n", sha256_hex(init)));
    h.update(format!("fence-hammer {}\n", sha256_hex(hammer)));
    h.update(format!("busybox {}\n", sha256_hex(busybox)));
    hex::encode(h.finalize())
}

fn human_size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

/// Builds fence-hammer as a static binary in its own target folder (so the
/// different RUSTFLAGS never invalidate the host build cache).
fn build_fence_hammer(root: &Path) -> Result<PathBuf> {
    let manifest = root.join("images/fence-hammer/Cargo.toml");
    if !manifest.is_file() {
        bail!(
            "the guest workload fence-hammer does not exist yet ({} is missing)",
            manifest.display()
        );
    }
    let target_dir = root.join("target/guest");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut c = Command::new(cargo);
    c.current_dir(root)
        .args([
            "build",
            "--release",
            "--package",
            "fence-hammer",
            "--target",
            GUEST_TARGET,
            "--target-dir",
        ])
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static")
        .env_remove("RUSTFLAGS");
    let t = Instant::now();
    let log = target_dir.join("fence-hammer-build.log");
    let _ = fs::remove_file(&log);
    cmd::run_logged(c, &Logged::new("image: building fence-hammer", &log))
        .context("building the guest workload fence-hammer (images/fence-hammer) failed")?;
    let bin = target_dir.join(GUEST_TARGET).join("release/fence-hammer");
    if !bin.is_file() {
        bail!("cargo built fence-hammer but {} is missing", bin.display());
    }
    say(format!(
        "fence-hammer built ({})",
        cmd::human_duration(t.elapsed())
    ));
    Ok(bin)
}

/// Fails unless `elf` is an x86-64 ELF without a program interpreter (PT_INTERP).
fn check_static(elf: &[u8]) -> Result<()> {
    const PT_INTERP: u32 = 3;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        bail!("not an ELF file");
    }
    if elf[4] != 2 || elf[5] != 1 {
        bail!("not a little-endian 64-bit ELF");
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]);
    if u16_at(18) != 62 {
        bail!("not an x86-64 ELF (e_machine {})", u16_at(18));
    }
    let phoff = u64::from_le_bytes(elf[32..40].try_into()?) as usize;
    let (phentsize, phnum) = (u16_at(54) as usize, u16_at(56) as usize);
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        let p_type = u32::from_le_bytes(
            elf.get(o..o + 4)
                .context("truncated program headers")?
                .try_into()?,
        );
        if p_type == PT_INTERP {
            bail!("it is dynamically linked (has PT_INTERP)");
        }
    }
    Ok(())
}

/// Every file, folder and symlink under `dir` as entries under `prefix`,
/// except the `build` and `source` links modules_install leaves behind.
fn tree_entries(dir: &Path, prefix: &str) -> Result<Vec<Entry>> {
    let mut out = vec![Entry::dir(prefix, 0o755)];
    let mut items: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<std::io::Result<Vec<_>>>()?;
    items.sort_by_key(|e| e.file_name());
    for item in items {
        let name = item.file_name().to_string_lossy().into_owned();
        if name == "build" || name == "source" {
            continue;
        }
        let path = item.path();
        let inner = format!("{prefix}/{name}");
        let meta = fs::symlink_metadata(&path)?;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&path)?;
            out.push(Entry::symlink(&inner, &target.to_string_lossy()));
        } else if meta.is_dir() {
            out.extend(tree_entries(&path, &inner)?);
        } else if meta.is_file() {
            use std::os::unix::fs::PermissionsExt;
            out.push(Entry::file(
                &inner,
                meta.permissions().mode() & 0o777,
                fs::read(&path)?,
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_key_is_sensitive_to_every_input() {
        let k = image_key("k", b"init", b"hammer", b"busybox");
        assert_eq!(k, image_key("k", b"init", b"hammer", b"busybox"));
        assert_ne!(k, image_key("k2", b"init", b"hammer", b"busybox"));
        assert_ne!(k, image_key("k", b"init2", b"hammer", b"busybox"));
        assert_ne!(k, image_key("k", b"init", b"hammer2", b"busybox"));
        assert_ne!(k, image_key("k", b"init", b"hammer", b"busybox2"));
    }

    #[test]
    fn a_replaced_module_changes_the_key_and_one_file() {
        let base = image_key("k", b"init", b"hammer", b"busybox");
        assert_ne!(replaced_module_key(&base, b"ko"), base);
        assert_ne!(
            replaced_module_key(&base, b"ko"),
            replaced_module_key(&base, b"ko2")
        );
        assert_eq!(
            replaced_module_key(&base, b"ko"),
            replaced_module_key(&base, b"ko")
        );

        let dir = std::env::temp_dir().join(format!("fencelab-replace-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let module = dir.join("m.ko");
        fs::write(&module, b"new").unwrap();
        let mut entries = BTreeMap::new();
        for (name, data) in [
            ("lib/modules/7/kernel/a/m.ko", b"old".as_slice()),
            ("lib/modules/7/kernel/a/xm.ko", b"other"),
            ("lib/modules/7/modules.dep", b"dep"),
        ] {
            entries.insert(name.to_owned(), Entry::file(name, 0o600, data.to_vec()));
        }
        replace_module(&mut entries, &module).unwrap();
        let replaced = &entries["lib/modules/7/kernel/a/m.ko"];
        assert_eq!(
            (replaced.data.as_slice(), replaced.mode & 0o777),
            (b"new".as_slice(), 0o600)
        );
        assert_eq!(entries["lib/modules/7/kernel/a/xm.ko"].data, b"other");

        // None or two of that name: refused.
        let none = dir.join("absent.ko");
        fs::write(&none, b"x").unwrap();
        assert!(replace_module(&mut entries, &none).is_err());
        let name = "lib/modules/7/extra/m.ko";
        entries.insert(name.to_owned(), Entry::file(name, 0o644, b"dup".to_vec()));
        let err = replace_module(&mut entries, &module).unwrap_err();
        assert!(format!("{err:#}").contains("2 files named m.ko"), "{err:#}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn static_check() {
        // The test binary itself is dynamically linked.
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(check_static(&me).is_err());
        assert!(check_static(b"#!/bin/sh\n").is_err());
        // A minimal ELF header with no program headers counts as static.
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[18] = 62;
        assert!(check_static(&elf).is_ok());
    }

    #[test]
    fn init_has_the_markers_the_host_greps() {
        let init = fs::read_to_string(paths::workspace_root().join("images/init")).unwrap();
        assert!(init.starts_with("#!/bin/busybox sh\n"));
        for marker in [
            "FENCELAB_BOOT",
            "FENCELAB_CONFIG",
            "FENCELAB_WORKLOAD_START",
            "FENCELAB_WORKLOAD_END",
            "FENCELAB_ERROR",
        ] {
            assert!(init.contains(marker), "{marker}");
        }
    }
}
