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
const AGENT_PORTS: [u32; 2] = [hull_proto::AGENT_VSOCK_PORT, hull_proto::STDIO_VSOCK_PORT];

/// The host side of a running pod is root's alone: its state directory and every level above
/// it to /run/hull are 0700, the sockets that reach the VM's agent 0600.
fn owner_only(pod: &PodDir) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::symlink_metadata(p).map(|m| m.permissions().mode() & 0o7777).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let vm = pod.vm();
    for dir in [Path::new("/run/hull"), Path::new("/run/hull/shim"), pod.path().parent().expect("namespace dir"), pod.path(), vm.path()] {
        assert_eq!(mode(dir), 0o700, "{} must be owner-only", dir.display());
    }
    assert_eq!(mode(&vm.vsock()), 0o600, "{} reaches the agent: owner-only", vm.vsock().display());
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

    owner_only(&PodDir::new(&c.namespace, id));

    let _ = c.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
    assert!(wait_until(Duration::from_secs(30), || c.ctr(&["tasks", "delete", id]).is_ok_and(|o| o.status.success())), "{}", c.log());
    let _ = c.ctr(&["containers", "rm", id]);
    assert!(wait_until(Duration::from_secs(10), || c.pod_processes().is_empty()), "left: {:?}", c.pod_processes());
}
