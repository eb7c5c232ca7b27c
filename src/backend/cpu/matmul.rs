//! Matrix products through the `gemm` crate (SIMD microkernels, rayon threads).

use rayon::prelude::*;

use super::CpuStorage;

/// Shape of a (batched) product `lhs[b] @ rhs[b]` (or `rhs[b]^T`).
#[derive(Clone, Copy, Debug)]
pub struct MatmulDims {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// rhs has one matrix per batch entry; otherwise one matrix shared by all.
    pub rhs_batched: bool,
    /// rhs is stored `[n, k]` and used transposed.
    pub transpose_rhs: bool,
}

/// A strided view of a row-major matrix inside a slice.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

/// `dst = lhs @ rhs` (or `dst += lhs @ rhs` with `accumulate`), lhs `m x k`, rhs `k x n`,
/// dst `m x n` with row stride `dst_row_stride` and unit column stride.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    lhs: MatRef,
    rhs: MatRef,
    dst: &mut [f32],
    dst_row_stride: usize,
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let extent =
        |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs + 1;
    assert!(
        dst.len() >= extent(m, n, dst_row_stride, 1),
        "gemm dst out of bounds"
    );
    if k > 0 {
        assert!(
            lhs.data.len() >= extent(m, k, lhs.row_stride, lhs.col_stride),
            "gemm lhs out of bounds"
        );
        assert!(
            rhs.data.len() >= extent(k, n, rhs.row_stride, rhs.col_stride),
            "gemm rhs out of bounds"
        );
    }
    let parallelism = if parallel && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every access of the three strided matrices inside
    // their slices, and dst is borrowed mutably so nothing else aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Batched `lhs @ rhs` (+ bias broadcast over rows).
pub fn matmul(
    lhs: &CpuStorage,
    rhs: &CpuStorage,
    bias: Option<&CpuStorage>,
    d: MatmulDims,
) -> CpuStorage {
    let lhs = lhs.as_f32();
    let rhs = rhs.as_f32();
    let (m, n, k) = (d.m, d.n, d.k);
    let mut out = vec![0f32; d.batch * m * n];
    if let Some(bias) = bias {
        let bias = bias.as_f32();
        out.par_chunks_mut(n)
            .for_each(|row| row.copy_from_slice(&bias));
    }
    let rhs_view = |b: usize| {
        let off = if d.rhs_batched { b * k * n } else { 0 };
        let data = &rhs[off..off + k * n];
        if d.transpose_rhs {
            MatRef {
                data,
                row_stride: 1,
                col_stride: k,
            }
        } else {
            MatRef {
                data,
                row_stride: n,
                col_stride: 1,
            }
        }
    };
    let lhs_view = |b: usize| MatRef {
        data: &lhs[b * m * k..(b + 1) * m * k],
        row_stride: k,
        col_stride: 1,
    };
    if d.batch == 1 {
        sgemm(
            m,
            n,
            k,
            lhs_view(0),
            rhs_view(0),
            &mut out,
            n,
            bias.is_some(),
            true,
        );
    } else {
        // Many small products (attention heads): one thread per product.
        let parallel_inside = d.batch < rayon::current_num_threads();
        out.par_chunks_mut(m * n).enumerate().for_each(|(b, dst)| {
            sgemm(
                m,
                n,
                k,
                lhs_view(b),
                rhs_view(b),
                dst,
                n,
                bias.is_some(),
                parallel_inside,
            );
        });
    }
    CpuStorage::F32(out)
}
