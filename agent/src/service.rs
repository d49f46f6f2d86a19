//! The ttrpc services: health and agent. Each handler maps the agent's errors to ttrpc status
//! codes with the error's sentence as the message.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hull_proto::agent::*;
use hull_proto::health::{check_response::ServingStatus, CheckRequest, CheckResponse, VersionRequest, VersionResponse};
use hull_proto::{agent_ttrpc, health_ttrpc};
use ttrpc::r#async::TtrpcContext;
use ttrpc::{Code, Error as TtrpcError};

use crate::agent::{Agent, AgentError};
use crate::container::ContainerError;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

fn status(e: AgentError) -> TtrpcError {
    let code = match &e {
        AgentError::InvalidId(_) | AgentError::Spec(_) | AgentError::BadResources { .. } => Code::INVALID_ARGUMENT,
        AgentError::Storage(crate::storage::StorageError::BadMountPoint(_)) => Code::INVALID_ARGUMENT,
        AgentError::Storage(_) => Code::FAILED_PRECONDITION,
        AgentError::UnknownContainer(_) => Code::NOT_FOUND,
        AgentError::DuplicateContainer(_) => Code::ALREADY_EXISTS,
        AgentError::Container(c) => match c {
            ContainerError::UnknownExec { .. } => Code::NOT_FOUND,
            ContainerError::DuplicateExec { .. } => Code::ALREADY_EXISTS,
            ContainerError::WrongState { .. } | ContainerError::AlreadyExited { .. } => Code::FAILED_PRECONDITION,
            ContainerError::BadSignal { .. } => Code::INVALID_ARGUMENT,
            _ => Code::INTERNAL,
        },
        AgentError::Sandbox(crate::sandbox::SandboxError::Exists(_)) => Code::ALREADY_EXISTS,
        AgentError::Sandbox(crate::sandbox::SandboxError::BadHostname(_)) => Code::INVALID_ARGUMENT,
        AgentError::Launch(_) => Code::FAILED_PRECONDITION,
        AgentError::Network(n) => match n {
            crate::network::NetworkError::Netlink(_)
            | crate::network::NetworkError::Apply { .. } => Code::INTERNAL,
            crate::network::NetworkError::NoNic { .. } | crate::network::NetworkError::NotInit => Code::FAILED_PRECONDITION,
            _ => Code::INVALID_ARGUMENT,
        },
        AgentError::Identity(crate::identity::IdentityError::TooMuchEntropy(_)) => Code::INVALID_ARGUMENT,
        _ => Code::INTERNAL,
    };
    TtrpcError::RpcStatus(ttrpc::get_status(code, e.to_string()))
}

type Reply<T> = ttrpc::Result<T>;

#[derive(Clone)]
pub struct Service {
    pub agent: Arc<Agent>,
}

#[async_trait]
impl health_ttrpc::Health for Service {
    async fn check(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> Reply<CheckResponse> {
        let mut r = CheckResponse::new();
        r.status = ServingStatus::SERVING.into();
        Ok(r)
    }

    async fn version(&self, _ctx: &TtrpcContext, _req: VersionRequest) -> Reply<VersionResponse> {
        let mut r = VersionResponse::new();
        r.agent_version = AGENT_VERSION.into();
        r.api_version = hull_proto::API_VERSION;
        Ok(r)
    }
}

fn stdio_of(s: &protobuf::MessageField<StdioRequest>) -> StdioRequest {
    s.as_ref().cloned().unwrap_or_default()
}

#[async_trait]
impl agent_ttrpc::Agent for Service {
    async fn create_sandbox(&self, _ctx: &TtrpcContext, req: CreateSandboxRequest) -> Reply<Empty> {
        let sysctls: Vec<(String, String)> = req.sysctls.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        self.agent.create_sandbox(&req.sandbox_id, &req.hostname, &req.dns, &req.interfaces, &req.routes, &sysctls, req.wall_clock_ns, &req.entropy).await.map_err(status)?;
        Ok(Empty::new())
    }

    async fn destroy_sandbox(&self, _ctx: &TtrpcContext, req: DestroySandboxRequest) -> Reply<Empty> {
        self.agent
            .destroy_sandbox(Duration::from_secs(req.timeout_secs.into()))
            .await
            .map_err(status)?;
        Ok(Empty::new())
    }

    async fn create_container(&self, _ctx: &TtrpcContext, req: CreateContainerRequest) -> Reply<CreateContainerResponse> {
        let pid = self
            .agent
            .create_container(&req.container_id, &req.oci_spec_json, &req.rootfs, &stdio_of(&req.stdio), &req.storages, req.sandbox_pidns)
            .await
            .map_err(status)?;
        let mut r = CreateContainerResponse::new();
        r.pid = pid;
        Ok(r)
    }

    async fn start_container(&self, _ctx: &TtrpcContext, req: StartContainerRequest) -> Reply<Empty> {
        self.agent.start_container(&req.container_id).map_err(status)?;
        Ok(Empty::new())
    }

