//! The host side of a pod's network.
//!
//! CNI leaves a veth in the pod's network namespace with the pod's addresses and routes. A VM
//! cannot use that veth directly, so hull creates a tap in the same namespace and joins the two
//! with tc mirred redirects in both directions (the model Kata calls "tcfilter"): every frame
//! the veth receives leaves through the tap into the VM's virtio-net, and every frame the guest
//! sends leaves through the veth onto CNI's bridge. The guest NIC gets the veth's MAC address
//! and the agent gives it the veth's addresses, MTU and routes, so peers see exactly the
//! endpoint CNI configured. Nothing is bridged or NATed on the host.
//!
//! Why tcfilter rather than a bridge or macvtap in the namespace: it needs only the ingress
//! qdisc, u32 and mirred (present in stock kernels, this host's included), leaves the veth's
//! configuration untouched for CNI's DEL, and adds no L2 learning in between.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use hull_proto::agent::{Interface, IpAddress, Route};
use hull_proto::mac::Mac;
use hull_proto::netlink::{Address, Link, LinkChange, Netlink, NetlinkError, RouteEntry, MAIN_TABLE, PROTOCOL_KERNEL, UNICAST};
use serde_json::Value;

/// The tap hull creates in the pod's network namespace.
pub const TAP_NAME: &str = "hull_tap0";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("Cannot open the pod network namespace {path:?}: {source}.")]
    Netns { path: PathBuf, source: std::io::Error },
    #[error("Cannot enter the pod network namespace {path:?}: {source}.")]
    Setns { path: PathBuf, source: nix::Error },
    #[error("In the pod network namespace: {0}")]
    Netlink(#[from] NetlinkError),
    #[error("The thread in the pod network namespace panicked.")]
    Panicked,
    #[error("Cannot start a thread to enter the pod network namespace: {0}.")]
    Spawn(#[source] std::io::Error),
    #[error("{TAP_NAME} vanished from the pod network namespace while it was set up.")]
    TapVanished,
    #[error("The pod network set-up did not finish: {0}.")]
    Thread(#[source] tokio::task::JoinError),
    #[error("hull gives a pod VM one network interface, but the pod network namespace has {0}; this network setup cannot be carried into a VM.")]
    TooManyInterfaces(String),
    #[error("The pod's interface {0} has no MAC address (not an Ethernet device); hull cannot carry it into the VM.")]
    NotEthernet(String),
    #[error("Cannot create the tap {TAP_NAME} in the pod network namespace: {0}.")]
    Tap(std::io::Error),
    #[error("Cannot redirect traffic between {veth} and {TAP_NAME} with tc: {error}")]
    Tc { veth: String, #[source] error: NetlinkError },
}

/// What the pod VM gets: the tap to give QEMU, and the configuration for the agent.
pub struct PodNetwork {
    /// The tap's file descriptor (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR). The tap lives as long as
    /// an fd to it is open: once QEMU has its copy and exits, the tap is gone with it.
    pub tap: OwnedFd,
    pub mac: String,
    pub interface: Interface,
    pub routes: Vec<Route>,
}

/// The network namespace path of an OCI spec (CRI's `/var/run/netns/cni-…`), if it names one.
pub fn netns_path(spec: &Value) -> Option<PathBuf> {
    spec.pointer("/linux/namespaces")?
        .as_array()?
        .iter()
        .find(|n| n.get("type").and_then(Value::as_str) == Some("network"))?
        .get("path")
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// Runs `f` on a thread of its own inside the network namespace at `netns` and returns what it
/// returned. setns changes only the calling thread, and sockets, taps and child processes take
/// the namespace of the thread that makes them; the thread ends with `f`, so no other code of
/// the runtime ever runs outside the host's namespace.
pub fn on_thread_in<T: Send + 'static>(netns: &Path, f: impl FnOnce() -> T + Send + 'static) -> Result<T, NetworkError> {
    let file = File::open(netns).map_err(|source| NetworkError::Netns { path: netns.into(), source })?;
    let path = netns.to_path_buf();
    let worker = std::thread::Builder::new()
        .name("pod-netns".into())
        .spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| NetworkError::Setns { path, source })?;
            Ok(f())
        })
        .map_err(NetworkError::Spawn)?;
    worker.join().map_err(|_| NetworkError::Panicked)?
}

/// Runs `f` with a netlink socket inside the network namespace at `netns` (see `on_thread_in`).
fn in_netns<T: Send + 'static>(netns: &Path, f: impl FnOnce(&mut Netlink) -> Result<T, NetworkError> + Send + 'static) -> Result<T, NetworkError> {
    on_thread_in(netns, move || f(&mut Netlink::open()?))?
}

/// The one interface CNI made and brought up. Not counted: the tap of an earlier, crashed run,
/// and links that are down, such as the fallback tunnels (tunl0, sit0, gre0, ...) the kernel
/// puts in every new namespace while their module is loaded (an IPIP network has tunl0 in
/// every pod).
fn pod_link(nl: &mut Netlink) -> Result<Option<Link>, NetworkError> {
    let mut found: Vec<Link> = nl.links()?.into_iter().filter(|l| !l.loopback && l.up && l.name != TAP_NAME).collect();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(NetworkError::TooManyInterfaces(found.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", "))),
    }
}

