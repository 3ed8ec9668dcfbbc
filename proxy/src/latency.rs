//! An endpoint's response latency as a peak EWMA (Finagle's, Linkerd's and tower's): a sample
//! above the estimate replaces it at once; one below is blended in with a weight that decays
//! over [`DECAY`], and the estimate itself decays toward zero while no sample comes, so a
//! slow endpoint is tried again in time. Kept only for PEAK_EWMA clusters; lock-free and
//! approximate under races (two samples at once: one wins).

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// How fast an old estimate fades.
pub const DECAY: Duration = Duration::from_secs(10);

/// The estimate before the first sample.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

#[derive(Debug, Default)]
pub struct Ewma {
    /// Nanoseconds (f64 bits); 0: no sample yet.
    rtt: AtomicU64,
    /// When it was last updated, in nanoseconds since [`epoch`].
    at: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn since_epoch(now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// The weight an estimate `elapsed` nanoseconds old keeps.
fn kept(elapsed: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    (-(elapsed as f64) / DECAY.as_nanos() as f64).exp()
}

impl Ewma {
    /// Records a response that took `rtt`.
    pub fn sample(&self, rtt: Duration, now: Instant) {
        #[allow(clippy::cast_precision_loss)]
        let sample = rtt.as_nanos() as f64;
        let now = since_epoch(now);
        let prev = f64::from_bits(self.rtt.load(Ordering::Relaxed));
        let next = if prev == 0.0 || sample > prev {
            sample
        } else {
            let w = kept(now.saturating_sub(self.at.load(Ordering::Relaxed)));
            prev * w + sample * (1.0 - w)
        };
        // At least a nanosecond: 0 means "no sample".
        self.rtt.store(next.max(1.0).to_bits(), Ordering::Relaxed);
        self.at.store(now, Ordering::Relaxed);
    }

    /// The estimate now, in nanoseconds.
    pub fn estimate(&self, now: Instant) -> f64 {
        let rtt = f64::from_bits(self.rtt.load(Ordering::Relaxed));
        if rtt == 0.0 {
            #[allow(clippy::cast_precision_loss)]
            return DEFAULT_RTT.as_nanos() as f64;
        }
        rtt * kept(since_epoch(now).saturating_sub(self.at.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_replace_lows_blend_and_idle_decays() {
        let e = Ewma::default();
        let t0 = Instant::now();
        let ms = |v: f64| v * 1e6;
        assert_eq!(e.estimate(t0), ms(30.0), "no sample: the default");
        e.sample(Duration::from_millis(10), t0);
        assert!((e.estimate(t0) - ms(10.0)).abs() < 1.0);
        e.sample(Duration::from_millis(50), t0);
        assert!((e.estimate(t0) - ms(50.0)).abs() < 1.0, "a peak replaces");
        // A low sample 10 s later: blended with weight e^-1 on the old.
        let t1 = t0 + DECAY;
        e.sample(Duration::from_millis(10), t1);
        let want = ms(50.0) * (-1f64).exp() + ms(10.0) * (1.0 - (-1f64).exp());
        assert!(
            (e.estimate(t1) - want).abs() < ms(0.01),
            "{}",
            e.estimate(t1)
        );
        // Idle: the estimate fades.
        assert!(e.estimate(t1 + DECAY * 3) < want / 10.0);
    }
}
