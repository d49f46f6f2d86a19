//! The host side of pod networking against the real kernel: a network namespace set up the way
//! CNI's bridge plugin leaves it (a veth with an address, a default route, an extra route),
//! then hull's setup reads it, creates the tap and the tc redirects, and teardown removes them.

use std::process::Command;

use hull_runtime::pod::network::{self, TAP_NAME};
use hull_tests::require_prerequisites;

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-ec", cmd]).output().expect("sh");
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace (`ip netns`) with a veth whose peer stays on the host side of a
/// second namespace, so the test never touches the host's own network.
struct CniLikeNetns {
    name: String,
    peer: String,
}

impl CniLikeNetns {
    fn new(tag: &str) -> CniLikeNetns {
        let name = format!("hullnet-{}-{tag}", std::process::id());
        let peer = format!("{name}-br");
        sh(&format!(
            "ip netns add {name}; ip netns add {peer}
             ip -n {peer} link add veth-br type veth peer name eth0 netns {name}
             ip -n {peer} addr add 198.18.7.1/24 dev veth-br; ip -n {peer} link set veth-br up
             ip -n {name} link set eth0 mtu 1400
             ip -n {name} addr add 198.18.7.5/24 dev eth0; ip -n {name} link set eth0 up; ip -n {name} link set lo up
             ip -n {name} route add default via 198.18.7.1
             ip -n {name} route add 198.19.0.0/16 via 198.18.7.1 dev eth0"
        ));
        CniLikeNetns { name, peer }
    }

    fn path(&self) -> std::path::PathBuf {
        format!("/run/netns/{}", self.name).into()
    }

    fn ip(&self, args: &str) -> String {
        sh(&format!("ip -n {} {args}", self.name))
    }

    fn tc(&self, args: &str) -> String {
        sh(&format!("ip netns exec {} tc {args}", self.name))
    }
}

impl Drop for CniLikeNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.peer]).status();
    }
}

#[test]
fn setup_reads_cni_config_joins_tap_and_teardown_removes_it() {
    require_prerequisites!();
    let ns = CniLikeNetns::new("a");
    let mac = ns.ip("-br link show eth0").split_whitespace().nth(2).expect("mac").to_string();

    let net = network::setup(&ns.path()).expect("setup").expect("the namespace has an interface");
    assert_eq!(net.interface.name, "eth0");
    assert_eq!(net.interface.mac, mac);
    assert_eq!(net.interface.mtu, 1400);
    let addrs: Vec<_> = net.interface.addresses.iter().map(|a| format!("{}/{}", a.address, a.prefix_len)).collect();
    assert_eq!(addrs, ["198.18.7.5/24"]);
    let routes: Vec<_> = net.routes.iter().map(|r| format!("{} via {} dev {}", r.destination, r.gateway, r.device)).collect();
    assert!(routes.contains(&"0.0.0.0/0 via 198.18.7.1 dev eth0".to_string()), "{routes:?}");
    assert!(routes.contains(&"198.19.0.0/16 via 198.18.7.1 dev eth0".to_string()), "{routes:?}");
    assert!(!routes.iter().any(|r| r.starts_with("198.18.7.0/24")), "kernel routes are the guest's to make: {routes:?}");

    // The tap exists with the pod's MTU, up, and the redirects run both ways.
    let tap = ns.ip(&format!("link show {TAP_NAME}"));
    assert!(tap.contains("mtu 1400") && tap.contains("UP"), "{tap}");
    for (from, to) in [("eth0", TAP_NAME), (TAP_NAME, "eth0")] {
        let filters = ns.tc(&format!("filter show dev {from} ingress"));
        assert!(filters.contains("protocol all") && filters.contains(&format!("Egress Redirect to device {to}")), "{from}: {filters}");
    }

    // A frame sent to the pod's address from the bridge side arrives on the tap: ARP for
    // 198.18.7.5 from the peer is redirected into the tap's fd.
    let tap_fd = std::fs::File::from(net.tap);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 2048];
        let mut tap_fd = tap_fd;
        // Frames come with a virtio-net header (IFF_VNET_HDR): 10 bytes, then Ethernet.
        while let Ok(n) = tap_fd.read(&mut buf) {
            if n >= 10 + 42 && buf[10 + 12..10 + 14] == [0x08, 0x06] {
                let _ = tx.send((buf[10 + 38..10 + 42].to_vec(), tap_fd));
                return;
            }
        }
    });
    let _ = Command::new("ip").args(["netns", "exec", &ns.peer, hull_tests::BUSYBOX, "ping", "-c", "1", "-W", "1", "198.18.7.5"]).output();
    let (target, tap_fd) = rx.recv_timeout(std::time::Duration::from_secs(5)).expect("a frame on the tap within 5 s");
    assert_eq!(target, [198, 18, 7, 5], "the ARP request for the pod address reached the tap");

    // Teardown removes the tap even while an fd (QEMU's, in a pod) still holds it.
    network::teardown(&ns.path()).expect("teardown");
    drop(tap_fd);
    assert!(!ns.ip("link show").contains(TAP_NAME));
    assert_eq!(ns.tc("filter show dev eth0 ingress").trim(), "");
    assert!(!ns.tc("qdisc show dev eth0").contains("ingress"));
    // The pod's own configuration is untouched for CNI's DEL.
    assert!(ns.ip("addr show eth0").contains("198.18.7.5/24"));
}

