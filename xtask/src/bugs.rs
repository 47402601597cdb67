//! Deliberate driver bugs for the harness's self-test (issue 6 item 6):
//! fencelab_drm built with one bug class in, which the scenario that targets
//! it must catch with the right splat.
//!
//! The bugs are in the kernel patch series (`drivers/gpu/drm/fencelab/
//! inject.rs`), compiled only when the driver's Makefile gets
//! `FENCELAB_INJECT_BUG=<name>`. [`build_module`] builds that module out of
//! tree (`make M=`) against the cached kernel's own build folder, so it has
//! the kernel's vermagic and loads in it; [`initramfs_with_module`] puts it
//! in the guest image in place of the clean one.
//!
//! Cache layout: `<cache>/bugs/<bug>-<key16>/` holds `fencelab_drm.ko`, the
//! driver sources it was built from (`src/`) and `build.log`; the key covers
//! the kernel's key, the bug and the driver sources.

use crate::cmd::{self, Logged};
use crate::kernel::{self, Kernel};
use crate::paths;
use crate::setup::Toolchain;
use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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

/// Every injectable bug. The names are the Makefile's `fencelab_bugs`.
pub const BUGS: &[Bug] = &[
    Bug {
        name: "deadline-after-signal",
        scenario: "deadline-race",
        summary: "the deadline path keeps raw pointers to the jobs given a deadline and reads \
                  them at every tick, after the completion path freed them (use-after-free)",
        expect_splats: &["kasan"],
    },
    Bug {
        name: "ops-outlive-module",
        scenario: "unload-live",
        summary: "the first fence after each load keeps a `release` op in the module, so the \
                  last put of its sync_file after rmmod calls into the unloaded module",
        expect_splats: &["page-fault", "gpf", "oops", "kasan"],
    },
    Bug {
        name: "sleep-in-signal-path",
        scenario: "callback-vs-release",
        summary: "every job's fence gets a callback that takes a mutex in the signaling \
                  (interrupt) context",
        expect_splats: &["sleep-in-atomic", "scheduling-while-atomic"],
    },
];

/// The driver's folder in the kernel tree.
const DRIVER_DIR: &str = "drivers/gpu/drm/fencelab";
/// The module the driver's Makefile builds.
const MODULE_FILE: &str = "fencelab_drm.ko";
/// Bumped when the way the module is built changes in a way the key's
/// inputs do not show.
const RECIPE_VERSION: u32 = 1;

fn say(message: impl AsRef<str>) {
    eprintln!("bugs: {}", message.as_ref());
}

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
///
/// Holds the kernel build lock throughout: the module is compiled against
/// the kernel's build folder, which must keep holding `kernel`.
pub fn build_module(toolchain: &Toolchain, kernel: &Kernel, bug: &Bug) -> Result<PathBuf> {
    let started = Instant::now();
    let tree = kernel::built_tree(kernel)?;
    let sources = read_sources(&tree.src.join(DRIVER_DIR))?;
    let key = module_key(&kernel.key, bug.name, &sources);
    let dir = paths::cache_dir()
        .join("bugs")
        .join(format!("{}-{}", bug.name, &key[..16]));
    let module = dir.join(MODULE_FILE);
    if module.is_file() {
        say(format!("{} cached", module.display()));
        return Ok(module);
    }

    let staging = dir.with_extension("partial");
    let _ = fs::remove_dir_all(&staging);
    let src = staging.join("src");
    fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    for (name, bytes) in &sources {
        fs::write(src.join(name), bytes).with_context(|| format!("writing {name}"))?;
    }
    let out = staging.join("out");
    fs::create_dir_all(&out)?;
    let log = staging.join("build.log");
    say(format!(
        "building {MODULE_FILE} with {} against kernel {} (out of tree; the {} scenario \
         must catch it with a {} splat); log: {}",
        bug.name,
        &kernel.key[..16],
        bug.scenario,
        bug.expect_splats.join("/"),
        dir.join("build.log").display()
    ));
    let make = kernel::external_module_command(
        toolchain,
        &tree,
        &src,
        &out,
        &[format!("FENCELAB_INJECT_BUG={}", bug.name)],
    );
    let logged = Logged {
        every: Some(Duration::from_secs(15)),
        ..Logged::new("bugs: building", &log)
    };
    cmd::run_logged(make, &logged)
        .with_context(|| format!("building {MODULE_FILE} with bug {}", bug.name))?;
    let built = out.join(MODULE_FILE);
    let bytes =
        fs::read(&built).with_context(|| format!("the build made no {}", built.display()))?;
    let vermagic = check_vermagic(kernel, &bytes)?;
    if !contains(&bytes, bug.name.as_bytes()) {
        bail!(
            "{} does not name bug {}: the driver's Makefile ignored FENCELAB_INJECT_BUG",
            built.display(),
            bug.name
        );
    }
    fs::copy(&built, staging.join(MODULE_FILE))?;
    fs::remove_dir_all(&out)?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&staging, &dir)
        .with_context(|| format!("moving the module into {}", dir.display()))?;
    say(format!(
        "{} built in {}; vermagic \"{vermagic}\" matches the kernel's",
        module.display(),
        cmd::human_duration(started.elapsed())
    ));
    Ok(module)
}

