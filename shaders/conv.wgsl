// 2-D convolution (torch nn.Conv2d: NCHW input, OIHW weight, zero padding) as an
// implicit GEMM:
//
//     out[oc, col] = sum_k weight[oc, k] * columns[k, col]
//
// with k = (ci, ky, kx) over c * kh * kw and col = (b, oy, ox) over n * oh * ow. The im2col
// `columns` matrix never exists in memory: each workgroup gathers its tile of it straight
// from the input while filling workgroup memory, reading 0 in the padding.
//
// A workgroup of 16 x 16 threads (conv::WORKGROUP) computes a TILE_M x TILE_N = 64 x 64
// output tile, each thread a 4 x 4 block in registers, walking K in slices of TILE_K = 16.
// A slice's global reads go to registers before the previous slice's arithmetic, and into
// workgroup memory after it (one barrier pair per slice). Every global read is guarded
// (k < K, oc < OC, col < N, and the input coordinates inside the image), so any sizes work;
// tiles hanging over the edges load 0 and store nothing. Buffers may be windows of larger
// ones (see Params); all addressing is relative to the offsets given there.
//
// The weight has element type W, read as f32(..) and accumulated in f32: `alias W = f32;` or,
// for weights kept in half precision, `enable f16; alias W = f16;`, in the header the host
// generates (context::Kernel::header). Everything else is f32.

const TILE_M: u32 = 64u;   // output channels per tile
const TILE_N: u32 = 64u;   // output pixels (over the whole batch) per tile
const TILE_K: u32 = 16u;   // reduction slice

// One pass: `n` images (or one image's slice of input and output channels, when the tensors
// are too large to bind whole: conv.rs then binds windows of the buffers and runs a pass per
// slice, the passes after a channel slice's first adding onto the output).
struct Params {
    n: u32,         // images in this pass
    h: u32,
    w: u32,
    oc: u32,        // output channels in this pass
    kh: u32,
    kw: u32,
    stride: u32,
    pad_top: u32,   // zero rows above the input (those below: as many as oh reaches)
    pad_left: u32,  // zero columns left of it (to the right: as many as ow reaches)
    oh: u32,
    ow: u32,
    k: u32,         // reduction length in this pass: input channels * kh * kw
    cols: u32,      // n * oh * ow: output pixels over the images
    tiles_n: u32,   // ceil(cols / TILE_N)
    x_off: u32,     // first input element of the pass in the x binding
    x_img: u32,     // input elements per image
    w_off: u32,     // weight element (row 0, reduction index 0) in the weight binding
    w_row: u32,     // weight row stride
    out_off: u32,   // first output element of the pass in the out binding
    out_img: u32,   // output elements per image
    bias_off: u32,  // bias of output channel 0 of the pass
    has_bias: u32,
    accumulate: u32, // add onto the output instead of overwriting it
    _pad0: u32,
}

@group(0) @binding(0) var<storage, read> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<W>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;   // read only when has_bias != 0
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

// a_tile[kk * 16 + i] = weight rows 4i .. 4i + 3 of the tile at reduction index kk.
var<workgroup> a_tile: array<vec4<f32>, 256>;
// b_tile[kk * 16 + j] = columns 4j .. 4j + 3 of the tile at reduction index kk.
var<workgroup> b_tile: array<vec4<f32>, 256>;

