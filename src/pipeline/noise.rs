//! Gaussian noise that matches `torch.randn(shape, generator=torch.Generator().manual_seed(s))`
//! on the CPU, number for number, so a seed gives the same image as diffusers.
//!
//! torch's CPU generator is an MT19937 seeded with the low 32 bits of the seed. `randn` on
//! float32 with at least 16 elements fills the output with uniforms `(u32 & 0xFFFFFF) / 2^24`
//! and then applies Box-Muller to each block of 16 (pairs j and j+8); a ragged tail is redone
//! by drawing 16 fresh uniforms into the last 16 slots. Fewer than 16 elements take torch's
//! scalar path: float64 Box-Muller on 53-bit uniforms, the spare value cached for the next
//! draw.

use crate::error::Result;
use crate::tensor::{Device, Tensor};

const N: usize = 624;
const M: usize = 397;

/// torch's CPU `Generator` (the MT19937 part that `randn` uses).
#[derive(Clone)]
pub struct TorchRng {
    state: [u32; N],
    index: usize,
    /// The second value of the last scalar-path Box-Muller pair (torch keeps it in the
    /// generator as `next_double_normal_sample`).
    cached_normal: Option<f64>,
}

impl TorchRng {
    /// Equivalent to `torch.Generator().manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = seed as u32;
        for i in 1..N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        TorchRng {
            state,
            index: N,
            cached_normal: None,
        }
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % N] & 0x7fff_ffff);
            let mut next = self.state[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// A float32 uniform in [0, 1) with 24 random bits, as torch draws it.
    fn uniform(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// A float64 uniform in [0, 1) from 53 bits of two draws (torch's `random64`).
    fn uniform_f64(&mut self) -> f64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (((hi << 32) | lo) & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// torch's scalar `normal_distribution<double>`: Box-Muller on two float64 uniforms,
    /// the sine half kept for the next call.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.cached_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(radius * theta.sin());
        radius * theta.cos()
    }

    /// `numel` standard normal samples, as `torch.randn(numel)` would give.
    ///
    /// torch takes a vectorised path for 16 elements or more (float32 uniforms, Box-Muller
    /// in blocks of 16) and a scalar float64 path below that.
    pub fn randn(&mut self, numel: usize) -> Vec<f32> {
        if numel < 16 {
            return (0..numel).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..numel).map(|_| self.uniform()).collect();
        let mut i = 0;
        while i + 16 <= numel {
            box_muller_16(&mut data[i..i + 16]);
            i += 16;
        }
        if !numel.is_multiple_of(16) {
            let tail = numel - 16;
            for slot in &mut data[tail..] {
                *slot = self.uniform();
            }
            box_muller_16(&mut data[tail..]);
        }
        data
    }

    /// A tensor of standard normal samples with the given shape.
    pub fn randn_tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let numel = shape.iter().product();
        Tensor::from_vec(self.randn(numel), shape, device)
    }
}

/// A fresh seed from the OS's randomness, below 2³² so it is easy to retype (torch uses
/// only the low 32 bits anyway).
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() & 0xffff_ffff
}

/// torch's `normal_fill_16`: pairs (j, j+8) become (r cos θ, r sin θ).
fn box_muller_16(d: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f32::consts::PI * u2;
        d[j] = radius * theta.cos();
        d[j + 8] = radius * theta.sin();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_reference_sequence() {
        // First outputs of the reference MT19937 for init_genrand(5489).
        let mut rng = TorchRng::new(5489);
        let first: Vec<u32> = (0..3).map(|_| rng.next_u32()).collect();
        assert_eq!(first, vec![3_499_211_612, 581_869_302, 3_890_346_734]);
    }

    #[test]
    fn short_draws_take_torchs_scalar_path_and_keep_its_cached_value() {
        // torch 2.15: g = torch.Generator().manual_seed(42); randn(5), randn(3), randn(16)[:3], randn(1).
        let mut rng = TorchRng::new(42);
        let close = |got: &[f32], want: &[f32]| {
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() <= 1e-6, "{got:?} vs {want:?}");
            }
        };
        close(
            &rng.randn(5),
            &[
                0.336_690_37,
                0.128_809_4,
                0.234_462_37,
                0.230_333_03,
                -1.122_856_4,
            ],
        );
        close(&rng.randn(3), &[-0.186_328_29, 2.208_201_4, -0.637_997_03]);
        close(
            &rng.randn(16)[..3],
            &[1.642_316_9, -0.159_597_47, -0.497_397_54],
        );
        close(&rng.randn(1), &[1.322_135_1]);
    }
}
