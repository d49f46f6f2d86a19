//! The VM boundary against a hostile tenant: each test does what a tenant who owns a pod's
//! containers (or its whole guest) would do, through containerd and a real guest (QEMU here),
//! and checks that it gets nothing past the VM.

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use hull_runtime::pod::state::PodDir;
use hull_tests::containerd::IMAGE;
use hull_tests::require_containerd;
use hull_tests::scenario::{self, text, wait_until, RUNTIME};

/// The agent's API and stdio ports (hull_proto).
const AGENT_PORTS: [u32; 3] = [hull_proto::AGENT_VSOCK_PORT, hull_proto::STDIO_VSOCK_PORT, hull_proto::FORWARD_VSOCK_PORT];

/// The host side of a running pod is root's alone: its state directory and every level above
/// it to /run/hull are 0700, the sockets that reach the VM's agent or its devices, the shim's
/// task API and the logs of what the guest printed 0600.
fn owner_only(c: &hull_tests::containerd::Containerd, id: &str) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::symlink_metadata(p).map(|m| m.permissions().mode() & 0o7777).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    // The shim wrote its address into the bundle.
    let bundle = c.dir.path().join("state/io.containerd.runtime.v2.task").join(&c.namespace).join(id);
    let address = std::fs::read_to_string(bundle.join("address")).expect("the shim's address in the bundle");
    let shim_socket = Path::new(address.trim().trim_start_matches("unix://"));
    assert_eq!(mode(shim_socket), 0o600, "{} drives the pod: owner-only", shim_socket.display());
    let pod = PodDir::new(&c.namespace, id);
    let vm = pod.vm();
    for dir in [Path::new("/run/hull"), Path::new("/run/hull/shim"), pod.path().parent().expect("namespace dir"), pod.path(), vm.path()] {
        assert_eq!(mode(dir), 0o700, "{} must be owner-only", dir.display());
    }
    assert_eq!(mode(&vm.vsock()), 0o600, "{} reaches the agent: owner-only", vm.vsock().display());
    // Every other socket (QEMU's vhost-user devices) and log (the guest console) too; not the
    // `vsock.sock_<port>` listeners, which are whoever serves that host port (here the test).
    // The jail's root is the one exception: root's, read-only to the jailed processes that
    // must traverse it, inside the owner-only VM directory.
    let ours = |e: &std::fs::DirEntry| !e.file_name().to_string_lossy().starts_with("vsock.sock_") && e.path() != vm.jail_root();
    let entries = std::fs::read_dir(vm.path()).expect("read the VM directory").chain(std::fs::read_dir(vm.run()).expect("read the socket directory"));
    for entry in entries.flatten().filter(ours) {
        assert_eq!(mode(&entry.path()) & 0o077, 0, "{} must be owner-only", entry.path().display());
    }
    let root = std::fs::metadata(vm.jail_root()).expect("the jail's root");
    use std::os::unix::fs::MetadataExt;
    assert_eq!((root.uid(), mode(&vm.jail_root()) & 0o022), (0, 0), "the jail's root is root's and no one else writes it");
}

