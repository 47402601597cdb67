//! Extracts `include/uapi/drm/fencelab_drm.h` from the kernel patch series
//! (`guest-driver/patches/`) and writes what it defines, as Rust constants,
//! to `$OUT_DIR/fencelab_drm_h.rs`: every `#define DRM_FENCELAB_*` value,
//! every `DRM_IOCTL_FENCELAB_*` request number and, for every
//! `struct drm_fencelab_*`, its size and the offset of each field (C layout
//! rules, x86_64). `src/fencelab_uapi.rs` checks its hand-written mirror
//! against these at compile time, so the header and the mirror cannot drift
//! apart unnoticed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::PathBuf;

const HEADER: &str = "include/uapi/drm/fencelab_drm.h";

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let patches = manifest.join("../../guest-driver/patches");
    let series = patches.join("series");
    println!("cargo::rerun-if-changed={}", series.display());

    let text =
        fs::read_to_string(&series).unwrap_or_else(|e| panic!("reading {}: {e}", series.display()));
    let mut header = None;
    for name in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let path = patches.join(name);
        println!("cargo::rerun-if-changed={}", path.display());
        let patch =
            fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        if let Some(h) = new_file_from_patch(&patch, HEADER) {
            header = Some(h);
        }
    }
    let header =
        header.unwrap_or_else(|| panic!("no patch in {} creates {HEADER}", series.display()));

    let defines = defines(&header);
    let structs = structs(&header);
    let mut out = String::new();
    for (name, value) in &defines {
        writeln!(out, "pub const {name}: u64 = {value:#x};").unwrap();
    }
    for (name, layout) in &structs {
        let upper = name.to_uppercase();
        writeln!(out, "pub const SIZEOF_{upper}: usize = {};", layout.size).unwrap();
        for (field, offset) in &layout.offsets {
            writeln!(
                out,
                "pub const OFFSETOF_{upper}_{}: usize = {offset};",
                field.to_uppercase()
            )
            .unwrap();
        }
    }
    for (ioctl, (nr, strukt)) in ioctls(&header) {
        let nr = defines
            .get(&nr)
            .unwrap_or_else(|| panic!("{ioctl}: unknown ioctl number {nr}"));
        let size = structs
            .get(&strukt)
            .unwrap_or_else(|| panic!("{ioctl}: unknown struct {strukt}"))
            .size;
        // _IOWR('d', DRM_COMMAND_BASE + nr, struct): dir 3, size, type 'd', nr.
        let request = (3u64 << 30) | ((size as u64) << 16) | ((b'd' as u64) << 8) | (0x40 + nr);
        writeln!(out, "pub const {ioctl}: u64 = {request:#x};").unwrap();
    }
    let dest = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"))
        .join("fencelab_drm_h.rs");
    fs::write(&dest, out).unwrap_or_else(|e| panic!("writing {}: {e}", dest.display()));
}

/// The content of `file` as created by `patch` (a `git format-patch` mail),
/// if the patch creates it.
fn new_file_from_patch(patch: &str, file: &str) -> Option<String> {
    let marker = format!("+++ b/{file}");
    let start = patch.lines().position(|l| l == marker)?;
    let mut out = String::new();
    for line in patch.lines().skip(start + 1) {
        if line.starts_with("@@") {
            continue;
        }
        match line.strip_prefix('+') {
            Some(content) => {
                out.push_str(content);
                out.push('\n');
            }
            None => break,
        }
    }
    Some(out)
}

/// Removes `/* ... */` comments.
fn strip_comments(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("/*") {
        out.push_str(&rest[..start]);
        match rest[start..].find("*/") {
            Some(end) => rest = &rest[start + end + 2..],
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

/// `#define DRM_FENCELAB_* <integer or (a << b)>`.
fn defines(header: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in strip_comments(header).lines() {
        let Some(rest) = line.trim().strip_prefix("#define") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(name), value) = (words.next(), words.collect::<Vec<_>>().join(" ")) else {
            continue;
        };
        if !name.starts_with("DRM_FENCELAB_") {
            continue;
        }
        out.insert(
            name.to_owned(),
            eval(&value)
                .unwrap_or_else(|| panic!("{HEADER}: cannot evaluate #define {name} {value}")),
        );
    }
    out
}

/// Evaluates `0x10`, `16` or `(1 << 4)`.
fn eval(expr: &str) -> Option<u64> {
    let expr = expr
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .trim();
    if let Some((a, b)) = expr.split_once("<<") {
        return Some(eval(a)? << eval(b)?);
    }
    match expr.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => expr.parse().ok(),
    }
}

/// Size and field offsets of a struct.
struct Layout {
    size: usize,
    offsets: Vec<(String, usize)>,
}

/// Every `struct drm_fencelab_* { <__u32|__s32|__u64|__s64> name; ... };`.
fn structs(header: &str) -> BTreeMap<String, Layout> {
    let text = strip_comments(header);
    let mut out = BTreeMap::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("struct drm_fencelab_") {
        rest = &rest[start + "struct ".len()..];
        let name_end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(0);
        let name = &rest[..name_end];
        let after = rest[name_end..].trim_start();
        if !after.starts_with('{') {
            continue; // a use of the struct, not its definition
        }
        let body_end = after
            .find("};")
            .unwrap_or_else(|| panic!("{HEADER}: struct {name} not closed"));
        let (mut offset, mut align) = (0usize, 1usize);
        let mut offsets = Vec::new();
        for field in after[1..body_end]
            .split(';')
            .map(str::trim)
            .filter(|f| !f.is_empty())
        {
            let (ty, field_name) = field
                .split_once(char::is_whitespace)
                .unwrap_or_else(|| panic!("{HEADER}: struct {name}: cannot read field {field:?}"));
            let size = match ty {
                "__u32" | "__s32" => 4,
                "__u64" | "__s64" => 8,
                _ => panic!("{HEADER}: struct {name}: field type {ty} not supported by build.rs"),
            };
            offset = offset.next_multiple_of(size);
            offsets.push((field_name.trim().to_owned(), offset));
            offset += size;
            align = align.max(size);
        }
        out.insert(
            name.to_owned(),
            Layout {
                size: offset.next_multiple_of(align),
                offsets,
            },
        );
        rest = &after[body_end..];
    }
    out
}

/// `DRM_IOCTL_FENCELAB_X = DRM_IOWR(DRM_COMMAND_BASE + DRM_FENCELAB_X, struct drm_fencelab_x)`
/// as (ioctl, (number define, struct)).
fn ioctls(header: &str) -> BTreeMap<String, (String, String)> {
    let text = strip_comments(header)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let mut out = BTreeMap::new();
    for part in text.split("DRM_IOCTL_FENCELAB_").skip(1) {
        let Some((suffix, rhs)) = part.split_once(" = DRM_IOWR(DRM_COMMAND_BASE + ") else {
            continue;
        };
        let (nr, rest) = rhs
            .split_once(',')
            .unwrap_or_else(|| panic!("{HEADER}: cannot read DRM_IOCTL_FENCELAB_{suffix}"));
        let strukt = rest
            .trim()
            .strip_prefix("struct ")
            .and_then(|s| s.split(')').next())
            .unwrap_or_else(|| panic!("{HEADER}: cannot read DRM_IOCTL_FENCELAB_{suffix}"));
        out.insert(
            format!("DRM_IOCTL_FENCELAB_{suffix}"),
            (nr.trim().to_owned(), strukt.trim().to_owned()),
        );
    }
    out
}
