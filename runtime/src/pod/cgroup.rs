//! The pod's cgroup: where the VM's host processes live, so that the pod's limits bound its VM.
//!
//! The sandbox's spec names the pod's cgroup (`linux.cgroupsPath`; with kubelet's cgroupfs
//! driver, kubelet's pod cgroup plus the sandbox id). Under runc the pause process lives there.
//! With hull the shim moves itself there before it starts the VM, so the VMM, its vhost-user
//! backends and the shim's own per-pod work are charged to the pod and bounded by what kubelet
//! set on the pod's cgroup (the containers' limits plus the RuntimeClass's PodOverhead): the
//! guest RAM a guest touches is its VMM's memory, and its vCPUs are the VMM's threads. This is
//! Kata's `sandbox_cgroup_only`. When the pod ends the shim moves back to where it came from
//! and removes the cgroup.
//!
//! cgroup v2 (one hierarchy) and v1 (one per controller). On v1 the shim joins the memory, cpu,
//! cpuacct, pids and blkio hierarchies: those bound resources; cpuset would need its cpus and
//! mems copied before anything may join, and devices, freezer and named hierarchies bound
//! nothing a VMM uses. A hybrid host (v1 controllers plus an empty unified hierarchy, like this
//! project's CI machine) is treated as v1.
//!
//! Paths in the systemd driver's form (`slice:prefix:name`, kubelet and containerd with
//! `SystemdCgroup = true`) name the directory the systemd driver gives the same pod: the slice
//! expanded into its parents (`kubepods-burstable-pod1.slice` lies in `kubepods.slice/
//! kubepods-burstable.slice/`) and the scope `prefix-name.scope` in it. hull makes that
//! directory itself, as for cgroupfs, instead of asking systemd for a transient unit: the limits
//! kubelet puts on the pod's slice bound it all the same.

use std::path::{Component, Path, PathBuf};

/// The v1 controllers a pod's host processes join.
const V1_CONTROLLERS: &[&str] = &["memory", "cpu", "cpuacct", "pids", "blkio"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("The sandbox's cgroupsPath {0:?} is not a cgroup path (it must not climb with `..`).")]
    BadPath(String),
    #[error("The sandbox's cgroupsPath {0:?} is not a systemd driver path (slice:prefix:name, the slice a name ending in .slice).")]
    Systemd(String),
    #[error("This host has no cgroup hierarchy hull can use (none in /proc/self/mountinfo).")]
    NoHierarchy,
    #[error("Cannot read {path:?}: {source}.")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("Cannot create the pod's cgroup {path:?}: {source}.")]
    Create { path: PathBuf, source: std::io::Error },
    #[error("Cannot move the shim into the pod's cgroup {path:?}: {source}.")]
    Join { path: PathBuf, source: std::io::Error },
}

/// One cgroup hierarchy the shim takes part in.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hierarchy {
    /// Where it is mounted (its whole tree: mountinfo root "/").
    mount: PathBuf,
    /// Its v1 controllers; empty for v2.
    controllers: Vec<String>,
}

/// The pod's cgroup, joined by the shim: (the pod's directory, the shim's original directory)
/// per hierarchy.
#[derive(Debug)]
pub struct PodCgroup {
    dirs: Vec<(PathBuf, PathBuf)>,
}

impl PodCgroup {
    /// Creates the pod's cgroup in every hierarchy and moves the shim (all its threads) into it;
    /// what the shim starts from now on starts there.
    pub fn join(cgroups_path: &str) -> Result<PodCgroup, CgroupError> {
        let relative = relative_path(cgroups_path)?;
        let hierarchies = hierarchies()?;
        let own = read("/proc/self/cgroup")?;
        let mut joined = PodCgroup { dirs: Vec::new() };
        for h in &hierarchies {
            let dir = h.mount.join(&relative);
            let original = own_dir(h, &own);
            if let Err(source) = std::fs::create_dir_all(&dir) {
                // Back out of what was joined already (as on every error below).
                joined.leave();
                return Err(CgroupError::Create { path: dir, source });
            }
            if let Err(source) = std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string()) {
                let _ = std::fs::remove_dir(&dir);
                joined.leave();
                return Err(CgroupError::Join { path: dir, source });
            }
            joined.dirs.push((dir, original));
        }
        Ok(joined)
    }

    /// Moves the shim back and removes the pod's cgroup (its VM's processes are gone by now).
    pub fn leave(&mut self) {
        for (dir, original) in self.dirs.drain(..) {
            if let Err(e) = std::fs::write(original.join("cgroup.procs"), std::process::id().to_string()) {
                tracing::warn!(cgroup = ?original, error = %e, "cannot move the shim back to its cgroup");
            }
            remove_dir(&dir);
        }
    }

    /// How many processes the kernel's OOM killer killed in the pod's cgroup because it hit
    /// its memory limit (None: no memory hierarchy, or no counter).
    pub fn oom_kills(&self) -> Option<u64> {
        let (dir, file) = self.dirs.iter().find_map(|(d, _)| {
            if d.join("memory.oom_control").exists() {
                Some((d, "memory.oom_control"))
            } else if d.join("memory.events").exists() {
                Some((d, "memory.events"))
            } else {
                None
            }
        })?;
        let text = std::fs::read_to_string(dir.join(file)).ok()?;
        text.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.trim().parse().ok())
    }

    /// The pod's directory in each hierarchy.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|(d, _)| d.as_path())
    }
}

