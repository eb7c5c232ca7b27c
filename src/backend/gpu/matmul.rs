//! Matrix products (`shaders/matmul.wgsl`). Mirrors `backend::cpu::matmul`.
//!
//! One workgroup computes an output tile of one batch entry (a block of it per thread),
//! walking K in slices of 16 staged in workgroup memory; the tile's shape is the device's
//! tuning's ([`TileShape::of`]: 64 x 64 tiles of 256 threads on hardware GPUs). On llvmpipe
//! (2 EPYC cores) the software shape (32 x 64 tiles of 32 threads, 8 x 8 each) ran the
//! tests' tiny linear layers, [32, 64] x [64, 64]^T, [32, 64] x [256, 64]^T, [154, 32] x
//! [32, 32]^T and [128, 64] x [64, 64]^T, in 0.45-0.50 / 0.91-0.93 / 0.67-0.72 / 0.89-0.90
//! ms against 1.31-1.43 / 2.45-2.51 / 1.26-1.37 / 1.36-1.61 ms with the hardware shape. The grid is column tiles x row tiles x batch entries, split into several
//! dispatches where a dimension exceeds the adapter's limit.
//!
//! The rhs (`Tensor::linear`'s weight) may be f16: the kernels' f16 variant reads it
//! directly, accumulating in f32. The lhs and the bias are widened to f32 when they are f16.

use bytemuck::{Pod, Zeroable};

use super::context::{Kernel, TileShape};
use super::elementwise::u32_of;
use super::storage::BindLimit;
use super::GpuStorage;
use crate::error::{Error, Result};
use crate::shader;
use crate::tensor::params::MatmulDims;

/// `lhs @ rhs`, any shape (scalar loads).
const MATMUL_NN: Kernel = Kernel::new(shader!("matmul"), "matmul_nn").reading_weights();
/// `lhs @ rhs` with vec4 loads: k % 4 == 0 and n % 4 == 0.
const MATMUL_NN_VEC4: Kernel = Kernel::new(shader!("matmul"), "matmul_nn_vec4").reading_weights();
/// `lhs @ rhs^T`, any shape (scalar loads).
const MATMUL_NT: Kernel = Kernel::new(shader!("matmul"), "matmul_nt").reading_weights();
/// `lhs @ rhs^T` with vec4 loads: k % 4 == 0.
const MATMUL_NT_VEC4: Kernel = Kernel::new(shader!("matmul"), "matmul_nt_vec4").reading_weights();

/// `lhs @ rhs^T` on cooperative matrices (gemm_coop.wgsl), 128 x 128 tiles, where the
/// device has them (`GpuContext::coop`).
const MATMUL_NT_COOP: Kernel =
    Kernel::cooperative(shader!("gemm_coop"), "matmul_nt_coop").reading_weights();
/// Output rows and columns per workgroup of `MATMUL_NT_COOP` (`TM`, `TN` in the shader).
const COOP_TILE: usize = 128;
/// `MATMUL_NT_COOP`'s K slice (`TK`): a split of K is a multiple of it.
const COOP_SLICE: usize = 32;
/// Adds the partial products of a split K (and the bias).
const SPLIT_SUM: Kernel = Kernel::new(shader!("matmul"), "split_sum");

/// Every kernel of this family, for the translation test (see `super::kernels`): the SIMT
/// kernels at both tunings' tile shapes.
pub(super) const KERNELS: &[Kernel] = &{
    let simt = [MATMUL_NN, MATMUL_NN_VEC4, MATMUL_NT, MATMUL_NT_VEC4];
    let mut all = [SPLIT_SUM; 10];
    let mut i = 0;
    while i < simt.len() {
        all[2 * i] = TileShape::WIDE.apply(simt[i]);
        all[2 * i + 1] = TileShape::FEW_THREADS.apply(simt[i]);
        i += 1;
    }
    all[8] = MATMUL_NT_COOP;
    all
};

