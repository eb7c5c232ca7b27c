// Softmax and fused multi-head attention. Softmax runs 256-thread workgroups
// (attention::SOFTMAX_WORKGROUP in src/backend/gpu/attention.rs), attention 64-thread ones
// (attention::QUERY_BLOCK); the workgroup index comes from a 2-D grid (context::groups_1d)
// and workgroups past the end return at once.
//
// Bounds: every global read and write is guarded by the sizes in the parameter block (rows,
// queries, keys, head dims); tile slots past those sizes are filled with 0 and never read
// from global memory. Workgroup and private arrays are indexed below their constant sizes.

const WG: u32 = 256u;
// Stands in for -infinity (WGSL has no infinity literal); exp(NEG - finite) is 0.
const NEG: f32 = -3.0e38;

// ---- softmax --------------------------------------------------------------------------
// One workgroup per row: an online (max, sum) pass over strided elements per thread, a
// tree reduction of the pairs in workgroup memory, then exp(x - max) / sum written out.

struct Softmax {
    rows: u32,
    d: u32,
}

@group(0) @binding(0) var<storage, read> sm_p: Softmax;
@group(0) @binding(1) var<storage, read> sm_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> sm_out: array<f32>;

var<workgroup> red_m: array<f32, 256>;
var<workgroup> red_s: array<f32, 256>;

@compute @workgroup_size(256)
fn softmax(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = wid.y * nwg.x + wid.x;
    if (row >= sm_p.rows) { return; }
    let d = sm_p.d;
    let base = row * d;
    let t = lid.x;
    var m = NEG;
    var s = 0.0;
    for (var i = t; i < d; i = i + WG) {
        let x = sm_x[base + i];
        let mn = max(m, x);
        s = s * exp(m - mn) + exp(x - mn);
        m = mn;
    }
    red_m[t] = m;
    red_s[t] = s;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (t < stride) {
            let m1 = red_m[t];
            let m2 = red_m[t + stride];
            let mn = max(m1, m2);
            red_s[t] = red_s[t] * exp(m1 - mn) + red_s[t + stride] * exp(m2 - mn);
            red_m[t] = mn;
        }
        workgroupBarrier();
    }
    let mx = red_m[0];
    let inv = 1.0 / red_s[0];
    for (var i = t; i < d; i = i + WG) {
        sm_out[base + i] = exp(sm_x[base + i] - mx) * inv;
    }
}

// ---- attention ------------------------------------------------------------------------
// FlashAttention-style, one thread per query: a workgroup owns BQ queries of one
// (batch, head) and one slab of their output dims (a head wider than a slab takes several
// workgroups, each recomputing the scores for its slab). It walks the keys in tiles of BK
// staged in workgroup memory (K one stage of head dims at a time, V the slab's dims); each
// thread keeps its query's stage, the tile's BK scores, its running max and sum and its
// output slab in private memory. All threads read the same key at the same time, so every
// workgroup-memory read is a broadcast. Nothing of size Lq x Lk is ever stored; all sums
// are f32.
//
// With the override FIXED4 > 0 (below) the stages and slabs are exactly 4 * FIXED4 dims
// wide: 40 for SD's 40, 80 and 160, 64 for 64 and 512, the whole head for heads of at most
// 64 dims that are a multiple of 4; so every loop over head dims has a constant trip count
// (the driver can unroll it and keep the private arrays in registers). FIXED4 = 0 takes
// any head dim with stages and slabs of up to CAP. Workgroup memory: the two tiles, 16 KiB
// (WebGPU's minimum limit).

const BQ: u32 = 64u;   // queries per workgroup = threads (attention::QUERY_BLOCK)
const BK: u32 = 32u;   // keys per tile
const CAP: u32 = 64u;  // widest stage / slab (attention::DIM_SLAB)
const CAP4: u32 = 16u; // CAP / 4

