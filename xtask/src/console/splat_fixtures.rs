//! The splat parser against real kernel console excerpts: every file in
//! `xtask/tests/splats/` (format in its README) is parsed and must give
//! exactly the splats its header expects.

use super::parse;
use std::path::{Path, PathBuf};

#[derive(Debug, Default)]
struct Expected {
    class: String,
    title: String,
    signature: Option<String>,
    first: Option<String>,
    context: Option<String>,
    includes: Vec<String>,
    excludes: Vec<String>,
}

struct Fixture {
    name: String,
    source: String,
    expected: Vec<Expected>,
    console: String,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/splats")
}

fn load(path: &Path) -> Fixture {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let (header, console) = text
        .split_once("\n# ---\n")
        .unwrap_or_else(|| panic!("{name}: no `# ---` line ends the header"));
    let mut fixture = Fixture {
        name: name.clone(),
        source: String::new(),
        expected: Vec::new(),
        console: console.to_owned(),
    };
    for line in header.lines() {
        let line = line
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{name}: header line without #: {line}"));
        let (key, value) = line
            .split_once(": ")
            .unwrap_or_else(|| panic!("{name}: header line without `key: `: {line}"));
        let value = value.to_owned();
        match key.trim() {
            "source" => fixture.source = value,
            "note" | "cut" => {}
            "expect" => {
                let (class, title) = value
                    .split_once(" | ")
                    .unwrap_or_else(|| panic!("{name}: expect is `CLASS | TITLE`: {value}"));
                fixture.expected.push(Expected {
                    class: class.to_owned(),
                    title: title.to_owned(),
                    ..Expected::default()
                });
            }
            refinement => {
                let expected = fixture
                    .expected
                    .last_mut()
                    .unwrap_or_else(|| panic!("{name}: `{refinement}` before any expect"));
                match refinement {
                    "signature" => expected.signature = Some(value),
                    "first" => expected.first = Some(value),
                    "context" => expected.context = Some(value),
                    "includes" => expected.includes.push(value),
                    "excludes" => expected.excludes.push(value),
                    other => panic!("{name}: unknown header key {other:?}"),
                }
            }
        }
    }
    fixture
}

fn fixtures() -> Vec<Fixture> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
        .expect("xtask/tests/splats exists")
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    paths.sort();
    paths.iter().map(|p| load(p)).collect()
}

#[test]
fn every_fixture_gives_exactly_the_splats_it_expects() {
    let fixtures = fixtures();
    assert!(fixtures.len() >= 20, "only {} fixtures", fixtures.len());
    for fixture in &fixtures {
        let name = &fixture.name;
        assert!(!fixture.source.is_empty(), "{name}: no `# source:` line");
        assert!(!fixture.expected.is_empty(), "{name}: expects nothing");
        let splats = parse(&fixture.console).splats;
        let found: Vec<(&str, &str)> = splats.iter().map(|s| (s.class, s.title.as_str())).collect();
        let wanted: Vec<(&str, &str)> = fixture
            .expected
            .iter()
            .map(|e| (e.class.as_str(), e.title.as_str()))
            .collect();
        assert_eq!(found, wanted, "{name}: classes and titles");
        for (splat, expected) in splats.iter().zip(&fixture.expected) {
            let what = format!("{name}: {}", splat.title);
            if let Some(signature) = &expected.signature {
                assert_eq!(&splat.signature, signature, "{what}: signature");
            }
            if let Some(first) = &expected.first {
                assert_eq!(
                    splat.excerpt.first().map(|l| l.trim()),
                    Some(first.as_str()),
                    "{what}: first excerpt line"
                );
            }
            if let Some(context) = &expected.context {
                assert_eq!(splat.context.as_deref(), Some(context.as_str()), "{what}");
            }
            let excerpt = splat.excerpt.join("\n");
            for text in &expected.includes {
                assert!(
                    excerpt.contains(text.as_str()),
                    "{what}: no {text:?} in\n{excerpt}"
                );
            }
            for text in &expected.excludes {
                assert!(
                    !excerpt.contains(text.as_str()),
                    "{what}: {text:?} in\n{excerpt}"
                );
            }
            assert!(
                !splat.signature.contains("0x") && !splat.signature.contains("ffff"),
                "{what}: an address in the signature {:?}",
                splat.signature
            );
        }
    }
}

#[test]
fn fixtures_cover_every_class_the_brief_names() {
    let classes: Vec<String> = fixtures()
        .into_iter()
        .flat_map(|f| f.expected.into_iter().map(|e| e.class))
        .collect();
    for class in [
        "kasan",
        "bug",
        "warning",
        "oops",
        "gpf",
        "page-fault",
        "panic",
        "lockdep-circular",
        "suspicious-rcu",
        "rcu-stall",
        "hung-task",
        "sleep-in-atomic",
        "refcount",
        "kmemleak",
        "list-corruption",
        "kernel-bug",
    ] {
        assert!(classes.iter().any(|c| c == class), "no fixture for {class}");
        assert!(
            super::splat::class_names().contains(&class),
            "{class} is not a class"
        );
    }
}

