//! How a VM process is started: inside `hull-vmm jail` (the default; see hull-vmm's `jail`
//! module) or, with `jail = false`, directly. A hypervisor asks a `Placement` where the process
//! sees each file (the jail's `/kernel` or the host path) and for the command that starts it;
//! what the process needs from the host (`Needs`) decides what the jail holds and who the
//! process is.
//!
//! ```text
//! <vm dir>/root/R/ the `/` of the jail of role R (vmm, qemu, vhost-user-fs, ...): mount points
//!                  only, created by the jail in its own namespace
//! <vm dir>/run/    the VM's sockets, the jail's `/run`: a small tmpfs of its own (`RUN_TMPFS`), owned by
//!                  the jail's uid
//! ```

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::{GuestRoot, HypervisorError, VmDir, VmSpec};

/// The unprivileged ids a jailed pod process runs as when it needs no capability (see
/// `Config::jail_uid`), and what that uid may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Jail {
    pub uid: u32,
    pub gid: u32,
    /// RLIMIT_NPROC: the most processes and threads the uid may have. It counts every process
    /// of the uid, which is why each pod leases a uid of its own.
    pub max_processes: u64,
    /// Whether `uid` came from `lease`: then every jail of the pod holds the lease too (a
    /// shared lock on the uid's lock file) until its process has ended.
    pub leased: bool,
}

/// Where a pod's hold on its jail uid is kept: one lock file per uid (root's alone).
const UID_LOCKS: &str = "/run/hull/uids";

fn uid_lock(uid: u32) -> PathBuf {
    Path::new(UID_LOCKS).join(uid.to_string())
}

/// A pod's hold on its jail uid, from `Jail::lease` until dropped and every jail of the pod has
/// ended. The hold is a shared flock of the uid's lock file, taken by the shim and by each
/// `hull-vmm jail` (`--hold-lock`), so it ends with the last of them, even one that is killed:
/// a shim that dies leaves the uid leased while its pod's processes still run as it. A new
/// lease needs the exclusive lock, which no holder allows.
#[derive(Debug)]
pub struct UidLease {
    pub uid: u32,
    _lock: std::fs::File,
}

impl Jail {
    /// This jail with a uid of its own: the first of `count` uids from `self.uid` that no live
    /// pod holds. Two pods never share a uid, so neither one's processes count against the
    /// other's limit, and neither may signal or ptrace the other's.
    pub fn lease(self, count: u32) -> Result<(Jail, UidLease), HypervisorError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let dir = Path::new(UID_LOCKS);
        let dir_err = |source| HypervisorError::Dir { path: dir.into(), source };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(dir_err)?;
        // SAFETY (both): flock on a descriptor this function owns; no memory is passed.
        let flock = |file: &std::fs::File, how: libc::c_int| if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
        for uid in (0..count).map_while(|i| self.uid.checked_add(i)) {
            let path = uid_lock(uid);
            let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&path).map_err(|source| HypervisorError::Dir { path: path.clone(), source })?;
            // Exclusive: no one holds the uid. Then shared, so that the pod's jails can hold it
            // too. Linux converts a lock under the file's lock list's spinlock, so nobody gets
            // in between; flock(2) does not promise that, and should another lease take the
            // uid there, this downgrade fails and this lease looks further.
            match flock(&file, libc::LOCK_EX).and_then(|()| flock(&file, libc::LOCK_SH)) {
                Ok(()) => return Ok((Jail { uid, leased: true, ..self }, UidLease { uid, _lock: file })),
                Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => continue,
                Err(source) => return Err(HypervisorError::Dir { path, source }),
            }
        }
        Err(HypervisorError::NoJailUid { first: self.uid, count })
    }
}

/// Kills what the `hull-vmm jail` of pid `waiter` runs, and not the waiter: the waiter reaps
/// it and exits, and its hold on the pod's uid lease ends only then, with the last process that
/// ran as the uid. Whether there was such a process (a VM process started unjailed has none).
pub fn kill_jailed(waiter: u32) -> bool {
    let children = std::fs::read_to_string(format!("/proc/{waiter}/task/{waiter}/children")).unwrap_or_default();
    let mut killed = false;
    for pid in children.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
        killed |= nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).is_ok();
    }
    killed
}