    async fn remove_container(&self, _ctx: &TtrpcContext, req: RemoveContainerRequest) -> Reply<Empty> {
        self.agent
            .remove_container(&req.container_id, Duration::from_secs(req.timeout_secs.into()))
            .await
            .map_err(status)?;
        Ok(Empty::new())
    }

    async fn exec_process(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> Reply<ExecProcessResponse> {
        let pid = self
            .agent
            .exec_process(&req.container_id, &req.exec_id, &req.process_json, &stdio_of(&req.stdio))
            .await
            .map_err(status)?;
        let mut r = ExecProcessResponse::new();
        r.pid = pid;
        Ok(r)
    }

    async fn signal_process(&self, _ctx: &TtrpcContext, req: SignalProcessRequest) -> Reply<Empty> {
        let c = self.agent.container(&req.container_id).map_err(status)?;
        c.signal(&req.exec_id, req.signal, req.all).map_err(|e| status(e.into()))?;
        tracing::info!(container_id = %req.container_id, exec_id = %req.exec_id, signal = req.signal, all = req.all, "signal sent");
        Ok(Empty::new())
    }

    async fn wait_process(&self, _ctx: &TtrpcContext, req: WaitProcessRequest) -> Reply<WaitProcessResponse> {
        let p = self.agent.process(&req.container_id, &req.exec_id).map_err(status)?;
        let exit = p.wait().await;
        let mut r = WaitProcessResponse::new();
        r.exit_status = exit.status;
        r.oom_killed = exit.oom_killed;
        Ok(r)
    }

    async fn list_processes(&self, _ctx: &TtrpcContext, req: ListProcessesRequest) -> Reply<ListProcessesResponse> {
        let c = self.agent.container(&req.container_id).map_err(status)?;
        let list = c.process_list().map_err(|e| status(e.into()))?;
        let mut r = ListProcessesResponse::new();
        r.processes = list
            .into_iter()
            .map(|(pid, command)| {
                let mut p = ProcessInfo::new();
                p.pid = pid;
                p.command = command;
                p
            })
            .collect();
        Ok(r)
    }

    async fn tty_win_resize(&self, _ctx: &TtrpcContext, req: TtyWinResizeRequest) -> Reply<Empty> {
        let p = self.agent.process(&req.container_id, &req.exec_id).map_err(status)?;
        let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        p.resize(clamp(req.rows), clamp(req.cols))
            .map_err(|e| status(AgentError::Container(e.into())))?;
        Ok(Empty::new())
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, req: CloseStdinRequest) -> Reply<Empty> {
        let p = self.agent.process(&req.container_id, &req.exec_id).map_err(status)?;
        p.close_stdin();
        Ok(Empty::new())
    }

    async fn stats_container(&self, _ctx: &TtrpcContext, req: StatsContainerRequest) -> Reply<StatsContainerResponse> {
        let c = self.agent.container(&req.container_id).map_err(status)?;
        crate::cgroups::stats(&c.cgroup_path, &c.id).map_err(|e| status(e.into()))
    }

    async fn update_container(&self, _ctx: &TtrpcContext, req: UpdateContainerRequest) -> Reply<Empty> {
        self.agent.update_container(&req.container_id, &req.resources_json).map_err(status)?;
        Ok(Empty::new())
    }

    async fn pause_container(&self, _ctx: &TtrpcContext, req: PauseContainerRequest) -> Reply<Empty> {
        let c = self.agent.container(&req.container_id).map_err(status)?;
        c.pause().map_err(|e| status(e.into()))?;
        tracing::info!(container_id = %req.container_id, "container paused");
        Ok(Empty::new())
    }

    async fn resume_container(&self, _ctx: &TtrpcContext, req: ResumeContainerRequest) -> Reply<Empty> {
        let c = self.agent.container(&req.container_id).map_err(status)?;
        c.resume().map_err(|e| status(e.into()))?;
        tracing::info!(container_id = %req.container_id, "container resumed");
        Ok(Empty::new())
    }

    async fn get_oom_event(&self, _ctx: &TtrpcContext, _req: GetOOMEventRequest) -> Reply<OOMEvent> {
        let id = self.agent.next_oom_event().await.ok_or_else(|| {
            TtrpcError::RpcStatus(ttrpc::get_status(Code::UNAVAILABLE, "The agent is shutting down."))
        })?;
        let mut r = OOMEvent::new();
        r.container_id = id;
        Ok(r)
    }

    async fn get_guest_details(&self, _ctx: &TtrpcContext, _req: GetGuestDetailsRequest) -> Reply<GuestDetailsResponse> {
        let mut r = GuestDetailsResponse::new();
        r.agent_version = AGENT_VERSION.into();
        r.kernel_release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        r.mem_total_bytes = nix::sys::sysinfo::sysinfo().map(|s| s.ram_total()).unwrap_or(0);
        r.online_cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
        r.cgroup_version = crate::cgroups::version();
        r.init_mode = self.agent.cfg.init_mode;
        Ok(r)
    }
}
