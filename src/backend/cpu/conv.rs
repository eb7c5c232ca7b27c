//! 2-D convolution as im2col + GEMM, in chunks of output pixels so the column buffer stays
//! small (a 512x512 VAE layer would otherwise need gigabytes of columns).

use rayon::prelude::*;

use super::matmul::{sgemm, MatRef};
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
    let pixels = p.oh * p.ow;
    let patch = p.c * p.kh * p.kw;
    let mut out = vec![0f32; p.n * p.oc * pixels];
    if let Some(bias) = bias {
        let bias = bias.as_f32();
        out.par_chunks_mut(pixels)
            .enumerate()
            .for_each(|(i, plane)| plane.fill(bias[i % p.oc]));
    }
    let accumulate = bias.is_some();
    let w_view = MatRef {
        data: &weight,
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
    CpuStorage::F32(out)
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
