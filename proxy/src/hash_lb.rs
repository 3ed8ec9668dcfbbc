//! Consistent hashing for stickiness: a request's key (a header, a cookie, the client's
//! address) hashed onto a cluster's endpoints by a ring (Envoy's ketama-style `RING_HASH`) or a
//! Maglev table (`MAGLEV`), so that a key keeps its endpoint while the endpoints change, and an
//! endpoint that leaves moves only its own keys (ring) or about them (Maglev).
//!
//! Hashes are xxHash64, as Envoy's: every proxy — whatever its build — places the same
//! endpoints and keys alike, so all callers send a key to the same endpoint. Tables are built
//! with the snapshot and read-only afterwards; they hold endpoint indexes (into the cluster's
//! healthy endpoints), so this module knows nothing of endpoints.

use std::net::SocketAddr;

use http::{HeaderMap, HeaderName, header};
use xxhash_rust::xxh64::xxh64;

/// A RING_HASH or MAGLEV cluster's key and table.
#[derive(Debug)]
pub struct Hashing {
    pub key: HashKey,
    pub table: HashTable,
}

/// What a request is hashed by. A request without it is balanced at random.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// A request header's (first) value.
    Header(HeaderName),
    /// A cookie's value.
    Cookie(Box<str>),
    /// The client connection's IP address.
    SourceIp,
}

impl HashKey {
    /// The request's key hash, if it has the key.
    pub fn hash(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Option<u64> {
        match self {
            Self::Header(name) => headers.get(name).map(|v| xxh64(v.as_bytes(), 0)),
            Self::Cookie(name) => cookie(headers, name).map(|v| xxh64(v.as_bytes(), 0)),
            Self::SourceIp => peer.map(|p| match p.ip() {
                std::net::IpAddr::V4(ip) => xxh64(&ip.octets(), 0),
                std::net::IpAddr::V6(ip) => xxh64(&ip.octets(), 0),
            }),
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers (RFC 6265 §4.2: `a=b; c=d`).
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"'))
        })
}

/// Where keys go: built over the endpoints' addresses.
#[derive(Debug)]
pub enum HashTable {
    /// Points on a ring of u64, sorted: a key goes to the first point at or after its hash.
    Ring(Box<[(u64, u32)]>),
    /// Maglev's lookup table ([`MAGLEV_SIZE`] slots): a key goes to `table[hash % size]`.
    Maglev(Box<[u16]>),
}

/// Points per endpoint on a ring of up to [`RING_POINTS_BUDGET`] / this many endpoints. Fixed,
/// not a ring size shared out (as Envoy's minimum ring size is): then an endpoint leaving
/// takes away its own points and nothing else moves.
const RING_POINTS: usize = 256;
/// Beyond 256 endpoints, the points per endpoint are this shared out, rounded down to a power
/// of two (at least 16): they change only when the endpoints cross a power of two.
const RING_POINTS_BUDGET: usize = 65_536;
const MIN_RING_POINTS: usize = 16;
/// Maglev's table size: a prime, fixed (a size chosen by the endpoints' number would move
/// every key when it changes), Envoy's default. Its balance holds while the endpoints are far
/// fewer (up to a few hundred); 128 KiB per MAGLEV cluster.
pub const MAGLEV_SIZE: usize = 65_537;
/// Endpoints a Maglev table can hold (u16 slots); a cluster with more is placed on a ring.
pub const MAGLEV_MAX_ENDPOINTS: usize = 65_535;
/// Candidates tried when the first ones are out (ejected, failing a health check, or tried
/// already by this request): then the request is balanced as without a key.
pub const MAX_CANDIDATES: usize = 64;

impl HashTable {
    /// A ring over `addrs` (the endpoints, by index): each endpoint's points at the hashes of
    /// `ADDR_0`, `ADDR_1`, … as Envoy's.
    pub fn ring<'a>(addrs: impl ExactSizeIterator<Item = &'a str>) -> Self {
        let n = addrs.len();
        if n == 0 {
            return Self::Ring(Box::new([]));
        }
        let per = ring_points(n);
        let mut points = Vec::with_capacity(per * n);
        let mut name = String::new();
        for (i, addr) in addrs.enumerate() {
            for p in 0..per {
                name.clear();
                name.push_str(addr);
                name.push('_');
                name.push_str(itoa::Buffer::new().format(p));
                points.push((xxh64(name.as_bytes(), 0), index(i)));
            }
        }
        // By hash (two points on one hash: in practice never).
        points.sort_unstable();
        Self::Ring(points.into())
    }

