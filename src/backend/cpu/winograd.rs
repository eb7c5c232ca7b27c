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

use super::conv::Conv2dParams;
use super::matmul::{sgemm, MatRef};

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

/// F(4x4, 3x3) with the points 0, +-1, +-2, infinity: 36 multiplies per 16 outputs (4x
/// fewer than im2col), at the price of larger coefficients and so larger rounding errors.
#[allow(dead_code)]
pub(crate) const F4: Transform<6, 4> = Transform {
    bt: [
        [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
        [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
        [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
        [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
        [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
        [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
    ],
    g: [
        [1.0 / 4.0, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ],
    at: [
        [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
        [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
        [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
    ],
};

/// Upper bound on the transformed input and product buffers of one chunk together, in f32
/// elements (8 MiB; larger chunks measured no faster).
const MAX_CHUNK_ELEMS: usize = 2 << 20;

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
        assert!(applies(p), "winograd conv of {p:?}");
        assert_eq!(p.oh + 2, p.h + 2 * p.padding, "winograd conv of {p:?}");
        assert_eq!(p.ow + 2, p.w + 2 * p.padding, "winograd conv of {p:?}");
        let positions = A * A;
        let (th, tw) = (p.oh.div_ceil(M), p.ow.div_ceil(M));
        let tile_rows = p.n * th;
        let u = self.weights(weight, p.c, p.oc);
        let per_row = positions * (p.c + p.oc) * tw;
        let chunk_rows = (MAX_CHUNK_ELEMS / per_row.max(1)).clamp(1, tile_rows);
        let mut v = vec![0f32; positions * p.c * chunk_rows * tw];
        let mut m = vec![0f32; positions * p.oc * chunk_rows * tw];
        let mut out = vec![0f32; p.n * p.oc * p.oh * p.ow];
        let mut r0 = 0;
        while r0 < tile_rows {
            let rows = chunk_rows.min(tile_rows - r0);
            let tiles = rows * tw;
            let v = &mut v[..positions * p.c * tiles];
            let m = &mut m[..positions * p.oc * tiles];
            // V: [c][position][tile].
            v.par_chunks_mut(positions * tiles)
                .enumerate()
                .for_each(|(ci, dst)| self.input_tiles(x, p, ci, r0, rows, dst));
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
                    sgemm(p.oc, tiles, p.c, lhs, rhs, dst, tiles, false, inner);
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
                        let shift = bias.map_or(0.0, |bias| bias[oc]);
                        self.output_tiles(
                            m,
                            p,
                            oc,
                            tiles,
                            first - r0,
                            first - b * th,
                            end - first,
                            shift,
                            dst,
                        );
                    }
                });
            r0 += rows;
        }
        out
    }

    /// `U = G g G^T` for every (oc, c) pair, as `[oc][position][c]`.
    fn weights(&self, weight: &[f32], c: usize, oc: usize) -> Vec<f32> {
        let positions = A * A;
        let mut u = vec![0f32; oc * positions * c];
        u.par_chunks_mut(positions * c)
            .zip(weight.par_chunks(c * 9))
            .for_each(|(dst, kernels)| {
                for (ci, g) in kernels.chunks_exact(9).enumerate() {
                    // t = G g (A x 3), then U = t G^T (A x A).
                    let mut t = [[0f32; 3]; A];
                    for (i, row) in t.iter_mut().enumerate() {
                        for (l, value) in row.iter_mut().enumerate() {
                            *value = (0..3).map(|k| self.g[i][k] * g[k * 3 + l]).sum();
                        }
                    }
                    for (i, row) in t.iter().enumerate() {
                        for j in 0..A {
                            let value: f32 = (0..3).map(|l| row[l] * self.g[j][l]).sum();
                            dst[(i * A + j) * c + ci] = value;
                        }
                    }
                }
            });
        u
    }

    /// `V = B^T d B` of channel `ci` for the tiles of global tile rows `r0..r0 + rows`,
    /// into `dst` (`[position][tile]`, tiles numbered from `r0`'s first).
    ///
    /// Rows are kept split by phase (padded column `X` at `[X % M][X / M]`) so that both
    /// passes run over contiguous slices.
    fn input_tiles(
        &self,
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
        let mut d = vec![0f32; A * width];
        let mut t = vec![0f32; A * width];
        for row in 0..rows {
            let r = r0 + row;
            let (b, ty) = (r / th, r % th);
            let plane = &x[(b * p.c + ci) * p.h * p.w..][..p.h * p.w];
            // The A input rows, split by phase; the padding stays 0.
            for (k, line) in d.chunks_exact_mut(width).enumerate() {
                let iy = (ty * M + k) as isize - p.padding as isize;
                if iy < 0 || iy as usize >= p.h {
                    line.fill(0.0);
                    continue;
                }
                let src = &plane[iy as usize * p.w..][..p.w];
                line.fill(0.0);
                // Padded column X = ix + padding sits at [X % M][X / M].
                for (ix, &v) in src.iter().enumerate().take(width - p.padding.min(width)) {
                    let col = ix + p.padding;
                    line[(col % M) * len + col / M] = v;
                }
            }
            // Columns: t[i] = sum_k B^T[i][k] d[k].
            for (i, line) in t.chunks_exact_mut(width).enumerate() {
                line.fill(0.0);
                for (k, src) in d.chunks_exact(width).enumerate() {
                    let coef = self.bt[i][k];
                    if coef != 0.0 {
                        for (o, &s) in line.iter_mut().zip(src) {
                            *o += coef * s;
                        }
                    }
                }
            }
            // Rows within each tile: V[i * A + j][tx] = sum_l B^T[j][l] t[i][tx * M + l].
            for (i, line) in t.chunks_exact(width).enumerate() {
                for j in 0..A {
                    let out = &mut dst[(i * A + j) * tiles + row * tw..][..tw];
                    out.fill(0.0);
                    for l in 0..A {
                        let coef = self.bt[j][l];
                        if coef != 0.0 {
                            let src = &line[(l % M) * len + l / M..][..tw];
                            for (o, &s) in out.iter_mut().zip(src) {
                                *o += coef * s;
                            }
                        }
                    }
                }
            }
        }
    }

    /// `Y = A^T M A + bias` of output channel `oc` for `rows` tile rows of one image (chunk
    /// tile row `first` onwards, image tile row `ty0` onwards), into its output plane.
    #[allow(clippy::too_many_arguments)]
    fn output_tiles(
        &self,
        m: &[f32],
        p: &Conv2dParams,
        oc: usize,
        tiles: usize,
        first: usize,
        ty0: usize,
        rows: usize,
        bias: f32,
        dst: &mut [f32],
    ) {
        let tw = p.ow.div_ceil(M);
        // h[i][jo][tx] and y[jo][tx]: split by output phase, contiguous over tiles.
        let mut h = vec![0f32; A * M * tw];
        let mut y = vec![0f32; M * tw];
        for row in 0..rows {
            let tile0 = (first + row) * tw;
            // Rows of each tile: h[i][jo] = sum_j A^T[jo][j] M[i * A + j].
            for (i, hi) in h.chunks_exact_mut(M * tw).enumerate() {
                for (jo, line) in hi.chunks_exact_mut(tw).enumerate() {
                    line.fill(0.0);
                    for j in 0..A {
                        let coef = self.at[jo][j];
                        if coef != 0.0 {
                            let src = &m[((i * A + j) * p.oc + oc) * tiles + tile0..][..tw];
                            for (o, &s) in line.iter_mut().zip(src) {
                                *o += coef * s;
                            }
                        }
                    }
                }
            }
            // Columns: output row io = bias + sum_i A^T[io][i] h[i].
            for io in 0..M {
                let oy = (ty0 + row) * M + io;
                if oy >= p.oh {
                    break;
                }
                y.fill(bias);
                for (i, hi) in h.chunks_exact(M * tw).enumerate() {
                    let coef = self.at[io][i];
                    if coef != 0.0 {
                        for (o, &s) in y.iter_mut().zip(hi) {
                            *o += coef * s;
                        }
                    }
                }
                let out = &mut dst[oy * p.ow..(oy + 1) * p.ow];
                for (tx, tile) in out.chunks_mut(M).enumerate() {
                    for (jo, o) in tile.iter_mut().enumerate() {
                        *o = y[jo * tw + tx];
                    }
                }
            }
        }
    }
}
