//! Matrix products (`shaders/matmul.wgsl`). Mirrors `backend::cpu::matmul`.
//!
//! One workgroup of [`WORKGROUP`] threads computes a [`TILE`] x [`TILE`] output tile of one
//! batch entry (a 4 x 4 block per thread), walking K in slices of 16 staged in workgroup
//! memory. The grid is column tiles x row tiles x batch entries, split into several
//! dispatches where a dimension exceeds the adapter's limit.
//!
//! The rhs (`Tensor::linear`'s weight) may be f16: the kernels' f16 variant reads it
//! directly, accumulating in f32. The lhs and the bias are widened to f32 when they are f16.

use bytemuck::{Pod, Zeroable};

use super::context::Kernel;
use super::elementwise::u32_of;
use super::GpuStorage;
use crate::backend::cpu::matmul::MatmulDims;
use crate::error::{Error, Result};
use crate::shader;

/// `lhs @ rhs`, any shape (scalar loads).
const MATMUL_NN: Kernel = Kernel::new(shader!("matmul"), "matmul_nn");
/// `lhs @ rhs` with vec4 loads: k % 4 == 0 and n % 4 == 0.
const MATMUL_NN_VEC4: Kernel = Kernel::new(shader!("matmul"), "matmul_nn_vec4");
/// `lhs @ rhs^T`, any shape (scalar loads).
const MATMUL_NT: Kernel = Kernel::new(shader!("matmul"), "matmul_nt");
/// `lhs @ rhs^T` with vec4 loads: k % 4 == 0.
const MATMUL_NT_VEC4: Kernel = Kernel::new(shader!("matmul"), "matmul_nt_vec4");

/// Output rows and columns per workgroup (`TILE` in the shader).
pub const TILE: usize = 64;
/// Threads per workgroup: `@workgroup_size(16, 16)` in the shader, each owning 4 x 4 outputs.
pub const WORKGROUP: u32 = 256;

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
}

/// Batched `a @ b` (or `a @ b^T`) plus an optional bias row, as `cpu::matmul::matmul`.
pub fn matmul(
    a: &GpuStorage,
    b: &GpuStorage,
    bias: Option<&GpuStorage>,
    dims: MatmulDims,
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
        transpose_rhs,
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
    let limit = ctx.limits.max_storage_buffer_binding_size;
    for (what, bytes) in [
        ("lhs", a.byte_len()),
        ("rhs", b.byte_len()),
        ("output", out_len as u64 * 4),
    ] {
        if bytes > limit {
            return Err(Error::Gpu(format!(
                "matmul {dims:?}: the {what} ({bytes} bytes) exceeds this adapter's largest storage binding ({limit} bytes)"
            )));
        }
    }
    let out = GpuStorage::output(ctx, out_len);
    if out_len == 0 {
        return Ok(out);
    }
    // vec4 loads where every row a tile loads is whole vec4s (k = 0 loads nothing).
    let vec4 = k > 0 && k % 4 == 0;
    let kernel = b.weight_kernel(match (transpose_rhs, vec4) {
        (true, true) => MATMUL_NT_VEC4,
        (true, false) => MATMUL_NT,
        (false, true) if n % 4 == 0 => MATMUL_NN_VEC4,
        (false, _) => MATMUL_NN,
    });
    let mut p = Params {
        m: m as u32,
        n: n as u32,
        k: k as u32,
        rhs_batched: rhs_batched as u32,
        has_bias: bias.is_some() as u32,
        col_tile_base: 0,
        row_tile_base: 0,
        batch_base: 0,
    };
    let max = ctx.limits.max_compute_workgroups_per_dimension.max(1) as usize;
    let (col_tiles, row_tiles) = (n.div_ceil(TILE), m.div_ceil(TILE));
    for batch_base in (0..batch).step_by(max) {
        for row_base in (0..row_tiles).step_by(max) {
            for col_base in (0..col_tiles).step_by(max) {
                p.batch_base = batch_base as u32;
                p.row_tile_base = row_base as u32;
                p.col_tile_base = col_base as u32;
                let groups = [
                    (col_tiles - col_base).min(max) as u32,
                    (row_tiles - row_base).min(max) as u32,
                    (batch - batch_base).min(max) as u32,
                ];
                ctx.dispatch(
                    kernel,
                    bytemuck::bytes_of(&p),
                    &[
                        a.binding(),
                        b.binding_any(),
                        // Unread without a bias; any buffer fills the slot.
                        bias.unwrap_or(a).binding(),
                        out.binding(),
                    ],
                    groups,
                );
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use crate::backend::cpu::matmul::MatmulDims;
    use crate::backend::gpu::{test_device, GpuStorage};
    use crate::tensor::testing::{assert_close, assert_ops_agree, f16_values, random, random_f16};
    use crate::tensor::Device;

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
                random(&[rows, inp], 700),
                random_f16(&[out, inp], 701),
                random(&[out], 702),
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
            let a = random(&[2, m, k], 710);
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
        let inputs = [random(&a_shape, seed), random(&b_shape, seed + 1)];
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
                random(&[rows, inp], 200),
                random(&[out, inp], 201),
                random(&[out], 202),
            ];
            assert_ops_agree("linear + bias", &inputs, |t| {
                t[0].linear(&t[1], Some(&t[2]))
            });
            assert_ops_agree("linear", &inputs, |t| t[0].linear(&t[1], None));
        }
        let inputs = [
            random(&[2, 7, 48], 203),
            random(&[24, 48], 204),
            random(&[24], 205),
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
                random(&[rows, inp], 300),
                random(&[out, inp], 301),
                random(&[out], 302),
            ];
            assert_ops_agree(
                &format!("linear [{rows}, {inp}] x [{out}, {inp}]^T"),
                &inputs,
                |t| t[0].linear(&t[1], Some(&t[2])),
            );
        }
    }

    #[test]
    fn grids_beyond_one_dispatch_match_the_cpu() {
        // More batch entries, and more row tiles, than one grid dimension holds (65535).
        check(&[70_000], 1, 2, 3, true, false, 500);
        check(&[], 65_600 * 64, 1, 1, false, true, 502);
    }

    #[test]
    fn an_output_beyond_the_binding_limit_is_a_clear_error() {
        let Some(gpu) = crate::backend::gpu::test_device() else {
            return;
        };
        let limit = gpu.0.limits.max_storage_buffer_binding_size;
        if limit > 1 << 30 {
            return; // too large an output to build cheaply
        }
        let (m, n) = (8192, (limit as usize / 4).div_ceil(8192) + 1);
        let device = Device::Gpu(gpu);
        let a = random(&[m, 1], 600).to_device(&device).expect("upload");
        let b = random(&[1, n], 601).to_device(&device).expect("upload");
        let err = a.matmul(&b).expect_err("an output past the binding limit");
        assert!(err.to_string().contains("matmul"), "{err}");
    }

    #[test]
    fn empty_products_match_the_cpu() {
        check(&[], 0, 5, 3, false, false, 400);
        check(&[2], 4, 5, 0, true, true, 402);
        let inputs = [
            random(&[3, 0], 404),
            random(&[6, 0], 405),
            random(&[6], 406),
        ];
        assert_ops_agree("linear with no inputs", &inputs, |t| {
            t[0].linear(&t[1], Some(&t[2]))
        });
    }
}