    /// Maglev's table over `addrs` (Eisenbud et al., 2016): each endpoint's permutation of the
    /// slots from its address's two hashes; endpoints take turns claiming their next free slot,
    /// in address order (the same table at every proxy, whatever order they listed them in).
    pub fn maglev<'a>(addrs: impl ExactSizeIterator<Item = &'a str>) -> Self {
        let addrs: Vec<&str> = addrs.collect();
        let n = addrs.len();
        if n == 0 {
            return Self::Maglev(Box::new([]));
        }
        if n > MAGLEV_MAX_ENDPOINTS {
            return Self::ring(addrs.into_iter());
        }
        let size = MAGLEV_SIZE;
        let m = size as u64;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| addrs[i]);
        let perms: Vec<(u64, u64)> = order
            .iter()
            .map(|&i| {
                let a = addrs[i].as_bytes();
                (xxh64(a, 0) % m, xxh64(a, 1) % (m - 1) + 1)
            })
            .collect();
        const EMPTY: u16 = u16::MAX;
        let mut table = vec![EMPTY; size];
        let mut next = vec![0u64; n];
        let mut filled = 0;
        'fill: loop {
            for (k, &(offset, skip)) in perms.iter().enumerate() {
                let slot = loop {
                    // In range: the table is at most 65,537 slots, `next` below that.
                    #[allow(clippy::cast_possible_truncation)]
                    let c = ((offset + next[k] * skip) % m) as usize;
                    next[k] += 1;
                    if table[c] == EMPTY {
                        break c;
                    }
                };
                // At most 65,535 endpoints: below u16::MAX.
                #[allow(clippy::cast_possible_truncation)]
                let i = order[k] as u16;
                table[slot] = i;
                filled += 1;
                if filled == size {
                    break 'fill;
                }
            }
        }
        Self::Maglev(table.into())
    }

    /// The endpoints for `key`, best first: the ring's next points, or Maglev's slots for the
    /// key rehashed; at most [`MAX_CANDIDATES`] (an endpoint may come more than once).
    pub fn candidates(&self, key: u64) -> impl Iterator<Item = usize> + '_ {
        let (ring, table): (&[(u64, u32)], &[u16]) = match self {
            Self::Ring(points) => (points, &[]),
            Self::Maglev(table) => (&[], table),
        };
        let start = ring.partition_point(|(h, _)| *h < key);
        (0..MAX_CANDIDATES).map_while(move |j| {
            if !ring.is_empty() {
                return ring.get((start + j) % ring.len()).map(|(_, i)| *i as usize);
            }
            let h = if j == 0 { key } else { mix(key ^ j as u64) };
            // `h % len` is below the table's length.
            #[allow(clippy::cast_possible_truncation)]
            table
                .get((h % table.len().max(1) as u64) as usize)
                .map(|i| *i as usize)
        })
    }
}

/// Points per endpoint on a ring of `n` endpoints.
fn ring_points(n: usize) -> usize {
    if n <= RING_POINTS_BUDGET / RING_POINTS {
        return RING_POINTS;
    }
    let share = RING_POINTS_BUDGET / n;
    // The largest power of two at most `share`.
    (1usize << share.max(1).ilog2()).max(MIN_RING_POINTS)
}