#[test]
fn setup_refuses_two_interfaces_and_leaves_nothing() {
    require_prerequisites!();
    let ns = CniLikeNetns::new("b");
    ns.ip("link add eth1 type veth peer name eth9");
    ns.ip("link set eth1 up");
    let e = network::setup(&ns.path()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("one network interface") && e.contains("eth0") && e.contains("eth1"), "{e}");
    assert!(!ns.ip("link show").contains(TAP_NAME));
    assert!(!ns.tc("qdisc show").contains("ingress"));
}

/// A link that is down is not the pod's interface: the kernel's fallback tunnels (tunl0 and
/// the like, in every namespace while their module is loaded) are down, CNI's interface is up.
#[test]
fn links_that_are_down_are_not_the_pods_interface() {
    require_prerequisites!();
    let ns = CniLikeNetns::new("d");
    ns.ip("link add eth1 type veth peer name eth9");
    let net = network::setup(&ns.path()).expect("setup").expect("the pod's interface");
    assert_eq!(net.interface.name, "eth0");
    assert!(ns.tc("filter show dev eth0 ingress").contains("mirred"));
    assert!(!ns.tc("qdisc show dev eth1").contains("ingress"), "the down link is left alone");
    drop(net);
    network::teardown(&ns.path()).expect("teardown");
}

#[test]
fn loopback_only_namespace_gives_no_nic() {
    require_prerequisites!();
    let name = format!("hullnet-{}-lo", std::process::id());
    sh(&format!("ip netns add {name}"));
    let r = network::setup(std::path::Path::new(&format!("/run/netns/{name}")));
    let _ = Command::new("ip").args(["netns", "del", &name]).status();
    assert!(r.expect("setup").is_none());
}

/// The pod's network namespace as the shim recorded it.
fn pod_netns(pod: &hull_tests::cri::Pod) -> std::path::PathBuf {
    let dir = hull_runtime::pod::state::PodDir::new("k8s.io", &pod.id);
    dir.netns().unwrap_or_else(|| panic!("{:?} records no network namespace", dir.path()))
}

