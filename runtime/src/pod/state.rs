//! A pod's state directory, `/run/hull/shim/<namespace>/<pod>`, and the only code that knows
//! its layout: the shim writes it, `containerd-shim-hull-v2 delete` cleans up from it after a
//! shim died, `hull ps` and `hull exec` read it.
//!
//! ```text
//! <pod>/pids      the VM's host processes, VMM first (written before the boot is waited for)
//! <pod>/netns     the pod's network namespace, when the VM has a NIC there
//! <pod>/mounts/   host-private: the shim's mounts for the guest, one directory per container
//! <pod>/shared/   the guest's virtio-fs share: a read-only view of mounts/ (pod/share.rs)
//! <pod>/vm/       the VM's console and process logs, its sockets in run/ (vsock.sock), the
//!                 jail's root in root/ (hypervisor/jail.rs)
//! <pod>.console.log  the console kept after the pod ended (debug_console)
//! ```

use std::path::{Path, PathBuf};

use crate::hypervisor::VmDir;

/// Where the shim keeps its pods.
pub const STATE_ROOT: &str = "/run/hull/shim";

#[derive(Debug, thiserror::Error)]
#[error("Cannot write the pod's state {path:?}: {source}.")]
pub struct StateError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// An id that cannot be a path component under the state root.
#[derive(Debug, thiserror::Error)]
#[error("The {what} {id:?} is not a valid identifier (letters and digits joined by single '.', '_' or '-', at most 76 characters).")]
pub struct BadId {
    pub what: &'static str,
    pub id: String,
}

/// containerd's identifier rule, applied to every id that becomes a path component on the
/// host: container ids (containerd checks them too) and pod ids, which come from an
/// annotation anyone creating a container can set (`../../x` would leave the state root).
pub fn check_id(what: &'static str, id: &str) -> Result<(), BadId> {
    let part_ok = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric());
    let valid = id.len() <= 76 && id.split(['.', '_', '-']).all(part_ok);
    if valid {
        Ok(())
    } else {
        Err(BadId { what, id: id.into() })
    }
}

#[derive(Debug, Clone)]
pub struct PodDir {
    path: PathBuf,
}

const PIDS: &str = "pids";
const NETNS: &str = "netns";
const CGROUP: &str = "cgroup";
const SHARED: &str = "shared";
const MOUNTS: &str = "mounts";
const VM: &str = "vm";

fn write(path: PathBuf, bytes: &[u8]) -> Result<(), StateError> {
    std::fs::write(&path, bytes).map_err(|source| StateError { path, source })
}

impl PodDir {
    /// The directory of pod `pod` in containerd namespace `namespace`.
    pub fn new(namespace: &str, pod: &str) -> PodDir {
        PodDir::at(Path::new(STATE_ROOT).join(namespace).join(pod))
    }

    /// A pod directory somewhere else (`hull run` keeps one per run).
    pub fn at(path: impl Into<PathBuf>) -> PodDir {
        PodDir { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pod's id: the directory's name.
    pub fn id(&self) -> String {
        self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// Creates the directory with its `mounts/`, `shared/` and `vm/`. The pod directory, `vm/`
    /// and every level above them up to /run/hull are owner-only (0700), also where they
    /// existed before: the VM's sockets (the agent's API among them), its console and the
    /// pod's shares are root's alone. `mounts/` keeps the usual 0755: the guest sees it as
    /// the share's root, and checks its mode for the containers' users.
    pub fn create(&self) -> Result<(), StateError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        // Ids are checked before they get here (check_id); this keeps a path with `..` from
        // ever reaching the mkdir and chmod below, whose "levels up to /run/hull" are lexical.
        if !self.path.components().all(|c| matches!(c, std::path::Component::RootDir | std::path::Component::Normal(_))) {
            let source = std::io::Error::new(std::io::ErrorKind::InvalidInput, "a pod directory must be an absolute path without . or ..");
            return Err(StateError { path: self.path.clone(), source });
        }
        for d in [self.mounts(), self.shared(), self.vm().path().to_path_buf()] {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&d).map_err(|source| StateError { path: d, source })?;
        }
        let run_root = Path::new(STATE_ROOT).parent().unwrap_or(Path::new(STATE_ROOT));
        let owner_only = std::iter::once(self.vm().path().to_path_buf())
            .chain(std::iter::once(self.path.clone()))
            .chain(self.path.ancestors().skip(1).filter(|a| a.starts_with(run_root)).map(Path::to_path_buf));
        for d in owner_only {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).map_err(|source| StateError { path: d, source })?;
        }
        std::fs::set_permissions(self.mounts(), std::fs::Permissions::from_mode(0o755)).map_err(|source| StateError { path: self.mounts(), source })
    }