/// The largest thread block matmul.wgsl holds (`MAX_BLOCK` vec4 accumulators); its loads
/// need whole column quads per thread.
const _: () = {
    let shapes = [TileShape::WIDE, TileShape::FEW_THREADS];
    let mut i = 0;
    while i < shapes.len() {
        assert!(shapes[i].rm * shapes[i].cn <= 16);
        i += 1;
    }
};

/// Workgroups a cooperative product should have before K is split: about two per
/// multiprocessor of a large GPU (132 on the H200). Measured there: products with 40
/// workgroups and K = 11520 (the UNet's 1280-channel convolutions at 16x16) ran at 8 TFLOP/s,
/// with 192 at 32 TFLOP/s, with 1280 at 43-52 TFLOP/s.
const SPLIT_TARGET: usize = 256;
/// The least K one split takes (16 slices), so that each still amortises its tile's setup.
const SPLIT_MIN_K: usize = 512;
/// The most splits of one product.
const MAX_SPLITS: usize = 16;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    rhs_batched: u32,
    has_bias: u32,
    col_tile_base: u32,
    row_tile_base: u32,
    batch_base: u32,
    /// K per split and the splits (gemm_coop.wgsl); the SIMT kernels read neither.
    k_split: u32,
    splits: u32,
    _pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SplitSumParams {
    mn: u32,
    n: u32,
    splits: u32,
    total: u32,
    has_bias: u32,
    _pad: [u32; 3],
}

/// How many parts to split K into for a cooperative product with `tiles` output tiles:
/// enough for [`SPLIT_TARGET`] workgroups, each part at least [`SPLIT_MIN_K`] long.
fn k_splits(tiles: usize, k: usize) -> usize {
    if tiles >= SPLIT_TARGET {
        return 1;
    }
    SPLIT_TARGET
        .div_ceil(tiles.max(1))
        .min(k / SPLIT_MIN_K)
        .clamp(1, MAX_SPLITS)
}

/// Batched `a @ b` (or `a @ b^T`) plus an optional bias row, as `cpu::matmul::matmul`.
pub fn matmul(
    a: &GpuStorage,
    b: &GpuStorage,
    bias: Option<&GpuStorage>,
    dims: MatmulDims,
) -> Result<GpuStorage> {
    matmul_limited(a, b, bias, dims, &BindLimit::of(&a.ctx))
}