impl Drop for PodCgroup {
    /// A pod dropped without `destroy` (a cancelled boot) does not keep the shim in its cgroup.
    fn drop(&mut self) {
        self.leave();
    }
}

/// What `hull check` says: the hierarchies a pod's VM would join here.
pub fn describe_host() -> Result<String, CgroupError> {
    let found = hierarchies()?;
    Ok(if found.iter().all(|h| h.controllers.is_empty()) {
        format!("cgroup v2 at {}", found[0].mount.display())
    } else {
        let controllers: Vec<String> = found.iter().map(|h| h.controllers.join(",")).collect();
        format!("cgroup v1: {}", controllers.join(" "))
    })
}

/// What `delete` does after a shim died: removes the pod's cgroup if nothing is left in it.
pub fn remove(cgroups_path: &str) {
    let (Ok(relative), Ok(hierarchies)) = (relative_path(cgroups_path), hierarchies()) else { return };
    for h in hierarchies {
        remove_dir(&h.mount.join(&relative));
    }
}

fn remove_dir(dir: &Path) {
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(cgroup = ?dir, error = %e, "cannot remove the pod's cgroup"),
    }
}

fn read(path: &str) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read { path: path.into(), source })
}

/// The cgroupsPath below a hierarchy's root: absolute or not, it is taken from the root (as
/// containerd writes it), and it never climbs.
fn relative_path(cgroups_path: &str) -> Result<PathBuf, CgroupError> {
    if cgroups_path.contains(':') {
        return systemd_path(cgroups_path);
    }
    let mut relative = PathBuf::new();
    for c in Path::new(cgroups_path).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => relative.push(n),
            Component::ParentDir | Component::Prefix(_) => return Err(CgroupError::BadPath(cgroups_path.into())),
        }
    }
    if relative.as_os_str().is_empty() {
        return Err(CgroupError::BadPath(cgroups_path.into()));
    }
    Ok(relative)
}

