//! Events to containerd (task created, started, exited, OOM, ...), published in order by one
//! task through containerd's ttrpc event service; and the watchers that turn what happens in
//! the pod (a process exits, the VM dies, the guest OOM-kills) into them.
//!
//! Why not containerd-shim's `RemotePublisher`: it names each event's type through protobuf
//! reflection, which parses the descriptors of the event's .proto file and of everything it
//! imports (descriptor.proto with its comments) on the first event: half a MiB of heap kept by
//! every shim for as long as its pod runs. An event's type is its package and message name,
//! known when the shim is compiled (`to_any`).

use std::sync::Arc;
use std::time::Duration;

use containerd_shim_protos::events::task as ev;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::{Client, EventsClient};
use containerd_shim_protos::topics;
use tokio::sync::mpsc;

use super::container::{Containers, Exit};
use super::io::ProcessIo;
use crate::pod::Pod;

/// The protobuf package of containerd's task events (`events/task.proto`).
pub const EVENTS_PACKAGE: &str = "containerd.events";

/// `message` as an `Any` of type `<package>.<message name>`, the name containerd's typeurl
/// registry knows it by.
pub fn to_any<M: Message>(package: &str, message: &M) -> Result<Any, containerd_shim_protos::protobuf::Error> {
    Ok(Any { type_url: format!("{package}.{}", M::NAME), value: message.write_to_bytes()?, ..Default::default() })
}

/// How often an event is tried before it is dropped (and logged), a second more between each:
/// about 15 s in all, as containerd-shim's publisher gives a containerd that restarts.
const ATTEMPTS: u64 = 6;
/// How long containerd gets to take one event.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Events to containerd, sent in order by one task.
#[derive(Clone)]
pub struct Events {
    tx: Option<mpsc::Sender<Queued>>,
}

/// An event with the time it happened.
struct Queued {
    topic: &'static str,
    at: Timestamp,
    event: Any,
}

/// A ttrpc client of containerd's event service, connected (again) when needed.
struct Publisher {
    address: String,
    namespace: String,
    client: Option<EventsClient>,
}

impl Publisher {
    async fn connect(&mut self) -> std::io::Result<&EventsClient> {
        if self.client.is_none() {
            let path = self.address.strip_prefix("unix://").unwrap_or(&self.address).to_string();
            let stream = tokio::net::UnixStream::connect(&path).await?;
            let client = Client::new(containerd_shim_protos::ttrpc::r#async::transport::Socket::from(stream));
            self.client = Some(EventsClient::new(client));
        }
        Ok(self.client.as_ref().expect("connected above"))
    }

    /// Forwards one event. What containerd refuses is dropped at once; a connection that fails
    /// or a containerd that does not answer is tried again, on a new connection.
    async fn forward(&mut self, queued: Queued) {
        let Queued { topic, at, event } = queued;
        let envelope = Envelope { timestamp: MessageField::some(at), namespace: self.namespace.clone(), topic: topic.into(), event: MessageField::some(event), ..Default::default() };
        let req = ForwardRequest { envelope: MessageField::some(envelope), ..Default::default() };
        for attempt in 1..=ATTEMPTS {
            let error = match self.connect().await {
                Ok(client) => match tokio::time::timeout(FORWARD_TIMEOUT, client.forward(containerd_shim_protos::ttrpc::context::Context::default(), &req)).await {
                    Ok(Ok(_)) => return,
                    Ok(Err(containerd_shim_protos::ttrpc::error::Error::RpcStatus(status))) => {
                        tracing::error!(topic, code = ?status.code(), message = status.message(), "containerd refused an event: dropped");
                        return;
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {} s", FORWARD_TIMEOUT.as_secs()),
                },
                Err(e) => e.to_string(),
            };
            self.client = None;
            tracing::warn!(topic, attempt, error, "cannot publish an event");
            if attempt < ATTEMPTS {
                tokio::time::sleep(Duration::from_secs(attempt)).await;
            }
        }
        tracing::error!(topic, attempts = ATTEMPTS, "event dropped: containerd's event service did not take it");
    }
}

impl Events {
    pub async fn start(ttrpc_address: &str, namespace: &str) -> Events {
        if ttrpc_address.is_empty() {
            tracing::warn!("TTRPC_ADDRESS is not set: events are not published");
            return Events { tx: None };
        }
        let mut publisher = Publisher { address: ttrpc_address.into(), namespace: namespace.into(), client: None };
        if let Err(e) = publisher.connect().await {
            // Connected again for the first event.
            tracing::warn!(error = %e, address = ttrpc_address, "cannot connect the event publisher yet");
        }
        let (tx, mut rx) = mpsc::channel::<Queued>(256);
        tokio::spawn(async move {
            while let Some(queued) = rx.recv().await {
                publisher.forward(queued).await;
            }
        });
        Events { tx: Some(tx) }
    }

    /// Queues a task event (a message of `events/task.proto`) for containerd, stamped now.
    pub async fn send<M: Message>(&self, topic: &'static str, event: M) {
        let Some(tx) = &self.tx else { return };
        match to_any(EVENTS_PACKAGE, &event) {
            Ok(event) => {
                let _ = tx.send(Queued { topic, at: Timestamp::now(), event }).await;
            }
            Err(e) => tracing::error!(topic, error = %e, "cannot encode an event"),
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
    events.send(topics::TASK_EXIT_EVENT_TOPIC, e).await;
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
        if pod.ending() {
            tracing::info!(sandbox_id = %pod.id, status = %why, processes = exits.len(), "the pod VM exited, as asked");
        } else {
            tracing::error!(sandbox_id = %pod.id, status = %why, processes = exits.len(), "the pod VM exited");
        }
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
                        oom_events.send(topics::TASK_OOM_EVENT_TOPIC, ev::TaskOOM { container_id, ..Default::default() }).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::cgroups_v2::metrics::Metrics;
    use containerd_shim_protos::protobuf::MessageFull;

    fn named_as_reflection_names<M: MessageFull + Default>(package: &str) {
        let any = to_any(package, &M::default()).unwrap();
        assert_eq!(any.type_url, M::descriptor().full_name(), "the type containerd decodes the Any as");
    }

    /// Every message the shim sends in an Any carries the type name protobuf's reflection
    /// gives it, which containerd's typeurl registry maps back to the type.
    #[test]
    fn events_and_metrics_are_named_by_their_full_protobuf_names() {
        named_as_reflection_names::<ev::TaskCreate>(EVENTS_PACKAGE);
        named_as_reflection_names::<ev::TaskStart>(EVENTS_PACKAGE);
        named_as_reflection_names::<ev::TaskExit>(EVENTS_PACKAGE);
        named_as_reflection_names::<ev::TaskOOM>(EVENTS_PACKAGE);
        named_as_reflection_names::<ev::TaskDelete>(EVENTS_PACKAGE);
        named_as_reflection_names::<ev::TaskExecAdded>(EVENTS_PACKAGE);
        named_as_reflection_names::<ev::TaskExecStarted>(EVENTS_PACKAGE);
        named_as_reflection_names::<ev::TaskPaused>(EVENTS_PACKAGE);
        named_as_reflection_names::<ev::TaskResumed>(EVENTS_PACKAGE);
        named_as_reflection_names::<Metrics>(crate::shim::container::METRICS_PACKAGE);
        let exit = ev::TaskExit { container_id: "c".into(), exit_status: 3, ..Default::default() };
        let any = to_any(EVENTS_PACKAGE, &exit).unwrap();
        assert_eq!(ev::TaskExit::parse_from_bytes(&any.value).unwrap(), exit);
    }
}
