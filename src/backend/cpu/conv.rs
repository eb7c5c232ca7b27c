//! 2-D convolution: 3x3 stride-1 layers large enough to pay through Winograd F(2x2, 3x3)
//! (see [`super::winograd`]), everything else as im2col + GEMM, in chunks of output pixels
//! so the column buffer stays small (a 512x512 VAE layer would otherwise need gigabytes of
//! columns).

use std::sync::OnceLock;

use rayon::prelude::*;

use super::matmul::{sgemm, MatRef};
use super::winograd::{self, F2};
use super::CpuStorage;

/// Sizes of one convolution; `oh`/`ow` are the output's spatial size.
#[derive(Clone, Copy, Debug)]
pub struct Conv2dParams {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub oc: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
    pub oh: usize,
    pub ow: usize,
}

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
    let out = if winograd_pays(p) {
        F2.conv(&x, &weight, bias.as_deref(), p)
    } else {
        im2col_conv(&x, &weight, bias.as_deref(), p)
    };
    CpuStorage::F32(out)
}

/// Whether Winograd F(2x2, 3x3) beats im2col: it needs a 3x3 stride-1 kernel, and enough
/// channels and tiles that its transforms stay small next to the products.
/// Below 256 tiles (a batch of two 16x16 images) the per-call weight transform costs about
/// what the smaller products save. `SD_CPU_WINOGRAD=0` turns the path off (to compare).
fn winograd_pays(p: &Conv2dParams) -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    let enabled = *ENABLED.get_or_init(|| std::env::var("SD_CPU_WINOGRAD").as_deref() != Ok("0"));
    let tiles = p.n * p.oh.div_ceil(2) * p.ow.div_ceil(2);
    enabled && winograd::applies(p) && p.c >= 16 && p.oc >= 16 && tiles >= 256
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
    let pointwise = p.kh == 1 && p.kw == 1 && p.stride == 1 && p.padding == 0;
    let chunk = (MAX_COLUMN_ELEMS / patch.max(1)).clamp(64, pixels.max(64));
    let mut columns = if pointwise {
        Vec::new()
    } else {
        vec![0f32; patch * chunk.min(pixels)]
    };
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
            sgemm(
                p.oc, pixels, p.c, w_view, rhs, dst, pixels, accumulate, true,
            );
            continue;
        }
        let mut start = 0;
        while start < pixels {
            let len = chunk.min(pixels - start);
            im2col(image, p, start, len, &mut columns[..patch * len]);
            let rhs = MatRef {
                data: &columns[..patch * len],
                row_stride: len,
                col_stride: 1,
            };
            sgemm(
                p.oc,
                len,
                patch,
                w_view,
                rhs,
                &mut dst[start..],
                pixels,
                accumulate,
                true,
            );
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
                let iy = (oy * p.stride + ky) as isize - p.padding as isize;
                let ix = (ox * p.stride + kx) as isize - p.padding as isize;
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
    use super::{im2col_conv, Conv2dParams};
    use crate::tensor::testing::random;

    fn values(shape: &[usize], seed: u64) -> Vec<f32> {
        random(shape, seed).to_vec().unwrap()
    }

    fn params(n: usize, c: usize, h: usize, w: usize, oc: usize, padding: usize) -> Conv2dParams {
        Conv2dParams {
            n,
            c,
            h,
            w,
            oc,
            kh: 3,
            kw: 3,
            stride: 1,
            padding,
            oh: h + 2 * padding - 2,
            ow: w + 2 * padding - 2,
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
                    rel < 2e-6 || (f4 && rel < 2e-5),
                    "{p:?} f4 {f4}: {abs} ({rel} of max)"
                );
            }
        }
    }
}
