//! What kubelet does with runc, done with hull through containerd's CRI plugin (issue 15's
//! list), one test per behaviour, each as kubelet drives it.

use std::time::{Duration, Instant};

use hull_tests::cri::{container_config, Cri, HULL};
use hull_tests::require_containerd;
use k8s_cri::v1::{ContainerState, StopContainerRequest};

/// StopContainer on a container whose PID 1 has no SIGTERM handler (a `sleep` as init of its
/// PID namespace ignores SIGTERM, as under runc): containerd sends SIGTERM, waits the timeout,
/// then SIGKILL; the call returns soon after the timeout and the container exited 137.
#[tokio::test(flavor = "multi_thread")]
async fn stopping_a_container_that_ignores_sigterm_kills_it_after_the_timeout() {
    require_containerd!();
    let mut cri = Cri::start().await.expect("containerd with CRI starts");
    let pod = cri.run_pod("stopper", HULL).await;
    let id = cri.start_container(&pod, container_config("deaf", &["top"], 0)).await;

    let timeout = 2;
    let t = Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(timeout as u64 + 30), cri.rt.stop_container(StopContainerRequest { container_id: id.clone(), timeout })).await;
    let took = t.elapsed();
    let stopped = stopped.unwrap_or_else(|_| panic!("StopContainer with a {timeout} s timeout did not return in {} s\n{}", timeout + 30, cri.containerd.log()));
    stopped.unwrap_or_else(|e| panic!("StopContainer: {e}\n{}", cri.containerd.log()));
    assert!(took >= Duration::from_secs(timeout as u64), "SIGTERM alone ended it after {took:?}: the container should have ignored it");
    let status = cri.status(&id).await;
    assert_eq!(status.state, ContainerState::ContainerExited as i32, "{status:?}");
    assert_eq!(status.exit_code, 137, "killed by SIGKILL after the grace period: {status:?}");

    // Removing the stopped container and its pod completes too.
    cri.rt.remove_container(k8s_cri::v1::RemoveContainerRequest { container_id: id.clone() }).await.unwrap_or_else(|e| panic!("RemoveContainer: {e}\n{}", cri.containerd.log()));
    cri.remove_pod(&pod).await;
    let left = cri.wait_no_pod_processes(Duration::from_secs(20)).await;
    assert!(left.is_ok(), "left: {left:?}");
}

/// A pod with `pid: POD`: its containers share one PID namespace, whose PID 1 is the pod's
/// init (the pause, as under runc), so a process of one container is visible from another. A
/// pod without it keeps one PID namespace per container.
#[tokio::test(flavor = "multi_thread")]
async fn containers_of_a_pod_pid_pod_see_each_others_processes() {
    use k8s_cri::v1::NamespaceMode;
    require_containerd!();
    let mut cri = Cri::start().await.expect("containerd with CRI starts");
    let mut config = hull_tests::cri::pod_config("podpid", &cri.logs);
    let options = config.linux.as_mut().and_then(|l| l.security_context.as_mut()).and_then(|s| s.namespace_options.as_mut()).expect("namespace options");
    options.pid = NamespaceMode::Pod as i32;
    let pod = cri.run_pod_with(config, HULL).await;
    // As kubelet does for `shareProcessNamespace: true`: the pod's mode in each container's.
    let in_pod_pid = |name: &str, command: &[&str]| {
        let mut c = container_config(name, command, 0);
        let options = c.linux.as_mut().and_then(|l| l.security_context.as_mut()).and_then(|s| s.namespace_options.as_mut()).expect("namespace options");
        options.pid = NamespaceMode::Pod as i32;
        c
    };
    let a = cri.start_container(&pod, in_pod_pid("a", &["sleep", "4242"])).await;
    let b = cri.start_container(&pod, in_pod_pid("b", &["sleep", "1000"])).await;
    let (seen, code) = cri.exec(&b, &["sh", "-c", "pidof sleep; ps -o pid,args"]).await;
    assert_eq!(code, 0, "{seen}");
    assert!(seen.contains("sleep 4242"), "container b sees container a's process: {seen}");
    let (init, _) = cri.exec(&a, &["cat", "/proc/1/comm"]).await;
    assert_eq!(init.trim(), "pause", "PID 1 of the pod's namespace is its init");

    // The default (`pid: CONTAINER`): each container is alone in its namespace.
    let other = cri.run_pod("ownpid", HULL).await;
    let c = cri.start_container(&other, container_config("c", &["sleep", "4343"], 0)).await;
    let d = cri.start_container(&other, container_config("d", &["sleep", "1000"], 0)).await;
    let (seen, _) = cri.exec(&d, &["ps", "-o", "pid,args"]).await;
    assert!(!seen.contains("sleep 4343"), "{seen}");
    let (init, _) = cri.exec(&c, &["cat", "/proc/1/cmdline"]).await;
    assert!(init.starts_with("sleep"), "the container's own process is PID 1 of its namespace: {init}");

    for p in [&pod, &other] {
        cri.remove_pod(p).await;
    }
    let left = cri.wait_no_pod_processes(Duration::from_secs(20)).await;
    assert!(left.is_ok(), "left: {left:?}");
}

