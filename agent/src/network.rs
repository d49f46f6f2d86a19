//! The guest side of a pod's network: the VM's NIC becomes the pod's interface.
//!
//! The shim reads what CNI configured in the pod's namespace on the host and hands it over in
//! CreateSandbox; the NIC carrying the same MAC address gets the interface's name, MTU and
//! addresses, then the routes go in (directly connected ones first, so gateways resolve).
//! Loopback comes up in every case: pods expect 127.0.0.1.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use hull_proto::agent::{Interface, Route};
use hull_proto::mac::Mac;
use hull_proto::netlink::{LinkChange, Netlink, NetlinkError, NewRoute};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("In the guest: {0}")]
    Netlink(#[from] NetlinkError),
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
    Apply { what: String, source: NetlinkError },
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

/// Applies the pod's network in the agent's network namespace (the VM's).
pub async fn apply(interfaces: &[Interface], routes: &[Route]) -> Result<(), NetworkError> {
    validate(interfaces, routes)?;
    let mut nl = Netlink::open()?;
    apply_with(&mut nl, interfaces, routes).await
}

/// Sets `lo` up in the caller's network namespace (a sandbox's own on a host, the VM's).
pub fn loopback_up() -> Result<(), NetworkError> {
    lo_up(&mut Netlink::open()?)
}

fn lo_up(nl: &mut Netlink) -> Result<(), NetworkError> {
    if let Some(lo) = nl.links()?.iter().find(|l| l.name == "lo") {
        nl.set_link(lo.index, &LinkChange { up: Some(true), ..Default::default() }).map_err(|source| NetworkError::Apply { what: "lo".into(), source })?;
    }
    Ok(())
}

async fn apply_with(nl: &mut Netlink, interfaces: &[Interface], routes: &[Route]) -> Result<(), NetworkError> {
    let apply_err = |what: String| move |source: NetlinkError| NetworkError::Apply { what, source };
    lo_up(nl)?;
    let mut index_of = std::collections::HashMap::new();
    for i in interfaces {
        let mac = parse_mac(&i.name, &i.mac)?;
        let (index, adopt) = nic_for(nl, &mac, interfaces.len()).await?.ok_or_else(|| NetworkError::NoNic { name: i.name.clone(), mac: i.mac.clone() })?;
        let what = |s: &str| format!("{} ({s})", i.name);
        // A link is renamed only while down.
        nl.set_link(index, &LinkChange { up: Some(false), ..Default::default() }).map_err(apply_err(what("down")))?;
        if adopt {
            tracing::info!(interface = %i.name, mac = %i.mac, "the VM's one NIC takes the pod interface's MAC (a VM restored from a snapshot)");
        }
        let change = LinkChange { name: Some(&i.name), mtu: (i.mtu > 0).then_some(i.mtu), mac: adopt.then_some(&mac[..]), ..Default::default() };
        nl.set_link(index, &change).map_err(apply_err(what("name and mtu")))?;
        for a in &i.addresses {
            let text = format!("{}/{}", a.address, a.prefix_len);
            let (ip, len) = parse_prefix(&text).ok_or_else(|| NetworkError::BadAddress(text.clone()))?;
            nl.add_address(index, ip, len).map_err(apply_err(what(&text)))?;
        }
        nl.set_link(index, &LinkChange { up: Some(true), ..Default::default() }).map_err(apply_err(what("up")))?;
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
        let (destination, destination_len) = parse_prefix(&r.destination).ok_or_else(bad)?;
        let ip = |text: &str| if text.is_empty() { Ok(None) } else { text.parse::<IpAddr>().map(Some).map_err(|_| bad()) };
        let route = NewRoute { destination, destination_len, oif: index, gateway: ip(&r.gateway)?, source: ip(&r.source)?, scope: r.scope as u8 };
        nl.add_route(&route).map_err(apply_err(what.clone()))?;
    }
    if !routes.is_empty() {
        tracing::info!(routes = routes.len(), "pod routes configured");
    }
    Ok(())
}

/// The index of the NIC for the pod interface with `mac`, and whether it must take that MAC:
/// the NIC with the MAC, or, in a pod of one interface whose VM has one NIC with another MAC,
/// that NIC. A VM restored from a snapshot has the NIC of the VM the snapshot was made of, with
/// that VM's MAC; the pod's CNI set up its interface (and perhaps the neighbours' entries) with
/// its own. virtio-net is probed before init runs, but allow a moment for a slow probe.
async fn nic_for(nl: &mut Netlink, mac: &[u8], interfaces: usize) -> Result<Option<(u32, bool)>, NetworkError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let links = nl.links()?;
        if let Some(l) = links.iter().find(|l| l.mac == mac) {
            return Ok(Some((l.index, false)));
        }
        let nics: Vec<_> = links.iter().filter(|l| !l.loopback && l.mac.len() == mac.len()).collect();
        if let ([nic], 1) = (nics.as_slice(), interfaces) {
            return Ok(Some((nic.index, true)));
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
