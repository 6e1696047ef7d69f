//! What the UDP pushers share: resolving `host:port` at push time, one connected UDP socket kept
//! between pushes, and packing lines into datagrams.
//!
//! The socket is *connected*, and kept: then the ICMP "port unreachable" of a receiver that is
//! down is left on the socket as a pending `ECONNREFUSED`, which the next send, or the check at
//! the start of the next push ([`Udp::refusal`]), reports. So a push into a closed port counts
//! as failed — one push late, as UDP cannot tell sooner — instead of vanishing; statsd's deltas
//! are committed only once the next push found no refusal ([`super::statsd`]). The address is
//! resolved again at every push, so a receiver that moves (DNS) is followed; the socket is re-made
//! when the address changes or after an error other than a refusal.

use std::net::SocketAddr;

use tokio::net::UdpSocket;

/// The largest datagram a pusher sends: statsd's figure for an intranet (Ethernet MTU 1500 minus
/// IP and UDP headers, with room for options), also used for InfluxDB's UDP listener.
pub const MAX_DATAGRAM: usize = 1432;

/// The first address `host:port` resolves to (getaddrinfo on tokio's blocking pool; the caller
/// bounds the whole push with its timeout).
pub async fn resolve(address: &str) -> Result<SocketAddr, String> {
    let mut addrs =
        tokio::net::lookup_host(address).await.map_err(|e| format!("cannot resolve {address}: {e}"))?;
    addrs.next().ok_or_else(|| format!("cannot resolve {address}: no address"))
}

/// A connected UDP socket to the pusher's receiver, kept between pushes.
#[derive(Default)]
pub struct Udp {
    sock: Option<(SocketAddr, UdpSocket)>,
}

impl Udp {
    /// Resolves `address` and makes sure the socket is connected to it.
    pub async fn connect(&mut self, address: &str) -> Result<(), String> {
        let to = resolve(address).await?;
        if self.sock.as_ref().is_some_and(|(at, _)| *at == to) {
            return Ok(());
        }
        let bind: SocketAddr = if to.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
        let sock = UdpSocket::bind(bind).await.map_err(|e| format!("UDP socket: {e}"))?;
        sock.connect(to).await.map_err(|e| format!("UDP connect to {to}: {e}"))?;
        self.sock = Some((to, sock));
        Ok(())
    }

    /// Whether the receiver refused datagrams since the last send (an ICMP error pending on the
    /// socket, taken by this call): the message to count and log.
    pub fn refusal(&self) -> Option<String> {
        let (to, sock) = self.sock.as_ref()?;
        let e = sock.take_error().ok().flatten()?;
        Some(format!("{to} refused the datagrams of the last push: {e}"))
    }

    /// Sends one datagram; after an error other than a refusal the socket is re-made at the next
    /// push.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        let Some((to, sock)) = &self.sock else { return Err("UDP socket not connected".into()) };
        match sock.send(bytes).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let msg = format!("sending to {to}: {e}");
                if e.kind() != std::io::ErrorKind::ConnectionRefused {
                    self.sock = None;
                }
                Err(msg)
            }
        }
    }
}

/// A datagram's bytes and the tags of its lines.
pub type Datagram<T> = (Vec<u8>, Vec<T>);

/// Packs lines into datagrams of at most `max` bytes, `\n` between lines, in order; each
/// datagram comes with the tags of its lines. A line longer than `max` on its own is left out
/// (returned in the second list): a receiver would get it truncated or not at all.
pub fn pack<T>(lines: Vec<(String, T)>, max: usize) -> (Vec<Datagram<T>>, Vec<String>) {
    let mut out: Vec<Datagram<T>> = Vec::new();
    let mut too_long = Vec::new();
    let mut cur: Vec<u8> = Vec::new();
    let mut tags = Vec::new();
    for (line, tag) in lines {
        if line.len() > max {
            too_long.push(line);
            continue;
        }
        let need = if cur.is_empty() { line.len() } else { cur.len() + 1 + line.len() };
        if need > max {
            out.push((std::mem::take(&mut cur), std::mem::take(&mut tags)));
        }
        if !cur.is_empty() {
            cur.push(b'\n');
        }
        cur.extend_from_slice(line.as_bytes());
        tags.push(tag);
    }
    if !cur.is_empty() {
        out.push((cur, tags));
    }
    (out, too_long)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_in_order_within_the_limit() {
        let lines: Vec<(String, usize)> = (0..5).map(|i| (format!("l{i}:{}", "x".repeat(3)), i)).collect();
        // Each line is 6 bytes: two fit in 13 (6 + 1 + 6), a third would not.
        let (grams, long) = pack(lines, 13);
        let got: Vec<(String, Vec<usize>)> =
            grams.into_iter().map(|(b, t)| (String::from_utf8(b).expect("utf-8"), t)).collect();
        assert_eq!(
            got,
            vec![
                ("l0:xxx\nl1:xxx".to_string(), vec![0, 1]),
                ("l2:xxx\nl3:xxx".to_string(), vec![2, 3]),
                ("l4:xxx".to_string(), vec![4]),
            ]
        );
        assert!(long.is_empty());
        let (grams, long) = pack(vec![("a".repeat(20), ()), ("b".into(), ())], 13);
        assert_eq!((grams.len(), long.len()), (1, 1));
    }
}
