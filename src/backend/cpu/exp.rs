//! A branch-free `exp` for f32 that LLVM vectorises: Cephes' `expf` (range reduction by
//! ln 2, a degree-5 polynomial, the exponent assembled from bits) written with selects
//! instead of branches, so that a loop over a slice of it compiles to SIMD. Called from a
//! function compiled with AVX2/AVX-512 (`#[target_feature]`), it runs 8 or 16 lanes at once;
//! glibc's `expf` is a scalar call per element.
//!
//! Accuracy: within 2 ulp of the exact value for `x` in [-87.3, 88.3] (the tests check
//! against f64). Below -87.3 (where the result would be subnormal) it returns 0; above 88.37
//! it saturates at exp(88.37) ≈ 2.4e38 instead of reaching `f32::MAX` or infinity (the
//! softmax only passes arguments ≤ 0; a sigmoid's 1 / (1 + e^-x) is then about 4e-39
//! instead of 0 for x < -88.4, which makes no difference to SiLU). NaN stays NaN.

use super::simd::madd;

/// ln(2^-126): below it the result would be subnormal; 0 is returned.
const MIN_ARG: f32 = -87.336_54;
/// Arguments above this are clamped, so that 2^n stays a normal f32 (n ≤ 127).
const MAX_ARG: f32 = 88.376_26;

/// e^x (see the module notes for range and accuracy).
#[inline(always)]
pub(crate) fn exp<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer (to nearest even) and leaves it in the low
    // mantissa bits.
    const ROUND: f32 = 12_582_912.0;

    let xc = if x > MAX_ARG { MAX_ARG } else { x };
    let xc = if xc < MIN_ARG { MIN_ARG } else { xc };
    let t = madd::<FMA>(xc, LOG2E, ROUND);
    let n = t - ROUND;
    let r = madd::<FMA>(n, -LN2_LO, madd::<FMA>(n, -LN2_HI, xc));
    let mut p = 1.987_569_2e-4;
    p = madd::<FMA>(p, r, 1.398_199_9e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 1.666_666_5e-1);
    p = madd::<FMA>(p, r, 0.5);
    let y = madd::<FMA>(p, r * r, r) + 1.0;
    // 2^n from n's bits: t's low mantissa bits hold n + 2^22, and n ∈ [-126, 127].
    let n_bits = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let two_n = f32::from_bits((n_bits.wrapping_add(127) << 23) as u32);
    let e = y * two_n;
    if x < MIN_ARG {
        0.0
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(got: f32, exact: f64) -> f64 {
        let e = exact as f32;
        let ulp = (f32::from_bits(e.to_bits() + 1) - e) as f64;
        (got as f64 - exact).abs() / ulp
    }

    #[test]
    fn matches_f64_exp_within_two_ulp() {
        for fma in [false, true] {
            let mut worst = 0f64;
            let n = 2_000_000;
            for i in 0..=n {
                let x = MIN_ARG + (MAX_ARG - MIN_ARG) * i as f32 / n as f32;
                let got = if fma { exp::<true>(x) } else { exp::<false>(x) };
                worst = worst.max(ulps(got, (x as f64).exp()));
            }
            assert!(worst <= 2.0, "fma {fma}: {worst} ulp");
        }
    }

    #[test]
    fn edges() {
        assert_eq!(exp::<false>(0.0), 1.0);
        assert_eq!(exp::<true>(0.0), 1.0);
        assert_eq!(exp::<false>(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp::<false>(-100.0), 0.0);
        assert!(exp::<false>(f32::NAN).is_nan());
        assert!(exp::<false>(100.0) > 2e38);
        assert!(exp::<false>(100.0).is_finite());
    }
}
