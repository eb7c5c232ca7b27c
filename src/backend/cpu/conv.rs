//! 2-D convolution: 3x3 stride-1 layers large enough to pay through Winograd F(2x2, 3x3) or
//! F(4x4, 3x3) (see [`super::winograd`]), everything else as im2col + GEMM, in chunks of output pixels
//! so the column buffer stays small (a 512x512 VAE layer would otherwise need gigabytes of
//! columns).

use std::sync::OnceLock;

use rayon::prelude::*;

use super::matmul::{sgemm, MatRef, Product};
use super::tuning::{self, WinogradCutoffs};
use super::winograd::{self, F2, F4};
use super::CpuStorage;
use crate::tensor::interrupt;
use crate::tensor::params::Conv2dParams;

/// Upper bound on the column buffer, in f32 elements (32 MiB).
const MAX_COLUMN_ELEMS: usize = 8 << 20;

pub fn conv2d(
    x: &CpuStorage,
    weight: &CpuStorage,
    bias: Option<&CpuStorage>,
    p: &Conv2dParams,
) -> CpuStorage {
    let x = x.as_f32();
    let weight = weight.as_f32();
    let bias = bias.map(|b| b.as_f32());
    CpuStorage::F32(algorithm(p).run(&x, &weight, bias.as_deref(), p))
}

/// The ways to run a convolution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Algorithm {
    Im2col,
    WinogradF2,
    WinogradF4,
}

impl Algorithm {
    /// The convolution of `x` with `weight` plus `bias`; the Winograd variants need
    /// [`winograd::applies`].
    pub(crate) fn run(
        self,
        x: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        p: &Conv2dParams,
    ) -> Vec<f32> {
        match self {
            Algorithm::WinogradF4 => F4.conv(x, weight, bias, p),
            Algorithm::WinogradF2 => F2.conv(x, weight, bias, p),
            Algorithm::Im2col => im2col_conv(x, weight, bias, p),
        }
    }
}

/// The fastest way to run a convolution, by its shape and the processor. Winograd needs a
/// 3x3 stride-1 kernel, and enough channels and tiles that its transforms stay small next
/// to the products: the weight transform runs on every call and writes 16 (F2) or 36 (F4)
/// values per (oc, c) pair, so its share shrinks with the tile count whatever the channels
/// ([`tuning::winograd_cutoffs`] gives the counts, by the vector level or measured).
/// `SD_CPU_WINOGRAD=0` turns Winograd off, `=2` keeps it to F(2x2) (to compare speed or
/// rounding).
fn algorithm(p: &Conv2dParams) -> Algorithm {
    pick(p, winograd_setting(), tuning::winograd_cutoffs(p))
}

/// `SD_CPU_WINOGRAD` when it is `0` or `2` (warned about otherwise); read once.
pub(crate) fn winograd_setting() -> Option<&'static str> {
    static SETTING: OnceLock<Option<String>> = OnceLock::new();
    SETTING
        .get_or_init(|| {
            let value = std::env::var("SD_CPU_WINOGRAD").ok();
            if let Some(other) = value.as_deref().filter(|v| !["0", "2"].contains(v)) {
                tracing::warn!("SD_CPU_WINOGRAD={other:?} is not 0 or 2: ignored");
                return None;
            }
            value
        })
        .as_deref()
}

/// [`algorithm`] for a given `SD_CPU_WINOGRAD` setting and cut-offs.
fn pick(p: &Conv2dParams, setting: Option<&str>, cutoffs: WinogradCutoffs) -> Algorithm {
    let tiles = |m: usize| p.n * p.oh.div_ceil(m) * p.ow.div_ceil(m);
    if setting == Some("0") || !winograd::applies(p) || p.c < 16 || p.oc < 16 {
        Algorithm::Im2col
    } else if setting != Some("2") && tiles(4) >= cutoffs.f4_tiles {
        Algorithm::WinogradF4
    } else if tiles(2) >= cutoffs.f2_tiles {
        Algorithm::WinogradF2
    } else {
        Algorithm::Im2col
    }
}

