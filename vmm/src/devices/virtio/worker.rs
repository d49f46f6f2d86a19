//! The thread that serves a virtio device in process (the transport's event handler). It is
//! started with the device, before the VMM locks itself down with seccomp, and lives as long
//! as the device: activation hands it the queues, a reset takes them back. It waits on the
//! queues' notification eventfds and the device's host fds, calls the device, and raises the
//! interrupt when buffers were used.

use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::device::{DeviceEvent, InterruptLine, VirtioDevice};
use super::mmio::lock;

const WAKE: u64 = 0;
const QUEUE_BASE: u64 = 1;
const HOST_BASE: u64 = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("cannot set up the worker's epoll: {0}")]
    Epoll(#[source] std::io::Error),
    #[error("cannot start the worker thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("the device's worker thread is gone")]
    Gone,
    #[error("the device cannot start: {0}")]
    Activate(#[source] std::io::Error),
    #[error("the device cannot reset: {0}")]
    Reset(#[source] std::io::Error),
    #[error("the device cannot stop for a snapshot: {0}")]
    Freeze(#[source] std::io::Error),
}

enum Command {
    /// `restored`: the queues are a snapshot's, in use by a driver that never saw this device.
    Activate { queues: Vec<Queue>, features: u64, restored: bool },
    Reset,
    /// Stop serving and answer with the queues' state, until `Thaw` (a snapshot is taken).
    Freeze,
    Thaw,
    Stop,
}

/// The transport's end of a worker.
pub struct Worker {
    commands: mpsc::Sender<Command>,
    acks: mpsc::Receiver<std::io::Result<()>>,
    frozen: mpsc::Receiver<std::io::Result<Vec<QueueState>>>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// What a worker thread runs with; `seccomp` is installed first thing on the thread.
pub struct WorkerSetup {
    pub name: String,
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    pub queue_evts: Vec<EventFd>,
    pub mem: GuestMemoryMmap,
    pub interrupt: InterruptLine,
    pub seccomp: Option<crate::seccomp::Filter>,
}

impl Worker {
    pub fn spawn(setup: WorkerSetup) -> Result<Worker, WorkerError> {
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(WorkerError::EventFd)?;
        let epoll = Epoll::new().map_err(WorkerError::Epoll)?;
        let add = |fd: i32, data: u64| epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, data)).map_err(WorkerError::Epoll);
        add(wake.as_raw_fd(), WAKE)?;
        let (host_fds, edge, elsewhere) = {
            let d = lock(&setup.device);
            (d.host_fds(), d.host_fds_edge_triggered(), d.queues_served_elsewhere())
        };
        // A backend that serves the queues reads their notifications; a read here would take
        // them from it.
        if !elsewhere {
            for (i, evt) in setup.queue_evts.iter().enumerate() {
                add(evt.as_raw_fd(), QUEUE_BASE + i as u64)?;
            }
        }
        let host_set = if edge { EventSet::IN | EventSet::EDGE_TRIGGERED } else { EventSet::IN };
        let host_count = host_fds.len();
        for (i, fd) in host_fds.into_iter().enumerate() {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(host_set, HOST_BASE + i as u64)).map_err(WorkerError::Epoll)?;
        }
        let (commands, command_rx) = mpsc::channel();
        let (ack_tx, acks) = mpsc::channel();
        let (frozen_tx, frozen) = mpsc::channel();
        let wake_fd = wake.try_clone().map_err(WorkerError::EventFd)?;
        let thread = std::thread::Builder::new()
            .name(format!("virtio-{}", setup.name))
            .spawn(move || run(setup, epoll, wake_fd, command_rx, (ack_tx, frozen_tx), host_count))
            .map_err(WorkerError::Thread)?;
        Ok(Worker { commands, acks, frozen, wake, thread: Some(thread) })
    }

    fn send(&self, c: Command) -> Result<(), WorkerError> {
        self.commands.send(c).map_err(|_| WorkerError::Gone)?;
        self.wake.write(1).map_err(|_| WorkerError::Gone)
    }

    /// Hands the worker the queues and the features the driver accepted; it serves them (or
    /// the device hands them to its backend) from now on.
    pub fn activate(&self, queues: Vec<Queue>, features: u64, restored: bool) -> Result<(), WorkerError> {
        self.send(Command::Activate { queues, features, restored })?;
        self.acks.recv().map_err(|_| WorkerError::Gone)?.map_err(WorkerError::Activate)
    }

    /// Stops serving the device (between two requests) and returns its queues' state as the
    /// worker has them; nothing touches guest memory or the device until `thaw`.
    pub fn freeze(&self) -> Result<Vec<QueueState>, WorkerError> {
        self.send(Command::Freeze)?;
        self.frozen.recv().map_err(|_| WorkerError::Gone)?.map_err(WorkerError::Freeze)
    }

    pub fn thaw(&self) -> Result<(), WorkerError> {
        self.send(Command::Thaw)
    }

    /// Takes the queues back and resets the device; when this returns the worker no longer
    /// touches guest memory.
    pub fn reset(&self) -> Result<(), WorkerError> {
        self.send(Command::Reset)?;
        self.acks.recv().map_err(|_| WorkerError::Gone)?.map_err(WorkerError::Reset)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Replies = (mpsc::Sender<std::io::Result<()>>, mpsc::Sender<std::io::Result<Vec<QueueState>>>);

fn run(setup: WorkerSetup, epoll: Epoll, wake: EventFd, commands: mpsc::Receiver<Command>, (acks, frozen): Replies, host_count: usize) {
    let WorkerSetup { name, device, queue_evts, mem, interrupt, seccomp } = setup;
    if let Some(filter) = seccomp {
        if let Err(e) = filter.apply() {
            tracing::error!(device = %name, error = %e, "virtio worker: cannot install its seccomp filter; the device stops");
            return;
        }
    }
    let mut queues: Vec<Queue> = Vec::new();
    let mut events = vec![EpollEvent::default(); 16];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(device = %name, error = %e, "virtio worker: epoll_wait failed; the device stops");
                return;
            }
        };
        for ev in &events[..n] {
            let event = match ev.data() {
                WAKE => {
                    let _ = wake.read();
                    let mut next = commands.try_recv().ok();
                    while let Some(c) = next.take() {
                        match c {
                            Command::Activate { queues: q, features, restored } => {
                                let started = lock(&device).activate(features, &q, &queue_evts, &mem);
                                if started.is_ok() {
                                    queues = q;
                                    if restored && lock(&device).restored(&mut queues, &mem) {
                                        interrupt.signal(VIRTIO_MMIO_INT_VRING);
                                    }
                                    // Buffers queued before DRIVER_OK (vsock RX, say) are served now.
                                    for i in 0..queues.len() {
                                        serve(&name, &device, DeviceEvent::Queue(i), &mut queues, &mem, &interrupt);
                                    }
                                }
                                let _ = acks.send(started);
                            }
                            Command::Reset => {
                                queues.clear();
                                lock(&device).reset();
                                let _ = acks.send(Ok(()));
                            }
                            Command::Freeze => {
                                let stopped = lock(&device).freeze(&mut queues, &mem);
                                let _ = frozen.send(stopped.map(|()| queues.iter().map(|q| q.state()).collect()));
                                // Nothing is served until the snapshot is taken: the next
                                // command is waited for here, not in epoll.
                                match commands.recv() {
                                    Ok(Command::Thaw) => {
                                        if let Err(e) = lock(&device).thaw(&queues, &queue_evts, &mem) {
                                            tracing::error!(device = %name, error = %e, "virtio worker: the device cannot go on after a snapshot");
                                        }
                                        // Host fds watched edge-triggered may have become
                                        // readable meanwhile without another edge to come.
                                        for i in 0..host_count {
                                            serve(&name, &device, DeviceEvent::Host(i), &mut queues, &mem, &interrupt);
                                        }
                                    }
                                    Ok(other) => next = Some(other),
                                    Err(_) => return,
                                }
                            }
                            Command::Thaw => {}
                            Command::Stop => return,
                        }
                        if next.is_none() {
                            next = commands.try_recv().ok();
                        }
                    }
                    continue;
                }
                d if d >= HOST_BASE => DeviceEvent::Host((d - HOST_BASE) as usize),
                d => {
                    let i = (d - QUEUE_BASE) as usize;
                    if let Some(evt) = queue_evts.get(i) {
                        let _ = evt.read();
                    }
                    DeviceEvent::Queue(i)
                }
            };
            serve(&name, &device, event, &mut queues, &mem, &interrupt);
        }
    }
}

/// Whether `event` is the device's to serve. Queues the driver did not enable (or not yet) are
/// not the device's to touch; host events are served even then (the device buffers them until
/// the guest is ready). The vhost-user backend applies the same rule.
pub(crate) fn should_serve(event: DeviceEvent, queues: &[Queue]) -> bool {
    match event {
        DeviceEvent::Queue(i) => queues.get(i).is_some_and(|q| q.ready()),
        DeviceEvent::Host(_) => true,
    }
}

fn serve(name: &str, device: &Mutex<dyn VirtioDevice>, event: DeviceEvent, queues: &mut [Queue], mem: &GuestMemoryMmap, interrupt: &InterruptLine) {
    if !should_serve(event, queues) {
        if let DeviceEvent::Queue(i) = event {
            tracing::trace!(device = %name, queue = i, "virtio worker: notify for a queue that is not ready");
        }
        return;
    }
    if lock(device).process(event, queues, mem) {
        interrupt.signal(VIRTIO_MMIO_INT_VRING);
    }
}
