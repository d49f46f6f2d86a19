//! The jail every host process of a pod VM runs in (`hull-vmm jail ... -- PROGRAM ARGS`): the
//! role of Firecracker's jailer and of virtiofsd's namespace sandbox, for hull-vmm and QEMU
//! alike.
//!
//! `hull-vmm jail`, started as root, makes new mount, pid, ipc, uts and network namespaces and
//! forks. The child is PID 1 of the new pid namespace: it makes a per-pod directory its root
//! (holding only what the caller binds in: the kernel, the initramfs, /dev/kvm, the program and
//! its libraries, the VM's socket directory, the share), makes that root read-only, gives up
//! root (an unprivileged uid/gid) or every capability but the ones the caller names, sets
//! `no_new_privs` and no core dumps (a dump would hold guest memory), and execs the program.
//! The parent stays outside the pid namespace as the process its starter watches: it takes the
//! child's uid, gives up every capability, installs a seccomp filter that allows little more
//! than waiting, and exits
//! as the child did (a signal N as 128+N). Killing the parent kills the child (the parent-death
//! signal), and with it, as PID 1, everything in the jail.
//!
//! Nothing is mounted in the host's namespace: every mount is made in the jail's own, so it goes
//! with the jail's last process and there is nothing to clean up.

use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use caps::{CapSet, Capability, CapsHashSet};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{ForkResult, Gid, Uid};

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("The jail's root {0:?} is not an existing directory.")]
    Root(PathBuf),
    #[error("The path {0:?} inside the jail must be absolute and without '..'.")]
    Target(PathBuf),
    #[error("A device goes into the jail's /dev, not at {0:?}.")]
    DeviceTarget(PathBuf),
    #[error("Cannot bind {source_path:?} into the jail: it does not exist.")]
    MissingSource { source_path: PathBuf },
    #[error("Cannot make new namespaces for the jail (hull-vmm jail needs root): {0}.")]
    Unshare(#[source] nix::Error),
    #[error("Cannot fork the jailed process: {0}.")]
    Fork(#[source] nix::Error),
    #[error("Cannot create the mount point {path:?} in the jail: {source}.")]
    MountPoint { path: PathBuf, source: std::io::Error },
    #[error("Cannot {what} {path:?} in the jail: {source}.")]
    Mount { what: &'static str, path: PathBuf, source: nix::Error },
    #[error("Cannot make the jail the process's root: {0}.")]
    PivotRoot(#[source] nix::Error),
    #[error("Cannot give up privileges in the jail ({what}): {source}.")]
    Privileges { what: &'static str, source: nix::Error },
    #[error("Cannot give up capabilities in the jail: {0}.")]
    Caps(#[source] caps::errors::CapsError),
    #[error("Cannot set a resource limit in the jail: {0}.")]
    Rlimit(#[source] nix::Error),
    #[error("The program path {0:?} holds a NUL byte.")]
    Nul(PathBuf),
    #[error("Cannot run {program:?} in the jail: {source}.")]
    Exec { program: PathBuf, source: nix::Error },
    #[error("Cannot hold a shared lock on {path:?} for the jailed process's life: {source}.")]
    HoldLock { path: PathBuf, source: std::io::Error },
    #[error("Cannot wait for the jailed process: {0}.")]
    Wait(#[source] nix::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// A host path made visible in the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailBind {
    pub source: PathBuf,
    /// Where the jailed process sees it (absolute).
    pub target: PathBuf,
    pub read_only: bool,
}

/// Who the jailed process is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JailUser {
    /// An unprivileged uid and gid: no capabilities at all.
    Unprivileged { uid: u32, gid: u32 },
    /// uid 0 with only these capabilities (a virtio-fs server acts as the guest's file owners).
    Root { keep: Vec<Capability> },
}

#[derive(Debug, Clone)]
pub struct JailConfig {
    /// The host directory that becomes the jail's `/` (read-only in the jail).
    pub root: PathBuf,
    pub binds: Vec<JailBind>,
    /// The jailed process's own `/proc/self/fd` and `/proc/self/mountinfo` (what a FUSE
    /// passthrough server needs of procfs) and nothing else of /proc.
    pub proc_self: bool,
    pub user: JailUser,
    /// RLIMIT_NPROC of an unprivileged jail: the most processes and threads its uid may have
    /// (counted over every process of that uid, so a uid per pod bounds the pod).
    pub max_processes: Option<u64>,
    /// A host file the waiter holds a shared flock on until the jailed process has ended (the
    /// runtime's lease on the pod's uid: no new pod takes the uid while a process runs as it,
    /// even after the shim that leased it died).
    pub hold_lock: Option<PathBuf>,
    /// The program to run, as the jail sees it, and its arguments.
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

/// The capabilities a virtio-fs passthrough server needs to act as the guest's file owners
/// (create files as them, chown, set modes and times, set-id bits, device nodes, file caps).
pub const FS_SERVER_CAPS: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_MKNOD,
    Capability::CAP_SETFCAP,
];

/// Checks a path inside the jail: absolute, with no `..` that could leave the root.
fn inside(root: &Path, target: &Path) -> Result<PathBuf, JailError> {
    let mut out = root.to_path_buf();
    let mut components = target.components();
    if components.next() != Some(Component::RootDir) {
        return Err(JailError::Target(target.into()));
    }
    for c in components {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => return Err(JailError::Target(target.into())),
        }
    }
    Ok(out)
}

/// Runs `config.program` in a new jail and returns its exit code (128+N for a signal N).
/// Must be called while the process has one thread (it forks).
pub fn run(config: &JailConfig) -> Result<u8, JailError> {
    if !config.root.is_dir() {
        return Err(JailError::Root(config.root.clone()));
    }
    for b in &config.binds {
        inside(&config.root, &b.target)?;
        let Ok(meta) = std::fs::metadata(&b.source) else {
            return Err(JailError::MissingSource { source_path: b.source.clone() });
        };
        if is_device(&meta) && b.target.parent() != Some(Path::new(DEV)) {
            return Err(JailError::DeviceTarget(b.target.clone()));
        }
    }
    // Opened close-on-exec: the jailed program never holds it (an unlock through any
    // descriptor of the lock's open file would end the waiter's hold).
    let _held = config.hold_lock.as_deref().map(hold_shared_lock).transpose()?;
    let flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWNET;
    nix::sched::unshare(flags).map_err(JailError::Unshare)?;
    // The child learns of the parent's death (if it comes before the parent-death signal is
    // set) by the pipe's end: the parent holds the write side until it exits.
    let (alive_r, alive_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(JailError::Fork)?;
    // SAFETY: the caller guarantees one thread, so the child inherits no lock another thread
    // holds and may allocate freely.
    match unsafe { nix::unistd::fork() }.map_err(JailError::Fork)? {
        ForkResult::Child => {
            drop(alive_w);
            let err = match child(config, alive_r) {
                Ok(never) => match never {},
                Err(e) => e,
            };
            eprintln!("hull-vmm jail: {err}");
            // SAFETY: ends the child without the parent's atexit handlers or buffers.
            unsafe { libc::_exit(126) }
        }
        ForkResult::Parent { child } => {
            drop(alive_r);
            confine_waiter(&config.user)?;
            let code = loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => break code as u8,
                    Ok(WaitStatus::Signaled(_, signal, _)) => {
                        tracing::warn!(pid = child.as_raw(), ?signal, "the jailed process was killed by a signal");
                        break 128 + signal as u8;
                    }
                    Ok(_) | Err(nix::Error::EINTR) => continue,
                    Err(e) => return Err(JailError::Wait(e)),
                }
            };
            drop(alive_w);
            Ok(code)
        }
    }
}

/// Takes a shared flock on `path` (never following a link) without waiting: the holder that
/// made the file keeps it shared too, and only a new exclusive lock (a new lease) is refused.
fn hold_shared_lock(path: &Path) -> Result<std::fs::File, JailError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| JailError::HoldLock { path: path.into(), source };
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).map_err(err)?;
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// The waiter outside the pid namespace: no capabilities, and a filter that allows waiting,
/// logging and exiting. It takes the jailed process's uid: the kernel sends the parent-death
/// signal with the dying parent's credentials, and a parent of another uid without CAP_KILL
/// may not signal the child (it would outlive its jail).
fn confine_waiter(user: &JailUser) -> Result<(), JailError> {
    drop_bounding(&[])?;
    if let JailUser::Unprivileged { uid, gid } = user {
        let priv_err = |what| move |source| JailError::Privileges { what, source };
        nix::unistd::setgroups(&[]).map_err(priv_err("setgroups"))?;
        let gid = Gid::from_raw(*gid);
        nix::unistd::setresgid(gid, gid, gid).map_err(priv_err("setresgid"))?;
        let uid = Uid::from_raw(*uid);
        nix::unistd::setresuid(uid, uid, uid).map_err(priv_err("setresuid"))?;
    }
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
        caps::clear(None, set).map_err(JailError::Caps)?;
    }
    nix::sys::prctl::set_no_new_privs().map_err(|source| JailError::Privileges { what: "no_new_privs", source })?;
    crate::seccomp::jail_waiter()?.apply()?;
    Ok(())
}

fn drop_bounding(keep: &[Capability]) -> Result<(), JailError> {
    for cap in caps::runtime::thread_all_supported() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap).map_err(JailError::Caps)?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(JailError::Caps)
}

fn mount_err(what: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> JailError {
    let path = path.to_path_buf();
    move |source| JailError::Mount { what, path, source }
}

/// Creates the mount point `target` for `source` (a directory for a directory, else a file).
fn mount_point(source: &Path, target: &Path) -> Result<(), JailError> {
    let err = |source| JailError::MountPoint { path: target.into(), source };
    if std::fs::metadata(source).map_err(err)?.is_dir() {
        std::fs::DirBuilder::new().recursive(true).mode(0o755).create(target).map_err(err)
    } else {
        if let Some(parent) = target.parent() {
            std::fs::DirBuilder::new().recursive(true).mode(0o755).create(parent).map_err(err)?;
        }
        match std::fs::OpenOptions::new().write(true).create_new(true).open(target) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(err(e)),
        }
    }
}

/// Makes this process die with its parent, and dies now if the parent is gone already (the
/// pipe's write side, held by the parent alone, is closed). The kernel clears the parent-death
/// signal when the process's credentials change, so it is set again after the uid switch.
fn die_with_parent(alive: &OwnedFd) -> Result<(), JailError> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(|source| JailError::Privileges { what: "parent-death signal", source })?;
    let mut poll = [nix::poll::PollFd::new(alive.as_fd(), nix::poll::PollFlags::POLLIN)];
    if nix::poll::poll(&mut poll, nix::poll::PollTimeout::ZERO).unwrap_or(0) > 0 {
        // SAFETY: ends the orphan at once.
        unsafe { libc::_exit(1) }
    }
    Ok(())
}

