//! The guest side of a pod's network: the VM's NIC becomes the pod's interface.
//!
//! The shim reads what CNI configured in the pod's namespace on the host and hands it over in
//! CreateSandbox; the NIC carrying the same MAC address gets the interface's name, MTU and
//! addresses, then the routes go in (directly connected ones first, so gateways resolve).
//! Loopback comes up in every case: pods expect 127.0.0.1.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use hull_proto::agent::{Interface, Route};
use hull_proto::mac::Mac;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("Cannot talk netlink in the guest: {0}.")]
    Connect(#[source] std::io::Error),
    #[error("Cannot talk netlink in the guest: {0}.")]
    Netlink(#[from] rtnetlink::Error),
    #[error("The interface {name} has an invalid MAC address {mac:?}.")]
    BadMac { name: String, mac: String, source: hull_proto::mac::MacError },
    #[error("No guest NIC has the MAC address {mac} of the pod's interface {name} (the VM was started without it?).")]
    NoNic { name: String, mac: String },
    #[error("The interface name {0:?} is not valid (1 to 15 characters, no '/' or whitespace).")]
    BadName(String),
    #[error("The address {0:?} is not an IP address with a valid prefix length.")]
    BadAddress(String),
    #[error("The route {route:?} is not valid: {why}.")]
    BadRoute { route: String, why: String },
    #[error("Cannot configure {what}: {source}.")]
    Apply { what: String, source: rtnetlink::Error },
    #[error("Interfaces can only be configured by an agent that is the VM's init, not on a host.")]
    NotInit,
}

fn parse_mac(name: &str, mac: &str) -> Result<Vec<u8>, NetworkError> {
    let parsed: Mac = mac.parse().map_err(|source| NetworkError::BadMac { name: name.into(), mac: mac.into(), source })?;
    Ok(parsed.0.to_vec())
}

/// "10.0.0.0/8" -> (10.0.0.0, 8), checking the prefix fits the family.
fn parse_prefix(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((ip, len))
}

fn valid_ifname(n: &str) -> bool {
    !n.is_empty() && n.len() < 16 && !n.contains('/') && !n.chars().any(char::is_whitespace)
}

/// Checks the whole request before anything changes, so a bad one leaves the guest as it was.
pub fn validate(interfaces: &[Interface], routes: &[Route]) -> Result<(), NetworkError> {
    for i in interfaces {
        if !valid_ifname(&i.name) {
            return Err(NetworkError::BadName(i.name.clone()));
        }
        parse_mac(&i.name, &i.mac)?;
        for a in &i.addresses {
            let text = format!("{}/{}", a.address, a.prefix_len);
            parse_prefix(&text).ok_or(NetworkError::BadAddress(text))?;
        }
    }
    for r in routes {
        let bad = |why: &str| NetworkError::BadRoute { route: format!("{} via {:?} dev {}", r.destination, r.gateway, r.device), why: why.into() };
        let (dest, _) = parse_prefix(&r.destination).ok_or_else(|| bad("the destination is not an address/prefix"))?;
        for (what, text) in [("gateway", &r.gateway), ("source", &r.source)] {
            if !text.is_empty() {
                let ip: IpAddr = text.parse().map_err(|_| bad(&format!("the {what} is not an IP address")))?;
                if ip.is_ipv4() != dest.is_ipv4() {
                    return Err(bad(&format!("the {what} is of another address family than the destination")));
                }
            }
        }
        if !interfaces.iter().any(|i| i.name == r.device) {
            return Err(bad("its device is not one of the pod's interfaces"));
        }
        if r.scope > 255 {
            return Err(bad("the scope is not a u8"));
        }
    }
    Ok(())
}

fn mac_of(m: &LinkMessage) -> Option<&[u8]> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(mac) => Some(mac.as_slice()),
        _ => None,
    })
}

fn name_of(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// Applies the pod's network in the agent's network namespace (the VM's).
pub async fn apply(interfaces: &[Interface], routes: &[Route]) -> Result<(), NetworkError> {
    validate(interfaces, routes)?;
    with_netlink(|handle| async move { apply_with(&handle, interfaces, routes).await }).await
}

/// Sets `lo` up in the caller's network namespace (a sandbox's own on a host, the VM's).
pub async fn loopback_up() -> Result<(), NetworkError> {
    with_netlink(|handle| async move { lo_up(&handle).await }).await
}

/// Runs `work` over a netlink connection of its own, closed when the work ends.
async fn with_netlink<F: std::future::Future<Output = Result<(), NetworkError>>>(work: impl FnOnce(Handle) -> F) -> Result<(), NetworkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetworkError::Connect)?;
    let conn = tokio::spawn(conn);
    let r = work(handle).await;
    conn.abort();
    r
}

async fn lo_up(handle: &Handle) -> Result<(), NetworkError> {
    let links: Vec<LinkMessage> = handle.link().get().execute().try_collect().await?;
    if let Some(lo) = links.iter().find(|l| name_of(l) == Some("lo")) {
        handle.link().set(LinkUnspec::new_with_index(lo.header.index).up().build()).execute().await.map_err(|source| NetworkError::Apply { what: "lo".into(), source })?;
    }
    Ok(())
}

