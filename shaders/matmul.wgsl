// Batched matrix products: out[b] = lhs[b] (m x k) @ rhs[b] (k x n), or @ rhs[b]^T with rhs
// stored [n, k]; one rhs shared by every batch entry unless `rhs_batched`; an optional bias
// [n] added to every row. Accumulates in f32.
//
// Structure: each workgroup of TX x TY threads computes one TY*RM x 4*TX*CN output tile of
// one batch entry; each thread owns RM rows of it (ly*RM ..) by CN quads of 4 columns:
// columns 4*(lx + j*TX) .. +3 (`nn`) or lx + TX*(4j + c) for c = 0..3 (`nt`). The shape is
// a set of override constants that matmul.rs picks by the device's tuning (64 x 64 tiles of
// 16 x 16 threads, 4 x 4 each, on hardware GPUs); every loop over them has a constant trip
// count. K is walked in slices of 16: the workgroup stages a slice of lhs and of rhs in
// workgroup memory as vec4s, then each thread runs the slice out of registers, four k at a
// time:
//   lhs slice: a_tile[row * 4 + kq] = lhs[row][4kq .. 4kq+3] (rows k-contiguous);
//   `nn`, rhs [k, n]: b_nn[k * TX*CN + c4] = rhs[k][4c4 .. 4c4+3]; a thread's row vectors
//     each gather four k-scaled rhs vectors;
//   `nt`, rhs [n, k]: b_nt[col * 5 + kq] = rhs[col][4kq .. 4kq+3] (rows padded to 5 vec4s
//     so neighbouring threads' reads fall in different banks); each output is a dot of vec4s.
// Staged vec4 e of a slice goes to thread e % (TX*TY) (a row's four k-quads, or a k-row's
// column quads, on consecutive threads).
// Grid: x = column tiles, y = row tiles, z = batch entries, each offset by a `*_base` so the
// host can split a grid larger than the adapter's per-dimension limit into several dispatches.
//
// Entry points: `matmul_nn` / `matmul_nt` read the operands as scalars and work for any
// shape; `matmul_nn_vec4` / `matmul_nt_vec4` read them as vec4s and are used when every row
// they load is a whole number of vec4s (k % 4 == 0, and for nn n % 4 == 0).
//
// Guards: every tile load is checked against m, n, k and loads 0 outside the matrices (the
// scalar loads clamp the index into the matrix and select 0, so they never read past it); the
// host makes sure the buffers hold batch*m*k, (batch or 1)*k*n and n values and dispatches
// nothing when m, n or batch is 0. With k == 0 no slice is loaded and the result is the
// bias (or 0). Every write is checked against m and n.
//
// Element types: rhs (a weight, for nn.Linear) has element type W, read as f32(..): f32, or
// f16 for weights kept in half precision (the header the host generates declares it:
// context::Kernel::header); the vec4 loads then read vec4<f16>s, whose indices are the same.
// Everything else is f32.

override TX: u32 = 16u;  // threads along the columns
override TY: u32 = 16u;  // threads along the rows
override RM: u32 = 4u;   // rows per thread
override CN: u32 = 1u;   // quads of 4 columns per thread
const SLICE: u32 = 16u;  // K per staged slice
const NT_STRIDE: u32 = 5u; // vec4s per staged rhs row in `nt` (4 + 1 of padding)
const MAX_BLOCK: u32 = 16u; // RM * CN: vec4 accumulators per thread (a constant size)

struct Params {
    m: u32,
    n: u32,
    k: u32,
    rhs_batched: u32,
    has_bias: u32,
    col_tile_base: u32,   // added to workgroup_id.x
    row_tile_base: u32,   // added to workgroup_id.y
    batch_base: u32,      // added to workgroup_id.z
}

@group(0) @binding(0) var<storage, read> p: Params;
@group(0) @binding(1) var<storage, read> lhs: array<f32>;
@group(0) @binding(2) var<storage, read> rhs: array<W>;
@group(0) @binding(1) var<storage, read> lhs4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> rhs4: array<vec4<W>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;   // any buffer when !has_bias
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

var<workgroup> a_tile: array<vec4<f32>, TY * RM * 4u>;
var<workgroup> b_nn: array<vec4<f32>, SLICE * TX * CN>;
var<workgroup> b_nt: array<vec4<f32>, 4u * TX * CN * NT_STRIDE>;

