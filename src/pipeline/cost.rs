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

use super::text_to_image::StableDiffusion;
use crate::error::Result;
use crate::tensor::Tensor;

/// Image sides measured, in pixels: small enough to cost well under a second on two CPU
/// cores for SD 1.5 (0.1 s and 0.3 s), large enough to be past fixed costs on a CPU.
const MEASURED_SIDES: [usize; 2] = [64, 128];
/// The share of the extrapolated time claimed as the lower bound: repeated measurements on
/// a loaded 2-core machine varied by up to 40%.
const NOISE_MARGIN: f64 = 0.5;

/// One batch-1 UNet step at two image sizes.
#[derive(Clone, Debug)]
pub struct StepCost {
    /// (pixels, seconds), smaller size first.
    measured: [(f64, f64); 2],
}

impl StepCost {
    /// Times the UNet (batch 1, after a warm-up call) at [`MEASURED_SIDES`]; the best of
    /// two calls each.
    pub fn measure(sd: &StableDiffusion) -> Result<StepCost> {
        let context = sd.encode_prompt("")?;
        let factor = sd.vae_scale_factor();
        let channels = sd.unet().config().in_channels;
        let device = sd.device();
        let step = |side: usize| -> Result<f64> {
            let latent = (side / factor).max(1);
            let sample = Tensor::zeros(&[1, channels, latent, latent], device)?;
            let started = Instant::now();
            // Reading the result back waits for a GPU to finish.
            sd.unet().forward(&sample, 500.0, &context)?.to_vec()?;
            Ok(started.elapsed().as_secs_f64())
        };
        step(MEASURED_SIDES[0])?;
        let mut measured = [(0.0, 0.0); 2];
        for (slot, side) in measured.iter_mut().zip(MEASURED_SIDES) {
            let best = step(side)?.min(step(side)?);
            *slot = ((side * side) as f64, best);
        }
        Ok(StepCost { measured })
    }

    /// At least how long one denoising step takes at `width` x `height` (guided or not:
    /// the measured batch of 1 is the cheaper case).
    pub fn step_at_least(&self, width: usize, height: usize) -> Duration {
        let [(p0, t0), (p1, t1)] = self.measured;
        let pixels = (width * height) as f64;
        if pixels < p1 {
            return Duration::ZERO;
        }
        let slope = ((t1 - t0) / (p1 - p0)).max(0.0);
        Duration::from_secs_f64(NOISE_MARGIN * (t1 + slope * (pixels - p1)))
    }

    /// At least how long `steps` denoising steps take at `width` x `height`.
    pub fn generation_at_least(&self, width: usize, height: usize, steps: usize) -> Duration {
        self.step_at_least(width, height) * steps as u32
    }
}

impl std::fmt::Display for StepCost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [(_, t0), (_, t1)] = self.measured;
        let [s0, s1] = MEASURED_SIDES;
        write!(
            f,
            "UNet step (batch 1) {t0:.3} s at {s0}x{s0}, {t1:.3} s at {s1}x{s1}; so at least \
             {:.2} s at 512x512 and {:.1} s at 1024x1024",
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
            measured: [(4096.0, 0.1), (16384.0, 0.3)],
        };
        assert_eq!(cost.step_at_least(64, 64), Duration::ZERO);
        let at_512 = cost.step_at_least(512, 512).as_secs_f64();
        let line = 0.3 + 0.2 / 12288.0 * (262144.0 - 16384.0);
        assert!((at_512 - 0.5 * line).abs() < 1e-9, "{at_512}");
        assert_eq!(
            cost.generation_at_least(512, 512, 10),
            cost.step_at_least(512, 512) * 10
        );
        // Noise that makes the larger size faster gives a flat bound, never a negative one.
        let flat = StepCost {
            measured: [(4096.0, 0.3), (16384.0, 0.2)],
        };
        assert!((flat.step_at_least(2048, 2048).as_secs_f64() - 0.1).abs() < 1e-9);
    }
}
