//! `hull-vmm jail` as a hostile program inside it would find it: a static busybox runs in the
//! jail and tries to see and change the host.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};

const VMM: &str = env!("CARGO_BIN_EXE_hull-vmm");
const BUSYBOX: &str = "/bin/busybox";
const UID: &str = "2000000000:2000000000";

/// Skips (saying why) where the jail cannot be tested: it needs root, and a static busybox to
/// run inside (scripts/setup installs busybox-static).
fn missing() -> Option<&'static str> {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("hull-vmm jail needs root")
    } else if !Path::new(BUSYBOX).exists() {
        Some("no /bin/busybox (busybox-static)")
    } else {
        None
    };
    if let Some(why) = why {
        assert!(std::env::var_os("HULL_REQUIRE_ALL").is_none(), "prerequisite missing under HULL_REQUIRE_ALL: {why}");
        eprintln!("SKIP: {why}");
    }
    why
}

/// Runs `sh -c script` in a jail rooted in `root` with `extra` arguments before `--`.
fn jailed(root: &Path, extra: &[&str], script: &str) -> Output {
    let mut cmd = Command::new(VMM);
    cmd.args(["--log-level", "warn", "jail", "--root"]).arg(root).arg("--bind").arg(format!("{BUSYBOX}:/busybox:ro")).args(extra);
    cmd.args(["--", "/busybox", "sh", "-c", script]).output().expect("hull-vmm runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn an_unprivileged_jail_shows_nothing_of_the_host_and_changes_nothing() {
    if missing().is_some() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let run = dir.path().join("run");
    std::fs::create_dir(&root).expect("root");
    std::fs::create_dir(&run).expect("run");
    std::os::unix::fs::chown(&run, Some(2_000_000_000), Some(2_000_000_000)).expect("chown run");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "host").expect("secret");
    let ro = format!("{}:/secret:ro", secret.display());
    let rw = format!("{}:/run", run.display());
    let script = "\
        /busybox id -u; /busybox id -g; \
        /busybox ls /etc && echo SAW-ETC; \
        /busybox ls /proc/1 && echo SAW-PROC; \
        /busybox touch /planted && echo WROTE-ROOT; \
        echo tenant > /secret && echo WROTE-SECRET; \
        echo mine > /run/file && echo wrote-run; \
        /busybox hostname; echo pid $$; \
        exit 7";
    let out = jailed(&root, &["--bind", &ro, "--bind", &rw, "--user", UID], script);
    let printed = text(&out.stdout);
    assert_eq!(out.status.code(), Some(7), "the jail exits as its program did: {printed} {}", text(&out.stderr));
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines[..2], ["2000000000", "2000000000"], "runs as the unprivileged ids: {printed}");
    for bad in ["SAW-ETC", "SAW-PROC", "WROTE-ROOT", "WROTE-SECRET"] {
        assert!(!printed.contains(bad), "{bad}: {printed}");
    }
    assert!(printed.contains("wrote-run") && printed.contains("hull-jail") && printed.contains("pid 1\n"), "{printed}");
    assert_eq!(std::fs::read_to_string(&secret).expect("secret"), "host");
    assert_eq!(std::fs::read_to_string(run.join("file")).expect("the jail's write reaches its bind"), "mine\n");
    assert!(!root.join("planted").exists());
    assert_eq!(std::fs::metadata(run.join("file")).expect("file").uid(), 2_000_000_000);
    // Nothing stays mounted on the host: the jail's mounts were its namespace's.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mounts.contains(&root.display().to_string()), "a jail mount leaked to the host: {mounts}");
}