struct Attention {
    heads: u32,
    q_len: u32,
    kv_len: u32,
    head_dim: u32,
    causal: u32,
    scale: f32,
    q_blocks: u32,  // ceil(q_len / BQ)
    dim_slabs: u32, // ceil(head_dim / the entry point's slab width)
    groups: u32,    // batch * heads * q_blocks * dim_slabs
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> at_p: Attention;
@group(0) @binding(1) var<storage, read> at_q: array<f32>;
@group(0) @binding(2) var<storage, read> at_k: array<f32>;
@group(0) @binding(3) var<storage, read> at_v: array<f32>;
@group(0) @binding(4) var<storage, read_write> at_out: array<f32>;

// [BK][CAP4]: a K stage and the V slab of one key tile, zero past the keys and the dims.
var<workgroup> k_tile: array<vec4<f32>, 512>;
var<workgroup> v_tile: array<vec4<f32>, 512>;

// at_q[i .. i + min(n, 4)), zeros after.
fn q_at(i: u32, n: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    if (n > 0u) { x.x = at_q[i]; }
    if (n > 1u) { x.y = at_q[i + 1u]; }
    if (n > 2u) { x.z = at_q[i + 2u]; }
    if (n > 3u) { x.w = at_q[i + 3u]; }
    return x;
}

fn k_at(i: u32, n: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    if (n > 0u) { x.x = at_k[i]; }
    if (n > 1u) { x.y = at_k[i + 1u]; }
    if (n > 2u) { x.z = at_k[i + 2u]; }
    if (n > 3u) { x.w = at_k[i + 3u]; }
    return x;
}

fn v_at(i: u32, n: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    if (n > 0u) { x.x = at_v[i]; }
    if (n > 1u) { x.y = at_v[i + 1u]; }
    if (n > 2u) { x.z = at_v[i + 2u]; }
    if (n > 3u) { x.w = at_v[i + 3u]; }
    return x;
}

// The head width each thread's loops are unrolled for, in vec4s (attention::fixed_width):
// 1-16 (4-64 dims) for a head dim that is a multiple of 4 * FIXED4, whose loops then all
// have constant trip counts, so every private array is indexed by constants and stays in
// registers; 0 for any other head dim.
override FIXED4: u32 = 0u;

@compute @workgroup_size(64)
fn attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    attend(wid.y * nwg.x + wid.x, lid.x, FIXED4);
}

