// Fused multi-head attention on cooperative matrices (tensor cores): softmax(q k^T * scale) v
// for heads of up to 160 dims, with attention.wgsl's parameter block, bindings and layout
// (q, out [B, Lq, H*D]; k, v [B, Lk, H*D]). The host (attention.rs) picks it where the device
// has cooperative matrices (context::GpuContext::coop) and the head fits; the header it
// generates enables f16 and wgpu_cooperative_matrix.
//
// A workgroup is 128 threads = 4 subgroups of 32 (the host only uses this where subgroups
// are 32 wide) and owns AQ = 64 queries of one (batch, head); subgroup s owns queries
// 16 s .. 16 s + 15. Head dims are taken in NC chunks of 16 (`override NC`, set per head
// width by the host: 3 for 40 (zero-padded to 48), 4 for 64, 5 for 80, 10 for 160), so every
// loop over them has a constant trip count.
//
// Two passes over the keys, in tiles of AK = 32 staged in workgroup memory as f16:
// 1. scores S = q k^T (16 x 32 per subgroup per tile, f32 sums) give each query's running
//    max and sum of exp (online, two lanes per query, f32);
// 2. the scores again, p = exp(s * scale - max) / sum, and out += p v. p is split into
//    p_hi (p with its low 13 mantissa bits cleared, which f16 holds exactly) and
//    p_lo = (p - p_hi) * LO, each multiplied into an accumulator of its own, added as
//    out_hi + out_lo / LO at the end, so the product keeps f32's precision (unscaled,
//    p - p_hi would be an f16 subnormal for most p, and lose its bits; the split is done on
//    the bits so that no compiler folds f32(f16(p)) into p); q, k and v are rounded to f16 as they are staged (as PyTorch's fp16
//    attention does). Nothing of size Lq x Lk is stored; the output is final after pass 2
//    (no rescaling, which cooperative matrices cannot do per row).
//
// Guards: every global read is checked against q_len, kv_len and head_dim (0 outside); keys
// past kv_len (and, with the causal mask, after the query) get probability 0; rows past
// q_len and dims past head_dim are not written. Workgroup arrays are indexed below their
// sizes.

override NC: u32 = 10u;  // 16-dim chunks of the head
const AQ: u32 = 64u;     // queries per workgroup (attention::COOP_QUERY_BLOCK)
const AK: u32 = 32u;     // keys per tile
const LDD: u32 = 168u;   // row stride (f16) of staged [key][dim] tiles: 160 + 8
const LDP: u32 = 40u;    // row stride (f16) of a subgroup's p tile [query][key]: AK + 8
const QST: u32 = 80u;    // dims of q staged per round (two rounds for 160)
// The scale of p's low part: p - f16(p) is at most 2^-12 for p <= 1.
const LO: f32 = 4096.0;
// Stands in for -infinity (WGSL has no infinity literal); exp(NEG - finite) is 0.
const NEG: f32 = -3.0e38;