    /// The guest's share: a read-only view of `mounts()`.
    pub fn shared(&self) -> PathBuf {
        self.path.join(SHARED)
    }

    /// Where the shim makes the guest's mounts: never seen, never written by the guest.
    pub fn mounts(&self) -> PathBuf {
        self.path.join(MOUNTS)
    }

    pub fn vm(&self) -> VmDir {
        VmDir::new(self.path.join(VM))
    }

    /// Where the console is kept when the pod ends (beside the directory, which goes).
    pub fn kept_console(&self) -> PathBuf {
        self.path.with_extension("console.log")
    }

    /// Where the VMM's log is kept with the console.
    pub fn kept_vmm_log(&self) -> PathBuf {
        self.path.with_extension("vmm.log")
    }

    pub fn write_pids(&self, pids: &[u32]) -> Result<(), StateError> {
        let text: Vec<String> = pids.iter().map(u32::to_string).collect();
        write(self.path.join(PIDS), text.join("\n").as_bytes())
    }

    /// The recorded pids, VMM first.
    pub fn pids(&self) -> Vec<u32> {
        let text = std::fs::read_to_string(self.path.join(PIDS)).unwrap_or_default();
        text.lines().filter_map(|l| l.trim().parse().ok()).collect()
    }

    /// When the pod's VM was started (the pid file's time).
    pub fn started(&self) -> Option<std::time::SystemTime> {
        std::fs::metadata(self.path.join(PIDS)).and_then(|m| m.modified()).ok()
    }

    pub fn record_netns(&self, netns: &Path) -> Result<(), StateError> {
        write(self.path.join(NETNS), netns.as_os_str().as_encoded_bytes())
    }

    pub fn record_cgroup(&self, cgroups_path: &str) -> Result<(), StateError> {
        write(self.path.join(CGROUP), cgroups_path.as_bytes())
    }

    /// The pod's cgroupsPath, as recorded at boot.
    pub fn cgroup(&self) -> Option<String> {
        std::fs::read_to_string(self.path.join(CGROUP)).ok().map(|s| s.trim().to_string())
    }

    pub fn netns(&self) -> Option<PathBuf> {
        std::fs::read_to_string(self.path.join(NETNS)).ok().map(|s| PathBuf::from(s.trim()))
    }

    /// The containers that have a directory in the share.
    pub fn containers(&self) -> Vec<String> {
        dir_names(&self.mounts())
    }

    /// Every pod directory under the state root, by namespace.
    pub fn all() -> Vec<(String, PodDir)> {
        let root = Path::new(STATE_ROOT);
        let mut out = Vec::new();
        for namespace in dir_names(root) {
            for id in dir_names(&root.join(&namespace)) {
                out.push((namespace.clone(), PodDir::new(&namespace, &id)));
            }
        }
        out
    }
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).filter_map(|e| e.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_containerds_rule() {
        for good in ["c1", "a.b-c_d", "0123456789abcdef", &"a".repeat(76)] {
            assert!(check_id("pod id", good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "../x", "a/b", "a..b", "-a", "a-", "a b", "ä", &"a".repeat(77)] {
            let err = check_id("pod id", bad).unwrap_err().to_string();
            assert!(err.contains("pod id"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_climbing_pod_directory_is_never_created() {
        let dir = tempfile::tempdir().unwrap();
        let climbing = PodDir::at(dir.path().join("a/../../escape"));
        assert!(climbing.create().is_err());
        assert!(!dir.path().parent().unwrap().join("escape").exists());
        assert!(!dir.path().join("a").exists());
    }
}
