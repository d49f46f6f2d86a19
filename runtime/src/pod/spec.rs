//! The container's OCI spec, rewritten for the guest: the rootfs is the container's directory
//! in the pod's virtio-fs share, host files the spec bind-mounts (CRI's /etc/hosts,
//! resolv.conf, hostname, termination log) are shared in beside it, and host-only fields go.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::share::{bind_into, guest_paths, Bind};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("The OCI spec of container {id} is not an object with a process.")]
    Shape { id: String },
    #[error("Cannot share {source_path:?} (mount {destination}) of container {id} with the guest: {source}.")]
    Share { id: String, source_path: PathBuf, destination: String, source: std::io::Error },
    #[error("The pod's {what} is {value}, which is not a limit a VM can have (a whole number up to 2^63-1).")]
    Resource { what: String, value: String },
}

fn is_bind(m: &Value) -> bool {
    m.get("type").and_then(Value::as_str) == Some("bind")
        || m.get("options").and_then(Value::as_array).is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// What the mount's options ask of the host bind: recursive for `rbind`, read-only for `ro`
/// or `rro` (recursively when the bind is recursive).
fn bind_of(m: &Value) -> Bind {
    let has = |o: &str| m.get("options").and_then(Value::as_array).is_some_and(|opts| opts.iter().any(|x| x == o));
    Bind { recursive: has("rbind"), readonly: has("ro") || has("rro") }
}

/// Rewrites `spec` for the guest. Host bind sources are bound under `host_share` (the
/// container's directory in the pod's private mounts, pod/share.rs) so that the guest sees
/// them, read-only on the host where the spec says `ro`.
pub fn for_guest(id: &str, mut spec: Value, host_share: &Path) -> Result<Value, SpecError> {
    if !spec.is_object() || spec.get("process").is_none() {
        return Err(SpecError::Shape { id: id.into() });
    }
    let (_, guest_root) = guest_paths(id);
    spec["root"]["path"] = json!(&guest_root);
    let obj = spec.as_object_mut().expect("checked above");
    // Hooks name host binaries; they cannot run in the guest.
    obj.remove("hooks");
    if let Some(process) = obj.get_mut("process").and_then(Value::as_object_mut) {
        // The guest has neither AppArmor nor SELinux.
        process.remove("apparmorProfile");
        process.remove("selinuxLabel");
    }
    if let Some(linux) = obj.get_mut("linux").and_then(Value::as_object_mut) {
        linux.remove("mountLabel");
        // Propagation is the host's business: a host mount under a volume reaches the guest
        // through the share (its host bind is a slave of the source, pod/share.rs), not as a
        // mount event in the guest, whose share mount is private.
        linux.remove("rootfsPropagation");
        // Namespace paths (CRI's network namespace, the sandbox's) are host paths; the agent
        // joins the guest sandbox's namespaces itself.
        if let Some(ns) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
            for n in ns.iter_mut().filter_map(Value::as_object_mut) {
                n.remove("path");
            }
        }
    }
    let guest_mounts = Path::new(&guest_root).parent().map(|p| p.join("mounts")).unwrap_or_default();
    if let Some(mounts) = obj.get_mut("mounts").and_then(Value::as_array_mut) {
        for (i, m) in mounts.iter_mut().enumerate() {
            if !is_bind(m) {
                continue;
            }
            let source = PathBuf::from(m.get("source").and_then(Value::as_str).unwrap_or_default());
            let destination = m.get("destination").and_then(Value::as_str).unwrap_or_default().to_string();
            if destination == "/dev/shm" {
                // CRI shares the sandbox's /dev/shm from the host; in the guest each pod VM
                // is the sandbox, so a tmpfs serves.
                *m = json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]});
                continue;
            }
            let share_err = |e: std::io::Error| SpecError::Share { id: id.into(), source_path: source.clone(), destination: destination.clone(), source: e };
            let meta = std::fs::metadata(&source).map_err(share_err)?;
            let host = host_share.join("mounts").join(i.to_string());
            if meta.is_dir() {
                std::fs::create_dir_all(&host).map_err(share_err)?;
            } else {
                std::fs::create_dir_all(host_share.join("mounts")).map_err(share_err)?;
                std::fs::write(&host, b"").map_err(share_err)?;
            }
            bind_into(&source, &host, bind_of(m)).map_err(|e| share_err(e.into()))?;
            m["source"] = json!(guest_mounts.join(i.to_string()));
            // (r)slave, (r)shared, (r)private: see rootfsPropagation above.
            if let Some(options) = m.get_mut("options").and_then(Value::as_array_mut) {
                options.retain(|o| !o.as_str().is_some_and(|o| ["slave", "rslave", "shared", "rshared", "private", "rprivate", "unbindable", "runbindable"].contains(&o)));
            }
        }
    }
    Ok(spec)
}

