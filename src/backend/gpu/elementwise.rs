//! Elementwise kernels (`shaders/elementwise.wgsl`): unary activations, broadcasting binary
//! ops, axpby and GEGLU. Each mirrors `backend::cpu::elementwise`. Also the f16 -> f32 cast
//! behind `GpuStorage::as_f32`, which every op that does not read f16 natively applies to its
//! operands (see `storage`'s module documentation).

use bytemuck::{Pod, Zeroable};

use super::context::{Kernel, WORKGROUP_1D};
use super::storage::BindLimit;
use super::GpuStorage;
use crate::error::{Error, Result};
use crate::shader;
use crate::tensor::params::broadcast_strides;
use crate::tensor::{BinaryOp, UnaryOp};

const UNARY: Kernel = Kernel::new(shader!("elementwise"), "unary");
const BINARY: Kernel = Kernel::new(shader!("elementwise"), "binary");
const AXPBY: Kernel = Kernel::new(shader!("elementwise"), "axpby");
const GEGLU: Kernel = Kernel::new(shader!("elementwise"), "geglu");
/// Widens its input to f32; built with f16 weights (`W`) for f16 inputs.
const WIDEN: Kernel = Kernel::new(shader!("elementwise"), "widen").reading_weights();

/// Every kernel of this family, for the translation test (see `super::kernels`).
pub(super) const KERNELS: &[Kernel] = &[UNARY, BINARY, AXPBY, GEGLU, WIDEN];

