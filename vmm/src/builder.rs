//! Builds a microVM from a kernel, an initramfs and a command line, and runs it to its end:
//! guest memory, KVM VM, kernel (ELF vmlinux through its 64-bit entry, or bzImage), zero page,
//! the legacy devices on the port bus, one thread per vCPU.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::{self as arch, layout};
use crate::devices::legacy::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::legacy::serial::{SerialConsole, COM1_BASE, COM1_IRQ};
use crate::devices::legacy::PioBus;
use crate::vstate::vcpu::{Vcpu, VcpuError, VmExit};
use crate::vstate::vm::{Vm, VmError};

/// What the guest kernel needs on a machine with only these devices: the console on COM1, no
/// PCI probing, the i8042 without its keyboard and mouse probes.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd";

pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// Where COM1's output goes.
    pub console: Box<dyn Write + Send>,
}

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
    #[error("Cannot load the kernel {path:?}: {reason}.")]
    Kernel { path: PathBuf, reason: String },
    #[error("The kernel command line is not valid: {0}.")]
    Cmdline(String),
    #[error("Cannot load the initramfs into guest memory: {0}.")]
    Initramfs(String),
    #[error(transparent)]
    Arch(#[from] arch::ArchError),
    #[error("Cannot set up the {what}: {reason}.")]
    Device { what: &'static str, reason: String },
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("Cannot start a vCPU thread: {0}.")]
    Thread(std::io::Error),
}

/// The signal that kicks a vCPU thread out of KVM_RUN so that it sees the stop flag.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Loads the kernel; returns the 64-bit entry and the bzImage setup header if there is one.
fn load_kernel(vm: &Vm, path: &PathBuf) -> Result<(GuestAddress, Option<linux_loader::loader::bootparam::setup_header>, u64), BootError> {
    let mut file = File::open(path).map_err(|source| BootError::Read { what: "the kernel", path: path.clone(), source })?;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic).map_err(|source| BootError::Read { what: "the kernel", path: path.clone(), source })?;
    file.seek(SeekFrom::Start(0)).map_err(|source| BootError::Read { what: "the kernel", path: path.clone(), source })?;
    let err = |e: linux_loader::loader::Error| BootError::Kernel { path: path.clone(), reason: e.to_string() };
    if magic == *b"\x7fELF" {
        let r = Elf::load(&vm.memory, None, &mut file, Some(GuestAddress(layout::HIMEM_START))).map_err(err)?;
        Ok((r.kernel_load, None, r.kernel_end))
    } else {
        let r = BzImage::load(&vm.memory, None, &mut file, Some(GuestAddress(layout::HIMEM_START))).map_err(err)?;
        // startup_64 sits 0x200 into the protected-mode kernel.
        Ok((GuestAddress(r.kernel_load.0 + 0x200), r.setup_header, r.kernel_end))
    }
}

/// Boots the VM and runs it until the guest resets or powers off, or a vCPU fails.
pub fn run(config: VmConfig) -> Result<VmExit, BootError> {
    let started = Instant::now();
    if config.vcpus == 0 || config.vcpus == 255 {
        return Err(BootError::Vcpus(config.vcpus));
    }
    let memory = crate::vstate::memory::create(config.memory_mib)?;
    let vm = Vm::new(memory)?;

    let (entry, setup_header, kernel_end) = load_kernel(&vm, &config.kernel)?;
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline.insert_str(&config.cmdline).map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(&vm.memory, GuestAddress(layout::CMDLINE_START), &cmdline).map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline.as_cstring().map(|c| c.as_bytes_with_nul().len()).map_err(|e| BootError::Cmdline(e.to_string()))?;
    let initramfs = match &config.initramfs {
        Some(path) => {
            let read_err = |source| BootError::Read { what: "the initramfs", path: path.clone(), source };
            let mut file = File::open(path).map_err(read_err)?;
            let size = file.metadata().map_err(read_err)?.len();
            let addr = arch::initramfs_address(&vm.memory, size, kernel_end)?;
            vm.memory.read_exact_volatile_from(addr, &mut file, size as usize).map_err(|e| BootError::Initramfs(e.to_string()))?;
            Some((addr, size))
        }
        None => None,
    };
    arch::configure_system(&vm.memory, setup_header, cmdline_len, initramfs)?;

    let mut bus = PioBus::default();
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BootError::Device { what: "serial interrupt", reason: e.to_string() })?;
    vm.fd.register_irqfd(&irq, COM1_IRQ).map_err(|e| BootError::Device { what: "serial interrupt", reason: e.to_string() })?;
    let device = |what| move |e: crate::devices::legacy::bus::BusError| BootError::Device { what, reason: e.to_string() };
    bus.insert(COM1_BASE, 8, Arc::new(Mutex::new(SerialConsole::new(irq, config.console))))
        .map_err(device("serial console"))?;
    bus.insert(I8042_BASE, I8042_LEN, Arc::new(Mutex::new(I8042::default()))).map_err(device("i8042"))?;
    let bus = Arc::new(bus);

    let mut vcpus = Vec::new();
    for id in 0..config.vcpus {
        let vcpu = Vcpu::new(&vm, id)?;
        vcpu.configure(&vm, entry, config.vcpus)?;
        vcpus.push(vcpu);
    }
    register_signal_handler(kick_signal(), on_kick).map_err(|e| BootError::Thread(std::io::Error::from_raw_os_error(e.errno())))?;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let mut threads = Vec::new();
    for mut vcpu in vcpus {
        let (bus, stop, tx) = (bus.clone(), stop.clone(), tx.clone());
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.id))
            .spawn(move || {
                let r = vcpu.run(&bus, &stop);
                let _ = tx.send(r);
            })
            .map_err(BootError::Thread)?;
        threads.push(thread);
    }
    drop(tx);
    tracing::info!(vcpus = config.vcpus, memory_mib = config.memory_mib, setup_ms = started.elapsed().as_millis() as u64, "VM running");
    // The first vCPU to end the VM decides how it ended; the others are stopped.
    let result = rx.recv().unwrap_or(Ok(VmExit::Stopped));
    stop.store(true, Ordering::SeqCst);
    for t in &threads {
        while !t.is_finished() {
            let _ = t.kill(kick_signal());
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    for t in threads {
        let _ = t.join();
    }
    // Keep the VM (and its memory) until every vCPU thread is gone.
    drop(vm);
    match &result {
        Ok(exit) => tracing::info!(?exit, ran_ms = started.elapsed().as_millis() as u64, "VM ended"),
        Err(e) => tracing::error!(error = %e, ran_ms = started.elapsed().as_millis() as u64, "VM failed"),
    }
    Ok(result?)
}
