// Matrix products on cooperative matrices (tensor cores): `matmul_nt_coop` for
// out[b] = lhs[b] (m x k) @ rhs^T (rhs [n, k], nn.Linear's weight) + bias, with matmul.wgsl's
// parameter block (plus a split of K), bindings and grid and 128 x 128 output tiles. The
// host (matmul.rs) picks it where the device has cooperative matrices
// (context::GpuContext::coop); convolutions reach it as im2col + product (conv.rs).
//
// The header the host generates (context::Kernel) enables f16 and wgpu_cooperative_matrix
// and sets `alias W` to the weights' element type.
//
// Numerics: operands are rounded to f16 as they are staged in workgroup memory; products
// and sums are f32 (16x16x16 f16 -> f32 multiply-adds), as PyTorch's fp16 layers on tensor
// cores. Values beyond f16's range (65504) would overflow: activations of SD's UNet and
// VAE stay far below it (checked on the real-size model by the GPU bench's output ranges).
//
// Structure: a workgroup is 256 threads, which the host only uses where subgroups are 32
// wide (context::GpuContext::coop), so 8 subgroups: subgroup s computes rows
// 32 * (s / 2) .. + 32 and columns 64 * (s % 2) .. + 64 of the tile, as 2 x 4 accumulators
// of 16 x 16. K is walked in slices of 32: every thread loads its 16 values of each operand
// for the next slice into registers while the subgroups multiply the current one out of
// workgroup memory (one barrier pair per slice). The epilogue goes block by block through a
// per-subgroup 16 x 16 staging area, where each lane adds the bias and writes with bounds
// checks. (An implicit-GEMM convolution on cooperative matrices, gathering its operand in
// the kernel, ran no faster than the SIMT one on the H200: 16 TFLOP/s at [2,320,64,64],
// its gather's integer work outweighing the products.)
//
// Guards: every global read is checked against the sizes in the parameter block (0 outside);
// every write against m and n. Workgroup arrays are indexed below their sizes.

const TM: u32 = 128u;   // output rows per workgroup
const TN: u32 = 128u;   // output columns per workgroup
const TK: u32 = 32u;    // reduction slice
// Row stride (in f16) of staged K-major tiles: TK plus padding, a multiple of 8 so every
// 16 x 16 block starts 16-byte aligned.
const LDK: u32 = 40u;

// A: the tile's rows, K-major: sa[row * LDK + k].
var<workgroup> sa: array<f16, 5120>;       // TM * LDK
// B: the tile's columns, K-major: sb[col * LDK + k].
var<workgroup> sb: array<f16, 5120>;       // TN * LDK
// One 16 x 16 f32 block per subgroup, for the epilogue.
var<workgroup> stage: array<f32, 2048>;

// ---- matmul_nt_coop ---------------------------------------------------------------------

// matmul.wgsl's parameter block, and a split of K: workgroup z = batch entry * splits +
// split takes reduction indices split * k_split .. + k_split and, with splits > 1, writes
// its partial product to its own m x n slab of `mout` (matmul.wgsl's `split_sum` adds the
// slabs and the bias), so that products with few output tiles and a long K (the UNet's
// convolutions at 16x16 and 8x8) still fill the GPU.
struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    rhs_batched: u32,
    has_bias: u32,
    col_tile_base: u32,
    row_tile_base: u32,
    batch_base: u32,
    k_split: u32,   // a multiple of TK
    splits: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> mp: MatmulParams;
@group(0) @binding(1) var<storage, read> lhs: array<f32>;
@group(0) @binding(2) var<storage, read> rhs: array<W>;
@group(0) @binding(3) var<storage, read> mbias: array<f32>;   // any buffer when !has_bias
@group(0) @binding(4) var<storage, read_write> mout: array<f32>;