fn index(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

/// A 64-bit finalizer (splitmix64's): a key's next Maglev slot, spread over the table.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:8080", i + 1)).collect()
    }

    fn build(kind: &str, addrs: &[String]) -> HashTable {
        let it = addrs.iter().map(String::as_str);
        match kind {
            "ring" => HashTable::ring(it),
            _ => HashTable::maglev(it),
        }
    }

    /// Where each of `keys` keys goes, by endpoint address.
    fn placement(table: &HashTable, addrs: &[String], keys: u64) -> Vec<String> {
        (0..keys)
            .map(|k| {
                let i = table.candidates(xxh64(&k.to_le_bytes(), 0)).next().unwrap();
                addrs[i].clone()
            })
            .collect()
    }

    /// An endpoint leaving moves its own keys and, on the ring, no other (Maglev: almost no
    /// other); each of N endpoints holds about 1/N of the keys; an endpoint joining takes
    /// about 1/(N+1) and leaves the rest where they were.
    #[test]
    fn an_endpoint_leaving_moves_about_one_nth_of_the_keys() {
        const KEYS: u64 = 20_000;
        for kind in ["ring", "maglev"] {
            let five = addrs(5);
            let before = placement(&build(kind, &five), &five, KEYS);
            for a in &five {
                let share = before.iter().filter(|p| *p == a).count() as f64 / KEYS as f64;
                assert!((0.12..=0.28).contains(&share), "{kind}: {a} holds {share}");
            }
            let four: Vec<String> = five[..2].iter().chain(&five[3..]).cloned().collect();
            let after = placement(&build(kind, &four), &four, KEYS);
            let gone = &five[2];
            let moved_others = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| b != a && *b != gone)
                .count();
            let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
            let limit = match kind {
                "ring" => 0,
                _ => KEYS as usize / 100,
            };
            assert!(
                moved_others <= limit,
                "{kind}: {moved_others} keys of the others moved"
            );
            assert!(
                moved as f64 <= KEYS as f64 * (1.0 / 5.0 + 0.05),
                "{kind}: {moved} of {KEYS} moved"
            );
            // One joins: it takes about a sixth, from the others.
            let six = addrs(6);
            let joined = placement(&build(kind, &six), &six, KEYS);
            let moved = before.iter().zip(&joined).filter(|(b, a)| b != a).count();
            let taken = joined.iter().filter(|p| *p == &six[5]).count();
            assert!(
                moved <= taken + KEYS as usize / 100,
                "{kind}: {moved} moved, {taken} to the new one"
            );
        }
    }

    /// The same endpoints listed in another order: the same placement.
    #[test]
    fn placement_does_not_depend_on_the_order_endpoints_are_listed() {
        for kind in ["ring", "maglev"] {
            let a = addrs(7);
            let mut b = a.clone();
            b.reverse();
            assert_eq!(
                placement(&build(kind, &a), &a, 2000),
                placement(&build(kind, &b), &b, 2000),
                "{kind}"
            );
        }
    }

    #[test]
    fn ring_points_per_endpoint_change_only_at_powers_of_two() {
        assert_eq!(ring_points(1), 256);
        assert_eq!(ring_points(256), 256);
        assert_eq!(ring_points(257), 128);
        assert_eq!(ring_points(512), 128);
        assert_eq!(ring_points(513), 64);
        assert_eq!(ring_points(100_000), 16);
    }

    #[test]
    fn candidates_go_on_past_the_first() {
        for kind in ["ring", "maglev"] {
            let a = addrs(3);
            let t = build(kind, &a);
            let distinct: std::collections::HashSet<usize> = t.candidates(42).collect();
            assert_eq!(distinct.len(), 3, "{kind}: every endpoint reachable");
            assert_eq!(t.candidates(42).count(), MAX_CANDIDATES);
        }
        assert_eq!(HashTable::ring([].into_iter()).candidates(1).count(), 0);
    }

    #[test]
    fn keys_from_headers_cookies_and_the_source() {
        let mut h = HeaderMap::new();
        h.insert("x-user", "alice".parse().unwrap());
        h.append(header::COOKIE, "a=1; session=\"s-42\"".parse().unwrap());
        h.append(header::COOKIE, "b=2".parse().unwrap());
        let user = HashKey::Header(HeaderName::from_static("x-user"));
        assert_eq!(user.hash(&h, None), Some(xxh64(b"alice", 0)));
        let session = HashKey::Cookie("session".into());
        assert_eq!(session.hash(&h, None), Some(xxh64(b"s-42", 0)));
        assert_eq!(
            HashKey::Cookie("b".into()).hash(&h, None),
            Some(xxh64(b"2", 0))
        );
        assert_eq!(HashKey::Cookie("none".into()).hash(&h, None), None);
        assert_eq!(
            HashKey::Header(HeaderName::from_static("x-none")).hash(&h, None),
            None
        );
        let peer = "192.0.2.7:5555".parse().ok();
        let other_port = "192.0.2.7:6666".parse().ok();
        assert_eq!(
            HashKey::SourceIp.hash(&h, peer),
            HashKey::SourceIp.hash(&h, other_port),
            "the address, not the port"
        );
        assert_eq!(HashKey::SourceIp.hash(&h, None), None);
    }
}
