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
use hull_tests::proc_memory::{file_rss_kib, rollup_kib, status_kib};

const ROUNDS: usize = 7;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
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

fn main() {
    if let Some(why) = hull_tests::containerd::missing() {
        eprintln!("SKIP containerd bench: {why}");
        return;
    }
    // `cargo bench --bench containerd -- idle` runs only the idle pod's memory row.
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let c = Containerd::start("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]").expect("containerd starts");
    c.import_busybox().expect("image");
    // `-- timeline`: where one restored and one booted pod spend their time (the shim's log
    // and the restored guest's console), no ratios.
    if only.iter().any(|a| a == "timeline") {
        timeline(&c);
        return;
    }
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

/// One pod restored from a snapshot and one booted, each with the lines its shim logged, and the
/// restored pod's console and VMM log (kept by `debug_console`).
fn timeline(c: &Containerd) {
    let config = c.dir.path().join("hull-timeline.toml");
    std::fs::write(&config, format!("debug_console = true\nsnapshots = true\nsnapshot_dir = \"{}\"\n", c.dir.path().join("snapshots").display())).expect("hull config");
    let config = config.to_string_lossy().into_owned();
    let snap = ["--runtime-config-path", config.as_str()];
    run_with(c, "io.containerd.hull.v2", &snap, "warm-restored");
    let before = c.log().len();
    let took = run_with(c, "io.containerd.hull.v2", &snap, "timeline-restored");
    let log = hull_tests::strip_ansi(&c.log()[before..]);
    println!("restored, ctr run --rm took {took:?}:\n{log}");
    for (file, text) in hull_tests::containerd::kept_pod_logs(&log) {
        println!("--- the restored pod's {file} ---\n{text}");
    }
    let before = c.log().len();
    let took = run(c, "io.containerd.hull.v2", "timeline-booted");
    println!("booted, ctr run --rm took {took:?}:\n{}", hull_tests::strip_ansi(&c.log()[before..]));
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
        let kib = status_kib(pid, "VmRSS:");
        total += kib;
        let name = line.split_whitespace().nth(1).unwrap_or("?").rsplit('/').next().unwrap_or("?");
        println!("  idle pod process {name:<22} RSS {:>7.1} MiB", kib as f64 / 1024.0);
    }
    let shim = std::process::Command::new("pgrep").args(["-f", &format!("containerd-shim-hull-v2 -namespace {} -id idle", c.namespace)]).output().expect("pgrep");
    let shim_pid = String::from_utf8_lossy(&shim.stdout).lines().next().unwrap_or("0").trim().to_string();
    let shim_kib = status_kib(&shim_pid, "VmRSS:");
    println!("idle hull pod (256 MiB guest): VM + backends {:.1} MiB RSS, shim {:.1} MiB RSS", total as f64 / 1024.0, shim_kib as f64 / 1024.0);
    // The shim's RSS split: its own (anonymous) pages, and the binary's and libraries' pages it
    // maps (shared between the shims of all pods, so PSS is the per-pod share).
    let mib = |k: u64| k as f64 / 1024.0;
    let anonymous = rollup_kib(&shim_pid, "Anonymous:");
    println!(
        "  shim: anonymous {:.1} MiB, file-backed {:.1} MiB, PSS {:.1} MiB, threads {}",
        mib(anonymous),
        mib(shim_kib.saturating_sub(anonymous)),
        mib(rollup_kib(&shim_pid, "Pss:")),
        std::fs::read_dir(format!("/proc/{shim_pid}/task")).map(|d| d.count()).unwrap_or(0)
    );
    for (file, kib) in file_rss_kib(&shim_pid) {
        println!("    {file:<40} {:>6.2} MiB", mib(kib));
    }
}