struct Attention {
    heads: u32,
    q_len: u32,
    kv_len: u32,
    head_dim: u32,
    causal: u32,
    scale: f32,
    q_blocks: u32,  // ceil(q_len / AQ)
    dim_slabs: u32, // 1
    groups: u32,    // batch * heads * q_blocks
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> at_p: Attention;
@group(0) @binding(1) var<storage, read> at_q: array<f32>;
@group(0) @binding(2) var<storage, read> at_k: array<f32>;
@group(0) @binding(3) var<storage, read> at_v: array<f32>;
@group(0) @binding(4) var<storage, read_write> at_out: array<f32>;

var<workgroup> k_s: array<f16, 5376>;     // AK * LDD; at the start, q's stage [AQ][QST]
var<workgroup> v_s: array<f16, 5376>;     // AK * LDD
var<workgroup> s_s: array<f32, 2048>;     // per subgroup: scores [16][AK], or an output block
var<workgroup> p_hi: array<f16, 2560>;    // per subgroup: [16][LDP]
var<workgroup> p_lo: array<f16, 2560>;

// Stages a key tile's K (and V) rows k0 .. k0 + AK - 1, dims 0 .. 16 NC - 1, as f16.
fn stage_kv(t: u32, k0: u32, kv_base: u32, inner: u32, with_v: bool) {
    let dp = 16u * NC;
    let hd = at_p.head_dim;
    for (var e = t; e < AK * dp; e = e + 128u) {
        let n = e / dp;
        let d = e - n * dp;
        var kx = 0.0;
        var vx = 0.0;
        if (k0 + n < at_p.kv_len && d < hd) {
            let at = kv_base + (k0 + n) * inner + d;
            kx = at_k[at];
            if (with_v) { vx = at_v[at]; }
        }
        k_s[n * LDD + d] = f16(kx);
        if (with_v) { v_s[n * LDD + d] = f16(vx); }
    }
}

// This subgroup's scores for the staged tile: s_s[16 sg * AK + row * AK + key].
fn scores(sg: u32, qa: ptr<function, array<coop_mat16x16<f16, A>, 10>>) {
    for (var j = 0u; j < AK / 16u; j = j + 1u) {
        var acc = coop_mat16x16<f32, C>();
        for (var c = 0u; c < NC; c = c + 1u) {
            let b = coopLoad<coop_mat16x16<f16, B>>(&k_s[16u * j * LDD + 16u * c], LDD);
            acc = coopMultiplyAdd((*qa)[c], b, acc);
        }
        coopStoreT(acc, &s_s[sg * 16u * AK + 16u * j], AK);
    }
}

@compute @workgroup_size(128)
fn attention_coop(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) t: u32,
                  @builtin(subgroup_id) sg: u32,
                  @builtin(subgroup_invocation_id) lane: u32) {
    let group = wid.y * nwg.x + wid.x;
    // Uniform across the workgroup: leaving before the barriers is fine.
    if (group >= at_p.groups) { return; }
    let hd = at_p.head_dim;
    let heads = at_p.heads;
    let q_len = at_p.q_len;
    let inner = heads * hd;
    let qb = group % at_p.q_blocks;
    let bh = group / at_p.q_blocks;
    let b = bh / heads;
    let h = bh % heads;
    let q0 = qb * AQ;
    let q_base = b * q_len * inner + h * hd;
    let kv_base = b * at_p.kv_len * inner + h * hd;
    let causal = at_p.causal != 0u;
    let scale = at_p.scale;
    var kv_end = at_p.kv_len;
    if (causal) { kv_end = min(kv_end, min(q0 + AQ, q_len)); }

    // q's fragments: staged QST dims at a time through k_s, kept in registers.
    var qa: array<coop_mat16x16<f16, A>, 10>;
    for (var r = 0u; r < (NC * 16u + QST - 1u) / QST; r = r + 1u) {
        let d0 = r * QST;
        for (var e = t; e < AQ * QST; e = e + 128u) {
            let row = e / QST;
            let d = d0 + e - row * QST;
            var x = 0.0;
            if (q0 + row < q_len && d < hd) { x = at_q[q_base + (q0 + row) * inner + d]; }
            k_s[e] = f16(x);
        }
        workgroupBarrier();
        for (var c = d0 / 16u; c < min(NC, (d0 + QST) / 16u); c = c + 1u) {
            qa[c] = coopLoadT<coop_mat16x16<f16, A>>(&k_s[16u * sg * QST + 16u * c - d0], QST);
        }
        workgroupBarrier();
    }

    // Lanes 2i and 2i + 1 keep query 16 sg + i's statistics and handle keys 16 (lane % 2) ..
    // + 15 of each tile.
    let row = lane / 2u;
    let half = lane % 2u;
    let qi = q0 + 16u * sg + row;
    let srow = sg * 16u * AK + row * AK + 16u * half;
    var m = NEG;
    var l = 0.0;

    // Pass 1: the running max and sum of every query.
    for (var k0 = 0u; k0 < kv_end; k0 = k0 + AK) {
        stage_kv(t, k0, kv_base, inner, false);
        workgroupBarrier();
        scores(sg, &qa);
        workgroupBarrier();
        var tmax = NEG;
        for (var n = 0u; n < 16u; n = n + 1u) {
            let key = k0 + 16u * half + n;
            let ok = key < kv_end && (!causal || key <= qi);
            tmax = max(tmax, select(NEG, s_s[srow + n] * scale, ok));
        }
        tmax = max(tmax, subgroupShuffleXor(tmax, 1u));
        let m_new = max(m, tmax);
        var tsum = 0.0;
        for (var n = 0u; n < 16u; n = n + 1u) {
            let key = k0 + 16u * half + n;
            let ok = key < kv_end && (!causal || key <= qi);
            tsum = tsum + select(0.0, exp(s_s[srow + n] * scale - m_new), ok);
        }
        tsum = tsum + subgroupShuffleXor(tsum, 1u);
        l = l * exp(m - m_new) + tsum;
        m = m_new;
        workgroupBarrier();
    }
    let inv = select(0.0, 1.0 / l, l > 0.0);

    // Pass 2: the probabilities and their weighted sum of v.
    var o: array<coop_mat16x16<f32, C>, 10>;
    var o_lo: array<coop_mat16x16<f32, C>, 10>;
    for (var c = 0u; c < NC; c = c + 1u) {
        o[c] = coop_mat16x16<f32, C>();
        o_lo[c] = coop_mat16x16<f32, C>();
    }
    let prow = sg * 16u * LDP + row * LDP + 16u * half;
    for (var k0 = 0u; k0 < kv_end; k0 = k0 + AK) {
        stage_kv(t, k0, kv_base, inner, true);
        workgroupBarrier();
        scores(sg, &qa);
        workgroupBarrier();
        for (var n = 0u; n < 16u; n = n + 1u) {
            let key = k0 + 16u * half + n;
            let ok = key < kv_end && (!causal || key <= qi);
            let p = select(0.0, exp(s_s[srow + n] * scale - m) * inv, ok);
            let hi = bitcast<f32>(bitcast<u32>(p) & 0xFFFFE000u);
            p_hi[prow + n] = f16(hi);
            p_lo[prow + n] = f16((p - hi) * LO);
        }
        workgroupBarrier();
        for (var j = 0u; j < AK / 16u; j = j + 1u) {
            let ph = coopLoadT<coop_mat16x16<f16, A>>(&p_hi[sg * 16u * LDP + 16u * j], LDP);
            let pl = coopLoadT<coop_mat16x16<f16, A>>(&p_lo[sg * 16u * LDP + 16u * j], LDP);
            for (var c = 0u; c < NC; c = c + 1u) {
                let vb = coopLoadT<coop_mat16x16<f16, B>>(&v_s[16u * j * LDD + 16u * c], LDD);
                o[c] = coopMultiplyAdd(ph, vb, o[c]);
                o_lo[c] = coopMultiplyAdd(pl, vb, o_lo[c]);
            }
        }
        workgroupBarrier();
    }

    // The output, 16 dims at a time through this subgroup's part of s_s (hi, then lo).
    let so = sg * 16u * AK;
    for (var c = 0u; c < NC; c = c + 1u) {
        coopStoreT(o[c], &s_s[so], 16u);
        coopStoreT(o_lo[c], &s_s[so + 256u], 16u);
        workgroupBarrier();
        for (var e = lane; e < 256u; e = e + 32u) {
            let r = e / 16u;
            let d = 16u * c + e % 16u;
            let q = q0 + 16u * sg + r;
            if (q < q_len && d < hd) {
                at_out[q_base + q * inner + d] = s_s[so + e] + s_s[so + 256u + e] * (1.0 / LO);
            }
        }
        workgroupBarrier();
    }
}
