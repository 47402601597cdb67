//! The `newc` cpio format the kernel unpacks into its initramfs
//! (Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Written by hand: it is a 110-byte ASCII header per entry, and owning it
//! lets the archive be reproducible (mtime 0, uid/gid 0, inode numbers in
//! order) so that identical inputs give identical bytes.

use std::io::{self, Write};

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path without a leading `/`, e.g. `bin/busybox`.
    pub name: String,
    /// File type and permission bits (`S_IF* | 0o755`).
    pub mode: u32,
    /// File contents, or the target of a symlink.
    pub data: Vec<u8>,
    /// (major, minor) of a device node.
    pub rdev: (u32, u32),
}

impl Entry {
    pub fn dir(name: &str, perm: u32) -> Entry {
        Entry {
            name: name.to_owned(),
            mode: S_IFDIR | perm,
            data: Vec::new(),
            rdev: (0, 0),
        }
    }
    pub fn file(name: &str, perm: u32, data: Vec<u8>) -> Entry {
        Entry {
            name: name.to_owned(),
            mode: S_IFREG | perm,
            data,
            rdev: (0, 0),
        }
    }
    pub fn symlink(name: &str, target: &str) -> Entry {
        Entry {
            name: name.to_owned(),
            mode: S_IFLNK | 0o777,
            data: target.as_bytes().to_vec(),
            rdev: (0, 0),
        }
    }
    pub fn char_dev(name: &str, perm: u32, major: u32, minor: u32) -> Entry {
        Entry {
            name: name.to_owned(),
            mode: S_IFCHR | perm,
            data: Vec::new(),
            rdev: (major, minor),
        }
    }
}

/// Streams entries in newc format.
pub struct Writer<W: Write> {
    out: W,
    offset: u64,
    next_ino: u32,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Writer {
            out,
            offset: 0,
            next_ino: 1,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - (self.offset % 4) as usize) % 4;
        self.put(&[0u8; 3][..pad])
    }

    fn header(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        size: usize,
        rdev: (u32, u32),
    ) -> io::Result<()> {
        let size = u32::try_from(size)
            .map_err(|_| io::Error::other(format!("{name} is too large for cpio")))?;
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        let mut header = String::with_capacity(110);
        header.push_str(MAGIC);
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad4()
    }

    pub fn add(&mut self, entry: &Entry) -> io::Result<()> {
        let name = entry.name.trim_start_matches('/');
        let nlink = if entry.mode & 0o170000 == S_IFDIR {
            2
        } else {
            1
        };
        self.header(name, entry.mode, nlink, entry.data.len(), entry.rdev)?;
        self.put(&entry.data)?;
        self.pad4()
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header(TRAILER, 0, 1, 0, (0, 0))?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Parses a newc archive (for tests and for checking what was written).
#[cfg_attr(not(test), allow(dead_code))]
pub fn read(mut bytes: &[u8]) -> io::Result<Vec<Entry>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let total = bytes.len();
    let mut entries = Vec::new();
    loop {
        if bytes.len() < 110 || &bytes[..6] != MAGIC.as_bytes() {
            return Err(bad("bad cpio header"));
        }
        let field = |i: usize| -> io::Result<u32> {
            let s = std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i])
                .map_err(|_| bad("non-ASCII header"))?;
            u32::from_str_radix(s, 16).map_err(|_| bad("non-hex header field"))
        };
        let (mode, size, rmaj, rmin, namesize) = (
            field(1)?,
            field(6)? as usize,
            field(9)?,
            field(10)?,
            field(11)? as usize,
        );
        let pos = total - bytes.len();
        let name_end = 110 + namesize;
        if bytes.len() < name_end {
            return Err(bad("truncated name"));
        }
        let name = String::from_utf8_lossy(&bytes[110..name_end - 1]).into_owned();
        let data_start = name_end + (4 - (pos + name_end) % 4) % 4;
        let data_end = data_start + size;
        if bytes.len() < data_end {
            return Err(bad("truncated data"));
        }
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(Entry {
            name,
            mode,
            data: bytes[data_start..data_end].to_vec(),
            rdev: (rmaj, rmin),
        });
        let next = data_end + (4 - (pos + data_end) % 4) % 4;
        bytes = &bytes[next.min(bytes.len())..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let entries = vec![
            Entry::dir("bin", 0o755),
            Entry::file("bin/busybox", 0o755, b"\x7fELF odd length".to_vec()),
            Entry::symlink("bin/sh", "busybox"),
            Entry::dir("dev", 0o755),
            Entry::char_dev("dev/console", 0o600, 5, 1),
            Entry::file("init", 0o755, b"#!/bin/busybox sh\n".to_vec()),
            Entry::file("empty", 0o644, Vec::new()),
        ];
        let mut w = Writer::new(Vec::new());
        for e in &entries {
            w.add(e).unwrap();
        }
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(read(&bytes).unwrap(), entries);
    }

    #[test]
    fn header_layout_matches_the_kernel_format() {
        let mut w = Writer::new(Vec::new());
        w.add(&Entry::char_dev("/dev/console", 0o600, 5, 1))
            .unwrap();
        let bytes = w.finish().unwrap();
        let header = std::str::from_utf8(&bytes[..110]).unwrap();
        assert!(header.starts_with("070701"));
        assert_eq!(&header[14..22], "00002180", "mode S_IFCHR|0600");
        assert_eq!(&header[78..86], "00000005", "rdevmajor");
        assert_eq!(&header[86..94], "00000001", "rdevminor");
        assert_eq!(&header[94..102], "0000000c", "namesize incl. NUL");
        assert_eq!(&bytes[110..122], b"dev/console\0");
    }

    #[test]
    fn identical_inputs_give_identical_bytes() {
        let build = || {
            let mut w = Writer::new(Vec::new());
            w.add(&Entry::file("a", 0o644, b"x".to_vec())).unwrap();
            w.finish().unwrap()
        };
        assert_eq!(build(), build());
    }
}
