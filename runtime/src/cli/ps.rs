//! `hull ps` (the shim's running pods) and the pod lookup `hull exec` shares.

use std::io::Write;

use hull_runtime::pod::state::PodDir;

use crate::CliError;

/// A pod of the shim, from its state directory.
pub struct PodState {
    pub namespace: String,
    pub id: String,
    pub dir: PodDir,
    /// The VMM's pid while it runs.
    pub vmm_pid: Option<u32>,
    pub containers: Vec<String>,
}

pub fn pods() -> Vec<PodState> {
    PodDir::all()
        .into_iter()
        .map(|(namespace, dir)| {
            // The first pid recorded is the VMM's; a pod whose VMM is gone is not running.
            let vmm_pid = dir.pids().first().copied().filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
            PodState { namespace, id: dir.id(), vmm_pid, containers: dir.containers(), dir }
        })
        .collect()
}

pub fn short(id: &str) -> &str {
    &id[..id.len().min(13)]
}

pub fn ps() -> Result<i32, CliError> {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{:<14} {:<13} {:>8} {:>9}  CONTAINERS", "NAMESPACE", "POD", "VMM PID", "UPTIME");
    for p in pods() {
        let uptime = p.dir.started().and_then(|t| t.elapsed().ok());
        let uptime = uptime.map(|d| format!("{}s", d.as_secs())).unwrap_or_else(|| "-".into());
        let pid = p.vmm_pid.map(|p| p.to_string()).unwrap_or_else(|| "exited".into());
        let containers: Vec<&str> = p.containers.iter().map(|c| short(c)).collect();
        let _ = writeln!(out, "{:<14} {:<13} {:>8} {:>9}  {}", p.namespace, short(&p.id), pid, uptime, containers.join(","));
    }
    Ok(0)
}