fn fixture(name: &str) -> Fixture {
    load(&fixture_dir().join(name))
}

/// The same console text as another boot of the same bug would print it:
/// other addresses, pids, timestamps, offsets, CPU and line numbers.
fn as_another_boot_would_print(console: &str) -> String {
    console
        .replace("ffff888012acfc20", "ffff88800b1d7e48")
        .replace("9489", "211")
        .replace("+0x16a/0x1a0", "+0x17e/0x1b0")
        .replace("[   34.", "[  912.")
        .replace("T2373", "T88")
        .replace("CPU: 0", "CPU: 1")
        .replace("0000000000000004", "0000000000000007")
        .replace("0xdffffc0000000000", "0xdffffc0000000010")
        .replace("+0x1f7/0x560", "+0x1e3/0x560")
        .replace("T6734", "T77")
}

#[test]
fn a_bug_seen_again_has_its_signature_and_other_bugs_do_not() {
    for name in [
        "kasan-slab-use-after-free.log",
        "kasan-slab-out-of-bounds-caller-ids.log",
        "gpf-null-ptr-deref.log",
    ] {
        let original = parse(&fixture(name).console).splats;
        let again = parse(&as_another_boot_would_print(&fixture(name).console)).splats;
        assert_eq!(original.len(), again.len(), "{name}");
        for (a, b) in original.iter().zip(&again) {
            assert_eq!(a.signature, b.signature, "{name}");
        }
        assert_ne!(
            parse(&fixture(name).console).splats[0].excerpt,
            again[0].excerpt,
            "{name}: the rewrite changed nothing, so it proves nothing"
        );
    }

    let uaf = &parse(&fixture("kasan-slab-use-after-free.log").console).splats[0].signature;
    let oob =
        &parse(&fixture("kasan-slab-out-of-bounds-caller-ids.log").console).splats[0].signature;
    assert_ne!(uaf, oob);

    // Every fixture is a different bug (or bugs): no signature may appear in
    // two of them. Within one fixture, the same report printed again (the
    // kernel repeats stalls, leaks, hung tasks) must give one signature.
    let mut owner: std::collections::HashMap<String, String> = Default::default();
    for f in fixtures() {
        for splat in parse(&f.console).splats {
            let first = owner
                .entry(splat.signature.clone())
                .or_insert(f.name.clone());
            assert_eq!(
                first, &f.name,
                "{} and {} share {:?}",
                first, f.name, splat.signature
            );
        }
    }
    for (name, repeated) in [
        (
            "kmemleak.log",
            "kmemleak: unreferenced object in alloc_empty_sheaf",
        ),
        (
            "hung-task-three-tasks.log",
            "hung-task: INFO: task hung in nbd_ioctl",
        ),
        (
            "lkml-null-deref-then-rcu-sched-stalls.log",
            "rcu-stall: rcu: INFO: rcu_sched self-detected stall on CPU",
        ),
        (
            "warning-7x-format-interleaved-cpus.log",
            "warning: WARNING in __ieee80211_beacon_get (net/mac80211/tx.c)",
        ),
    ] {
        let splats = parse(&fixture(name).console).splats;
        let hits = splats.iter().filter(|s| s.signature == repeated).count();
        assert!(hits >= 2, "{name}: {repeated} {hits} times");
    }
}

#[test]
fn windows_line_ends_and_interleaved_user_space_lines_change_nothing() {
    for name in [
        "warning-cut-here-panic-on-warn.log",
        "rcu-preempt-stall-cpu-contexts.log",
        "kernel-bug-lkft-arm64-log-levels.log",
    ] {
        let console = fixture(name).console;
        let plain = parse(&console).splats;
        let crlf = parse(&console.replace('\n', "\r\n")).splats;
        assert_eq!(plain, crlf, "{name}: CRLF");
    }
    // fence-hammer writes to the same serial console: its lines carry no
    // printk caller id or timestamp and must not end or enter a splat that
    // has them.
    for name in [
        "warning-cut-here-panic-on-warn.log",
        "suspicious-rcu-usage.log",
        "sleep-in-atomic-lockdep-warning-lkp.log",
    ] {
        let console = fixture(name).console;
        let noisy: String = console
            .lines()
            .flat_map(|l| [l, "fence-hammer: 1000 fences submitted"])
            .map(|l| format!("{l}\n"))
            .collect();
        let plain = parse(&console).splats;
        let with_noise = parse(&noisy).splats;
        assert_eq!(plain.len(), with_noise.len(), "{name}");
        for (a, b) in plain.iter().zip(&with_noise) {
            assert_eq!(
                (a.class, &a.title, &a.signature),
                (b.class, &b.title, &b.signature),
                "{name}"
            );
            assert_eq!(
                a.excerpt, b.excerpt,
                "{name}: user-space lines in the excerpt"
            );
        }
    }
}