/// Adds `attr` to the mount at `path` and every mount below it.
fn restrict(path: &Path, attr: u64) -> Result<(), JailError> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Nul(path.into()))?;
    let attr = libc::mount_attr { attr_set: attr, attr_clr: 0, propagation: 0, userns_fd: 0 };
    // SAFETY: mount_setattr(2) (Linux 5.12; it only adds the flags asked for, to a whole tree)
    // reads the NUL-terminated path and the struct, both alive across the call, and its size.
    let r = unsafe { libc::syscall(libc::SYS_mount_setattr, libc::AT_FDCWD, c.as_ptr(), libc::AT_RECURSIVE as libc::c_uint, &attr as *const libc::mount_attr, std::mem::size_of::<libc::mount_attr>()) };
    if r != 0 {
        return Err(JailError::Mount { what: "restrict", path: path.into(), source: nix::Error::last() });
    }
    Ok(())
}

/// Whether a bind's source is a device node (made anew in the jail, see `device_node`).
fn is_device(meta: &std::fs::Metadata) -> bool {
    meta.file_type().is_char_device() || meta.file_type().is_block_device()
}

/// Where device nodes go in a jail: a small tmpfs private to it.
const DEV: &str = "/dev";

/// A device "bound" into the jail is a node of its own (the host node's type and number) in a
/// small tmpfs private to the jail at `/dev`, owned by the jailed user, as Firecracker's jailer
/// makes /dev/kvm: usable whatever group and mode the host gives its node (a host without udev
/// leaves /dev/kvm root's alone), and nothing done to it reaches the host's node. Making it
/// needs CAP_MKNOD and the device cgroup's `m` right for the device. The tmpfs is mounted with
/// the first device (`dev_mounted`) and made read-only by the caller once every bind is in.
fn device_node(root: &Path, bind: &JailBind, host: &std::fs::Metadata, user: &JailUser, dev_mounted: &mut bool) -> Result<(), JailError> {
    if bind.target.parent() != Some(Path::new(DEV)) {
        return Err(JailError::DeviceTarget(bind.target.clone()));
    }
    let target = inside(root, &bind.target)?;
    let dir = inside(root, Path::new(DEV))?;
    if !*dev_mounted {
        std::fs::DirBuilder::new().recursive(true).mode(0o755).create(&dir).map_err(|source| JailError::MountPoint { path: DEV.into(), source })?;
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
        mount(Some("tmpfs"), &dir, Some("tmpfs"), flags, Some("size=16k,nr_inodes=16,mode=0755")).map_err(mount_err("mount", Path::new(DEV)))?;
        *dev_mounted = true;
    }
    let kind = if host.file_type().is_char_device() { nix::sys::stat::SFlag::S_IFCHR } else { nix::sys::stat::SFlag::S_IFBLK };
    // Owner-only; `:ro` means nothing for a node of the jail's own (it kept a bound host node
    // from changes).
    nix::sys::stat::mknod(&target, kind, nix::sys::stat::Mode::from_bits_truncate(0o600), host.rdev()).map_err(mount_err("make the device node", &bind.target))?;
    let (uid, gid) = match user {
        JailUser::Unprivileged { uid, gid } => (*uid, *gid),
        JailUser::Root { .. } => (0, 0),
    };
    std::os::unix::fs::chown(&target, Some(uid), Some(gid)).map_err(|source| JailError::MountPoint { path: bind.target.clone(), source })
}

