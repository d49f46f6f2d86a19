//! The pod's virtio-fs share: what the guest sees of the host, and how the host keeps the
//! guest from steering it.
//!
//! Everything the shim creates or mounts for the guest is created in the pod's host-private
//! `mounts/` directory, which the guest never sees. The guest's share is `shared/`, a
//! read-only, nosuid, nodev bind of `mounts/` that receives every later mount made under
//! `mounts/` (it is a mount-propagation slave of it): the guest sees each container's rootfs
//! (read-write, nosuid, nodev: the container writes there) and the host files its spec
//! bind-mounts (read-only when the spec says so), but it cannot create, rename or replace a
//! single entry of the tree the shim works in, so no symlink it plants can redirect a path
//! the host creates or mounts (Kata's CVE-2020-2026), and a read-only volume is read-only on
//! the host's side of the boundary, not only in the guest (CVE-2020-28914). Binds are made
//! from file descriptors (`open_tree`, `mount_setattr`, `move_mount`), so their flags are set
//! before the guest's view receives them.
//!
//! The guest mounts the share (tag `FS_TAG`) once per container at `GUEST_SHARE/<container>`;
//! the container's directory in it holds its rootfs and its shared host files (`mounts/<n>`).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

use super::state::PodDir;

/// The virtio-fs tag of a VM's share.
pub const FS_TAG: &str = "hull";

/// Where the guest mounts the pod's share: each container mounts it at
/// `GUEST_SHARE/<container>` and finds its rootfs at `<that>/<container>/rootfs`.
pub const GUEST_SHARE: &str = "/run/hull/share";

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("Cannot create {path:?} in the pod's share: {source}.")]
    Create { path: PathBuf, source: std::io::Error },
    #[error("Cannot share the rootfs of container {id}: {source}.")]
    Mount { id: String, source: nix::Error },
    #[error("Cannot give the guest its read-only view {view:?} of the pod's mounts: {source}.")]
    View { view: PathBuf, source: nix::Error },
    #[error(transparent)]
    BadId(#[from] super::state::BadId),
}

/// How a host path is bound into the pod's mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind {
    /// With everything mounted below the source (`rbind`).
    pub recursive: bool,
    /// Read-only on the host (and so for the guest); recursive when the bind is.
    pub readonly: bool,
}

fn c_path(path: &Path) -> Result<CString, nix::Error> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| nix::Error::EINVAL)
}

/// Binds `source` at `target` with `bind`'s flags plus nosuid and nodev, all set on a detached
/// copy before it is attached: a mount propagated to the guest's view never exists with
/// weaker flags. `target` must exist and lie in the pod's private `mounts/`.
pub fn bind_into(source: &Path, target: &Path, bind: Bind) -> Result<(), nix::Error> {
    let (source_c, target_c) = (c_path(source)?, c_path(target)?);
    let recursive = if bind.recursive { libc::AT_RECURSIVE as libc::c_uint } else { 0 };
    // SAFETY: open_tree reads a NUL-terminated path; the descriptor it returns is owned here.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, source_c.as_ptr(), libc::OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | recursive) };
    if fd < 0 {
        return Err(nix::Error::last());
    }
    // SAFETY: fd was just returned by open_tree and nothing else owns it.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut attr_set = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    if bind.readonly {
        attr_set |= libc::MOUNT_ATTR_RDONLY;
    }
    // A slave of the source: a mount made on the host under it later reaches the guest (CRI's
    // HOST_TO_CONTAINER), and nothing done to the copy (the shim's unmounts when the container
    // goes) ever propagates back to the host, which it would as a peer of a shared source
    // (open_tree's clone joins the source's peer group).
    let attr = libc::mount_attr { attr_set, attr_clr: 0, propagation: libc::MS_SLAVE, userns_fd: 0 };
    let empty = c"";
    // SAFETY: mount_setattr reads `attr` (its size passed) and the empty path; tree is open.
    let r = unsafe {
        libc::syscall(libc::SYS_mount_setattr, tree.as_raw_fd(), empty.as_ptr(), libc::AT_EMPTY_PATH as libc::c_uint | recursive, &attr as *const libc::mount_attr, std::mem::size_of::<libc::mount_attr>())
    };
    if r < 0 {
        return Err(nix::Error::last());
    }
    // SAFETY: move_mount reads the two NUL-terminated paths; tree is open.
    let r = unsafe { libc::syscall(libc::SYS_move_mount, tree.as_raw_fd(), empty.as_ptr(), libc::AT_FDCWD, target_c.as_ptr(), libc::MOVE_MOUNT_F_EMPTY_PATH) };
    if r < 0 {
        return Err(nix::Error::last());
    }
    Ok(())
}

