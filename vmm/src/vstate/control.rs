//! Pause, resume and stop for a running VM. vCPUs check the run state before every KVM_RUN;
//! a controller flips it and kicks them out of KVM_RUN with a signal so that they see it.
//! A paused vCPU can also be asked to save itself (for a snapshot): KVM's vCPU state is read
//! on the vCPU's own thread, which owns its fd.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::vcpu::{VcpuError, VcpuState};

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

/// What a vCPU does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    Run,
    /// Save its state (`VcpuControl::saved`), then ask again.
    Save,
    End,
}

/// One round of vCPU saves: which vCPUs still have to save, and what each saved.
#[derive(Default)]
struct Saves {
    wanted: Vec<bool>,
    saved: Vec<Option<Result<VcpuState, VcpuError>>>,
}

pub struct VcpuControl {
    state: Mutex<RunState>,
    cond: Condvar,
    saves: Mutex<Saves>,
    saved_cond: Condvar,
}

impl Default for VcpuControl {
    fn default() -> VcpuControl {
        VcpuControl { state: Mutex::new(RunState::Running), cond: Condvar::new(), saves: Mutex::default(), saved_cond: Condvar::new() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("Only a paused VM can be saved; this one is {0}.")]
    NotPaused(&'static str),
    #[error("vCPU {0} did not save its state within {1} s.")]
    Timeout(usize, u64),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

impl VcpuControl {
    pub fn lock(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn paused(&self) -> bool {
        *self.lock() == RunState::Paused
    }

    fn saves(&self) -> MutexGuard<'_, Saves> {
        self.saves.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by vCPU `id` before KVM_RUN: what to do. Blocks while paused, unless asked to save.
    pub fn turn(&self, id: u8) -> Turn {
        let mut s = self.lock();
        loop {
            match *s {
                RunState::Running => return Turn::Run,
                RunState::Ended => return Turn::End,
                RunState::Paused => {
                    if self.saves().wanted.get(usize::from(id)).copied().unwrap_or(false) {
                        return Turn::Save;
                    }
                    s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    /// What vCPU `id` saved, for `save_all`.
    pub fn saved(&self, id: u8, state: Result<VcpuState, VcpuError>) {
        let mut saves = self.saves();
        let id = usize::from(id);
        if let (Some(w), Some(slot)) = (saves.wanted.get(id).copied(), saves.saved.get_mut(id)) {
            if w {
                *slot = Some(state);
            }
        }
        if let Some(w) = saves.wanted.get_mut(id) {
            *w = false;
        }
        self.saved_cond.notify_all();
    }

    /// Asks each of the `count` vCPUs of a paused VM to save itself and returns their states in
    /// vCPU order. `kick` is called while waiting: a vCPU that entered KVM_RUN just after the
    /// pause's signal is still in it and needs another.
    pub fn save_all(&self, count: usize, timeout: Duration, kick: impl Fn()) -> Result<Vec<VcpuState>, SaveError> {
        {
            let mut s = self.lock();
            if *s != RunState::Paused {
                return Err(SaveError::NotPaused(s.as_str()));
            }
            *self.saves() = Saves { wanted: vec![true; count], saved: (0..count).map(|_| None).collect() };
            self.set(&mut s, RunState::Paused);
        }
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut saves = self.saves();
                if !saves.wanted.iter().any(|&w| w) {
                    break;
                }
                if Instant::now() > deadline {
                    let late = saves.wanted.iter().position(|&w| w).unwrap_or(0);
                    *saves = Saves::default();
                    return Err(SaveError::Timeout(late, timeout.as_secs()));
                }
            }
            // Not under the saves lock: `kick` takes the state lock, which `turn` holds while
            // it takes the saves lock.
            kick();
            let saves = self.saves();
            drop(self.saved_cond.wait_timeout(saves, Duration::from_millis(10)).unwrap_or_else(|e| e.into_inner()));
        }
        let mut saves = self.saves();
        let taken = std::mem::take(&mut *saves);
        taken.saved.into_iter().enumerate().map(|(i, s)| s.unwrap_or(Err(VcpuError::Exit { id: i as u8, exit: "no state saved".into(), regs: String::new() })).map_err(SaveError::from)).collect()
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
        assert!(c.turn(0) == Turn::Run);
        {
            let mut g = c.lock();
            c.set(&mut g, RunState::Paused);
        }
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.turn(0) == Turn::Run);
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
        let t = std::thread::spawn(move || c3.turn(0) == Turn::Run);
        std::thread::sleep(Duration::from_millis(20));
        {
            let mut g = c.lock();
            c.set(&mut g, RunState::Ended);
        }
        assert!(!t.join().unwrap(), "ended: it leaves");
    }

    #[test]
    fn paused_vcpus_save_when_asked_and_only_a_paused_vm_is_saved() {
        let c = Arc::new(VcpuControl::default());
        assert!(matches!(c.save_all(1, Duration::from_secs(1), || {}), Err(SaveError::NotPaused("running"))));
        {
            let mut g = c.lock();
            c.set(&mut g, RunState::Paused);
        }
        let c2 = c.clone();
        // A vCPU thread as `Vcpu::run` drives it; its "state" here is an error it reports.
        let vcpu = std::thread::spawn(move || {
            let mut saves = 0;
            loop {
                match c2.turn(0) {
                    Turn::Save => {
                        saves += 1;
                        c2.saved(0, Err(VcpuError::XsaveSize(saves)));
                    }
                    Turn::End => return saves,
                    Turn::Run => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        let r = c.save_all(1, Duration::from_secs(5), || {});
        assert!(matches!(r, Err(SaveError::Vcpu(VcpuError::XsaveSize(1)))), "the vCPU's own answer comes back");
        // A vCPU that never answers (vCPU 1 does not exist) is named after the timeout.
        let r = c.save_all(2, Duration::from_millis(100), || {});
        assert!(matches!(r, Err(SaveError::Timeout(1, 0))), "vCPU 1 never saved");
        {
            let mut g = c.lock();
            c.set(&mut g, RunState::Ended);
        }
        assert_eq!(vcpu.join().unwrap(), 2, "one save per request, then the VM ended");
    }
}
