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

use futures_util::TryStreamExt;
use hull_proto::agent::{Interface, IpAddress, Route};
use hull_proto::mac::Mac;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use serde_json::Value;

/// The tap hull creates in the pod's network namespace.
pub const TAP_NAME: &str = "hull_tap0";
/// tc's ingress qdisc handle (ffff:).
const INGRESS_PARENT: u32 = 0xffff_0000;
/// ETH_P_ALL in network byte order, as tc's `protocol all` sends it.
const PROTOCOL_ALL: u16 = 0x0003u16.to_be();

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("Cannot open the pod network namespace {path:?}: {source}.")]
    Netns { path: PathBuf, source: std::io::Error },
    #[error("Cannot enter the pod network namespace {path:?}: {source}.")]
    Setns { path: PathBuf, source: nix::Error },
    #[error("Cannot talk netlink in the pod network namespace: {0}.")]
    Netlink(#[source] rtnetlink::Error),
    #[error("Cannot open a netlink connection in the pod network namespace: {0}.")]
    NetlinkSocket(#[source] std::io::Error),
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
    #[error("Cannot redirect traffic between {veth} and {TAP_NAME} with tc: {error}.")]
    Tc { veth: String, #[source] error: rtnetlink::Error },
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

/// Runs `f` with a netlink handle inside the network namespace at `netns` (see `on_thread_in`).
fn in_netns<T: Send + 'static, F>(netns: &Path, f: impl FnOnce(Handle) -> F + Send + 'static) -> Result<T, NetworkError>
where
    F: std::future::Future<Output = Result<T, NetworkError>>,
{
    on_thread_in(netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(NetworkError::NetlinkSocket)?;
        rt.block_on(async move {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(NetworkError::NetlinkSocket)?;
            let conn = tokio::spawn(conn);
            let r = f(handle).await;
            conn.abort();
            r
        })
    })?
}

struct Link {
    index: u32,
    name: String,
    mac: Vec<u8>,
    mtu: u32,
}

fn link_of(m: &LinkMessage) -> Option<Link> {
    if m.header.link_layer_type == LinkLayerType::Loopback {
        return None;
    }
    let mut link = Link { index: m.header.index, name: String::new(), mac: Vec::new(), mtu: 1500 };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Address(mac) => link.mac = mac.clone(),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            _ => {}
        }
    }
    Some(link)
}

async fn links(handle: &Handle) -> Result<Vec<Link>, NetworkError> {
    let msgs: Vec<LinkMessage> = handle.link().get().execute().try_collect().await.map_err(NetworkError::Netlink)?;
    Ok(msgs.iter().filter_map(link_of).collect())
}

/// The one interface CNI made (the tap of an earlier, crashed run does not count).
async fn pod_link(handle: &Handle) -> Result<Option<Link>, NetworkError> {
    let mut found: Vec<Link> = links(handle).await?.into_iter().filter(|l| l.name != TAP_NAME).collect();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(NetworkError::TooManyInterfaces(found.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", "))),
    }
}


fn address_of(m: &AddressMessage) -> Option<IpAddress> {
    // For IPv4, IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's on
    // point-to-point links); IPv6 has only IFA_ADDRESS.
    let mut addr = None;
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(ip) => addr = Some(*ip),
            AddressAttribute::Address(ip) if addr.is_none() => addr = Some(*ip),
            _ => {}
        }
    }
    let ip = addr?;
    // The guest derives the same IPv6 link-local address from the same MAC by itself.
    if let IpAddr::V6(v6) = ip {
        if v6.segments()[0] & 0xffc0 == 0xfe80 {
            return None;
        }
    }
    let mut a = IpAddress::new();
    a.address = ip.to_string();
    a.prefix_len = m.header.prefix_len.into();
    Some(a)
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// A route CNI (or the pod) set on the interface, as the agent will re-create it. Routes the
/// kernel derives from addresses (proto kernel) are left to the guest kernel.
fn route_of(m: &RouteMessage, link: &Link, v6: bool) -> Option<Route> {
    if m.header.protocol == RouteProtocol::Kernel || m.header.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(m.header.table);
    let (mut dest, mut gateway, mut source, mut oif) = (None, None, None, None);
    for a in &m.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => dest = route_addr(d),
            RouteAttribute::Gateway(g) => gateway = route_addr(g),
            RouteAttribute::PrefSource(s) => source = route_addr(s),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    // Only the main table (254); local and multicast routes are the kernel's.
    if table != 254 || oif != Some(link.index) {
        return None;
    }
    let dest = dest.unwrap_or(if v6 { IpAddr::V6(Ipv6Addr::UNSPECIFIED) } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) });
    let mut r = Route::new();
    r.destination = format!("{dest}/{}", m.header.destination_prefix_length);
    r.gateway = gateway.map(|g| g.to_string()).unwrap_or_default();
    r.source = source.map(|s| s.to_string()).unwrap_or_default();
    r.device = link.name.clone();
    r.scope = u8::from(m.header.scope).into();
    Some(r)
}

