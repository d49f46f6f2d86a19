//! Validation and rewriting of the OCI documents a client sends.
//!
//! The agent owns a few fields whatever the client says: the root path (the rootfs the client
//! named inside the guest), the cgroup path (under the agent's own tree) and the namespaces a
//! container shares with its sandbox.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("The OCI spec of container {id} is malformed: {source}.")]
    Malformed { id: String, source: serde_json::Error },
    #[error("The OCI spec of container {id} has version {version}; hull-agent takes 1.x.")]
    Version { id: String, version: String },
    #[error("The OCI spec of container {id} has no process to run.")]
    NoProcess { id: String },
    #[error("The OCI process of {what} has no args: there is nothing to run.")]
    NoArgs { what: String },
    #[error("The OCI process of {what} has a relative cwd {cwd:?}; it must be absolute.")]
    RelativeCwd { what: String, cwd: PathBuf },
    #[error("The rootfs {path:?} of container {id} does not exist or is not a directory.")]
    MissingRootfs { id: String, path: PathBuf },
    #[error("The OCI spec of container {id} has no root.path and the request names no rootfs.")]
    NoRoot { id: String },
    #[error("The OCI spec of container {id} asks for {what}, which hull-agent cannot honour.")]
    Unsupported { id: String, what: String },
}

/// Namespace files of the sandbox that containers join.
#[derive(Debug, Clone)]
pub struct SandboxNamespaces {
    pub net: PathBuf,
    pub ipc: PathBuf,
    pub uts: PathBuf,
    /// The pod's PID namespace, whose PID 1 is the sandbox's init; containers join it only when
    /// asked (CRI's `pid: POD`).
    pub pid: PathBuf,
}

/// Parses and rewrites a container's spec. `cgroup_path` replaces linux.cgroupsPath;
/// `sandbox_pid` puts the container in the sandbox's PID namespace.
pub fn prepare_container_spec(
    id: &str,
    json: &str,
    rootfs: &str,
    cgroup_path: &Path,
    sandbox: Option<&SandboxNamespaces>,
    sandbox_pid: bool,
) -> Result<Spec, SpecError> {
    let mut spec: Spec = serde_json::from_str(json)
        .map_err(|source| SpecError::Malformed { id: id.into(), source })?;
    if !spec.version().starts_with("1.") {
        return Err(SpecError::Version { id: id.into(), version: spec.version().clone() });
    }
    let process = spec.process().as_ref().ok_or_else(|| SpecError::NoProcess { id: id.into() })?;
    check_process(process, &format!("container {id}"))?;

    let root_path = if rootfs.is_empty() {
        let root = spec.root().as_ref().ok_or_else(|| SpecError::NoRoot { id: id.into() })?;
        if !root.path().is_absolute() {
            return Err(SpecError::NoRoot { id: id.into() });
        }
        root.path().clone()
    } else {
        PathBuf::from(rootfs)
    };
    if !root_path.is_dir() {
        return Err(SpecError::MissingRootfs { id: id.into(), path: root_path });
    }
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(root_path);
    spec.set_root(Some(root));

    // Hooks name host binaries; a guest has none of them.
    if spec.hooks().is_some() {
        return Err(SpecError::Unsupported { id: id.into(), what: "OCI hooks".into() });
    }

    if sandbox_pid && sandbox.is_none() {
        return Err(SpecError::Unsupported { id: id.into(), what: "the pod's PID namespace outside a sandbox".into() });
    }
    let linux = spec.linux_mut().get_or_insert_with(Default::default);
    linux.set_cgroups_path(Some(cgroup_path.to_path_buf()));
    let mut joined_uts = false;
    if let Some(sandbox) = sandbox {
        let mut namespaces = linux.namespaces().clone().unwrap_or_default();
        let pid = sandbox_pid.then_some((LinuxNamespaceType::Pid, &sandbox.pid));
        for (typ, path) in [
            (LinuxNamespaceType::Network, &sandbox.net),
            (LinuxNamespaceType::Ipc, &sandbox.ipc),
            (LinuxNamespaceType::Uts, &sandbox.uts),
        ]
        .into_iter()
        .chain(pid)
        {
            namespaces.retain(|ns| ns.typ() != typ);
            let mut ns = oci_spec::runtime::LinuxNamespace::default();
            ns.set_typ(typ);
            ns.set_path(Some(path.clone()));
            namespaces.push(ns);
        }
        linux.set_namespaces(Some(namespaces));
        joined_uts = true;
    }
    if joined_uts {
        // The sandbox's hostname applies; setting one in a shared UTS namespace would change it
        // for every container of the pod.
        spec.set_hostname(None);
    }
    Ok(spec)
}