/// The convolution as im2col + GEMM.
fn im2col_conv(x: &[f32], weight: &[f32], bias: Option<&[f32]>, p: &Conv2dParams) -> Vec<f32> {
    let pixels = p.oh * p.ow;
    let patch = p.c * p.kh * p.kw;
    let mut out = vec![0f32; p.n * p.oc * pixels];
    if let Some(bias) = bias {
        out.par_chunks_mut(pixels)
            .enumerate()
            .for_each(|(i, plane)| plane.fill(bias[i % p.oc]));
    }
    let accumulate = bias.is_some();
    let w_view = MatRef {
        data: weight,
        row_stride: patch,
        col_stride: 1,
    };
    let pointwise = p.kh == 1
        && p.kw == 1
        && p.stride == 1
        && (p.pad_top, p.pad_left) == (0, 0)
        && (p.oh, p.ow) == (p.h, p.w);
    let chunk = (MAX_COLUMN_ELEMS / patch.max(1)).clamp(64, pixels.max(64));
    let mut columns = if pointwise {
        Vec::new()
    } else {
        vec![0f32; patch * chunk.min(pixels)]
    };
    let watch = interrupt::watch();
    for b in 0..p.n {
        let image = &x[b * p.c * p.h * p.w..(b + 1) * p.c * p.h * p.w];
        let dst = &mut out[b * p.oc * pixels..(b + 1) * p.oc * pixels];
        if pointwise {
            // A 1x1 convolution is a plain product with the image as a [c, pixels] matrix.
            let rhs = MatRef {
                data: image,
                row_stride: pixels,
                col_stride: 1,
            };
            let product = Product {
                m: p.oc,
                n: pixels,
                k: p.c,
                lhs: w_view,
                rhs,
                dst_row_stride: pixels,
                accumulate,
            };
            sgemm(product, dst, true);
            continue;
        }
        let mut start = 0;
        // Skips the rest once cancelled, as the Winograd path does.
        while start < pixels && !watch.is_cancelled() {
            let len = chunk.min(pixels - start);
            im2col(image, p, start, len, &mut columns[..patch * len]);
            let rhs = MatRef {
                data: &columns[..patch * len],
                row_stride: len,
                col_stride: 1,
            };
            let product = Product {
                m: p.oc,
                n: len,
                k: patch,
                lhs: w_view,
                rhs,
                dst_row_stride: pixels,
                accumulate,
            };
            sgemm(product, &mut dst[start..], true);
            start += len;
        }
    }
    out
}

/// Columns for output pixels `start..start + len`: row `(ci, ky, kx)` holds the input value
/// each of those pixels sees through that kernel tap (0 in the padding).
fn im2col(image: &[f32], p: &Conv2dParams, start: usize, len: usize, columns: &mut [f32]) {
    columns
        .par_chunks_mut(len)
        .enumerate()
        .for_each(|(row, col)| {
            let ci = row / (p.kh * p.kw);
            let ky = (row / p.kw) % p.kh;
            let kx = row % p.kw;
            let plane = &image[ci * p.h * p.w..(ci + 1) * p.h * p.w];
            for (j, v) in col.iter_mut().enumerate() {
                let pix = start + j;
                let (oy, ox) = (pix / p.ow, pix % p.ow);
                let iy = (oy * p.stride + ky) as isize - p.pad_top as isize;
                let ix = (ox * p.stride + kx) as isize - p.pad_left as isize;
                *v = if iy >= 0 && ix >= 0 && (iy as usize) < p.h && (ix as usize) < p.w {
                    plane[iy as usize * p.w + ix as usize]
                } else {
                    0.0
                };
            }
        });
}

#[cfg(test)]
mod tests {
    use super::winograd::{F2, F4};
    use super::{im2col_conv, pick, Algorithm, Conv2dParams, WinogradCutoffs};
    use crate::tensor::params::Padding2d;
    use crate::tensor::testing::random;

    fn values(shape: &[usize], seed: u64) -> Vec<f32> {
        random(shape, seed).to_vec().unwrap()
    }

    fn params(n: usize, c: usize, h: usize, w: usize, oc: usize, padding: usize) -> Conv2dParams {
        padded(n, c, h, w, oc, Padding2d::uniform(padding))
    }

    /// A 3x3 stride-1 convolution's sizes with `pad` around its input.
    fn padded(n: usize, c: usize, h: usize, w: usize, oc: usize, pad: Padding2d) -> Conv2dParams {
        Conv2dParams {
            n,
            c,
            h,
            w,
            oc,
            kh: 3,
            kw: 3,
            stride: 1,
            pad_top: pad.top,
            pad_left: pad.left,
            oh: h + pad.top + pad.bottom - 2,
            ow: w + pad.left + pad.right - 2,
        }
    }