fn child(config: &JailConfig, alive: OwnedFd) -> Result<std::convert::Infallible, JailError> {
    die_with_parent(&alive)?;
    let root = &config.root;
    // Host mounts still reach the jail (container rootfs arriving in the share); none of the
    // jail's goes back.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>).map_err(mount_err("make private", Path::new("/")))?;
    mount(Some(root), root, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(mount_err("bind the root", root))?;
    let mut files = Vec::new();
    let mut dev_mounted = false;
    for b in &config.binds {
        let meta = std::fs::metadata(&b.source).map_err(|source| JailError::MountPoint { path: b.source.clone(), source })?;
        if is_device(&meta) {
            device_node(root, b, &meta, &config.user, &mut dev_mounted)?;
        } else {
            files.push(b);
        }
    }
    for b in files {
        let target = inside(root, &b.target)?;
        mount_point(&b.source, &target)?;
        mount(Some(&b.source), &target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>).map_err(mount_err("bind", &b.target))?;
        // Flags are only added, to the bind and every mount below it: a writable bind keeps
        // what its source has (the share's top stays read-only as the host made it) and gains
        // nosuid, nodev and noexec (a setuid file or device node made through it is inert); a
        // read-only one is read-only all the way down.
        let attr = if b.read_only {
            libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV
        } else {
            libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOEXEC
        };
        restrict(&target, attr)?;
    }
    if dev_mounted {
        // Every node and mount point in it is there: nothing new appears.
        restrict(&inside(root, Path::new(DEV))?, libc::MOUNT_ATTR_RDONLY)?;
    }
    if config.proc_self {
        proc_self(root)?;
    }
    nix::unistd::chdir(root).map_err(JailError::PivotRoot)?;
    // The old root stacks under the new one and is detached at once.
    nix::unistd::pivot_root(".", ".").map_err(JailError::PivotRoot)?;
    umount2(".", MntFlags::MNT_DETACH).map_err(JailError::PivotRoot)?;
    nix::unistd::chdir("/").map_err(JailError::PivotRoot)?;
    // Nothing of the root itself is writable: the process writes only where a bind allows.
    let ro = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(None::<&str>, "/", None::<&str>, ro, None::<&str>).map_err(mount_err("make read-only", Path::new("/")))?;
    let _ = nix::unistd::sethostname("hull-jail");
    // A core dump of a VMM holds guest memory.
    let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: setrlimit only reads the struct, which lives across the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) } != 0 {
        return Err(JailError::Rlimit(nix::Error::last()));
    }
    let priv_err = |what| move |source| JailError::Privileges { what, source };
    match &config.user {
        JailUser::Unprivileged { uid, gid } => {
            drop_bounding(&[])?;
            caps::clear(None, CapSet::Inheritable).map_err(JailError::Caps)?;
            nix::unistd::setgroups(&[]).map_err(priv_err("setgroups"))?;
            let gid = Gid::from_raw(*gid);
            nix::unistd::setresgid(gid, gid, gid).map_err(priv_err("setresgid"))?;
            if let Some(max) = config.max_processes {
                // Still root: the limit may be above the inherited hard limit.
                let limit = libc::rlimit { rlim_cur: max, rlim_max: max };
                // SAFETY: setrlimit only reads the struct, which lives across the call.
                if unsafe { libc::setrlimit(libc::RLIMIT_NPROC, &limit) } != 0 {
                    return Err(JailError::Rlimit(nix::Error::last()));
                }
            }
            let uid = Uid::from_raw(*uid);
            // Leaving uid 0 clears the permitted and effective capability sets.
            nix::unistd::setresuid(uid, uid, uid).map_err(priv_err("setresuid"))?;
        }
        JailUser::Root { keep } => {
            nix::unistd::setgroups(&[]).map_err(priv_err("setgroups"))?;
            drop_bounding(keep)?;
            let keep: CapsHashSet = keep.iter().copied().collect();
            // After exec, root's permitted set is its bounding set: only `keep`.
            caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).map_err(JailError::Caps)?;
            caps::set(None, CapSet::Effective, &keep).map_err(JailError::Caps)?;
            caps::set(None, CapSet::Permitted, &keep).map_err(JailError::Caps)?;
        }
    }
    nix::sys::prctl::set_no_new_privs().map_err(priv_err("no_new_privs"))?;
    // Last before exec (which closes `alive`): the uid switch cleared the parent-death signal.
    die_with_parent(&alive)?;
    let program = CString::new(config.program.as_os_str().as_bytes()).map_err(|_| JailError::Nul(config.program.clone()))?;
    let mut argv = vec![program.clone()];
    for a in &config.args {
        argv.push(CString::new(a.as_bytes()).map_err(|_| JailError::Nul(PathBuf::from(a)))?);
    }
    // An empty environment: nothing of the starter's reaches the jail.
    let env: [CString; 0] = [];
    let err = nix::unistd::execve(&program, &argv, &env).unwrap_err();
    Err(JailError::Exec { program: config.program.clone(), source: err })
}

