//! A VM whose vCPUs run: waiting for its end, and the controller that pauses, resumes and
//! stops it from other threads (the API socket's). `builder::start` makes one.
//!
//! (Not `vm.rs`: `vstate::vm::Vm` is the KVM VM itself, which a `RunningVm` owns.)

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::snapshot::{Machine, Saved, SnapshotError};
use crate::vstate::control::{RunState, VcpuControl};
use crate::vstate::vcpu::{VcpuError, VmExit};
use crate::vstate::vm::Vm;

/// The signal that kicks a vCPU thread out of KVM_RUN so that it sees the run state.
pub(crate) fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick signal's handler, which does nothing: the signal is there only to make
/// KVM_RUN return. Without a handler the signal would end the process.
pub(crate) fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), on_kick)
}

/// What each vCPU thread sends when it ends: how the VM ended, as that vCPU saw it.
pub(crate) type VcpuResult = Result<VmExit, VcpuError>;

/// A running VM: its vCPU threads, and what pauses and stops them.
pub struct RunningVm {
    started: Instant,
    control: Arc<VcpuControl>,
    threads: Vec<JoinHandle<()>>,
    pthreads: Arc<Vec<libc::pthread_t>>,
    results: mpsc::Receiver<VcpuResult>,
    wake: mpsc::Sender<VcpuResult>,
    /// Dropped after the vCPUs: devices and memory outlive every vCPU thread.
    vm: Option<Arc<Vm>>,
    machine: Arc<Machine>,
}

impl RunningVm {
    /// Takes over the vCPU `threads`, which report on `results` (`wake` is a sender of that
    /// channel, for `Controller::stop`), the VM they run on, and what a snapshot saves of it.
    pub(crate) fn new(
        started: Instant,
        control: Arc<VcpuControl>,
        threads: Vec<JoinHandle<()>>,
        (wake, results): (mpsc::Sender<VcpuResult>, mpsc::Receiver<VcpuResult>),
        vm: Arc<Vm>,
        machine: Machine,
    ) -> RunningVm {
        let pthreads = Arc::new(threads.iter().map(|t| std::os::unix::thread::JoinHandleExt::as_pthread_t(t) as libc::pthread_t).collect());
        RunningVm { started, control, threads, pthreads, results, wake, vm: Some(vm), machine: Arc::new(machine) }
    }

    /// A handle that pauses, resumes, saves and stops the VM from other threads.
    pub fn controller(&self) -> Controller {
        Controller { control: self.control.clone(), pthreads: self.pthreads.clone(), wake: self.wake.clone(), machine: self.machine.clone() }
    }

    /// Waits until the guest ends the VM (or `Controller::stop`), stops every vCPU, and says
    /// how it ended.
    pub fn wait(mut self) -> Result<VmExit, VcpuError> {
        // The first vCPU to end the VM decides how it ended; the others are stopped.
        let result = self.results.recv().unwrap_or(Ok(VmExit::Stopped));
        {
            // From here on no controller kicks a thread: they may be joined.
            let mut g = self.control.lock();
            self.control.set(&mut g, RunState::Ended);
        }
        for t in &self.threads {
            while !t.is_finished() {
                let _ = t.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        drop(self.vm.take());
        let ran_ms = self.started.elapsed().as_millis() as u64;
        match &result {
            Ok(exit) => tracing::info!(?exit, ran_ms, "VM ended"),
            Err(e) => tracing::error!(error = %e, ran_ms, "VM failed"),
        }
        result
    }
}

/// Pauses, resumes or ends a running VM from outside.
#[derive(Clone)]
pub struct Controller {
    control: Arc<VcpuControl>,
    pthreads: Arc<Vec<libc::pthread_t>>,
    wake: mpsc::Sender<VcpuResult>,
    machine: Arc<Machine>,
}

impl Controller {
    pub fn state(&self) -> RunState {
        *self.control.lock()
    }

    /// Stops the vCPUs where they are; the devices keep serving what is in flight. Returns
    /// the state before.
    pub fn pause(&self) -> RunState {
        let mut g = self.control.lock();
        let before = *g;
        if before == RunState::Running {
            self.control.set(&mut g, RunState::Paused);
            self.kick_locked(&g);
            tracing::info!("VM paused");
        }
        before
    }

    /// Kicks every vCPU out of KVM_RUN; `state` is the held run state lock.
    fn kick_locked(&self, state: &RunState) {
        // Under the lock: `wait` cannot have joined the threads while the state is not Ended.
        if *state == RunState::Ended {
            return;
        }
        for &t in self.pthreads.iter() {
            // SAFETY: `t` is a vCPU thread that has not been joined (the state is not Ended
            // and the lock is held), so its pthread_t is valid; the kick signal has a no-op
            // handler.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Saves the paused VM into `dir` (see `snapshot`); it stays paused.
    pub fn snapshot(&self, dir: &std::path::Path) -> Result<Saved, SnapshotError> {
        let started = Instant::now();
        let saved = self.machine.save(dir, &self.control, || self.kick_locked(&self.control.lock()))?;
        tracing::info!(dir = %dir.display(), memory_bytes = saved.memory_bytes, state_bytes = saved.state_bytes, ms = started.elapsed().as_millis() as u64, "VM saved");
        Ok(saved)
    }

    pub fn resume(&self) -> RunState {
        let mut g = self.control.lock();
        let before = *g;
        if before == RunState::Paused {
            self.control.set(&mut g, RunState::Running);
            tracing::info!("VM resumed");
        }
        before
    }

    /// Ends the VM: its `wait` returns `VmExit::Stopped`.
    pub fn stop(&self) {
        // `wait` takes this as the VM's end and kicks the vCPUs out of KVM_RUN itself.
        let _ = self.wake.send(Ok(VmExit::Stopped));
    }
}
