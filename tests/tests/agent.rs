//! hull-agent on the host, driven through its ttrpc API and stdio streams, running real
//! containers (namespaces, cgroups, pivot_root) from a busybox rootfs.

use hull_tests::*;

#[tokio::test(flavor = "multi_thread")]
async fn stdout_stderr_and_exit_codes() {
    require_prerequisites!();
    let agent = TestAgent::start().await.expect("agent starts");
    let id = unique_id("exit3");
    let out = agent
        .run(&id, &agent.spec(&["sh", "-c", "echo out; echo err >&2; exit 3"]))
        .await
        .expect("container runs");
    assert_eq!((out.status, out.stdout.as_str(), out.stderr.as_str()), (3, "out\n", "err\n"));
    agent.remove(&id).await.expect("remove");

    let id = unique_id("exit0");
    let out = agent.run(&id, &agent.spec(&["true"])).await.expect("container runs");
    assert_eq!(out.status, 0);
    agent.remove(&id).await.expect("remove");
}
