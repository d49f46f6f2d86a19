//! `hull exec POD -- CMD`: a command in one of a running pod's containers, through its agent.

use hull_proto::stdio::StreamKind;
use hull_runtime::agent::{stdio, AgentConn};

use crate::ps::{pods, short, PodState};
use crate::run::copy_to;
use crate::CliError;

pub async fn exec_in_pod(prefix: &str, container: Option<&str>, command: &[String]) -> Result<i32, CliError> {
    let matching: Vec<PodState> = pods().into_iter().filter(|p| p.id.starts_with(prefix) && p.vmm_pid.is_some()).collect();
    let pod = match matching.len() {
        0 => return Err(CliError::NoPod(prefix.into())),
        1 => &matching[0],
        _ => {
            let pods = matching.iter().map(|p| format!("{}/{}", p.namespace, short(&p.id))).collect::<Vec<_>>().join(", ");
            return Err(CliError::AmbiguousPod { prefix: prefix.into(), pods });
        }
    };
    let conn = AgentConn::connect_hybrid_vsock(&pod.dir.vm().vsock()).await?;
    let process = serde_json::json!({
        "args": command, "cwd": "/", "terminal": false, "user": {"uid": 0, "gid": 0},
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=dumb"],
    });
    let exec_id = format!("hull-exec-{}", std::process::id());
    let candidates: Vec<String> = match container {
        Some(c) => vec![c.to_string()],
        None => pod.containers.clone(),
    };
    let mut target = None;
    for id in &candidates {
        match conn.exec(id, &exec_id, &process, stdio(true, true, true)).await {
            Ok(_) => {
                target = Some(id.clone());
                break;
            }
            // CRI's pause container runs nothing in the guest: the agent does not know it.
            Err(e) if container.is_none() && e.code() == Some(ttrpc::Code::NOT_FOUND) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let id = target.ok_or_else(|| CliError::NoContainer(short(&pod.id).into()))?;
    let mut stdin = conn.attach(&id, &exec_id, StreamKind::Stdin).await?;
    let out = conn.attach(&id, &exec_id, StreamKind::Stdout).await?;
    let err = conn.attach(&id, &exec_id, StreamKind::Stderr).await?;
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut stdin).await;
        // Our stdin's end is the process's stdin EOF.
        let _ = stdin.shutdown().await;
    });
    let (o, e) = tokio::join!(copy_to(out, std::io::stdout()), copy_to(err, std::io::stderr()));
    o.and(e).map_err(CliError::Output)?;
    Ok(conn.wait(&id, &exec_id).await?.exit_status)
}