/// What a VM process needs from the host.
#[derive(Debug, Clone, Copy, Default)]
pub struct Needs<'a> {
    /// The guest kernel and initramfs (a VMM).
    pub kernel: bool,
    /// /dev/kvm.
    pub kvm: bool,
    /// The pod's share, served as the guest's file owners: uid 0 with the virtio-fs server's
    /// capabilities (`FS_SERVER_CAPS`) instead of the unprivileged uid.
    pub share: bool,
    /// The VM's memory directory (`prepare_memory`), writable at `/memory`.
    pub memory: bool,
    /// A snapshot to restore (a directory), read-only at `/snapshot`.
    pub snapshot: Option<&'a Path>,
}

/// Where a jailed VM process sees the snapshot it restores (`Needs::snapshot`).
pub const SNAPSHOT_IN_JAIL: &str = "/snapshot";

/// Read-only system directories a dynamically linked program needs (the jail binds the ones
/// this host has; on a merged-/usr host /lib and /lib64 are links into /usr). A static program
/// outside them (hull-vmm, built static-pie) gets none: a VM process taken over by its guest
/// then finds no host program, library or loader in its jail to run.
const SYSTEM_DIRS: &[&str] = &["/usr", "/lib", "/lib64"];

/// Whether `program` needs the system directories: it is not an ELF executable this can read
/// whole headers of (a script's interpreter, say, lives there), or it names a dynamic loader
/// (a PT_INTERP program header).
fn needs_system_dirs(program: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    const PT_INTERP: u32 = 3;
    let interp = || -> std::io::Result<bool> {
        let mut file = std::fs::File::open(program)?;
        let mut header = [0u8; 64];
        file.read_exact(&mut header)?;
        // A 64-bit little-endian ELF (the only kind this x86-64 host runs natively).
        if header[..6] != [0x7f, b'E', b'L', b'F', 2, 1] {
            return Ok(true);
        }
        let le16 = |at: usize| u16::from_le_bytes([header[at], header[at + 1]]) as u64;
        let phoff = u64::from_le_bytes(header[0x20..0x28].try_into().unwrap_or_default());
        let (phentsize, phnum) = (le16(0x36), le16(0x38));
        if phentsize < 4 || phnum == 0 || phnum > 256 {
            return Ok(true);
        }
        let mut headers = vec![0u8; (phentsize * phnum) as usize];
        file.seek(SeekFrom::Start(phoff))?;
        file.read_exact(&mut headers)?;
        Ok(headers.chunks_exact(phentsize as usize).any(|ph| u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_INTERP))
    };
    interp().unwrap_or(true)
}

/// Where the processes of one VM find things, and how they start.
pub struct Placement<'a> {
    pub spec: &'a VmSpec,
    pub dir: &'a VmDir,
    /// hull-vmm on the host: the jail itself, and the device backends.
    pub vmm: &'a Path,
}

fn root_in_jail(root: &GuestRoot) -> &'static str {
    match root {
        GuestRoot::Image(_) => "/image",
        GuestRoot::Initramfs(_) => "/initramfs",
    }
}

