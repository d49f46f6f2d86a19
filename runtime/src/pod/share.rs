//! The pod's virtio-fs share: what the guest sees of the host. The guest mounts the share
//! (tag `FS_TAG`) once per container at `GUEST_SHARE/<container>`; the container's directory
//! in it holds its rootfs (containerd's snapshot, bind-mounted) and the host files its spec
//! bind-mounts (`mounts/<n>`).

use std::path::Path;

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
    Create { path: std::path::PathBuf, source: std::io::Error },
    #[error("Cannot share the rootfs of container {id}: {source}.")]
    Mount { id: String, source: nix::Error },
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

/// Bind-mounts container `id`'s rootfs into the share at `<shared>/<id>/rootfs`.
pub fn share_rootfs(pod: &PodDir, id: &str, rootfs: &Path) -> Result<(), ShareError> {
    let target = pod.shared().join(id).join("rootfs");
    std::fs::create_dir_all(&target).map_err(|source| ShareError::Create { path: target.clone(), source })?;
    mount(Some(rootfs), &target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>).map_err(|source| ShareError::Mount { id: id.into(), source })
}

/// Unmounts everything at or below `path`, deepest first (containerd-shim's helper).
pub fn umount_tree(path: &Path) {
    if let Err(e) = containerd_shim::mount::umount_recursive(path.to_str(), libc::MNT_DETACH) {
        tracing::warn!(path = ?path, error = %e, "cannot unmount");
    }
}

/// Undoes one container's host mounts: its part of the share, and its rootfs in its bundle
/// when containerd gave it one.
pub fn cleanup_container(pod: &PodDir, id: &str, bundle: Option<&Path>) {
    let share = pod.shared().join(id);
    umount_tree(&share);
    let _ = std::fs::remove_dir_all(&share);
    if let Some(bundle) = bundle {
        umount_tree(&bundle.join("rootfs"));
    }
}