// Where one workgroup's tile sits.
struct Tile {
    row0: u32,
    col0: u32,
    batch: u32,
    lhs_base: u32,   // first element of this batch entry's lhs
    rhs_base: u32,   // first element of this batch entry's rhs
}

fn tile_of(wid: vec3<u32>) -> Tile {
    var t: Tile;
    t.row0 = (wid.y + p.row_tile_base) * TY * RM;
    t.col0 = (wid.x + p.col_tile_base) * 4u * TX * CN;
    t.batch = wid.z + p.batch_base;
    t.lhs_base = t.batch * p.m * p.k;
    t.rhs_base = select(0u, t.batch * p.k * p.n, p.rhs_batched != 0u);
    return t;
}

// Four consecutive values of row r from column c of a row-major `rows x cols` matrix at
// `base`, 0 outside it. Indices are clamped into the matrix (rows, cols >= 1 whenever this
// runs: only for k >= 1, and the host checks m, n >= 1).
fn lhs_row4(base: u32, rows: u32, cols: u32, r: u32, c: u32) -> vec4<f32> {
    let row = base + min(r, rows - 1u) * cols;
    let inside = r < rows;
    return vec4<f32>(
        select(0.0, lhs[row + min(c, cols - 1u)], inside && c < cols),
        select(0.0, lhs[row + min(c + 1u, cols - 1u)], inside && c + 1u < cols),
        select(0.0, lhs[row + min(c + 2u, cols - 1u)], inside && c + 2u < cols),
        select(0.0, lhs[row + min(c + 3u, cols - 1u)], inside && c + 3u < cols));
}

fn rhs_row4(base: u32, rows: u32, cols: u32, r: u32, c: u32) -> vec4<f32> {
    let row = base + min(r, rows - 1u) * cols;
    let inside = r < rows;
    return vec4<f32>(
        select(0.0, f32(rhs[row + min(c, cols - 1u)]), inside && c < cols),
        select(0.0, f32(rhs[row + min(c + 1u, cols - 1u)]), inside && c + 1u < cols),
        select(0.0, f32(rhs[row + min(c + 2u, cols - 1u)]), inside && c + 2u < cols),
        select(0.0, f32(rhs[row + min(c + 3u, cols - 1u)]), inside && c + 3u < cols));
}

// The same with cols % 4 == 0 and c % 4 == 0, so the vec4 is wholly inside or outside.
fn lhs4_at(base: u32, rows: u32, cols: u32, r: u32, c: u32) -> vec4<f32> {
    if (r < rows && c < cols) { return lhs4[(base + r * cols + c) / 4u]; }
    return vec4<f32>(0.0);
}

fn rhs4_at(base: u32, rows: u32, cols: u32, r: u32, c: u32) -> vec4<f32> {
    if (r < rows && c < cols) { return vec4<f32>(rhs4[(base + r * cols + c) / 4u]); }
    return vec4<f32>(0.0);
}

// Staged vec4s per thread and slice: lhs (TY*RM rows of 4 quads), rhs for `nn` (SLICE rows
// of TX*CN quads) and for `nt` (4*TX*CN columns of 4 quads).
fn a_loads() -> u32 { return (TY * RM * 4u + TX * TY - 1u) / (TX * TY); }
fn b_loads() -> u32 { return (SLICE * TX * CN + TX * TY - 1u) / (TX * TY); }

// One staged slice for `nn`: acc[i * CN + j] is row ly*RM + i, columns 4*(lx + j*TX) .. +3.
fn accumulate_nn(lx: u32, ly: u32, acc: ptr<function, array<vec4<f32>, MAX_BLOCK>>) {
    let qn = TX * CN;
    for (var kq = 0u; kq < SLICE / 4u; kq = kq + 1u) {
        for (var j = 0u; j < CN; j = j + 1u) {
            let c4 = lx + j * TX;
            let b0 = b_nn[(kq * 4u) * qn + c4];
            let b1 = b_nn[(kq * 4u + 1u) * qn + c4];
            let b2 = b_nn[(kq * 4u + 2u) * qn + c4];
            let b3 = b_nn[(kq * 4u + 3u) * qn + c4];
            for (var i = 0u; i < RM; i = i + 1u) {
                let a = a_tile[(ly * RM + i) * 4u + kq];
                let r = i * CN + j;
                (*acc)[r] = fma(vec4<f32>(a.x), b0, fma(vec4<f32>(a.y), b1,
                            fma(vec4<f32>(a.z), b2, fma(vec4<f32>(a.w), b3, (*acc)[r]))));
            }
        }
    }
}

