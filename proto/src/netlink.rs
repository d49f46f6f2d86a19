//! rtnetlink, for the few requests hull makes: the shim reads a pod's interface, addresses and
//! routes in the pod's network namespace and joins a tap to the interface with tc; the agent
//! gives the guest's NIC the pod's name, MTU, addresses and routes.
//!
//! Why not the rtnetlink crates: their message types cover all of rtnetlink, 570 KB of text in
//! every shim (a fifth of it) for about a dozen messages, and they need an async runtime where
//! one blocking socket does. The layouts are the kernel's uapi (linux/netlink.h, rtnetlink.h,
//! if_link.h, if_addr.h, pkt_sched.h, pkt_cls.h, tc_act/tc_mirred.h); the requests are the ones
//! iproute2's `ip` and `tc` send for the same commands.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_HEADER: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// Types below this are netlink's own (noop, error, done, overrun), never a dump's entries.
const NLMSG_MIN_TYPE: u16 = 0x10;
/// Set on a dump's messages when the table changed while it was being dumped.
const NLM_F_DUMP_INTR: u16 = 0x10;
/// How often a dump the kernel says was interrupted is started again.
const DUMP_ATTEMPTS: usize = 3;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_SETLINK: u16 = 19;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
const RTM_NEWTFILTER: u16 = 44;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const ARPHRD_LOOPBACK: u16 = 772;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;
const RTA_TABLE: u16 = 15;
/// The main routing table (RT_TABLE_MAIN).
pub const MAIN_TABLE: u32 = 254;
/// Routes the kernel adds for an address (RTPROT_KERNEL).
pub const PROTOCOL_KERNEL: u8 = 2;
const RTPROT_STATIC: u8 = 4;
/// RTN_UNICAST.
pub const UNICAST: u8 = 1;

const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_U32_SEL: u16 = 5;
const TCA_U32_ACT: u16 = 7;
const TCA_ACT_KIND: u16 = 1;
const TCA_ACT_OPTIONS: u16 = 2;
const TCA_MIRRED_PARMS: u16 = 2;
const TC_U32_TERMINAL: u8 = 1;
const TC_ACT_STOLEN: i32 = 4;
const TCA_EGRESS_REDIR: i32 = 1;
/// The ingress qdisc's handle (ffff:) and its parent (TC_H_INGRESS).
const INGRESS_HANDLE: u32 = 0xffff_0000;
const TC_H_INGRESS: u32 = 0xffff_fff1;
/// ETH_P_ALL, in network byte order as tc sends a filter's protocol.
const ETH_P_ALL_BE: u32 = 0x0003u16.to_be() as u32;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("Cannot open a netlink socket: {0}.")]
    Socket(#[source] io::Error),
    #[error("Cannot {request} over netlink: {source}.")]
    Io { request: &'static str, source: io::Error },
    #[error("The kernel refused to {request}: {source}.")]
    Refused { request: &'static str, source: io::Error },
    #[error("The kernel's netlink answer to {request} is malformed.")]
    Malformed { request: &'static str },
}

impl NetlinkError {
    /// The errno the kernel refused a request with.
    pub fn refused_with(&self) -> Option<i32> {
        match self {
            NetlinkError::Refused { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// A network interface, as a link dump lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The hardware address: six bytes for Ethernet, none for some kinds of link.
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub loopback: bool,
    /// Administratively up (IFF_UP).
    pub up: bool,
}

/// An address of an interface: its own (IFA_LOCAL where the kernel gives one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub ip: IpAddr,
    pub prefix_len: u8,
}

/// A route, as a route dump lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub destination: Option<IpAddr>,
    pub destination_len: u8,
    pub gateway: Option<IpAddr>,
    pub source: Option<IpAddr>,
    pub oif: Option<u32>,
    pub table: u32,
    pub protocol: u8,
    pub scope: u8,
    pub kind: u8,
}

/// A unicast route in the main table, through `oif`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRoute {
    pub destination: IpAddr,
    pub destination_len: u8,
    pub oif: u32,
    pub gateway: Option<IpAddr>,
    pub source: Option<IpAddr>,
    pub scope: u8,
}

/// What `set_link` changes; `None` leaves it as it is.
#[derive(Debug, Clone, Default)]
pub struct LinkChange<'a> {
    pub up: Option<bool>,
    pub mtu: Option<u32>,
    pub name: Option<&'a str>,
    /// The link's hardware address.
    pub mac: Option<&'a [u8]>,
}

/// A request being written: the netlink header, the family's fixed header, then attributes.
struct Request {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Request {
    fn new(kind: u16, flags: u16, fixed: &[u8]) -> Request {
        let mut buf = vec![0u8; NLMSG_HEADER];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        let mut r = Request { buf, nests: Vec::new() };
        r.put(fixed);
        r
    }

    /// Appends `bytes`, padded to netlink's 4-byte alignment.
    fn put(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
    }

    fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Request {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.put(data);
        self
    }

    fn attr_str(&mut self, kind: u16, s: &str) -> &mut Request {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.attr(kind, &data)
    }

    /// Opens a nested attribute, closed by `end`.
    fn begin(&mut self, kind: u16) -> &mut Request {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    fn end(&mut self) -> &mut Request {
        if let Some(at) = self.nests.pop() {
            let len = (self.buf.len() - at) as u16;
            self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    /// The request's bytes, with its length and sequence number.
    fn finish(&self, seq: u32) -> Vec<u8> {
        let mut buf = self.buf.clone();
        let len = buf.len() as u32;
        buf[0..4].copy_from_slice(&len.to_ne_bytes());
        buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        buf
    }
}

/// The attributes in `data`: (type without its flags, payload). Stops at the first one that
/// does not fit.
struct Attrs<'a>(&'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let len = usize::from(u16::from_ne_bytes(self.0.get(0..2)?.try_into().ok()?));
        let kind = u16::from_ne_bytes(self.0.get(2..4)?.try_into().ok()?);
        let payload = self.0.get(4..len)?;
        self.0 = self.0.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some((kind & NLA_TYPE_MASK, payload))
    }
}

fn u32_of(data: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(data.get(0..4)?.try_into().ok()?))
}

fn ip_of(data: &[u8]) -> Option<IpAddr> {
    match data.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(data).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(data).ok()?))),
        _ => None,
    }
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn family_of(ip: &IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

/// struct ifinfomsg.
fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m[8..12].copy_from_slice(&flags.to_ne_bytes());
    m[12..16].copy_from_slice(&change.to_ne_bytes());
    m
}