@compute @workgroup_size(16, 16)
fn conv2d(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    // Column tiles are spread over x and y (the grid's dimensions are limited); z walks the
    // output-channel tiles. A workgroup past the last column tile has nothing to do (the
    // test is uniform across it, so leaving before the barriers is fine).
    let tile_n = wid.y * nwg.x + wid.x;
    if (tile_n >= p.tiles_n) { return; }
    let m0 = wid.z * TILE_M;
    let n0 = tile_n * TILE_N;
    let khw = p.kh * p.kw;
    let plane = p.h * p.w;

    // Column loads: thread t fills b_tile[kr * 16 + jq] with columns n0 + 4jq .. + 3 at
    // reduction row kr.
    let jq = t % 16u;
    let kr = t / 16u;
    let q = column_quad(n0 + 4u * jq);

    // Weight loads: thread t reads row m0 + am, reduction indices k0 + 4 * ak4 .. + 3
    // (contiguous in memory) and scatters them into a_tile's k-major layout.
    let am = t / 4u;
    let ak4 = t % 4u;
    let a_row = m0 + am;
    let a_ok = a_row < p.oc;
    let a_base = p.w_off + a_row * p.w_row;
    let a_slot = ak4 * 64u + am / 4u;   // a_tile index of the first of the four
    let a_lane = am % 4u;

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);

    // Each slice's global reads are issued before the previous slice's arithmetic (into
    // registers) so their latency hides behind it; the last prefetch reads nothing.
    var wa = load_weights(a_ok, a_base, 4u * ak4);
    var v = gather_columns(kr, khw, plane, q);
    for (var k0 = 0u; k0 < p.k; k0 = k0 + TILE_K) {
        a_tile[a_slot][a_lane] = wa.x;
        a_tile[a_slot + 16u][a_lane] = wa.y;
        a_tile[a_slot + 32u][a_lane] = wa.z;
        a_tile[a_slot + 48u][a_lane] = wa.w;
        b_tile[kr * 16u + jq] = v;
        workgroupBarrier();

        let k1 = k0 + TILE_K;
        wa = load_weights(a_ok, a_base, k1 + 4u * ak4);
        v = gather_columns(k1 + kr, khw, plane, q);

        for (var kk = 0u; kk < TILE_K; kk = kk + 1u) {
            let a = a_tile[kk * 16u + lid.y];
            let b = b_tile[kk * 16u + lid.x];
            acc0 = fma(vec4<f32>(a.x), b, acc0);
            acc1 = fma(vec4<f32>(a.y), b, acc1);
            acc2 = fma(vec4<f32>(a.z), b, acc2);
            acc3 = fma(vec4<f32>(a.w), b, acc3);
        }
        workgroupBarrier();
    }

    // Thread (lid.x, lid.y) holds rows m0 + 4 lid.y + i, columns n0 + 4 lid.x + j.
    store_block(m0 + 4u * lid.y, n0 + 4u * lid.x, acc0, acc1, acc2, acc3);
}

// ---- Narrow tiles: layers with at most 16 output channels --------------------------------
// conv2d's 64 x 64 tile computes 64 output channels whatever the layer has: for a VAE's last
// convolution (3 channels) 95% of its arithmetic is thrown away, for an 8-channel layer (the
// large-image test's VAE) 88%. This entry point computes 16 x 128 tiles (NARROW_M x NARROW_N) with a
// workgroup of 32 x 4 threads, each again a 4 x 4 block, from the same loads and stores.

const NARROW_M: u32 = 16u;
const NARROW_N: u32 = 128u;

// na_tile[kk * 4 + i] = weight rows 4i .. 4i + 3 of the tile at reduction index kk.
var<workgroup> na_tile: array<vec4<f32>, 64>;
// nb_tile[kk * 32 + j] = columns 4j .. 4j + 3 of the tile at reduction index kk.
var<workgroup> nb_tile: array<vec4<f32>, 512>;

@compute @workgroup_size(32, 4)
fn conv2d_narrow(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    // As conv2d: column tiles over x and y, output-channel tiles along z; a workgroup past
    // the last column tile leaves before any barrier (uniformly).
    let tile_n = wid.y * nwg.x + wid.x;
    if (tile_n >= p.tiles_n) { return; }
    let m0 = wid.z * NARROW_M;
    let n0 = tile_n * NARROW_N;
    let khw = p.kh * p.kw;
    let plane = p.h * p.w;

    // Column loads: thread t fills nb_tile[kr * 32 + jq] for its column quad jq at the
    // reduction rows kr, kr + 4, kr + 8 and kr + 12 of each slice.
    let jq = t % 32u;
    let kr = t / 32u;
    let q = column_quad(n0 + 4u * jq);

    // Weight loads: the first 64 threads read row m0 + am, reduction indices k0 + 4 * ak4
    // .. + 3, as conv2d's threads do; the others read nothing.
    let am = t / 4u;
    let ak4 = t % 4u;
    let a_row = m0 + am;
    let a_ok = t < 64u && a_row < p.oc;
    let a_base = p.w_off + a_row * p.w_row;
    let a_slot = ak4 * 16u + am / 4u;
    let a_lane = am % 4u;

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);

    var wa = load_weights(a_ok, a_base, 4u * ak4);
    var v0 = gather_columns(kr, khw, plane, q);
    var v1 = gather_columns(kr + 4u, khw, plane, q);
    var v2 = gather_columns(kr + 8u, khw, plane, q);
    var v3 = gather_columns(kr + 12u, khw, plane, q);
    for (var k0 = 0u; k0 < p.k; k0 = k0 + TILE_K) {
        if (t < 64u) {
            na_tile[a_slot][a_lane] = wa.x;
            na_tile[a_slot + 4u][a_lane] = wa.y;
            na_tile[a_slot + 8u][a_lane] = wa.z;
            na_tile[a_slot + 12u][a_lane] = wa.w;
        }
        nb_tile[kr * 32u + jq] = v0;
        nb_tile[(kr + 4u) * 32u + jq] = v1;
        nb_tile[(kr + 8u) * 32u + jq] = v2;
        nb_tile[(kr + 12u) * 32u + jq] = v3;
        workgroupBarrier();

        let k1 = k0 + TILE_K;
        wa = load_weights(a_ok, a_base, k1 + 4u * ak4);
        v0 = gather_columns(k1 + kr, khw, plane, q);
        v1 = gather_columns(k1 + kr + 4u, khw, plane, q);
        v2 = gather_columns(k1 + kr + 8u, khw, plane, q);
        v3 = gather_columns(k1 + kr + 12u, khw, plane, q);

        for (var kk = 0u; kk < TILE_K; kk = kk + 1u) {
            let a = na_tile[kk * 4u + lid.y];
            let b = nb_tile[kk * 32u + lid.x];
            acc0 = fma(vec4<f32>(a.x), b, acc0);
            acc1 = fma(vec4<f32>(a.y), b, acc1);
            acc2 = fma(vec4<f32>(a.z), b, acc2);
            acc3 = fma(vec4<f32>(a.w), b, acc3);
        }
        workgroupBarrier();
    }

    // Thread (lid.x, lid.y) holds rows m0 + 4 lid.y + i, columns n0 + 4 lid.x + j.
    store_block(m0 + 4u * lid.y, n0 + 4u * lid.x, acc0, acc1, acc2, acc3);
}

