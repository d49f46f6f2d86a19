//! A container's cgroup: statistics, resource updates, OOM counts.
//!
//! libcgroups picks v1 (or hybrid, as on this project's hosts) or the unified v2 hierarchy
//! (inside the guest); the OOM counter is read directly because libcgroups does not expose it.

use std::path::{Path, PathBuf};

use hull_proto::agent::StatsContainerResponse;
use libcgroups::common::{
    create_cgroup_manager, get_cgroup_setup, AnyCgroupManager, AnyManagerError, CgroupConfig,
    CgroupManager, CgroupSetup, ControllerOpt, CreateCgroupSetupError,
};
use oci_spec::runtime::LinuxResources;

use crate::helper::error_chain;

/// The libcgroups variants' messages carry the whole chain: its top-level messages alone are
/// vague.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("Cannot open the cgroup {path:?}: {}.", error_chain(.source))]
    Open { path: PathBuf, source: CreateCgroupSetupError },
    #[error("Cannot read the statistics of cgroup {path:?}: {}.", error_chain(.source))]
    Stats { path: PathBuf, source: AnyManagerError },
    /// A cgroup v2 interface file, read directly (see `stats_v2`).
    #[error("Cannot read the statistics of cgroup {path:?}: {source}.")]
    StatsFile { path: PathBuf, source: std::io::Error },
    #[error("Cannot apply resources to cgroup {path:?}: {}.", error_chain(.source))]
    Apply { path: PathBuf, source: AnyManagerError },
    #[error("Cannot list the processes of cgroup {path:?}: {}.", error_chain(.source))]
    Pids { path: PathBuf, source: AnyManagerError },
}

fn manager(path: &Path, id: &str) -> Result<AnyCgroupManager, CgroupError> {
    create_cgroup_manager(CgroupConfig {
        cgroup_path: path.to_path_buf(),
        systemd_cgroup: false,
        container_name: id.to_string(),
    })
    .map_err(|source| CgroupError::Open { path: path.into(), source })
}

/// 2 for the unified hierarchy, 1 for v1 or hybrid.
pub fn version() -> u32 {
    match get_cgroup_setup() {
        Ok(CgroupSetup::Unified) => 2,
        _ => 1,
    }
}

pub fn stats(path: &Path, id: &str) -> Result<StatsContainerResponse, CgroupError> {
    if version() == 2 {
        return stats_v2(path);
    }
    let s = manager(path, id)?
        .stats()
        .map_err(|source| CgroupError::Stats { path: path.into(), source })?;
    let io_bytes = |op: &str| -> u64 {
        s.blkio
            .service_bytes
            .iter()
            .filter(|d| d.op_type.as_deref().is_some_and(|t| t.eq_ignore_ascii_case(op)))
            .map(|d| d.value)
            .sum()
    };
    let mut r = StatsContainerResponse::new();
    r.cpu_usage_ns = s.cpu.usage.usage_total;
    r.cpu_user_ns = s.cpu.usage.usage_user;
    r.cpu_system_ns = s.cpu.usage.usage_kernel;
    r.memory_usage_bytes = s.memory.memory.usage;
    r.memory_limit_bytes = s.memory.memory.limit;
    r.memory_max_usage_bytes = s.memory.memory.max_usage;
    r.pids_current = s.pids.current;
    r.pids_limit = s.pids.limit;
    r.io_read_bytes = io_bytes("read");
    r.io_write_bytes = io_bytes("write");
    r.oom_kills = oom_kills(path);
    Ok(r)
}

/// cgroup v2 statistics read from the interface files directly: libcgroups insists on the
/// pressure files, which a kernel without CONFIG_PSI (hull's guest) does not have.
fn stats_v2(path: &Path) -> Result<StatsContainerResponse, CgroupError> {
    let dir = Path::new("/sys/fs/cgroup").join(path.strip_prefix("/").unwrap_or(path));
    let read = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap_or_default();
    let single = |file: &str| -> u64 { read(file).trim().parse().unwrap_or(0) };
    // "max" means no limit; reported as u64::MAX like libcgroups does.
    let limit = |file: &str| -> u64 {
        let t = read(file);
        if t.trim() == "max" { u64::MAX } else { t.trim().parse().unwrap_or(0) }
    };
    let cpu = std::fs::read_to_string(dir.join("cpu.stat"))
        .map_err(|source| CgroupError::StatsFile { path: path.into(), source })?;
    let cpu_us = |key: &str| parse_counter(&cpu, key).unwrap_or(0).saturating_mul(1000);
    let io = read("io.stat");
    let io_sum = |key: &str| -> u64 {
        io.split_ascii_whitespace()
            .filter_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse::<u64>().ok())
            .sum()
    };
    let mut r = StatsContainerResponse::new();
    r.cpu_usage_ns = cpu_us("usage_usec");
    r.cpu_user_ns = cpu_us("user_usec");
    r.cpu_system_ns = cpu_us("system_usec");
    r.memory_usage_bytes = single("memory.current");
    r.memory_limit_bytes = limit("memory.max");
    r.memory_max_usage_bytes = single("memory.peak");
    r.pids_current = single("pids.current");
    r.pids_limit = limit("pids.max");
    r.io_read_bytes = io_sum("rbytes");
    r.io_write_bytes = io_sum("wbytes");
    r.oom_kills = oom_kills(path);
    Ok(r)
}

pub fn update(path: &Path, id: &str, resources: &LinuxResources) -> Result<(), CgroupError> {
    let opt = ControllerOpt {
        resources,
        disable_oom_killer: resources.memory().as_ref().and_then(|m| m.disable_oom_killer()).unwrap_or(false),
        oom_score_adj: None,
        freezer_state: None,
    };
    manager(path, id)?
        .apply(&opt)
        .map_err(|source| CgroupError::Apply { path: path.into(), source })
}

pub fn pids(path: &Path, id: &str) -> Result<Vec<i32>, CgroupError> {
    let pids = manager(path, id)?
        .get_all_pids()
        .map_err(|source| CgroupError::Pids { path: path.into(), source })?;
    Ok(pids.into_iter().map(|p| p.as_raw()).collect())
}

/// How many processes of the cgroup the OOM killer has killed (0 when unknown).
pub fn oom_kills(path: &Path) -> u64 {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let (file, root) = match get_cgroup_setup() {
        Ok(CgroupSetup::Unified) => ("memory.events", PathBuf::from("/sys/fs/cgroup")),
        _ => match libcgroups::v1::util::get_subsystem_mount_point(
            &libcgroups::v1::ControllerType::Memory,
        ) {
            Ok(p) => ("memory.oom_control", p),
            Err(_) => return 0,
        },
    };
    std::fs::read_to_string(root.join(rel).join(file))
        .ok()
        .and_then(|text| parse_counter(&text, "oom_kill"))
        .unwrap_or(0)
}

/// The value of `key` in a flat-keyed cgroup file ("key value" lines).
fn parse_counter(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line.split_ascii_whitespace();
        (words.next() == Some(key)).then(|| words.next()?.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kill_counter_parses_from_v1_and_v2_files() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n";
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n";
        assert_eq!(parse_counter(v2, "oom_kill"), Some(2));
        assert_eq!(parse_counter(v1, "oom_kill"), Some(5));
        assert_eq!(parse_counter("oom_kill_disable 0\n", "oom_kill"), None);
    }
}
