//! A container through containerd, hull against runc, in one run on one private containerd
//! with the same locally built busybox image: `ctr run --rm IMAGE ID sh -c 'echo ready'`
//! (pod start, container start, exit, teardown) with `io.containerd.hull.v2` and with
//! `io.containerd.runc.v2`, as a ratio of medians; hull's pod restored from a snapshot against
//! booted (a config with `snapshots = true`, `--runtime-config-path`); plus memory of one idle
//! hull pod (QEMU and backends' RSS, the shim's RSS).
//!
//! Run with `scripts/bench` (root, containerd, QEMU, the guest image).

use std::time::{Duration, Instant};

use hull_tests::containerd::{Containerd, IMAGE};

const ROUNDS: usize = 7;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn rss_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").and_then(|v| v.split_whitespace().next()?.parse().ok()))
        .unwrap_or(0)
}

fn run(c: &Containerd, runtime: &str, id: &str) -> Duration {
    run_with(c, runtime, &[], id)
}

fn run_with(c: &Containerd, runtime: &str, extra: &[&str], id: &str) -> Duration {
    let t = Instant::now();
    let mut args = vec!["run", "--rm", "--runtime", runtime];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, id, "sh", "-c", "echo ready"]);
    let out = c.ctr(&args).expect("ctr runs");
    let took = t.elapsed();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout) == "ready\n", "{runtime}: {}", String::from_utf8_lossy(&out.stderr));
    took
}

/// A smaps_rollup row in KiB ("Anonymous:", "Pss:"), 0 where there is none.
fn rollup_kib(pid: &str, key: &str) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    rollup.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.split_whitespace().next()?.parse().ok())).unwrap_or(0)
}

/// RSS in KiB of each file a process maps (its binary, libc, ...), largest first.
fn file_rss_kib(pid: &str) -> Vec<(String, u64)> {
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

fn main() {
    if let Some(why) = hull_tests::containerd::missing() {
        eprintln!("SKIP containerd bench: {why}");
        return;
    }
    // `cargo bench --bench containerd -- idle` runs only the idle pod's memory row.
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let c = Containerd::start("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]").expect("containerd starts");
    c.import_busybox().expect("image");
    if only.is_empty() || only.iter().any(|a| a != "idle") {
        start_rows(&c);
    }
    idle_pod(&c);
}

/// Pod start: hull against runc, and restored against booted.
fn start_rows(c: &Containerd) {
    // Warm the page cache and both paths once.
    run(c, "io.containerd.runc.v2", "warm-runc");
    run(c, "io.containerd.hull.v2", "warm-hull");
    let mut runc = Vec::new();
    let mut hull = Vec::new();
    for i in 0..ROUNDS {
        runc.push(run(c, "io.containerd.runc.v2", &format!("runc-{i}")));
        hull.push(run(c, "io.containerd.hull.v2", &format!("hull-{i}")));
    }
    let (r, h) = (median(runc), median(hull));
    println!("ctr run --rm (echo), median of {ROUNDS}: hull {:.0} ms, runc {:.0} ms, hull/runc = {:.1}", h.as_secs_f64() * 1e3, r.as_secs_f64() * 1e3, h.as_secs_f64() / r.as_secs_f64());

    // Restored from a snapshot against booted, alternating; the first restored pod makes the
    // snapshot and is not counted.
    let config = c.dir.path().join("hull-snapshots.toml");
    std::fs::write(&config, format!("snapshots = true\nsnapshot_dir = \"{}\"\n", c.dir.path().join("snapshots").display())).expect("hull config");
    let config = config.to_string_lossy().into_owned();
    let snap = ["--runtime-config-path", config.as_str()];
    run_with(c, "io.containerd.hull.v2", &snap, "warm-restored");
    let (mut restored, mut booted) = (Vec::new(), Vec::new());
    for i in 0..ROUNDS {
        restored.push(run_with(c, "io.containerd.hull.v2", &snap, &format!("restored-{i}")));
        booted.push(run(c, "io.containerd.hull.v2", &format!("booted-{i}")));
    }
    let (s, b) = (median(restored), median(booted));
    println!(
        "ctr run --rm (echo), median of {ROUNDS}: hull restored from a snapshot {:.0} ms, booted {:.0} ms, restored/booted = {:.2}, restored/runc = {:.1}",
        s.as_secs_f64() * 1e3,
        b.as_secs_f64() * 1e3,
        s.as_secs_f64() / b.as_secs_f64(),
        s.as_secs_f64() / r.as_secs_f64()
    );

}

/// One idle pod: what it costs in host memory.
fn idle_pod(c: &Containerd) {
    let out = c.ctr(&["run", "-d", "--runtime", "io.containerd.hull.v2", IMAGE, "idle", "sleep", "1000"]).expect("ctr run -d");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_secs(3));
    let pods: Vec<String> = c.pod_processes();
    let mut total = 0;
    for line in &pods {
        let pid = line.split_whitespace().next().unwrap_or("0");
        let kib = rss_kib(pid);
        total += kib;
        let name = line.split_whitespace().nth(1).unwrap_or("?").rsplit('/').next().unwrap_or("?");
        println!("  idle pod process {name:<22} RSS {:>7.1} MiB", kib as f64 / 1024.0);
    }
    let shim = std::process::Command::new("pgrep").args(["-f", &format!("containerd-shim-hull-v2 -namespace {} -id idle", c.namespace)]).output().expect("pgrep");
    let shim_pid = String::from_utf8_lossy(&shim.stdout).lines().next().unwrap_or("0").trim().to_string();
    let shim_kib = rss_kib(&shim_pid);
    println!("idle hull pod (256 MiB guest): VM + backends {:.1} MiB RSS, shim {:.1} MiB RSS", total as f64 / 1024.0, shim_kib as f64 / 1024.0);
    // The shim's RSS split: its own (anonymous) pages, and the binary's and libraries' pages it
    // maps (shared between the shims of all pods, so PSS is the per-pod share).
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "  shim: anonymous {:.1} MiB, file-backed {:.1} MiB, PSS {:.1} MiB, threads {}",
        mib(rollup_kib(&shim_pid, "Anonymous:")),
        mib(rss_kib(&shim_pid).saturating_sub(rollup_kib(&shim_pid, "Anonymous:"))),
        mib(rollup_kib(&shim_pid, "Pss:")),
        std::fs::read_dir(format!("/proc/{shim_pid}/task")).map(|d| d.count()).unwrap_or(0)
    );
    for (file, kib) in file_rss_kib(&shim_pid) {
        println!("    {file:<40} {:>6.2} MiB", mib(kib));
    }
}