/// A pod with `pid: NODE` (hostPID): inside a VM the pod's node is its guest, so its
/// containers share the guest's root PID namespace (Kata's choice) and see every process of
/// the pod, the other containers' included; the host's processes stay out of sight.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_pid_pod_sees_its_guest_not_the_host() {
    use k8s_cri::v1::NamespaceMode;
    require_containerd!();
    let mut cri = Cri::start().await.expect("containerd with CRI starts");
    let mut config = hull_tests::cri::pod_config("hostpid", &cri.logs);
    let options = config.linux.as_mut().and_then(|l| l.security_context.as_mut()).and_then(|s| s.namespace_options.as_mut()).expect("namespace options");
    options.pid = NamespaceMode::Node as i32;
    let pod = cri.run_pod_with(config, HULL).await;
    let with_node_pid = |name: &str, command: &[&str]| {
        let mut c = container_config(name, command, 0);
        let options = c.linux.as_mut().and_then(|l| l.security_context.as_mut()).and_then(|s| s.namespace_options.as_mut()).expect("namespace options");
        options.pid = NamespaceMode::Node as i32;
        c
    };
    let _a = cri.start_container(&pod, with_node_pid("a", &["sleep", "4545"])).await;
    let b = cri.start_container(&pod, with_node_pid("b", &["sleep", "1000"])).await;
    let (seen, code) = cri.exec(&b, &["ps", "-o", "pid,args"]).await;
    assert_eq!(code, 0, "{seen}");
    assert!(seen.contains("sleep 4545"), "b sees a's process: {seen}");
    let (init, _) = cri.exec(&b, &["cat", "/proc/1/cmdline"]).await;
    assert!(init.contains("init"), "PID 1 is the guest's init (the agent): {init:?}");
    assert!(!seen.contains("containerd"), "the host's processes are not the pod's node: {seen}");

    cri.remove_pod(&pod).await;
    let left = cri.wait_no_pod_processes(Duration::from_secs(20)).await;
    assert!(left.is_ok(), "left: {left:?}");
}

/// The pod's sysctls (CRI puts them on the sandbox only): a namespaced one of IPC and one of
/// the network read back as set in every container of the pod.
#[tokio::test(flavor = "multi_thread")]
async fn a_pods_sysctls_are_set_in_its_containers_namespaces() {
    require_containerd!();
    let mut cri = Cri::start().await.expect("containerd with CRI starts");
    let mut config = hull_tests::cri::pod_config("sysctls", &cri.logs);
    let linux = config.linux.as_mut().expect("linux config");
    linux.sysctls.insert("kernel.shm_rmid_forced".into(), "1".into());
    linux.sysctls.insert("net.ipv4.ip_unprivileged_port_start".into(), "1000".into());
    let pod = cri.run_pod_with(config, HULL).await;
    let c = cri.start_container(&pod, container_config("c", &["sleep", "1000"], 0)).await;
    let (seen, code) = cri.exec(&c, &["cat", "/proc/sys/kernel/shm_rmid_forced", "/proc/sys/net/ipv4/ip_unprivileged_port_start"]).await;
    assert_eq!(code, 0, "{seen}");
    assert_eq!(seen.split_whitespace().collect::<Vec<_>>(), ["1", "1000"], "{seen}");

    // A name that would leave /proc/sys is refused by name, and nothing of the pod is left.
    let mut bad = hull_tests::cri::pod_config("badsysctl", &cri.logs);
    bad.linux.as_mut().expect("linux config").sysctls.insert("kernel/../../../etc/x".into(), "1".into());
    let refused = cri.rt.run_pod_sandbox(k8s_cri::v1::RunPodSandboxRequest { config: Some(bad), runtime_handler: HULL.into() }).await;
    let err = refused.expect_err("a sysctl outside /proc/sys is refused").to_string();
    assert!(err.contains("kernel/../../../etc/x"), "{err}");

    cri.remove_pod(&pod).await;
    let left = cri.wait_no_pod_processes(Duration::from_secs(30)).await;
    assert!(left.is_ok(), "left: {left:?}");
}

