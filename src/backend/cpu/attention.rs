//! Softmax and multi-head attention. Attention runs per (batch, head, block of queries):
//! only a `QUERY_BLOCK x kv_len` score block exists at a time per thread, never the full
//! `heads x q_len x kv_len` matrix (1 GB for SD 1.5's 4096-token self-attention).

use rayon::prelude::*;

use super::matmul::{sgemm, MatRef};
use super::{CpuStorage, SharedMut};

/// Queries per score block.
const QUERY_BLOCK: usize = 128;

#[derive(Clone, Copy, Debug)]
pub struct AttentionParams {
    pub batch: usize,
    pub heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
    pub causal: bool,
}

/// In-place softmax of one row.
fn softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

pub fn softmax(x: &CpuStorage, d: usize) -> CpuStorage {
    let mut out = x.as_f32().into_owned();
    out.par_chunks_mut(d.max(1)).for_each(softmax_row);
    CpuStorage::F32(out)
}

pub fn attention(
    q: &CpuStorage,
    k: &CpuStorage,
    v: &CpuStorage,
    p: &AttentionParams,
) -> CpuStorage {
    let (q, k, v) = (q.as_f32(), k.as_f32(), v.as_f32());
    let (d, inner) = (p.head_dim, p.heads * p.head_dim);
    let scale = 1.0 / (d as f32).sqrt();
    let blocks = p.q_len.div_ceil(QUERY_BLOCK);
    let mut out = vec![0f32; p.batch * p.q_len * inner];
    let out_ptr = SharedMut(out.as_mut_ptr());
    (0..p.batch * p.heads * blocks)
        .into_par_iter()
        .for_each(|task| {
            let (bh, block) = (task / blocks, task % blocks);
            let (b, h) = (bh / p.heads, bh % p.heads);
            let q0 = block * QUERY_BLOCK;
            let len = QUERY_BLOCK.min(p.q_len - q0);
            let q_off = (b * p.q_len + q0) * inner + h * d;
            let kv_off = b * p.kv_len * inner + h * d;
            let q_view = MatRef {
                data: &q[q_off..],
                row_stride: inner,
                col_stride: 1,
            };
            // k^T as a [d, kv_len] view of k's [kv_len, d] head slice.
            let kt_view = MatRef {
                data: &k[kv_off..],
                row_stride: 1,
                col_stride: inner,
            };
            let v_view = MatRef {
                data: &v[kv_off..],
                row_stride: inner,
                col_stride: 1,
            };

            let mut scores = vec![0f32; len * p.kv_len];
            sgemm(
                len,
                p.kv_len,
                d,
                q_view,
                kt_view,
                &mut scores,
                p.kv_len,
                false,
                false,
            );
            for (i, row) in scores.chunks_mut(p.kv_len).enumerate() {
                let visible = if p.causal {
                    (q0 + i + 1).min(p.kv_len)
                } else {
                    p.kv_len
                };
                row[..visible].iter_mut().for_each(|s| *s *= scale);
                row[visible..].fill(f32::NEG_INFINITY);
                softmax_row(row);
            }
            let mut head_out = vec![0f32; len * d];
            let s_view = MatRef {
                data: &scores,
                row_stride: p.kv_len,
                col_stride: 1,
            };
            sgemm(
                len,
                d,
                p.kv_len,
                s_view,
                v_view,
                &mut head_out,
                d,
                false,
                false,
            );
            for (i, row) in head_out.chunks(d).enumerate() {
                let dst = (b * p.q_len + q0 + i) * inner + h * d;
                // SAFETY: each task owns rows q0..q0+len of head h in batch b: the regions
                // [dst, dst + d) written by different tasks never overlap, and `out` outlives
                // the parallel loop.
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), out_ptr.ptr().add(dst), d) };
            }
        });
    CpuStorage::F32(out)
}
