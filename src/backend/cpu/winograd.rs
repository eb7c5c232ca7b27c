//! Winograd convolution F(m x m, 3x3) for 3x3 stride-1 convolutions (Lavin & Gray 2015).
//!
//! The output is cut into `m x m` tiles; each sees an `a x a` input tile (`a = m + 2`).
//! With the input transform `V = B^T d B`, the weight transform `U = G g G^T` and the
//! inverse transform `Y = A^T M A`, the convolution becomes, for each of the `a * a`
//! positions of the transformed tiles, one product `M[p] = U[p] (oc x c) V[p] (c x tiles)`:
//! `(m + 2)^2` multiplies per `m^2` outputs instead of `9 m^2`.
//!
//! The tiles are processed in chunks of whole tile rows (over the batch too, so small
//! images of a batch share their products) so the transformed buffers stay bounded, like
//! im2col's column buffer. The weight transform runs on every call: it costs about as much
//! as reading the weight, small next to the products of the shapes this path is used for.

use rayon::prelude::*;

use super::matmul::{sgemm, MatRef, Product};
use super::simd::{dispatch, madd};
use crate::tensor::interrupt;
use crate::tensor::params::Conv2dParams;

/// The matrices of one F(m x m, 3x3) algorithm; `A` is the input tile side `m + 2`.
pub(crate) struct Transform<const A: usize, const M: usize> {
    /// `B^T`, `A x A`.
    bt: [[f32; A]; A],
    /// `G`, `A x 3`.
    g: [[f32; 3]; A],
    /// `A^T`, `M x A`.
    at: [[f32; A]; M],
}

/// F(2x2, 3x3): every coefficient is a power of two, so the transforms add no rounding
/// beyond the reordered sums; 16 multiplies per 4 outputs (2.25x fewer than im2col).
pub(crate) const F2: Transform<4, 2> = Transform {
    bt: [
        [1.0, 0.0, -1.0, 0.0],
        [0.0, 1.0, 1.0, 0.0],
        [0.0, -1.0, 1.0, 0.0],
        [0.0, 1.0, 0.0, -1.0],
    ],
    g: [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ],
    at: [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]],
};

