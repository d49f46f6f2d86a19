//! The VM's host-side logs (guest console, VMM and backend messages): what a guest can make the
//! host write. The VM's processes write to pipes, never to files; the runtime relays each pipe
//! into a `CappedLog`, which never holds more than its cap: a guest flooding its console (or
//! provoking device warnings) costs the host a bounded file and a pipe's back-pressure, not
//! disk. The relay ends when the process closes the pipe (it exited).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The smallest cap: room for the drop notice and some output after it.
pub const MIN_CAP: u64 = 4096;
/// The drop notice is shorter than this.
const NOTICE_ROOM: u64 = 128;

/// A log file that keeps its newest bytes and stays at most `cap` bytes: when a write would
/// pass the cap, the older part goes and one line at the top says how many bytes went.
pub struct CappedLog {
    file: File,
    /// For error messages.
    path: PathBuf,
    len: u64,
    cap: u64,
    dropped: u64,
}

impl CappedLog {
    /// Creates (or truncates) `path`, 0600: logs may hold what the guest printed.
    pub fn create(path: &Path, cap: u64) -> io::Result<CappedLog> {
        let file = File::options().write(true).read(true).create(true).truncate(true).mode(0o600).open(path)?;
        Ok(CappedLog { file, path: path.into(), len: 0, cap: cap.max(MIN_CAP), dropped: 0 })
    }

    pub fn write(&mut self, mut buf: &[u8]) -> io::Result<()> {
        let half = self.cap / 2;
        if buf.len() as u64 > half {
            let skip = buf.len() - half as usize;
            self.dropped += skip as u64;
            buf = &buf[skip..];
        }
        if self.len + buf.len() as u64 > self.cap {
            self.compact(half)?;
        }
        self.file.write_all_at(buf, self.len)?;
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Keeps the newest bytes (from a line start, where there is one) under a notice, in at
    /// most half the cap, so that the next write of up to half the cap fits.
    fn compact(&mut self, half: u64) -> io::Result<()> {
        let keep = self.len.min(half - NOTICE_ROOM);
        let mut tail = vec![0u8; keep as usize];
        self.file.read_exact_at(&mut tail, self.len - keep)?;
        let start = tail.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
        let tail = &tail[start..];
        self.dropped += self.len - tail.len() as u64;
        let notice = format!("[hull: {} older bytes of this log were dropped to keep it under {} bytes]\n", self.dropped, self.cap);
        self.file.write_all_at(notice.as_bytes(), 0)?;
        self.file.write_all_at(tail, notice.len() as u64)?;
        self.len = (notice.len() + tail.len()) as u64;
        self.file.set_len(self.len)
    }
}

/// Copies `from` into `log` until `from` ends. An error ends the relay with a log line (the
/// process's further output is lost, the process itself unaffected).
pub async fn relay<R: AsyncRead + Unpin>(mut from: R, mut log: CappedLog) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                if let Err(e) = log.write(&buf[..n]) {
                    tracing::error!(path = ?log.path, error = %e, "cannot write a VM log");
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(path = ?log.path, error = %e, "VM log pipe");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_keeps_the_file_under_its_cap_with_the_newest_bytes() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("console.log");
        let mut log = CappedLog::create(&path, 8192).unwrap();
        let mut written = 0u64;
        for i in 0..5000 {
            let line = format!("line {i} {}\n", "x".repeat(i % 50));
            log.write(line.as_bytes()).unwrap();
            written += line.len() as u64;
            assert!(std::fs::metadata(&path).unwrap().len() <= 8192);
        }
        log.write(&[b'y'; 20000]).unwrap();
        log.write(b"\nlast line\n").unwrap();
        let text = String::from_utf8(std::fs::read(&path).unwrap()).unwrap();
        assert!(text.len() <= 8192 && written > 8192);
        assert!(text.starts_with("[hull: ") && text.contains("older bytes of this log were dropped"), "{}", &text[..100]);
        assert!(text.ends_with("\nlast line\n"), "the newest bytes stay");
    }
}
