// Group norm (optionally followed by SiLU) and layer norm, as `backend::cpu::norm`.
//
// Both normalise "slabs": contiguous runs of `len` values that share one mean and variance.
// Group norm over [N, C, spatial]: one slab per (sample, group), `per_group` channels of
// `spatial` values each. Layer norm over rows of d: one slab per row, read as a group norm
// with groups = 1, per_group = d, spatial = 1. The value at offset j of slab s has channel
// ((slab0 + s) % groups) * per_group + j / spatial, which indexes gamma and beta.
//
// Statistics are f32 and two-pass (the mean first, then the sum of squared deviations from
// it), so large offsets cost no precision. A chunk is WG * ITEMS values that one workgroup
// holds in registers (WG threads, ITEMS each, thread t taking offsets k * WG + t):
//  * slabs of at most one chunk: `fused`, one workgroup per slab, reads each value once;
//  * longer slabs: `partials` (one workgroup per chunk: count, mean and M2 of the chunk),
//    `finalize` (one workgroup per slab merges its chunks' partials with Chan's pairwise
//    formula into mean and variance) and `apply` (one thread per value). The statistics
//    buffer covers every slab of the tensor (indexed from `slab0`), so `apply` also serves
//    statistics merged from several tensors (a feature map held in row bands).
// Variance is biased (M2 / len) with eps inside the square root, as torch.
//
// Every read and write is guarded: offsets past `len`, slabs past `slabs`, threads past
// `total` load 0 or return. The workgroup size and ITEMS match norm.rs (WORKGROUP, ITEMS).

override WG: u32 = 256u;  // threads per workgroup, by the device's tuning (norm.rs)
const ITEMS: u32 = 16u;

struct Params {
    slabs: u32,     // slabs in this dispatch (the bound windows of x and out hold slabs * len)
    len: u32,       // values per slab
    spatial: u32,   // values per channel
    per_group: u32, // channels per slab
    groups: u32,    // slabs per sample
    chunks: u32,    // chunks per slab (ceil(len / (WG * ITEMS))), split path only
    slab0: u32,     // index of this dispatch's first slab in the whole tensor
    silu: u32,      // 1: apply SiLU after the affine
    eps: f32,
    total: u32,     // slabs * len
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;

var<workgroup> red_a: array<f32, WG>;
var<workgroup> red_b: array<f32, WG>;
var<workgroup> red_c: array<f32, WG>;

// Values per chunk.
fn chunk_len() -> u32 {
    return WG * ITEMS;
}

fn flat_group(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

// Sum of `v` over the workgroup; every thread gets the result. Uniform control flow only.
fn wg_sum(lid: u32, v: f32) -> f32 {
    red_a[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red_a[lid] = red_a[lid] + red_a[lid + s];
        }
        workgroupBarrier();
    }
    let r = red_a[0];
    workgroupBarrier();
    return r;
}

fn channel(slab: u32, j: u32) -> u32 {
    return ((p.slab0 + slab) % p.groups) * p.per_group + j / p.spatial;
}

fn activate(y: f32) -> f32 {
    if (p.silu != 0u) {
        return y / (1.0 + exp(-y));
    }
    return y;
}

// Mean and M2 of the chunk of slab `slab` starting at offset `start`, whose values this
// thread keeps in `v` (0 where past the slab's end).
struct ChunkStats {
    mean: f32,
    m2: f32,
    count: f32,
}

fn load_chunk(lid: u32, slab: u32, start: u32, v: ptr<function, array<f32, ITEMS>>) -> ChunkStats {
    let base = slab * p.len;
    var s = 0.0;
    for (var k = 0u; k < ITEMS; k = k + 1u) {
        let j = start + k * WG + lid;
        var value = 0.0;
        if (j < p.len) {
            value = x[base + j];
        }
        (*v)[k] = value;
        s = s + value;
    }
    let count = f32(min(chunk_len(), p.len - start));
    let mean = wg_sum(lid, s) / count;
    var q = 0.0;
    for (var k = 0u; k < ITEMS; k = k + 1u) {
        let j = start + k * WG + lid;
        if (j < p.len) {
            let d = (*v)[k] - mean;
            q = q + d * d;
        }
    }
    let m2 = wg_sum(lid, q);
    return ChunkStats(mean, m2, count);
}

// ---- slabs of at most one chunk ---------------------------------------------------------

@group(0) @binding(2) var<storage, read> fused_gamma: array<f32>;
@group(0) @binding(3) var<storage, read> fused_beta: array<f32>;
@group(0) @binding(4) var<storage, read_write> fused_out: array<f32>;

@compute @workgroup_size(WG)
fn fused(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_id) lid3: vec3<u32>) {
    let slab = flat_group(wid, nwg);
    if (slab >= p.slabs) { return; }
    let lid = lid3.x;
    var v: array<f32, ITEMS>;
    let st = load_chunk(lid, slab, 0u, &v);
    let rstd = 1.0 / sqrt(st.m2 / st.count + p.eps);
    let base = slab * p.len;
    for (var k = 0u; k < ITEMS; k = k + 1u) {
        let j = k * WG + lid;
        if (j < p.len) {
            let ch = channel(slab, j);
            let y = (v[k] - st.mean) * rstd * fused_gamma[ch] + fused_beta[ch];
            fused_out[base + j] = activate(y);
        }
    }
}