impl Placement<'_> {
    fn jailed(&self) -> bool {
        self.spec.jail.is_some()
    }

    fn seen(&self, jailed: &str, host: &Path) -> PathBuf {
        if self.jailed() { PathBuf::from(jailed) } else { host.to_path_buf() }
    }

    pub fn kernel(&self) -> PathBuf {
        self.seen("/kernel", &self.spec.kernel)
    }

    /// The guest's root (image or initramfs), as a VM process sees it.
    pub fn root(&self) -> PathBuf {
        self.seen(root_in_jail(&self.spec.root), self.spec.root.path())
    }

    /// The share as the process serving it sees it.
    pub fn share(&self) -> Option<PathBuf> {
        self.spec.share.as_ref().map(|s| self.seen("/share", &s.dir))
    }

    /// The VM's memory directory (`prepare_memory`), as a VM process sees it.
    pub fn memory_dir(&self) -> PathBuf {
        self.seen("/memory", &self.dir.memory())
    }

    /// A snapshot directory on the host, as the VM process restoring it sees it.
    pub fn snapshot(&self, host: &Path) -> PathBuf {
        self.seen(SNAPSHOT_IN_JAIL, host)
    }

    /// The guest RAM file (`prepare_memory`), as a VM process sees it.
    pub fn memory_file(&self) -> PathBuf {
        if self.jailed() { Path::new("/memory").join(RAM_FILE) } else { self.dir.memory().join(RAM_FILE) }
    }

    /// A socket in the VM's socket directory, as a VM process sees it.
    pub fn socket(&self, name: &str) -> PathBuf {
        if self.jailed() { Path::new("/run").join(name) } else { self.dir.run().join(name) }
    }

    /// The command that runs `program` (a host path; a bare name is looked up in PATH) with
    /// `args`, jailed for `needs` unless the VM runs unjailed. `role` names the process's own
    /// jail root (`<vm dir>/root/<role>/`): no process sees even the mount points of another's
    /// binds.
    pub fn command(&self, role: &str, program: &Path, args: Vec<OsString>, needs: Needs<'_>) -> Result<Command, HypervisorError> {
        let Some(jail) = self.spec.jail else {
            let mut cmd = Command::new(program);
            cmd.args(args);
            return Ok(cmd);
        };
        let program = resolve(program)?;
        // A program of the system directories keeps its path (QEMU finds its firmware relative
        // to its own); any other is bound in at the root.
        let system = SYSTEM_DIRS.iter().any(|d| program.starts_with(d));
        let inside = if system { program.clone() } else { Path::new("/").join(program.file_name().unwrap_or("program".as_ref())) };
        let root = self.dir.jail_root().join(role);
        ensure_dir(&root, 0o755)?;
        let mut cmd = Command::new(self.vmm);
        cmd.args(["--log-level", "warn"]);
        if self.spec.open_files > 0 {
            // Inherited by the jailed process (QEMU has no limit of its own).
            cmd.args(["--open-files", &self.spec.open_files.to_string()]);
        }
        cmd.args(["jail", "--root"]).arg(&root);
        let mut bind = |source: &Path, target: &Path, ro: bool| {
            let mut arg = OsString::from(source);
            arg.push(":");
            arg.push(target);
            if ro {
                arg.push(":ro");
            }
            cmd.arg("--bind").arg(arg);
        };
        if !system {
            bind(&program, &inside, true);
        }
        if system || needs_system_dirs(&program) {
            for dir in SYSTEM_DIRS.iter().map(Path::new).filter(|d| d.exists()) {
                bind(dir, dir, true);
            }
        }
        bind(&self.dir.run(), Path::new("/run"), false);
        if needs.kernel {
            bind(&self.spec.kernel, Path::new("/kernel"), true);
            bind(self.spec.root.path(), Path::new(root_in_jail(&self.spec.root)), true);
        }
        if needs.memory {
            bind(&self.dir.memory(), Path::new("/memory"), false);
        }
        if let Some(snapshot) = needs.snapshot {
            bind(snapshot, Path::new(SNAPSHOT_IN_JAIL), true);
        }
        if needs.kvm {
            // A node of the process's own in a /dev private to the jail (hull-vmm's `jail`).
            bind(Path::new("/dev/kvm"), Path::new("/dev/kvm"), false);
        }
        let share = needs.share.then_some(self.spec.share.as_ref()).flatten();
        if let Some(share) = share {
            // As the host made it: the share's top read-only, the containers' rootfs writable.
            bind(&share.dir, Path::new("/share"), false);
            // uid 0 with only a file server's capabilities (hull-vmm's `jail::FS_SERVER_CAPS`)
            // and its own /proc/self.
            cmd.arg("--fs-server");
        } else {
            cmd.args(["--user", &format!("{}:{}", jail.uid, jail.gid), "--max-processes", &jail.max_processes.to_string()]);
        }
        if jail.leased {
            cmd.arg("--hold-lock").arg(uid_lock(jail.uid));
        }
        cmd.arg("--").arg(&inside).args(args);
        Ok(cmd)
    }

    /// Gives a socket a uid-0 backend made to the jail's uid, so the unprivileged VMM can
    /// connect to it (the directory is the jail's alone; the socket stays owner-only).
    pub fn hand_socket_to_jail(&self, name: &str) -> Result<(), HypervisorError> {
        let Some(jail) = self.spec.jail else { return Ok(()) };
        let path = self.dir.run().join(name);
        std::os::unix::fs::lchown(&path, Some(jail.uid), Some(jail.gid)).map_err(|source| HypervisorError::Dir { path, source })
    }
}