/// A volume with `propagation: HOST_TO_CONTAINER` (rslave) and one with BIDIRECTIONAL: the
/// container starts, a mount made on the host under the volume's source after the start shows
/// in the container, and removing the pod leaves the host's mounts under the source alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_to_container_volume_sees_a_host_mount_made_after_start() {
    use k8s_cri::v1::{Mount, MountPropagation};
    require_containerd!();
    let mut cri = Cri::start().await.expect("containerd with CRI starts");
    let source = cri.containerd.dir.path().join("volume");
    std::fs::create_dir_all(source.join("later")).expect("volume dir");
    // On a node / is a shared mount (systemd makes it so); containerd checks the source is
    // shared or a slave. Here the source is made a shared mount of its own.
    let sh = |cmd: &str| assert!(std::process::Command::new("sh").args(["-c", cmd]).status().expect("sh").success(), "{cmd}");
    sh(&format!("mount --bind {0} {0} && mount --make-shared {0}", source.display()));
    // A host mount under the source from before the start (a volume is an rbind: it comes too).
    let early = source.join("early");
    std::fs::create_dir_all(&early).expect("early dir");
    sh(&format!("mount -t tmpfs tmpfs {0} && echo early > {0}/marker", early.display()));
    let mounted_on_host = |dir: &std::path::Path| std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default().lines().any(|l| l.split_whitespace().nth(4) == Some(&*dir.to_string_lossy()));
    let pod = cri.run_pod("propagation", HULL).await;
    let mut config = container_config("c", &["sleep", "1000"], 0);
    config.mounts.push(Mount { container_path: "/vol".into(), host_path: source.to_string_lossy().into_owned(), propagation: MountPropagation::PropagationHostToContainer as i32, ..Default::default() });
    // BIDIRECTIONAL (rshared) starts too; what the container mounts stays in the guest.
    config.mounts.push(Mount { container_path: "/vol2".into(), host_path: source.to_string_lossy().into_owned(), propagation: MountPropagation::PropagationBidirectional as i32, ..Default::default() });
    let c = cri.start_container(&pod, config).await;

    let tmpfs = source.join("later");
    let mounted = std::process::Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(&tmpfs).status().expect("mount");
    assert!(mounted.success());
    std::fs::write(tmpfs.join("marker"), "from a host mount\n").expect("marker");
    let (seen, code) = cri.exec(&c, &["cat", "/vol/later/marker"]).await;
    let _ = std::process::Command::new("umount").arg(&tmpfs).status();
    assert_eq!((code, seen.trim()), (0, "from a host mount"), "{seen}");

    let (seen, _) = cri.exec(&c, &["cat", "/vol/early/marker"]).await;
    assert_eq!(seen.trim(), "early");
    let (seen, _) = cri.exec(&c, &["cat", "/vol2/early/marker"]).await;
    assert_eq!(seen.trim(), "early");

    // The shim's unmounts of the container's copy never reach back to the host's mounts.
    cri.remove_pod(&pod).await;
    let early_kept = mounted_on_host(&early);
    let _ = std::process::Command::new("umount").arg(&early).status();
    let _ = std::process::Command::new("umount").arg(&source).status();
    assert!(early_kept, "removing the pod unmounted the host's {early:?}");
    let left = cri.wait_no_pod_processes(Duration::from_secs(30)).await;
    assert!(left.is_ok(), "left: {left:?}");
}

