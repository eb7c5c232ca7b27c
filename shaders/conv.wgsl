// 2-D convolution (torch nn.Conv2d: NCHW input, OIHW weight, zero padding) as an
// implicit GEMM:
//
//     out[oc, col] = sum_k weight[oc, k] * columns[k, col]
//
// with k = (ci, ky, kx) over c * kh * kw and col = (b, oy, ox) over n * oh * ow. The im2col
// `columns` matrix never exists in memory: each workgroup gathers its tile of it straight
// from the input while filling workgroup memory, reading 0 in the padding.
//
// A workgroup of TX x TY threads computes a TILE_M x TILE_N output tile, each thread RM
// rows by CN quads of 4 columns in registers, walking K in slices of TILE_K = 16. The shape
// is a set of pipeline-overridable constants (conv::TileShape picks them per layer and
// adapter; every loop over them has a constant trip count, so drivers unroll it and keep
// the accumulators in registers). A slice's global reads go to registers before the
// previous slice's arithmetic, and into workgroup memory after it (one barrier pair per
// slice). Every global read is guarded (k < K, oc < OC, col < N, and the input coordinates
// inside the image), so any sizes work; tiles hanging over the edges load 0 and store
// nothing. Buffers may be windows of larger ones (see Params); all addressing is relative
// to the offsets given there.
//
// The weight has element type W, read as f32(..) and accumulated in f32: `alias W = f32;` or,
// for weights kept in half precision, `enable f16; alias W = f16;`, in the header the host
// generates (context::Kernel::header). Everything else is f32.

override TX: u32 = 16u;   // threads along the columns
override TY: u32 = 16u;   // threads along the output channels
override RM: u32 = 4u;    // output channels per thread (a multiple of 4)
override CN: u32 = 1u;    // quads of 4 columns per thread, TX quads apart
const TILE_K: u32 = 16u;  // reduction slice
const MAX_LOADS: u32 = 8u;   // weight quads and column quads a thread loads per slice
const MAX_BLOCK: u32 = 16u;  // RM * CN: vec4 accumulators per thread

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

// a_tile[kk * TY * RM / 4 + i] = weight rows 4i .. 4i + 3 of the tile at reduction index kk.
var<workgroup> a_tile: array<vec4<f32>, TILE_K * TY * RM / 4u>;
// b_tile[kk * TX * CN + j] = columns 4j .. 4j + 3 of the tile at reduction index kk.
var<workgroup> b_tile: array<vec4<f32>, TILE_K * TX * CN>;

