//! Pause, resume and stop for a running VM. vCPUs check the run state before every KVM_RUN;
//! a controller flips it and kicks them out of KVM_RUN with a signal so that they see it.

use std::sync::{Condvar, Mutex, MutexGuard};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    /// The VM is ending (or has ended): vCPUs leave their loops.
    Ended,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Ended => "ended",
        }
    }
}

pub struct VcpuControl {
    state: Mutex<RunState>,
    cond: Condvar,
}

impl Default for VcpuControl {
    fn default() -> VcpuControl {
        VcpuControl { state: Mutex::new(RunState::Running), cond: Condvar::new() }
    }
}

impl VcpuControl {
    pub fn lock(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by a vCPU before KVM_RUN: blocks while paused; false once the VM is ending.
    pub fn may_run(&self) -> bool {
        let mut s = self.lock();
        while *s == RunState::Paused {
            s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        *s == RunState::Running
    }

    /// Sets the state under the held guard and wakes paused vCPUs.
    pub fn set(&self, guard: &mut MutexGuard<'_, RunState>, to: RunState) {
        **guard = to;
        self.cond.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn paused_vcpus_block_until_resumed_or_ended() {
        let c = Arc::new(VcpuControl::default());
        assert!(c.may_run());
        {
            let mut g = c.lock();
            c.set(&mut g, RunState::Paused);
        }
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.may_run());
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "a paused vCPU waits");
        {
            let mut g = c.lock();
            c.set(&mut g, RunState::Running);
        }
        assert!(t.join().unwrap(), "resumed: it runs");
        {
            let mut g = c.lock();
            c.set(&mut g, RunState::Paused);
        }
        let c3 = c.clone();
        let t = std::thread::spawn(move || c3.may_run());
        std::thread::sleep(Duration::from_millis(20));
        {
            let mut g = c.lock();
            c.set(&mut g, RunState::Ended);
        }
        assert!(!t.join().unwrap(), "ended: it leaves");
    }
}
