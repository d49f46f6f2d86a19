//! hull-agent on the host, driven through its ttrpc API and stdio streams, running real
//! containers (namespaces, cgroups, pivot_root) from a busybox rootfs.

use hull_proto::stdio::StreamKind;
use hull_tests::*;

#[tokio::test(flavor = "multi_thread")]
async fn stdout_stderr_and_exit_codes() {
    require_prerequisites!();
    let agent = TestAgent::start().await.expect("agent starts");
    let id = unique_id("exit3");
    let out = agent
        .run(&id, &agent.spec(&["sh", "-c", "echo out; echo err >&2; exit 3"]))
        .await
        .expect("container runs");
    assert_eq!((out.status, out.stdout.as_str(), out.stderr.as_str()), (3, "out\n", "err\n"));
    agent.remove(&id).await.expect("remove");

    let id = unique_id("exit0");
    let out = agent.run(&id, &agent.spec(&["true"])).await.expect("container runs");
    assert_eq!(out.status, 0);
    agent.remove(&id).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread")]
async fn signals_give_shell_exit_statuses() {
    require_prerequisites!();
    let agent = TestAgent::start().await.expect("agent starts");
    let id = unique_id("signals");
    agent.create(&id, &agent.spec(&["sleep", "1000"]), stdio(false, false, false)).await.expect("create");
    agent.start(&id).await.expect("start");

    // An exec'd process is not its pid namespace's init, so SIGTERM's default action applies.
    agent.exec(&id, "term", &oci_process(&["sleep", "1000"], false), stdio(false, false, false)).await.expect("exec");
    // Signalled once it runs `sleep`, not while the process that starts it still runs.
    sleeping(&agent, &id, 2).await;
    agent.signal(&id, "term", libc::SIGTERM, false).await.expect("SIGTERM");
    assert_eq!(agent.wait(&id, "term").await.expect("wait").exit_status, 143);

    let (code, msg) = rpc_error(&agent.signal(&id, "term", libc::SIGTERM, false).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
    assert!(msg.contains("already exited"), "{msg}");

    agent.signal(&id, "", libc::SIGKILL, false).await.expect("SIGKILL");
    assert_eq!(agent.wait(&id, "").await.expect("wait").exit_status, 137);
    agent.remove(&id).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread")]
async fn env_cwd_user_hostname_and_own_pid_namespace() {
    require_prerequisites!();
    let agent = TestAgent::start().await.expect("agent starts");
    let id = unique_id("identity");
    let mut spec = agent.spec(&["sh", "-c", "echo $FOO; pwd; id -u; id -g; id -G; hostname; echo $$"]);
    spec["process"]["env"] = serde_json::json!(["FOO=bar baz", "PATH=/bin"]);
    spec["process"]["cwd"] = serde_json::json!("/home/user");
    spec["process"]["user"] = serde_json::json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 20]});
    spec["hostname"] = serde_json::json!("box-1");
    let out = agent.run(&id, &spec).await.expect("runs");
    assert_eq!(out.stdout, "bar baz\n/home/user\n1000\n1000\n1000 10 20\nbox-1\n1\n", "stderr: {}", out.stderr);
    assert_eq!(out.status, 0);
    agent.remove(&id).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread")]
async fn readonly_rootfs_refuses_writes_and_masked_paths_are_empty() {
    require_prerequisites!();
    let agent = TestAgent::start().await.expect("agent starts");
    std::fs::write(agent.rootfs.join("etc/secret"), "top secret\n").expect("write secret");
    let id = unique_id("readonly");
    let mut spec = agent.spec(&["sh", "-c", "cat /etc/secret; echo cat=$?; touch /newfile; echo touch=$?"]);
    spec["root"]["readonly"] = serde_json::json!(true);
    spec["linux"]["maskedPaths"] = serde_json::json!(["/etc/secret"]);
    let out = agent.run(&id, &spec).await.expect("runs");
    assert_eq!(out.stdout, "cat=0\ntouch=1\n", "stderr: {}", out.stderr);
    assert!(out.stderr.contains("Read-only file system"), "stderr: {}", out.stderr);
    assert!(!agent.rootfs.join("newfile").exists());
    agent.remove(&id).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_limit_oom_kill_is_reported() {
    require_prerequisites!();
    let agent = TestAgent::start().await.expect("agent starts");
    let oom_client = agent.client.clone();
    let oom = tokio::spawn(async move {
        oom_client.get_oom_event(ctx(), &hull_proto::agent::GetOOMEventRequest::new()).await
    });
    let id = unique_id("oom");
    let mut spec = agent.spec(&["sh", "-c", "echo start; dd if=/dev/zero of=/dev/null bs=64M count=1; echo survived"]);
    spec["linux"]["resources"]["memory"] = serde_json::json!({"limit": 16 * 1024 * 1024});
    let out = agent.run(&id, &spec).await.expect("runs");
    // dd is killed; the shell then goes on and echoes, so the container itself exits 0 unless
    // the shell was the victim. Either way an OOM kill happened in this container.
    assert!(out.stdout.starts_with("start\n"), "stdout: {}", out.stdout);
    let event = tokio::time::timeout(std::time::Duration::from_secs(10), oom)
        .await
        .expect("OOM event within 10 s")
        .expect("task")
        .expect("GetOOMEvent");
    assert_eq!(event.container_id, id);
    agent.remove(&id).await.expect("remove");

    // A container whose init itself is killed reports 137 and oom_killed.
    let id = unique_id("oom-init");
    let mut spec = agent.spec(&["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"]);
    spec["linux"]["resources"]["memory"] = serde_json::json!({"limit": 16 * 1024 * 1024});
    let out = agent.run(&id, &spec).await.expect("runs");
    assert_eq!((out.status, out.oom_killed), (137, true), "{out:?}");
    agent.remove(&id).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_stops_the_counter_and_resume_restarts_it() {
    require_prerequisites!();
    let agent = TestAgent::start().await.expect("agent starts");
    let id = unique_id("pause");
    let spec = agent.spec(&["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.02; done"]);
    agent.create(&id, &spec, stdio(false, false, false)).await.expect("create");
    agent.start(&id).await.expect("start");
    let counter = agent.rootfs.join("tmp/counter");
    // `echo > file` truncates before it writes: a read can land in between and see nothing,
    // so take the largest of a few reads.
    let read = || {
        (0..5)
            .map(|_| {
                std::thread::sleep(std::time::Duration::from_millis(5));
                std::fs::read_to_string(&counter).unwrap_or_default().trim().parse::<u64>().unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
    };
    let sleep = || tokio::time::sleep(std::time::Duration::from_millis(400));
    let running = eventually(std::time::Duration::from_secs(10), || async { (read() > 0).then_some(()) }).await;
    assert!(running.is_some(), "the counter runs");

    let mut req = hull_proto::agent::PauseContainerRequest::new();
    req.container_id = id.clone();
    agent.client.pause_container(ctx(), &req).await.expect("pause");
    sleep().await;
    let paused = read();
    sleep().await;
    assert_eq!(read(), paused, "a paused counter does not advance");

    let mut req = hull_proto::agent::ResumeContainerRequest::new();
    req.container_id = id.clone();
    agent.client.resume_container(ctx(), &req).await.expect("resume");
    let advanced = eventually(std::time::Duration::from_secs(10), || async { (read() > paused).then_some(()) }).await;
    assert!(advanced.is_some(), "a resumed counter advances");
    agent.remove(&id).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_with_and_without_tty_and_resize() {
    require_prerequisites!();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let agent = TestAgent::start().await.expect("agent starts");
    let id = unique_id("exec");
    agent.create(&id, &agent.spec(&["sleep", "1000"]), stdio(false, false, false)).await.expect("create");
    agent.start(&id).await.expect("start");

    // Without a terminal: stdin in, stdout out, exit status back.
    agent.exec(&id, "plain", &oci_process(&["sh", "-c", "read x; echo got:$x; exit 5"], false), stdio(true, true, false))
        .await
        .expect("exec");
    let mut stdin = agent.attach(&id, "plain", StreamKind::Stdin).await.expect("stdin");
    let out = agent.attach(&id, "plain", StreamKind::Stdout).await.expect("stdout");
    stdin.write_all(b"hello\n").await.expect("write stdin");
    stdin.shutdown().await.expect("close stdin");
    assert_eq!(read_to_string(out).await.expect("read"), "got:hello\n");
    assert_eq!(agent.wait(&id, "plain").await.expect("wait").exit_status, 5);

    // With a terminal: an interactive shell sees the window size set through the API.
    agent.exec(&id, "tty", &oci_process(&["sh"], true), stdio(true, false, false)).await.expect("exec tty");
    let mut tty = agent.attach(&id, "tty", hull_proto::stdio::StreamKind::Tty).await.expect("tty");
    let mut req = hull_proto::agent::TtyWinResizeRequest::new();
    req.container_id = id.clone();
    req.exec_id = "tty".into();
    req.rows = 40;
    req.cols = 123;
    agent.client.tty_win_resize(ctx(), &req).await.expect("resize");
    tty.write_all(b"tty; stty size; exit 7\n").await.expect("type");
    let mut seen = Vec::new();
    tty.read_to_end(&mut seen).await.expect("read tty");
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.contains("40 123"), "tty output: {seen:?}");
    assert!(seen.contains("/dev/pts/"), "tty output: {seen:?}");
    assert_eq!(agent.wait(&id, "tty").await.expect("wait").exit_status, 7);
    agent.remove(&id).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_processes_and_update() {
    require_prerequisites!();
    let agent = TestAgent::start().await.expect("agent starts");
    let id = unique_id("stats");
    let spec = agent.spec(&["sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 1000"]);
    agent.create(&id, &spec, stdio(false, false, false)).await.expect("create");
    agent.start(&id).await.expect("start");
    // The busy loop is over (and has used CPU) once `sleep 1000` runs.
    sleeping(&agent, &id, 1).await;

    let mut req = hull_proto::agent::StatsContainerRequest::new();
    req.container_id = id.clone();
    let stats = agent.client.stats_container(ctx(), &req).await.expect("stats");
    assert!(stats.cpu_usage_ns > 0, "{stats:?}");
    assert!(stats.memory_usage_bytes > 0, "{stats:?}");
    assert!(stats.pids_current >= 1, "{stats:?}");

    let mut req2 = hull_proto::agent::ListProcessesRequest::new();
    req2.container_id = id.clone();
    let ps = agent.client.list_processes(ctx(), &req2).await.expect("ps");
    assert!(ps.processes.iter().any(|p| p.command == "sleep 1000"), "{ps:?}");

    let mut up = hull_proto::agent::UpdateContainerRequest::new();
    up.container_id = id.clone();
    up.resources_json = r#"{"pids":{"limit":42},"memory":{"limit":67108864}}"#.into();
    agent.client.update_container(ctx(), &up).await.expect("update");
    let stats = agent.client.stats_container(ctx(), &req).await.expect("stats");
    assert_eq!(stats.pids_limit, 42);
    assert_eq!(stats.memory_limit_bytes, 64 << 20);
    agent.remove(&id).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_gib_through_stdout_arrives_intact() {
    require_prerequisites!();
    use sha2::{Digest, Sha256};
    use tokio::io::AsyncReadExt;
    let agent = TestAgent::start().await.expect("agent starts");
    // 64 MiB of pseudo-random bytes, written out 16 times by one cat: 1 GiB.
    let block = pseudo_random(64 << 20);
    std::fs::write(agent.rootfs.join("data"), &block).expect("write data");
    let mut expected = Sha256::new();
    for _ in 0..16 {
        expected.update(&block);
    }
    let expected = expected.finalize();
    let args: Vec<&str> = std::iter::once("cat").chain(std::iter::repeat_n("/data", 16)).collect();
    let id = unique_id("gib");
    agent.create(&id, &agent.spec(&args), stdio(false, true, false)).await.expect("create");
    let mut out = agent.attach(&id, "", StreamKind::Stdout).await.expect("stdout");
    let start = std::time::Instant::now();
    agent.start(&id).await.expect("start");
    let mut hasher = Sha256::new();
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = out.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        total += n;
        hasher.update(&buf[..n]);
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(total, 1 << 30);
    assert_eq!(hasher.finalize(), expected, "checksum of 1 GiB");
    assert_eq!(agent.wait(&id, "").await.expect("wait").exit_status, 0);
    eprintln!("stdout throughput: {:.0} MB/s (1 GiB in {secs:.2} s, checksummed by the reader)", 1073.741824 / secs);
    agent.remove(&id).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_cycles_leave_nothing_behind() {
    require_prerequisites!();
    let agent = TestAgent::start().await.expect("agent starts");
    // Warm up once so that lazily opened descriptors (reactor, logs) are counted in the baseline.
    let warm = unique_id("warm");
    agent.run(&warm, &agent.spec(&["true"])).await.expect("warm-up");
    agent.remove(&warm).await.expect("remove");
    let fds = agent.fd_count();
    for i in 0..50 {
        let id = unique_id(&format!("cycle{i}"));
        let out = agent.run(&id, &agent.spec(&["sh", "-c", "echo $$"])).await.expect("runs");
        assert_eq!((out.status, out.stdout.as_str()), (0, "1\n"));
        agent.remove(&id).await.expect("remove");
        assert!(!cgroup_exists(&id), "cgroup of {id} is left");
    }
    assert_eq!(agent.children(), Vec::<i32>::new(), "processes left under the agent");
    assert_eq!(agent.mounts(), Vec::<String>::new(), "mounts left");
    assert_eq!(agent.fd_count(), fds, "descriptors leaked");
    let state = agent.dir.path().join("state");
    assert_eq!(std::fs::read_dir(state.join("containers")).map(|d| d.count()).unwrap_or(0), 0);
    assert_eq!(std::fs::read_dir(state.join("bundles")).map(|d| d.count()).unwrap_or(0), 0);
}

/// Whether any cgroup hierarchy still has a directory for the container.
fn cgroup_exists(id: &str) -> bool {
    let Ok(dir) = std::fs::read_dir("/sys/fs/cgroup") else { return false };
    dir.flatten().any(|h| h.path().join("hull").join(id).exists()) || std::path::Path::new("/sys/fs/cgroup/hull").join(id).exists()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_named_error_and_leaves_nothing() {
    require_prerequisites!();
    let agent = TestAgent::start().await.expect("agent starts");
    // Round 1 lets libraries open what they keep for the process's lifetime (libcontainer's
    // handle on /proc, for one); round 2 must then not add a single descriptor.
    bad_input_round(&agent, 1).await;
    let fds = agent.fd_count();
    let targets = agent.fd_targets();
    bad_input_round(&agent, 2).await;
    assert_eq!(agent.fd_count(), fds, "descriptors leaked: {targets:?} then {:?}", agent.fd_targets());
}

async fn bad_input_round(agent: &TestAgent, round: u32) {
    use ttrpc::Code;
    let unique_id = |name: &str| unique_id(&format!("{name}{round}"));
    let expect_err = |r: Result<i32, ClientError>, code: Code, words: &[&str]| {
        let e = r.expect_err("the call must fail");
        let (c, msg) = rpc_error(&e);
        assert_eq!(c, code, "{msg}");
        for w in words {
            assert!(msg.contains(w), "message {msg:?} does not name {w:?}");
        }
    };

    // Unknown container and exec ids.
    expect_err(agent.start("nope").await.map(|_| 0), Code::NOT_FOUND, &["nope"]);
    expect_err(agent.wait("nope", "").await.map(|_| 0), Code::NOT_FOUND, &["nope"]);
    expect_err(agent.remove("nope").await.map(|_| 0), Code::NOT_FOUND, &["nope"]);
    expect_err(agent.create("../escape", &agent.spec(&["true"]), stdio(false, false, false)).await, Code::INVALID_ARGUMENT, &["../escape"]);

    // Malformed JSON, a spec the agent cannot honour, a missing rootfs.
    let bad = "bad-json";
    let mut req = hull_proto::agent::CreateContainerRequest::new();
    req.container_id = bad.into();
    req.oci_spec_json = "{\"ociVersion\": ".into();
    expect_err(agent.client.create_container(ctx(), &req).await.map(|r| r.pid).map_err(|e| ClientError::rpc("CreateContainer", e)), Code::INVALID_ARGUMENT, &[bad, "malformed"]);
    let mut hooks = agent.spec(&["true"]);
    hooks["hooks"] = serde_json::json!({"prestart": [{"path": "/bin/true"}]});
    expect_err(agent.create("hooks", &hooks, stdio(false, false, false)).await, Code::INVALID_ARGUMENT, &["hooks"]);
    let mut missing = agent.spec(&["true"]);
    missing["root"]["path"] = serde_json::json!("/nonexistent/rootfs");
    expect_err(agent.create("norootfs", &missing, stdio(false, false, false)).await, Code::INVALID_ARGUMENT, &["/nonexistent/rootfs"]);

    // A command that does not exist, and one that is not executable.
    std::fs::write(agent.rootfs.join("noexec"), "#!/bin/sh\necho hi\n").expect("write noexec");
    let enoent = unique_id("enoent");
    let r = agent.create(&enoent, &agent.spec(&["/no/such/binary"]), stdio(false, false, false)).await;
    expect_err(r, Code::FAILED_PRECONDITION, &[&enoent, "/no/such/binary"]);
    let eacces = unique_id("eacces");
    let r = agent.create(&eacces, &agent.spec(&["/noexec"]), stdio(false, false, false)).await;
    expect_err(r, Code::FAILED_PRECONDITION, &[&eacces, "/noexec"]);

    // Duplicate id; exec problems; exec into a stopped container.
    let id = unique_id("dup");
    agent.create(&id, &agent.spec(&["sleep", "1000"]), stdio(false, false, false)).await.expect("create");
    expect_err(agent.create(&id, &agent.spec(&["true"]), stdio(false, false, false)).await, Code::ALREADY_EXISTS, &[&id]);
    agent.start(&id).await.expect("start");
    let r = agent.exec(&id, "e1", &oci_process(&["/no/such/tool"], false), stdio(false, false, false)).await;
    expect_err(r, Code::FAILED_PRECONDITION, &["e1", "/no/such/tool"]);
    let r = agent.exec(&id, "e2", &oci_process(&["/noexec"], false), stdio(false, false, false)).await;
    expect_err(r, Code::FAILED_PRECONDITION, &["e2"]);
    expect_err(agent.wait(&id, "e9").await.map(|_| 0), Code::NOT_FOUND, &[&id, "e9"]);
    let mut bad_process = oci_process(&["true"], false);
    bad_process["cwd"] = serde_json::json!("relative");
    expect_err(agent.exec(&id, "e3", &bad_process, stdio(false, false, false)).await, Code::INVALID_ARGUMENT, &["relative"]);
    agent.signal(&id, "", libc::SIGKILL, false).await.expect("kill");
    agent.wait(&id, "").await.expect("wait");
    let r = agent.exec(&id, "late", &oci_process(&["true"], false), stdio(false, false, false)).await;
    expect_err(r, Code::FAILED_PRECONDITION, &[&id, "stopped"]);
    expect_err(agent.signal(&id, "", libc::SIGTERM, false).await.map(|_| 0), Code::FAILED_PRECONDITION, &["exited"]);
    agent.remove(&id).await.expect("remove");

    // Nothing of any of that is left (the last processes are being reaped).
    eventually(std::time::Duration::from_secs(5), || async { agent.children().is_empty().then_some(()) }).await;
    assert_eq!(agent.children(), Vec::<i32>::new(), "processes left");
    assert_eq!(agent.mounts(), Vec::<String>::new(), "mounts left");
    for id in [enoent.as_str(), eacces.as_str(), id.as_str(), "hooks", "norootfs", "bad-json"] {
        assert!(!cgroup_exists(id), "cgroup of {id} left");
    }
    let state = agent.dir.path().join("state");
    assert_eq!(std::fs::read_dir(state.join("containers")).map(|d| d.count()).unwrap_or(0), 0, "libcontainer state left");
    assert_eq!(std::fs::read_dir(state.join("bundles")).map(|d| d.count()).unwrap_or(0), 0, "bundles left");
}

#[tokio::test(flavor = "multi_thread")]
async fn sandbox_containers_share_uts_ipc_and_net_and_destroy_ends_the_agent() {
    require_prerequisites!();
    let mut agent = TestAgent::start().await.expect("agent starts");
    let mut req = hull_proto::agent::CreateSandboxRequest::new();
    req.sandbox_id = unique_id("pod");
    req.hostname = "pod-host".into();
    agent.client.create_sandbox(ctx(), &req).await.expect("create sandbox");
    let (code, msg) = rpc_error(&agent.client.create_sandbox(ctx(), &req).await.map_err(|e| ClientError::rpc("CreateSandbox", e)).unwrap_err());
    assert_eq!(code, ttrpc::Code::ALREADY_EXISTS, "{msg}");

    let ns = "for n in uts ipc net pid; do readlink /proc/self/ns/$n; done; hostname; ip link show lo | grep -q 'LOOPBACK,UP' && echo lo-up || echo lo-down";
    let a = agent.run(&unique_id("pod-a"), &agent.spec(&["sh", "-c", ns])).await.expect("a runs");
    let b = agent.run(&unique_id("pod-b"), &agent.spec(&["sh", "-c", ns])).await.expect("b runs");
    let (a, b): (Vec<&str>, Vec<&str>) = (a.stdout.lines().collect(), b.stdout.lines().collect());
    assert_eq!(a.len(), 6, "{a:?}");
    assert_eq!(a[..3], b[..3], "uts, ipc and net are the sandbox's");
    let host_pid = std::fs::read_link("/proc/self/ns/pid").expect("host pidns");
    assert!(a[3] != host_pid.to_string_lossy() && b[3] != host_pid.to_string_lossy(), "each container has its own pid namespace");
    assert_eq!((a[4], b[4]), ("pod-host", "pod-host"));
    assert_eq!(a[5], "lo-up", "the sandbox's own network has its loopback up");
    let host_net = std::fs::read_link("/proc/self/ns/net").expect("host netns");
    assert_ne!(a[2], host_net.to_string_lossy(), "the sandbox network is not the host's");

    // A running container when the sandbox goes: it is stopped and removed, the agent exits.
    let c = unique_id("pod-c");
    agent.create(&c, &agent.spec(&["sleep", "1000"]), stdio(false, false, false)).await.expect("create");
    agent.start(&c).await.expect("start");
    let mut req = hull_proto::agent::DestroySandboxRequest::new();
    req.timeout_secs = 1;
    agent.client.destroy_sandbox(ctx(), &req).await.expect("destroy sandbox");
    let exit = agent.wait_exit(std::time::Duration::from_secs(10)).expect("agent exits after DestroySandbox");
    assert!(exit.success(), "agent exit: {exit:?}");
    assert!(!cgroup_exists(&c));
}

#[tokio::test(flavor = "multi_thread")]
async fn seccomp_capabilities_rlimits_sysctls_and_mounts_are_honoured() {
    require_prerequisites!();
    let agent = TestAgent::start().await.expect("agent starts");
    let shared = agent.dir.path().join("shared");
    std::fs::create_dir_all(&shared).expect("mkdir shared");
    std::fs::write(shared.join("hello.txt"), "from the host\n").expect("write");
    let id = unique_id("features");
    let script = [
        "mkdir /tmp/denied; echo mkdir=$?",
        "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status",
        "ulimit -n",
        "cat /proc/sys/net/ipv4/ip_forward",
        "cat /proc/self/oom_score_adj",
        "cat /mnt/host/hello.txt",
        "touch /mnt/host/new; echo ro=$?",
        "grep -c ' /scratch tmpfs' /proc/mounts",
        "test -e /sys/fs/cgroup/pids.max -o -d /sys/fs/cgroup/pids; echo cgroupfs=$?",
    ]
    .join("; ");
    let mut spec = agent.spec(&["sh", "-c", &script]);
    spec["process"]["capabilities"] = serde_json::json!({
        "bounding": ["CAP_KILL", "CAP_SETUID"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"],
        "inheritable": [], "ambient": []
    });
    spec["process"]["rlimits"] = serde_json::json!([{"type": "RLIMIT_NOFILE", "hard": 321, "soft": 321}]);
    spec["process"]["oomScoreAdj"] = serde_json::json!(423);
    spec["linux"]["sysctl"] = serde_json::json!({"net.ipv4.ip_forward": "1"});
    spec["linux"]["seccomp"] = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let mounts = spec["mounts"].as_array_mut().expect("mounts");
    mounts.push(serde_json::json!({"destination": "/mnt/host", "type": "bind", "source": shared, "options": ["rbind", "ro"]}));
    mounts.push(serde_json::json!({"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]}));
    mounts.push(serde_json::json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro"]}));
    let out = agent.run(&id, &spec).await.expect("runs");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"mkdir=1"), "seccomp denies mkdir: {out:?}");
    assert!(out.stderr.contains("Operation not permitted"), "{out:?}");
    // CAP_KILL is bit 5; the bounding set also has CAP_SETUID (bit 7).
    assert!(lines.contains(&"CapEff:\t0000000000000020"), "{out:?}");
    assert!(lines.contains(&"CapBnd:\t00000000000000a0"), "{out:?}");
    assert!(lines.contains(&"NoNewPrivs:\t1"), "{out:?}");
    let tail = &lines[lines.len() - 7..];
    assert_eq!(tail, ["321", "1", "423", "from the host", "ro=1", "1", "cgroupfs=0"], "{out:?}");
    assert!(!shared.join("new").exists());
    agent.remove(&id).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread")]
async fn user_namespace_maps_root_to_an_unprivileged_host_uid() {
    require_prerequisites!();
    let agent = TestAgent::start().await.expect("agent starts");
    let id = unique_id("userns");
    let mut spec = agent.spec(&["sh", "-c", "id -u; cat /proc/self/uid_map; sleep 1000"]);
    let ns = spec["linux"]["namespaces"].as_array_mut().expect("namespaces");
    ns.push(serde_json::json!({"type": "user"}));
    spec["linux"]["uidMappings"] = serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    spec["linux"]["gidMappings"] = serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    // The sysfs of a user-namespaced container cannot be mounted without its own netns owner;
    // keep the test to what a rootless-style container needs.
    spec["mounts"].as_array_mut().expect("mounts").retain(|m| m["type"] != "sysfs");
    agent.create(&id, &spec, stdio(false, true, false)).await.expect("create");
    let out = agent.attach(&id, "", StreamKind::Stdout).await.expect("attach");
    agent.start(&id).await.expect("start");
    let mut reader = tokio::io::BufReader::new(out);
    let mut first = String::new();
    let mut second = String::new();
    use tokio::io::AsyncBufReadExt;
    reader.read_line(&mut first).await.expect("read");
    reader.read_line(&mut second).await.expect("read");
    assert_eq!(first, "0\n");
    assert_eq!(second.split_whitespace().collect::<Vec<_>>(), ["0", "100000", "65536"]);
    // Seen from the host, the container's root is uid 100000.
    let pid = agent.client.list_processes(ctx(), &{
        let mut r = hull_proto::agent::ListProcessesRequest::new();
        r.container_id = id.clone();
        r
    }).await.expect("ps").processes.first().expect("a process").pid;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    assert!(status.lines().any(|l| l.starts_with("Uid:\t100000")), "{status}");
    agent.remove(&id).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread")]
async fn storages_are_mounted_for_the_container_and_gone_after_it() {
    require_prerequisites!();
    let agent = TestAgent::start().await.expect("agent starts");
    let mount_point = agent.dir.path().join("storage/c1");
    let storage = |source: &str, fstype: &str, options: &[&str]| {
        let mut s = hull_proto::agent::Storage::new();
        s.source = source.into();
        s.fstype = fstype.into();
        s.options = options.iter().map(|o| o.to_string()).collect();
        s.mount_point = mount_point.to_string_lossy().into_owned();
        s
    };
    let id = unique_id("storage");
    let mut spec = agent.spec(&["sh", "-c", "echo on storage"]);
    spec["root"]["path"] = serde_json::json!(mount_point);
    let rootfs = agent.rootfs.to_string_lossy().into_owned();
    agent
        .create_on(&id, &spec, stdio(false, true, false), vec![storage(&rootfs, "none", &["rbind"])])
        .await
        .expect("create on a bind storage");
    assert!(agent.mounts().iter().any(|m| m == &mount_point.to_string_lossy()), "mounted: {:?}", agent.mounts());
    let out = agent.attach(&id, "", StreamKind::Stdout).await.expect("attach");
    agent.start(&id).await.expect("start");
    assert_eq!(read_all(out).await.expect("read"), "on storage\n");
    agent.remove(&id).await.expect("remove");
    assert_eq!(agent.mounts(), Vec::<String>::new(), "the storage is unmounted");
    assert!(!mount_point.exists(), "and its mount point removed");

    // A storage that cannot be mounted: named in the error, nothing created or left mounted.
    let bad = unique_id("badstorage");
    let err = agent
        .create_on(&bad, &spec, stdio(false, false, false), vec![storage("/dev/nonexistent-disk", "ext4", &["ro"])])
        .await
        .expect_err("bad storage");
    let (code, msg) = rpc_error(&err);
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("/dev/nonexistent-disk") && msg.contains("ext4"), "{msg}");
    assert_eq!(agent.mounts(), Vec::<String>::new());
    assert!(!cgroup_exists(&bad));
}

/// Waits until `n` processes of container `id` run `sleep 1000`.
async fn sleeping(agent: &TestAgent, id: &str, n: usize) {
    let found = eventually(std::time::Duration::from_secs(10), || async {
        let mut req = hull_proto::agent::ListProcessesRequest::new();
        req.container_id = id.into();
        let ps = agent.client.list_processes(ctx(), &req).await.ok()?;
        (ps.processes.iter().filter(|p| p.command == "sleep 1000").count() >= n).then_some(())
    })
    .await;
    assert!(found.is_some(), "{n} `sleep 1000` processes never ran in {id}");
}