/// Parses and checks the process of an exec.
pub fn prepare_exec_process(what: &str, json: &str) -> Result<Process, SpecError> {
    let process: Process = serde_json::from_str(json)
        .map_err(|source| SpecError::Malformed { id: what.into(), source })?;
    check_process(&process, what)?;
    Ok(process)
}

fn check_process(process: &Process, what: &str) -> Result<(), SpecError> {
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(SpecError::NoArgs { what: what.into() });
    }
    if !process.cwd().is_absolute() {
        return Err(SpecError::RelativeCwd { what: what.into(), cwd: process.cwd().clone() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_json(extra: &str) -> String {
        format!(
            r#"{{"ociVersion":"1.0.2","process":{{"args":["/bin/true"],"cwd":"/","user":{{"uid":0,"gid":0}}}},
               "root":{{"path":"/"}},"hostname":"c1","linux":{{"namespaces":[{{"type":"pid"}},{{"type":"mount"}}]}}{extra}}}"#
        )
    }

    #[test]
    fn rewrites_root_cgroup_and_sandbox_namespaces() {
        let sandbox = SandboxNamespaces {
            net: "/proc/7/ns/net".into(),
            ipc: "/proc/7/ns/ipc".into(),
            uts: "/proc/7/ns/uts".into(),
            pid: "/proc/8/ns/pid".into(),
        };
        let spec =
            prepare_container_spec("c1", &spec_json(""), "/tmp", Path::new("/hull/s/c1"), Some(&sandbox), false)
                .expect("valid spec");
        assert_eq!(spec.root().as_ref().unwrap().path(), Path::new("/tmp"));
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(linux.cgroups_path().as_deref(), Some(Path::new("/hull/s/c1")));
        let ns = linux.namespaces().as_ref().unwrap();
        let net = ns.iter().find(|n| n.typ() == LinuxNamespaceType::Network).unwrap();
        assert_eq!(net.path().as_deref(), Some(Path::new("/proc/7/ns/net")));
        assert!(ns.iter().any(|n| n.typ() == LinuxNamespaceType::Pid && n.path().is_none()));
        assert_eq!(spec.hostname(), &None);

        // CRI's `pid: POD`: the one pid entry is the sandbox's.
        let spec = prepare_container_spec("c1", &spec_json(""), "/tmp", Path::new("/hull/s/c1"), Some(&sandbox), true).expect("valid spec");
        let ns = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        let pids: Vec<_> = ns.iter().filter(|n| n.typ() == LinuxNamespaceType::Pid).collect();
        assert_eq!(pids.len(), 1);
        assert_eq!(pids[0].path().as_deref(), Some(Path::new("/proc/8/ns/pid")));
        let err = prepare_container_spec("c1", &spec_json(""), "/tmp", Path::new("/hull/c1"), None, true).unwrap_err();
        assert!(err.to_string().contains("PID namespace"), "{err}");
    }

    #[test]
    fn standalone_container_keeps_its_hostname() {
        let spec = prepare_container_spec("c1", &spec_json(""), "", Path::new("/hull/c1"), None, false)
            .expect("valid spec");
        assert_eq!(spec.hostname().as_deref(), Some("c1"));
    }

    #[test]
    fn bad_specs_are_named() {
        let err = |json: &str, rootfs: &str| {
            prepare_container_spec("c9", json, rootfs, Path::new("/hull/c9"), None, false)
                .unwrap_err()
                .to_string()
        };
        assert!(err("{not json", "").contains("malformed"));
        assert!(err(&spec_json(""), "/nonexistent/rootfs").contains("/nonexistent/rootfs"));
        assert!(err(&spec_json(r#","hooks":{"prestart":[{"path":"/x"}]}"#), "").contains("hooks"));
        assert!(err(r#"{"ociVersion":"1.0.2","root":{"path":"/"}}"#, "").contains("no process"));
        assert!(err(r#"{"ociVersion":"0.9","root":{"path":"/"}}"#, "").contains("version"));
        let no_args = r#"{"ociVersion":"1.0.2","process":{"args":[],"cwd":"/","user":{"uid":0,"gid":0}},"root":{"path":"/"}}"#;
        assert!(err(no_args, "").contains("no args"));
        let rel = r#"{"ociVersion":"1.0.2","process":{"args":["ls"],"cwd":"tmp","user":{"uid":0,"gid":0}},"root":{"path":"/"}}"#;
        assert!(err(rel, "").contains("relative cwd"));
    }
}
