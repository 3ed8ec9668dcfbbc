//! Outlier detection (passive health checking), with Envoy's consecutive-5xx semantics as App
//! Mesh configured them: an endpoint that fails `max_server_errors` times in a row is ejected
//! (gets no new requests) for `base_ejection × n` (n: how many times it was ejected, less one
//! for each interval it has since spent un-ejected; at most max(300 s, base)), rounded up to
//! whole intervals: it is un-ejected at the first check, every interval from its ejection, once
//! that time has passed. An ejection that would put more than `max_ejection_percent` of the
//! cluster's endpoints out is not made. The cluster-level glue is in `upstream`.

use std::{
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    time::Duration,
};

use parking_lot::Mutex;
use tokio::time::Instant;

/// Envoy's default `max_ejection_time`; App Mesh does not expose it.
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// A cluster's outlier detection settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierDetection {
    pub max_server_errors: u32,
    pub interval: Duration,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

impl OutlierDetection {
    /// How long an endpoint's `times`-th ejection lasts: base × times, at most max(300 s, base),
    /// rounded up to whole intervals (at least one).
    pub fn ejection_time(&self, times: u32) -> Duration {
        let cap = MAX_EJECTION_TIME.max(self.base_ejection);
        let wanted = self.base_ejection.saturating_mul(times.max(1)).min(cap);
        let interval = self.interval.as_nanos().max(1);
        let checks = wanted.as_nanos().div_ceil(interval).max(1);
        Duration::from_nanos(u64::try_from(checks.saturating_mul(interval)).unwrap_or(u64::MAX))
    }

    /// Whether one more endpoint may be ejected while `ejected` of `total` are (Envoy: only if
    /// the ejected share stays within the percentage).
    pub fn may_eject(&self, ejected: usize, total: usize) -> bool {
        let percent = usize::try_from(self.max_ejection_percent).unwrap_or(usize::MAX);
        total > 0 && (ejected + 1).saturating_mul(100) <= percent.saturating_mul(total)
    }
}

/// One endpoint's outlier state; it belongs to the endpoint and survives snapshot swaps.
#[derive(Debug, Default)]
pub struct EndpointOutlier {
    /// Server errors in a row.
    errors: AtomicU32,
    ejected: AtomicBool,
    history: Mutex<History>,
}

#[derive(Debug, Default)]
struct History {
    /// The ejection multiplier.
    times: u32,
    /// When the endpoint was last un-ejected.
    since: Option<Instant>,
}

impl EndpointOutlier {
    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Acquire)
    }

    /// The ejection multiplier (how many times the endpoint was ejected, less healed intervals).
    pub fn times_ejected(&self) -> u32 {
        self.history.lock().times
    }

    /// Records an attempt's outcome; true when this server error is the `threshold`-th in a
    /// row (the endpoint should be ejected).
    pub fn record(&self, server_error: bool, threshold: u32) -> bool {
        if server_error {
            self.errors.fetch_add(1, Ordering::Relaxed).wrapping_add(1) == threshold
        } else {
            if self.errors.load(Ordering::Relaxed) != 0 {
                self.errors.store(0, Ordering::Relaxed);
            }
            false
        }
    }

    /// Ejects the endpoint at `now`; the ejection's length, or `None` if it already was.
    pub fn eject(&self, config: &OutlierDetection, now: Instant) -> Option<Duration> {
        let mut history = self.history.lock();
        if self.ejected.swap(true, Ordering::AcqRel) {
            return None;
        }
        // Envoy lowers the multiplier by one for every interval spent un-ejected.
        let healed = history.since.map_or(0, |since| {
            now.saturating_duration_since(since).as_nanos() / config.interval.as_nanos().max(1)
        });
        history.times = history
            .times
            .saturating_sub(u32::try_from(healed).unwrap_or(u32::MAX))
            .saturating_add(1);
        history.since = None;
        self.errors.store(0, Ordering::Relaxed);
        Some(config.ejection_time(history.times))
    }

    /// Ends an ejection at `now`.
    pub fn uneject(&self, now: Instant) {
        let mut history = self.history.lock();
        history.since = Some(now);
        self.errors.store(0, Ordering::Relaxed);
        self.ejected.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(base_ms: u64, interval_ms: u64, percent: u32) -> OutlierDetection {
        OutlierDetection {
            max_server_errors: 3,
            interval: Duration::from_millis(interval_ms),
            base_ejection: Duration::from_millis(base_ms),
            max_ejection_percent: percent,
        }
    }

    #[test]
    fn ejection_time_grows_is_capped_and_rounds_up_to_intervals() {
        let c = config(1000, 300, 50);
        assert_eq!(c.ejection_time(1), Duration::from_millis(1200));
        assert_eq!(c.ejection_time(2), Duration::from_millis(2100));
        assert_eq!(c.ejection_time(10_000), Duration::from_millis(300_000));
        assert_eq!(
            config(0, 300, 50).ejection_time(1),
            Duration::from_millis(300)
        );
        let long = config(400_000, 1000, 50);
        assert_eq!(
            long.ejection_time(3),
            Duration::from_secs(400),
            "cap is max(300 s, base)"
        );
    }

    #[test]
    fn percentage_is_never_exceeded() {
        let c = config(1000, 1000, 50);
        assert!(c.may_eject(0, 2));
        assert!(!c.may_eject(1, 2));
        assert!(!c.may_eject(0, 1), "one of one is 100 %");
        assert!(config(1000, 1000, 100).may_eject(0, 1));
        assert!(!config(1000, 1000, 0).may_eject(0, 10));
        assert!(c.may_eject(1, 5) && !c.may_eject(2, 5), "40 % yes, 60 % no");
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_errors_eject_once_and_success_resets() {
        let c = config(1000, 1000, 100);
        let o = EndpointOutlier::default();
        assert!(!o.record(true, 3));
        assert!(!o.record(false, 3), "a success resets the count");
        assert!(!o.record(true, 3) && !o.record(true, 3));
        assert!(o.record(true, 3));
        let now = Instant::now();
        assert_eq!(o.eject(&c, now), Some(Duration::from_secs(1)));
        assert_eq!(o.eject(&c, now), None, "already ejected");
        assert!(o.is_ejected());
        o.uneject(now + Duration::from_secs(1));
        // Ejected again at once: the multiplier is 2.
        assert_eq!(
            o.eject(&c, now + Duration::from_secs(1)),
            Some(Duration::from_secs(2))
        );
        o.uneject(now + Duration::from_secs(3));
        // Five intervals later the multiplier has healed back to 0: the next ejection is 1×.
        assert_eq!(
            o.eject(&c, now + Duration::from_secs(8)),
            Some(Duration::from_secs(1))
        );
    }
}