/// Makes `shared/` the guest's read-only (nosuid, nodev) view of the private `mounts/`,
/// receiving the mounts made there later. Called before the VM starts, so the virtio-fs
/// device serves the view from its first request.
pub fn prepare(pod: &PodDir) -> Result<(), ShareError> {
    let (mounts, view) = (pod.mounts(), pod.shared());
    let err = |source| ShareError::View { view: view.clone(), source };
    // mounts/ becomes a mount of its own, the master of a peer group...
    mount(Some(&mounts), &mounts, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(err)?;
    mount(None::<&str>, &mounts, None::<&str>, MsFlags::MS_PRIVATE, None::<&str>).map_err(err)?;
    mount(None::<&str>, &mounts, None::<&str>, MsFlags::MS_SHARED, None::<&str>).map_err(err)?;
    // ...and shared/ a bind of it that only receives: a slave, read-only, nosuid, nodev.
    mount(Some(&mounts), &view, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(err)?;
    mount(None::<&str>, &view, None::<&str>, MsFlags::MS_SLAVE, None::<&str>).map_err(err)?;
    let ro = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(None::<&str>, &view, None::<&str>, ro, None::<&str>).map_err(err)
}

/// Container `id`'s directory in the pod's private mounts; an id that is no identifier
/// (`..`, `a/b`) is refused before it becomes a path.
pub fn container_dir(pod: &PodDir, id: &str) -> Result<PathBuf, ShareError> {
    super::state::check_id("container id", id)?;
    Ok(pod.mounts().join(id))
}

/// The agent storage that mounts the VM's share at `mount_point` in the guest.
pub fn share_storage(mount_point: &str) -> hull_proto::agent::Storage {
    let mut s = hull_proto::agent::Storage::new();
    s.source = FS_TAG.into();
    s.fstype = "virtiofs".into();
    s.mount_point = mount_point.into();
    s
}

/// The guest path of container `id`'s share mount and of its rootfs.
pub fn guest_paths(id: &str) -> (String, String) {
    let mount = format!("{GUEST_SHARE}/{id}");
    let rootfs = format!("{mount}/{id}/rootfs");
    (mount, rootfs)
}

/// Binds container `id`'s rootfs (recursively, read-write, nosuid, nodev) at
/// `mounts/<id>/rootfs`; the guest sees it at `<share>/<id>/rootfs`.
pub fn share_rootfs(pod: &PodDir, id: &str, rootfs: &Path) -> Result<(), ShareError> {
    let target = container_dir(pod, id)?.join("rootfs");
    std::fs::create_dir_all(&target).map_err(|source| ShareError::Create { path: target.clone(), source })?;
    bind_into(rootfs, &target, Bind { recursive: true, readonly: false }).map_err(|source| ShareError::Mount { id: id.into(), source })
}

/// The mount points at or below `path` in this process's mount table: `path` itself and
/// `path/...`, never a mere prefix (`c10` is not below `c1`). Deepest first.
fn mount_points_under(path: &Path) -> Vec<PathBuf> {
    let Some(prefix) = path.to_str().map(|p| p.trim_end_matches('/')) else { return Vec::new() };
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<String> = table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|m| m == prefix || m.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|m| std::cmp::Reverse(m.len()));
    points.dedup();
    points.into_iter().map(PathBuf::from).collect()
}

/// Unmounts everything at or below `path`, deepest first, never following a symlink: the
/// mount points come from the mount table and each is unmounted with UMOUNT_NOFOLLOW.
pub fn umount_tree(path: &Path) {
    for point in mount_points_under(path) {
        // Stacked mounts come off one at a time, until the point is no mount any more.
        loop {
            match nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW) {
                Ok(()) => continue,
                Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => break,
                Err(e) => {
                    tracing::warn!(path = ?point, error = %e, "cannot unmount");
                    break;
                }
            }
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            out.push((bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes `dir` and what is below it, never following a symlink and never entering a mount
/// that is still there (a failed unmount must not turn into deleting a container's rootfs or
/// a host volume through it). The walk holds each directory open and works relative to it
/// (`openat` with O_NOFOLLOW, `unlinkat`): the pod's tree has parts a jailed VM process may
/// write (`vm/run/`), and a directory it swaps for a link mid-walk is then only a name removed,
/// never a path followed.
pub fn remove_tree(dir: &Path) {
    let mounted = mount_points_under(dir);
    if mounted.iter().any(|m| m == dir) {
        tracing::warn!(path = ?dir, "still mounted: left in place");
        return;
    }
    match open_dir_nofollow(None, dir.as_os_str()) {
        Some(fd) => {
            remove_entries(fd, dir, &mounted, 0);
            let _ = std::fs::remove_dir(dir);
        }
        // Not a directory (or gone): the name itself.
        None => {
            let _ = std::fs::remove_file(dir);
        }
    }
}

/// `name` (relative to `parent`, or a path when `parent` is None) opened as a directory if it
/// is one and not a symlink.
fn open_dir_nofollow(parent: Option<&OwnedFd>, name: &std::ffi::OsStr) -> Option<OwnedFd> {
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::Mode;
    let at = parent.map_or(libc::AT_FDCWD, |p| p.as_raw_fd());
    let fd = openat(Some(at), name, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty()).ok()?;
    // SAFETY: openat returned a fresh descriptor that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// How deep `remove_tree` goes: the walk holds a descriptor and a stack frame per level, and a
/// jailed process could nest directories without end in its `vm/run/`; deeper ones stay (on
/// tmpfs, with a warning) rather than exhaust the shim.
const MAX_DEPTH: usize = 64;

fn remove_entries(dir: OwnedFd, path: &Path, mounted: &[PathBuf], depth: usize) {
    use nix::unistd::{unlinkat, UnlinkatFlags};
    if depth >= MAX_DEPTH {
        tracing::warn!(path = ?path, "nested deeper than {MAX_DEPTH} levels: left in place");
        return;
    }
    let Ok(dev) = nix::sys::stat::fstat(dir.as_raw_fd()).map(|s| s.st_dev) else { return };
    let names: Vec<std::ffi::OsString> = match nix::dir::Dir::openat(Some(dir.as_raw_fd()), ".", nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty()) {
        Ok(mut listing) => listing
            .iter()
            .flatten()
            .map(|e| std::ffi::OsStr::from_bytes(e.file_name().to_bytes()).to_os_string())
            .filter(|n| n != "." && n != "..")
            .collect(),
        Err(_) => return,
    };
    for name in names {
        let child = path.join(&name);
        match open_dir_nofollow(Some(&dir), &name) {
            Some(sub) => {
                // A mount point: by the mount table, or (a mount made since) by its device.
                let other_fs = nix::sys::stat::fstat(sub.as_raw_fd()).map_or(true, |s| s.st_dev != dev);
                if other_fs || mounted.contains(&child) {
                    tracing::warn!(path = ?child, "still mounted: left in place");
                    continue;
                }
                remove_entries(sub, &child, mounted, depth + 1);
                let _ = unlinkat(Some(dir.as_raw_fd()), name.as_os_str(), UnlinkatFlags::RemoveDir);
            }
            None => {
                let _ = unlinkat(Some(dir.as_raw_fd()), name.as_os_str(), UnlinkatFlags::NoRemoveDir);
            }
        }
    }
}

/// Undoes one container's host mounts: its directory in the pod's mounts (and so in the
/// guest's view), and its rootfs in its bundle when containerd gave it one.
pub fn cleanup_container(pod: &PodDir, id: &str, bundle: Option<&Path>) {
    if let Ok(dir) = container_dir(pod, id) {
        umount_tree(&dir);
        remove_tree(&dir);
    }
    if let Some(bundle) = bundle {
        umount_tree(&bundle.join("rootfs"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/run/a\040b"), "/run/a b");
        assert_eq!(unescape_mountinfo(r"/x\134y"), r"/x\y");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    /// Links in the tree (to a directory and to a file outside it) go as names; what they point
    /// at stays.
    #[test]
    fn removing_a_tree_removes_links_not_their_targets() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), "host").unwrap();
        let top = tempfile::tempdir().unwrap();
        let tree = top.path().join("pod");
        std::fs::create_dir_all(tree.join("vm/run/deep")).unwrap();
        std::fs::write(tree.join("vm/run/deep/file"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path(), tree.join("vm/run/dir-link")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("keep"), tree.join("vm/file-link")).unwrap();
        remove_tree(&tree);
        assert!(!tree.exists(), "the tree is gone");
        assert_eq!(std::fs::read_to_string(outside.path().join("keep")).unwrap(), "host");
        // A tree that is itself a link: the link goes, not its target's content.
        std::os::unix::fs::symlink(outside.path(), &tree).unwrap();
        remove_tree(&tree);
        assert!(std::fs::symlink_metadata(&tree).is_err());
        assert!(outside.path().join("keep").exists());
    }

    /// A tree nested without end (as a jailed process may make its socket directory) does not
    /// exhaust the walk: the chain past the depth limit stays, everything else goes.
    #[test]
    fn removing_a_deep_tree_stops_at_the_depth_limit() {
        let top = tempfile::tempdir().unwrap();
        let tree = top.path().join("pod");
        let mut deep = tree.join("run");
        for _ in 0..MAX_DEPTH + 10 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::create_dir_all(tree.join("shallow")).unwrap();
        std::fs::write(tree.join("shallow/file"), "x").unwrap();
        remove_tree(&tree);
        assert!(!tree.join("shallow").exists(), "what is within the limit goes");
        assert!(deep.exists(), "the chain past the limit is left in place");
    }

    #[test]
    fn ids_that_leave_the_share_are_refused() {
        let pod = PodDir::at("/run/hull/shim/ns/p");
        for bad in ["", ".", "..", "a/b", "../x"] {
            assert!(container_dir(&pod, bad).is_err(), "{bad:?}");
        }
        assert_eq!(container_dir(&pod, "c1").unwrap(), Path::new("/run/hull/shim/ns/p/mounts/c1"));
    }
}