#[test]
fn a_jail_keeps_only_the_named_capabilities_and_its_own_proc_self() {
    if missing().is_some() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, work) = (dir.path().join("root"), dir.path().join("work"));
    std::fs::create_dir(&root).expect("root");
    std::fs::create_dir(&work).expect("work");
    // Another user's private file, and one to hand over.
    for name in ["private", "handed"] {
        std::fs::write(work.join(name), "theirs").expect("file");
        std::os::unix::fs::chown(work.join(name), Some(5), Some(5)).expect("chown");
        std::fs::set_permissions(work.join(name), std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    }
    let script = "\
        /busybox id -u; /busybox ls /proc; /busybox ls /proc/self; \
        /busybox ls /proc/self/fd && echo fds; \
        /busybox chown 7:7 /work/handed && echo chowned; \
        /busybox cat /work/private && echo READ-PRIVATE; \
        /busybox hostname tenant && echo SET-HOSTNAME; \
        echo c > /proc/sysrq-trigger && echo SYSRQ; \
        /busybox chown 5:5 /busybox && echo CHOWNED-RO; \
        /busybox mknod /work/null c 1 3 && echo made-node; \
        echo x > /work/null && echo USED-NODE; \
        exit 3";
    let bind = format!("{}:/work", work.display());
    let out = jailed(&root, &["--bind", &bind, "--proc-self", "--keep-cap", "chown", "--keep-cap", "CAP_FOWNER", "--keep-cap", "mknod"], script);
    let printed = text(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{printed} {}", text(&out.stderr));
    // uid 0, and /proc holds only `self` with only fd and mountinfo.
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines[..4], ["0", "self", "fd", "mountinfo"], "{printed}");
    // CAP_CHOWN kept; CAP_DAC_OVERRIDE and CAP_SYS_ADMIN gone; read-only binds hold for uid 0.
    assert!(printed.contains("fds") && printed.contains("chowned"), "{printed}");
    // A device node made through a writable bind (CAP_MKNOD) is inert: the bind is nodev.
    assert!(printed.contains("made-node"), "{printed}");
    for bad in ["READ-PRIVATE", "SET-HOSTNAME", "SYSRQ", "CHOWNED-RO", "USED-NODE"] {
        assert!(!printed.contains(bad), "{bad}: {printed}");
    }
    assert_eq!(std::fs::metadata(work.join("handed")).expect("handed").uid(), 7);
}

#[test]
fn a_jail_names_what_it_cannot_bind() {
    if missing().is_some() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let out = jailed(dir.path(), &["--bind", "/nonexistent/kernel:/kernel:ro", "--user", UID], "true");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("/nonexistent/kernel"), "stderr: {err}");
    let out = jailed(dir.path(), &["--bind", "/usr:/../escape", "--user", UID], "true");
    assert!(!out.status.success() && text(&out.stderr).contains("/../escape"), "{}", text(&out.stderr));
    // A device node is made in the jail's own /dev only (a tmpfs there would hide anything else).
    let out = jailed(dir.path(), &["--bind", "/dev/null:/null", "--user", UID], "true");
    assert!(!out.status.success() && text(&out.stderr).contains("A device goes into the jail's /dev"), "{}", text(&out.stderr));
}

/// The jailed busybox under the waiter `waiter`, once it has exec'd (before, it is still a
/// hull-vmm).
fn jailed_busybox(waiter: u32) -> String {
    let children = format!("/proc/{waiter}/task/{waiter}/children");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let found = std::fs::read_to_string(&children).unwrap_or_default().split_whitespace().next().map(String::from);
        if let Some(pid) = found.filter(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "busybox")) {
            return pid;
        }
        assert!(std::time::Instant::now() < deadline, "no jailed process under {waiter}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A shared flock on `path` (true), or false where an exclusive one holds it.
fn try_flock(path: &Path, how: libc::c_int) -> (bool, std::fs::File) {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).expect("open the lock file");
    // SAFETY: flock on a descriptor the test owns.
    let ok = unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } == 0;
    (ok, file)
}

