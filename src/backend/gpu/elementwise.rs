//! Elementwise kernels (`shaders/elementwise.wgsl`): unary activations, broadcasting binary
//! ops, axpby and GEGLU. Each mirrors `backend::cpu::elementwise`.

use bytemuck::{Pod, Zeroable};

use super::context::{Kernel, WORKGROUP_1D};
use super::storage::BindLimit;
use super::GpuStorage;
use crate::backend::cpu::elementwise::broadcast_strides;
use crate::error::{Error, Result};
use crate::shader;
use crate::tensor::{BinaryOp, UnaryOp};

const UNARY: Kernel = Kernel::new(shader!("elementwise"), "unary");
const BINARY: Kernel = Kernel::new(shader!("elementwise"), "binary");
const AXPBY: Kernel = Kernel::new(shader!("elementwise"), "axpby");
const GEGLU: Kernel = Kernel::new(shader!("elementwise"), "geglu");

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

pub fn unary(x: &GpuStorage, op: UnaryOp) -> Result<GpuStorage> {
    let (code, a, b) = match op {
        UnaryOp::Silu => (0, 0.0, 0.0),
        UnaryOp::Gelu => (1, 0.0, 0.0),
        UnaryOp::QuickGelu => (2, 0.0, 0.0),
        UnaryOp::Affine { mul, add } => (3, mul, add),
        UnaryOp::Clamp { min, max } => (4, min, max),
        UnaryOp::Sqrt => (5, 0.0, 0.0),
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
    use crate::tensor::testing::{assert_ops_agree, random};
    use crate::tensor::{Tensor, UnaryOp};

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
