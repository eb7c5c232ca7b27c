// Batched matrix products: out[b] = lhs[b] (m x k) @ rhs[b] (k x n), or @ rhs[b]^T with rhs
// stored [n, k]; one rhs shared by every batch entry unless `rhs_batched`; an optional bias
// [n] added to every row. Accumulates in f32.
//
// Structure: each workgroup of 16 x 16 threads (matmul::WORKGROUP) computes one 64 x 64
// output tile (matmul::TILE) of one batch entry; each thread owns 4 x 4 outputs: rows
// 4*ly .. 4*ly+3 of the tile, and columns 4*lx .. 4*lx+3 (`nn`) or lx, lx+16, lx+32, lx+48
// (`nt`). K is walked in slices of 16: the workgroup stages a 64 x 16 slice of lhs and a
// 16 x 64 slice of rhs in workgroup memory as vec4s, then each thread runs the slice out of
// registers, four k at a time:
//   lhs slice: a_tile[row * 4 + kq] = lhs[row][4kq .. 4kq+3] (rows k-contiguous);
//   `nn`, rhs [k, n]: b_nn[k * 16 + c4] = rhs[k][4c4 .. 4c4+3]; a thread's four row vectors
//     each gather four k-scaled rhs vectors;
//   `nt`, rhs [n, k]: b_nt[col * 5 + kq] = rhs[col][4kq .. 4kq+3] (rows padded to 5 vec4s
//     so the 16 threads' reads fall in different banks); each output is a dot of vec4s.
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

const TILE: u32 = 64u;   // output rows and columns per workgroup
const SLICE: u32 = 16u;  // K per staged slice
const NT_STRIDE: u32 = 5u; // vec4s per staged rhs row in `nt` (4 + 1 of padding)

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

var<workgroup> a_tile: array<vec4<f32>, 256>;
var<workgroup> b_nn: array<vec4<f32>, 256>;
var<workgroup> b_nt: array<vec4<f32>, 320>;

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
    t.row0 = (wid.y + p.row_tile_base) * TILE;
    t.col0 = (wid.x + p.col_tile_base) * TILE;
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

// One staged slice for `nn`: acc[i] is row 4*ly+i, columns 4*lx .. 4*lx+3.
fn accumulate_nn(lx: u32, ly: u32, acc: ptr<function, array<vec4<f32>, 4>>) {
    for (var kq = 0u; kq < SLICE / 4u; kq = kq + 1u) {
        let b0 = b_nn[(kq * 4u) * 16u + lx];
        let b1 = b_nn[(kq * 4u + 1u) * 16u + lx];
        let b2 = b_nn[(kq * 4u + 2u) * 16u + lx];
        let b3 = b_nn[(kq * 4u + 3u) * 16u + lx];
        for (var i = 0u; i < 4u; i = i + 1u) {
            let a = a_tile[(ly * 4u + i) * 4u + kq];
            (*acc)[i] = fma(vec4<f32>(a.x), b0, fma(vec4<f32>(a.y), b1,
                        fma(vec4<f32>(a.z), b2, fma(vec4<f32>(a.w), b3, (*acc)[i]))));
        }
    }
}

// One staged slice for `nt`: acc[i][j] is row 4*ly+i, column lx+16*j.
fn accumulate_nt(lx: u32, ly: u32, acc: ptr<function, array<vec4<f32>, 4>>) {
    for (var kq = 0u; kq < SLICE / 4u; kq = kq + 1u) {
        let b0 = b_nt[lx * NT_STRIDE + kq];
        let b1 = b_nt[(lx + 16u) * NT_STRIDE + kq];
        let b2 = b_nt[(lx + 32u) * NT_STRIDE + kq];
        let b3 = b_nt[(lx + 48u) * NT_STRIDE + kq];
        for (var i = 0u; i < 4u; i = i + 1u) {
            let a = a_tile[(ly * 4u + i) * 4u + kq];
            (*acc)[i] = (*acc)[i] + vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
        }
    }
}

// Adds the bias and writes the thread's 4 x 4 outputs, columns c0 + j * step, skipping what
// lies outside m x n.
fn store(t: Tile, lx: u32, ly: u32, c0: u32, step: u32, acc: array<vec4<f32>, 4>) {
    var bias_row = vec4<f32>(0.0);
    if (p.has_bias != 0u) {
        for (var j = 0u; j < 4u; j = j + 1u) {
            let c = c0 + j * step;
            if (c < p.n) { bias_row[j] = bias[c]; }
        }
    }
    let out_base = t.batch * p.m * p.n;
    for (var i = 0u; i < 4u; i = i + 1u) {
        let r = t.row0 + ly * 4u + i;
        if (r >= p.m) { break; }
        let row = acc[i] + bias_row;
        for (var j = 0u; j < 4u; j = j + 1u) {
            let c = c0 + j * step;
            if (c < p.n) { out[out_base + r * p.n + c] = row[j]; }
        }
    }
}

