//! Elementwise kernels (`shaders/elementwise.wgsl`): unary activations, broadcasting binary
//! ops, axpby and GEGLU. Each mirrors `backend::cpu::elementwise`.

use bytemuck::{Pod, Zeroable};

use super::context::{Kernel, WORKGROUP_1D};
use super::GpuStorage;
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
    _pad: u32,
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
    let p = UnaryParams {
        len: u32_of("elements", x.len())?,
        op: code,
        a,
        b,
    };
    ctx.dispatch(
        UNARY,
        bytemuck::bytes_of(&p),
        &[x.binding(), out.binding()],
        ctx.groups_1d(x.len(), WORKGROUP_1D),
    );
    Ok(out)
}

/// Row-major strides of `shape` aligned to `out`, 0 along broadcast dimensions.
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let pad = out.len() - shape.len();
    let mut strides = vec![0; out.len()];
    let mut acc = 1;
    for i in (0..shape.len()).rev() {
        strides[pad + i] = if shape[i] == 1 && out[pad + i] != 1 {
            0
        } else {
            acc
        };
        acc *= shape[i];
    }
    strides
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
    let mut p = BinaryParams {
        len: u32_of("elements", numel)?,
        op: match op {
            BinaryOp::Add => 0,
            BinaryOp::Sub => 1,
            BinaryOp::Mul => 2,
            BinaryOp::Div => 3,
        },
        rank: out_shape.len() as u32,
        _pad: 0,
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
    let out = GpuStorage::output(ctx, numel);
    ctx.dispatch(
        BINARY,
        bytemuck::bytes_of(&p),
        &[lhs.binding(), rhs.binding(), out.binding()],
        ctx.groups_1d(numel, WORKGROUP_1D),
    );
    Ok(out)
}

pub fn axpby(a: f32, x: &GpuStorage, b: f32, y: &GpuStorage) -> Result<GpuStorage> {
    let ctx = &x.ctx;
    let out = GpuStorage::output(ctx, x.len());
    let p = AxpbyParams {
        len: u32_of("elements", x.len())?,
        a,
        b,
        _pad: 0,
    };
    ctx.dispatch(
        AXPBY,
        bytemuck::bytes_of(&p),
        &[x.binding(), y.binding(), out.binding()],
        ctx.groups_1d(x.len(), WORKGROUP_1D),
    );
    Ok(out)
}

/// Rows of `2 * half` values `[h, gate]` become `h * gelu(gate)`.
pub fn geglu(x: &GpuStorage, half: usize) -> Result<GpuStorage> {
    let ctx = &x.ctx;
    let len = x.len() / 2;
    let out = GpuStorage::output(ctx, len);
    let p = GegluParams {
        len: u32_of("elements", len)?,
        half: u32_of("row length", half.max(1))?,
    };
    ctx.dispatch(
        GEGLU,
        bytemuck::bytes_of(&p),
        &[x.binding(), out.binding()],
        ctx.groups_1d(len, WORKGROUP_1D),
    );
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
}
