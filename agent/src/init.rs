//! Init's work when the agent is PID 1 in a guest: the file systems a container runtime needs,
//! cgroup v2 controllers, and powering the VM off at the end.

use std::path::Path;

use nix::mount::{mount, MsFlags};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("Cannot move the initramfs to a tmpfs root ({step}): {source}.")]
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

const NEW_ROOT: &str = "/.hull-root";
const MOVED_MARKER: &str = "HULL_ROOT_MOVED";
/// statfs f_type of the initramfs root ("rootfs": ramfs, or tmpfs with CONFIG_TMPFS).
const RAMFS_MAGIC: i64 = 0x858458f6;
const TMPFS_MAGIC: i64 = 0x01021994;

/// pivot_root(2) cannot move away from the initramfs root, and every container needs it. So,
/// as switch_root does, copy the initramfs into a tmpfs, delete the originals (freeing their
/// memory), and make the tmpfs the root.
fn move_off_initramfs() -> Result<(), InitError> {
    let sw = |step: &'static str| move |e: std::io::Error| InitError::SwitchRoot { step, source: e };
    let is_rootfs = nix::sys::statfs::statfs("/")
        .map(|s| {
            let t = s.filesystem_type().0 as i64;
            t == RAMFS_MAGIC || t == TMPFS_MAGIC
        })
        .unwrap_or(false);
    // After the switch PID 1 re-executes itself with this marker set.
    if !is_rootfs || std::env::var_os(MOVED_MARKER).is_some() {
        return Ok(());
    }
    std::fs::create_dir(NEW_ROOT).map_err(sw("mkdir"))?;
    mount(Some("tmpfs"), NEW_ROOT, Some("tmpfs"), MsFlags::MS_NOSUID, Some("mode=0755"))
        .map_err(|e| InitError::SwitchRoot { step: "mount tmpfs", source: e.into() })?;
    for entry in std::fs::read_dir("/").map_err(sw("read /"))?.flatten() {
        let name = entry.file_name();
        if name == NEW_ROOT.trim_start_matches('/') {
            continue;
        }
        let from = Path::new("/").join(&name);
        copy_tree(&from, &Path::new(NEW_ROOT).join(&name)).map_err(sw("copy"))?;
        let _ = if from.is_dir() && !from.is_symlink() { std::fs::remove_dir_all(&from) } else { std::fs::remove_file(&from) };
    }
    std::env::set_current_dir(NEW_ROOT).map_err(sw("chdir"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| InitError::SwitchRoot { step: "move", source: e.into() })?;
    nix::unistd::chroot(".").map_err(|e| InitError::SwitchRoot { step: "chroot", source: e.into() })?;
    std::env::set_current_dir("/").map_err(sw("chdir /"))?;
    // Run the copy: the running image is the deleted original, and the agent re-executes its
    // own binary for every container.
    let err = std::os::unix::process::CommandExt::exec(
        std::process::Command::new("/init").args(std::env::args_os().skip(1)).env(MOVED_MARKER, "1"),
    );
    Err(InitError::SwitchRoot { step: "re-exec /init", source: err })
}

/// Copies a file, symlink, device node or directory tree, keeping modes.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(from)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)?;
    } else if ft.is_dir() {
        std::fs::create_dir(to)?;
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        for e in std::fs::read_dir(from)?.flatten() {
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
    } else if ft.is_char_device() || ft.is_block_device() {
        let kind = if ft.is_char_device() { nix::sys::stat::SFlag::S_IFCHR } else { nix::sys::stat::SFlag::S_IFBLK };
        nix::sys::stat::mknod(to, kind, nix::sys::stat::Mode::from_bits_truncate(meta.mode() & 0o7777), meta.rdev())?;
    } else {
        std::fs::copy(from, to)?;
    }
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
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // reboot() only returns on failure; PID 1 must not exit (the kernel would panic).
    loop {
        nix::unistd::pause();
    }
}