    /// Padding on some sides only (as row bands and diffusers' `Downsample2D(padding=0)`
    /// use it) is the convolution of the input with those zeros written out, on im2col and
    /// on both Winograd transforms.
    #[test]
    fn uneven_padding_is_that_of_the_zeros_written_out() {
        let (n, c, h, w, oc) = (2, 6, 9, 7, 5);
        let x = values(&[n, c, h, w], 31);
        let weight = values(&[oc, c, 3, 3], 32);
        let bias = values(&[oc], 33);
        for (top, bottom, left, right) in [
            (0, 0, 1, 1),
            (1, 0, 1, 1),
            (0, 1, 1, 1),
            (0, 1, 0, 1),
            (2, 0, 0, 2),
        ] {
            let pad = Padding2d {
                top,
                bottom,
                left,
                right,
            };
            let p = padded(n, c, h, w, oc, pad);
            let (ph, pw) = (h + top + bottom, w + left + right);
            let mut zeros_written = vec![0f32; n * c * ph * pw];
            for (plane, dst) in x
                .chunks_exact(h * w)
                .zip(zeros_written.chunks_exact_mut(ph * pw))
            {
                for (row, src) in plane.chunks_exact(w).enumerate() {
                    dst[(row + top) * pw + left..][..w].copy_from_slice(src);
                }
            }
            let want = im2col_conv(
                &zeros_written,
                &weight,
                Some(&bias),
                &padded(n, c, ph, pw, oc, Padding2d::uniform(0)),
            );
            assert_eq!(
                im2col_conv(&x, &weight, Some(&bias), &p),
                want,
                "im2col, {pad:?}"
            );
            for f4 in [false, true] {
                let (abs, rel) = worst(&p, 7, f4);
                assert!(
                    rel < 2e-6 || (f4 && rel < 1e-5),
                    "{pad:?} f4 {f4}: {abs} ({rel} of max)"
                );
            }
        }
    }

    /// Inside a cancelled scope both paths skip their chunks (leaving zeros, which the op
    /// never returns: Tensor::conv2d then fails with Cancelled).
    #[test]
    fn cancelled_convolutions_skip_their_chunks() {
        use crate::tensor::interrupt::{scope, Interrupt};
        let p = params(1, 8, 40, 40, 8, 1);
        let x = values(&[p.n, p.c, p.h, p.w], 1);
        let weight = values(&[p.oc, p.c, 3, 3], 2);
        let job = Interrupt::new();
        let run = || {
            scope(&job, || {
                [
                    im2col_conv(&x, &weight, None, &p),
                    F2.conv(&x, &weight, None, &p),
                    F4.conv(&x, &weight, None, &p),
                ]
            })
        };
        for out in run() {
            assert!(out.iter().any(|&v| v != 0.0));
        }
        job.cancel();
        for out in run() {
            assert!(out.iter().all(|&v| v == 0.0));
        }
    }

    /// Largest difference between Winograd and im2col, relative to the largest |output|.
    fn worst(p: &Conv2dParams, seed: u64, f4: bool) -> (f32, f32) {
        let x = values(&[p.n, p.c, p.h, p.w], seed);
        let weight = values(&[p.oc, p.c, 3, 3], seed + 1);
        let bias = values(&[p.oc], seed + 2);
        let want = im2col_conv(&x, &weight, Some(&bias), p);
        let got = if f4 {
            F4.conv(&x, &weight, Some(&bias), p)
        } else {
            F2.conv(&x, &weight, Some(&bias), p)
        };
        assert_eq!(got.len(), want.len(), "{p:?}");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        (diff, diff / scale)
    }

    #[test]
    fn winograd_matches_im2col_at_awkward_shapes() {
        for (n, c, h, w, oc, padding) in [
            (1, 1, 1, 1, 1, 1),
            (1, 3, 5, 5, 1, 0),
            (2, 5, 9, 7, 6, 1),
            (1, 7, 13, 11, 67, 1),
            (2, 17, 6, 10, 19, 1),
            (2, 33, 15, 17, 35, 1),
            (1, 16, 3, 4, 16, 2),
            (3, 9, 8, 8, 5, 1),
        ] {
            let p = params(n, c, h, w, oc, padding);
            for f4 in [false, true] {
                let (abs, rel) = worst(&p, 7 * (c + h) as u64, f4);
                assert!(
                    rel < 2e-6 || (f4 && rel < 1e-5),
                    "{p:?} f4 {f4}: {abs} ({rel} of max)"
                );
            }
        }
    }

