//! Run-time choice of vector extension: the build targets baseline x86-64 (SSE2), so loops
//! that should run 8 or 16 lanes wide are written once, generic over `FMA`, and compiled
//! again inside `#[target_feature]` functions that [`dispatch!`] picks between by what the
//! CPU has.

/// `a * b + c` rounded once: the FMA instruction where the caller is compiled with it
/// (`FMA = true`), else through f64 (without the instruction `mul_add` is a slow library
/// call, and two f32 roundings measured up to 1.4x the attention's error at scores near
/// 100). The f64 form is exact but for rare double roundings.
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        (a as f64 * b as f64 + c as f64) as f32
    }
}

/// Whether the build's own target has FMA: every aarch64 CPU does, x86-64 only from
/// x86-64-v3. The baseline kernels use it where it is there.
pub(crate) const BASELINE_FMA: bool = cfg!(any(target_arch = "aarch64", target_feature = "fma"));

/// The vector extensions the generic kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// The build's own target (SSE2 on x86-64; NEON and FMA on aarch64).
    Baseline,
    Avx2,
    Avx512,
}

/// The best level this CPU has, capped by `SD_CPU_SIMD` (`baseline`, `avx2` or `avx512`;
/// to compare speed, or to check a level's results on a machine that has a better one).
/// Read once.
pub fn level() -> Level {
    static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("SD_CPU_SIMD").as_deref() {
            Ok("baseline") => Level::Baseline,
            Ok("avx2") => Level::Avx2,
            Ok("avx512") | Err(_) => Level::Avx512,
            Ok(other) => {
                tracing::warn!("SD_CPU_SIMD={other:?} is not baseline, avx2 or avx512: ignored");
                Level::Avx512
            }
        };
        detected().min(cap)
    })
}

pub(crate) fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl");
        if avx512 {
            return Level::Avx512;
        }
        if avx2 {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

/// Defines `$name`, which runs `$generic::<.., FMA>` compiled for [`level`]: AVX-512,
/// AVX2 + FMA, or the baseline build. Const generic parameters of `$generic` before `FMA`
/// are declared after `$name`: `dispatch!(f_simd<const A: usize>, f(x: &[f32]))`.
macro_rules! dispatch {
    ($name:ident $(<$(const $g:ident: $gt:ty),+>)?, $generic:ident($($arg:ident: $ty:ty),*)) => {
        #[allow(clippy::too_many_arguments)]
        fn $name $(<$(const $g: $gt),+>)? ($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx512 $(<$(const $g: $gt),+>)? ($($arg: $ty),*) {
                    $generic::<$($($g,)+)? true>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2 $(<$(const $g: $gt),+>)? ($($arg: $ty),*) {
                    $generic::<$($($g,)+)? true>($($arg),*)
                }
                match $crate::backend::cpu::simd::level() {
                    // SAFETY: level() reports AVX-512 only where the CPU has every feature
                    // avx512 is compiled with.
                    $crate::backend::cpu::simd::Level::Avx512 => {
                        return unsafe { avx512 $(::<$($g),+>)? ($($arg),*) }
                    }
                    // SAFETY: likewise for AVX2 and FMA.
                    $crate::backend::cpu::simd::Level::Avx2 => {
                        return unsafe { avx2 $(::<$($g),+>)? ($($arg),*) }
                    }
                    $crate::backend::cpu::simd::Level::Baseline => {}
                }
            }
            $generic::<$($($g,)+)? { $crate::backend::cpu::simd::BASELINE_FMA }>($($arg),*)
        }
    };
}
pub(crate) use dispatch;
