//! Kubernetes' view, hull against runc in one run on one private containerd (CRI plugin, CNI
//! bridge, the locally built busybox image):
//! - pod start: RunPodSandbox -> CreateContainer -> StartContainer returned, p50 over PODS pods;
//! - shim memory per pod, RSS and PSS: containerd-shim-hull-v2 vs containerd-shim-runc-v2;
//! - host memory of the idle pods (each runtime's 11, a `sleep` each): the PSS of each shim and
//!   every process under it, per pod;
//! - TCP throughput between two pods of the same runtime on the bridge (busybox nc, MiB moved
//!   in one exec, minus an empty exec's time);
//! - small request/reply latency: ROUND_TRIPS sequential connect + "ping" + "pong" in one exec.
//!
//! Each line prints both and the ratio hull/runc. Run with `scripts/bench`.

use std::time::{Duration, Instant};

use hull_tests::proc_memory::rollup_kib;
use hull_tests::cri::{container_config, Cri, Pod, HULL, HULL_SNAPSHOTS, RUNC};

const PODS: usize = 10;
const MIB: usize = 32;
const ROUND_TRIPS: usize = 20;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A process's memory in KiB: (RSS, PSS). RSS counts every page it maps, the binary's and
/// libc's shared ones whole; PSS divides each page among the processes that map it, so the
/// PSS of N shims summed is what N pods' shims take together.
fn rss_pss_kib(pid: &str) -> (u64, u64) {
    (rollup_kib(pid, "Rss:"), rollup_kib(pid, "Pss:"))
}

/// The pids of the running shims whose command line matches `pattern`.
fn shims(pattern: &str) -> Vec<String> {
    let out = std::process::Command::new("pgrep").args(["-f", pattern]).output().expect("pgrep");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// Mean RSS and PSS in MiB of the running shims whose command line matches `pattern`.
fn shim_memory_mib(pattern: &str) -> (f64, f64, usize) {
    let pids = shims(pattern);
    let (rss, pss) = pids.iter().map(|p| rss_pss_kib(p)).fold((0, 0), |(r, p), (r1, p1)| (r + r1, p + p1));
    let n = pids.len().max(1) as f64;
    (rss as f64 / 1024.0 / n, pss as f64 / 1024.0 / n, pids.len())
}

/// PSS in KiB of process `pid` and every process under it.
fn tree_pss_kib(pid: &str) -> u64 {
    let mut total = rss_pss_kib(pid).1;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        total += children.split_whitespace().map(tree_pss_kib).sum::<u64>();
    }
    total
}

/// The host memory of the pods whose shims match `pattern`, in MiB per pod: the PSS of each
/// shim and every process under it (for hull the jails, the VMM and its backends; for runc
/// the pause and container processes), so what pods share is counted once.
fn pods_memory_mib(pattern: &str) -> (f64, usize) {
    let pids = shims(pattern);
    let total: u64 = pids.iter().map(|p| tree_pss_kib(p)).sum();
    (total as f64 / 1024.0 / pids.len().max(1) as f64, pids.len())
}

async fn start_pod(cri: &mut Cri, name: &str, handler: &str, cmd: &[&str]) -> (Pod, String, Duration) {
    let t = Instant::now();
    let pod = cri.run_pod(name, handler).await;
    let id = cri.start_container(&pod, container_config("c", cmd, 0)).await;
    (pod, id, t.elapsed())
}

async fn timed_exec(cri: &mut Cri, id: &str, cmd: &str) -> Duration {
    let t = Instant::now();
    let (out, code) = cri.exec(id, &["sh", "-c", cmd]).await;
    assert_eq!(code, 0, "{cmd}: {out}");
    t.elapsed()
}

