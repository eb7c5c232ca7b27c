//! The exact (erf) GELU, `x Φ(x)`, branch-free in f32 so that loops over it vectorise
//! (see [`super::simd`]); libm's `erf` is a scalar call per element.
//!
//! `Φ(-|x|) = erfc(|x| / √2) / 2` comes from Numerical Recipes' Chebyshev fit
//! `erfc(z) = t exp(-z² + P(t))`, `t = 1 / (1 + z / 2)`, whose relative error is below
//! 1.2e-7 for every `z >= 0`; so the tail `x < 0` keeps its relative accuracy and `x >= 0`
//! takes `1 - Φ(-x)`. The tests check against f64.

use super::exp::exp;
use super::simd::madd;

/// `x Φ(x)`, torch's default `F.gelu`.
#[inline(always)]
pub(crate) fn gelu<const FMA: bool>(x: f32) -> f32 {
    const P: [f32; 10] = [
        -1.265_512_2,
        1.000_023_7,
        0.374_091_96,
        0.096_784_18,
        -0.186_288_06,
        0.278_868_07,
        -1.135_204,
        1.488_515_9,
        -0.822_152_23,
        0.170_872_77,
    ];
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / madd::<FMA>(0.5, z, 1.0);
    let mut p = P[9];
    for &c in P[..9].iter().rev() {
        p = madd::<FMA>(p, t, c);
    }
    // Φ(-|x|).
    let tail = 0.5 * t * exp::<FMA>(madd::<FMA>(-z, z, p));
    x * if x < 0.0 { tail } else { 1.0 - tail }
}

#[cfg(test)]
mod tests {
    use super::gelu;

    /// In f64, through erfc so that the tail does not cancel.
    fn exact(x: f32) -> f64 {
        let x = x as f64;
        0.5 * x * libm::erfc(-x / std::f64::consts::SQRT_2)
    }

    /// Within a few f32 roundings of the exact value: relative for x < 0 (the tail, where
    /// the value is tiny; scaled by z² there), and relative to max(|x|, 1) everywhere.
    #[test]
    fn matches_f64_gelu() {
        for fma in [false, true] {
            let (mut worst_tail, mut worst) = (0f64, 0f64);
            let n = 400_000;
            for i in 0..=n {
                let x = -14.0 + 28.0 * i as f32 / n as f32;
                let got = if fma {
                    gelu::<true>(x)
                } else {
                    gelu::<false>(x)
                } as f64;
                let want = exact(x);
                if x < 0.0 && want.abs() > 1e-30 {
                    // z = |x| / √2 carries f32 rounding, and exp(-z²) turns it into a
                    // relative error that grows with z².
                    let z2 = (x as f64).powi(2) / 2.0;
                    worst_tail = worst_tail.max((got - want).abs() / want.abs() / z2.max(1.0));
                }
                worst = worst.max((got - want).abs() / (x.abs() as f64).max(1.0));
            }
            assert!(
                worst_tail < 1e-6,
                "fma {fma}: tail relative error {worst_tail}"
            );
            assert!(worst < 2e-7, "fma {fma}: error {worst}");
        }
    }

    #[test]
    fn edges() {
        assert_eq!(gelu::<false>(0.0), 0.0);
        assert_eq!(gelu::<true>(100.0), 100.0);
        assert_eq!(gelu::<true>(-100.0), 0.0);
        assert!(gelu::<false>(f32::NAN).is_nan());
    }
}