@compute @workgroup_size(TX * TY)
fn conv2d(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) t: u32) {
    let threads = TX * TY;
    let row_quads = TY * RM / 4u;   // of the tile
    let col_quads = TX * CN;
    // Column tiles are spread over x and y (the grid's dimensions are limited); z walks the
    // output-channel tiles. A workgroup past the last column tile has nothing to do (the
    // test is uniform across it, so leaving before the barriers is fine).
    let tile_n = wid.y * nwg.x + wid.x;
    if (tile_n >= p.tiles_n) { return; }
    let m0 = wid.z * TY * RM;
    let n0 = tile_n * 4u * col_quads;
    let khw = p.kh * p.kw;
    let plane = p.h * p.w;

    // Column loads: thread t fills b_tile[kr * col_quads + jq] with columns n0 + 4jq .. + 3
    // at reduction rows kr, kr + k_step, ... of each slice.
    let jq = t % col_quads;
    let kr = t / col_quads;
    let k_step = threads / col_quads;
    let q = column_quad(n0 + 4u * jq);

    // Weight loads: item e = t, t + threads, ... (while e < 4 * TILE_M) reads row m0 + e / 4,
    // reduction indices k0 + 4 * (e % 4) .. + 3 (contiguous in memory) and scatters them into
    // a_tile's k-major layout.
    // (Private arrays take constant sizes: the largest any shape needs, conv::TileShape.)
    var wa: array<vec4<f32>, MAX_LOADS>;
    var v: array<vec4<f32>, MAX_LOADS>;
    for (var i = 0u; i < (4u * TY * RM + threads - 1u) / threads; i = i + 1u) {
        wa[i] = weight_item(m0, t + i * threads, 0u);
    }
    for (var i = 0u; i < TILE_K / k_step; i = i + 1u) {
        v[i] = gather_columns(kr + i * k_step, khw, plane, q);
    }

    var acc: array<vec4<f32>, MAX_BLOCK>;
    for (var i = 0u; i < RM * CN; i = i + 1u) {
        acc[i] = vec4<f32>(0.0);
    }

    // Thread t's block: rows m0 + ly * RM + i, column quads lx + j * TX.
    let lx = t % TX;
    let ly = t / TX;
    // Each slice's global reads are issued before the previous slice's arithmetic (into
    // registers) so their latency hides behind it; the last prefetch reads nothing.
    for (var k0 = 0u; k0 < p.k; k0 = k0 + TILE_K) {
        for (var i = 0u; i < (4u * TY * RM + threads - 1u) / threads; i = i + 1u) {
            let e = t + i * threads;
            if (e < 4u * TY * RM) {
                let slot = (e % 4u) * 4u * row_quads + e / 16u;
                let lane = (e / 4u) % 4u;
                a_tile[slot][lane] = wa[i].x;
                a_tile[slot + row_quads][lane] = wa[i].y;
                a_tile[slot + 2u * row_quads][lane] = wa[i].z;
                a_tile[slot + 3u * row_quads][lane] = wa[i].w;
            }
        }
        for (var i = 0u; i < TILE_K / k_step; i = i + 1u) {
            b_tile[(kr + i * k_step) * col_quads + jq] = v[i];
        }
        workgroupBarrier();

        let k1 = k0 + TILE_K;
        for (var i = 0u; i < (4u * TY * RM + threads - 1u) / threads; i = i + 1u) {
            wa[i] = weight_item(m0, t + i * threads, k1);
        }
        for (var i = 0u; i < TILE_K / k_step; i = i + 1u) {
            v[i] = gather_columns(k1 + kr + i * k_step, khw, plane, q);
        }

        for (var kk = 0u; kk < TILE_K; kk = kk + 1u) {
            for (var i4 = 0u; i4 < RM / 4u; i4 = i4 + 1u) {
                let a = a_tile[kk * row_quads + ly * (RM / 4u) + i4];
                for (var j = 0u; j < CN; j = j + 1u) {
                    let b = b_tile[kk * col_quads + lx + j * TX];
                    let r = (4u * i4) * CN + j;
                    acc[r] = fma(vec4<f32>(a.x), b, acc[r]);
                    acc[r + CN] = fma(vec4<f32>(a.y), b, acc[r + CN]);
                    acc[r + 2u * CN] = fma(vec4<f32>(a.z), b, acc[r + 2u * CN]);
                    acc[r + 3u * CN] = fma(vec4<f32>(a.w), b, acc[r + 3u * CN]);
                }
            }
        }
        workgroupBarrier();
    }

    for (var j = 0u; j < CN; j = j + 1u) {
        let cols = column_block(n0 + 4u * (lx + j * TX));
        for (var i = 0u; i < RM; i = i + 1u) {
            store_row(m0 + ly * RM + i, acc[i * CN + j], cols);
        }
    }
}

// Item e of a slice's weight loads (see conv2d): row m0 + e / 4, reduction indices
// k0 + 4 * (e % 4) .. + 3; 0 past the tile's rows.
fn weight_item(m0: u32, e: u32, k0: u32) -> vec4<f32> {
    let row = m0 + e / 4u;
    let ok = e < 4u * TY * RM && row < p.oc;
    return load_weights(ok, p.w_off + row * p.w_row, k0 + 4u * (e % 4u));
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

// Four consecutive output columns col0 .. col0 + 3 as the stores see them: their offsets in
// channel 0 of the output (wrapped garbage where !ok: not written) and which exist.
struct ColumnBlock {
    base: vec4<u32>,
    ok: vec4<bool>,
}

fn column_block(col0: u32) -> ColumnBlock {
    let pixels = p.oh * p.ow;
    let cols = vec4<u32>(col0, col0 + 1u, col0 + 2u, col0 + 3u);
    let img = cols / pixels;
    return ColumnBlock(p.out_off + img * p.out_img + (cols - img * pixels), cols < vec4<u32>(p.cols));
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

// Output channel m's four values (plus its bias) at the columns `c`.
fn store_row(m: u32, acc: vec4<f32>, c: ColumnBlock) {
    if (m >= p.oc) { return; }
    var row = acc;
    if (p.has_bias != 0u) {
        row = row + vec4<f32>(bias[p.bias_off + m]);
    }
    let at = c.base + m * p.oh * p.ow;
    let ok = c.ok;
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
