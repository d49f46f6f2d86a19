//! Storages: file systems mounted for a container (its rootfs disk, a shared directory) and
//! unmounted when it goes.

use std::path::{Path, PathBuf};

use hull_proto::agent::Storage;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("The storage mount point {0:?} must be an absolute path without '..'.")]
    BadMountPoint(String),
    #[error("Cannot create the mount point {path:?}: {source}.")]
    Mkdir { path: PathBuf, source: std::io::Error },
    #[error("Cannot mount {source_dev} ({fstype}) on {target:?}: {errno}.")]
    Mount { source_dev: String, fstype: String, target: PathBuf, errno: nix::Error },
}

/// Mount points this container's storages were mounted on, innermost last.
#[derive(Debug, Default)]
pub struct Mounted(Vec<PathBuf>);

fn flags_and_data(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => {}
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

fn check_mount_point(p: &str) -> Result<PathBuf, StorageError> {
    let path = Path::new(p);
    if !path.is_absolute() || path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(StorageError::BadMountPoint(p.into()));
    }
    Ok(path.to_path_buf())
}

/// Mounts every storage in order; on a failure, unmounts what was mounted and says which one
/// failed.
pub fn mount_all(storages: &[Storage]) -> Result<Mounted, StorageError> {
    let mut mounted = Mounted::default();
    for s in storages {
        if let Err(e) = mount_one(s, &mut mounted) {
            mounted.unmount_all();
            return Err(e);
        }
    }
    Ok(mounted)
}

fn mount_one(s: &Storage, mounted: &mut Mounted) -> Result<(), StorageError> {
    let target = check_mount_point(&s.mount_point)?;
    std::fs::create_dir_all(&target).map_err(|source| StorageError::Mkdir { path: target.clone(), source })?;
    let (flags, data) = flags_and_data(&s.options);
    let data = (!data.is_empty()).then_some(data.as_str());
    mount(Some(s.source.as_str()), &target, Some(s.fstype.as_str()), flags, data).map_err(|errno| {
        StorageError::Mount { source_dev: s.source.clone(), fstype: s.fstype.clone(), target: target.clone(), errno }
    })?;
    tracing::info!(source = %s.source, fstype = %s.fstype, target = ?target, "storage mounted");
    mounted.0.push(target);
    Ok(())
}

impl Mounted {
    /// Unmounts in reverse order (detaching anything still busy) and removes the mount points.
    pub fn unmount_all(&mut self) {
        while let Some(target) = self.0.pop() {
            if let Err(e) = umount2(&target, MntFlags::MNT_DETACH) {
                tracing::warn!(target = ?target, error = %e, "cannot unmount storage");
            }
            let _ = std::fs::remove_dir(&target);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let (f, d) = flags_and_data(&["ro".into(), "nodev".into(), "size=1m".into(), "mode=755".into()]);
        assert_eq!(f, MsFlags::MS_RDONLY | MsFlags::MS_NODEV);
        assert_eq!(d, "size=1m,mode=755");
    }

    #[test]
    fn mount_points_must_be_absolute_and_stay_put() {
        assert!(check_mount_point("/run/hull/c1").is_ok());
        assert!(check_mount_point("run/hull").is_err());
        assert!(check_mount_point("/run/../etc").is_err());
    }
}