// One staged slice for `nt`: acc[i * CN + j][c] is row ly*RM + i, column lx + TX*(4j + c).
fn accumulate_nt(lx: u32, ly: u32, acc: ptr<function, array<vec4<f32>, MAX_BLOCK>>) {
    for (var kq = 0u; kq < SLICE / 4u; kq = kq + 1u) {
        for (var j = 0u; j < CN; j = j + 1u) {
            let col = lx + 4u * j * TX;
            let b0 = b_nt[col * NT_STRIDE + kq];
            let b1 = b_nt[(col + TX) * NT_STRIDE + kq];
            let b2 = b_nt[(col + 2u * TX) * NT_STRIDE + kq];
            let b3 = b_nt[(col + 3u * TX) * NT_STRIDE + kq];
            for (var i = 0u; i < RM; i = i + 1u) {
                let a = a_tile[(ly * RM + i) * 4u + kq];
                let r = i * CN + j;
                (*acc)[r] = (*acc)[r] + vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
            }
        }
    }
}

// Adds the bias and writes the thread's outputs, skipping what lies outside m x n: quad j
// of row i is columns c0 + j * quad_step + c * step for c = 0..3.
fn store(t: Tile, ly: u32, c0: u32, quad_step: u32, step: u32, acc: ptr<function, array<vec4<f32>, MAX_BLOCK>>) {
    let out_base = t.batch * p.m * p.n;
    for (var j = 0u; j < CN; j = j + 1u) {
        let cj = c0 + j * quad_step;
        var bias_row = vec4<f32>(0.0);
        if (p.has_bias != 0u) {
            for (var c = 0u; c < 4u; c = c + 1u) {
                let col = cj + c * step;
                if (col < p.n) { bias_row[c] = bias[col]; }
            }
        }
        for (var i = 0u; i < RM; i = i + 1u) {
            let r = t.row0 + ly * RM + i;
            if (r < p.m) {
                let row = (*acc)[i * CN + j] + bias_row;
                for (var c = 0u; c < 4u; c = c + 1u) {
                    let col = cj + c * step;
                    if (col < p.n) { out[out_base + r * p.n + col] = row[c]; }
                }
            }
        }
    }
}

fn zeros() -> array<vec4<f32>, MAX_BLOCK> {
    var acc: array<vec4<f32>, MAX_BLOCK>;
    for (var i = 0u; i < MAX_BLOCK; i = i + 1u) {
        acc[i] = vec4<f32>(0.0);
    }
    return acc;
}

// Staged vec4 e (see the top): lhs row e / 4 at k = k0 + 4*(e % 4); for `nn` rhs row
// k0 + e / (TX*CN) at columns 4*(e % (TX*CN)); for `nt` rhs row (output column) e / 4 at
// k = k0 + 4*(e % 4), stored padded.

@compute @workgroup_size(TX * TY)
fn matmul_nn(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let t = tile_of(wid);
    let threads = TX * TY;
    let qn = TX * CN;
    var acc = zeros();
    let slices = (p.k + SLICE - 1u) / SLICE;
    for (var s = 0u; s < slices; s = s + 1u) {
        let k0 = s * SLICE;
        for (var i = 0u; i < a_loads(); i = i + 1u) {
            let e = li + i * threads;
            if (e < TY * RM * 4u) { a_tile[e] = lhs_row4(t.lhs_base, p.m, p.k, t.row0 + e / 4u, k0 + (e % 4u) * 4u); }
        }
        for (var i = 0u; i < b_loads(); i = i + 1u) {
            let e = li + i * threads;
            if (e < SLICE * qn) { b_nn[e] = rhs_row4(t.rhs_base, p.k, p.n, k0 + e / qn, t.col0 + (e % qn) * 4u); }
        }
        workgroupBarrier();
        accumulate_nn(li % TX, li / TX, &acc);
        workgroupBarrier();
    }
    store(t, li / TX, t.col0 + (li % TX) * 4u, 4u * TX, 1u, &acc);
}