fn in_netns(netns: &std::path::Path, cmd: &str) -> String {
    let out = Command::new("nsenter").arg(format!("--net={}", netns.display())).args(["sh", "-c", cmd]).output().expect("nsenter");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[tokio::test(flavor = "multi_thread")]
async fn hull_pods_talk_over_the_cni_bridge_with_each_other_and_with_runc() {
    hull_tests::require_containerd!();
    use hull_tests::cri::{container_config, fetch, Cri, HTTPD, HULL, RUNC};
    let mut cri = Cri::start().await.expect("containerd with CRI starts");

    // Pod A (hull) serves HTTP; pod B (hull) and pod R (runc) are its clients; R serves too.
    let a = cri.run_pod("net-a", HULL).await;
    let server = cri.start_container(&a, container_config("server", HTTPD, 0)).await;
    let b = cri.run_pod("net-b", HULL).await;
    let client = cri.start_container(&b, container_config("client", &["sleep", "1000"], 0)).await;
    let r = cri.run_pod("net-r", RUNC).await;
    let runc = cri.start_container(&r, container_config("runc", HTTPD, 0)).await;
    let (ip_a, ip_b, ip_r) = (cri.pod_ip(&a).await, cri.pod_ip(&b).await, cri.pod_ip(&r).await);
    assert!(ip_a.starts_with("198.18.0.") && ip_b.starts_with("198.18.0.") && ip_r.starts_with("198.18.0."), "{ip_a} {ip_b} {ip_r}");

    // Inside pod A's VM: the pod IP on eth0 with CNI's prefix, CNI's default route, the
    // pod's hostname and DNS config.
    let (addr, _) = cri.exec(&server, &["ip", "-4", "addr", "show", "eth0"]).await;
    assert!(addr.contains(&format!("inet {ip_a}/24")), "{addr}");
    let (routes, _) = cri.exec(&server, &["ip", "route"]).await;
    assert!(routes.contains("default via 198.18.0.1 dev eth0"), "{routes}");
    let (hostname, _) = cri.exec(&server, &["hostname"]).await;
    assert_eq!(hostname.trim(), "net-a");
    let (resolv, _) = cri.exec(&server, &["cat", "/etc/resolv.conf"]).await;
    assert!(resolv.contains("nameserver 198.18.0.53") && resolv.contains("search hull.test"), "{resolv}");
    // CRI's /etc/hosts for the pod (containerd 1.6 copies the host's) is the one inside.
    let (hosts, _) = cri.exec(&server, &["cat", "/etc/hosts"]).await;
    assert_eq!(hosts, std::fs::read_to_string("/etc/hosts").expect("host /etc/hosts"));
    let (lo, _) = cri.exec(&server, &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/"]).await;
    assert_eq!(lo.trim(), "hello from net-a", "loopback works in the pod");
    let (boot_a, _) = cri.exec(&server, &["cat", "/proc/sys/kernel/random/boot_id"]).await;
    let (boot_b, _) = cri.exec(&client, &["cat", "/proc/sys/kernel/random/boot_id"]).await;
    assert_ne!(boot_a, boot_b, "each hull pod is its own VM");

    // hull -> hull, runc -> hull, hull -> runc.
    assert_eq!(fetch(&mut cri, &client, &ip_a).await.trim(), "hello from net-a");
    assert_eq!(fetch(&mut cri, &runc, &ip_a).await.trim(), "hello from net-a");
    assert_eq!(fetch(&mut cri, &client, &ip_r).await.trim(), "hello from net-r");

    // On the host, pod A's namespace holds the tap joined to CNI's veth.
    let ns_a = pod_netns(&a);
    let filters = in_netns(&ns_a, "tc filter show dev eth0 ingress");
    assert!(filters.contains(&format!("Egress Redirect to device {TAP_NAME}")), "{filters}");
    let ns_b = pod_netns(&b);

    for pod in [&a, &b, &r] {
        cri.remove_pod(pod).await;
    }
    let left = cri.wait_no_pod_processes(std::time::Duration::from_secs(20)).await;
    assert!(left.is_ok(), "processes left after the pods were removed: {left:?}");
    // The pods' namespaces (with their taps and filters) are gone, and so are their veths on
    // the bridge; no ingress qdisc is left anywhere in containerd's namespace.
    for ns in [&ns_a, &ns_b] {
        assert!(!ns.exists(), "{ns:?} is left");
    }
    let links = cri.in_containerd_netns("ip -o link show");
    assert!(!links.contains("veth") && !links.contains(TAP_NAME), "{links}");
    let qdiscs = cri.in_containerd_netns("tc qdisc show");
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
}
