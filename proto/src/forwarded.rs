//! Which peers may say who the client is (`--forwarded-allow-ips`), and who
//! a trusted peer says it is: the client address and scheme carried by
//! `Forwarded` (RFC 7239) or by `X-Forwarded-For` and `X-Forwarded-Proto`.
//! Pure: the list, the peer and the header fields in, the answer out.
//!
//! The rule is gunicorn's trust rule with the walk proxies need when they
//! are chained: the fields count only when the connection's own peer is
//! trusted; their hops are then read from the nearest (rightmost) back,
//! past every hop that is itself trusted, and the first hop that is not is
//! the client. Whatever sits left of it was written by the client and is
//! never believed. A hop that is not an address (`unknown`, an obfuscated
//! name, garbage) ends the walk at the last trusted hop.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// The peers whose forwarding fields are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    /// `*`: every peer.
    any: bool,
    /// `unix`: peers on unix-socket listeners (only local processes with
    /// the socket file's permissions reach them).
    unix: bool,
    nets: Vec<IpNet>,
}

/// A list item that is neither an address, a network, `*` nor `unix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadItem(pub String);

impl fmt::Display for BadItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not an IP address, a network (10.0.0.0/8), \"unix\" or \"*\"", self.0)
    }
}

impl std::error::Error for BadItem {}

/// The scheme the client used to reach the first proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scheme {
    #[default]
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    fn parse(s: &str) -> Option<Scheme> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("http") {
            Some(Scheme::Http)
        } else if s.eq_ignore_ascii_case("https") {
            Some(Scheme::Https)
        } else {
            None
        }
    }
}

/// Who sent a request, as far as the trusted proxies say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// `ip:port` (`[v6]:port`); port 0 when the proxy did not say. The
    /// connection's peer when nothing trusted said otherwise.
    pub client: String,
    pub scheme: Scheme,
}

/// One hop named by a forwarding field: its node, and for `Forwarded`
/// the protocol the request arrived over at that hop.
struct Hop<'a> {
    node: Option<SocketAddr>,
    proto: Option<&'a str>,
}

impl TrustedProxies {
    /// What `--forwarded-allow-ips` trusts unless told otherwise: this host
    /// and unix-socket peers, as a proxy on the same machine is the usual
    /// case (gunicorn trusts the same).
    pub const DEFAULT: &'static str = "127.0.0.1,::1,unix";

    /// Trusts no peer.
    pub const fn none() -> TrustedProxies {
        TrustedProxies { any: false, unix: false, nets: Vec::new() }
    }

    /// A comma-separated list of IP addresses, networks (`10.0.0.0/8`),
    /// `unix` and `*`. Empty (or `none`) trusts no peer.
    pub fn parse(list: &str) -> Result<TrustedProxies, BadItem> {
        let mut trusted = TrustedProxies::none();
        for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item {
                "*" => trusted.any = true,
                "unix" => trusted.unix = true,
                "none" => {}
                _ => {
                    let net = item
                        .parse::<IpNet>()
                        .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                        .map_err(|_| BadItem(item.to_owned()))?;
                    trusted.nets.push(net);
                }
            }
        }
        Ok(trusted)
    }

    /// The list as [`TrustedProxies::parse`] reads it (`none` when empty).
    pub fn to_list(&self) -> String {
        let mut items: Vec<String> = Vec::new();
        if self.any {
            items.push("*".into());
        }
        if self.unix {
            items.push("unix".into());
        }
        items.extend(self.nets.iter().map(|n| match n.prefix_len() == n.max_prefix_len() {
            true => n.addr().to_string(),
            false => n.to_string(),
        }));
        if items.is_empty() {
            "none".into()
        } else {
            items.join(",")
        }
    }

    pub fn is_none(&self) -> bool {
        *self == TrustedProxies::none()
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        // An IPv4 client on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.any || self.nets.iter().any(|n| n.contains(&ip))
    }

    /// Whether the connection's peer (`ip:port`, or `unix`) is trusted.
    fn trusts_peer(&self, peer: &str) -> bool {
        if peer == "unix" {
            return self.unix || self.any;
        }
        peer.parse::<SocketAddr>().is_ok_and(|a| self.trusts(a.ip()))
    }

    /// Who sent a request that arrived from `peer` with `headers`.
    pub fn resolve<N: AsRef<str>, V: AsRef<[u8]>>(&self, peer: &str, headers: &[(N, V)]) -> Origin {
        let unchanged = Origin { client: peer.to_owned(), scheme: Scheme::Http };
        if self.is_none() || !self.trusts_peer(peer) {
            return unchanged;
        }
        let values = |name: &'static str| field_values(headers, name);
        // The standard field, when a proxy sends it, is the whole story.
        let forwarded: Vec<Hop<'_>> = values("forwarded").flat_map(forwarded_hops).collect();
        if !forwarded.is_empty() {
            return match self.walk(&forwarded) {
                Some(i) => Origin {
                    client: client_text(forwarded[i].node),
                    scheme: forwarded[i].proto.and_then(Scheme::parse).unwrap_or_default(),
                },
                None => unchanged,
            };
        }
        let hops: Vec<Hop<'_>> = values("x-forwarded-for")
            .flat_map(|v| v.split(','))
            .map(|node| Hop { node: parse_node(node), proto: None })
            .collect();
        let protos: Vec<&str> = values("x-forwarded-proto").flat_map(|v| v.split(',')).collect();
        let client = self.walk(&hops);
        // A proto per hop lines up with the addresses; otherwise the
        // nearest proxy's word (the rightmost) is the one to believe.
        let proto = match client {
            Some(i) if protos.len() == hops.len() => protos.get(i),
            _ => protos.last(),
        };
        Origin {
            client: client.map_or(unchanged.client, |i| client_text(hops[i].node)),
            scheme: proto.and_then(|p| Scheme::parse(p)).unwrap_or_default(),
        }
    }

    /// The index of the hop that is the client, walking from the nearest.
    fn walk(&self, hops: &[Hop<'_>]) -> Option<usize> {
        let mut last_trusted = None;
        for (i, hop) in hops.iter().enumerate().rev() {
            match hop.node {
                Some(addr) if self.trusts(addr.ip()) => last_trusted = Some(i),
                Some(_) => return Some(i),
                None => return last_trusted,
            }
        }
        last_trusted
    }
}

