//! Durations counted in fixed buckets, as Prometheus histograms want them:
//! how long requests took (each worker counts its own in its scoreboard)
//! and how long connections waited for a worker (the supervisor counts).
//! One set of bounds everywhere, so counts from any source add up.

use std::time::Duration;

/// The buckets' upper bounds in microseconds (inclusive); past the last is
/// the `+Inf` bucket. From 100 µs, where a queued hand-over lands, to 10 s.
pub const BOUNDS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// Buckets, the `+Inf` one included.
pub const BUCKETS: usize = BOUNDS_US.len() + 1;

/// Counts per bucket (not cumulative) and their sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Histogram {
    pub counts: [u64; BUCKETS],
    pub sum_us: u64,
}

impl Histogram {
    /// The bucket a duration of `us` microseconds falls in.
    pub fn bucket_of(us: u64) -> usize {
        BOUNDS_US.partition_point(|&bound| bound < us)
    }

    pub fn observe(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.counts[Self::bucket_of(us)] += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine += theirs;
        }
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_inclusive_and_the_last_bucket_is_unbounded() {
        assert_eq!(Histogram::bucket_of(0), 0);
        assert_eq!(Histogram::bucket_of(100), 0);
        assert_eq!(Histogram::bucket_of(101), 1);
        assert_eq!(Histogram::bucket_of(10_000_000), BUCKETS - 2);
        assert_eq!(Histogram::bucket_of(10_000_001), BUCKETS - 1);
        assert!(BOUNDS_US.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn observations_merge_into_counts_and_a_sum() {
        let mut a = Histogram::default();
        a.observe(Duration::from_micros(300));
        a.observe(Duration::from_secs(60));
        let mut b = Histogram::default();
        b.observe(Duration::from_micros(300));
        b.merge(&a);
        assert_eq!(b.count(), 3);
        assert_eq!(b.counts[2], 2);
        assert_eq!(b.counts[BUCKETS - 1], 1);
        assert_eq!(b.sum_us, 60_000_600);
    }
}