/// Gives the jail `/proc/self/fd` and `/proc/self/mountinfo` of its PID 1 (the jailed process)
/// from a procfs of the jail's pid namespace, and nothing else of /proc: no /proc/sys, no
/// /proc/sysrq-trigger, which a uid-0 process could write without any capability.
fn proc_self(root: &Path) -> Result<(), JailError> {
    let full = root.join(".proc");
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&full).map_err(|source| JailError::MountPoint { path: full.clone(), source })?;
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), &full, Some("proc"), nosuid, None::<&str>).map_err(mount_err("mount procfs at", &full))?;
    for (from, to) in [("1/fd", "proc/self/fd"), ("1/mountinfo", "proc/self/mountinfo")] {
        let source = full.join(from);
        let target = root.join(to);
        mount_point(&source, &target)?;
        mount(Some(&source), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(mount_err("bind", &target))?;
    }
    umount2(&full, MntFlags::MNT_DETACH).map_err(mount_err("unmount", &full))?;
    let _ = std::fs::remove_dir(&full);
    Ok(())
}

/// Parses a capability name as `hull-vmm jail --keep-cap` takes it (`chown` or `CAP_CHOWN`).
pub fn parse_capability(s: &str) -> Result<Capability, String> {
    let name = s.to_ascii_uppercase();
    let name = if name.starts_with("CAP_") { name } else { format!("CAP_{name}") };
    name.parse().map_err(|_| format!("{s:?} is not a capability name"))
}