// Four consecutive output columns (pixels over the batch) as the gathers see them, one lane
// per column (private arrays indexed in loops cost more on some compilers): their images'
// offsets and their top-left input coordinates. They are the same all the way along K, so
// each thread works them out once.
struct ColumnQuad {
    base: vec4<u32>,
    iy: vec4<i32>,
    ix: vec4<i32>,
}

fn column_quad(col0: u32) -> ColumnQuad {
    let pixels = p.oh * p.ow;
    let cols = vec4<u32>(col0, col0 + 1u, col0 + 2u, col0 + 3u);
    let img = cols / pixels;
    let pix = cols - img * pixels;
    let oy = pix / p.ow;
    let ox = pix - oy * p.ow;
    // A column past the end gets a row no kernel tap reaches, so every bounds test fails.
    let iy = select(vec4<i32>(-2147483647), vec4<i32>(oy * p.stride) - i32(p.pad_top),
                    cols < vec4<u32>(p.cols));
    return ColumnQuad(p.x_off + img * p.x_img, iy, vec4<i32>(ox * p.stride) - i32(p.pad_left));
}

// A thread's 4 x 4 block of the output: rows m .. m + 3 (one accumulator each), columns
// col0 .. col0 + 3.
fn store_block(m: u32, col0: u32, acc0: vec4<f32>, acc1: vec4<f32>, acc2: vec4<f32>, acc3: vec4<f32>) {
    let pixels = p.oh * p.ow;
    let cols = vec4<u32>(col0, col0 + 1u, col0 + 2u, col0 + 3u);
    let ok = cols < vec4<u32>(p.cols);
    let img = cols / pixels;
    // Offsets of the four columns in channel 0 (wrapped garbage where !ok: not written).
    let base = p.out_off + img * p.out_img + (cols - img * pixels);
    store_row(m, acc0, base, ok, pixels);
    store_row(m + 1u, acc1, base, ok, pixels);
    store_row(m + 2u, acc2, base, ok, pixels);
    store_row(m + 3u, acc3, base, ok, pixels);
}

// Weights k .. k + 3 of the row starting at `base` (0 past the row's end or when !ok).
fn load_weights(ok: bool, base: u32, k: u32) -> vec4<f32> {
    var wa = vec4<f32>(0.0);
    if (ok) {
        if (k < p.k) { wa.x = f32(weight[base + k]); }
        if (k + 1u < p.k) { wa.y = f32(weight[base + k + 1u]); }
        if (k + 2u < p.k) { wa.z = f32(weight[base + k + 2u]); }
        if (k + 3u < p.k) { wa.w = f32(weight[base + k + 3u]); }
    }
    return wa;
}

// Row k of the im2col matrix at four columns, given by their image offsets and top-left
// input coordinates: 0 in the padding and past the reduction's end.
fn gather_columns(k: u32, khw: u32, plane: u32, q: ColumnQuad) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (k < p.k) {
        let ci = k / khw;
        let r = k - ci * khw;
        let ky = r / p.kw;
        let kx = r - ky * p.kw;
        let iy = q.iy + i32(ky);
        let ix = q.ix + i32(kx);
        let inside = (iy >= vec4<i32>(0)) & (iy < vec4<i32>(i32(p.h))) & (ix >= vec4<i32>(0)) & (ix < vec4<i32>(i32(p.w)));
        // Offsets of the taps (garbage where outside: those are never read).
        let at = q.base + ci * plane + vec4<u32>(iy) * p.w + vec4<u32>(ix);
        if (inside.x) { v.x = x[at.x]; }
        if (inside.y) { v.y = x[at.y]; }
        if (inside.z) { v.z = x[at.z]; }
        if (inside.w) { v.w = x[at.w]; }
    }
    return v;
}

