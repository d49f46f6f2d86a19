//! Builds a microVM from a `VmConfig` and starts it: guest memory, KVM VM, kernel (ELF vmlinux
//! through its 64-bit entry, or bzImage), the devices (`device_manager`; virtio devices are
//! announced on the command line), command line, initramfs and zero page, one thread per vCPU.
//! What runs is a `RunningVm`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::config::VmConfig;
use crate::arch::x86_64::{self as arch, layout};
use crate::device_manager::{self, AttachError};
use crate::devices::legacy::PioBus;
use crate::devices::MmioBus;
use crate::devices::virtio::mmio::lock;
use crate::running_vm::{self, RunningVm};
use crate::snapshot::{self, Machine, MachineState};
use crate::vstate::control::VcpuControl;
use crate::vstate::memory::IntoFreshMemory;
use crate::vstate::vcpu::{Vcpu, VcpuError, VmExit};
use crate::vstate::vm::{Vm, VmError};


#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("A VM needs 1 to 254 vCPUs, not {0}.")]
    Vcpus(u8),
    #[error(transparent)]
    Memory(#[from] crate::vstate::memory::MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("Cannot read {what} {path:?}: {source}.")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("Cannot load the kernel {path:?}: {source}.")]
    Kernel { path: PathBuf, source: linux_loader::loader::Error },
    #[error("The kernel command line is not valid: {0}.")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("The kernel command line is not valid: {0}.")]
    CmdlineLoad(#[source] linux_loader::loader::Error),
    #[error("Cannot load the initramfs into guest memory: {0}.")]
    Initramfs(#[source] vm_memory::GuestMemoryError),
    #[error(transparent)]
    Arch(#[from] arch::ArchError),
    #[error(transparent)]
    MpTable(#[from] arch::mptable::MpTableError),
    #[error(transparent)]
    Devices(#[from] AttachError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("Cannot start a vCPU thread: {0}.")]
    Thread(#[source] std::io::Error),
    #[error("Cannot start a vCPU thread: {0}.")]
    KickHandler(#[source] vmm_sys_util::errno::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("Cannot restore the VM: {0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

/// Loads the kernel; returns the 64-bit entry, the bzImage setup header if there is one, and
/// the end of the kernel in guest memory.
fn load_kernel(vm: &Vm, path: &Path) -> Result<(GuestAddress, Option<setup_header>, u64), BootError> {
    let read_err = |source| BootError::Read { what: "the kernel", path: path.into(), source };
    let mut file = File::open(path).map_err(read_err)?;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic).map_err(read_err)?;
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let load_err = |source| BootError::Kernel { path: path.into(), source };
    if magic == *b"\x7fELF" {
        let mut file = IntoFreshMemory::new(file);
        let r = Elf::load(&vm.memory, None, &mut file, Some(GuestAddress(layout::HIMEM_START))).map_err(load_err)?;
        Ok((r.kernel_load, None, r.kernel_end))
    } else {
        let r = BzImage::load(&vm.memory, None, &mut file, Some(GuestAddress(layout::HIMEM_START))).map_err(load_err)?;
        // startup_64 sits 0x200 into the protected-mode kernel.
        Ok((GuestAddress(r.kernel_load.0 + 0x200), r.setup_header, r.kernel_end))
    }
}

/// Writes the command line (`base`, then the words that announce the virtio devices) into
/// guest memory; returns its length with the NUL.
fn load_kernel_cmdline(vm: &Vm, base: &str, announce: &[String]) -> Result<usize, BootError> {
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    cmdline.insert_str(base).map_err(BootError::Cmdline)?;
    for word in announce {
        cmdline.insert_str(word).map_err(BootError::Cmdline)?;
    }
    load_cmdline(&vm.memory, GuestAddress(layout::CMDLINE_START), &cmdline).map_err(BootError::CmdlineLoad)?;
    cmdline.as_cstring().map(|c| c.as_bytes_with_nul().len()).map_err(BootError::Cmdline)
}

/// Loads the initramfs as high in low memory as it fits; returns where and how large.
fn load_initramfs(vm: &Vm, path: &Path, kernel_end: u64) -> Result<(GuestAddress, u64), BootError> {
    let read_err = |source| BootError::Read { what: "the initramfs", path: path.into(), source };
    let file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let addr = arch::initramfs_address(&vm.memory, size, kernel_end)?;
    vm.memory.read_exact_volatile_from(addr, &mut IntoFreshMemory::new(file), size as usize).map_err(BootError::Initramfs)?;
    Ok((addr, size))
}

/// Boots the VM and runs it until the guest resets or powers off, or a vCPU fails.
pub fn run(config: VmConfig) -> Result<VmExit, BootError> {
    Ok(start(config)?.wait()?)
}

/// Builds the VM and starts its vCPUs: booted from its kernel, or restored from the snapshot
/// `config.restore` names (made from a VM of the same memory, vCPUs and devices).
pub fn start(config: VmConfig) -> Result<RunningVm, BootError> {
    let started = Instant::now();
    if config.vcpus == 0 || config.vcpus == 255 {
        return Err(BootError::Vcpus(config.vcpus));
    }
    let filters = if config.seccomp { Some(crate::seccomp::VmFilters::new(config.thread_user)?) } else { None };
    let saved = match &config.restore {
        Some(dir) => {
            let saved = MachineState::load(dir)?;
            saved.check(config.memory_mib, config.vcpus, None)?;
            Some(saved)
        }
        None => None,
    };
    // Where setup time goes, in the "VM running" line: state read, memory (a restore: the
    // snapshot read, and the new guest memory written), devices attached.
    let state_ms = started.elapsed().as_millis() as u64;
    let (memory, copied) = match &config.restore {
        Some(dir) => snapshot::restore_memory(dir, config.memory_mib)?,
        None => (crate::vstate::memory::create(config.memory_mib)?, snapshot::Copied::default()),
    };
    let memory_ms = started.elapsed().as_millis() as u64 - state_ms;
    let vm = Vm::new(memory)?;
    if let Some(saved) = &saved {
        saved.check_cpu(vm.supported_cpuid.as_slice())?;
    }
    let attaching = Instant::now();

    let mut mmio = MmioBus::default();
    let entry = match &saved {
        None => {
            let (entry, setup_header, kernel_end) = load_kernel(&vm, &config.kernel)?;
            let announce = device_manager::attach_virtio_devices(&vm, &config.devices, &mut mmio, filters.as_ref().map(|f| &f.device))?;
            let cmdline_len = load_kernel_cmdline(&vm, &config.cmdline, &announce)?;
            let initramfs = match &config.initramfs {
                Some(path) => Some(load_initramfs(&vm, path, kernel_end)?),
                None => None,
            };
            arch::configure_system(&vm.memory, setup_header, cmdline_len, initramfs)?;
            arch::mptable::setup(&vm.memory, config.vcpus)?;
            Some(entry)
        }
        Some(saved) => {
            // The guest already knows its devices: they are put where it found them.
            device_manager::attach_virtio_devices(&vm, &config.devices, &mut mmio, filters.as_ref().map(|f| &f.device))?;
            let names: Vec<String> = mmio.devices().map(|t| lock(t).name().to_string()).collect();
            saved.check(config.memory_mib, config.vcpus, Some(&names))?;
            None
        }
    };

    let devices_ms = attaching.elapsed().as_millis() as u64;
    let mut pio = PioBus::default();
    let serial = device_manager::attach_legacy_devices(&vm, &mut pio, config.console, saved.as_ref().map(|s| &s.serial))?;
    let pio = Arc::new(pio);

    let mut vcpus = Vec::new();
    for id in 0..config.vcpus {
        let vcpu = Vcpu::new(&vm, id)?;
        vcpu.configure(&vm, entry, config.vcpus)?;
        if let Some(saved) = &saved {
            vcpu.restore_state(&saved.vcpus[usize::from(id)], vm.xsave_size)?;
        }
        vcpus.push(vcpu);
    }
    if let Some(saved) = &saved {
        vm.restore_state(&saved.vm)?;
        for (transport, state) in mmio.devices().zip(&saved.devices) {
            lock(transport).restore(state).map_err(snapshot::SnapshotError::from)?;
        }
    }
    let mmio = Arc::new(mmio);
    let vm = Arc::new(vm);
    running_vm::install_kick_handler().map_err(BootError::KickHandler)?;
    let control = Arc::new(VcpuControl::default());
    let (tx, rx) = mpsc::channel();
    let mut threads = Vec::new();
    for mut vcpu in vcpus {
        let (pio, mmio, control, tx) = (pio.clone(), mmio.clone(), control.clone(), tx.clone());
        let filter = filters.as_ref().map(|f| f.vcpu.clone());
        let (msr_indices, xsave_size) = (vm.msr_indices.clone(), vm.xsave_size);
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.id))
            .spawn(move || {
                if let Some(Err(source)) = filter.map(|f| f.apply()) {
                    let _ = tx.send(Err(VcpuError::Seccomp { id: vcpu.id, source }));
                    return;
                }
                let r = vcpu.run(&pio, &mmio, &control, &msr_indices, xsave_size);
                let _ = tx.send(r);
            })
            .map_err(BootError::Thread)?;
        threads.push(thread);
    }
    let machine = Machine { vm: Arc::downgrade(&vm), mmio: mmio.clone(), serial, memory_mib: config.memory_mib, vcpus: usize::from(config.vcpus) };
    let setup_ms = started.elapsed().as_millis() as u64;
    let devices = machine.mmio.devices().count();
    tracing::info!(
        vcpus = config.vcpus,
        memory_mib = config.memory_mib,
        virtio_devices = devices,
        seccomp = config.seccomp,
        restored = saved.is_some(),
        setup_ms,
        state_ms,
        memory_ms,
        memory_read_ms = copied.read.as_millis() as u64,
        memory_write_ms = copied.write.as_millis() as u64,
        devices_ms,
        "VM running"
    );
    Ok(RunningVm::new(started, control, threads, (tx, rx), vm, machine))
}
