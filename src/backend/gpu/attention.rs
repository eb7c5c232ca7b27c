//! Softmax and fused multi-head attention (`shaders/attention.wgsl`). Mirrors
//! `backend::cpu::attention`.
//!
//! Softmax runs one workgroup per row (an online max and sum, reduced in workgroup memory).
//! Attention is one FlashAttention-style kernel: a workgroup takes [`QUERY_BLOCK`] queries
//! of one (batch, head) and up to [`DIM_SLAB`] of their output dims, walks the keys in
//! tiles staged through workgroup memory and keeps a running max, sum and output per query,
//! so no score matrix is ever written to memory. Heads wider than [`DIM_SLAB`] take several
//! workgroups per query block, each recomputing the scores for its slab of output dims.

use bytemuck::{Pod, Zeroable};

use super::context::Kernel;
use super::elementwise::u32_of;
use super::GpuStorage;
use crate::error::{Error, Result};
use crate::shader;
use crate::tensor::params::AttentionParams;

const SOFTMAX: Kernel = Kernel::new(shader!("attention"), "softmax");
/// `attention` per `FIXED4` (see [`fixed_width`]): index 0 any head dim, 1-16 heads of
/// 4-64 dims a multiple of 4 * FIXED4 wide.
const ATTENTION: [Kernel; 17] = {
    let k = Kernel::new(shader!("attention"), "attention");
    let mut all = [k; 17];
    let mut i = 0;
    while i < all.len() {
        all[i] = k.with_constant("FIXED4", i as u32);
        i += 1;
    }
    all
};

/// `attention_coop.wgsl`, per head width: `NC` 16-dim chunks (the head zero-padded).
const ATTENTION_COOP: [Kernel; 10] = {
    let k = Kernel::cooperative(shader!("attention_coop"), "attention_coop");
    [
        k.with_constant("NC", 1),
        k.with_constant("NC", 2),
        k.with_constant("NC", 3),
        k.with_constant("NC", 4),
        k.with_constant("NC", 5),
        k.with_constant("NC", 6),
        k.with_constant("NC", 7),
        k.with_constant("NC", 8),
        k.with_constant("NC", 9),
        k.with_constant("NC", 10),
    ]
};
/// Every kernel of this family, for the translation test (see `super::kernels`).
pub(super) const KERNELS: &[Kernel] = &{
    let mut all = [SOFTMAX; 1 + ATTENTION.len() + ATTENTION_COOP.len()];
    let mut i = 0;
    while i < ATTENTION.len() {
        all[1 + i] = ATTENTION[i];
        i += 1;
    }
    let mut j = 0;
    while j < ATTENTION_COOP.len() {
        all[1 + ATTENTION.len() + j] = ATTENTION_COOP[j];
        j += 1;
    }
    all
};

/// The widest head `ATTENTION_COOP` takes: its q fragments and outputs live in registers.
const COOP_MAX_HEAD_DIM: usize = 160;
/// Queries per `ATTENTION_COOP` workgroup (`AQ`; 128 threads, 16 queries per subgroup).
const COOP_QUERY_BLOCK: usize = 64;
/// Threads per `ATTENTION_COOP` workgroup.
const COOP_WORKGROUP: u32 = 128;

/// Threads per softmax workgroup: the shader's `@workgroup_size(256)` on `softmax` (`WG`).
const SOFTMAX_WORKGROUP: u32 = 256;
/// Queries per attention workgroup, one per thread: the shader's `@workgroup_size(64)` on
/// `attention` (`BQ`).
const QUERY_BLOCK: u32 = 64;
/// Keys per attention tile (`BK` in the shader).
const KEY_BLOCK: usize = 32;
/// Head dims each attention thread holds at most, and output dims per workgroup (`CAP` in
/// the shader).
const DIM_SLAB: usize = 64;

/// The width in dims that the `attention` kernel's loops are unrolled for (its `FIXED4` is
/// a quarter of it), or 0 for the kernel that takes any head dim in slabs of up to
/// [`DIM_SLAB`]. A head of at most 64 dims that is a multiple of 4 is one slab of its own
/// width; wider ones a multiple of 64 or 40 (SD's 80 and 160, the VAE's 512) take slabs of
/// that width. Without constant widths llvmpipe keeps the private arrays in memory: the
/// tiny test model's 4- and 8-dim heads took 0.80 s per attention call there (68% of a
/// 64x64 step's 26 s on 2 EPYC cores), with them 0.18 s (a step 12 s). The sums are the
/// same either way: one slab, the same loops, only their trip counts become constants.
fn fixed_width(head_dim: usize) -> usize {
    if head_dim.is_multiple_of(4) && head_dim <= DIM_SLAB {
        head_dim
    } else if head_dim.is_multiple_of(64) {
        64
    } else if head_dim.is_multiple_of(40) {
        40
    } else {
        0
    }
}