/// An ordinary container (default capabilities, not privileged) dials the agent's ports at
/// every CID that could end at the agent: 1 (the guest's loopback), 2 (the host), 3 (its own
/// CID) and ANY. None may connect. A host port the test listens on must connect, so that the
/// refusals are the boundary's, not a container without vsock.
#[test]
fn a_container_cannot_reach_the_agent_over_vsock() {
    require_containerd!();
    let dial = hull_tests::probe::guest_program("vsock_dial");
    let c = scenario::containerd();
    let id = "dialer";
    let mount = format!("type=bind,src={},dst=/dial,options=rbind:ro", dial.display());
    let out = c.ctr(&["run", "-d", "--runtime", RUNTIME, "--mount", &mount, IMAGE, id, "sleep", "1000"]).expect("ctr run");
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), c.log());

    // The host's side of the pod's hybrid vsock: a guest connecting to CID 2 port P reaches
    // `<vsock socket>_P`.
    let host_port = 5005;
    let listen_at = format!("{}_{host_port}", PodDir::new(&c.namespace, id).vm().vsock().display());
    let listener = UnixListener::bind(&listen_at).expect("listen on the pod's host vsock port");
    // A host service serving guests gives its socket to the pod's jail uid, the owner of the
    // socket directory (README): the VM process that connects for the guest is unprivileged on
    // QEMU.
    use std::os::unix::fs::MetadataExt;
    let run = std::fs::metadata(PodDir::new(&c.namespace, id).vm().run()).expect("the VM's socket directory");
    std::os::unix::fs::chown(&listen_at, Some(run.uid()), Some(run.gid())).expect("chown the listener");
    let accepted = std::thread::spawn(move || listener.accept().is_ok());

    let mut targets: Vec<String> = vec![format!("2:{host_port}")];
    for cid in [1, 2, 3, u32::MAX] {
        targets.extend(AGENT_PORTS.iter().map(|port| format!("{cid}:{port}")));
    }
    let mut args = vec!["tasks", "exec", "--exec-id", "dial", id, "/dial"];
    args.extend(targets.iter().map(String::as_str));
    let out = c.ctr(&args).expect("ctr exec");
    let printed = text(&out.stdout);
    assert!(out.status.success(), "{printed}\n{}\n{}", text(&out.stderr), c.log());
    assert!(printed.lines().any(|l| l == format!("2:{host_port} connected")), "the container's vsock reaches the host's listener: {printed}");
    assert!(accepted.join().expect("accept thread"), "the host listener accepted the container's connection");
    for target in &targets[1..] {
        let line = printed.lines().find(|l| l.starts_with(&format!("{target} "))).unwrap_or_else(|| panic!("no line for {target}: {printed}"));
        assert!(line.starts_with(&format!("{target} refused")), "a container reached the agent: {line}\n{printed}");
    }

    owner_only(&c, id);

    scenario::end_tasks(&c, &[id]);
}