    /// Each algorithm's error against the exact (f64) convolution, at a channel count where
    /// rounding in the transformed domain adds up: F2 stays at im2col's level, F4 within
    /// about 5x of it.
    #[test]
    fn winograd_rounding_stays_near_im2col() {
        let p = params(1, 256, 12, 12, 32, 1);
        let x = values(&[p.n, p.c, p.h, p.w], 11);
        // Kernels scaled like a trained layer's (unit output variance).
        let scale = 1.0 / ((9 * p.c) as f32).sqrt();
        let weight: Vec<f32> = values(&[p.oc, p.c, 3, 3], 12)
            .iter()
            .map(|v| v * scale)
            .collect();
        let mut exact = vec![0f64; p.oc * p.oh * p.ow];
        for (o, plane) in exact.chunks_exact_mut(p.oh * p.ow).enumerate() {
            for ci in 0..p.c {
                for tap in 0..9 {
                    let w = weight[(o * p.c + ci) * 9 + tap] as f64;
                    let (ky, kx) = (tap / 3, tap % 3);
                    for (pixel, out) in plane.iter_mut().enumerate() {
                        let iy = (pixel / p.ow + ky).checked_sub(1).filter(|&y| y < p.h);
                        let ix = (pixel % p.ow + kx).checked_sub(1).filter(|&x| x < p.w);
                        if let (Some(iy), Some(ix)) = (iy, ix) {
                            *out += w * x[(ci * p.h + iy) * p.w + ix] as f64;
                        }
                    }
                }
            }
        }
        let rms = |v: &mut dyn Iterator<Item = f64>| {
            let (sum, n) = v.fold((0.0, 0), |(s, n), e| (s + e * e, n + 1));
            (sum / n as f64).sqrt()
        };
        let signal = rms(&mut exact.iter().copied());
        let error =
            |got: Vec<f32>| rms(&mut got.iter().zip(&exact).map(|(&g, &e)| g as f64 - e)) / signal;
        let im2col = error(im2col_conv(&x, &weight, None, &p));
        let f2 = error(F2.conv(&x, &weight, None, &p));
        let f4 = error(F4.conv(&x, &weight, None, &p));
        assert!(im2col < 1e-6, "im2col: {im2col}");
        assert!(f2 < 2.0 * im2col, "F2 {f2}, im2col {im2col}");
        assert!(f4 < 8.0 * im2col, "F4 {f4}, im2col {im2col}");
    }

    #[test]
    fn algorithm_follows_the_layer_size_and_the_vector_level() {
        use crate::backend::cpu::simd::Level::{Avx2, Avx512};
        use Algorithm::*;
        for (level, (n, c, side, oc), want) in [
            // SD's VAE at 512x512: F4 from 128x128 up; at the 64x64 latent F2 with
            // AVX-512, F4 with AVX2.
            (Avx512, (1, 128, 512, 128), WinogradF4),
            (Avx512, (1, 512, 128, 512), WinogradF4),
            (Avx512, (1, 512, 64, 512), WinogradF2),
            (Avx2, (1, 512, 64, 512), WinogradF4),
            // The UNet (batch 2) with AVX-512: F2 at 64x64 and 32x32, im2col below.
            (Avx512, (2, 320, 64, 320), WinogradF2),
            (Avx512, (2, 640, 32, 640), WinogradF2),
            (Avx512, (2, 1280, 16, 1280), Im2col),
            // With AVX2: F4 down to 16x16, im2col at 8x8 and at 16x16 unguided.
            (Avx2, (2, 320, 64, 320), WinogradF4),
            (Avx2, (2, 640, 32, 640), WinogradF4),
            (Avx2, (2, 1280, 16, 1280), WinogradF4),
            (Avx2, (1, 1280, 16, 1280), Im2col),
            (Avx2, (2, 1280, 8, 1280), Im2col),
            // Few channels: im2col at any size.
            (Avx512, (2, 4, 64, 320), Im2col),
            (Avx2, (2, 4, 64, 320), Im2col),
        ] {
            let p = params(n, c, side, side, oc, 1);
            let cutoffs = WinogradCutoffs::table(level);
            assert_eq!(pick(&p, None, cutoffs), want, "{level:?} {p:?}");
            assert_ne!(
                pick(&p, Some("2"), cutoffs),
                WinogradF4,
                "=2 {level:?} {p:?}"
            );
            assert_eq!(pick(&p, Some("0"), cutoffs), Im2col, "=0 {level:?} {p:?}");
        }
        // Cut-offs a measurement set to never (usize::MAX) leave im2col at any size.
        let never = WinogradCutoffs {
            f4_tiles: usize::MAX,
            f2_tiles: usize::MAX,
        };
        let largest = params(1, 256, 1024, 1024, 256, 1);
        assert_eq!(pick(&largest, None, never), Im2col);
    }
}