/// Creates the VM's socket directory (owned by the jail's uid, owner-only) and the jail's root
/// for a new VM. A host service that serves a guest's connections to host port P listens at
/// `run/vsock.sock_P` (a socket the jail's uid can write to); the VM's own sockets left by an
/// earlier VM of this directory are removed, so that none answers for this one.
pub(crate) fn prepare_dirs(spec: &VmSpec, dir: &VmDir) -> Result<(), HypervisorError> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| HypervisorError::Dir { path, source }
    };
    let run = dir.run();
    ensure_dir(&run, 0o700)?;
    for stale in ["vsock.sock", "vhost-vsock.sock", "vhost-fs.sock"] {
        let _ = std::fs::remove_file(run.join(stale));
    }
    if let Some(jail) = spec.jail {
        let root = dir.jail_root();
        std::fs::DirBuilder::new().recursive(true).mode(0o755).create(&root).map_err(err(&root))?;
        own_tmpfs(&run, jail)?;
        std::os::unix::fs::chown(&run, Some(jail.uid), Some(jail.gid)).map_err(err(&run))?;
    }
    Ok(())
}

/// The guest RAM file in the VM's memory directory.
pub const RAM_FILE: &str = "ram";

/// Gives the VM a memory directory, `memory/`, on a tmpfs of its own sized to the guest's RAM
/// (and two names), owned by the VM's uid: guest RAM in a file there (`RAM_FILE`), not an
/// anonymous memfd, is what a snapshot saves and a restored VM starts from (`snapshot`). Its
/// own tmpfs, not the host's `/run`: a full guest fills this one only. Returns the RAM file's
/// host path.
pub(crate) fn prepare_memory(spec: &VmSpec, dir: &VmDir) -> Result<PathBuf, HypervisorError> {
    let memory = dir.memory();
    ensure_dir(&memory, 0o700)?;
    let (uid, gid) = spec.jail.map(|j| (j.uid, j.gid)).unwrap_or((0, 0));
    // Guest RAM, or a builtin template's snapshot: its memory (at most the guest's RAM) and
    // its state (at most 16 MiB).
    mount_own_tmpfs(&memory, &format!("size={}m,nr_inodes=4", spec.memory_mib + 16), uid, gid)?;
    Ok(memory.join(RAM_FILE))
}

/// Creates the directory `path` with `mode`, or keeps the one already there.
fn ensure_dir(path: &Path, mode: u32) -> Result<(), HypervisorError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(HypervisorError::Dir { path: path.into(), source: e }),
        _ => Ok(()),
    }
}

/// What a pod's jailed processes may store in `run/`, the one host directory they can write:
/// sockets need inodes, not pages, so a little space and a few thousand names serve every pod;
/// on the host's `/run` a VM process taken over by its guest could fill the host's tmpfs.
const RUN_TMPFS: &str = "size=1m,nr_inodes=4096";

/// Mounts a tmpfs of its own (`RUN_TMPFS`) on the VM's `run/`, once: a VM directory reused
/// for a new VM keeps the mount it has. `teardown`'s unmount of the pod's tree removes it.
fn own_tmpfs(run: &Path, jail: Jail) -> Result<(), HypervisorError> {
    mount_own_tmpfs(run, RUN_TMPFS, jail.uid, jail.gid)
}

/// Mounts a tmpfs with `options` on `path`, owner-only for `uid`, unless one is there already.
fn mount_own_tmpfs(path: &Path, options: &str, uid: u32, gid: u32) -> Result<(), HypervisorError> {
    use std::os::unix::fs::MetadataExt;
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).map_err(|source| HypervisorError::Dir { path: p.into(), source });
    let parent = path.parent().unwrap_or(Path::new("/"));
    if dev(path)? != dev(parent)? {
        return Ok(());
    }
    let data = format!("{options},mode=0700,uid={uid},gid={gid}");
    use nix::mount::MsFlags;
    nix::mount::mount(Some("tmpfs"), path, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, Some(data.as_str()))
        .map_err(|e| HypervisorError::Dir { path: path.into(), source: e.into() })
}