/// A container's seccomp profile from its CRI security context is enforced in the guest as runc
/// does, on its init and on every exec: a Localhost profile failing chmod and sethostname with
/// EPERM makes them fail there, with CAP_SYS_ADMIN too (the exec's filter is installed with and
/// without that capability), while the same pod's unconfined container may do both.
#[tokio::test(flavor = "multi_thread")]
async fn a_localhost_seccomp_profile_is_enforced_in_the_guest() {
    use k8s_cri::v1::{security_profile::ProfileType, Capability, SecurityProfile};
    require_containerd!();
    let mut cri = Cri::start().await.expect("containerd with CRI starts");
    let profile = cri.containerd.dir.path().join("no-chmod.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],
            "syscalls":[{"names":["chmod","fchmod","fchmodat","fchmodat2","sethostname"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}"#,
    )
    .expect("profile");
    let pod = cri.run_pod("seccomp", HULL).await;
    let with = |name: &str, command: &[&str], profile: SecurityProfile, sys_admin: bool| {
        let mut c = container_config(name, command, 0);
        let sc = c.linux.as_mut().and_then(|l| l.security_context.as_mut()).expect("security context");
        sc.seccomp = Some(profile);
        if sys_admin {
            sc.capabilities = Some(Capability { add_capabilities: vec!["CAP_SYS_ADMIN".into()], ..Default::default() });
        }
        c
    };
    let localhost = || SecurityProfile { profile_type: ProfileType::Localhost as i32, localhost_ref: profile.to_string_lossy().into_owned() };
    let unconfined = || SecurityProfile { profile_type: ProfileType::Unconfined as i32, ..Default::default() };
    let chmod = ["sh", "-c", "touch /tmp/f && chmod 600 /tmp/f"];
    // The container's own process: its log says what chmod did.
    let init = cri.start_container(&pod, with("init", &["sh", "-c", "touch /tmp/f; chmod 600 /tmp/f; echo chmod=$?; sleep 1000"], localhost(), false)).await;
    let confined = cri.start_container(&pod, with("confined", &["sleep", "1000"], localhost(), false)).await;
    let admin = cri.start_container(&pod, with("admin", &["sleep", "1000"], localhost(), true)).await;
    let free = cri.start_container(&pod, with("free", &["sleep", "1000"], unconfined(), true)).await;
    let default = cri.start_container(&pod, with("default", &["sleep", "1000"], SecurityProfile { profile_type: ProfileType::RuntimeDefault as i32, ..Default::default() }, false)).await;

    let (out, code) = cri.exec(&confined, &chmod).await;
    assert_ne!(code, 0, "chmod in an exec under a profile that forbids it: {out}");
    assert!(out.contains("Operation not permitted"), "EPERM, the profile's errno: {out}");
    let (out, code) = cri.exec(&admin, &chmod).await;
    assert!(code != 0 && out.contains("Operation not permitted"), "chmod with CAP_SYS_ADMIN under the profile: {code} {out}");
    let (out, code) = cri.exec(&admin, &["hostname", "renamed"]).await;
    assert!(code != 0 && out.contains("Operation not permitted"), "sethostname with CAP_SYS_ADMIN under the profile: {code} {out}");
    let (out, code) = cri.exec(&free, &chmod).await;
    assert_eq!(code, 0, "an unconfined container may chmod: {out}");
    let (out, code) = cri.exec(&free, &["hostname", "renamed"]).await;
    assert_eq!(code, 0, "an unconfined container with CAP_SYS_ADMIN may set the hostname: {out}");
    // containerd's RuntimeDefault profile confines the container's processes, execs included;
    // Unconfined leaves them without a filter.
    let seccomp_mode = ["sh", "-c", "grep Seccomp: /proc/1/status /proc/self/status"];
    let (out, _) = cri.exec(&default, &seccomp_mode).await;
    assert_eq!(out.matches("Seccomp:\t2").count(), 2, "RuntimeDefault filters the init and the exec: {out}");
    let (out, _) = cri.exec(&free, &seccomp_mode).await;
    assert_eq!(out.matches("Seccomp:\t0").count(), 2, "Unconfined: {out}");
    let (out, _) = cri.exec(&init, &["grep", "-h", "Seccomp:", "/proc/1/status"]).await;
    assert!(out.contains('2'), "the container's init runs under a filter: {out}");
    let log = std::fs::read_to_string(cri.logs.join("seccomp").join("init.log")).unwrap_or_default();
    assert!(log.contains("chmod=1"), "chmod failed in the container's init: {log}");

    cri.remove_pod(&pod).await;
    let left = cri.wait_no_pod_processes(Duration::from_secs(30)).await;
    assert!(left.is_ok(), "left: {left:?}");
}

/// `kubectl exec -it`: an exec with a terminal and stdin through containerd's streaming server.
/// A terminal size set by the client is what the process sees, typed input reaches the shell,
/// its output comes back, and its exit code is reported on the status channel.
#[tokio::test(flavor = "multi_thread")]
async fn an_interactive_tty_exec_echoes_input_resizes_and_reports_its_exit_code() {
    require_containerd!();
    let mut cri = Cri::start().await.expect("containerd with CRI starts");
    let pod = cri.run_pod("interactive", HULL).await;
    let id = cri.start_container(&pod, container_config("shell", &["sleep", "1000"], 0)).await;

    let mut s = cri.exec_stream(&id, &["sh"], true, true).await;
    s.send(4, br#"{"Width":100,"Height":30}"#).await;
    // The resize travels containerd → shim → agent while the shell starts: ask until the
    // shell sees it.
    let mut seen = String::new();
    for _ in 0..40 {
        s.send(0, b"stty size\n").await;
        let (out, status) = s.collect(1, Some(3), Duration::from_millis(500), |o| o.contains("30 100")).await;
        assert!(status.is_none(), "the shell ended early: {status:?}; output: {seen}{out}");
        seen.push_str(&out);
        if seen.contains("30 100") {
            break;
        }
    }
    assert!(seen.contains("30 100"), "the terminal never had the size the client set: {seen:?}");
    s.send(0, b"echo typed-$((6*7)); exit 3\n").await;
    let (out, status) = s.collect(1, Some(3), Duration::from_secs(30), |_| false).await;
    assert!(out.contains("typed-42"), "the shell's answer to typed input: {out:?}");
    let status = status.unwrap_or_else(|| panic!("no exit status; output: {out:?}"));
    assert!(status.contains(r#""reason":"ExitCode","message":"3""#), "exit code 3 reported: {status}");

    cri.remove_pod(&pod).await;
    let left = cri.wait_no_pod_processes(Duration::from_secs(30)).await;
    assert!(left.is_ok(), "left: {left:?}");
}

/// `kubectl port-forward`: containerd dials localhost:PORT in the pod's network namespace on
/// the host; the server listens in the guest, and its answer comes back through the forward.
#[tokio::test(flavor = "multi_thread")]
async fn a_port_forward_reaches_a_server_in_the_pod() {
    require_containerd!();
    let mut cri = Cri::start().await.expect("containerd with CRI starts");
    let pod = cri.run_pod("forwarded", HULL).await;
    let web = cri.start_container(&pod, container_config("web", hull_tests::cri::HTTPD, 0)).await;
    // Served inside the pod before anything is forwarded.
    let local = hull_tests::cri::fetch(&mut cri, &web, "127.0.0.1").await;
    assert!(local.contains("hello from forwarded"), "{local}");

    for round in 0..2 {
        let mut s = cri.port_forward(&pod, 8080).await;
        s.send(0, b"GET / HTTP/1.0\r\n\r\n").await;
        let (out, _) = s.collect(0, None, Duration::from_secs(30), |o| o.contains("hello from forwarded")).await;
        assert!(out.contains("200 OK") && out.contains("hello from forwarded"), "round {round}: the pod's server through the forward: {out:?}\n{}", cri.containerd.log());
    }

    cri.remove_pod(&pod).await;
    let left = cri.wait_no_pod_processes(Duration::from_secs(30)).await;
    assert!(left.is_ok(), "left: {left:?}");
}