/// The pod VM's size: the configured base (`vcpus`, `memory_mib`) plus the pod's limits, so a
/// pod's containers get what they were promised on top of what the guest itself needs. CRI
/// (containerd 1.7+) puts the pod's totals on the sandbox as annotations; a `ctr run` container
/// is its own pod and its own limits are the pod's. With no limit the base is the size.
/// Containers added to a running pod do not grow it (no hotplug yet): their limits must fit.
/// CPUs are rounded up and capped at the host's, memory capped at the host's. A limit that is
/// not a number, or one no VM could have (`8Ei`, past i64), is an error naming it: dropping
/// it silently would run the pod unlimited.
pub fn vm_size(spec: &Value, vcpus: u32, memory_mib: u32) -> Result<(u32, u32), SpecError> {
    let resource = |annotation: &str, field: &str| -> Result<i64, SpecError> {
        let bad = |what: String, value: String| SpecError::Resource { what, value };
        let value = match spec.pointer("/annotations").and_then(|a| a.get(annotation)) {
            Some(Value::String(v)) => v.trim().parse::<i64>().map_err(|_| bad(annotation.into(), v.clone()))?,
            Some(v) => return Err(bad(annotation.into(), v.to_string())),
            None => match spec.pointer(&format!("/linux/resources/{field}")) {
                None | Some(Value::Null) => 0,
                Some(v) => v.as_i64().ok_or_else(|| bad(format!("linux.resources.{}", field.replace('/', ".")), v.to_string()))?,
            },
        };
        // Zero or negative: no limit (CRI's quota of -1, runc's memory limit of -1).
        Ok(value.max(0))
    };
    let memory = resource("io.kubernetes.cri.sandbox-memory", "memory/limit")?;
    let quota = resource("io.kubernetes.cri.sandbox-cpu-quota", "cpu/quota")?;
    let period = match resource("io.kubernetes.cri.sandbox-cpu-period", "cpu/period")? {
        0 => 100_000,
        p => p,
    };
    let extra_cpus = quota / period + i64::from(quota % period != 0);
    let extra_mib = memory / (1 << 20) + i64::from(memory % (1 << 20) != 0);
    let host_cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let vcpus = i64::from(vcpus).saturating_add(extra_cpus).clamp(1, i64::from(host_cpus.max(vcpus))) as u32;
    let wanted_mib = i64::from(memory_mib).saturating_add(extra_mib);
    let host_mib = host_memory_mib().unwrap_or(u32::MAX as i64).max(i64::from(memory_mib));
    if wanted_mib > host_mib {
        tracing::warn!(wanted_mib, host_mib, "the pod's memory limit is more than the host has; the VM gets the host's memory");
    }
    Ok((vcpus, wanted_mib.min(host_mib).min(i64::from(u32::MAX)) as u32))
}

/// The host's RAM in MiB (MemTotal).
fn host_memory_mib() -> Option<i64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: i64 = info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024)
}

/// The spec's `linux.sysctl` (for a CRI sandbox, the pod's sysctls).
pub fn sysctls(spec: &Value) -> std::collections::HashMap<String, String> {
    let Some(map) = spec.pointer("/linux/sysctl").and_then(Value::as_object) else { return Default::default() };
    map.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect()
}

/// Whether the container joins its pod's PID namespace (CRI's `pid: POD` names the pause's on
/// the host): in the guest it joins the sandbox's.
pub fn shares_pod_pid(spec: &Value) -> bool {
    spec.pointer("/linux/namespaces")
        .and_then(Value::as_array)
        .is_some_and(|ns| ns.iter().any(|n| n.get("type").and_then(Value::as_str) == Some("pid") && n.get("path").and_then(Value::as_str).is_some_and(|p| !p.is_empty())))
}

/// Whether the spec gives the container a network namespace of its own; without one it would
/// share the host's (CRI's host networking, `ctr run --net-host`), which a VM cannot do.
pub fn has_own_network(spec: &Value) -> bool {
    has_namespace(spec, "network")
}

/// Whether the spec gives the container an IPC namespace (its own or the pod's); without one it
/// would share the host's (CRI's `hostIPC`), which a VM cannot do: the guest's is not the host's.
pub fn has_own_ipc(spec: &Value) -> bool {
    has_namespace(spec, "ipc")
}

