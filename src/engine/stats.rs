//! What the engine has done since it started, for operators (`GET /metrics`): generations
//! by outcome, their durations as a histogram, and the denoising speed of the last one.

use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the generation-time histogram, in seconds: from a GPU's sub-second
/// 512x512 image to a CPU's large images (minutes).
pub const GENERATION_SECONDS_BUCKETS: [f64; 11] = [
    0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// How a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    Cancelled,
}

impl Outcome {
    pub const ALL: [Outcome; 3] = [Outcome::Succeeded, Outcome::Failed, Outcome::Cancelled];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// A snapshot of the counts.
#[derive(Clone, Debug, Default)]
pub struct GenerationStats {
    /// Generations by [`Outcome::ALL`]'s order.
    pub finished: [u64; 3],
    /// Cumulative counts of succeeded generations at most each of
    /// [`GENERATION_SECONDS_BUCKETS`] seconds long.
    pub seconds_buckets: [u64; GENERATION_SECONDS_BUCKETS.len()],
    pub seconds_sum: f64,
    /// Denoising steps per second of the last succeeded generation.
    pub last_steps_per_second: Option<f64>,
    pub steps_total: u64,
}

#[derive(Default)]
pub struct Stats(Mutex<GenerationStats>);

impl Stats {
    /// Counts a generation: its outcome, and for a succeeded one its total time and how
    /// many steps its denoising loop ran in how long.
    pub fn record(&self, outcome: Outcome, total: Duration, steps: usize, denoise: Duration) {
        // Plain counters: a panic elsewhere cannot leave them inconsistent.
        let mut stats = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let at = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        stats.finished[at] += 1;
        if outcome != Outcome::Succeeded {
            return;
        }
        let seconds = total.as_secs_f64();
        for (count, bound) in stats
            .seconds_buckets
            .iter_mut()
            .zip(GENERATION_SECONDS_BUCKETS)
        {
            if seconds <= bound {
                *count += 1;
            }
        }
        stats.seconds_sum += seconds;
        stats.steps_total += steps as u64;
        if denoise > Duration::ZERO {
            stats.last_steps_per_second = Some(steps as f64 / denoise.as_secs_f64());
        }
    }

    pub fn snapshot(&self) -> GenerationStats {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_only_successes_are_timed() {
        let stats = Stats::default();
        let s = Duration::from_secs_f64;
        stats.record(Outcome::Succeeded, s(0.7), 10, s(0.5));
        stats.record(Outcome::Succeeded, s(25.0), 20, s(20.0));
        stats.record(Outcome::Cancelled, s(100.0), 0, s(0.0));
        let snap = stats.snapshot();
        assert_eq!(snap.finished, [2, 0, 1]);
        assert_eq!(snap.seconds_buckets[0], 0);
        assert_eq!(snap.seconds_buckets[1], 1);
        assert_eq!(snap.seconds_buckets[6], 2);
        assert_eq!(snap.seconds_buckets[10], 2);
        assert!((snap.seconds_sum - 25.7).abs() < 1e-9);
        assert_eq!(snap.last_steps_per_second, Some(1.0));
        assert_eq!(snap.steps_total, 30);
    }
}
