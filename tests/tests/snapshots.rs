//! Pods restored from a snapshot (config `snapshots = true`, QEMU engine) through CRI, as
//! kubelet runs them: they behave as booted pods, and each is a machine of its own although
//! all were one VM when the snapshot was taken.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use hull_tests::cri::{container_config, fetch, Cri, Pod, HTTPD, HULL_SNAPSHOTS};
use hull_tests::{require_containerd, strip_ansi};

/// The snapshot directories in `store` (one per snapshot; names start with the family).
fn snapshots_in(store: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> =
        std::fs::read_dir(store).map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_dir() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))).collect()).unwrap_or_default();
    out.sort();
    out
}

/// What the guest agent logged when it created the pod's sandbox (its console, in the pod's
/// state directory while the pod runs).
fn sandbox_created_line(pod: &Pod) -> String {
    let console = format!("/run/hull/shim/k8s.io/{}/vm/console.log", pod.id);
    let text = std::fs::read_to_string(&console).unwrap_or_else(|e| panic!("{console}: {e}"));
    text.lines().find(|l| l.contains("sandbox created")).unwrap_or_else(|| panic!("no 'sandbox created' in {console}:\n{text}")).to_string()
}

/// The guest's vsock CID as its agent found it (`vsock_cid=N` in the line above).
fn guest_cid(pod: &Pod) -> u32 {
    let line = sandbox_created_line(pod);
    // The console line is coloured: strip escape sequences before reading the field.
    let plain: String = strip_ansi(&line);
    let at = plain.find("vsock_cid=").unwrap_or_else(|| panic!("no vsock_cid in {plain}"));
    let digits: String = plain[at + 10..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or_else(|_| panic!("no CID in {plain}"))
}

struct Seen {
    container: String,
    hostname: String,
    mac: String,
    random: String,
    clock_skew_s: i64,
    ip: String,
    cid: u32,
}

async fn look_inside(cri: &mut Cri, pod: &Pod) -> Seen {
    let name = &pod.config.hostname;
    let container = cri.start_container(pod, container_config(&format!("{name}-web"), HTTPD, 0)).await;
    let (out, code) = cri.exec(&container, &["sh", "-c", "echo exec in $(hostname); exit 5"]).await;
    assert_eq!((out.as_str(), code), (format!("exec in {name}\n").as_str(), 5), "a restored pod runs commands with their output and exit code");
    let (hostname, _) = cri.exec(&container, &["hostname"]).await;
    let (mac, _) = cri.exec(&container, &["cat", "/sys/class/net/eth0/address"]).await;
    let (random, code) = cri.exec(&container, &["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"]).await;
    assert_eq!(code, 0, "{random}");
    let (guest_now, _) = cri.exec(&container, &["date", "+%s"]).await;
    let host_now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).expect("clock").as_secs() as i64;
    let guest_now: i64 = guest_now.trim().parse().unwrap_or_else(|_| panic!("date in {name}: {guest_now:?}"));
    let ip = cri.pod_ip(pod).await;
    // Guest RAM is the pod's own file, holding what the snapshot held and what the guest has
    // touched since: not the whole 256 MiB (QEMU's load into a memfd backs every page).
    let ram = format!("/run/hull/shim/k8s.io/{}/vm/memory/ram", pod.id);
    let backed_mib = (std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&ram).unwrap_or_else(|e| panic!("{ram}: {e}"))) * 512) >> 20;
    eprintln!("{name}: guest RAM backed on the host: {backed_mib} MiB");
    assert!(backed_mib < 128, "{name}'s restored guest RAM backs {backed_mib} MiB of its 256");
    Seen { container, hostname: hostname.trim().into(), mac: mac.trim().into(), random: random.trim().into(), clock_skew_s: guest_now - host_now, ip, cid: guest_cid(pod) }
}