// Thread (lx, ly) stages lhs row 4*ly + lx/4 at k = k0 + 4*(lx%4) .. +3: four threads cover
// one row's slice. For `nt` it stages rhs row (output column) 4*ly + lx/4 the same way; for
// `nn` rhs columns 4*lx .. 4*lx+3 at k = k0 + ly.

@compute @workgroup_size(16, 16)
fn matmul_nn(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = tile_of(wid);
    let lx = lid.x;
    let ly = lid.y;
    let sub = ly * 4u + lx / 4u;
    let kq = lx % 4u;
    var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    let slices = (p.k + SLICE - 1u) / SLICE;
    for (var s = 0u; s < slices; s = s + 1u) {
        let k0 = s * SLICE;
        a_tile[sub * 4u + kq] = lhs_row4(t.lhs_base, p.m, p.k, t.row0 + sub, k0 + kq * 4u);
        b_nn[ly * 16u + lx] = rhs_row4(t.rhs_base, p.k, p.n, k0 + ly, t.col0 + lx * 4u);
        workgroupBarrier();
        accumulate_nn(lx, ly, &acc);
        workgroupBarrier();
    }
    store(t, lx, ly, t.col0 + lx * 4u, 1u, acc);
}

@compute @workgroup_size(16, 16)
fn matmul_nn_vec4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = tile_of(wid);
    let lx = lid.x;
    let ly = lid.y;
    let sub = ly * 4u + lx / 4u;
    let kq = lx % 4u;
    var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    let slices = (p.k + SLICE - 1u) / SLICE;
    for (var s = 0u; s < slices; s = s + 1u) {
        let k0 = s * SLICE;
        a_tile[sub * 4u + kq] = lhs4_at(t.lhs_base, p.m, p.k, t.row0 + sub, k0 + kq * 4u);
        b_nn[ly * 16u + lx] = rhs4_at(t.rhs_base, p.k, p.n, k0 + ly, t.col0 + lx * 4u);
        workgroupBarrier();
        accumulate_nn(lx, ly, &acc);
        workgroupBarrier();
    }
    store(t, lx, ly, t.col0 + lx * 4u, 1u, acc);
}

@compute @workgroup_size(16, 16)
fn matmul_nt(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = tile_of(wid);
    let lx = lid.x;
    let ly = lid.y;
    let sub = ly * 4u + lx / 4u;
    let kq = lx % 4u;
    var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    let slices = (p.k + SLICE - 1u) / SLICE;
    for (var s = 0u; s < slices; s = s + 1u) {
        let k0 = s * SLICE;
        a_tile[sub * 4u + kq] = lhs_row4(t.lhs_base, p.m, p.k, t.row0 + sub, k0 + kq * 4u);
        b_nt[sub * NT_STRIDE + kq] = rhs_row4(t.rhs_base, p.n, p.k, t.col0 + sub, k0 + kq * 4u);
        workgroupBarrier();
        accumulate_nt(lx, ly, &acc);
        workgroupBarrier();
    }
    store(t, lx, ly, t.col0 + lx, 16u, acc);
}

@compute @workgroup_size(16, 16)
fn matmul_nt_vec4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = tile_of(wid);
    let lx = lid.x;
    let ly = lid.y;
    let sub = ly * 4u + lx / 4u;
    let kq = lx % 4u;
    var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    let slices = (p.k + SLICE - 1u) / SLICE;
    for (var s = 0u; s < slices; s = s + 1u) {
        let k0 = s * SLICE;
        a_tile[sub * 4u + kq] = lhs4_at(t.lhs_base, p.m, p.k, t.row0 + sub, k0 + kq * 4u);
        b_nt[sub * NT_STRIDE + kq] = rhs4_at(t.rhs_base, p.n, p.k, t.col0 + sub, k0 + kq * 4u);
        workgroupBarrier();
        accumulate_nt(lx, ly, &acc);
        workgroupBarrier();
    }
    store(t, lx, ly, t.col0 + lx, 16u, acc);
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