/// (MiB/s, per round trip) between a client and a server pod of `handler`.
async fn network(cri: &mut Cri, handler: &str) -> (f64, Duration) {
    // The bulk listener's stdin is a pipe that stays open: busybox's nc ends a connection when
    // its stdin ends, and a container's stdin is /dev/null (the client got 1 KiB through, and
    // the bench timed an exec that moved nothing). It counts what it received.
    let server_cmd = ["sh", "-c", "nc -ll -p 5002 -e echo pong & sleep 1000000 | nc -l -p 5001 | wc -c > /received"];
    let (server, server_id, _) = start_pod(cri, &format!("{handler}-server"), handler, &server_cmd).await;
    let (client, client_id, _) = start_pod(cri, &format!("{handler}-client"), handler, &["sleep", "100000"]).await;
    let ip = cri.pod_ip(&server).await;
    // Wait for the listeners, and warm both paths.
    let ready = format!("for i in $(seq 100); do echo ping | nc {ip} 5002 | grep -q pong && exit 0; sleep 0.2; done; exit 1");
    timed_exec(cri, &client_id, &ready).await;
    let empty = timed_exec(cri, &client_id, "true").await;
    let bulk = timed_exec(cri, &client_id, &format!("dd if=/dev/zero bs=64k count={} 2>/dev/null | nc {ip} 5001", MIB * 16)).await;
    // Every byte arrived (the listener has written its count once the connection ended).
    let count = "for i in $(seq 100); do [ -s /received ] && cat /received && exit 0; sleep 0.1; done; exit 1";
    let (received, code) = cri.exec(&server_id, &["sh", "-c", count]).await;
    assert_eq!((code, received.trim()), (0, (MIB << 20).to_string().as_str()), "{handler}: bytes the server received of {MIB} MiB");
    let rr = timed_exec(cri, &client_id, &format!("for i in $(seq {ROUND_TRIPS}); do echo ping | nc {ip} 5002 | grep -q pong || exit 1; done")).await;
    let loops = timed_exec(cri, &client_id, &format!("for i in $(seq {ROUND_TRIPS}); do echo ping | grep -q ping || exit 1; done")).await;
    for p in [&server, &client] {
        cri.remove_pod(p).await;
    }
    assert!(bulk > empty * 2, "{handler}: moving {MIB} MiB took {bulk:?}, an empty exec {empty:?}: the transfer is lost in the exec's noise");
    let rate = MIB as f64 / (bulk - empty).as_secs_f64();
    // The same loop without the network (the pipeline's processes alone) is subtracted.
    (rate, rr.saturating_sub(loops) / ROUND_TRIPS as u32)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    if let Some(why) = hull_tests::containerd::missing() {
        eprintln!("SKIP cri bench: {why}");
        return;
    }
    let mut cri = Cri::start().await.expect("containerd with CRI starts");

    // Pod start, alternating runtimes; the first pod of each warms caches and is not counted.
    let mut starts = [Vec::new(), Vec::new()];
    let mut pods = Vec::new();
    for i in 0..=PODS {
        for (k, handler) in [HULL, RUNC].into_iter().enumerate() {
            let (pod, _, took) = start_pod(&mut cri, &format!("{handler}-{i}"), handler, &["sleep", "100000"]).await;
            if i > 0 {
                starts[k].push(took);
            }
            pods.push(pod);
        }
    }
    let (h, r) = (median(starts[0].clone()), median(starts[1].clone()));
    println!("pod start (RunPodSandbox..StartContainer), p50 of {PODS}: hull {:.0} ms, runc {:.0} ms, hull/runc = {:.1}", ms(h), ms(r), ms(h) / ms(r));
    let (hull_rss, hull_pss, hull_n) = shim_memory_mib("containerd-shim-hull-v2 -namespace k8s.io");
    let (runc_rss, runc_pss, runc_n) = shim_memory_mib("containerd-shim-runc-v2 -namespace k8s.io");
    println!(
        "shim memory per pod: RSS hull {hull_rss:.1} MiB ({hull_n} shims), runc {runc_rss:.1} MiB ({runc_n} shims), hull/runc = {:.2}; PSS hull {hull_pss:.1} MiB, runc {runc_pss:.1} MiB, hull/runc = {:.2}",
        hull_rss / runc_rss,
        hull_pss / runc_pss
    );
    // Idle: the guests have given back what they freed since boot (free page reports come
    // about 2 s after the memory was freed).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (hull_pods, n) = pods_memory_mib("containerd-shim-hull-v2 -namespace k8s.io");
    let (runc_pods, _) = pods_memory_mib("containerd-shim-runc-v2 -namespace k8s.io");
    println!("host memory of {n} idle pods of each runtime (PSS of each shim and every process under it), per pod: hull {hull_pods:.1} MiB, runc {runc_pods:.1} MiB, hull/runc = {:.1}", hull_pods / runc_pods);
    for p in &pods {
        cri.remove_pod(p).await;
    }

    // Pods restored from a snapshot against booted ones, alternating, each removed before the
    // next; the first restored pod makes the snapshot and is not counted.
    let mut starts = [Vec::new(), Vec::new()];
    for i in 0..=PODS {
        for (k, handler) in [HULL_SNAPSHOTS, HULL].into_iter().enumerate() {
            let (pod, _, took) = start_pod(&mut cri, &format!("{handler}-again-{i}"), handler, &["sleep", "100000"]).await;
            if i > 0 {
                starts[k].push(took);
            }
            cri.remove_pod(&pod).await;
        }
    }
    let (restored, cold) = (median(starts[0].clone()), median(starts[1].clone()));
    println!(
        "pod start (RunPodSandbox..StartContainer), p50 of {PODS}: hull restored from a snapshot {:.0} ms, hull booted {:.0} ms, restored/booted = {:.2}, restored/runc = {:.1}",
        ms(restored),
        ms(cold),
        ms(restored) / ms(cold),
        ms(restored) / ms(r)
    );

    let (hull_rate, hull_rr) = network(&mut cri, HULL).await;
    let (runc_rate, runc_rr) = network(&mut cri, RUNC).await;
    println!("TCP throughput pod->pod ({MIB} MiB, busybox nc): hull {hull_rate:.1} MiB/s, runc {runc_rate:.1} MiB/s, hull/runc = {:.3}", hull_rate / runc_rate);
    println!(
        "request/reply pod->pod (connect + ping/pong, {ROUND_TRIPS} rounds): hull {:.2} ms, runc {:.2} ms, hull/runc = {:.1}",
        ms(hull_rr),
        ms(runc_rr),
        ms(hull_rr) / ms(runc_rr)
    );
}
