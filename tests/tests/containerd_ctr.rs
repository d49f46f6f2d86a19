//! containerd -> containerd-shim-hull-v2 -> pod microVM (QEMU here) -> hull-agent -> container,
//! driven with `ctr` as a user would, against a private containerd.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hull_tests::containerd::{Containerd, IMAGE};
use hull_tests::require_containerd;

const RUNTIME: &str = "io.containerd.hull.v2";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn setup() -> Containerd {
    let c = Containerd::start("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]").expect("containerd starts");
    c.import_busybox().expect("image import");
    c
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn ctr_run_output_exit_codes_kill_exec_ps_metrics() {
    require_containerd!();
    let c = setup();

    // Output and exit status through containerd.
    let t = Instant::now();
    let out = c
        .ctr(&["run", "--rm", "--runtime", RUNTIME, IMAGE, "hello", "sh", "-c", "echo hello from $(hostname) on $(uname -r); echo to-stderr >&2; exit 3"])
        .expect("ctr runs");
    eprintln!("ctr run (VM boot + container): {:.2} s", t.elapsed().as_secs_f64());
    assert_eq!(out.status.code(), Some(3), "stdout: {} stderr: {} log: {}", text(&out.stdout), text(&out.stderr), c.log());
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("hello from hello on ") && stdout.trim_end().ends_with("-hull"), "{stdout}");
    assert!(text(&out.stderr).contains("to-stderr"), "{}", text(&out.stderr));
    let out = c.ctr(&["run", "--rm", "--runtime", RUNTIME, IMAGE, "zero", "true"]).expect("ctr runs");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    // The VM is sized from the pod: the default 256 MiB, plus the container's 256 MiB limit.
    // Both runs use one id: the second starts while the first one's shim may still be exiting.
    let mem_total_mib = |args: &[&str]| {
        let mut cmd = vec!["run", "--rm", "--runtime", RUNTIME];
        cmd.extend_from_slice(args);
        cmd.extend_from_slice(&[IMAGE, "sized", "sh", "-c", "grep MemTotal /proc/meminfo"]);
        let out = c.ctr(&cmd).expect("ctr runs");
        let t = text(&out.stdout);
        t.split_whitespace().nth(1).and_then(|kib| kib.parse::<u64>().ok()).map(|kib| kib / 1024).unwrap_or_else(|| panic!("{t} {}", text(&out.stderr)))
    };
    let (plain, limited) = (mem_total_mib(&[]), mem_total_mib(&["--memory-limit", "268435456"]));
    assert!(plain < 256 && limited > 256 && limited - plain > 200, "MemTotal without a limit {plain} MiB, with 256 MiB {limited} MiB");
    assert!(wait_until(Duration::from_secs(10), || c.pod_processes().is_empty()), "VMs left after --rm: {:?}", c.pod_processes());

    // A long-running task: exec (plain and tty), ps, metrics, pause/resume; SIGTERM ends an
    // exec with 143 (a container's PID 1 ignores SIGTERM without a handler, as under runc);
    // SIGKILL ends the task with 137.
    let id = "long";
    let mut run = c
        .ctr_cmd(&["run", "--rm", "--runtime", RUNTIME, IMAGE, id, "sleep", "1000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr run");
    let state = |want: &str| c.ctr(&["tasks", "ls"]).is_ok_and(|o| text(&o.stdout).lines().any(|l| l.starts_with(id) && l.contains(want)));
    assert!(wait_until(Duration::from_secs(120), || state("RUNNING")), "task {id} never ran: {}", c.log());
    let out = c.ctr(&["tasks", "exec", "--exec-id", "e1", id, "sh", "-c", "echo in exec; pidof sleep >/dev/null && echo sees the sleep; exit 5"]).expect("exec");
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "in exec\nsees the sleep\n");
    // With a terminal (script gives ctr the tty it insists on).
    let ctr = format!("{} --address {} --namespace {}", hull_tests::containerd::CTR, c.socket.display(), c.namespace);
    let out = Command::new("script")
        .args(["-qec", &format!("{ctr} tasks exec -t --exec-id e2 {id} sh -c 'tty; stty size'"), "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script");
    let printed = text(&out.stdout);
    assert!(printed.contains("/dev/pts/"), "tty exec: {printed:?} {}", text(&out.stderr));
    let out = c.ctr(&["tasks", "ps", id]).expect("ps");
    let listing = text(&out.stdout);
    let pids: Vec<u32> = listing.lines().skip(1).filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect();
    assert!(!pids.is_empty(), "ps: {listing}");
    let out = c.ctr(&["tasks", "metrics", id]).expect("metrics");
    let metrics = text(&out.stdout);
    assert!(out.status.success() && metrics.contains("memory"), "metrics: {metrics} {}", text(&out.stderr));
    assert!(c.ctr(&["tasks", "pause", id]).unwrap().status.success());
    assert!(state("PAUSED"));
    assert!(c.ctr(&["tasks", "resume", id]).unwrap().status.success());
    assert!(state("RUNNING"));

    let mut exec = c.ctr_cmd(&["tasks", "exec", "--exec-id", "e3", id, "sleep", "1000"]).spawn().expect("exec");
    // Until the exec has started, killing it is refused; then SIGTERM ends it.
    let killed = wait_until(Duration::from_secs(30), || {
        c.ctr(&["tasks", "kill", "-s", "SIGTERM", "--exec-id", "e3", id]).is_ok_and(|o| o.status.success())
    });
    assert!(killed, "the exec never became killable: {}", c.log());
    assert_eq!(exec.wait().expect("exec exits").code(), Some(143), "SIGTERM");

    let out = c.ctr(&["tasks", "kill", "-s", "SIGKILL", id]).expect("kill");
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), c.log());
    assert_eq!(run.wait().expect("ctr run exits").code(), Some(137), "SIGKILL");
    assert!(wait_until(Duration::from_secs(10), || c.pod_processes().is_empty()), "VMs left: {:?}", c.pod_processes());
}

#[test]
fn bad_commands_fail_clearly_and_a_killed_shim_is_cleaned_up() {
    require_containerd!();
    let c = setup();
    let out = c.ctr(&["run", "--rm", "--runtime", RUNTIME, IMAGE, "nocmd", "/no/such/binary"]).expect("ctr runs");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("/no/such/binary"), "{err}");
    assert!(wait_until(Duration::from_secs(10), || c.pod_processes().is_empty()), "VMs left: {:?}", c.pod_processes());

    // The shim dies under a running task: containerd runs `containerd-shim-hull-v2 delete`,
    // which ends the VM.
    let out = c.ctr(&["run", "-d", "--runtime", RUNTIME, IMAGE, "orphan", "sleep", "1000"]).expect("ctr run -d");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!c.pod_processes().is_empty());
    let shim = Command::new("pgrep").args(["-f", &format!("containerd-shim-hull-v2 -namespace {} -id orphan", c.namespace)]).output().expect("pgrep");
    let pid: i32 = text(&shim.stdout).lines().next().and_then(|l| l.trim().parse().ok()).expect("the shim's pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).expect("kill the shim");
    assert!(wait_until(Duration::from_secs(20), || c.pod_processes().is_empty()), "VMs left after the shim died: {:?}\n{}", c.pod_processes(), c.log());
    let out = c.ctr(&["tasks", "ls", "-q"]).expect("ls");
    assert!(!text(&out.stdout).contains("orphan"), "{}", text(&out.stdout));
    let _ = c.ctr(&["containers", "rm", "orphan"]);
}