// `fixed4` > 0: the head dim is a multiple of 4 * fixed4, the stage and slab width;
// 0: any head dim, stages and slabs of up to CAP.
fn attend(group: u32, t: u32, fixed4: u32) {
    if (group >= at_p.groups) { return; }
    let hd = at_p.head_dim;
    let heads = at_p.heads;
    let q_len = at_p.q_len;
    let inner = heads * hd;
    let slab = group % at_p.dim_slabs;
    let rest = group / at_p.dim_slabs;
    let qb = rest % at_p.q_blocks;
    let bh = rest / at_p.q_blocks;
    let b = bh / heads;
    let h = bh % heads;

    let q0 = qb * BQ;
    let qi = q0 + t;
    let row_ok = qi < q_len;
    let q_row = b * q_len * inner + qi * inner + h * hd; // read and written only when row_ok
    let kv_base = b * at_p.kv_len * inner + h * hd;
    let causal = at_p.causal != 0u;
    // With the causal mask the block's last query sees keys 0..=it, and no further.
    var kv_end = at_p.kv_len;
    if (causal) { kv_end = min(kv_end, min(q0 + BQ, q_len)); }
    let width = select(CAP, 4u * fixed4, fixed4 > 0u);
    let stages = at_p.dim_slabs; // Q/K stages per key tile: as many as slabs
    let dim0 = slab * width;
    let slab_dims = min(width, hd - dim0);
    let slab4 = select((slab_dims + 3u) / 4u, fixed4, fixed4 > 0u);
    let scale = at_p.scale;

    var q: array<vec4<f32>, 16>;
    if (stages == 1u && row_ok) {
        for (var i = 0u; i < slab4; i = i + 1u) {
            q[i] = q_at(q_row + 4u * i, hd - 4u * i);
        }
    }
    var m = NEG;
    var l = 0.0;
    var acc: array<vec4<f32>, 16>;

    for (var k0 = 0u; k0 < kv_end; k0 = k0 + BK) {
        let keys = min(BK, kv_end - k0);
        var s: array<f32, 32>;
        for (var st = 0u; st < stages; st = st + 1u) {
            let d0 = st * width;
            let dims = min(width, hd - d0);
            let d4 = select((dims + 3u) / 4u, fixed4, fixed4 > 0u);
            if (stages > 1u && row_ok) {
                for (var i = 0u; i < d4; i = i + 1u) {
                    q[i] = q_at(q_row + d0 + 4u * i, dims - 4u * i);
                }
            }
            workgroupBarrier(); // the last readers of the tiles are done
            for (var e = t; e < BK * CAP4; e = e + BQ) {
                let n = e / CAP4;
                let i = e % CAP4;
                var x = vec4<f32>(0.0);
                if (n < keys && 4u * i < dims) { x = k_at(kv_base + (k0 + n) * inner + d0 + 4u * i, dims - 4u * i); }
                k_tile[e] = x;
            }
            if (st == 0u) {
                for (var e = t; e < BK * CAP4; e = e + BQ) {
                    let n = e / CAP4;
                    let i = e % CAP4;
                    var x = vec4<f32>(0.0);
                    if (n < keys && 4u * i < slab_dims) {
                        x = v_at(kv_base + (k0 + n) * inner + dim0 + 4u * i, slab_dims - 4u * i);
                    }
                    v_tile[e] = x;
                }
            }
            workgroupBarrier();
            // All BK keys: the tile is zero past `keys`, and so are those scores.
            for (var n = 0u; n < BK; n = n + 1u) {
                var dot4 = vec4<f32>(0.0);
                for (var i = 0u; i < d4; i = i + 1u) {
                    dot4 = fma(q[i], k_tile[n * CAP4 + i], dot4);
                }
                s[n] = s[n] + (dot4.x + dot4.y) + (dot4.z + dot4.w);
            }
        }

        // Online softmax: masked scores, the new running max, probabilities.
        var tile_max = NEG;
        for (var n = 0u; n < BK; n = n + 1u) {
            let ok = n < keys && (!causal || k0 + n <= qi);
            tile_max = max(tile_max, select(NEG, s[n] * scale, ok));
        }
        let m_new = max(m, tile_max);
        let alpha = exp(m - m_new);
        m = m_new;
        var tile_sum = 0.0;
        for (var n = 0u; n < BK; n = n + 1u) {
            let ok = n < keys && (!causal || k0 + n <= qi);
            let p = select(0.0, exp(s[n] * scale - m_new), ok);
            s[n] = p;
            tile_sum = tile_sum + p;
        }
        l = l * alpha + tile_sum;
        for (var i = 0u; i < slab4; i = i + 1u) {
            acc[i] = acc[i] * alpha;
        }
        // All BK keys: their probabilities and V rows are zero past `keys`.
        for (var n = 0u; n < BK; n = n + 1u) {
            let p = vec4<f32>(s[n]);
            for (var i = 0u; i < slab4; i = i + 1u) {
                acc[i] = fma(p, v_tile[n * CAP4 + i], acc[i]);
            }
        }
    }

    if (row_ok) {
        let inv = select(0.0, 1.0 / l, l > 0.0);
        let base = q_row + dim0;
        for (var i = 0u; i < slab4; i = i + 1u) {
            let o = acc[i] * inv;
            let d = 4u * i;
            at_out[base + d] = o.x;
            if (d + 1u < slab_dims) { at_out[base + d + 1u] = o.y; }
            if (d + 2u < slab_dims) { at_out[base + d + 2u] = o.z; }
            if (d + 3u < slab_dims) { at_out[base + d + 3u] = o.w; }
        }
    }
}