async fn apply_with(handle: &Handle, interfaces: &[Interface], routes: &[Route]) -> Result<(), NetworkError> {
    let apply_err = |what: String| move |source: rtnetlink::Error| NetworkError::Apply { what, source };
    lo_up(handle).await?;
    let mut index_of = std::collections::HashMap::new();
    for i in interfaces {
        let mac = parse_mac(&i.name, &i.mac)?;
        let index = nic_with_mac(handle, &mac).await?.ok_or_else(|| NetworkError::NoNic { name: i.name.clone(), mac: i.mac.clone() })?;
        let what = |s: &str| format!("{} ({s})", i.name);
        // A link is renamed only while down.
        handle.link().set(LinkUnspec::new_with_index(index).down().build()).execute().await.map_err(apply_err(what("down")))?;
        let mut set = LinkUnspec::new_with_index(index).name(i.name.clone());
        if i.mtu > 0 {
            set = set.mtu(i.mtu);
        }
        handle.link().set(set.build()).execute().await.map_err(apply_err(what("name and mtu")))?;
        for a in &i.addresses {
            let text = format!("{}/{}", a.address, a.prefix_len);
            let (ip, len) = parse_prefix(&text).ok_or_else(|| NetworkError::BadAddress(text.clone()))?;
            handle.address().add(index, ip, len).replace().execute().await.map_err(apply_err(what(&text)))?;
        }
        handle.link().set(LinkUnspec::new_with_index(index).up().build()).execute().await.map_err(apply_err(what("up")))?;
        index_of.insert(i.name.clone(), index);
        tracing::info!(interface = %i.name, mac = %i.mac, mtu = i.mtu, addresses = i.addresses.len(), "pod interface configured");
    }
    // Directly connected routes first: a gateway must be reachable when its route goes in.
    let mut ordered: Vec<&Route> = routes.iter().collect();
    ordered.sort_by_key(|r| !r.gateway.is_empty());
    for r in ordered {
        let index = index_of[&r.device];
        let what = format!("the route to {} via {:?}", r.destination, r.gateway);
        let bad = || NetworkError::BadRoute { route: what.clone(), why: "unparsable".into() };
        let (dest, len) = parse_prefix(&r.destination).ok_or_else(bad)?;
        let scope = RouteScope::from(r.scope as u8);
        let msg = match dest {
            IpAddr::V4(d) => {
                let mut b = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(d, len).output_interface(index).scope(scope);
                if !r.gateway.is_empty() {
                    b = b.gateway(r.gateway.parse().map_err(|_| bad())?);
                }
                if !r.source.is_empty() {
                    b = b.pref_source(r.source.parse().map_err(|_| bad())?);
                }
                b.build()
            }
            IpAddr::V6(d) => {
                let mut b = RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(d, len).output_interface(index).scope(scope);
                if !r.gateway.is_empty() {
                    b = b.gateway(r.gateway.parse().map_err(|_| bad())?);
                }
                if !r.source.is_empty() {
                    b = b.pref_source(r.source.parse().map_err(|_| bad())?);
                }
                b.build()
            }
        };
        handle.route().add(msg).replace().execute().await.map_err(apply_err(what.clone()))?;
    }
    if !routes.is_empty() {
        tracing::info!(routes = routes.len(), "pod routes configured");
    }
    Ok(())
}

/// The index of the NIC with `mac`. virtio-net is probed before init runs, but allow a moment
/// for a slow probe.
async fn nic_with_mac(handle: &Handle, mac: &[u8]) -> Result<Option<u32>, NetworkError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let links: Vec<LinkMessage> = handle.link().get().execute().try_collect().await?;
        if let Some(l) = links.iter().find(|l| mac_of(l) == Some(mac)) {
            return Ok(Some(l.header.index));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hull_proto::agent::IpAddress;

    fn iface() -> Interface {
        let mut i = Interface::new();
        i.name = "eth0".into();
        i.mac = "02:00:c6:12:00:05".into();
        i.mtu = 1500;
        let mut a = IpAddress::new();
        a.address = "198.18.0.5".into();
        a.prefix_len = 24;
        i.addresses.push(a);
        i
    }

    fn route(dest: &str, gw: &str, dev: &str) -> Route {
        let mut r = Route::new();
        r.destination = dest.into();
        r.gateway = gw.into();
        r.device = dev.into();
        r
    }

    #[test]
    fn a_cni_like_request_is_valid() {
        assert!(validate(&[iface()], &[route("0.0.0.0/0", "198.18.0.1", "eth0"), route("fd00::/64", "", "eth0")]).is_ok());
    }

    #[test]
    fn bad_requests_are_refused_naming_the_part() {
        let mut i = iface();
        i.mac = "02:00:c6:12:00".into();
        assert!(validate(&[i], &[]).unwrap_err().to_string().contains("02:00:c6:12:00"));
        let mut i = iface();
        i.name = "a/b".into();
        assert!(matches!(validate(&[i], &[]), Err(NetworkError::BadName(_))));
        let mut i = iface();
        i.addresses[0].prefix_len = 33;
        assert!(validate(&[i], &[]).unwrap_err().to_string().contains("198.18.0.5/33"));
        let e = validate(&[iface()], &[route("0.0.0.0/0", "fd00::1", "eth0")]).unwrap_err().to_string();
        assert!(e.contains("another address family"), "{e}");
        let e = validate(&[iface()], &[route("0.0.0.0/0", "198.18.0.1", "eth1")]).unwrap_err().to_string();
        assert!(e.contains("not one of the pod's interfaces"), "{e}");
        assert!(validate(&[iface()], &[route("default", "198.18.0.1", "eth0")]).is_err());
    }
}