/// F(4x4, 3x3): 36 multiplies per 16 outputs (4x fewer than im2col). Built (Cook-Toom)
/// on the points 0, 1, -1, 1/2, -2 and infinity rather than the usual 0, +-1, +-2: the
/// smaller spread of coefficients measured 2-3x less rounding error (Barabasz et al. 2020,
/// "Error analysis and improving the accuracy of Winograd convolution"), which leaves it
/// about 5x the error of im2col in f32 (relative 3e-6 at 512 channels; f16 weights alone
/// carry 5e-4).
pub(crate) const F4: Transform<6, 4> = Transform {
    bt: [
        [1.0, -3.0 / 2.0, -2.0, 3.0 / 2.0, 1.0, 0.0],
        [0.0, -1.0, 1.0 / 2.0, 5.0 / 2.0, 1.0, 0.0],
        [0.0, 1.0, -5.0 / 2.0, 1.0 / 2.0, 1.0, 0.0],
        [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
        [0.0, 1.0 / 2.0, -1.0, -1.0 / 2.0, 1.0, 0.0],
        [0.0, 1.0, -3.0 / 2.0, -2.0, 3.0 / 2.0, 1.0],
    ],
    g: [
        [1.0, 0.0, 0.0],
        [1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0],
        [-1.0 / 3.0, 1.0 / 3.0, -1.0 / 3.0],
        [-16.0 / 15.0, -8.0 / 15.0, -4.0 / 15.0],
        [1.0 / 15.0, -2.0 / 15.0, 4.0 / 15.0],
        [0.0, 0.0, 1.0],
    ],
    at: [
        [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        [0.0, 1.0, -1.0, 1.0 / 2.0, -2.0, 0.0],
        [0.0, 1.0, 1.0, 1.0 / 4.0, 4.0, 0.0],
        [0.0, 1.0, -1.0, 1.0 / 8.0, -8.0, 1.0],
    ],
};

/// How many tile rows one chunk takes.
#[derive(Clone, Copy)]
struct ChunkLimits {
    /// Upper bound on the transformed input and product buffers of one chunk together, in
    /// f32 elements.
    max_elems: usize,
    /// Tiles a chunk takes even past `max_elems` (while the image has them): each chunk's
    /// products read all of U, 4x the weight's size for F(4x4), so with few tiles a chunk
    /// is a pass over memory for little arithmetic.
    min_tiles: usize,
}

impl ChunkLimits {
    /// 8 MiB of buffers (larger chunks measured no faster on large images) and at least 64
    /// tiles. Measured 2026-12-07 on 2 Zen 3 cores (AVX2, 512 KiB L2 each), SD 1.5's UNet
    /// shapes at batch 2, median of 9 calls: 8 MiB alone cut the 16x16 level into chunks of
    /// 12 tiles and the 32x32 one into chunks of 24; at least 64 tiles took 2560 -> 1280
    /// channels at 16x16 from 149 to 120 ms, 1280 -> 1280 from 74 to 59 ms and 1280 -> 640 at
    /// 32x32 from 92 to 74 ms (128 and 256 tiles: no faster).
    const DEFAULT: Self = Self {
        max_elems: 2 << 20,
        min_tiles: 64,
    };

    /// Tile rows per chunk for `per_row` transformed values and `tiles_per_row` tiles per
    /// tile row, out of `tile_rows`.
    fn rows(self, per_row: usize, tiles_per_row: usize, tile_rows: usize) -> usize {
        (self.max_elems / per_row.max(1))
            .max(self.min_tiles.div_ceil(tiles_per_row.max(1)))
            .clamp(1, tile_rows.max(1))
    }
}

/// Whether a convolution can take this path: a 3x3 kernel at stride 1 (any padding).
pub fn applies(p: &Conv2dParams) -> bool {
    p.kh == 3 && p.kw == 3 && p.stride == 1 && p.oh > 0 && p.ow > 0
}

impl<const A: usize, const M: usize> Transform<A, M> {
    /// The convolution of `x` (`[n, c, h, w]`) with `weight` (`[oc, c, 3, 3]`) plus `bias`,
    /// as `[n, oc, oh, ow]`. Needs [`applies`].
    pub(crate) fn conv(
        &self,
        x: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        p: &Conv2dParams,
    ) -> Vec<f32> {
        self.conv_in_chunks(x, weight, bias, p, ChunkLimits::DEFAULT)
    }

    /// [`Transform::conv`] in chunks of whole tile rows as `limits` sizes them.
    fn conv_in_chunks(
        &self,
        x: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        p: &Conv2dParams,
        limits: ChunkLimits,
    ) -> Vec<f32> {
        assert!(applies(p), "winograd conv of {p:?}");
        // Each output tile row reads its input rows from the padded top on; columns are
        // laid out padded in a line of `M * (ceil(ow / M) + 1)`.
        assert!(
            p.pad_left + p.w <= M * (p.ow.div_ceil(M) + 1),
            "winograd conv of {p:?}"
        );
        let positions = A * A;
        let (th, tw) = (p.oh.div_ceil(M), p.ow.div_ceil(M));
        let tile_rows = p.n * th;
        let u = self.weights(weight, p.c, p.oc);
        let per_row = positions * (p.c + p.oc) * tw;
        let chunk_rows = limits.rows(per_row, tw, tile_rows);
        let mut v = vec![0f32; positions * p.c * chunk_rows * tw];
        let mut m = vec![0f32; positions * p.oc * chunk_rows * tw];
        let mut out = vec![0f32; p.n * p.oc * p.oh * p.ow];
        // Once cancelled, the remaining chunks are skipped and the op fails (see
        // Tensor::conv2d): at 2048x2048 one SD 1.5 convolution runs for seconds.
        let watch = interrupt::watch();
        let mut r0 = 0;
        while r0 < tile_rows && !watch.is_cancelled() {
            let rows = chunk_rows.min(tile_rows - r0);
            let tiles = rows * tw;
            let v = &mut v[..positions * p.c * tiles];
            let m = &mut m[..positions * p.oc * tiles];
            // V: [c][position][tile].
            v.par_chunks_mut(positions * tiles)
                .enumerate()
                .for_each(|(ci, dst)| input_tiles_simd(self, x, p, ci, r0, rows, dst));
            // M[p] = U[p] V[p]: [position][oc][tile].
            let inner = positions < rayon::current_num_threads();
            m.par_chunks_mut(p.oc * tiles)
                .enumerate()
                .for_each(|(pos, dst)| {
                    let lhs = MatRef {
                        data: &u[pos * p.c..],
                        row_stride: positions * p.c,
                        col_stride: 1,
                    };
                    let rhs = MatRef {
                        data: &v[pos * tiles..],
                        row_stride: positions * tiles,
                        col_stride: 1,
                    };
                    let product = Product {
                        m: p.oc,
                        n: tiles,
                        k: p.c,
                        lhs,
                        rhs,
                        dst_row_stride: tiles,
                        accumulate: false,
                    };
                    sgemm(product, dst, inner);
                });
            let m = &*m;
            out.par_chunks_mut(p.oh * p.ow)
                .enumerate()
                .for_each(|(plane, dst)| {
                    let (b, oc) = (plane / p.oc, plane % p.oc);
                    // The chunk's tile rows that belong to this image.
                    let first = r0.max(b * th);
                    let end = (r0 + rows).min((b + 1) * th);
                    if first < end {
                        let r = PlaneRows {
                            oc,
                            bias: bias.map_or(0.0, |bias| bias[oc]),
                            tiles,
                            first: first - r0,
                            ty0: first - b * th,
                            rows: end - first,
                        };
                        output_tiles_simd(self, m, p, r, dst);
                    }
                });
            r0 += rows;
        }
        out
    }

    /// `U = G g G^T` for every (oc, c) pair, as `[oc][position][c]`.
    fn weights(&self, weight: &[f32], c: usize, oc: usize) -> Vec<f32> {
        let mut u = vec![0f32; oc * A * A * c];
        u.par_chunks_mut(A * A * c)
            .zip(weight.par_chunks(c * 9))
            .for_each(|(dst, kernels)| weight_tiles_simd(self, kernels, dst));
        u
    }
}

/// `V = B^T d B` of channel `ci` for the tiles of global tile rows `r0..r0 + rows`, into
/// `dst` (`[position][tile]`, tiles numbered from `r0`'s first).
///
/// Per tile row: the vertical pass combines whole input rows (contiguous, and the padding
/// rows are skipped), its results are split by column phase (padded column `X` to
/// `[X % M][X / M]`), and the horizontal pass then reads contiguous slices too.
#[inline(always)]
fn input_tiles<const A: usize, const M: usize, const FMA: bool>(
    t: &Transform<A, M>,
    x: &[f32],
    p: &Conv2dParams,
    ci: usize,
    r0: usize,
    rows: usize,
    dst: &mut [f32],
) {
    let th = p.oh.div_ceil(M);
    let tw = p.ow.div_ceil(M);
    let tiles = rows * tw;
    // Each phase holds tw + 1 columns: a tile reads A <= 2 M of them.
    let len = tw + 1;
    let width = M * len;
    // Padded rows: columns outside `pad_left..pad_left + w` stay 0.
    let mut vertical = vec![0f32; A * width];
    let mut phases = vec![0f32; A * width];
    for row in 0..rows {
        let r = r0 + row;
        let (b, ty) = (r / th, r % th);
        let plane = &x[(b * p.c + ci) * p.h * p.w..][..p.h * p.w];
        let input_row = |k: usize| {
            let iy = (ty * M + k).checked_sub(p.pad_top)?;
            (iy < p.h).then(|| &plane[iy * p.w..][..p.w])
        };
        for (coefs, line) in t.bt.iter().zip(vertical.chunks_exact_mut(width)) {
            let line = &mut line[p.pad_left..p.pad_left + p.w];
            let terms = coefs
                .iter()
                .enumerate()
                .filter_map(|(k, &c)| Some((c, input_row(k)?)));
            combine::<FMA>(line, 0.0, terms.filter(|(c, _)| *c != 0.0));
        }
        for (line, split) in vertical
            .chunks_exact(width)
            .zip(phases.chunks_exact_mut(width))
        {
            deinterleave::<M>(line, split);
        }
        for (i, split) in phases.chunks_exact(width).enumerate() {
            for (j, coefs) in t.bt.iter().enumerate() {
                let out = &mut dst[(i * A + j) * tiles + row * tw..][..tw];
                let terms = coefs
                    .iter()
                    .enumerate()
                    .filter(|(_, &c)| c != 0.0)
                    .map(|(l, &c)| (c, &split[(l % M) * len + l / M..][..tw]));
                combine::<FMA>(out, 0.0, terms);
            }
        }
    }
}

/// Which tile rows of one output plane a chunk's products hold.
#[derive(Clone, Copy)]
struct PlaneRows {
    /// The output channel, and its bias.
    oc: usize,
    bias: f32,
    /// Tiles in the chunk (the products' row length).
    tiles: usize,
    /// The first of them in chunk tile rows, and in this image's tile rows.
    first: usize,
    ty0: usize,
    rows: usize,
}

/// `Y = A^T M A + bias` of the tile rows `r` of one output plane, into that plane.
#[inline(always)]
fn output_tiles<const A: usize, const M: usize, const FMA: bool>(
    t: &Transform<A, M>,
    m: &[f32],
    p: &Conv2dParams,
    r: PlaneRows,
    dst: &mut [f32],
) {
    let PlaneRows {
        oc,
        bias,
        tiles,
        first,
        ty0,
        rows,
    } = r;
    let tw = p.ow.div_ceil(M);
    // Rows of the vertical pass, `[io][j][tx]`, and of one output row split by phase,
    // `[jo][tx]`: contiguous over tiles.
    let mut vertical = vec![0f32; M * A * tw];
    let mut split = vec![0f32; M * tw];
    for row in 0..rows {
        let tile0 = (first + row) * tw;
        let product = |i: usize, j: usize| &m[((i * A + j) * p.oc + oc) * tiles + tile0..][..tw];
        for (io, coefs) in t.at.iter().enumerate() {
            let oy = (ty0 + row) * M + io;
            if oy >= p.oh {
                break;
            }
            let vertical = &mut vertical[io * A * tw..][..A * tw];
            for (j, line) in vertical.chunks_exact_mut(tw).enumerate() {
                let terms = coefs.iter().enumerate().filter(|(_, &c)| c != 0.0);
                combine::<FMA>(line, 0.0, terms.map(|(i, &c)| (c, product(i, j))));
            }
            for (jo, line) in split.chunks_exact_mut(tw).enumerate() {
                let terms = t.at[jo].iter().enumerate().filter(|(_, &c)| c != 0.0);
                let terms = terms.map(|(j, &c)| (c, &vertical[j * tw..][..tw]));
                combine::<FMA>(line, bias, terms);
            }
            interleave::<M>(&split, &mut dst[oy * p.ow..(oy + 1) * p.ow]);
        }
    }
}

/// `U = G g G^T` of one output channel's kernels (`[c][3][3]`) into `dst` (`[position][c]`),
/// vectorised over the input channels.
#[inline(always)]
fn weight_tiles<const A: usize, const M: usize, const FMA: bool>(
    t: &Transform<A, M>,
    kernels: &[f32],
    dst: &mut [f32],
) {
    let c = kernels.len() / 9;
    // taps[k * 3 + l][ci] = g[ci][k][l].
    let mut taps = vec![0f32; 9 * c];
    for (ci, kernel) in kernels.chunks_exact(9).enumerate() {
        for (tap, &v) in kernel.iter().enumerate() {
            taps[tap * c + ci] = v;
        }
    }
    // Columns: half[i][l] = sum_k G[i][k] g[k][l]; then U[i][j] = sum_l G[j][l] half[i][l].
    let mut half = vec![0f32; A * 3 * c];
    for (i, rows) in half.chunks_exact_mut(3 * c).enumerate() {
        for (l, line) in rows.chunks_exact_mut(c).enumerate() {
            let terms = t.g[i].iter().enumerate().filter(|(_, &g)| g != 0.0);
            combine::<FMA>(
                line,
                0.0,
                terms.map(|(k, &g)| (g, &taps[(k * 3 + l) * c..][..c])),
            );
        }
    }
    for (pos, line) in dst.chunks_exact_mut(c).enumerate() {
        let (i, j) = (pos / A, pos % A);
        let terms = t.g[j].iter().enumerate().filter(|(_, &g)| g != 0.0);
        combine::<FMA>(
            line,
            0.0,
            terms.map(|(l, &g)| (g, &half[(i * 3 + l) * c..][..c])),
        );
    }
}

dispatch!(
    weight_tiles_simd<const A: usize, const M: usize>,
    weight_tiles(t: &Transform<A, M>, kernels: &[f32], dst: &mut [f32])
);
dispatch!(
    input_tiles_simd<const A: usize, const M: usize>,
    input_tiles(
        t: &Transform<A, M>,
        x: &[f32],
        p: &Conv2dParams,
        ci: usize,
        r0: usize,
        rows: usize,
        dst: &mut [f32]
    )
);
dispatch!(
    output_tiles_simd<const A: usize, const M: usize>,
    output_tiles(t: &Transform<A, M>, m: &[f32], p: &Conv2dParams, r: PlaneRows, dst: &mut [f32])
);

/// `out = shift + sum coef * src` over `terms`, one pass per term over contiguous slices.
#[inline(always)]
fn combine<'a, const FMA: bool>(
    out: &mut [f32],
    shift: f32,
    terms: impl Iterator<Item = (f32, &'a [f32])>,
) {
    let mut started = false;
    for (coef, src) in terms {
        let src = &src[..out.len()];
        if started {
            for (o, &s) in out.iter_mut().zip(src) {
                *o = madd::<FMA>(coef, s, *o);
            }
        } else {
            for (o, &s) in out.iter_mut().zip(src) {
                *o = madd::<FMA>(coef, s, shift);
            }
            started = true;
        }
    }
    if !started {
        out.fill(shift);
    }
}

/// `split[ph * len + k] = line[k * M + ph]` for `len = line.len() / M`: each phase's
/// columns side by side.
#[inline(always)]
fn deinterleave<const M: usize>(line: &[f32], split: &mut [f32]) {
    let len = line.len() / M;
    for (ph, out) in split.chunks_exact_mut(len).enumerate() {
        for (o, group) in out.iter_mut().zip(line.chunks_exact(M)) {
            *o = group[ph];
        }
    }
}

/// The inverse of [`deinterleave`] into a row that may end part-way into the last group:
/// `row[k * M + ph] = split[ph * len + k]`.
#[inline(always)]
fn interleave<const M: usize>(split: &[f32], row: &mut [f32]) {
    let len = split.len() / M;
    let k = row.len() / M;
    let mut groups = row.chunks_exact_mut(M);
    for (k, group) in groups.by_ref().enumerate() {
        for (ph, o) in group.iter_mut().enumerate() {
            *o = split[ph * len + k];
        }
    }
    for (ph, o) in groups.into_remainder().iter_mut().enumerate() {
        *o = split[ph * len + k];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::testing::random;

    /// Chunks take whole tile rows within the buffer bound, but at least `min_tiles`
    /// tiles while the image has them, and at least one row.
    #[test]
    fn chunks_take_enough_tiles() {
        let limits = ChunkLimits {
            max_elems: 1000,
            min_tiles: 64,
        };
        // 100 values per row: 10 rows fit the bound, and hold 160 tiles of 16.
        assert_eq!(limits.rows(100, 16, 40), 10);
        // 400 values per row: 2 rows fit, but 64 tiles need 4 rows.
        assert_eq!(limits.rows(400, 16, 40), 4);
        // The image has only 3 rows.
        assert_eq!(limits.rows(400, 16, 3), 3);
        // A row over the bound: still one row.
        let no_min = ChunkLimits {
            min_tiles: 0,
            ..limits
        };
        assert_eq!(no_min.rows(5000, 16, 40), 1);
        assert_eq!(ChunkLimits::DEFAULT.rows(usize::MAX, 1, 8), 8);
    }

    /// Chunks of one tile row, and chunks that straddle two images of the batch, give the
    /// result of a single chunk.
    #[test]
    fn chunking_tile_rows_keeps_the_result() {
        let p = Conv2dParams {
            n: 3,
            c: 5,
            h: 11,
            w: 9,
            oc: 4,
            kh: 3,
            kw: 3,
            stride: 1,
            pad_top: 1,
            pad_left: 1,
            oh: 11,
            ow: 9,
        };
        let x = random(&[3, 5, 11, 9], 1).to_vec().unwrap();
        let weight = random(&[4, 5, 3, 3], 2).to_vec().unwrap();
        let bias = random(&[4], 3).to_vec().unwrap();
        fn check<const A: usize, const M: usize>(
            t: &Transform<A, M>,
            x: &[f32],
            weight: &[f32],
            bias: &[f32],
            p: &Conv2dParams,
        ) {
            let limits = |max_elems| ChunkLimits {
                max_elems,
                min_tiles: 0,
            };
            let whole = t.conv_in_chunks(x, weight, Some(bias), p, limits(usize::MAX));
            // 1: one tile row per chunk; 2000 and 3000: two to four rows, so that some
            // chunks cross from one image to the next for each transform.
            for limit in [1, 2000, 3000] {
                let chunked = t.conv_in_chunks(x, weight, Some(bias), p, limits(limit));
                assert_eq!(chunked, whole, "F({M}x{M}), chunks of {limit} values");
            }
        }
        check(&F2, &x, &weight, &bias, &p);
        check(&F4, &x, &weight, &bias, &p);
    }
}