// Output channel m's four values (plus its bias) at the columns `base + m * pixels`.
fn store_row(m: u32, acc: vec4<f32>, base: vec4<u32>, ok: vec4<bool>, pixels: u32) {
    if (m >= p.oc) { return; }
    var row = acc;
    if (p.has_bias != 0u) {
        row = row + vec4<f32>(bias[p.bias_off + m]);
    }
    let at = base + m * pixels;
    if (p.accumulate != 0u) {
        if (ok.x) { row.x = row.x + out[at.x]; }
        if (ok.y) { row.y = row.y + out[at.y]; }
        if (ok.z) { row.z = row.z + out[at.z]; }
        if (ok.w) { row.w = row.w + out[at.w]; }
    }
    if (ok.x) { out[at.x] = row.x; }
    if (ok.y) { out[at.y] = row.y; }
    if (ok.z) { out[at.z] = row.z; }
    if (ok.w) { out[at.w] = row.w; }
}

// ---- im2col + a product: the convolution on devices with cooperative matrices ----------
// There the matrix product kernel (gemm_coop.wgsl's matmul_nt_coop) runs far faster than
// any gather inside the product, so conv.rs writes the im2col rows of a range of output
// pixels to a buffer (`im2col`), multiplies them by the weight (rows x K @ [oc, K]^T, plus
// the bias), and moves the [pixel][oc] result into the NCHW output (`rows_to_nchw`). Both
// are one thread per element over a 2-D grid (context::groups_1d); threads past the end
// return at once. Every read is inside the buffers by the sizes given (checked by the host).

struct Im2col {
    h: u32,
    w: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad_top: u32,
    pad_left: u32,
    oh: u32,
    ow: u32,
    k: u32,      // c * kh * kw: one row's length
    row0: u32,   // the first output pixel (over the batch) of this range
    rows: u32,   // output pixels in this range
    x_img: u32,  // input elements per image
}

@group(0) @binding(0) var<storage, read> ip: Im2col;
@group(0) @binding(1) var<storage, read> ix: array<f32>;
@group(0) @binding(2) var<storage, read_write> icols: array<f32>;

@compute @workgroup_size(256)
fn im2col(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid.x;
    if (i >= ip.rows * ip.k) { return; }
    let r = i / ip.k;
    let kk = i - r * ip.k;
    let row = ip.row0 + r;
    let pixels = ip.oh * ip.ow;
    let img = row / pixels;
    let pix = row - img * pixels;
    let oy = pix / ip.ow;
    let ox = pix - oy * ip.ow;
    let khw = ip.kh * ip.kw;
    let ci = kk / khw;
    let rem = kk - ci * khw;
    let ky = rem / ip.kw;
    let kx = rem - ky * ip.kw;
    let iy = i32(oy * ip.stride + ky) - i32(ip.pad_top);
    let ixx = i32(ox * ip.stride + kx) - i32(ip.pad_left);
    var v = 0.0;
    if (iy >= 0 && iy < i32(ip.h) && ixx >= 0 && ixx < i32(ip.w)) {
        v = ix[img * ip.x_img + ci * ip.h * ip.w + u32(iy) * ip.w + u32(ixx)];
    }
    icols[i] = v;
}

struct ToNchw {
    oc: u32,
    pixels: u32,  // output pixels per image
    row0: u32,    // the range's first output pixel over the batch
    rows: u32,
}

@group(0) @binding(0) var<storage, read> tp: ToNchw;
@group(0) @binding(1) var<storage, read> trows: array<f32>;   // [rows][oc]
@group(0) @binding(2) var<storage, read_write> tout: array<f32>; // [n][oc][pixels]

// One thread per output value, pixels fastest, so the writes are contiguous.
@compute @workgroup_size(256)
fn rows_to_nchw(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid.x;
    if (i >= tp.rows * tp.oc) { return; }
    let o = i / tp.rows;
    let r = i - o * tp.rows;
    let row = tp.row0 + r;
    let img = row / tp.pixels;
    let at = img * tp.oc * tp.pixels + o * tp.pixels + (row - img * tp.pixels);
    tout[at] = trows[r * tp.oc + o];
}