/// Whether this host can jail pod processes: runs `hull-vmm --version` in a jail as a VM
/// process would run (namespaces, the per-pod root, the unprivileged uid) under `scratch`, a
/// directory this removes afterwards. Returns what hull-vmm printed.
pub fn check(vmm: &Path, jail: Jail, scratch: &Path) -> Result<String, HypervisorError> {
    let dir = VmDir::new(scratch);
    let spec = VmSpec {
        kernel: PathBuf::new(),
        root: GuestRoot::Initramfs(PathBuf::new()),
        vcpus: 1,
        memory_mib: 0,
        guest_cid: 0,
        cmdline_extra: Vec::new(),
        vmm_extra: Vec::new(),
        share: None,
        nic: None,
        log_cap: 0,
        open_files: 0,
        jail: Some(jail),
    };
    std::fs::create_dir_all(scratch).map_err(|source| HypervisorError::Dir { path: scratch.into(), source })?;
    let result = prepare_dirs(&spec, &dir).and_then(|()| {
        let at = Placement { spec: &spec, dir: &dir, vmm };
        // With /dev/kvm where there is one: the jail makes its own node, which needs CAP_MKNOD
        // and the device cgroup's leave.
        let needs = Needs { kvm: Path::new("/dev/kvm").exists(), ..Needs::default() };
        let mut cmd = at.command("check", vmm, vec!["--version".into()], needs)?;
        let out = cmd.as_std_mut().output().map_err(|source| HypervisorError::Spawn { what: "hull-vmm jail", source })?;
        let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() {
            Ok(printed)
        } else {
            Err(HypervisorError::BackendExited { what: "hull-vmm jail", status: out.status.to_string(), log: String::from_utf8_lossy(&out.stderr).trim().into() })
        }
    });
    let _ = nix::mount::umount2(&dir.run(), nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir_all(scratch);
    result
}

/// `program` as an absolute host path (a bare name looked up in PATH, as exec would).
pub(crate) fn resolve(program: &Path) -> Result<PathBuf, HypervisorError> {
    let found = if program.components().count() > 1 {
        Some(program.to_path_buf())
    } else {
        std::env::var_os("PATH").and_then(|path| std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file()))
    };
    let found = found.ok_or_else(|| HypervisorError::Missing { what: "The program", path: program.into() })?;
    std::fs::canonicalize(&found).map_err(|_| HypervisorError::Missing { what: "The program", path: found })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dynamically linked program (the host's shell), a script and a file that is not there
    /// get the system directories; this test, built static-pie as hull's programs are, does not.
    #[test]
    fn only_programs_with_a_loader_get_the_system_directories() {
        let exe = std::env::current_exe().unwrap();
        assert!(!needs_system_dirs(&exe), "{} is static-pie (.cargo/config.toml)", exe.display());
        let shell = std::fs::canonicalize("/bin/sh").unwrap();
        assert!(needs_system_dirs(&shell), "{} has a loader", shell.display());
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\ntrue\n").unwrap();
        assert!(needs_system_dirs(&script));
        assert!(needs_system_dirs(&dir.path().join("missing")));
    }

    /// Leases exclude each other while held and free their uid when dropped. (A range far from
    /// the default one, so that pods running beside the test are not in the way.)
    #[test]
    fn a_leased_uid_is_nobody_elses_until_released() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (writes {UID_LOCKS})");
            return;
        }
        let base = Jail { uid: 3_000_000_000 + std::process::id() % 1_000_000 * 4, gid: 3_000_000_000, max_processes: 64, leased: false };
        let (a, lease_a) = base.lease(2).unwrap();
        let (b, _lease_b) = base.lease(2).unwrap();
        assert_eq!((a.uid, b.uid), (base.uid, base.uid + 1));
        assert_eq!((a.gid, a.max_processes), (base.gid, 64));
        assert!(matches!(base.lease(2), Err(HypervisorError::NoJailUid { count: 2, .. })));
        drop(lease_a);
        assert_eq!(base.lease(2).unwrap().0.uid, base.uid, "a released uid is leased again");
    }
}