fn has_namespace(spec: &Value, typ: &str) -> bool {
    spec.pointer("/linux/namespaces")
        .and_then(Value::as_array)
        .is_some_and(|ns| ns.iter().any(|n| n.get("type").and_then(Value::as_str) == Some(typ)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_only_fields_go_and_the_root_moves_to_the_share() {
        let dir = tempfile::tempdir().unwrap();
        let spec = json!({"ociVersion": "1.0.2", "process": {"args": ["sh"], "apparmorProfile": "x", "cwd": "/"},
            "root": {"path": "rootfs"}, "hooks": {"prestart": []},
            "linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"}, {"type": "pid"}]},
            "mounts": [{"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/x/shm", "options": ["rbind"]},
                       {"destination": "/proc", "type": "proc", "source": "proc"}]});
        let out = for_guest("c1", spec, dir.path()).unwrap();
        assert_eq!(out["root"]["path"], "/run/hull/share/c1/c1/rootfs");
        assert!(out.get("hooks").is_none());
        assert!(out["process"].get("apparmorProfile").is_none());
        assert!(out["linux"]["namespaces"][0].get("path").is_none());
        assert_eq!(out["mounts"][0]["type"], "tmpfs");
        assert_eq!(out["mounts"][1]["type"], "proc");
        let err = for_guest("c2", json!({"root": {}}), dir.path()).unwrap_err().to_string();
        assert!(err.contains("c2"), "{err}");
        let missing = json!({"process": {}, "mounts": [{"destination": "/etc/hosts", "type": "bind", "source": "/nonexistent/hosts"}]});
        let err = for_guest("c3", missing, dir.path()).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/hosts") && err.contains("c3"), "{err}");
    }

    #[test]
    fn vm_is_sized_from_the_pod_limits() {
        // No limits: the base.
        assert_eq!(vm_size(&json!({}), 1, 256).unwrap(), (1, 256));
        // A ctr container with 100 MiB and half a CPU: base plus that, CPUs rounded up.
        let spec = json!({"linux": {"resources": {"memory": {"limit": 100 << 20}, "cpu": {"quota": 50_000, "period": 100_000}}}});
        assert_eq!(vm_size(&spec, 1, 256).unwrap(), (2.min(host_cpus()), 356));
        // CRI's pod totals win over the sandbox's own (empty) resources.
        let spec = json!({"annotations": {"io.kubernetes.cri.sandbox-memory": "536870912", "io.kubernetes.cri.sandbox-cpu-quota": "-1"}});
        assert_eq!(vm_size(&spec, 1, 256).unwrap(), (1, 768));
        // -1: unlimited.
        let spec = json!({"linux": {"resources": {"memory": {"limit": -1}}}});
        assert_eq!(vm_size(&spec, 1, 256).unwrap(), (1, 256));
    }

    /// Limits a hostile or broken spec gives: not numbers, past i64 (`8Ei`), or big enough to
    /// overflow the arithmetic. Each is an error naming it, or a VM no larger than the host.
    #[test]
    fn unrepresentable_limits_are_named_and_huge_ones_capped() {
        for (spec, named) in [
            (json!({"annotations": {"io.kubernetes.cri.sandbox-memory": "lots"}}), "io.kubernetes.cri.sandbox-memory"),
            (json!({"annotations": {"io.kubernetes.cri.sandbox-memory": "9223372036854775808"}}), "io.kubernetes.cri.sandbox-memory"),
            (json!({"linux": {"resources": {"memory": {"limit": 9223372036854775808u64}}}}), "linux.resources.memory.limit"),
            (json!({"linux": {"resources": {"cpu": {"quota": "x"}}}}), "linux.resources.cpu.quota"),
        ] {
            let e = vm_size(&spec, 1, 256).unwrap_err().to_string();
            assert!(e.contains(named), "{e}");
        }
        let spec = json!({"linux": {"resources": {"memory": {"limit": i64::MAX}, "cpu": {"quota": i64::MAX, "period": 1}}}});
        let (vcpus, mib) = vm_size(&spec, 1, 256).unwrap();
        assert!(vcpus <= host_cpus() && i64::from(mib) <= host_memory_mib().unwrap(), "{vcpus} {mib}");
    }

    fn host_cpus() -> u32 {
        std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
    }

    #[test]
    fn host_networking_is_recognised() {
        assert!(has_own_network(&json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"}]}})));
        assert!(shares_pod_pid(&json!({"linux": {"namespaces": [{"type": "pid", "path": "/proc/42/ns/pid"}]}})));
        assert!(!shares_pod_pid(&json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"}]}})));
        assert!(!shares_pod_pid(&json!({"linux": {"namespaces": [{"type": "pid", "path": ""}]}})));
        assert!(!has_own_network(&json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}})));
        assert!(!has_own_network(&json!({"process": {}})));
    }
}
