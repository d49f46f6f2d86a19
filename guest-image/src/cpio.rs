//! A writer for the cpio "newc" format the kernel unpacks as its initramfs, and a lookup of one
//! file in such an archive (for tools that take an image apart).

use std::io::{self, Write};

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";
/// The header: the magic and 13 fields of 8 hex digits.
const HEADER_LEN: usize = 6 + 13 * 8;

/// Entries of an initramfs, written in order (parents before children).
pub struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter { out, ino: 1, written: 0 }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        let namesize = name.len() + 1;
        let header = format!(
            "{MAGIC}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime: fixed, so that the archive is reproducible
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            namesize,
            0, // check
        );
        self.ino += 1;
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..pad])
    }

    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | perm, (0, 0), &[])
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | perm, (0, 0), data)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | perm, (major, minor), &[])
    }

    /// Writes the trailer and returns the sink.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(TRAILER, 0, (0, 0), &[])?;
        Ok(self.out)
    }
}

/// The data of the entry `name` (as written, no leading `/`) in the newc archive `archive`:
/// the first one of that name, None where there is none or the archive ends malformed.
pub fn find<'a>(archive: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let pad4 = |n: usize| (n + 3) & !3;
    let mut at = 0;
    while archive.get(at..at + MAGIC.len())? == MAGIC.as_bytes() {
        // Fields 6 (the data's size) and 11 (the name's, with its NUL).
        let field = |i: usize| usize::from_str_radix(std::str::from_utf8(archive.get(at + 6 + 8 * i..at + 14 + 8 * i)?).ok()?, 16).ok();
        let (size, name_len) = (field(6)?, field(11)?);
        let entry = archive.get(at + HEADER_LEN..(at + HEADER_LEN + name_len).checked_sub(1)?)?;
        let data_at = pad4(at + HEADER_LEN + name_len);
        if entry == name.as_bytes() {
            return archive.get(data_at..data_at.checked_add(size)?);
        }
        if entry == TRAILER.as_bytes() {
            return None;
        }
        at = pad4(data_at.checked_add(size)?);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn find_returns_what_was_written() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/a", 0o755, b"first").unwrap();
        w.file("init", 0o755, b"odd-sized data").unwrap();
        let archive = w.finish().unwrap();
        assert_eq!(find(&archive, "bin/a"), Some(&b"first"[..]));
        assert_eq!(find(&archive, "init"), Some(&b"odd-sized data"[..]));
        assert_eq!(find(&archive, "bin"), Some(&b""[..]));
        assert_eq!(find(&archive, "missing"), None);
        assert_eq!(find(&archive[..archive.len() / 2], "init"), None, "a cut archive");
        assert_eq!(find(b"not a cpio archive", "init"), None);
    }

    #[test]
    fn gnu_cpio_lists_what_was_written() {
        if Command::new("cpio").arg("--version").output().is_err() {
            eprintln!("SKIP cpio test: needs cpio (apt-get install cpio)");
            return;
        }
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("/bin/hello", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.symlink("bin/sh", "hello").unwrap();
        w.dir("dev", 0o755).unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        let archive = w.finish().unwrap();
        assert_eq!(archive.len() % 4, 0);
        let mut child = Command::new("cpio")
            .args(["-itv", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        let out = child.wait_with_output().unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 5, "{listing}");
        assert!(lines[1].starts_with("-rwxr-xr-x") && lines[1].ends_with("bin/hello"), "{listing}");
        assert!(lines[2].starts_with("lrwxrwxrwx") && lines[2].ends_with("bin/sh -> hello"), "{listing}");
        assert!(lines[4].starts_with("crw-------") && lines[4].contains("5,") && lines[4].ends_with("dev/console"), "{listing}");
    }
}
