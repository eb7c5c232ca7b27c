//! What a denoising step costs on this model and device, measured once at load, so that a
//! request that cannot finish within the server's time limit is turned away up front
//! instead of holding the engine for an hour.
//!
//! The estimate is a lower bound. A step's time grows at least linearly with the pixel
//! count beyond the sizes measured (convolutions are linear, attention is quadratic, and a
//! GPU's fixed costs only matter at small sizes), so the line through two small sizes
//! stays below the real cost further out; it is halved again for timing noise. Only
//! requests that surely cannot finish are refused.

use std::time::{Duration, Instant};

use super::stable_diffusion::StableDiffusion;
use crate::error::Result;
use crate::tensor::Tensor;

/// Image sides measured, in pixels: small enough to cost well under a second on two CPU
/// cores for SD 1.5 (0.1 s and 0.3 s), large enough to be past fixed costs on a CPU.
const MEASURED_SIDES: [usize; 2] = [64, 128];
/// The share of the extrapolated time claimed as the lower bound: repeated measurements on
/// a loaded 2-core machine varied by up to 40%.
const NOISE_MARGIN: f64 = 0.5;
/// A step at the smaller side slower than this is not followed by the larger side, whose
/// four calls would cost some 10x as much: on llvmpipe the tiny test model takes 4.7 s at
/// 64x64 and 58 s at 128x128 (2 cores). SD 1.5 on a CPU takes 0.1 s.
const SLOW_STEP_SECONDS: f64 = 0.5;

/// Batch-1 UNet steps at one or two image sizes.
#[derive(Clone, Debug)]
pub struct StepCost {
    /// (pixels, seconds) at the smaller size.
    small: (f64, f64),
    /// (pixels, seconds) at the larger size, unless the smaller was already slow; without
    /// it the bound is flat (a larger image never costs less).
    large: Option<(f64, f64)>,
}

impl StepCost {
    /// Times the UNet (batch 1, after a warm-up call) at [`MEASURED_SIDES`], the best of
    /// two calls each, or only once at the smaller side when that is slow.
    pub fn measure(sd: &StableDiffusion) -> Result<StepCost> {
        let prompt = sd.encode_prompt("")?;
        let factor = sd.vae_scale_factor();
        let channels = sd.unet().config().in_channels;
        let device = sd.device();
        let step = |side: usize| -> Result<f64> {
            let latent = (side / factor).max(1);
            let sample = Tensor::zeros(&[1, channels, latent, latent], device)?;
            let cond = sd.conditioning(&[&prompt], side, side)?;
            let started = Instant::now();
            // Reading the result back waits for a GPU to finish.
            sd.unet().forward(&sample, 500.0, &cond)?.to_vec()?;
            Ok(started.elapsed().as_secs_f64())
        };
        let [small_side, large_side] = MEASURED_SIDES;
        let pixels = |side: usize| (side * side) as f64;
        step(small_side)?;
        let first = step(small_side)?;
        if first > SLOW_STEP_SECONDS {
            return Ok(StepCost {
                small: (pixels(small_side), first),
                large: None,
            });
        }
        let small = first.min(step(small_side)?);
        let large = step(large_side)?.min(step(large_side)?);
        Ok(StepCost {
            small: (pixels(small_side), small),
            large: Some((pixels(large_side), large)),
        })
    }

    /// At least how long one denoising step takes at `width` x `height` (guided or not:
    /// the measured batch of 1 is the cheaper case).
    pub fn step_at_least(&self, width: usize, height: usize) -> Duration {
        let pixels = (width * height) as f64;
        let (p0, t0) = self.small;
        let seconds = match self.large {
            _ if pixels < p0 => 0.0,
            // A larger image never costs less.
            None => t0,
            Some((p1, _)) if pixels < p1 => t0,
            Some((p1, t1)) => {
                let slope = ((t1 - t0) / (p1 - p0)).max(0.0);
                t1 + slope * (pixels - p1)
            }
        };
        Duration::from_secs_f64(NOISE_MARGIN * seconds)
    }

    /// At least how long `steps` denoising steps take at `width` x `height`.
    pub fn generation_at_least(&self, width: usize, height: usize, steps: usize) -> Duration {
        self.step_at_least(width, height) * steps as u32
    }
}

impl std::fmt::Display for StepCost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [s0, s1] = MEASURED_SIDES;
        write!(f, "UNet step (batch 1) {:.3} s at {s0}x{s0}", self.small.1)?;
        if let Some((_, t1)) = self.large {
            write!(f, ", {t1:.3} s at {s1}x{s1}")?;
        }
        write!(
            f,
            "; so at least {:.2} s at 512x512 and {:.1} s at 1024x1024",
            self.step_at_least(512, 512).as_secs_f64(),
            self.step_at_least(1024, 1024).as_secs_f64()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_extends_the_line_through_the_measurements_halved() {
        let cost = StepCost {
            small: (4096.0, 0.1),
            large: Some((16384.0, 0.3)),
        };
        assert_eq!(cost.step_at_least(32, 32), Duration::ZERO);
        assert_eq!(cost.step_at_least(64, 64), Duration::from_secs_f64(0.05));
        assert_eq!(cost.step_at_least(100, 100), Duration::from_secs_f64(0.05));
        let at_512 = cost.step_at_least(512, 512).as_secs_f64();
        let line = 0.3 + 0.2 / 12288.0 * (262144.0 - 16384.0);
        assert!((at_512 - 0.5 * line).abs() < 1e-9, "{at_512}");
        assert_eq!(
            cost.generation_at_least(512, 512, 10),
            cost.step_at_least(512, 512) * 10
        );
        // Noise that makes the larger size faster gives a flat bound, never a negative one.
        let flat = StepCost {
            small: (4096.0, 0.3),
            large: Some((16384.0, 0.2)),
        };
        assert!((flat.step_at_least(2048, 2048).as_secs_f64() - 0.1).abs() < 1e-9);
    }

    #[test]
    fn one_slow_measurement_bounds_every_larger_size_by_itself() {
        let cost = StepCost {
            small: (4096.0, 4.0),
            large: None,
        };
        assert_eq!(cost.step_at_least(32, 32), Duration::ZERO);
        assert_eq!(cost.step_at_least(64, 64), Duration::from_secs(2));
        assert_eq!(cost.step_at_least(2048, 2048), Duration::from_secs(2));
    }
}