/// `--hold-lock` keeps a pod's uid lease for as long as its jailed process runs: the runtime
/// that took the lease dies (its lock goes), and still no new lease (an exclusive lock) is
/// possible until the jailed process has ended; the jailed process itself holds no descriptor
/// of the lock (it could unlock the lease through one).
#[test]
fn a_jail_holds_the_lock_it_is_given_until_its_process_ends() {
    if missing().is_some() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let lock = dir.path().join("lock");
    std::fs::write(&lock, "").expect("lock file");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("root");
    let (shared, runtime) = try_flock(&lock, libc::LOCK_SH);
    assert!(shared, "the runtime's shared lock");
    let mut jail = Command::new(VMM)
        .args(["--log-level", "warn", "jail", "--root"])
        .arg(&root)
        .arg("--bind")
        .arg(format!("{BUSYBOX}:/busybox:ro"))
        .args(["--user", UID, "--hold-lock"])
        .arg(&lock)
        .args(["--", "/busybox", "sleep", "1000"])
        .spawn()
        .expect("hull-vmm runs");
    let child = jailed_busybox(jail.id());
    drop(runtime);
    assert!(!try_flock(&lock, libc::LOCK_EX).0, "a new lease took the lock while the jailed process runs");
    let fds: Vec<_> = std::fs::read_dir(format!("/proc/{child}/fd")).expect("the jailed process's fds").flatten().filter_map(|e| std::fs::read_link(e.path()).ok()).collect();
    assert!(!fds.contains(&lock), "the jailed process holds the lock's descriptor: {fds:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.parse().expect("pid")), nix::sys::signal::Signal::SIGKILL).expect("kill the jailed process");
    jail.wait().expect("reap the jail");
    assert!(try_flock(&lock, libc::LOCK_EX).0, "the lock is free once the jail has ended");
}

/// Killing `hull-vmm jail` (what the runtime does to end a pod process) kills the jailed
/// process too, also after it gave up root (the kernel clears the parent-death signal when the
/// uid changes): an unprivileged VMM must not outlive its pod.
#[test]
fn killing_the_jail_kills_the_jailed_process() {
    if missing().is_some() {
        return;
    }
    for user in [&["--user", UID][..], &["--keep-cap", "chown"][..]] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(VMM);
        cmd.args(["--log-level", "warn", "jail", "--root"]).arg(dir.path()).arg("--bind").arg(format!("{BUSYBOX}:/busybox:ro")).args(user);
        let mut jail = cmd.args(["--", "/busybox", "sleep", "1000"]).spawn().expect("hull-vmm runs");
        let child = jailed_busybox(jail.id());
        jail.kill().expect("kill the jail");
        jail.wait().expect("reap the jail");
        let gone = || !Path::new(&format!("/proc/{child}")).exists() || std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|s| s.contains(") Z "));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !gone() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(gone(), "the jailed process {child} ({user:?}) outlived its jail");
    }
}

/// A device bound into an unprivileged jail is usable even where the host's node is root's
/// alone (a host without udev has /dev/kvm 0600 root:root): the jail's node is the jailed
/// uid's, owner-only, in a read-only /dev (no chmod, no new node), and the host's node is as
/// it was.
#[test]
fn an_unprivileged_jail_uses_a_root_only_device_without_changing_the_hosts_node() {
    if missing().is_some() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let host_node = dir.path().join("null");
    nix::sys::stat::mknod(&host_node, nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::from_bits_truncate(0o600), nix::sys::stat::makedev(1, 3)).expect("mknod");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("root");
    let bind = format!("{}:/dev/null", host_node.display());
    let script = "echo hidden > /dev/null && echo written; /busybox stat -c '%u %a' /dev/null; /busybox chmod 666 /dev/null || echo no-chmod; /busybox mknod /dev/other c 1 3 || echo no-new-node";
    let out = jailed(&root, &["--bind", &bind, "--user", UID], script);
    let uid = UID.split(':').next().unwrap_or_default();
    assert_eq!(text(&out.stdout), format!("written\n{uid} 600\nno-chmod\nno-new-node\n"), "{}", text(&out.stderr));
    let meta = std::fs::metadata(&host_node).expect("host node");
    assert_eq!((meta.uid(), std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777), (0, 0o600), "the host's node changed");
}

/// `--max-processes` bounds the jail uid's processes and threads (RLIMIT_NPROC): a jailed shell
/// that forks without end is refused beyond the limit, and one without the limit is not. (A uid
/// of this test's own: the limit counts every process of the uid.)
#[test]
fn a_jail_uid_cannot_fork_past_its_process_limit() {
    if missing().is_some() {
        return;
    }
    let id = 2_100_000_000 + std::process::id() % 1_000_000;
    let user = format!("{id}:{id}");
    // Prints how many sleeps it started; the shell stops at its first failed fork.
    let script = "i=0; while [ $i -lt 20 ]; do /busybox sleep 30 & i=$((i+1)); echo $i; done; echo forked";
    let dir = tempfile::tempdir().expect("tempdir");
    let started = |out: &Output| text(&out.stdout).lines().filter_map(|l| l.parse::<u32>().ok()).max().unwrap_or(0);
    // The shell gives a background job /dev/null as its stdin.
    let null = "/dev/null:/dev/null";
    let limited = jailed(dir.path(), &["--bind", null, "--user", &user, "--max-processes", "8"], script);
    // The waiter and the shell count too: at most 6 sleeps fit under 8.
    assert!(started(&limited) <= 6 && text(&limited.stderr).contains("can't fork"), "RLIMIT_NPROC 8 let {} sleeps start: {}", started(&limited), text(&limited.stderr));
    let free = jailed(dir.path(), &["--bind", null, "--user", &user], script);
    assert!(started(&free) == 20 && text(&free.stdout).contains("forked"), "without the limit every fork works: {}", text(&free.stderr));
}