/// [`matmul`] with bindings of at most `limit` (tests pass small ones). Where the lhs or
/// the output is larger than one binding (SDXL's feed-forward at 1024x1024: 8192 x 5120
/// outputs, 160 MiB, on adapters that bind 128 MiB), the rows run in bands, each binding
/// an aligned window of both; the rhs (a weight) must fit one binding.
fn matmul_limited(
    a: &GpuStorage,
    b: &GpuStorage,
    bias: Option<&GpuStorage>,
    dims: MatmulDims,
    limit: &BindLimit,
) -> Result<GpuStorage> {
    // b is read natively in either element type; the others as f32.
    let a = &*a.as_f32()?;
    let bias = bias.map(GpuStorage::as_f32).transpose()?;
    let bias = bias.as_deref();
    let MatmulDims {
        batch,
        m,
        n,
        k,
        rhs_batched,
        ..
    } = dims;
    let ctx = &a.ctx;
    let size = |what: &str, dims: &[usize]| -> Result<usize> {
        let mut len = 1usize;
        for &d in dims {
            len = len
                .checked_mul(d)
                .ok_or_else(|| Error::Gpu(format!("matmul: the {what} size {dims:?} overflows")))?;
        }
        u32_of(&format!("matmul {what} elements"), len).map(|l| l as usize)
    };
    let lhs_len = size("lhs", &[batch, m, k])?;
    let rhs_len = size("rhs", &[if rhs_batched { batch } else { 1 }, k, n])?;
    let out_len = size("output", &[batch, m, n])?;
    // The shader trusts these sizes: check that the buffers really hold them.
    let short = |what: &str, have: usize, need: usize| -> Result<()> {
        if have < need {
            return Err(Error::Gpu(format!(
                "matmul {dims:?}: the {what} holds {have} values, {need} needed"
            )));
        }
        Ok(())
    };
    short("lhs", a.len(), lhs_len)?;
    short("rhs", b.len(), rhs_len)?;
    if let Some(bias) = bias {
        short("bias", bias.len(), n)?;
    }
    let max = limit.max_bytes();
    let too_big = |what: &str, bytes: u64, why: &str| {
        Error::Gpu(format!(
            "matmul {dims:?}: the {what} ({bytes} bytes) exceeds this adapter's largest storage \
             binding ({max} bytes){why}"
        ))
    };
    if b.byte_len() > max {
        return Err(too_big("rhs", b.byte_len(), ""));
    }
    let out = GpuStorage::output(ctx, out_len);
    if out_len == 0 {
        return Ok(out);
    }
    if a.byte_len() <= max && out_len as u64 * 4 <= max {
        record(a.binding(), b, bias, out.binding(), dims, true);
        return Ok(out);
    }
    let (what, bytes) = if a.byte_len() > max {
        ("lhs", a.byte_len())
    } else {
        ("output", out_len as u64 * 4)
    };
    if rhs_batched && batch > 1 {
        return Err(too_big(
            what,
            bytes,
            ", and a batched rhs is not split in bands",
        ));
    }
    // Bands of rows of the whole batch (the rhs is shared), each starting at a row whose
    // lhs and output offsets are both aligned.
    let rows = batch * m;
    let align = limit.align_elems;
    let rows_aligning = |width: usize| align / gcd(width, align);
    let (ka, na) = (rows_aligning(k), rows_aligning(n));
    let step = ka / gcd(ka, na) * na;
    let band = limit.max_elems / k.max(n).max(1) / step * step;
    if band == 0 {
        return Err(too_big(what, bytes, ": not even one row band fits"));
    }
    for first in (0..rows).step_by(band) {
        let count = band.min(rows - first);
        let dims = MatmulDims {
            batch: 1,
            m: count,
            ..dims
        };
        record(
            a.window(first * k, count * k),
            b,
            bias,
            out.window(first * n, count * n),
            dims,
            false,
        );
    }
    Ok(out)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a.max(1)
    } else {
        gcd(b, a % b)
    }
}