/// Guest root (a privileged container that mounts the pod's virtio-fs share, as any tenant
/// owning its guest can) plants symlinks where the shim will create the next containers'
/// directories (`<share>/next/mounts`, `<share>/next2`), pointing at host directories, and
/// writes to its read-only volume through every route it has (the container's mount and the
/// share). Then two containers join its pod, one with a bind-mounted volume. Nothing may
/// appear in or be mounted on the host directories, the read-only volume's host file must be
/// unchanged, and the next containers still get their volume.
#[test]
fn guest_root_cannot_steer_host_paths_or_write_readonly_volumes() {
    require_containerd!();
    let c = scenario::containerd();
    let host = tempfile::tempdir().expect("tempdir");
    let (target, target2, readonly, volume) = (host.path().join("target"), host.path().join("target2"), host.path().join("readonly"), host.path().join("volume"));
    for d in [&target, &target2, &readonly, &volume] {
        std::fs::create_dir(d).expect("host dir");
    }
    std::fs::write(readonly.join("file"), "host").expect("host file");
    std::fs::write(volume.join("hello"), "volume").expect("volume file");

    let ro_mount = format!("type=bind,src={},dst=/ro,options=rbind:ro", readonly.display());
    let out = c.ctr(&["run", "-d", "--privileged", "--runtime", RUNTIME, "--mount", &ro_mount, IMAGE, "evil", "sleep", "1000"]).expect("ctr run");
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), c.log());
    let attack = format!(
        "mkdir -p /mnt/share && mount -t virtiofs hull /mnt/share && echo mounted-share
         mkdir /mnt/share/next && ln -s {t} /mnt/share/next/mounts && echo planted-next
         ln -s {t2} /mnt/share/next2 && echo planted-next2
         for f in /mnt/share/evil/mounts/*/file; do echo guest > $f && echo wrote-through-share; done
         echo guest > /ro/file && echo wrote-in-container
         true",
        t = target.display(),
        t2 = target2.display()
    );
    let out = c.ctr(&["tasks", "exec", "--exec-id", "attack", "evil", "sh", "-c", &attack]).expect("ctr exec");
    let printed = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(printed.contains("mounted-share"), "guest root mounts the share (the attack's first step): {printed}");

    let vol_mount = format!("type=bind,src={},dst=/data,options=rbind", volume.display());
    let joins = ["--annotation", "io.kubernetes.cri.sandbox-id=evil"];
    let mut runs = Vec::new();
    for (id, mount) in [("next", Some(&vol_mount)), ("next2", None)] {
        let mut args = vec!["run", "-d", "--runtime", RUNTIME];
        args.extend(joins);
        if let Some(m) = mount {
            args.extend(["--mount", m.as_str()]);
        }
        args.extend([IMAGE, id, "sleep", "1000"]);
        runs.push((id, c.ctr(&args).expect("ctr run")));
    }

    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    for dir in [&target, &target2] {
        let entries: Vec<_> = std::fs::read_dir(dir).expect("read host dir").flatten().map(|e| e.file_name()).collect();
        assert!(entries.is_empty(), "the guest steered the shim into {}: {entries:?}\nattack: {printed}", dir.display());
        assert!(!mountinfo.contains(&dir.display().to_string()), "something is mounted in {}:\n{mountinfo}", dir.display());
    }
    assert_eq!(std::fs::read_to_string(readonly.join("file")).expect("host file"), "host", "a read-only volume was written from the guest: {printed}");
    let (_, next) = &runs[0];
    assert!(next.status.success(), "the next container in the pod: {}\n{}", text(&next.stderr), c.log());
    let out = c.ctr(&["tasks", "exec", "--exec-id", "read", "next", "cat", "/data/hello"]).expect("ctr exec");
    assert_eq!(text(&out.stdout), "volume", "the next container's volume: {}", text(&out.stderr));

    // The pod's own container last: the pod ends with it.
    for id in ["next2", "next", "evil"] {
        let _ = c.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
        wait_until(Duration::from_secs(30), || c.ctr(&["tasks", "delete", id]).is_ok_and(|o| o.status.success()) || c.ctr(&["tasks", "ls", "-q"]).is_ok_and(|o| !text(&o.stdout).lines().any(|l| l == id)));
        let _ = c.ctr(&["containers", "rm", id]);
    }
    assert!(wait_until(Duration::from_secs(20), || c.pod_processes().is_empty()), "left: {:?}", c.pod_processes());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mountinfo.contains(&host.path().display().to_string()), "mounts left on the host dirs:\n{mountinfo}");
    assert!(!mountinfo.contains(&format!("/run/hull/shim/{}/", c.namespace)), "pod mounts left:\n{mountinfo}");
}

/// A VM process taken over by its guest (QEMU or a device backend, as the jail's uid, in its
/// jail) owns the VM's socket directory, its `/run`, and swaps the hybrid vsock socket the shim
/// dials for a symbolic link to a host socket of its choosing (here the test's; another pod's
/// agent would do). The shim's next connection (an exec's stdio) must not follow it: nothing
/// reaches the host socket, the exec fails, and the pod still ends cleanly.
#[test]
fn a_vm_process_cannot_point_the_shim_at_another_socket() {
    require_containerd!();
    let c = scenario::containerd();
    let id = "redirected";
    let out = c.ctr(&["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "1000"]).expect("ctr run");
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), c.log());

    let host = tempfile::tempdir().expect("tempdir");
    let trap = host.path().join("trap.sock");
    let listener = UnixListener::bind(&trap).expect("listen on the trap socket");
    // Accepts and hangs up (a shim that followed the link must not wait for a reply forever);
    // the test's own connection after the exec ends it.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done_seen = done.clone();
    let trapped = std::thread::spawn(move || {
        let mut reached = 0;
        while let Ok((stream, _)) = listener.accept() {
            drop(stream);
            if done_seen.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            reached += 1;
        }
        reached
    });

    // An unprivileged jailed process of the pod, and the pod's jail uid it runs as.
    let (jailed, uid, gid) = scenario::unprivileged_vm_process(&c);
    let swap = std::process::Command::new("nsenter")
        .args(["--target", &jailed, "--mount", "--setuid", &uid, "--setgid", &gid, "--", "/usr/bin/ln", "-sfn"])
        .arg(&trap)
        .arg("/run/vsock.sock")
        .output()
        .expect("nsenter");
    assert!(swap.status.success(), "the jail's uid replaces its socket (the attack's first step): {}", text(&swap.stderr));
    let vsock = PodDir::new(&c.namespace, id).vm().vsock();
    assert!(std::fs::symlink_metadata(&vsock).expect("the VM's socket").file_type().is_symlink(), "{} is now a link", vsock.display());

    let out = c.ctr(&["tasks", "exec", "--exec-id", "probe", id, "true"]).expect("ctr exec");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = std::os::unix::net::UnixStream::connect(&trap);
    let reached = trapped.join().expect("trap thread");
    assert_eq!(reached, 0, "the shim followed the VM's link to a host socket");
    assert!(!out.status.success(), "an exec through a redirected socket cannot have run: {}", text(&out.stdout));

    scenario::end_tasks(&c, &[id]);
}

/// A VM process taken over by its guest writes what it can to the one host directory it owns,
/// its `/run` (the VM's `run/`): a large file, then names without end. Both stop at the pod's
/// small tmpfs (`RUN_TMPFS`), not at the size of the host's `/run`, and the pod works on.
#[test]
fn a_vm_process_cannot_fill_the_hosts_run() {
    require_containerd!();
    let c = scenario::containerd();
    let id = "filler";
    let out = c.ctr(&["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "1000"]).expect("ctr run");
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), c.log());
    let (jailed, uid, gid) = scenario::unprivileged_vm_process(&c);
    let as_jailed = |script: &str| {
        std::process::Command::new("nsenter")
            .args(["--target", &jailed, "--mount", "--setuid", &uid, "--setgid", &gid, "--", "/usr/bin/sh", "-c", script])
            .output()
            .expect("nsenter")
    };
    let run = PodDir::new(&c.namespace, id).vm().path().join("run");

    // 64 MiB: far below the host's /run here, far above what a pod's sockets need.
    let fill = as_jailed("/usr/bin/yes | /usr/bin/head -c 67108864 > /run/fill");
    let size = std::fs::metadata(run.join("fill")).map(|m| m.len()).unwrap_or(0);
    assert!(!fill.status.success() && text(&fill.stderr).contains("No space left"), "a VM process wrote {size} bytes to the host: {}", text(&fill.stderr));
    assert!(size <= 1 << 20, "a VM process stored {size} bytes in the host's {}", run.display());

    let names = as_jailed("i=0; while [ $i -lt 20000 ]; do : > /run/n$i || exit 1; i=$((i+1)); done");
    let count = std::fs::read_dir(&run).map(|d| d.count()).unwrap_or(0);
    assert!(!names.status.success() && count < 20000, "a VM process made {count} names in the host's {}: {}", run.display(), text(&names.stderr));

    let out = c.ctr(&["tasks", "exec", "--exec-id", "after", id, "echo", "still-here"]).expect("ctr exec");
    assert_eq!(text(&out.stdout), "still-here\n", "the pod works on: {}", text(&out.stderr));
    scenario::end_tasks(&c, &[id]);
}

/// Two pods' VM processes run as two uids (each pod leases its own from `jail_uid`'s range),
/// each with the pod uid's process limit: a guest that takes over its QEMU can neither signal
/// the other pod's processes nor use up the processes the other's uid may have.
#[test]
fn pods_do_not_share_a_jail_uid() {
    require_containerd!();
    let c = scenario::containerd();
    for id in ["uid-a", "uid-b"] {
        let out = c.ctr(&["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "1000"]).expect("ctr run");
        assert!(out.status.success(), "{}\n{}", text(&out.stderr), c.log());
    }
    let mut uids = std::collections::BTreeMap::new();
    for line in c.pod_processes().iter().filter(|l| l.contains(" jail --root ")) {
        let child = scenario::jailed_child(line.split_whitespace().next().unwrap_or_default()).unwrap_or_default();
        let uid = scenario::real_id(&child, "Uid:");
        let pod = ["uid-a", "uid-b"].into_iter().find(|p| line.contains(&format!("/{p}/vm/root")));
        if let (Some(pod), false) = (pod, uid == "0" || uid == "?") {
            uids.entry(pod).or_insert_with(std::collections::BTreeSet::new).insert(uid);
        }
    }
    assert_eq!(uids.len(), 2, "both pods have unprivileged VM processes: {uids:?}\n{:?}", c.pod_processes());
    assert!(uids.values().all(|u| u.len() == 1), "one uid per pod: {uids:?}");
    assert!(uids["uid-a"].is_disjoint(&uids["uid-b"]), "two pods share a jail uid: {uids:?}");
    // Their limits, namespaces and the rest of the jail.
    scenario::every_vm_process_is_jailed(&c);

    scenario::end_tasks(&c, &["uid-a", "uid-b"]);
}

/// A pod id comes from an annotation anyone creating a container can set; it names the pod's
/// state directory. One that climbs out of the state root is refused by name, and nothing is
/// created where it points.
#[test]
fn a_pod_id_annotation_cannot_leave_the_state_root() {
    require_containerd!();
    let c = scenario::containerd();
    let outside = tempfile::tempdir().expect("tempdir");
    let escape = outside.path().join("escape");
    let pod = format!("../../../..{}", escape.display());
    let annotation = format!("io.kubernetes.cri.sandbox-id={pod}");
    let out = c.ctr(&["run", "--rm", "--runtime", RUNTIME, "--annotation", &annotation, IMAGE, "climber", "true"]).expect("ctr run");
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a container whose pod id climbs out of the state root ran: {err}");
    assert!(err.contains("is not a valid identifier") && err.contains(&pod), "the error names the bad pod id: {err}");
    assert!(!escape.exists(), "the shim created {} from the annotation", escape.display());
    let _ = c.ctr(&["containers", "rm", "climber"]);
    assert!(c.pod_processes().is_empty(), "left: {:?}", c.pod_processes());
}

/// Guest root writes over the root image every pod of the host maps (`scenario::root_image_write`).
#[test]
fn guest_root_cannot_write_the_root_image_every_pod_maps() {
    require_containerd!();
    scenario::root_image_write(&scenario::containerd());
}

/// Guest root floods the VM's serial console: the host keeps at most the configured cap of it
/// (`vm_log_kib`), the newest output under a line saying how much was dropped, and the guest
/// is not stopped by the cap.
#[test]
fn a_guest_flooding_its_console_leaves_a_capped_host_log() {
    require_containerd!();
    let c = scenario::containerd();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("hull.toml");
    std::fs::write(&config, "vm_log_kib = 16\n").expect("config");
    let config = config.to_string_lossy().into_owned();
    let id = "flood";
    let out = c.ctr(&["run", "-d", "--privileged", "--runtime", RUNTIME, "--runtime-config-path", &config, IMAGE, id, "sleep", "1000"]).expect("ctr run");
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), c.log());
    // ~400 KB through the emulated UART, 25 times the cap.
    let flood = "i=0; while [ $i -lt 4000 ]; do echo \"flood $i ..........................................................................................\"; i=$((i+1)); done >/dev/ttyS0; echo flood-end >/dev/ttyS0; echo flooded";
    let out = c.ctr(&["tasks", "exec", "--exec-id", "flood", id, "sh", "-c", flood]).expect("ctr exec");
    assert_eq!(text(&out.stdout), "flooded\n", "the flood ran: {}", text(&out.stderr));
    let console = PodDir::new(&c.namespace, id).vm().console();
    let kept = || std::fs::read(&console).unwrap_or_else(|e| panic!("{}: {e}", console.display()));
    assert!(wait_until(Duration::from_secs(10), || text(&kept()).contains("flood-end")), "the newest output reaches the log");
    let log = kept();
    assert!(log.len() <= 16 * 1024, "the console log holds {} bytes, over its 16 KiB cap", log.len());
    assert!(text(&log).starts_with("[hull: ") && text(&log).contains("older bytes of this log were dropped"), "{}", text(&log[..200.min(log.len())]));
    let out = c.ctr(&["tasks", "exec", "--exec-id", "after", id, "echo", "still-here"]).expect("ctr exec");
    assert_eq!(text(&out.stdout), "still-here\n", "the guest runs on after the cap");
    let _ = c.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
    wait_until(Duration::from_secs(30), || c.ctr(&["tasks", "delete", id]).is_ok_and(|o| o.status.success()));
    let _ = c.ctr(&["containers", "rm", id]);
    assert!(wait_until(Duration::from_secs(20), || c.pod_processes().is_empty()), "left: {:?}", c.pod_processes());
}

/// A guest keeps every file it has looked up in its cache until it chooses to forget it, and
/// the host's virtio-fs backend holds a host file open for each: an ordinary container creating
/// files without end would pin host files, and the host memory behind them, without bound.
/// With `vm_open_files` the backend stops at its limit, the guest is told "Too many open
/// files", and the pod recovers once the guest forgets (here: deletes) them.
#[test]
fn a_container_creating_files_without_end_pins_a_bounded_number_of_host_files() {
    require_containerd!();
    const LIMIT: usize = 256;
    const FILES: usize = 2000;
    let c = scenario::containerd();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("hull.toml");
    std::fs::write(&config, format!("vm_open_files = {LIMIT}\n")).expect("config");
    let config = config.to_string_lossy().into_owned();
    let id = "files";
    let out = c.ctr(&["run", "-d", "--runtime", RUNTIME, "--runtime-config-path", &config, IMAGE, id, "sleep", "1000"]).expect("ctr run");
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), c.log());
    // The process serving the share: QEMU's `hull-vmm vhost-user fs` backend, or hull-vmm itself.
    let server = c
        .pod_processes()
        .iter()
        .find(|p| p.contains("hull-vmm") && (p.contains(" fs ") || p.contains(" boot ")))
        .and_then(|p| p.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| panic!("no process serves the share: {:?}", c.pod_processes()));
    let open_files = || std::fs::read_dir(format!("/proc/{server}/fd")).map(|d| d.count()).unwrap_or_else(|e| panic!("fds of {server}: {e}"));

    let flood = format!("mkdir /flood && cd /flood && i=0; while [ $i -lt {FILES} ]; do echo -n > f$i || break; i=$((i+1)); done; echo created $i");
    let out = c.ctr(&["tasks", "exec", "--exec-id", "flood", id, "sh", "-c", &flood]).expect("ctr exec");
    let (said, complained) = (text(&out.stdout), text(&out.stderr));
    let created: usize = said.trim().strip_prefix("created ").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("the flood ran: {said} {complained}"));
    let held = open_files();
    assert!(held <= LIMIT, "the share's server holds {held} files open after the guest created {created}, over its limit of {LIMIT}");
    assert!(created < FILES, "the guest created all {FILES} files: nothing bounded it");
    assert!(complained.contains("Too many open files"), "the guest is told why: {complained}");

    // Deleting them makes the guest forget them; the host closes them and the pod goes on. At
    // the limit nothing that needs a new host file works (listing a directory, starting a
    // program): the shell unlinks them by name with busybox's in-process rm, the one whose
    // creation failed too (the host created it before it ran out of files for its inode).
    let clean = format!("i=0; while [ $i -le {created} ]; do rm -f /flood/f$i; i=$((i+1)); done; rmdir /flood && echo cleaned");
    let out = c.ctr(&["tasks", "exec", "--exec-id", "clean", id, "sh", "-c", &clean]).expect("ctr exec");
    assert_eq!(text(&out.stdout), "cleaned\n", "{}", text(&out.stderr));
    assert!(wait_until(Duration::from_secs(10), || open_files() < LIMIT / 2), "the host still holds {} files after the guest forgot them", open_files());
    let out = c.ctr(&["tasks", "exec", "--exec-id", "after", id, "sh", "-c", "echo > /again && echo still-here"]).expect("ctr exec");
    assert_eq!(text(&out.stdout), "still-here\n", "the pod works on: {}", text(&out.stderr));
    let _ = c.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
    wait_until(Duration::from_secs(30), || c.ctr(&["tasks", "delete", id]).is_ok_and(|o| o.status.success()));
    let _ = c.ctr(&["containers", "rm", id]);
    assert!(wait_until(Duration::from_secs(20), || c.pod_processes().is_empty()), "left: {:?}", c.pod_processes());
}

/// A tenant who owns the guest kernel owns the agent's vsock ports too. Here the guest's /init
/// is `hostile-agent` (tests/src/bin): the real agent behind a proxy that answers every
/// GetOOMEvent at once, forever, with an OOM kill of a container that is not in the pod. The
/// pod must work on, containerd must see no OOM event, and the shim must ask at most ten times
/// a second (it counts what it drops, in its log, instead of logging each).
#[test]
fn a_guest_reporting_oom_kills_of_containers_not_in_its_pod_is_neither_believed_nor_heard_without_end() {
    require_containerd!();
    let c = scenario::containerd();
    let dir = tempfile::tempdir().expect("tempdir");
    let initramfs = dir.path().join("hostile.cpio");
    hostile_initramfs(&initramfs);
    let config = dir.path().join("hull.toml");
    // debug_console: the console is kept when the pod ends, to count every answer.
    std::fs::write(&config, format!("image = \"\"\ninitramfs = \"{}\"\ndebug_console = true\n", initramfs.display())).expect("config");
    let config = config.to_string_lossy().into_owned();
    let events_out = dir.path().join("events");
    let mut events = c
        .ctr_cmd(&["events"])
        .stdout(std::fs::File::create(&events_out).expect("events file"))
        .spawn()
        .expect("ctr events");

    let id = "liar";
    let out = c.ctr(&["run", "-d", "--runtime", RUNTIME, "--runtime-config-path", &config, IMAGE, id, "sleep", "1000"]).expect("ctr run");
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), c.log());
    let pod = PodDir::new(&c.namespace, id);
    let console = pod.vm().console();
    let counted = |console: &Path| {
        let log = std::fs::read(console).unwrap_or_default();
        text(&log).lines().filter_map(|l| l.split("hostile-agent: oom answer ").nth(1)?.trim().parse::<u64>().ok()).max().unwrap_or(0)
    };
    let answers = || counted(&console);
    assert!(wait_until(Duration::from_secs(30), || answers() >= 5), "the shim never asked the hostile guest for OOM events: {}", text(&std::fs::read(&console).unwrap_or_default()));
    let (first, since) = (answers(), std::time::Instant::now());
    std::thread::sleep(Duration::from_secs(5));
    let (asked, secs) = (answers() - first, since.elapsed().as_secs_f64());
    assert!(asked as f64 <= 12.0 * secs, "the shim asked {asked} times in {secs:.1} s: a guest answering at once is heard without end");
    let out = c.ctr(&["tasks", "exec", "--exec-id", "after", id, "echo", "still-here"]).expect("ctr exec");
    assert_eq!(text(&out.stdout), "still-here\n", "the pod works on through the hostile guest: {}", text(&out.stderr));

    let _ = c.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
    assert!(wait_until(Duration::from_secs(30), || c.ctr(&["tasks", "delete", id]).is_ok_and(|o| o.status.success())), "{}", c.log());
    let _ = c.ctr(&["containers", "rm", id]);
    let _ = events.kill();
    let _ = events.wait();
    let seen = text(&std::fs::read(&events_out).expect("events"));
    assert!(seen.contains("/tasks/exit"), "ctr events saw the task's events: {seen}");
    assert!(!seen.contains("/tasks/oom"), "containerd was told of an OOM kill the guest made up: {seen}");
    let (log, told) = (c.log(), counted(&pod.kept_console()));
    let _ = std::fs::remove_file(pod.kept_console());
    let _ = std::fs::remove_file(pod.kept_vmm_log());
    assert!(told >= first, "the kept console counts every answer ({told}, {first} before)");
    let warned = log.lines().filter(|l| l.contains("OOM event for a container not in this pod dropped") && l.contains("not-in-this-pod")).count();
    assert!(warned >= 1, "the shim says what it dropped: {log}");
    assert!(warned <= told.ilog2() as usize + 1, "{warned} log lines for {told} dropped events: the guest writes the host's log without end");
    assert!(wait_until(Duration::from_secs(20), || c.pod_processes().is_empty()), "left: {:?}", c.pod_processes());
}

/// The guest image's initramfs with `hostile-agent` as /init, the real agent (the image's
/// /init) as /hostile/hull-agent, and the libraries `hostile-agent` links: a second cpio
/// archive appended to the first, whose entries the kernel unpacks over the first's.
fn hostile_initramfs(dest: &Path) {
    let image = std::fs::read(hull_tests::guest_image_dir().join("initramfs.cpio")).expect("the guest image's initramfs");
    let agent = hull_guest_image::cpio::find(&image, "init").expect("the guest image's /init");
    let hostile = Path::new(env!("CARGO_BIN_EXE_hostile-agent"));
    let mut cpio = hull_guest_image::cpio::CpioWriter::new(Vec::new());
    cpio.dir("hostile", 0o755).expect("cpio");
    cpio.file("hostile/hull-agent", 0o755, agent).expect("cpio");
    cpio.file("init", 0o755, &std::fs::read(hostile).expect("hostile-agent")).expect("cpio");
    let ldd = std::process::Command::new("ldd").arg(hostile).output().expect("ldd");
    let mut dirs: Vec<String> = Vec::new();
    for lib in text(&ldd.stdout).split_whitespace().filter(|w| w.starts_with('/')) {
        let name = lib.trim_start_matches('/');
        let mut at = String::new();
        for part in Path::new(name).parent().into_iter().flat_map(|p| p.iter()) {
            at = if at.is_empty() { part.to_string_lossy().into_owned() } else { format!("{at}/{}", part.to_string_lossy()) };
            if !dirs.contains(&at) {
                cpio.dir(&at, 0o755).expect("cpio");
                dirs.push(at.clone());
            }
        }
        cpio.file(name, 0o755, &std::fs::read(lib).unwrap_or_else(|e| panic!("{lib}: {e}"))).expect("cpio");
    }
    let mut bytes = image;
    bytes.extend(cpio.finish().expect("cpio"));
    std::fs::write(dest, bytes).expect("write the hostile initramfs");
}