/// Parses `SOURCE:TARGET[:ro]`.
pub fn parse_bind(s: &str) -> Result<JailBind, String> {
    let (rest, read_only) = match s.strip_suffix(":ro") {
        Some(rest) => (rest, true),
        None => (s, false),
    };
    let (source, target) = rest.split_once(':').ok_or("a bind is SOURCE:TARGET[:ro]")?;
    if source.is_empty() || !target.starts_with('/') {
        return Err("a bind is SOURCE:TARGET[:ro] with an absolute TARGET".into());
    }
    Ok(JailBind { source: source.into(), target: target.into(), read_only })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_stay_inside_the_root() {
        let root = Path::new("/jail");
        assert_eq!(inside(root, Path::new("/dev/kvm")).unwrap(), Path::new("/jail/dev/kvm"));
        assert!(inside(root, Path::new("/../etc")).is_err());
        assert!(inside(root, Path::new("usr")).is_err());
    }

    #[test]
    fn binds_and_capabilities_parse() {
        let b = parse_bind("/usr:/usr:ro").unwrap();
        assert_eq!((b.source.as_path(), b.target.as_path(), b.read_only), (Path::new("/usr"), Path::new("/usr"), true));
        assert!(!parse_bind("/a:/b").unwrap().read_only);
        assert!(parse_bind("/a:b").is_err());
        assert_eq!(parse_capability("chown").unwrap(), Capability::CAP_CHOWN);
        assert!(parse_capability("nonsense").is_err());
    }
}