/// Records the product of `lhs` (f32, `dims.batch * m * k` values) by `b` into `out`
/// (`dims.batch * m * n`), splitting K across workgroups where that pays and `may_split`.
fn record(
    lhs: wgpu::BindingResource<'_>,
    b: &GpuStorage,
    bias: Option<&GpuStorage>,
    out: wgpu::BindingResource<'_>,
    dims: MatmulDims,
    may_split: bool,
) {
    let MatmulDims {
        batch,
        m,
        n,
        k,
        rhs_batched,
        transpose_rhs,
    } = dims;
    let ctx = &b.ctx;
    let out_len = batch * m * n;
    let limit = ctx.limits.max_storage_buffer_binding_size;
    // Cooperative matrices for nn.Linear's products where the device has them; else vec4
    // loads where every row a tile loads is whole vec4s (k = 0 loads nothing).
    let vec4 = k > 0 && k % 4 == 0;
    let coop = ctx.coop && transpose_rhs;
    let shape = TileShape::of(ctx.tuning);
    let kernel = b.weight_kernel(match (transpose_rhs, vec4) {
        _ if coop => MATMUL_NT_COOP,
        (true, true) => shape.apply(MATMUL_NT_VEC4),
        (true, false) => shape.apply(MATMUL_NT),
        (false, true) if n % 4 == 0 => shape.apply(MATMUL_NN_VEC4),
        (false, _) => shape.apply(MATMUL_NN),
    });
    let (col_tiles, row_tiles) = if coop {
        (n.div_ceil(COOP_TILE), m.div_ceil(COOP_TILE))
    } else {
        (n.div_ceil(shape.cols()), m.div_ceil(shape.rows()))
    };
    let mut splits = if coop && may_split {
        k_splits(col_tiles * row_tiles * batch, k)
    } else {
        1
    };
    let max = ctx.limits.max_compute_workgroups_per_dimension.max(1) as usize;
    let parts_len = splits * out_len;
    if splits > 1
        && (batch * splits > max
            || parts_len as u64 * 4 > limit
            || u32::try_from(parts_len).is_err())
    {
        splits = 1;
    }
    let k_split = k
        .div_ceil(splits)
        .next_multiple_of(COOP_SLICE)
        .max(COOP_SLICE);
    // With a split K the kernel writes partial products, which split_sum adds up.
    let parts = (splits > 1).then(|| GpuStorage::output(ctx, parts_len));
    let mut p = Params {
        m: m as u32,
        n: n as u32,
        k: k as u32,
        rhs_batched: rhs_batched as u32,
        has_bias: bias.is_some() as u32,
        col_tile_base: 0,
        row_tile_base: 0,
        batch_base: 0,
        k_split: k_split as u32,
        splits: splits as u32,
        _pad: [0; 2],
    };
    let zs = batch * splits;
    for batch_base in (0..zs).step_by(max) {
        for row_base in (0..row_tiles).step_by(max) {
            for col_base in (0..col_tiles).step_by(max) {
                p.batch_base = batch_base as u32;
                p.row_tile_base = row_base as u32;
                p.col_tile_base = col_base as u32;
                let groups = [
                    (col_tiles - col_base).min(max) as u32,
                    (row_tiles - row_base).min(max) as u32,
                    (zs - batch_base).min(max) as u32,
                ];
                ctx.dispatch(
                    kernel,
                    bytemuck::bytes_of(&p),
                    &[
                        lhs.clone(),
                        b.binding_any(),
                        // Unread without a bias; any buffer fills the slot.
                        bias.map_or(lhs.clone(), GpuStorage::binding),
                        parts.as_ref().map_or(out.clone(), GpuStorage::binding),
                    ],
                    groups,
                );
            }
        }
    }
    if let Some(parts) = parts {
        let sp = SplitSumParams {
            mn: (m * n) as u32,
            n: n as u32,
            splits: splits as u32,
            total: out_len as u32,
            has_bias: bias.is_some() as u32,
            _pad: [0; 3],
        };
        ctx.dispatch(
            SPLIT_SUM,
            bytemuck::bytes_of(&sp),
            &[
                parts.binding(),
                bias.map_or(lhs.clone(), GpuStorage::binding),
                out,
            ],
            ctx.groups_1d(out_len, super::context::WORKGROUP_1D),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{matmul_limited, BindLimit};
    use crate::backend::gpu::{test_device, GpuStorage};
    use crate::tensor::params::MatmulDims;
    use crate::tensor::testing::{
        assert_close, assert_ops_agree, f16_values, random_f16, random_f16_exact,
    };
    use crate::tensor::{Device, Tensor};

    #[test]
    fn f16_weights_match_the_cpu() {
        // Linear layers (the `nt` kernels): scalar loads (k % 4 != 0), vec4 loads, an odd
        // number of weights (a padded last word), an SD-sized projection.
        for (rows, inp, out) in [
            (77, 33, 37),
            (5, 1, 3),
            (3, 20, 128),
            (65, 36, 67),
            (2 * 77, 768, 320),
        ] {
            let inputs = [
                random_f16_exact(&[rows, inp], 700),
                random_f16(&[out, inp], 701),
                random_f16_exact(&[out], 702),
            ];
            let what = format!("linear [{rows}, {inp}] x f16 [{out}, {inp}]^T");
            assert_ops_agree(&format!("{what} + bias"), &inputs, |t| {
                t[0].linear(&t[1], Some(&t[2]))
            });
            assert_ops_agree(&what, &inputs, |t| t[0].linear(&t[1], None));
        }
        // An f16 rhs in plain products: `nn` scalar and vec4, `nt` through matmul_t, and a
        // batched rhs.
        for (m, n, k) in [(77, 37, 33), (65, 68, 20), (3, 129, 36), (1, 1, 1)] {
            let a = random_f16_exact(&[2, m, k], 710);
            assert_ops_agree(
                &format!("[2, {m}, {k}] @ f16 [{k}, {n}]"),
                &[a.clone(), random_f16(&[k, n], 711)],
                |t| t[0].matmul(&t[1]),
            );
            assert_ops_agree(
                &format!("[2, {m}, {k}] @ f16 [{n}, {k}]^T"),
                &[a.clone(), random_f16(&[n, k], 712)],
                |t| t[0].matmul_t(&t[1]),
            );
            assert_ops_agree(
                &format!("[2, {m}, {k}] @ f16 [2, {k}, {n}]"),
                &[a, random_f16(&[2, k, n], 713)],
                |t| t[0].matmul(&t[1]),
            );
        }
    }

    #[test]
    fn f16_lhs_and_bias_are_widened() {
        // `Tensor::from_f16` widens vectors at upload; the kernel still takes f16 ones (and
        // an f16 lhs) by widening them on the device.
        let Some(gpu) = test_device() else { return };
        let (m, n, k) = (9, 13, 11);
        let (a, b, bias) = (
            random_f16(&[m, k], 720),
            random_f16(&[n, k], 721),
            random_f16(&[n], 722),
        );
        let expected = a.linear(&b, Some(&bias)).unwrap().to_vec().unwrap();
        let up = |t| GpuStorage::from_f16(&gpu, &f16_values(t));
        let dims = MatmulDims {
            batch: 1,
            m,
            n,
            k,
            rhs_batched: false,
            transpose_rhs: true,
        };
        let (ga, gb, gbias) = (up(&a), up(&b), up(&bias));
        assert_eq!(gbias.is_f16(), gpu.keeps_f16());
        let got = super::matmul(&ga, &gb, Some(&gbias), dims).unwrap();
        assert!(!got.is_f16());
        assert_close(
            "f16 lhs, weight and bias",
            &got.to_f32().unwrap(),
            &expected,
        );
    }

    /// `[batch.., m, k] @ [k, n]` or `@ [n, k]^T`, rhs batched or shared, through
    /// `Tensor::matmul`/`matmul_t`.
    fn check(
        batch: &[usize],
        m: usize,
        n: usize,
        k: usize,
        rhs_batched: bool,
        transpose: bool,
        seed: u64,
    ) {
        let mut a_shape = batch.to_vec();
        a_shape.extend([m, k]);
        let mut b_shape = if rhs_batched { batch.to_vec() } else { vec![] };
        b_shape.extend(if transpose { [n, k] } else { [k, n] });
        let what = format!(
            "{a_shape:?} @ {b_shape:?}{}",
            if transpose { "^T" } else { "" }
        );
        let inputs = [
            random_f16_exact(&a_shape, seed),
            random_f16_exact(&b_shape, seed + 1),
        ];
        if transpose {
            assert_ops_agree(&what, &inputs, |t| t[0].matmul_t(&t[1]));
        } else {
            assert_ops_agree(&what, &inputs, |t| t[0].matmul(&t[1]));
        }
    }

    #[test]
    fn odd_shapes_match_the_cpu() {
        let mut seed = 10;
        // (m, n, k): not multiples of the tile or of 4, a single row, a single k, and the
        // vec4 path (k and n multiples of 4) with ragged tiles.
        for (m, n, k) in [
            (77, 37, 33),
            (1, 37, 33),
            (77, 37, 1),
            (1, 1, 1),
            (65, 68, 20),
            (3, 129, 36),
        ] {
            for transpose in [false, true] {
                for (batch, rhs_batched) in [(vec![], false), (vec![2], true), (vec![2], false)] {
                    check(&batch, m, n, k, rhs_batched, transpose, seed);
                    seed += 2;
                }
            }
        }
    }

    #[test]
    fn batched_3d_and_4d_operands_match_the_cpu() {
        // Attention-like products: scores q @ k^T and the weighted sum scores @ v.
        check(&[2, 3], 70, 70, 40, true, true, 100);
        check(&[2, 3], 70, 40, 70, true, false, 102);
        check(&[3], 17, 45, 64, true, false, 104);
        check(&[2, 2], 9, 31, 7, false, true, 106);
    }

    #[test]
    fn linear_with_and_without_bias_matches_the_cpu() {
        for (rows, inp, out) in [(77, 33, 37), (1, 64, 10), (5, 1, 3), (3, 20, 128)] {
            let inputs = [
                random_f16_exact(&[rows, inp], 200),
                random_f16_exact(&[out, inp], 201),
                random_f16_exact(&[out], 202),
            ];
            assert_ops_agree("linear + bias", &inputs, |t| {
                t[0].linear(&t[1], Some(&t[2]))
            });
            assert_ops_agree("linear", &inputs, |t| t[0].linear(&t[1], None));
        }
        let inputs = [
            random_f16_exact(&[2, 7, 48], 203),
            random_f16_exact(&[24, 48], 204),
            random_f16_exact(&[24], 205),
        ];
        assert_ops_agree("3-D linear + bias", &inputs, |t| {
            t[0].linear(&t[1], Some(&t[2]))
        });
    }

    #[test]
    fn linear_at_stable_diffusion_shapes_matches_the_cpu() {
        // The text-conditioned feed-forward ([2 * 77, 768] x [3072, 768]^T) and a
        // 64 x 64-latent projection ([2 * 4096, 320] x [320, 320]^T).
        for (rows, inp, out) in [(2 * 77, 768, 3072), (2 * 4096, 320, 320)] {
            let inputs = [
                random_f16_exact(&[rows, inp], 300),
                random_f16_exact(&[out, inp], 301),
                random_f16_exact(&[out], 302),
            ];
            assert_ops_agree(
                &format!("linear [{rows}, {inp}] x [{out}, {inp}]^T"),
                &inputs,
                |t| t[0].linear(&t[1], Some(&t[2])),
            );
        }
    }

    #[test]
    fn k_is_split_only_for_few_tiles_and_long_reductions() {
        use super::{k_splits, MAX_SPLITS, SPLIT_TARGET};
        assert_eq!(k_splits(SPLIT_TARGET, 100_000), 1);
        assert_eq!(k_splits(10, 300), 1);
        // The UNet's 1280-channel 3x3 convolution at 8x8, batch 2: 10 tiles, K = 11520.
        assert_eq!(k_splits(10, 11520), MAX_SPLITS.min(11520 / 512).min(26));
        assert_eq!(k_splits(1, 2048), 4);
        assert_eq!(k_splits(200, 4096), 2);
    }

    #[test]
    fn long_reductions_match_the_cpu() {
        // Few output tiles and a long K: on devices with cooperative matrices K is split
        // and the parts summed by split_sum (with the bias, and per batch entry).
        let inputs = [
            random_f16_exact(&[64, 2048], 800),
            random_f16(&[96, 2048], 801),
            random_f16_exact(&[96], 802),
        ];
        assert_ops_agree("linear [64, 2048] x [96, 2048]^T + bias", &inputs, |t| {
            t[0].linear(&t[1], Some(&t[2]))
        });
        assert_ops_agree("linear [64, 2048] x [96, 2048]^T", &inputs, |t| {
            t[0].linear(&t[1], None)
        });
        check(&[3], 40, 70, 1560, true, true, 804);
        check(&[2], 130, 20, 4000, false, true, 806);
    }

    #[test]
    fn grids_beyond_one_dispatch_match_the_cpu() {
        // More batch entries, and more row tiles, than one grid dimension holds (65535).
        check(&[70_000], 1, 2, 3, true, false, 500);
        check(&[], 65_600 * 64, 1, 1, false, true, 502);
    }

    /// Lhs and outputs larger than one binding run in row bands, each binding aligned
    /// windows: at the adapter's own limit (an output past it), and with small injected
    /// limits that make several bands of every product kind (bias, f16 weight, plain and
    /// transposed rhs, a shared rhs over a batch, rows not a multiple of the band).
    #[test]
    fn products_larger_than_one_binding_run_in_row_bands() {
        let Some(gpu) = test_device() else {
            return;
        };
        let device = Device::Gpu(gpu.clone());
        let up = |t: &Tensor| t.to_device(&device).expect("upload");
        let limit = gpu.0.limits.max_storage_buffer_binding_size;
        if limit <= 1 << 30 {
            // An output just past the real limit: 8192 rows of n, from k = 1.
            let (m, n) = (8192, (limit as usize / 4).div_ceil(8192) + 1);
            let (a, b) = (
                random_f16_exact(&[m, 1], 600),
                random_f16_exact(&[1, n], 601),
            );
            let got = up(&a).matmul(&up(&b)).expect("a banded product");
            assert_close(
                "an output past the adapter's limit",
                &got.to_vec().unwrap(),
                &a.matmul(&b).unwrap().to_vec().unwrap(),
            );
        }
        let cases = [
            // (batch, m, n, k, transposed rhs, bias, f16 rhs, limit in bytes)
            (1, 300, 40, 24, true, true, false, 8 << 10),
            (1, 257, 33, 70, true, false, true, 16 << 10),
            (2, 130, 24, 12, false, true, false, 4 << 10),
            (3, 50, 64, 40, false, false, true, 16 << 10),
        ];
        for (case, &(batch, m, n, k, transposed, bias, f16, max_bytes)) in cases.iter().enumerate()
        {
            let seed = 900 + 10 * case as u64;
            let a = random_f16_exact(&[batch, m, k], seed);
            let b_shape = if transposed { [n, k] } else { [k, n] };
            let b = if f16 {
                random_f16(&b_shape, seed + 1)
            } else {
                random_f16_exact(&b_shape, seed + 1)
            };
            let c = random_f16_exact(&[n], seed + 2);
            let dims = MatmulDims {
                batch,
                m,
                n,
                k,
                rhs_batched: false,
                transpose_rhs: transposed,
            };
            let storage = |t: &Tensor| GpuStorage::from_f32(&gpu, &t.to_vec().unwrap());
            let (ga, gc) = (storage(&a), storage(&c));
            let gb = if f16 {
                GpuStorage::from_f16(&gpu, &f16_values(&b))
            } else {
                storage(&b)
            };
            let limit = BindLimit::new(&gpu.0, max_bytes);
            assert!(
                (batch * m * n * 4) as u64 > max_bytes,
                "case {case} fits one binding"
            );
            let out = matmul_limited(&ga, &gb, bias.then_some(&gc), dims, &limit)
                .expect("a banded product");
            let flat = a.reshape(&[batch * m, k]).unwrap();
            let want = if transposed {
                flat.linear(&b, bias.then_some(&c))
            } else {
                let p = flat.matmul(&b).unwrap();
                if bias {
                    p.add(&c)
                } else {
                    Ok(p)
                }
            }
            .unwrap()
            .to_vec()
            .unwrap();
            assert_close(&format!("case {case}"), &out.to_f32().unwrap(), &want);
        }
    }

    #[test]
    fn empty_products_match_the_cpu() {
        check(&[], 0, 5, 3, false, false, 400);
        check(&[2], 4, 5, 0, true, true, 402);
        let inputs = [
            random_f16_exact(&[3, 0], 404),
            random_f16_exact(&[6, 0], 405),
            random_f16_exact(&[6], 406),
        ];
        assert_ops_agree("linear with no inputs", &inputs, |t| {
            t[0].linear(&t[1], Some(&t[2]))
        });
    }
}
