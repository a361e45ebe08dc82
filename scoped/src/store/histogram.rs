//! Log-linear duration histograms: exact below 64 ns, then 64 buckets per power of two, so
//! any bucket is at most 1/64 of its lower bound wide and a percentile reported as its
//! bucket's midpoint is within [`RELATIVE_ERROR`] of the true value.

use std::collections::BTreeMap;

/// Sub-buckets per power of two, as a bit count.
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;

/// Largest relative error of a percentile read from these histograms: half a bucket width
/// over the bucket's lower bound, 1/(2·64).
pub const RELATIVE_ERROR: f64 = 1.0 / (2.0 * SUB as f64);

/// The bucket of a duration in nanoseconds.
pub fn bucket(value: u64) -> u32 {
    if value < SUB {
        return value as u32;
    }
    let exponent = 63 - value.leading_zeros(); // ≥ SUB_BITS
    let shift = exponent - SUB_BITS;
    let mantissa = (value >> shift) & (SUB - 1);
    (SUB as u32) + shift * (SUB as u32) + mantissa as u32
}

/// `[low, high)` of a bucket.
pub fn bounds(bucket: u32) -> (u64, u64) {
    let bucket = u64::from(bucket);
    if bucket < SUB {
        return (bucket, bucket + 1);
    }
    let shift = (bucket - SUB) / SUB;
    let mantissa = (bucket - SUB) % SUB;
    let low = (SUB + mantissa) << shift;
    (low, low.saturating_add(1 << shift))
}

/// The value a bucket stands for: its midpoint (exact for the first 64).
pub fn representative(bucket: u32) -> u64 {
    let (low, high) = bounds(bucket);
    low + (high - low) / 2
}

/// Bucket counts of many spans, merged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    counts: BTreeMap<u32, u64>,
    total: u64,
}

impl Histogram {
    pub fn add(&mut self, bucket: u32, count: u64) {
        *self.counts.entry(bucket).or_insert(0) += count;
        self.total += count;
    }

    #[cfg(test)]
    pub fn record(&mut self, value: u64) {
        self.add(bucket(value), 1);
    }

    /// The nearest-rank percentile `q` (0 < q ≤ 1): the smallest recorded value such that at
    /// least `q` of all values are ≤ it, as its bucket's representative, clamped to the
    /// known minimum and maximum.
    pub fn percentile(&self, q: f64, min: u64, max: u64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (&bucket, &count) in &self.counts {
            seen += count;
            if seen >= rank {
                return representative(bucket).clamp(min, max);
            }
        }
        max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_contiguously() {
        let mut previous_high = 0;
        for b in 0..=bucket(u64::MAX) {
            let (low, high) = bounds(b);
            assert_eq!(
                low,
                previous_high,
                "bucket {b} starts where {} ended",
                b.saturating_sub(1)
            );
            assert!(high > low);
            previous_high = high;
        }
        for value in [
            0u64,
            1,
            63,
            64,
            65,
            127,
            128,
            1000,
            123_456_789,
            u64::MAX / 3,
            u64::MAX,
        ] {
            let (low, high) = bounds(bucket(value));
            assert!(
                low <= value && (value < high || high == u64::MAX),
                "{value} in [{low}, {high})"
            );
        }
    }

    #[test]
    fn representative_is_within_the_stated_error() {
        let mut value = 1u64;
        while value < u64::MAX / 2 {
            for v in [value, value + value / 3, value * 2 - 1] {
                let r = representative(bucket(v));
                let error = (r as f64 - v as f64).abs() / v as f64;
                assert!(error <= RELATIVE_ERROR, "{v}: {r} is off by {error}");
            }
            value *= 2;
        }
    }

    #[test]
    fn percentiles_match_nearest_rank() {
        let values: Vec<u64> = (1..=1000).map(|i| i * 997).collect();
        let mut histogram = Histogram::default();
        values.iter().for_each(|&v| histogram.record(v));
        for q in [0.5, 0.95, 0.99, 1.0] {
            let exact = values[((q * 1000.0_f64).ceil() as usize).clamp(1, 1000) - 1];
            let got = histogram.percentile(q, 997, 997_000);
            let error = (got as f64 - exact as f64).abs() / exact as f64;
            assert!(error <= RELATIVE_ERROR, "p{q}: {got} vs {exact}");
        }
        assert_eq!(Histogram::default().percentile(0.5, 0, 0), 0);
    }
}