/// The attention kernel for a head dim and its slab width.
fn attention_kernel(head_dim: usize) -> (Kernel, usize) {
    match fixed_width(head_dim) {
        0 => (ATTENTION[0], DIM_SLAB),
        width => (ATTENTION[width / 4], width),
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SoftmaxParams {
    rows: u32,
    d: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AttentionKernelParams {
    heads: u32,
    q_len: u32,
    kv_len: u32,
    head_dim: u32,
    causal: u32,
    scale: f32,
    q_blocks: u32,
    dim_slabs: u32,
    groups: u32,
    _pad: [u32; 3],
}

/// Refuses a binding the adapter cannot take.
fn check_binding(op: &str, what: &str, x: &GpuStorage) -> Result<()> {
    let bytes = x.len() as u64 * 4;
    let limit = x.ctx.limits.max_storage_buffer_binding_size;
    if bytes > limit {
        return Err(Error::Gpu(format!(
            "{op}: {what} is {bytes} bytes, over the adapter's {limit}-byte storage binding limit"
        )));
    }
    Ok(())
}

/// Softmax over rows of `d` values (max-subtracted).
pub fn softmax(x: &GpuStorage, d: usize) -> Result<GpuStorage> {
    let x = &*x.as_f32()?;
    let ctx = &x.ctx;
    let out = GpuStorage::output(ctx, x.len());
    if x.is_empty() || d == 0 {
        return Ok(out);
    }
    check_binding("softmax", "the input", x)?;
    let rows = x.len() / d;
    let p = SoftmaxParams {
        rows: u32_of("softmax rows", rows)?,
        d: u32_of("softmax row length", d)?,
    };
    u32_of("softmax elements", x.len())?;
    ctx.dispatch(
        SOFTMAX,
        bytemuck::bytes_of(&p),
        &[x.binding(), out.binding()],
        ctx.groups_1d(rows * SOFTMAX_WORKGROUP as usize, SOFTMAX_WORKGROUP),
    );
    Ok(out)
}

/// softmax(q k^T / sqrt(D)) v per head; q is `[B, Lq, H*D]`, k and v `[B, Lk, H*D]`.
pub fn attention(
    q: &GpuStorage,
    k: &GpuStorage,
    v: &GpuStorage,
    p: &AttentionParams,
) -> Result<GpuStorage> {
    let (q, k, v) = (&*q.as_f32()?, &*k.as_f32()?, &*v.as_f32()?);
    let ctx = &q.ctx;
    let inner = p.heads * p.head_dim;
    let out_len = p.batch * p.q_len * inner;
    let kv_len = p.batch * p.kv_len * inner;
    if q.len() != out_len || k.len() != kv_len || v.len() != kv_len {
        return Err(Error::Gpu(format!(
            "attention: {p:?} needs q of {out_len} and k, v of {kv_len} values; got {}, {}, {}",
            q.len(),
            k.len(),
            v.len()
        )));
    }
    let out = GpuStorage::output(ctx, out_len);
    if out_len == 0 {
        return Ok(out);
    }
    for (what, x) in [("q", q), ("k", k), ("v", v)] {
        check_binding("attention", what, x)?;
    }
    // Cooperative matrices where the device has them and the head fits; else the SIMT
    // kernel for this head width.
    let coop = ctx.coop && p.head_dim <= COOP_MAX_HEAD_DIM;
    let (kernel, slab, query_block, workgroup) = if coop {
        // head_dim >= 1: an empty head made out_len 0 above.
        let chunks = p.head_dim.div_ceil(16);
        (
            ATTENTION_COOP[chunks - 1],
            p.head_dim,
            COOP_QUERY_BLOCK,
            COOP_WORKGROUP,
        )
    } else {
        let (kernel, slab) = attention_kernel(p.head_dim);
        (kernel, slab, QUERY_BLOCK as usize, QUERY_BLOCK)
    };
    let q_blocks = p.q_len.div_ceil(query_block);
    let dim_slabs = p.head_dim.div_ceil(slab);
    let groups = p.batch * p.heads * q_blocks * dim_slabs;
    // Element indices, and the kernel's query and key counters (which run a block past the
    // end), stay within u32.
    u32_of("attention q elements", out_len)?;
    u32_of("attention k elements", kv_len)?;
    u32_of("attention queries", p.q_len + QUERY_BLOCK as usize)?;
    u32_of("attention keys", p.kv_len + KEY_BLOCK)?;
    u32_of("attention workgroups", groups * QUERY_BLOCK as usize)?;
    let params = AttentionKernelParams {
        heads: u32_of("attention heads", p.heads)?,
        q_len: u32_of("attention queries", p.q_len)?,
        kv_len: u32_of("attention keys", p.kv_len)?,
        head_dim: u32_of("attention head dim", p.head_dim)?,
        causal: p.causal as u32,
        scale: 1.0 / (p.head_dim as f32).sqrt(),
        q_blocks: q_blocks as u32,
        dim_slabs: dim_slabs as u32,
        groups: groups as u32,
        _pad: [0; 3],
    };
    ctx.dispatch(
        kernel,
        bytemuck::bytes_of(&params),
        &[q.binding(), k.binding(), v.binding(), out.binding()],
        ctx.groups_1d(groups * workgroup as usize, workgroup),
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    // Attention's operands are values f16 holds exactly (random_f16_exact): on a device with
    // cooperative matrices the kernel stages q, k and v in f16, and sees exactly the CPU's
    // inputs; its probabilities keep f32 precision (see attention_coop.wgsl).
    use crate::tensor::testing::{assert_ops_agree, random, random_f16, random_f16_exact};
    use crate::tensor::Tensor;

    #[test]
    fn f16_operands_are_widened() {
        assert_ops_agree("softmax f16", &[random_f16(&[4, 77], 90)], |t| {
            t[0].softmax()
        });
        let inputs = [
            random_f16(&[2, 9, 32], 91),
            random_f16(&[2, 7, 32], 92),
            random_f16(&[2, 7, 32], 93),
        ];
        assert_ops_agree("attention f16", &inputs, |t| {
            Tensor::attention(&t[0], &t[1], &t[2], 2, false)
        });
    }

    #[test]
    fn softmax_matches_the_cpu() {
        for (i, shape) in [
            vec![3, 1000],
            vec![2, 77, 77],
            vec![5, 1],
            vec![4, 7],
            vec![2, 3001],
            vec![300, 10],
        ]
        .into_iter()
        .enumerate()
        {
            let x = random(&shape, 10 + i as u64).affine(4.0, 1.0).unwrap();
            assert_ops_agree(&format!("softmax {shape:?}"), &[x], |t| t[0].softmax());
        }
    }

    /// Attention of random q `[b, lq, h*d]` and k, v `[b, lk, h*d]`, causal and not.
    fn check(b: usize, lq: usize, lk: usize, h: usize, d: usize, seed: u64) {
        let inputs = [
            random_f16_exact(&[b, lq, h * d], seed),
            random_f16_exact(&[b, lk, h * d], seed + 1),
            random_f16_exact(&[b, lk, h * d], seed + 2),
        ];
        for causal in [false, true] {
            assert_ops_agree(
                &format!("attention b{b} lq{lq} lk{lk} h{h} d{d} causal {causal}"),
                &inputs,
                |t| Tensor::attention(&t[0], &t[1], &t[2], h, causal),
            );
        }
    }

    #[test]
    fn clip_self_attention() {
        check(1, 77, 77, 12, 64, 20);
        check(2, 77, 77, 12, 64, 23);
    }

    #[test]
    fn awkward_sizes() {
        for b in [1, 2] {
            check(b, 5, 3, 3, 7, 30);
            check(b, 3, 5, 3, 7, 33);
            check(b, 1, 1, 1, 1, 36);
            check(b, 130, 70, 2, 16, 39);
            check(b, 65, 33, 1, 4, 42);
            check(b, 64, 32, 2, 8, 45);
        }
    }

    #[test]
    fn sd_head_dims_and_wider() {
        // Fixed widths (fixed_width): the whole head for 4, 8, 16, 40, 48, 64; slabs of 40
        // for 80, 120, 160, of 64 for 128; the kernel for any head dim: the rest, with one
        // stage (63) or several (65, 161, 200, 321).
        for (i, d) in [
            40, 64, 80, 120, 128, 160, 4, 8, 16, 48, 63, 65, 161, 200, 321,
        ]
        .into_iter()
        .enumerate()
        {
            check(1, 70, 45, 2, d, 50 + 3 * i as u64);
        }
    }

    #[test]
    fn head_dims_get_constant_widths() {
        let dims = [4, 8, 40, 48, 64, 80, 128, 160, 512, 63, 96, 6];
        let widths = dims.map(super::fixed_width);
        assert_eq!(widths, [4, 8, 40, 48, 64, 40, 64, 40, 64, 0, 0, 0]);
    }

    #[test]
    fn sd15_cross_attention() {
        check(2, 4096, 77, 8, 40, 70);
    }

    #[test]
    fn sd15_self_attention_4096_tokens() {
        let h = 8;
        let inputs = [
            random_f16_exact(&[1, 4096, h * 40], 80),
            random_f16_exact(&[1, 4096, h * 40], 81),
            random_f16_exact(&[1, 4096, h * 40], 82),
        ];
        assert_ops_agree("attention 4096 tokens", &inputs, |t| {
            Tensor::attention(&t[0], &t[1], &t[2], h, false)
        });
    }
}