// ---- longer slabs: per-chunk partials ----------------------------------------------------

@group(0) @binding(2) var<storage, read_write> partials_out: array<vec2<f32>>;

@compute @workgroup_size(WG)
fn partials(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid3: vec3<u32>) {
    let w = flat_group(wid, nwg);
    if (w >= p.slabs * p.chunks) { return; }
    let lid = lid3.x;
    let slab = w / p.chunks;
    let chunk = w % p.chunks;
    var v: array<f32, ITEMS>;
    let st = load_chunk(lid, slab, chunk * chunk_len(), &v);
    if (lid == 0u) {
        partials_out[w] = vec2<f32>(st.mean, st.m2);
    }
}

// ---- longer slabs: merge the partials of each slab ----------------------------------------

@group(0) @binding(1) var<storage, read> finalize_partials: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read_write> finalize_stats: array<vec2<f32>>;

// Chan et al.: (count, mean, M2) of the union of two disjoint sets.
fn merge(a: vec3<f32>, b: vec3<f32>) -> vec3<f32> {
    if (b.x == 0.0) { return a; }
    if (a.x == 0.0) { return b; }
    let n = a.x + b.x;
    let delta = b.y - a.y;
    let wb = b.x / n;
    return vec3<f32>(n, a.y + delta * wb, a.z + b.z + delta * delta * a.x * wb);
}

@compute @workgroup_size(WG)
fn finalize(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid3: vec3<u32>) {
    let slab = flat_group(wid, nwg);
    if (slab >= p.slabs) { return; }
    let lid = lid3.x;
    var acc = vec3<f32>(0.0, 0.0, 0.0);
    for (var c = lid; c < p.chunks; c = c + WG) {
        let part = finalize_partials[slab * p.chunks + c];
        let count = f32(min(chunk_len(), p.len - c * chunk_len()));
        acc = merge(acc, vec3<f32>(count, part.x, part.y));
    }
    red_a[lid] = acc.x;
    red_b[lid] = acc.y;
    red_c[lid] = acc.z;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            let m = merge(vec3<f32>(red_a[lid], red_b[lid], red_c[lid]),
                          vec3<f32>(red_a[lid + s], red_b[lid + s], red_c[lid + s]));
            red_a[lid] = m.x;
            red_b[lid] = m.y;
            red_c[lid] = m.z;
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        finalize_stats[p.slab0 + slab] = vec2<f32>(red_b[0], red_c[0] / f32(p.len));
    }
}

// ---- longer slabs (or given statistics): normalise, one thread per value -----------------------------------------

@group(0) @binding(2) var<storage, read> apply_gamma: array<f32>;
@group(0) @binding(3) var<storage, read> apply_beta: array<f32>;
@group(0) @binding(4) var<storage, read> apply_stats: array<vec2<f32>>;
@group(0) @binding(5) var<storage, read_write> apply_out: array<f32>;

@compute @workgroup_size(WG)
fn apply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_id) lid3: vec3<u32>) {
    let i = flat_group(wid, nwg) * WG + lid3.x;
    if (i >= p.total) { return; }
    let slab = i / p.len;
    let j = i - slab * p.len;
    let st = apply_stats[p.slab0 + slab];
    let rstd = 1.0 / sqrt(st.y + p.eps);
    let ch = channel(slab, j);
    let y = (x[i] - st.x) * rstd * apply_gamma[ch] + apply_beta[ch];
    apply_out[i] = activate(y);
}