/// struct tcmsg.
fn tcmsg(index: u32, handle: u32, parent: u32, info: u32) -> [u8; 20] {
    let mut m = [0u8; 20];
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m[8..12].copy_from_slice(&handle.to_ne_bytes());
    m[12..16].copy_from_slice(&parent.to_ne_bytes());
    m[16..20].copy_from_slice(&info.to_ne_bytes());
    m
}

/// A NETLINK_ROUTE socket in the calling thread's network namespace (the namespace is the
/// socket's from then on).
pub struct Netlink {
    socket: OwnedFd,
    seq: u32,
}

impl Netlink {
    pub fn open() -> Result<Netlink, NetlinkError> {
        // SAFETY: socket() takes no pointers; the descriptor it returns is owned here.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        if fd < 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // The kernel answers at once; five seconds is far more than a request takes.
        let timeout = libc::timeval { tv_sec: 5, tv_usec: 0 };
        // SAFETY: sockaddr_nl is plain data, valid as zero bytes; both calls read the structs
        // passed with their sizes, which outlive the calls.
        let ok = unsafe {
            let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
            kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&timeout as *const libc::timeval).cast(), std::mem::size_of::<libc::timeval>() as libc::socklen_t) == 0
                && libc::connect(fd, (&kernel as *const libc::sockaddr_nl).cast(), std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t) == 0
        };
        if !ok {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        Ok(Netlink { socket, seq: 0 })
    }

    /// Sends `req` and collects the payloads of the answer's messages (a dump's entries) until
    /// the kernel's acknowledgement or the dump's end. A dump the kernel marks as interrupted
    /// (the table changed meanwhile) is asked for again.
    fn exchange(&mut self, request: &'static str, req: Request) -> Result<Vec<Vec<u8>>, NetlinkError> {
        let mut attempt = 1;
        loop {
            let (out, interrupted) = self.exchange_once(request, &req)?;
            if !interrupted || attempt == DUMP_ATTEMPTS {
                return Ok(out);
            }
            attempt += 1;
        }
    }

    fn exchange_once(&mut self, request: &'static str, req: &Request) -> Result<(Vec<Vec<u8>>, bool), NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let bytes = req.finish(seq);
        let io_err = |source| NetlinkError::Io { request, source };
        // A signal interrupts a call on a socket with a timeout even under SA_RESTART.
        let retry = |f: &mut dyn FnMut() -> isize| loop {
            let n = f();
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        // SAFETY: send reads `bytes.len()` bytes of `bytes`, which outlives the call.
        retry(&mut || unsafe { libc::send(self.socket.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) }).map_err(io_err)?;
        let (mut out, mut interrupted) = (Vec::new(), false);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            // SAFETY: recv writes at most `buf.len()` bytes into `buf`, which outlives the call.
            let n = retry(&mut || unsafe { libc::recv(self.socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) }).map_err(io_err)?;
            let mut rest = &buf[..n];
            while rest.len() >= NLMSG_HEADER {
                let malformed = NetlinkError::Malformed { request };
                let len = u32_of(rest).ok_or(NetlinkError::Malformed { request })? as usize;
                let Some(message) = rest.get(..len).filter(|_| len >= NLMSG_HEADER) else { return Err(malformed) };
                rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
                let kind = u16::from_ne_bytes([message[4], message[5]]);
                let flags = u16::from_ne_bytes([message[6], message[7]]);
                if u32_of(&message[8..]) != Some(seq) {
                    continue;
                }
                interrupted |= flags & NLM_F_DUMP_INTR != 0;
                let payload = &message[NLMSG_HEADER..];
                // An error message carries a negative errno (0: the acknowledgement); a dump's
                // end may carry one too, when the dump failed part-way.
                let refused = |errno: i32| NetlinkError::Refused { request, source: io::Error::from_raw_os_error(errno.wrapping_neg()) };
                match kind {
                    NLMSG_DONE => match u32_of(payload).map(|e| e as i32) {
                        Some(errno) if errno < 0 => return Err(refused(errno)),
                        _ => return Ok((out, interrupted)),
                    },
                    NLMSG_ERROR => {
                        let errno = u32_of(payload).ok_or(malformed)? as i32;
                        if errno == 0 {
                            return Ok((out, interrupted));
                        }
                        return Err(refused(errno));
                    }
                    k if k < NLMSG_MIN_TYPE => {}
                    _ => out.push(payload.to_vec()),
                }
            }
        }
    }

    /// Every interface of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        const REQUEST: &str = "list the network interfaces";
        let answer = self.exchange(REQUEST, Request::new(RTM_GETLINK, NLM_F_DUMP, &ifinfomsg(0, 0, 0)))?;
        let mut links = Vec::new();
        for m in answer {
            let Some(fixed) = m.get(..16) else { return Err(NetlinkError::Malformed { request: REQUEST }) };
            let kind = u16::from_ne_bytes([fixed[2], fixed[3]]);
            let index = u32_of(&fixed[4..]).unwrap_or_default();
            let up = u32_of(&fixed[8..]).unwrap_or_default() & libc::IFF_UP as u32 != 0;
            let mut link = Link { index, name: String::new(), mac: Vec::new(), mtu: 1500, loopback: kind == ARPHRD_LOOPBACK, up };
            for (a, data) in Attrs(&m[16..]) {
                match a {
                    IFLA_IFNAME => link.name = String::from_utf8_lossy(data.split(|&b| b == 0).next().unwrap_or_default()).into_owned(),
                    IFLA_ADDRESS => link.mac = data.to_vec(),
                    IFLA_MTU => link.mtu = u32_of(data).unwrap_or(link.mtu),
                    _ => {}
                }
            }
            links.push(link);
        }
        Ok(links)
    }

    /// Changes the interface `index`: its name (the kernel renames only a link that is down),
    /// its MTU, up or down.
    pub fn set_link(&mut self, index: u32, change: &LinkChange<'_>) -> Result<(), NetlinkError> {
        let (flags, mask) = match change.up {
            Some(up) => (if up { libc::IFF_UP as u32 } else { 0 }, libc::IFF_UP as u32),
            None => (0, 0),
        };
        let mut req = Request::new(RTM_SETLINK, NLM_F_ACK, &ifinfomsg(index, flags, mask));
        if let Some(name) = change.name {
            req.attr_str(IFLA_IFNAME, name);
        }
        if let Some(mtu) = change.mtu {
            req.attr(IFLA_MTU, &mtu.to_ne_bytes());
        }
        if let Some(mac) = change.mac {
            req.attr(IFLA_ADDRESS, mac);
        }
        self.exchange("change a network interface", req).map(drop)
    }

    pub fn delete_link(&mut self, index: u32) -> Result<(), NetlinkError> {
        self.exchange("remove a network interface", Request::new(RTM_DELLINK, NLM_F_ACK, &ifinfomsg(index, 0, 0))).map(drop)
    }

    /// Every address of every interface.
    pub fn addresses(&mut self) -> Result<Vec<Address>, NetlinkError> {
        const REQUEST: &str = "list the addresses";
        let answer = self.exchange(REQUEST, Request::new(RTM_GETADDR, NLM_F_DUMP, &[0u8; 8]))?;
        let mut out = Vec::new();
        for m in answer {
            let Some(fixed) = m.get(..8) else { return Err(NetlinkError::Malformed { request: REQUEST }) };
            // For IPv4, IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's on
            // point-to-point links); IPv6 has only IFA_ADDRESS.
            let (mut local, mut address) = (None, None);
            for (a, data) in Attrs(&m[8..]) {
                match a {
                    IFA_LOCAL => local = ip_of(data),
                    IFA_ADDRESS => address = ip_of(data),
                    _ => {}
                }
            }
            if let Some(ip) = local.or(address) {
                out.push(Address { index: u32_of(&fixed[4..]).unwrap_or_default(), ip, prefix_len: fixed[1] });
            }
        }
        Ok(out)
    }

    /// Adds `ip/prefix_len` to the interface `index`, or replaces it there.
    pub fn add_address(&mut self, index: u32, ip: IpAddr, prefix_len: u8) -> Result<(), NetlinkError> {
        let mut fixed = [0u8; 8];
        fixed[0] = family_of(&ip);
        fixed[1] = prefix_len;
        fixed[4..8].copy_from_slice(&index.to_ne_bytes());
        let mut req = Request::new(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, &fixed);
        req.attr(IFA_LOCAL, &ip_bytes(&ip)).attr(IFA_ADDRESS, &ip_bytes(&ip));
        if let IpAddr::V4(v4) = ip {
            // As `ip addr add … brd +`: the subnet's broadcast address.
            if prefix_len < 31 {
                let brd = u32::from(v4) | (u32::MAX >> prefix_len);
                req.attr(IFA_BROADCAST, &Ipv4Addr::from(brd).octets());
            }
        }
        self.exchange("add an address", req).map(drop)
    }

    /// The routes of one family (IPv6 when `v6`), of every table.
    pub fn routes(&mut self, v6: bool) -> Result<Vec<RouteEntry>, NetlinkError> {
        const REQUEST: &str = "list the routes";
        let mut fixed = [0u8; 12];
        fixed[0] = if v6 { libc::AF_INET6 as u8 } else { libc::AF_INET as u8 };
        let answer = self.exchange(REQUEST, Request::new(RTM_GETROUTE, NLM_F_DUMP, &fixed))?;
        let mut out = Vec::new();
        for m in answer {
            let Some(h) = m.get(..12) else { return Err(NetlinkError::Malformed { request: REQUEST }) };
            let mut r = RouteEntry { destination: None, destination_len: h[1], gateway: None, source: None, oif: None, table: h[4].into(), protocol: h[5], scope: h[6], kind: h[7] };
            for (a, data) in Attrs(&m[12..]) {
                match a {
                    RTA_DST => r.destination = ip_of(data),
                    RTA_GATEWAY => r.gateway = ip_of(data),
                    RTA_PREFSRC => r.source = ip_of(data),
                    RTA_OIF => r.oif = u32_of(data),
                    RTA_TABLE => r.table = u32_of(data).unwrap_or(r.table),
                    _ => {}
                }
            }
            out.push(r);
        }
        Ok(out)
    }

    /// Adds a unicast route to the main table, or replaces the one to the same destination.
    pub fn add_route(&mut self, route: &NewRoute) -> Result<(), NetlinkError> {
        let fixed = [family_of(&route.destination), route.destination_len, 0, 0, MAIN_TABLE as u8, RTPROT_STATIC, route.scope, UNICAST, 0, 0, 0, 0];
        let mut req = Request::new(RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, &fixed);
        req.attr(RTA_DST, &ip_bytes(&route.destination)).attr(RTA_OIF, &route.oif.to_ne_bytes());
        if let Some(gw) = &route.gateway {
            req.attr(RTA_GATEWAY, &ip_bytes(gw));
        }
        if let Some(src) = &route.source {
            req.attr(RTA_PREFSRC, &ip_bytes(src));
        }
        self.exchange("add a route", req).map(drop)
    }

    /// `tc qdisc add dev <index> ingress`.
    pub fn add_ingress_qdisc(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut req = Request::new(RTM_NEWQDISC, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &tcmsg(index, INGRESS_HANDLE, TC_H_INGRESS, 0));
        req.attr_str(TCA_KIND, "ingress");
        self.exchange("add an ingress qdisc", req).map(drop)
    }

    /// `tc qdisc del dev <index> ingress`, with its filters.
    pub fn delete_ingress_qdisc(&mut self, index: u32) -> Result<(), NetlinkError> {
        self.exchange("remove an ingress qdisc", Request::new(RTM_DELQDISC, NLM_F_ACK, &tcmsg(index, INGRESS_HANDLE, TC_H_INGRESS, 0))).map(drop)
    }

    /// Every frame that `from` receives leaves through `to`: `tc filter add dev <from> parent
    /// ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev <to>`.
    pub fn add_redirect(&mut self, from: u32, to: u32) -> Result<(), NetlinkError> {
        // struct tc_u32_sel, terminal, one key that matches everything (mask 0), and the key.
        let mut selector = [0u8; 16 + 16];
        selector[0] = TC_U32_TERMINAL;
        selector[2] = 1;
        // struct tc_mirred: tc_gen (index, capab, action, refcnt, bindcnt), eaction, ifindex.
        let mut mirred = [0u8; 28];
        mirred[8..12].copy_from_slice(&TC_ACT_STOLEN.to_ne_bytes());
        mirred[20..24].copy_from_slice(&TCA_EGRESS_REDIR.to_ne_bytes());
        mirred[24..28].copy_from_slice(&to.to_ne_bytes());
        let mut req = Request::new(RTM_NEWTFILTER, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &tcmsg(from, 0, INGRESS_HANDLE, ETH_P_ALL_BE));
        req.attr_str(TCA_KIND, "u32");
        req.begin(TCA_OPTIONS).attr(TCA_U32_SEL, &selector);
        // The action list: the first (and only) action, mirred.
        req.begin(TCA_U32_ACT).begin(1).attr_str(TCA_ACT_KIND, "mirred");
        req.begin(TCA_ACT_OPTIONS).attr(TCA_MIRRED_PARMS, &mirred).end();
        req.end().end().end();
        self.exchange("add a tc redirect", req).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attributes are laid out and read back as the kernel does: 4-byte aligned, nested ones
    /// with their length covering what they hold.
    #[test]
    fn attributes_round_trip_with_padding_and_nesting() {
        let mut req = Request::new(RTM_SETLINK, NLM_F_ACK, &ifinfomsg(7, 1, 1));
        req.attr_str(IFLA_IFNAME, "eth0").attr(IFLA_MTU, &1400u32.to_ne_bytes());
        req.begin(TCA_OPTIONS).attr(TCA_KIND, &[1, 2, 3]).end();
        let bytes = req.finish(9);
        assert_eq!(u32_of(&bytes).unwrap() as usize, bytes.len());
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(u32_of(&bytes[8..]), Some(9));
        let attrs: Vec<_> = Attrs(&bytes[NLMSG_HEADER + 16..]).collect();
        assert_eq!(attrs.len(), 3);
        assert_eq!(attrs[0], (IFLA_IFNAME, &b"eth0\0"[..]));
        assert_eq!(u32_of(attrs[1].1), Some(1400));
        assert_eq!(attrs[2].0, TCA_OPTIONS, "the nested flag is not part of the type");
        assert_eq!(Attrs(attrs[2].1).collect::<Vec<_>>(), vec![(TCA_KIND, &[1u8, 2, 3][..])]);
        // A truncated attribute ends the walk instead of reading past the message.
        assert_eq!(Attrs(&[8, 0, 1, 0, 1]).count(), 0);
        assert_eq!(Attrs(&[2, 0]).count(), 0);
    }

    /// Runs `f` on a thread of its own in a new network namespace (root only).
    fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        std::thread::spawn(move || {
            // SAFETY: unshare takes no pointers; it changes this thread's namespace only.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!("SKIP: a new network namespace needs root (CAP_SYS_ADMIN)");
                return None;
            }
            Some(f())
        })
        .join()
        .expect("the namespace thread")
    }

    fn tc(args: &str) -> String {
        let out = std::process::Command::new("sh").args(["-c", &format!("tc {args}")]).output().expect("tc runs");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// The requests against the running kernel, with iproute2 as the witness of what they did.
    #[test]
    fn links_addresses_routes_and_redirects_in_a_real_namespace() {
        let Some(()) = in_new_netns(|| {
            let mut nl = Netlink::open().unwrap();
            let _a = crate::tap::open("hulltest0").unwrap();
            let _b = crate::tap::open("hulltest1").unwrap();
            let links = nl.links().unwrap();
            let lo = links.iter().find(|l| l.name == "lo").unwrap();
            assert!(lo.loopback);
            let a = links.iter().find(|l| l.name == "hulltest0").unwrap().clone();
            let b = links.iter().find(|l| l.name == "hulltest1").unwrap().clone();
            assert!(!a.loopback);
            assert_eq!(a.mac.len(), 6, "a tap is an Ethernet device");
            assert_eq!(a.mtu, 1500);
            assert!(!a.up, "a new tap is down");

            nl.set_link(a.index, &LinkChange { mtu: Some(1400), up: Some(true), ..Default::default() }).unwrap();
            let a2 = nl.links().unwrap().into_iter().find(|l| l.index == a.index).unwrap();
            assert_eq!(a2.mtu, 1400);
            assert!(a2.up);
            nl.set_link(b.index, &LinkChange { name: Some("renamed0"), mac: Some(&[2, 0, 0, 0, 0, 0x42]), ..Default::default() }).unwrap();
            assert!(nl.links().unwrap().iter().any(|l| l.index == b.index && l.name == "renamed0" && l.mac == [2, 0, 0, 0, 0, 0x42]), "renamed, with the new MAC");

            nl.add_address(a.index, "198.18.0.5".parse().unwrap(), 24).unwrap();
            nl.add_address(a.index, "198.18.0.5".parse().unwrap(), 24).unwrap();
            nl.add_address(a.index, "fd00::5".parse().unwrap(), 64).unwrap();
            let addrs: Vec<_> = nl.addresses().unwrap().into_iter().filter(|x| x.index == a.index).collect();
            assert!(addrs.contains(&Address { index: a.index, ip: "198.18.0.5".parse().unwrap(), prefix_len: 24 }), "{addrs:?}");
            assert!(addrs.contains(&Address { index: a.index, ip: "fd00::5".parse().unwrap(), prefix_len: 64 }), "{addrs:?}");

            let gw: IpAddr = "198.18.0.1".parse().unwrap();
            nl.add_route(&NewRoute { destination: "10.1.0.0".parse().unwrap(), destination_len: 16, oif: a.index, gateway: Some(gw), source: None, scope: 0 }).unwrap();
            nl.add_route(&NewRoute { destination: "0.0.0.0".parse().unwrap(), destination_len: 0, oif: a.index, gateway: Some(gw), source: None, scope: 0 }).unwrap();
            let routes = nl.routes(false).unwrap();
            let r = routes.iter().find(|r| r.destination_len == 16).expect("the route to 10.1.0.0/16");
            assert_eq!((r.destination, r.gateway, r.oif, r.table, r.kind), (Some("10.1.0.0".parse().unwrap()), Some(gw), Some(a.index), MAIN_TABLE, UNICAST));
            assert!(routes.iter().any(|r| r.destination_len == 0 && r.destination.is_none() && r.gateway == Some(gw)), "the default route: {routes:?}");
            assert!(routes.iter().any(|r| r.protocol == PROTOCOL_KERNEL && r.destination_len == 24), "the address's own route: {routes:?}");

            nl.add_ingress_qdisc(a.index).unwrap();
            let e = nl.add_ingress_qdisc(a.index).unwrap_err();
            assert_eq!(e.refused_with(), Some(libc::EEXIST), "{e}");
            nl.add_redirect(a.index, b.index).unwrap();
            let shown = tc("filter show dev hulltest0 ingress");
            assert!(shown.contains("u32") && shown.contains("mirred") && shown.contains("Redirect to device renamed0"), "{shown}");
            nl.delete_ingress_qdisc(a.index).unwrap();
            assert!(!tc("qdisc show dev hulltest0").contains("ingress"));
            assert!(nl.delete_ingress_qdisc(a.index).is_err(), "nothing left to remove");

            nl.delete_link(b.index).unwrap();
            assert!(!nl.links().unwrap().iter().any(|l| l.index == b.index));
        }) else {
            return;
        };
    }
}