@compute @workgroup_size(TX * TY)
fn matmul_nn_vec4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let t = tile_of(wid);
    let threads = TX * TY;
    let qn = TX * CN;
    var acc = zeros();
    let slices = (p.k + SLICE - 1u) / SLICE;
    for (var s = 0u; s < slices; s = s + 1u) {
        let k0 = s * SLICE;
        for (var i = 0u; i < a_loads(); i = i + 1u) {
            let e = li + i * threads;
            if (e < TY * RM * 4u) { a_tile[e] = lhs4_at(t.lhs_base, p.m, p.k, t.row0 + e / 4u, k0 + (e % 4u) * 4u); }
        }
        for (var i = 0u; i < b_loads(); i = i + 1u) {
            let e = li + i * threads;
            if (e < SLICE * qn) { b_nn[e] = rhs4_at(t.rhs_base, p.k, p.n, k0 + e / qn, t.col0 + (e % qn) * 4u); }
        }
        workgroupBarrier();
        accumulate_nn(li % TX, li / TX, &acc);
        workgroupBarrier();
    }
    store(t, li / TX, t.col0 + (li % TX) * 4u, 4u * TX, 1u, &acc);
}

@compute @workgroup_size(TX * TY)
fn matmul_nt(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let t = tile_of(wid);
    let threads = TX * TY;
    var acc = zeros();
    let slices = (p.k + SLICE - 1u) / SLICE;
    for (var s = 0u; s < slices; s = s + 1u) {
        let k0 = s * SLICE;
        for (var i = 0u; i < a_loads(); i = i + 1u) {
            let e = li + i * threads;
            if (e < TY * RM * 4u) { a_tile[e] = lhs_row4(t.lhs_base, p.m, p.k, t.row0 + e / 4u, k0 + (e % 4u) * 4u); }
        }
        for (var i = 0u; i < b_loads(); i = i + 1u) {
            let e = li + i * threads;
            if (e < SLICE * TX * CN) {
                b_nt[(e / 4u) * NT_STRIDE + e % 4u] = rhs_row4(t.rhs_base, p.n, p.k, t.col0 + e / 4u, k0 + (e % 4u) * 4u);
            }
        }
        workgroupBarrier();
        accumulate_nt(li % TX, li / TX, &acc);
        workgroupBarrier();
    }
    store(t, li / TX, t.col0 + li % TX, 4u * TX, TX, &acc);
}

@compute @workgroup_size(TX * TY)
fn matmul_nt_vec4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let t = tile_of(wid);
    let threads = TX * TY;
    var acc = zeros();
    let slices = (p.k + SLICE - 1u) / SLICE;
    for (var s = 0u; s < slices; s = s + 1u) {
        let k0 = s * SLICE;
        for (var i = 0u; i < a_loads(); i = i + 1u) {
            let e = li + i * threads;
            if (e < TY * RM * 4u) { a_tile[e] = lhs4_at(t.lhs_base, p.m, p.k, t.row0 + e / 4u, k0 + (e % 4u) * 4u); }
        }
        for (var i = 0u; i < b_loads(); i = i + 1u) {
            let e = li + i * threads;
            if (e < SLICE * TX * CN) {
                b_nt[(e / 4u) * NT_STRIDE + e % 4u] = rhs4_at(t.rhs_base, p.n, p.k, t.col0 + e / 4u, k0 + (e % 4u) * 4u);
            }
        }
        workgroupBarrier();
        accumulate_nt(li % TX, li / TX, &acc);
        workgroupBarrier();
    }
    store(t, li / TX, t.col0 + li % TX, 4u * TX, TX, &acc);
}

// ---- split_sum ---------------------------------------------------------------------------
// The product of a K split into `splits` parts (gemm_coop.wgsl's matmul_nt_coop): out[b][i]
// = sum over s of parts[b * splits + s][i], plus bias[i % n]; one thread per output value
// over a 2-D grid (context::groups_1d), in a fixed order, so the sum does not depend on
// timing. Reads stay below batch * splits * m * n (checked by the host).

struct SplitSum {
    mn: u32,      // m * n: one slab
    n: u32,
    splits: u32,
    total: u32,   // batch * m * n
    has_bias: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> sp: SplitSum;
@group(0) @binding(1) var<storage, read> parts: array<f32>;
@group(0) @binding(2) var<storage, read> sbias: array<f32>;   // any buffer when !has_bias
@group(0) @binding(3) var<storage, read_write> sout: array<f32>;

@compute @workgroup_size(256)
fn split_sum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid.x;
    if (i >= sp.total) { return; }
    let b = i / sp.mn;
    let at = i - b * sp.mn;
    var v = 0.0;
    for (var s = 0u; s < sp.splits; s = s + 1u) {
        v = v + parts[(b * sp.splits + s) * sp.mn + at];
    }
    if (sp.has_bias != 0u) { v = v + sbias[at % sp.n]; }
    sout[i] = v;
}