/// Reads the pod's interface and routes from `netns`, creates the tap there and joins it to the
/// interface. `None` when the namespace has no interface but loopback (the VM then gets no
/// NIC, as a runc container in that namespace would have only lo). On failure nothing is left
/// in the namespace.
pub fn setup(netns: &Path) -> Result<Option<PodNetwork>, NetworkError> {
    in_netns(netns, |handle| async move {
        // A tap left by a shim that was killed: its fd is gone, but tc state may not be.
        remove(&handle).await?;
        let Some(link) = pod_link(&handle).await? else { return Ok(None) };
        let Ok(mac) = Mac::try_from(link.mac.as_slice()) else {
            return Err(NetworkError::NotEthernet(link.name));
        };
        let addrs: Vec<AddressMessage> =
            handle.address().get().set_link_index_filter(link.index).execute().try_collect().await.map_err(NetworkError::Netlink)?;
        let mut interface = Interface::new();
        interface.name = link.name.clone();
        interface.mac = mac.to_string();
        interface.mtu = link.mtu;
        interface.addresses = addrs.iter().filter_map(address_of).collect();
        let mut routes = Vec::new();
        for (v6, msg) in [(false, RouteMessageBuilder::<Ipv4Addr>::new().build()), (true, RouteMessageBuilder::<Ipv6Addr>::new().build())] {
            let msgs: Vec<RouteMessage> = handle.route().get(msg).execute().try_collect().await.map_err(NetworkError::Netlink)?;
            routes.extend(msgs.iter().filter_map(|m| route_of(m, &link, v6)));
        }
        let tap = hull_proto::tap::open(TAP_NAME).map_err(NetworkError::Tap)?;
        if let Err(e) = redirect(&handle, &link).await {
            let _ = remove(&handle).await;
            return Err(e);
        }
        tracing::info!(interface = %link.name, mac = %interface.mac, addresses = interface.addresses.len(), routes = routes.len(), tap = TAP_NAME, "pod network joined to the tap");
        Ok(Some(PodNetwork { tap, mac: interface.mac.clone(), interface, routes }))
    })
}

/// Brings the tap up with the interface's MTU and adds the two redirects.
async fn redirect(handle: &Handle, link: &Link) -> Result<(), NetworkError> {
    let tc = |error: rtnetlink::Error| NetworkError::Tc { veth: link.name.clone(), error };
    let tap = links(handle).await?.into_iter().find(|l| l.name == TAP_NAME).ok_or(NetworkError::TapVanished)?;
    handle.link().set(LinkUnspec::new_with_index(tap.index).mtu(link.mtu).up().build()).execute().await.map_err(NetworkError::Netlink)?;
    for (from, to) in [(link.index, tap.index), (tap.index, link.index)] {
        handle.qdisc().add(from as i32).ingress().execute().await.map_err(tc)?;
        handle
            .traffic_filter(from as i32)
            .add()
            .parent(INGRESS_PARENT)
            .protocol(PROTOCOL_ALL)
            .redirect(to)
            .map_err(tc)?
            .execute()
            .await
            .map_err(tc)?;
    }
    Ok(())
}

/// Removes what `setup` added: the tap (if an fd still holds it) and the ingress qdiscs (with
/// their filters) on the pod's interface. What is already gone is fine.
async fn remove(handle: &Handle) -> Result<(), NetworkError> {
    for link in links(handle).await? {
        if link.name == TAP_NAME {
            let _ = handle.link().del(link.index).execute().await;
            continue;
        }
        let qdiscs: Vec<_> = handle.qdisc().get().index(link.index as i32).ingress().execute().try_collect().await.map_err(NetworkError::Netlink)?;
        for q in qdiscs {
            if q.header.index == link.index as i32 {
                let mut del = handle.qdisc().del(link.index as i32);
                del.message_mut().header = q.header.clone();
                let _ = del.execute().await;
            }
        }
    }
    Ok(())
}

/// Undoes `setup` in `netns`; a namespace CNI already removed needs nothing.
pub fn teardown(netns: &Path) -> Result<(), NetworkError> {
    if !netns.exists() {
        return Ok(());
    }
    in_netns(netns, |handle| async move { remove(&handle).await })
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
