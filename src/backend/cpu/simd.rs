//! Run-time choice of vector extension: the build targets baseline x86-64 (SSE2), so loops
//! that should run 8 or 16 lanes wide are written once, generic over `FMA`, and compiled
//! again inside `#[target_feature]` functions that [`dispatch!`] picks between by what the
//! CPU has.

/// `a * b + c`, fused where the caller is compiled with FMA (`FMA = true`): without the
/// instruction `mul_add` is a slow library call, so the plain form is used instead.
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Defines `$name`, which runs `$generic::<.., FMA>` compiled for the best vector extension
/// this CPU has (AVX-512, else AVX2 + FMA, else the baseline build). Const generic
/// parameters of `$generic` before `FMA` are declared after `$name`:
/// `dispatch!(f_simd<const A: usize>, f(x: &[f32]))`.
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
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has every feature avx512 is compiled with.
                    return unsafe { avx512 $(::<$($g),+>)? ($($arg),*) };
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has every feature avx2 is compiled with.
                    return unsafe { avx2 $(::<$($g),+>)? ($($arg),*) };
                }
            }
            $generic::<$($($g,)+)? false>($($arg),*)
        }
    };
}
pub(crate) use dispatch;
