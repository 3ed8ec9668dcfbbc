//! Local rate limiting: a route's (or a node's) requests admitted at a rate, with a burst, by a
//! token bucket kept as GCRA's "theoretical arrival time" — one atomic per bucket, no timer. A
//! key (a header's value, or the caller's verified identity) gives each value a bucket of its
//! own. Buckets live across snapshots while their settings are unchanged.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use http::{HeaderMap, HeaderName};
use parking_lot::Mutex;

use crate::activity::ActiveRequest;

/// Keys tracked at most per limiter; beyond, a new key shares the keyless bucket until idle
/// ones are forgotten.
const MAX_KEYS: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Time between two tokens.
    pub interval: Duration,
    /// Tokens the bucket holds.
    pub burst: u32,
    pub key: RateLimitKey,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateLimitKey {
    None,
    Header(HeaderName),
    PeerIdentity,
}

#[derive(Debug)]
pub struct RateLimiter {
    pub(crate) config: RateLimitConfig,
    epoch: Instant,
    /// The keyless bucket (and requests without the key).
    shared: AtomicU64,
    /// Buckets by a keyed hash of the key's value (a fixed size whatever the value's), and
    /// when idle ones were last forgotten.
    keyed: Mutex<Keyed>,
    hasher: RandomState,
}

#[derive(Debug, Default)]
struct Keyed {
    buckets: HashMap<u64, u64>,
    swept: u64,
}

impl RateLimiter {
    pub fn new(config: RateLimitConfig) -> Self {
        Self {
            config,
            epoch: Instant::now(),
            shared: AtomicU64::new(0),
            keyed: Mutex::new(Keyed::default()),
            hasher: RandomState::new(),
        }
    }

    /// Admits the request, or says how long until it would be.
    pub fn admit(
        &self,
        headers: &HeaderMap,
        active: Option<&ActiveRequest>,
    ) -> Result<(), Duration> {
        self.admit_at(headers, active, Instant::now())
    }

    fn admit_at(
        &self,
        headers: &HeaderMap,
        active: Option<&ActiveRequest>,
        now: Instant,
    ) -> Result<(), Duration> {
        let now = nanos(now.saturating_duration_since(self.epoch));
        let key: Option<&[u8]> = match &self.config.key {
            RateLimitKey::None => None,
            RateLimitKey::Header(name) => headers.get(name).map(http::HeaderValue::as_bytes),
            RateLimitKey::PeerIdentity => active
                .and_then(ActiveRequest::identity)
                .map(|id| id.as_bytes()),
        };
        match key {
            None => self.admit_shared(now),
            Some(key) => self.admit_keyed(key, now),
        }
    }

    /// GCRA on the keyless bucket: lock-free.
    fn admit_shared(&self, now: u64) -> Result<(), Duration> {
        let mut tat = self.shared.load(Ordering::Relaxed);
        loop {
            let next = self.next(tat, now)?;
            match self
                .shared
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }

    fn admit_keyed(&self, key: &[u8], now: u64) -> Result<(), Duration> {
        let key = self.hasher.hash_one(key);
        let mut keyed = self.keyed.lock();
        if let Some(tat) = keyed.buckets.get_mut(&key) {
            *tat = self.next(*tat, now)?;
            return Ok(());
        }
        // Full: idle buckets (whose arrival time has passed: full again, the same as none) are
        // forgotten, at most once a second so that new keys cannot make every request sweep.
        if keyed.buckets.len() >= MAX_KEYS && now.saturating_sub(keyed.swept) >= 1_000_000_000 {
            keyed.buckets.retain(|_, tat| *tat > now);
            keyed.swept = now;
        }
        if keyed.buckets.len() >= MAX_KEYS {
            drop(keyed);
            return self.admit_shared(now);
        }
        let next = self.next(0, now)?;
        keyed.buckets.insert(key, next);
        Ok(())
    }

    /// The bucket's next arrival time if a request at `now` is admitted, else how long until
    /// one would be.
    fn next(&self, tat: u64, now: u64) -> Result<u64, Duration> {
        let interval = nanos(self.config.interval);
        // The compiler bounds interval × burst; past u64 nanoseconds (584 years of uptime) a
        // request is refused, never admitted by a saturated sum.
        let next = tat.max(now).checked_add(interval).ok_or(Duration::MAX)?;
        let allowed = interval
            .checked_mul(u64::from(self.config.burst))
            .and_then(|b| now.checked_add(b))
            .ok_or(Duration::MAX)?;
        if next <= allowed {
            Ok(next)
        } else {
            Err(Duration::from_nanos(next - allowed))
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_second: u64, burst: u32, key: RateLimitKey) -> RateLimiter {
        RateLimiter::new(RateLimitConfig {
            interval: Duration::from_nanos(1_000_000_000 / per_second),
            burst,
            key,
        })
    }

    #[test]
    fn a_burst_then_the_rate() {
        let l = limiter(10, 3, RateLimitKey::None);
        let t0 = l.epoch + Duration::from_secs(1);
        let h = HeaderMap::new();
        for _ in 0..3 {
            assert!(l.admit_at(&h, None, t0).is_ok());
        }
        let wait = l.admit_at(&h, None, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert!(
            l.admit_at(&h, None, t0 + Duration::from_millis(99))
                .is_err()
        );
        assert!(
            l.admit_at(&h, None, t0 + Duration::from_millis(100))
                .is_ok()
        );
        // Then asked every 10 ms for 10 s: one admitted per 100 ms (the burst is spent).
        let admitted = (0..1000)
            .filter(|i| {
                l.admit_at(&h, None, t0 + Duration::from_millis(100 + 10 * i))
                    .is_ok()
            })
            .count();
        assert_eq!(admitted, 99, "{admitted}");
    }

    #[test]
    fn each_key_has_its_bucket_and_no_key_shares_one() {
        let l = limiter(
            1,
            1,
            RateLimitKey::Header(HeaderName::from_static("x-user")),
        );
        let t = l.epoch;
        let user = |u: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-user", u.parse().unwrap());
            h
        };
        assert!(l.admit_at(&user("a"), None, t).is_ok());
        assert!(l.admit_at(&user("a"), None, t).is_err());
        assert!(l.admit_at(&user("b"), None, t).is_ok());
        assert!(l.admit_at(&HeaderMap::new(), None, t).is_ok());
        assert!(l.admit_at(&HeaderMap::new(), None, t).is_err());
    }

    #[test]
    fn keys_beyond_the_bound_share_the_keyless_bucket_until_idle_ones_go() {
        let l = limiter(1, 1, RateLimitKey::Header(HeaderName::from_static("k")));
        let t = l.epoch;
        let key = |i: usize| {
            let mut h = HeaderMap::new();
            h.insert("k", i.to_string().parse().unwrap());
            h
        };
        for i in 0..MAX_KEYS {
            assert!(l.admit_at(&key(i), None, t).is_ok());
        }
        assert!(
            l.admit_at(&key(MAX_KEYS), None, t).is_ok(),
            "the shared bucket"
        );
        assert!(
            l.admit_at(&key(MAX_KEYS + 1), None, t).is_err(),
            "shared, now empty"
        );
        // A second later every bucket is full again: forgotten, room for new keys.
        let later = t + Duration::from_secs(2);
        assert!(l.admit_at(&key(MAX_KEYS + 2), None, later).is_ok());
        assert!(l.keyed.lock().buckets.len() < MAX_KEYS);
    }
}
