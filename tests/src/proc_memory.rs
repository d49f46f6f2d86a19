//! A process's memory as /proc shows it, for the benches' memory rows. A process that is gone
//! (or a row it does not have) reads as 0.

use std::fmt::Display;

/// The first number of the line starting with `row` in `text` ("VmRSS:   123 kB" -> 123).
fn row_kib(text: &str, row: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(row).and_then(|v| v.split_whitespace().next()?.parse().ok())).unwrap_or(0)
}

/// A KiB row of /proc/PID/status ("VmRSS:", "RssShmem:").
pub fn status_kib(pid: impl Display, row: &str) -> u64 {
    row_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default(), row)
}

/// A KiB row of /proc/PID/smaps_rollup ("Rss:", "Pss:", "Anonymous:").
pub fn rollup_kib(pid: impl Display, row: &str) -> u64 {
    row_kib(&std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default(), row)
}

/// RSS in KiB of each file a process maps (its binary, libc, ...) by file name, largest first.
pub fn file_rss_kib(pid: impl Display) -> Vec<(String, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut by_file: std::collections::BTreeMap<String, u64> = Default::default();
    let mut file = None;
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first().is_some_and(|f| f.contains('-') && !f.ends_with(':')) {
            file = fields.get(5).filter(|p| p.starts_with('/')).map(|p| p.rsplit('/').next().unwrap_or(p).to_string());
        } else if let (Some(f), Some(&"Rss:")) = (&file, fields.first()) {
            *by_file.entry(f.clone()).or_default() += fields.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    let mut v: Vec<(String, u64)> = by_file.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1));
    v
}