fn address_of(a: &Address) -> Option<IpAddress> {
    // The guest derives the same IPv6 link-local address from the same MAC by itself.
    if let IpAddr::V6(v6) = a.ip {
        if v6.segments()[0] & 0xffc0 == 0xfe80 {
            return None;
        }
    }
    let mut out = IpAddress::new();
    out.address = a.ip.to_string();
    out.prefix_len = a.prefix_len.into();
    Some(out)
}

/// A route CNI (or the pod) set on the interface, as the agent will re-create it. Routes the
/// kernel derives from addresses (proto kernel) are left to the guest kernel.
fn route_of(m: &RouteEntry, link: &Link, v6: bool) -> Option<Route> {
    if m.protocol == PROTOCOL_KERNEL || m.kind != UNICAST {
        return None;
    }
    // Only the main table; local and multicast routes are the kernel's.
    if m.table != MAIN_TABLE || m.oif != Some(link.index) {
        return None;
    }
    let dest = m.destination.unwrap_or(if v6 { IpAddr::V6(Ipv6Addr::UNSPECIFIED) } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) });
    let mut r = Route::new();
    r.destination = format!("{dest}/{}", m.destination_len);
    r.gateway = m.gateway.map(|g| g.to_string()).unwrap_or_default();
    r.source = m.source.map(|s| s.to_string()).unwrap_or_default();
    r.device = link.name.clone();
    r.scope = m.scope.into();
    Some(r)
}

/// Reads the pod's interface and routes from `netns`, creates the tap there and joins it to the
/// interface. `None` when the namespace has no interface but loopback (the VM then gets no
/// NIC, as a runc container in that namespace would have only lo). On failure nothing is left
/// in the namespace.
pub fn setup(netns: &Path) -> Result<Option<PodNetwork>, NetworkError> {
    in_netns(netns, |nl| {
        // A tap left by a shim that was killed: its fd is gone, but tc state may not be.
        remove(nl)?;
        let Some(link) = pod_link(nl)? else { return Ok(None) };
        let Ok(mac) = Mac::try_from(link.mac.as_slice()) else {
            return Err(NetworkError::NotEthernet(link.name));
        };
        let mut interface = Interface::new();
        interface.name = link.name.clone();
        interface.mac = mac.to_string();
        interface.mtu = link.mtu;
        interface.addresses = nl.addresses()?.iter().filter(|a| a.index == link.index).filter_map(address_of).collect();
        let mut routes = Vec::new();
        for v6 in [false, true] {
            routes.extend(nl.routes(v6)?.iter().filter_map(|m| route_of(m, &link, v6)));
        }
        let tap = hull_proto::tap::open(TAP_NAME).map_err(NetworkError::Tap)?;
        if let Err(e) = redirect(nl, &link) {
            let _ = remove(nl);
            return Err(e);
        }
        tracing::info!(interface = %link.name, mac = %interface.mac, addresses = interface.addresses.len(), routes = routes.len(), tap = TAP_NAME, "pod network joined to the tap");
        Ok(Some(PodNetwork { tap, mac: interface.mac.clone(), interface, routes }))
    })
}

/// Brings the tap up with the interface's MTU and adds the two redirects.
fn redirect(nl: &mut Netlink, link: &Link) -> Result<(), NetworkError> {
    let tc = |error: NetlinkError| NetworkError::Tc { veth: link.name.clone(), error };
    let tap = nl.links()?.into_iter().find(|l| l.name == TAP_NAME).ok_or(NetworkError::TapVanished)?;
    nl.set_link(tap.index, &LinkChange { mtu: Some(link.mtu), up: Some(true), ..Default::default() })?;
    for (from, to) in [(link.index, tap.index), (tap.index, link.index)] {
        nl.add_ingress_qdisc(from).map_err(tc)?;
        nl.add_redirect(from, to).map_err(tc)?;
    }
    Ok(())
}

/// Removes what `setup` added: the tap (if an fd still holds it) and the ingress qdiscs (with
/// their filters) on the pod's interface. What is already gone is fine.
fn remove(nl: &mut Netlink) -> Result<(), NetworkError> {
    for link in nl.links()? {
        if link.name == TAP_NAME {
            let _ = nl.delete_link(link.index);
        } else if !link.loopback {
            // Refused when there is none (EINVAL or ENOENT, by kernel version): nothing to undo.
            let _ = nl.delete_ingress_qdisc(link.index);
        }
    }
    Ok(())
}

/// Undoes `setup` in `netns`; a namespace CNI already removed needs nothing.
pub fn teardown(netns: &Path) -> Result<(), NetworkError> {
    if !netns.exists() {
        return Ok(());
    }
    in_netns(netns, remove)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn netns_path_from_spec() {
        let spec = json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}});
        assert_eq!(netns_path(&spec), Some(PathBuf::from("/var/run/netns/cni-1")));
        assert_eq!(netns_path(&json!({"linux": {"namespaces": [{"type": "network"}]}})), None);
        assert_eq!(netns_path(&json!({"linux": {"namespaces": [{"type": "network", "path": ""}]}})), None);
        assert_eq!(netns_path(&json!({})), None);
    }

    #[test]
    fn missing_namespace_is_named() {
        let e = setup(Path::new("/nonexistent/netns")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("/nonexistent/netns"), "{e}");
        assert!(teardown(Path::new("/nonexistent/netns")).is_ok());
    }

}