/// The initramfs of `kernel` with `module` in place of the in-tree fencelab_drm.ko.
pub fn initramfs_with_module(kernel: &Kernel, module: &Path) -> Result<PathBuf> {
    crate::image::build_replacing_module(kernel, module)
}

/// The regular files of the driver's folder, sorted by name.
fn read_sources(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut sources = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let path = entry.path();
            let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            sources.push((entry.file_name().to_string_lossy().into_owned(), bytes));
        }
    }
    if !sources.iter().any(|(name, _)| name == "Makefile") {
        bail!(
            "{} has no Makefile: not the fencelab_drm sources",
            dir.display()
        );
    }
    sources.sort();
    Ok(sources)
}

/// The cache key of a module: the kernel's key, the bug, and every source
/// file (name and bytes), in name order.
fn module_key(kernel_key: &str, bug: &str, sources: &[(String, Vec<u8>)]) -> String {
    let mut h = Sha256::new();
    h.update(format!(
        "recipe {RECIPE_VERSION}\nkernel {kernel_key}\nbug {bug}\n"
    ));
    for (name, bytes) in sources {
        h.update(format!(
            "file {name} {}\n",
            hex::encode(Sha256::digest(bytes))
        ));
    }
    hex::encode(h.finalize())
}

/// Fails unless `module` has the vermagic of the kernel's own fencelab_drm.ko
/// (release, SMP, preemption model, module unloading…: what the kernel
/// checks before loading a module). Returns it.
fn check_vermagic(kernel: &Kernel, module: &[u8]) -> Result<String> {
    let in_tree = kernel
        .modules_dir
        .join("kernel")
        .join(DRIVER_DIR)
        .join(MODULE_FILE);
    let reference = fs::read(&in_tree).with_context(|| format!("reading {}", in_tree.display()))?;
    let want = modinfo(&reference, "vermagic")
        .with_context(|| format!("{} has no vermagic", in_tree.display()))?;
    let got = modinfo(module, "vermagic").context("the module built has no vermagic")?;
    if got != want {
        bail!("the module built has vermagic {got:?}, the kernel's modules {want:?}");
    }
    Ok(got)
}