/// The values of every field called `name`, in order (those not UTF-8 left out).
fn field_values<'h, N: AsRef<str>, V: AsRef<[u8]>>(
    headers: &'h [(N, V)],
    name: &'static str,
) -> impl Iterator<Item = &'h str> {
    headers
        .iter()
        .filter(move |(n, _)| n.as_ref().eq_ignore_ascii_case(name))
        .filter_map(|(_, v)| std::str::from_utf8(v.as_ref()).ok())
}

fn client_text(node: Option<SocketAddr>) -> String {
    node.map_or_else(String::new, |a| a.to_string())
}

/// A node as the fields write it: `192.0.2.1`, `192.0.2.1:80`, `2001:db8::1`
/// or `[2001:db8::1]:80`. A missing port is 0.
fn parse_node(node: &str) -> Option<SocketAddr> {
    let node = node.trim();
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(addr);
    }
    let bare = node.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(node);
    bare.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0))
}

/// The hops of one `Forwarded` field value: elements split at commas, each
/// a `;`-separated list of `key=value` pairs, values maybe quoted.
fn forwarded_hops(value: &str) -> impl Iterator<Item = Hop<'_>> {
    split_outside_quotes(value, ',').map(|element| {
        let mut hop = Hop { node: None, proto: None };
        for pair in split_outside_quotes(element, ';') {
            let Some((key, val)) = pair.split_once('=') else { continue };
            let val = val.trim();
            let val = val.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(val);
            match key.trim() {
                k if k.eq_ignore_ascii_case("for") => hop.node = parse_node(val),
                k if k.eq_ignore_ascii_case("proto") => hop.proto = Some(val),
                _ => {}
            }
        }
        hop
    })
}

