//! Init's work when the agent is PID 1 in a guest: the file systems a container runtime needs,
//! cgroup v2 controllers, and powering the VM off at the end.

use std::path::Path;

use nix::mount::{mount, MsFlags};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("Cannot make the guest's root one containers can pivot from ({step}): {source}.")]
    SwitchRoot { step: &'static str, source: std::io::Error },
    #[error("Cannot mount {fstype} on {target}: {source}.")]
    Mount { fstype: &'static str, target: &'static str, source: nix::Error },
    #[error("Cannot create {path}: {source}.")]
    Mkdir { path: &'static str, source: std::io::Error },
}

struct Fs {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC);

const FILESYSTEMS: &[Fs] = &[
    Fs { fstype: "proc", target: "/proc", flags: NOSUID_NODEV_NOEXEC, data: None },
    Fs { fstype: "sysfs", target: "/sys", flags: NOSUID_NODEV_NOEXEC, data: None },
    Fs { fstype: "devtmpfs", target: "/dev", flags: MsFlags::MS_NOSUID, data: Some("mode=0755") },
    Fs { fstype: "devpts", target: "/dev/pts", flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC), data: Some("newinstance,ptmxmode=0666,mode=0620") },
    Fs { fstype: "tmpfs", target: "/dev/shm", flags: NOSUID_NODEV_NOEXEC, data: Some("mode=1777") },
    Fs { fstype: "cgroup2", target: "/sys/fs/cgroup", flags: NOSUID_NODEV_NOEXEC, data: None },
    Fs { fstype: "tmpfs", target: "/run", flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV), data: Some("mode=0755") },
    Fs { fstype: "tmpfs", target: "/tmp", flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV), data: Some("mode=1777") },
];

/// Where the initramfs is bound on its way to `/` (an empty directory afterwards, removed).
const NEW_ROOT: &str = "/.hull-root";
/// statfs f_type of the initramfs root ("rootfs": ramfs, or tmpfs with CONFIG_TMPFS).
const RAMFS_MAGIC: i64 = 0x858458f6;
const TMPFS_MAGIC: i64 = 0x01021994;

/// pivot_root(2) refuses a root that is the initramfs's own mount (it has no parent), and every
/// container needs it. So the initramfs is bound onto a directory of itself, the bind moved
/// onto `/` and made the root: a mount with a parent, holding the same files. Nothing is
/// copied: a copy into a tmpfs (what switch_root does) would write the whole image into guest
/// memory a second time, and the host keeps every page the guest has touched.
fn move_off_initramfs() -> Result<(), InitError> {
    let err = |step: &'static str| move |e: nix::Error| InitError::SwitchRoot { step, source: e.into() };
    let is_rootfs = nix::sys::statfs::statfs("/")
        .map(|s| {
            let t = s.filesystem_type().0 as i64;
            t == RAMFS_MAGIC || t == TMPFS_MAGIC
        })
        .unwrap_or(false);
    if !is_rootfs {
        // A root the kernel mounted (the image on pmem): read-only already; no set-id program
        // of it gains anything either.
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_RDONLY;
        return mount(None::<&str>, "/", None::<&str>, flags, None::<&str>).map_err(err("remount nosuid"));
    }
    std::fs::create_dir(NEW_ROOT).map_err(|source| InitError::SwitchRoot { step: "mkdir", source })?;
    mount(Some("/"), NEW_ROOT, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>).map_err(err("bind"))?;
    nix::unistd::chdir(NEW_ROOT).map_err(err("chdir"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(err("move"))?;
    nix::unistd::chroot(".").map_err(err("chroot"))?;
    nix::unistd::chdir("/").map_err(err("chdir /"))?;
    // As the tmpfs root was: no set-id program of the image gains anything.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID, None::<&str>).map_err(err("remount nosuid"))?;
    // The bind's old mount point, an empty directory of the same files.
    let _ = std::fs::remove_dir(NEW_ROOT);
    Ok(())
}

/// Mounts what the guest needs. An already-mounted target (EBUSY) is fine.
pub fn setup() -> Result<(), InitError> {
    move_off_initramfs()?;
    for fs in FILESYSTEMS {
        std::fs::create_dir_all(fs.target).map_err(|source| InitError::Mkdir { path: fs.target, source })?;
        match mount(Some(fs.fstype), fs.target, Some(fs.fstype), fs.flags, fs.data) {
            Ok(()) | Err(nix::Error::EBUSY) => {}
            Err(source) => return Err(InitError::Mount { fstype: fs.fstype, target: fs.target, source }),
        }
    }
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    let _ = std::os::unix::fs::symlink("/proc/self/fd", "/dev/fd");
    enable_cgroup_controllers(Path::new("/sys/fs/cgroup"));
    Ok(())
}

/// Enables every available controller for children of the root cgroup.
fn enable_cgroup_controllers(root: &Path) {
    let Ok(available) = std::fs::read_to_string(root.join("cgroup.controllers")) else { return };
    for c in available.split_ascii_whitespace() {
        if let Err(e) = std::fs::write(root.join("cgroup.subtree_control"), format!("+{c}")) {
            tracing::warn!(controller = c, error = %e, "cannot enable cgroup controller");
        }
    }
}

/// Ends the VM. Without ACPI a power-off would hang; a reboot makes both QEMU (-no-reboot)
/// and hull-vmm (i8042 reset) exit.
///
/// After sync() the reboot is sysrq's emergency one, which skips the devices' shutdown: that
/// flushes the root's pmem device, and a VM QEMU 7.2 restored from a snapshot never answers the
/// flush (its virtio-pmem has no migration state), so an orderly reboot never ended there.
/// Nothing is lost by skipping it: the root is read-only, the shares are the host's files,
/// written through when each write returns.
pub fn power_off() -> ! {
    nix::unistd::sync();
    if let Err(e) = std::fs::write("/proc/sysrq-trigger", b"b") {
        tracing::warn!(error = %e, "cannot reboot through sysrq; rebooting in order");
    }
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // reboot() only returns on failure; PID 1 must not exit (the kernel would panic).
    loop {
        nix::unistd::pause();
    }
}