/// A `field=value` entry of a module's `.modinfo` section (NUL-separated).
fn modinfo(module: &[u8], field: &str) -> Option<String> {
    let needle = format!("{field}=");
    module
        .split(|&b| b == 0)
        .find_map(|entry| entry.strip_prefix(needle.as_bytes()))
        .map(|value| String::from_utf8_lossy(value).into_owned())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console;

    /// A console line for every class a bug may expect: the first four as
    /// this kernel printed them in the bugs' boots, the last two in the
    /// kernel's usual format.
    const TITLES: &[(&str, &str)] = &[
        (
            "kasan",
            "[   15.184782] BUG: KASAN: slab-use-after-free in _RNvXs5_NtCs7kwb3qSsk5u_12fencelab_drm3gpuNtB5_3GpuNtNtNtCs1EKtwoKEMO2_6kernel4time7hrtimer15HrTimerCallback3run+0x176/0xf40 [fencelab_drm]",
        ),
        (
            "page-fault",
            "[   18.422272] BUG: unable to handle page fault for address: fffffbfff80561ad",
        ),
        (
            "oops",
            "[   18.425976] Oops: Oops: 0000 [#1] SMP KASAN NOPTI",
        ),
        (
            "sleep-in-atomic",
            "[   12.630975] BUG: sleeping function called from invalid context at kernel/locking/mutex.c:623",
        ),
        (
            "gpf",
            "[   52.119002] Oops: general protection fault, probably for non-canonical address 0xdffffc0000000001: 0000 [#1] SMP KASAN NOPTI",
        ),
        (
            "scheduling-while-atomic",
            "[   13.911111] BUG: scheduling while atomic: swapper/0/0/0x00010002",
        ),
    ];

    #[test]
    fn find_knows_every_bug_and_lists_them_otherwise() {
        for bug in BUGS {
            assert_eq!(find(bug.name).unwrap().name, bug.name);
        }
        let err = format!("{:#}", find("no-such-bug").unwrap_err());
        assert!(err.contains("\"no-such-bug\""), "{err}");
        for bug in BUGS {
            assert!(err.contains(bug.name), "{err}");
        }
    }

    #[test]
    fn names_are_unique_kebab_case_and_the_makefiles() {
        let mut names: Vec<&str> = BUGS.iter().map(|b| b.name).collect();
        for name in &names {
            assert!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{name}"
            );
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), BUGS.len(), "bug names must be unique");

        // The driver's Makefile refuses names it does not list: both lists
        // must be the same.
        let patches = paths::workspace_root().join("guest-driver/patches");
        let mut makefile_list = None;
        for entry in fs::read_dir(&patches).unwrap() {
            let text = fs::read_to_string(entry.unwrap().path()).unwrap();
            if let Some(line) = text
                .lines()
                .find_map(|l| l.strip_prefix("+fencelab_bugs := "))
            {
                makefile_list = Some(line.split_whitespace().map(str::to_owned).collect());
            }
        }
        let mut makefile_list: Vec<String> =
            makefile_list.expect("a patch of the series adds fencelab_bugs to the Makefile");
        makefile_list.sort();
        assert_eq!(makefile_list, names);
    }

    #[test]
    fn every_bug_targets_a_scenario_and_expects_known_splats() {
        for bug in BUGS {
            // The catalogue of DESIGN.md §4, one file a scenario (its
            // completeness is scenario::spec's to test).
            let file = paths::workspace_root()
                .join("scenarios")
                .join(format!("{}.toml", bug.scenario));
            assert!(file.is_file(), "{}: no {}", bug.name, file.display());
            assert!(!bug.summary.is_empty() && !bug.expect_splats.is_empty());
            for class in bug.expect_splats {
                let (_, line) = TITLES
                    .iter()
                    .find(|(c, _)| c == class)
                    .unwrap_or_else(|| panic!("{}: no sample console line for {class}", bug.name));
                let report = console::parse(line);
                let got: Vec<&str> = report.splats.iter().map(|s| s.class).collect();
                assert_eq!(got, [*class], "{line}");
            }
        }
    }

    #[test]
    fn the_key_covers_kernel_bug_and_sources() {
        let sources = vec![
            ("Makefile".to_owned(), b"obj-m".to_vec()),
            ("gpu.rs".to_owned(), b"fn a() {}".to_vec()),
        ];
        let base = module_key("k", "b", &sources);
        assert_eq!(base, module_key("k", "b", &sources));
        assert_eq!(base.len(), 64);
        assert_ne!(base, module_key("k2", "b", &sources));
        assert_ne!(base, module_key("k", "b2", &sources));
        let mut edited = sources.clone();
        edited[1].1.push(b'\n');
        assert_ne!(base, module_key("k", "b", &edited));
        let mut renamed = sources.clone();
        renamed[1].0 = "gpu2.rs".to_owned();
        assert_ne!(base, module_key("k", "b", &renamed));
        assert_ne!(base, module_key("k", "b", &sources[..1]));
    }

    #[test]
    fn sources_are_the_folders_files_in_order() {
        let dir = std::env::temp_dir().join(format!("fencelab-bugs-src-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("gpu.rs"), "g").unwrap();
        assert!(read_sources(&dir).is_err(), "no Makefile: not the driver");
        fs::write(dir.join("Makefile"), "m").unwrap();
        fs::write(dir.join("sub/x.rs"), "x").unwrap();
        let sources = read_sources(&dir).unwrap();
        let names: Vec<&str> = sources.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["Makefile", "gpu.rs"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn modinfo_reads_a_field() {
        let ko = b"\x7fELF\0junk\0license=GPL\0vermagic=7.3.4 SMP preempt mod_unload \0name=x\0";
        assert_eq!(
            modinfo(ko, "vermagic").as_deref(),
            Some("7.3.4 SMP preempt mod_unload ")
        );
        assert_eq!(modinfo(ko, "name").as_deref(), Some("x"));
        assert_eq!(modinfo(ko, "depends"), None);
        assert!(contains(ko, b"license=GPL"));
        assert!(!contains(ko, b"license=MIT"));
    }
}