/// `s` split at `sep`, except where `sep` is inside a quoted string.
fn split_outside_quotes(s: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let s = rest?;
        let mut quoted = false;
        let mut escaped = false;
        for (i, c) in s.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                c if c == sep && !quoted => {
                    rest = Some(&s[i + 1..]);
                    return Some(&s[..i]);
                }
                _ => {}
            }
        }
        rest = None;
        Some(s)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect()
    }

    fn resolve(list: &str, peer: &str, pairs: &[(&str, &str)]) -> (String, &'static str) {
        let origin = TrustedProxies::parse(list).unwrap().resolve(peer, &fields(pairs));
        (origin.client, origin.scheme.as_str())
    }

    #[test]
    fn lists_parse_and_print_back() {
        let t = TrustedProxies::parse(" 10.0.0.0/8, ::1 ,unix,192.0.2.7").unwrap();
        assert_eq!(t.to_list(), "unix,10.0.0.0/8,::1,192.0.2.7");
        assert_eq!(TrustedProxies::parse(&t.to_list()), Ok(t));
        assert!(TrustedProxies::parse("").unwrap().is_none());
        assert!(TrustedProxies::parse("none").unwrap().is_none());
        assert_eq!(TrustedProxies::parse("none").unwrap().to_list(), "none");
        assert_eq!(TrustedProxies::parse("*").unwrap().to_list(), "*");
        let e = TrustedProxies::parse("127.0.0.1,localhost").unwrap_err();
        assert_eq!(e, BadItem("localhost".into()));
        assert!(e.to_string().contains("\"localhost\""), "{e}");
        assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
    }

    #[test]
    fn an_untrusted_peer_is_never_overridden() {
        let xff = [("X-Forwarded-For", "198.51.100.9"), ("X-Forwarded-Proto", "https")];
        assert_eq!(resolve("127.0.0.1", "192.0.2.5:4000", &xff), ("192.0.2.5:4000".into(), "http"));
        assert_eq!(resolve("", "127.0.0.1:4000", &xff), ("127.0.0.1:4000".into(), "http"));
        assert_eq!(resolve("127.0.0.1", "unix", &xff), ("unix".into(), "http"));
        let fwd = [("Forwarded", "for=198.51.100.9;proto=https")];
        assert_eq!(resolve("10.0.0.0/8", "192.0.2.5:1", &fwd), ("192.0.2.5:1".into(), "http"));
    }

    #[test]
    fn a_trusted_peer_names_the_client_and_scheme() {
        let xff = [("x-forwarded-for", "198.51.100.9"), ("X-Forwarded-Proto", "HTTPS")];
        assert_eq!(resolve("127.0.0.1", "127.0.0.1:4000", &xff), ("198.51.100.9:0".into(), "https"));
        assert_eq!(resolve("unix", "unix", &xff), ("198.51.100.9:0".into(), "https"));
        assert_eq!(resolve("*", "192.0.2.5:1", &xff), ("198.51.100.9:0".into(), "https"));
        // IPv4 peers of a dual-stack listener.
        assert_eq!(resolve("127.0.0.1", "[::ffff:127.0.0.1]:9", &xff).0, "198.51.100.9:0");
        let v6 = [("X-Forwarded-For", "[2001:db8::7]:5555")];
        assert_eq!(resolve("::1", "[::1]:80", &v6), ("[2001:db8::7]:5555".into(), "http"));
        let fwd = [("Forwarded", "for=\"[2001:db8:cafe::17]:4711\";proto=https;by=203.0.113.43")];
        assert_eq!(resolve("::1", "[::1]:80", &fwd), ("[2001:db8:cafe::17]:4711".into(), "https"));
        // The scheme alone.
        let proto = [("X-Forwarded-Proto", "https")];
        assert_eq!(resolve("127.0.0.1", "127.0.0.1:4000", &proto), ("127.0.0.1:4000".into(), "https"));
        assert_eq!(resolve("127.0.0.1", "127.0.0.1:4", &[("X-Forwarded-Proto", "gopher")]).1, "http");
    }

    #[test]
    fn the_walk_stops_at_the_first_untrusted_hop_from_the_right() {
        let list = "127.0.0.1,10.0.0.0/8";
        // The client wrote the leftmost entry itself: it is not believed.
        let chain = [("X-Forwarded-For", "6.6.6.6, 198.51.100.9"), ("X-Forwarded-For", "10.1.2.3")];
        assert_eq!(resolve(list, "127.0.0.1:1", &chain).0, "198.51.100.9:0");
        // Every hop trusted: the leftmost.
        assert_eq!(resolve(list, "127.0.0.1:1", &[("X-Forwarded-For", "10.0.0.1,10.0.0.2")]).0, "10.0.0.1:0");
        // Garbage ends the walk at the last trusted hop, or leaves the peer.
        assert_eq!(resolve(list, "127.0.0.1:1", &[("X-Forwarded-For", "evil, 10.0.0.2")]).0, "10.0.0.2:0");
        assert_eq!(resolve(list, "127.0.0.1:1", &[("X-Forwarded-For", "unknown")]).0, "127.0.0.1:1");
        let fwd = [("Forwarded", "for=_hidden;proto=https, for=10.0.0.3")];
        assert_eq!(resolve(list, "127.0.0.1:1", &fwd), ("10.0.0.3:0".into(), "http"));
        // Protos that line up with the hops; the nearest one otherwise.
        let lined = [("X-Forwarded-For", "198.51.100.9, 10.0.0.2"), ("X-Forwarded-Proto", "https, http")];
        assert_eq!(resolve(list, "127.0.0.1:1", &lined), ("198.51.100.9:0".into(), "https"));
        let nearest = [("X-Forwarded-For", "198.51.100.9, 10.0.0.2"), ("X-Forwarded-Proto", "https")];
        assert_eq!(resolve(list, "127.0.0.1:1", &nearest).1, "https");
        // Forwarded is preferred over the X- fields, and commas may be quoted.
        let both =
            [("X-Forwarded-For", "192.0.2.1"), ("Forwarded", "for=198.51.100.9;x=\"a,b\", for=10.0.0.4")];
        assert_eq!(resolve(list, "127.0.0.1:1", &both).0, "198.51.100.9:0");
    }

    #[test]
    fn quoted_splitting_respects_escapes() {
        let parts: Vec<&str> = split_outside_quotes(r#"a="x\",y",b"#, ',').collect();
        assert_eq!(parts, [r#"a="x\",y""#, "b"]);
        assert_eq!(split_outside_quotes("", ',').collect::<Vec<_>>(), [""]);
    }
}