/// The directory of the systemd driver's `slice:prefix:name` (see the module comment).
fn systemd_path(cgroups_path: &str) -> Result<PathBuf, CgroupError> {
    let bad = || CgroupError::Systemd(cgroups_path.into());
    let mut parts = cgroups_path.split(':');
    let (Some(slice), Some(prefix), Some(name), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else { return Err(bad()) };
    let clean = |s: &str| !s.contains('/') && s != "." && s != "..";
    if !clean(slice) || !clean(prefix) || !clean(name) || name.is_empty() {
        return Err(bad());
    }
    let mut path = PathBuf::new();
    // "" and "-.slice" are the root slice.
    if !slice.is_empty() && slice != "-.slice" {
        let stem = slice.strip_suffix(".slice").ok_or_else(bad)?;
        let words: Vec<&str> = stem.split('-').collect();
        if words.iter().any(|w| w.is_empty()) {
            return Err(bad());
        }
        for n in 1..=words.len() {
            path.push(format!("{}.slice", words[..n].join("-")));
        }
    }
    // A name that is a slice is the unit itself (runc's rule); else the scope of prefix-name.
    if name.ends_with(".slice") {
        path.push(name);
    } else if prefix.is_empty() {
        path.push(format!("{name}.scope"));
    } else {
        path.push(format!("{prefix}-{name}.scope"));
    }
    Ok(path)
}

/// The hierarchies to join, from /proc/self/mountinfo: the v1 ones with a controller in
/// [`V1_CONTROLLERS`], or else the v2 one.
fn hierarchies() -> Result<Vec<Hierarchy>, CgroupError> {
    let found = parse_mountinfo(&read("/proc/self/mountinfo")?);
    if found.is_empty() {
        return Err(CgroupError::NoHierarchy);
    }
    Ok(found)
}

fn parse_mountinfo(mountinfo: &str) -> Vec<Hierarchy> {
    let mut v1 = Vec::<Hierarchy>::new();
    let mut v2 = Vec::new();
    for line in mountinfo.lines() {
        // "<id> <parent> <dev> <root> <mount point> <options> [optional...] - <type> <source> <super options>"
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(mount), Some(fstype)) = (left.get(3), left.get(4), right.first()) else { continue };
        // A view of part of a hierarchy (a container's) does not show the paths cgroupsPath
        // names; only whole hierarchies are used.
        if *root != "/" {
            continue;
        }
        let hierarchy = |controllers| Hierarchy { mount: unescape(mount).into(), controllers };
        match *fstype {
            "cgroup" => {
                let options = right.get(2).copied().unwrap_or_default();
                let controllers: Vec<String> = options.split(',').filter(|o| V1_CONTROLLERS.contains(o)).map(String::from).collect();
                if !controllers.is_empty() && !v1.iter().any(|h| h.controllers == controllers) {
                    v1.push(hierarchy(controllers));
                }
            }
            "cgroup2" => v2.push(hierarchy(Vec::new())),
            _ => {}
        }
    }
    if v1.is_empty() {
        v2.truncate(1);
        v2
    } else {
        v1
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// The shim's own directory in `h`, from /proc/self/cgroup ("<id>:<controllers>:<path>").
fn own_dir(h: &Hierarchy, own: &str) -> PathBuf {
    let path = own
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            Some((parts.next()?, parts.next()?, parts.next()?))
        })
        .find(|(_, controllers, _)| {
            if h.controllers.is_empty() {
                controllers.is_empty()
            } else {
                controllers.split(',').any(|c| h.controllers.iter().any(|hc| hc == c))
            }
        })
        .map(|(_, _, path)| path.to_string())
        .unwrap_or_else(|| "/".into());
    h.mount.join(path.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";

    #[test]
    fn v1_controllers_win_over_an_empty_unified_hierarchy() {
        let found = parse_mountinfo(HYBRID);
        let mounts: Vec<_> = found.iter().map(|h| h.mount.to_string_lossy().into_owned()).collect();
        assert_eq!(mounts, ["/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids"]);
        assert_eq!(found[0].controllers, ["cpu", "cpuacct"]);
        let own = "9:name=systemd:/\n4:memory:/kubepods/pod1\n2:cpu,cpuacct:/kubepods\n1:pids:/\n0::/init.scope\n";
        assert_eq!(own_dir(&found[0], own), Path::new("/sys/fs/cgroup/cpu,cpuacct/kubepods"));
        assert_eq!(own_dir(&found[1], own), Path::new("/sys/fs/cgroup/memory/kubepods/pod1"));
    }

    #[test]
    fn v2_alone_is_one_hierarchy() {
        let found = parse_mountinfo("25 21 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate");
        assert_eq!(found, [Hierarchy { mount: "/sys/fs/cgroup".into(), controllers: vec![] }]);
        assert_eq!(own_dir(&found[0], "0::/system.slice/containerd.service\n"), Path::new("/sys/fs/cgroup/system.slice/containerd.service"));
        assert!(parse_mountinfo("25 21 0:22 / /proc rw - proc proc rw").is_empty());
        // A container's view of part of a hierarchy is not used.
        assert!(parse_mountinfo("25 21 0:22 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw").is_empty());
    }

    #[test]
    fn cgroup_paths_never_climb() {
        assert_eq!(relative_path("/kubepods/besteffort/podx/abc").unwrap(), Path::new("kubepods/besteffort/podx/abc"));
        assert_eq!(relative_path("default/c1").unwrap(), Path::new("default/c1"));
        for bad in ["/kubepods/../../etc", "..", "/", ""] {
            assert!(matches!(relative_path(bad), Err(CgroupError::BadPath(_))), "{bad}");
        }
        // The systemd driver's form, as kubelet and containerd write it for a pod sandbox.
        assert_eq!(
            relative_path("kubepods-burstable-pod1a2b.slice:cri-containerd:abc").unwrap(),
            Path::new("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b.slice/cri-containerd-abc.scope")
        );
        assert_eq!(relative_path("kubepods.slice:cri-containerd:abc").unwrap(), Path::new("kubepods.slice/cri-containerd-abc.scope"));
        assert_eq!(relative_path(":cri-containerd:abc").unwrap(), Path::new("cri-containerd-abc.scope"));
        for bad in ["kubepods.slice:cri:..", "kubepods--x.slice:p:n", "kubepods:p:n", "a.slice:p:", "a.slice:p:n:x", "../x.slice:p:n", "a.slice:p:x/y"] {
            assert!(matches!(relative_path(bad), Err(CgroupError::Systemd(_))), "{bad}");
        }
    }
}