#[tokio::test(flavor = "multi_thread")]
async fn restored_pods_are_machines_of_their_own() {
    require_containerd!();
    let mut cri = Cri::start().await.expect("containerd with CRI starts");
    let store = cri.snapshot_config("").expect("hull config");

    // The first pod makes the snapshot (a template VM booted, its vsock ejected, saved), then
    // is restored from it like every later one.
    let a = cri.run_pod("snap-a", HULL_SNAPSHOTS).await;
    let made = snapshots_in(&store);
    assert_eq!(made.len(), 1, "one snapshot made: {made:?}\n{}", cri.containerd.log());
    let (state, memory) = (made[0].join("state"), made[0].join("memory"));
    let data = std::fs::metadata(&memory).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap_or(0);
    assert!(data > 8 << 20, "a snapshot holds the guest's memory: {memory:?} has {data} bytes of data");
    eprintln!("snapshot: state {} KiB, memory {} KiB of data", std::fs::metadata(&state).map(|m| m.len()).unwrap_or(0) >> 10, data >> 10);
    let saved_at = std::fs::metadata(&state).and_then(|m| m.modified()).expect("snapshot mtime");

    // Long enough after the save that a guest clock left as saved would be seconds behind.
    let since = SystemTime::now().duration_since(saved_at).unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(since)).await;
    let b = cri.run_pod("snap-b", HULL_SNAPSHOTS).await;
    assert_eq!(snapshots_in(&store), made, "the second pod is restored from the same snapshot");
    assert_eq!(cri.qemu_vms(), 2, "{:?}", cri.pod_processes());

    let seen_a = look_inside(&mut cri, &a).await;
    let seen_b = look_inside(&mut cri, &b).await;
    for (seen, name) in [(&seen_a, "snap-a"), (&seen_b, "snap-b")] {
        assert_eq!(seen.hostname, name, "each pod has its own hostname");
        assert!(seen.clock_skew_s.abs() <= 2, "{name}'s clock is {} s off the host's after the restore", seen.clock_skew_s);
        assert!(seen.cid > 2, "{name}'s vsock CID {}", seen.cid);
    }
    assert_ne!(seen_a.mac, seen_b.mac, "two restored pods have different MACs");
    assert_ne!(seen_a.random, seen_b.random, "two restored pods draw different random numbers");
    assert_ne!(seen_a.cid, seen_b.cid, "two restored pods have different vsock CIDs");
    // Pod networking: each serves, the other fetches, over CNI's bridge.
    assert_eq!(fetch(&mut cri, &seen_a.container, &seen_b.ip).await, "hello from snap-b\n");
    assert_eq!(fetch(&mut cri, &seen_b.container, &seen_a.ip).await, "hello from snap-a\n");

    // Another kernel: the snapshot it did not make is refused (removed, never loaded) and a
    // new one made; the pod is restored from that.
    let kernel = cri.containerd.dir.path().join("other-vmlinux");
    std::fs::copy(hull_tests::guest_image_dir().join("vmlinux"), &kernel).expect("copy the kernel");
    // Bytes past the ELF's segments: the same kernel boots, but it is another file.
    std::fs::OpenOptions::new().append(true).open(&kernel).and_then(|mut f| std::io::Write::write_all(&mut f, b"another build")).expect("append");
    cri.snapshot_config(&format!("kernel = \"{}\"", kernel.display())).expect("hull config");
    let c = cri.run_pod("snap-c", HULL_SNAPSHOTS).await;
    let remade = snapshots_in(&store);
    assert_eq!(remade.len(), 1, "the other kernel's snapshot replaces the first: {remade:?}");
    assert_ne!(remade, made, "a snapshot made by another kernel is not used");
    let record = std::fs::read_to_string(remade[0].join("made.json")).expect("made.json");
    let sha = hull_tests::sha256_hex(&std::fs::read(&kernel).expect("kernel"));
    assert!(record.contains(&sha), "the new snapshot records the kernel that made it ({sha}): {record}");
    let made_by: serde_json::Value = serde_json::from_str(&record).expect("made.json is JSON");
    assert_eq!(made_by["root"], "image", "restored pods map the root image, as booted ones do: {record}");
    let c1 = cri.start_container(&c, container_config("c1", &["sleep", "1000"], 0)).await;
    let (out, code) = cri.exec(&c1, &["sh", "-c", "echo restored; exit 3"]).await;
    assert_eq!((out.as_str(), code), ("restored\n", 3));

    // A snapshot QEMU cannot load (its state garbled): the pod boots instead, keeps no copy
    // of the snapshot's memory, and the snapshot is removed for the next pod to remake.
    std::fs::write(remade[0].join("state"), b"not a migration stream").expect("garble the state");
    let d = cri.run_pod("snap-d", HULL_SNAPSHOTS).await;
    let d1 = cri.start_container(&d, container_config("d1", &["sleep", "1000"], 0)).await;
    let (out, code) = cri.exec(&d1, &["sh", "-c", "echo booted; exit 4"]).await;
    assert_eq!((out.as_str(), code), ("booted\n", 4));
    let log = cri.containerd.log();
    let ready = log.lines().find(|l| l.contains("pod VM ready") && l.contains(&d.id)).map(strip_ansi);
    assert!(ready.as_deref().is_some_and(|l| l.contains("restored=false")), "snap-d must have booted: {ready:?}\n{log}");
    assert!(log.contains("cannot restore the pod VM from a snapshot"), "the failed restore is logged:\n{log}");
    let ram = format!("/run/hull/shim/k8s.io/{}/vm/memory/ram", d.id);
    assert!(!std::path::Path::new(&ram).exists(), "a booted pod keeps no copy of the snapshot's memory: {ram}");
    assert!(snapshots_in(&store).is_empty(), "the snapshot QEMU could not load is removed: {:?}", snapshots_in(&store));

    // Restored, every one of them, not booted (a restore that fails falls back to a boot).
    let log = cri.containerd.log();
    for pod in [&a, &b, &c] {
        let ready = log.lines().find(|l| l.contains("pod VM ready") && l.contains(&pod.id)).map(strip_ansi);
        eprintln!("{}", ready.as_deref().unwrap_or("no ready line"));
        assert!(ready.as_deref().is_some_and(|l| l.contains("restored=true")), "pod {} was not restored from the snapshot: {ready:?}\n{log}", pod.id);
    }
    for line in log.lines().filter(|l| l.contains("snapshot") || l.contains("pod VM")) {
        eprintln!("{}", strip_ansi(line));
    }

    for pod in [&a, &b, &c, &d] {
        cri.remove_pod(pod).await;
    }
    let left = cri.wait_no_pod_processes(Duration::from_secs(20)).await;
    assert!(left.is_ok(), "VMs left after the pods were removed: {left:?}\n{}", cri.containerd.log());
    // Each restored guest ended in order when its pod was removed: it answered DestroySandbox
    // (or powered off), and none had to be killed without.
    let log = cri.containerd.log();
    let killed: Vec<String> = log.lines().filter(|l| l.contains("did not power off")).map(strip_ansi).collect();
    assert!(killed.is_empty(), "pod VMs that did not power off when their pods were removed: {killed:?}");
}
