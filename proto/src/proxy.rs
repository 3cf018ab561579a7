//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a load
//! balancer puts in front of a connection to say which client it carries.
//!
//! A listener that expects it requires it: a connection that does not start
//! with a valid header is closed without a response (the protocol's rule),
//! so a client that reaches the server directly cannot pose as another.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The version 2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 line, CRLF included.
const V1_MAX: usize = 107;
/// Version 2 headers longer than this (addresses plus TLVs) are refused.
const V2_MAX_PAYLOAD: usize = 512;

/// What the bytes at the start of a connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// Not all of the header is here yet.
    Incomplete,
    /// A header of `len` bytes. `source` is the client it carries; `None`
    /// for a connection the proxy made itself (LOCAL, UNKNOWN, or a family
    /// without addresses), which keeps its own peer address.
    Complete { len: usize, source: Option<SocketAddr> },
    /// Not a valid header: close the connection.
    Invalid(&'static str),
}

/// Reads a PROXY header, version 1 or 2, at the start of `buf`.
pub fn parse(buf: &[u8]) -> Header {
    if buf.starts_with(b"PROXY ") {
        return v1(buf);
    }
    if buf.starts_with(V2_SIGNATURE) {
        return v2(buf);
    }
    let n = buf.len();
    if b"PROXY ".starts_with(buf) || V2_SIGNATURE.starts_with(&buf[..n.min(12)]) && n < 12 {
        return Header::Incomplete;
    }
    Header::Invalid("the connection does not start with a PROXY header")
}

fn v1(buf: &[u8]) -> Header {
    let Some(end) = buf.iter().take(V1_MAX).position(|&c| c == b'\n') else {
        return if buf.len() < V1_MAX {
            Header::Incomplete
        } else {
            Header::Invalid("PROXY v1 line too long")
        };
    };
    let Some(line) = buf[..end].strip_suffix(b"\r") else {
        return Header::Invalid("PROXY v1 line not ended by CRLF");
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return Header::Invalid("PROXY v1 line is not text");
    };
    let fields: Vec<&str> = line.split(' ').collect();
    let source = match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => None,
        ["PROXY", family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let v4 = *family == "TCP4";
            let ip = |s: &str| match s.parse::<IpAddr>() {
                Ok(ip @ IpAddr::V4(_)) if v4 => Some(ip),
                Ok(ip @ IpAddr::V6(_)) if !v4 => Some(ip),
                _ => None,
            };
            let port = |s: &str| {
                (!s.is_empty() && s.len() <= 5 && s.bytes().all(|c| c.is_ascii_digit()))
                    .then(|| s.parse::<u16>().ok())
                    .flatten()
            };
            match (ip(src), ip(dst), port(sport), port(dport)) {
                (Some(src), Some(_), Some(sport), Some(_)) => Some(SocketAddr::new(src, sport)),
                _ => return Header::Invalid("malformed PROXY v1 addresses"),
            }
        }
        _ => return Header::Invalid("malformed PROXY v1 line"),
    };
    Header::Complete { len: end + 1, source }
}

fn v2(buf: &[u8]) -> Header {
    if buf.len() < 16 {
        return Header::Incomplete;
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 || command > 1 {
        return Header::Invalid("unsupported PROXY v2 version or command");
    }
    let payload = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if payload > V2_MAX_PAYLOAD {
        return Header::Invalid("PROXY v2 header too long");
    }
    let len = 16 + payload;
    let Some(addresses) = buf.get(16..len) else {
        return Header::Incomplete;
    };
    let local = command == 0;
    let source = match buf[13] >> 4 {
        _ if local => None,
        // AF_INET: source and destination addresses, then ports.
        1 if addresses.len() >= 12 => {
            let ip = Ipv4Addr::new(addresses[0], addresses[1], addresses[2], addresses[3]);
            Some(SocketAddr::new(ip.into(), u16::from_be_bytes([addresses[8], addresses[9]])))
        }
        2 if addresses.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&addresses[..16]);
            Some(SocketAddr::new(
                Ipv6Addr::from(octets).into(),
                u16::from_be_bytes([addresses[32], addresses[33]]),
            ))
        }
        1 | 2 => return Header::Invalid("PROXY v2 addresses too short"),
        // AF_UNSPEC or AF_UNIX: no client address to carry.
        0 | 3 => None,
        _ => return Header::Invalid("unknown PROXY v2 address family"),
    };
    Header::Complete { len, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn version_1() {
        let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET /";
        assert_eq!(parse(line), Header::Complete { len: 47, source: addr("192.168.0.1:56324") });
        let line = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n";
        assert_eq!(parse(line), Header::Complete { len: line.len(), source: addr("[2001:db8::1]:4000") });
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Header::Complete { len: 15, source: None });
        for cut in 0..47 {
            assert_eq!(
                parse(&b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"[..cut]),
                Header::Incomplete,
                "{cut}"
            );
        }
    }

    #[test]
    fn version_1_refusals() {
        // gunicorn's corpus: invalid/pp_01..03.
        for bad in [
            &b"PROXY TCP4 192.168.0.1 192.16...\r\n"[..],
            b"PROXY TCP4 192.168.0.1 192.168.0.11 65iii 100000\r\n",
            b"PROXY TCP4 not-an-ip 192.168.0.11 56324 443\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.5 1 2\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.5 +1 2\r\n",
        ] {
            assert!(matches!(parse(bad), Header::Invalid(_)), "{}", String::from_utf8_lossy(bad));
        }
        assert!(matches!(parse(&[b'P'; 200]), Header::Invalid(_)));
        assert!(matches!(parse(&[&b"PROXY "[..], &[b'a'; 200]].concat()), Header::Invalid(_)));
    }

    #[test]
    fn version_2() {
        // gunicorn's corpus: valid/pp_04 (IPv4) and valid/pp_05 (IPv6).
        let mut v4 = V2_SIGNATURE.to_vec();
        v4.extend_from_slice(&[0x21, 0x11, 0, 12, 192, 168, 1, 10, 192, 168, 1, 1, 0x30, 0x39, 0x01, 0xbb]);
        assert_eq!(parse(&v4), Header::Complete { len: 28, source: addr("192.168.1.10:12345") });
        for cut in 0..v4.len() {
            assert_eq!(parse(&v4[..cut]), Header::Incomplete, "{cut}");
        }
        let mut v6 = V2_SIGNATURE.to_vec();
        v6.extend_from_slice(&[0x21, 0x21, 0, 36]);
        v6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0xd4, 0x31, 0x00, 0x50]);
        assert_eq!(parse(&v6), Header::Complete { len: 52, source: addr("[2001:db8::1]:54321") });
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Header::Complete { len: 16, source: None });
        let mut bad = v4.clone();
        bad[12] = 0x31;
        assert!(matches!(parse(&bad), Header::Invalid(_)), "version 3");
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(matches!(parse(&short), Header::Invalid(_)));
    }

    #[test]
    fn no_header_is_refused() {
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n"), Header::Invalid(_)));
        assert_eq!(parse(b""), Header::Incomplete);
        assert_eq!(parse(b"PRO"), Header::Incomplete);
        assert_eq!(parse(b"\r\n\r\n\0"), Header::Incomplete);
    }
}