@compute @workgroup_size(256)
fn matmul_nt_coop(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(local_invocation_index) t: u32,
                  @builtin(subgroup_id) sg: u32,
                  @builtin(subgroup_invocation_id) lane: u32) {
    let row0 = (wid.y + mp.row_tile_base) * TM;
    let col0 = (wid.x + mp.col_tile_base) * TN;
    let z = wid.z + mp.batch_base;
    let batch = z / mp.splits;
    let split = z % mp.splits;
    let m = mp.m;
    let n = mp.n;
    let k = mp.k;
    let k_begin = split * mp.k_split;
    let k_end = min(k, k_begin + mp.k_split);
    let lhs_base = batch * m * k;
    let rhs_base = select(0u, batch * k * n, mp.rhs_batched != 0u);

    // Thread t stages reduction index kt of rows (A) and columns (B) r8 + 8q, q = 0..15:
    // 32 neighbouring threads read 32 neighbouring values of one row.
    let kt = t % 32u;
    let r8 = t / 32u;
    var va: array<f32, 16>;
    var vb: array<f32, 16>;
    load_nt(&va, &vb, row0, col0, r8, k_begin + kt, k_end, lhs_base, rhs_base);

    let sm = sg / 2u;
    let sn = sg % 2u;
    var acc00 = coop_mat16x16<f32, C>();
    var acc01 = coop_mat16x16<f32, C>();
    var acc02 = coop_mat16x16<f32, C>();
    var acc03 = coop_mat16x16<f32, C>();
    var acc10 = coop_mat16x16<f32, C>();
    var acc11 = coop_mat16x16<f32, C>();
    var acc12 = coop_mat16x16<f32, C>();
    var acc13 = coop_mat16x16<f32, C>();
    let ar = 32u * sm * LDK;
    let bc = 64u * sn * LDK;
    for (var k0 = k_begin; k0 < k_end; k0 = k0 + TK) {
        for (var q = 0u; q < 16u; q = q + 1u) {
            sa[(r8 + 8u * q) * LDK + kt] = f16(va[q]);
            sb[(r8 + 8u * q) * LDK + kt] = f16(vb[q]);
        }
        workgroupBarrier();
        load_nt(&va, &vb, row0, col0, r8, k0 + TK + kt, k_end, lhs_base, rhs_base);
        for (var kk = 0u; kk < TK; kk = kk + 16u) {
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&sa[ar + kk], LDK);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&sa[ar + 16u * LDK + kk], LDK);
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&sb[bc + kk], LDK);
            let b1 = coopLoad<coop_mat16x16<f16, B>>(&sb[bc + 16u * LDK + kk], LDK);
            let b2 = coopLoad<coop_mat16x16<f16, B>>(&sb[bc + 32u * LDK + kk], LDK);
            let b3 = coopLoad<coop_mat16x16<f16, B>>(&sb[bc + 48u * LDK + kk], LDK);
            acc00 = coopMultiplyAdd(a0, b0, acc00);
            acc01 = coopMultiplyAdd(a0, b1, acc01);
            acc02 = coopMultiplyAdd(a0, b2, acc02);
            acc03 = coopMultiplyAdd(a0, b3, acc03);
            acc10 = coopMultiplyAdd(a1, b0, acc10);
            acc11 = coopMultiplyAdd(a1, b1, acc11);
            acc12 = coopMultiplyAdd(a1, b2, acc12);
            acc13 = coopMultiplyAdd(a1, b3, acc13);
        }
        workgroupBarrier();
    }

    let r = row0 + 32u * sm;
    let c = col0 + 64u * sn;
    // Each (batch entry, split) has its own slab; without splits, z is the batch entry.
    let out_base = z * m * n;
    store_nt(acc00, sg, lane, r, c, out_base);
    store_nt(acc01, sg, lane, r, c + 16u, out_base);
    store_nt(acc02, sg, lane, r, c + 32u, out_base);
    store_nt(acc03, sg, lane, r, c + 48u, out_base);
    store_nt(acc10, sg, lane, r + 16u, c, out_base);
    store_nt(acc11, sg, lane, r + 16u, c + 16u, out_base);
    store_nt(acc12, sg, lane, r + 16u, c + 32u, out_base);
    store_nt(acc13, sg, lane, r + 16u, c + 48u, out_base);
}

// Reduction index kk (of the split ending at k_end) of lhs rows and rhs rows (the tile's
// columns) r8 + 8q, 0 outside.
fn load_nt(va: ptr<function, array<f32, 16>>, vb: ptr<function, array<f32, 16>>,
           row0: u32, col0: u32, r8: u32, kk: u32, k_end: u32, lhs_base: u32, rhs_base: u32) {
    let k_ok = kk < k_end;
    for (var q = 0u; q < 16u; q = q + 1u) {
        let row = row0 + r8 + 8u * q;
        let col = col0 + r8 + 8u * q;
        var a = 0.0;
        var b = 0.0;
        if (k_ok && row < mp.m) { a = lhs[lhs_base + row * mp.k + kk]; }
        if (k_ok && col < mp.n) { b = f32(rhs[rhs_base + col * mp.k + kk]); }
        (*va)[q] = a;
        (*vb)[q] = b;
    }
}

// Writes one 16 x 16 accumulator at (r, c) of the batch entry's output, plus the bias.
// Every subgroup runs this the same number of times, so the barriers are uniform.
fn store_nt(acc: coop_mat16x16<f32, C>, sg: u32, lane: u32, r: u32, c: u32, out_base: u32) {
    coopStoreT(acc, &stage[sg * 256u], 16u);
    workgroupBarrier();
    for (var e = lane; e < 256u; e = e + 32u) {
        let row = r + e / 16u;
        let col = c + e % 16u;
        if (row < mp.m && col < mp.n) {
            var v = stage[sg * 256u + e];
            if (mp.has_bias != 0u && mp.splits == 1u) { v = v + mbias[col]; }
            mout[out_base + row * mp.n + col] = v;
        }
    }
    workgroupBarrier();
}