/// Highest rank the broadcasting kernel takes (`MAX_RANK` in the shader).
const MAX_RANK: usize = 8;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct UnaryParams {
    len: u32,
    op: u32,
    a: f32,
    b: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct BinaryParams {
    len: u32,
    op: u32,
    rank: u32,
    base: u32,
    windowed: u32,
    _pad: [u32; 3],
    shape: [u32; MAX_RANK],
    lhs_strides: [u32; MAX_RANK],
    rhs_strides: [u32; MAX_RANK],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AxpbyParams {
    len: u32,
    a: f32,
    b: f32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct GegluParams {
    len: u32,
    half: u32,
}

/// Element counts and strides travel as u32: a tensor beyond 2³² elements is refused.
pub(crate) fn u32_of(what: &str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| {
        Error::Gpu(format!(
            "{what} ({n}) does not fit the GPU kernels' 32-bit indices"
        ))
    })
}

/// An f16 storage widened to f32 on the device (`GpuStorage::as_f32`).
pub(crate) fn widen_f16(x: &GpuStorage) -> Result<GpuStorage> {
    widen_within(x, &BindLimit::of(&x.ctx))
}

/// [`widen_f16`] binding at most `limit` (f32 elements) at once.
fn widen_within(x: &GpuStorage, limit: &BindLimit) -> Result<GpuStorage> {
    let ctx = &x.ctx;
    let out = GpuStorage::output(ctx, x.len());
    // Windows of the output (f32) and the input (f16) start at the same element: aligned
    // for both sizes.
    let limit = limit.aligned_for(x.elem_bytes());
    for (start, len) in passes(&limit, x.len(), 1)? {
        let p = GegluParams {
            len: u32_of("elements", len)?,
            half: 0,
        };
        ctx.dispatch(
            x.weight_kernel(WIDEN),
            bytemuck::bytes_of(&p),
            &[x.window_any(start, len), out.window(start, len)],
            ctx.groups_1d(len, WORKGROUP_1D),
        );
    }
    Ok(out)
}

pub fn unary(x: &GpuStorage, op: UnaryOp) -> Result<GpuStorage> {
    let x = &*x.as_f32()?;
    let (code, a, b) = match op {
        UnaryOp::Silu => (0, 0.0, 0.0),
        UnaryOp::Gelu => (1, 0.0, 0.0),
        UnaryOp::QuickGelu => (2, 0.0, 0.0),
        UnaryOp::Affine { mul, add } => (3, mul, add),
        UnaryOp::Clamp { min, max } => (4, min, max),
        UnaryOp::Sqrt => (5, 0.0, 0.0),
        UnaryOp::Exp => (6, 0.0, 0.0),
    };
    let ctx = &x.ctx;
    let out = GpuStorage::output(ctx, x.len());
    for (start, len) in passes(&BindLimit::of(ctx), x.len(), 1)? {
        let p = UnaryParams {
            len: u32_of("elements", len)?,
            op: code,
            a,
            b,
        };
        ctx.dispatch(
            UNARY,
            bytemuck::bytes_of(&p),
            &[x.window(start, len), out.window(start, len)],
            ctx.groups_1d(len, WORKGROUP_1D),
        );
    }
    Ok(out)
}

/// `(start, len)` passes over `total` elements in runs of `unit` (a row the kernel needs
/// whole), each small enough for one storage binding and starting at an offset the adapter
/// accepts: a single pass when the tensor fits.
fn passes(limit: &BindLimit, total: usize, unit: usize) -> Result<Vec<(usize, usize)>> {
    let unit = unit.max(1);
    if total <= limit.max_elems {
        return Ok(vec![(0, total)]);
    }
    // Whole units per pass, a multiple of the alignment so every start is aligned.
    let units = limit.max_elems / unit / limit.align_elems * limit.align_elems;
    if units == 0 {
        return Err(Error::Gpu(format!(
            "a row of {unit} elements does not fit this adapter's storage binding limit"
        )));
    }
    let step = units * unit;
    Ok((0..total)
        .step_by(step)
        .map(|s| (s, step.min(total - s)))
        .collect())
}

pub fn binary(
    lhs: &GpuStorage,
    lhs_shape: &[usize],
    rhs: &GpuStorage,
    rhs_shape: &[usize],
    out_shape: &[usize],
    op: BinaryOp,
) -> Result<GpuStorage> {
    let (lhs, rhs) = (&*lhs.as_f32()?, &*rhs.as_f32()?);
    if out_shape.len() > MAX_RANK {
        return Err(Error::Gpu(format!(
            "broadcasting over rank {} (at most {MAX_RANK})",
            out_shape.len()
        )));
    }
    let numel: usize = out_shape.iter().product();
    u32_of("elements", numel)?;
    let op = match op {
        BinaryOp::Add => 0,
        BinaryOp::Sub => 1,
        BinaryOp::Mul => 2,
        BinaryOp::Div => 3,
    };
    let mut p = BinaryParams {
        len: 0,
        op,
        rank: out_shape.len() as u32,
        base: 0,
        windowed: 0,
        _pad: [0; 3],
        shape: [1; MAX_RANK],
        lhs_strides: [0; MAX_RANK],
        rhs_strides: [0; MAX_RANK],
    };
    let (sa, sb) = (
        broadcast_strides(lhs_shape, out_shape),
        broadcast_strides(rhs_shape, out_shape),
    );
    for d in 0..out_shape.len() {
        p.shape[d] = u32_of("dimension", out_shape[d])?;
        p.lhs_strides[d] = u32_of("stride", sa[d])?;
        p.rhs_strides[d] = u32_of("stride", sb[d])?;
    }
    let ctx = &lhs.ctx;
    let limit = BindLimit::of(ctx);
    let out = GpuStorage::output(ctx, numel);
    let passes = passes(&limit, numel, 1)?;
    // An operand as large as the output is read through the pass's window; a broadcast one
    // (a bias, a per-channel scale) is bound whole and must fit.
    let windowed = |x: &GpuStorage| passes.len() > 1 && x.len() == numel;
    for (name, x) in [("lhs", lhs), ("rhs", rhs)] {
        if !windowed(x) && x.len() > limit.max_elems {
            return Err(Error::Gpu(format!(
                "binary op: the {name} operand ({} elements, broadcast to {out_shape:?}) exceeds the storage binding limit",
                x.len()
            )));
        }
    }
    p.windowed = windowed(lhs) as u32 | (windowed(rhs) as u32) << 1;
    for (start, len) in &passes {
        let (start, len) = (*start, *len);
        p.len = u32_of("elements", len)?;
        p.base = u32_of("elements", start)?;
        let (lhs_binding, rhs_binding) = (
            if windowed(lhs) {
                lhs.window(start, len)
            } else {
                lhs.binding()
            },
            if windowed(rhs) {
                rhs.window(start, len)
            } else {
                rhs.binding()
            },
        );
        ctx.dispatch(
            BINARY,
            bytemuck::bytes_of(&p),
            &[lhs_binding, rhs_binding, out.window(start, len)],
            ctx.groups_1d(len, WORKGROUP_1D),
        );
    }
    Ok(out)
}

pub fn axpby(a: f32, x: &GpuStorage, b: f32, y: &GpuStorage) -> Result<GpuStorage> {
    let (x, y) = (&*x.as_f32()?, &*y.as_f32()?);
    let ctx = &x.ctx;
    let out = GpuStorage::output(ctx, x.len());
    for (start, len) in passes(&BindLimit::of(ctx), x.len(), 1)? {
        let p = AxpbyParams {
            len: u32_of("elements", len)?,
            a,
            b,
            _pad: 0,
        };
        ctx.dispatch(
            AXPBY,
            bytemuck::bytes_of(&p),
            &[
                x.window(start, len),
                y.window(start, len),
                out.window(start, len),
            ],
            ctx.groups_1d(len, WORKGROUP_1D),
        );
    }
    Ok(out)
}

/// Rows of `2 * half` values `[h, gate]` become `h * gelu(gate)`.
pub fn geglu(x: &GpuStorage, half: usize) -> Result<GpuStorage> {
    let x = &*x.as_f32()?;
    let ctx = &x.ctx;
    let half = half.max(1);
    let out = GpuStorage::output(ctx, x.len() / 2);
    // Passes over whole input rows of 2 * half; the output windows are half as long.
    for (start, len) in passes(&BindLimit::of(ctx), x.len(), 2 * half)? {
        let p = GegluParams {
            len: u32_of("elements", len / 2)?,
            half: u32_of("row length", half)?,
        };
        ctx.dispatch(
            GEGLU,
            bytemuck::bytes_of(&p),
            &[x.window(start, len), out.window(start / 2, len / 2)],
            ctx.groups_1d(len / 2, WORKGROUP_1D),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::widen_within;
    use crate::backend::gpu::storage::BindLimit;
    use crate::backend::gpu::{test_device, GpuStorage};
    use crate::tensor::testing::{assert_ops_agree, random, random_f16};
    use crate::tensor::{Tensor, UnaryOp};

    #[test]
    fn f16_values_widen_exactly_in_windows() {
        let Some(gpu) = test_device() else { return };
        // Odd lengths (a padded last word), and limits that split the cast into passes
        // (in f32 elements, a few f16 offset alignments).
        let a = gpu.0.limits.min_storage_buffer_offset_alignment.max(4) as usize / 2;
        for (n, limit_elems) in [
            (1, None),
            (1001, None),
            (1001, Some(2 * a)),
            (4099, Some(3 * a + 1)),
        ] {
            let values: Vec<f16> = (0..n)
                .map(|i| f16::from_f32((i as f32 - 500.0) * 0.37))
                .collect();
            let x = GpuStorage::from_f16(&gpu, &values);
            let limit = match limit_elems {
                Some(e) => BindLimit::new(&gpu.0, e as u64 * 4),
                None => BindLimit::of(&gpu.0),
            };
            let got = widen_within(&x, &limit).unwrap();
            assert!(!got.is_f16());
            let want: Vec<f32> = values.iter().map(|v| v.to_f32()).collect();
            assert_eq!(got.to_f32().unwrap(), want, "{n} values in {limit_elems:?}");
            // Reading the f16 storage back widens on the host.
            assert_eq!(x.to_f32().unwrap(), want, "{n} values read back");
        }
    }

    #[test]
    fn elementwise_ops_widen_f16_operands() {
        let inputs = [random_f16(&[3, 100], 20), random(&[3, 100], 21)];
        assert_ops_agree("silu of f16", &inputs, |t| t[0].silu());
        assert_ops_agree("f16 + f32", &inputs, |t| t[0].add(&t[1]));
        assert_ops_agree("f32 * f16", &inputs, |t| t[1].mul(&t[0]));
        assert_ops_agree("axpby f16", &inputs, |t| {
            Tensor::axpby(0.3, &t[0], 2.0, &t[1])
        });
        assert_ops_agree("geglu f16", &inputs, |t| t[0].geglu());
    }

    #[test]
    fn unary_ops_match_the_cpu() {
        for op in [
            UnaryOp::Silu,
            UnaryOp::Gelu,
            UnaryOp::QuickGelu,
            UnaryOp::Affine {
                mul: 0.5,
                add: -2.0,
            },
            UnaryOp::Clamp {
                min: -0.3,
                max: 0.7,
            },
        ] {
            assert_ops_agree(&format!("{op:?}"), &[random(&[3, 1000], 1)], |t| {
                t[0].unary(op)
            });
        }
        assert_ops_agree(
            "sqrt",
            &[random(&[777], 2).affine(0.0, 3.0).unwrap()],
            |t| t[0].sqrt(),
        );
        // The VAE encoder's std: exp(0.5 * logvar), logvar clamped to [-30, 20].
        assert_ops_agree(
            "exp",
            &[random(&[777], 3).affine(10.0, -2.0).unwrap()],
            |t| t[0].exp(),
        );
    }

    #[test]
    fn binary_ops_broadcast_like_the_cpu() {
        for (a, b) in [
            (vec![2, 3, 17], vec![2, 3, 17]),
            (vec![2, 3, 17], vec![17]),
            (vec![2, 1, 5], vec![3, 1]),
            (vec![1, 4, 9, 9], vec![2, 4, 1, 1]),
        ] {
            let inputs = [random(&a, 3), random(&b, 4)];
            assert_ops_agree("add", &inputs, |t| t[0].add(&t[1]));
            assert_ops_agree("sub", &inputs, |t| t[0].sub(&t[1]));
            assert_ops_agree("mul", &inputs, |t| t[0].mul(&t[1]));
            let positive = [inputs[0].clone(), inputs[1].affine(0.1, 2.0).unwrap()];
            assert_ops_agree("div", &positive, |t| t[0].div(&t[1]));
        }
    }

    #[test]
    fn axpby_and_geglu_match_the_cpu() {
        assert_ops_agree(
            "axpby",
            &[random(&[5, 301], 5), random(&[5, 301], 6)],
            |t| Tensor::axpby(0.7, &t[0], -1.3, &t[1]),
        );
        assert_ops_agree("geglu", &[random(&[2, 77, 2 * 37], 7)], |t| t[0].geglu());
    }

    #[test]
    fn more_elements_than_one_grid_row_holds() {
        // 65535 workgroups of 256 is the most one dimension holds; this needs two rows.
        let n = 65535 * 256 + 1000;
        assert_ops_agree("silu", &[random(&[n], 8)], |t| t[0].silu());
    }

    #[test]
    fn tensors_over_one_storage_binding_run_in_windows() {
        // Just over 128 MiB of f32: llvmpipe's (and WebGPU's default) binding limit.
        let (rows, width) = (32_800, 1024);
        let big = random(&[rows, width], 9);
        assert_ops_agree("silu (windowed)", std::slice::from_ref(&big), |t| {
            t[0].silu()
        });
        assert_ops_agree(
            "add (windowed)",
            &[big.clone(), random(&[rows, width], 10)],
            |t| t[0].add(&t[1]),
        );
        assert_ops_agree(
            "add broadcast (windowed)",
            &[big.clone(), random(&[width], 11)],
            |t| t[0].add(&t[1]),
        );
        assert_ops_agree(
            "axpby (windowed)",
            &[big.clone(), random(&[rows, width], 12)],
            |t| Tensor::axpby(0.5, &t[0], 2.0, &t[1]),
        );
        assert_ops_agree("geglu (windowed)", &[big], |t| t[0].geglu());
    }
}
