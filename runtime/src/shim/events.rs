//! Events to containerd (task created, started, exited, OOM, ...), published in order by one
//! task through containerd's ttrpc publisher; and the watchers that turn what happens in the
//! pod (a process exits, the VM dies, the guest OOM-kills) into them.

use std::sync::Arc;
use std::time::Duration;

use containerd_shim_protos::events::task as ev;
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};
use containerd_shim_protos::topics;
use tokio::sync::mpsc;

use super::container::{Containers, Exit};
use super::io::ProcessIo;
use crate::pod::Pod;

/// Events to containerd, sent in order by one task.
#[derive(Clone)]
pub struct Events {
    tx: Option<mpsc::Sender<(&'static str, Box<dyn MessageDyn>)>>,
}

impl Events {
    pub async fn start(ttrpc_address: &str, namespace: &str) -> Events {
        if ttrpc_address.is_empty() {
            tracing::warn!("TTRPC_ADDRESS is not set: events are not published");
            return Events { tx: None };
        }
        let publisher = match containerd_shim::publisher::RemotePublisher::new(ttrpc_address).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, address = ttrpc_address, "cannot connect the event publisher");
                return Events { tx: None };
            }
        };
        let (tx, mut rx) = mpsc::channel::<(&'static str, Box<dyn MessageDyn>)>(256);
        let ns = namespace.to_string();
        tokio::spawn(async move {
            while let Some((topic, event)) = rx.recv().await {
                if let Err(e) = publisher.publish(containerd_shim::Context::default(), topic, &ns, event).await {
                    tracing::warn!(topic, error = %e, "cannot publish an event");
                }
            }
        });
        Events { tx: Some(tx) }
    }

    pub async fn send(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send((topic, event)).await;
        }
    }
}

pub async fn publish_exit(events: &Events, id: &str, exec_id: &str, pid: u32, exit: Exit) {
    let e = ev::TaskExit {
        container_id: id.into(),
        // containerd's CRI finds the container by `id`: the container id for the init process.
        id: if exec_id.is_empty() { id.into() } else { exec_id.into() },
        pid,
        exit_status: exit.code,
        exited_at: MessageField::some(exit.timestamp()),
        ..Default::default()
    };
    events.send(topics::TASK_EXIT_EVENT_TOPIC, Box::new(e)).await;
}

/// The least time between two OOM events the shim takes from the guest.
const OOM_EVENT_GAP: Duration = Duration::from_millis(100);

/// Once per VM: when it dies every process still running exits with 255, and the guest's OOM
/// kills are relayed, both to containerd.
pub fn watch_pod(pod: Arc<Pod>, containers: Containers, events: Events) {
    let oom_pod = pod.clone();
    let oom_events = events.clone();
    let oom_containers = containers.clone();
    tokio::spawn(async move {
        let Some(why) = pod.ended().await else {
            tracing::error!(sandbox_id = %pod.id, "cannot wait for the pod VM's exit; its processes are no longer watched");
            return;
        };
        let exits = containers.exit_all(255);
        tracing::error!(sandbox_id = %pod.id, status = %why, processes = exits.len(), "the pod VM exited");
        // Why a pod's VM died is the first question about it; the counter goes with the cgroup.
        if let Some(kills) = pod.oom_kills().filter(|&n| n > 0) {
            tracing::error!(sandbox_id = %pod.id, oom_kills = kills, "the pod's cgroup hit its memory limit and the host's OOM killer killed pod VM processes");
        }
        for (id, exec_id, exit) in exits {
            publish_exit(&events, &id, &exec_id, pod.vmm_pid, exit).await;
        }
    });
    tokio::spawn(async move {
        let pod = oom_pod;
        // The guest names the container: only this pod's containers are believed, and a guest
        // answering at once, forever, gets at most ten events a second through.
        let mut foreign = 0u64;
        loop {
            match pod.conn.next_oom_event().await {
                Ok(container_id) => {
                    if oom_containers.contains(&container_id) {
                        tracing::info!(sandbox_id = %pod.id, container_id = %container_id, "OOM kill");
                        oom_events.send(topics::TASK_OOM_EVENT_TOPIC, Box::new(ev::TaskOOM { container_id, ..Default::default() })).await;
                    } else {
                        foreign += 1;
                        if foreign.is_power_of_two() {
                            let named: String = container_id.chars().take(80).collect();
                            tracing::warn!(sandbox_id = %pod.id, container_id = %named, dropped = foreign, "OOM event for a container not in this pod dropped");
                        }
                    }
                    tokio::time::sleep(OOM_EVENT_GAP).await;
                }
                Err(_) => {
                    if pod.exited().is_some() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
}

/// Waits for a started process in the guest; records and publishes its exit once its output
/// is delivered.
pub fn watch_process(pod: Arc<Pod>, containers: Containers, events: Events, id: String, exec_id: String, io: Option<Arc<ProcessIo>>) {
    tokio::spawn(async move {
        let code = match pod.conn.wait(&id, &exec_id).await {
            Ok(r) => r.exit_status as u32,
            Err(e) => {
                tracing::warn!(sandbox_id = %pod.id, container_id = %id, exec_id = %exec_id, error = %e, "wait failed");
                255
            }
        };
        if let Some(io) = io {
            io.drain(Duration::from_secs(5)).await;
        }
        let exit = Exit::now(code);
        if containers.record_exit(&id, &exec_id, exit) {
            tracing::info!(sandbox_id = %pod.id, container_id = %id, exec_id = %exec_id, exit_status = code, "process exited");
            publish_exit(&events, &id, &exec_id, pod.vmm_pid, exit).await;
        }
    });
}
