// Elementwise kernels: unary activations, broadcasting binary ops, axpby, GEGLU, and the
// f16 -> f32 cast (`widen`).
// One thread per output element, 256 per workgroup (context::WORKGROUP_1D); the flat index
// comes from a 2-D grid (context::groups_1d) and every kernel returns past `len`. Tensors
// larger than one storage binding run in passes over windows of their buffers, so indices
// are relative to the pass (`base` gives the binary kernel's position in the whole output).

const MAX_RANK: u32 = 8u;

struct Unary {
    len: u32,
    op: u32,      // 0 silu, 1 gelu, 2 quick_gelu, 3 affine, 4 clamp, 5 sqrt, 6 exp
    a: f32,       // affine mul / clamp min
    b: f32,       // affine add / clamp max
}

struct Binary {
    len: u32,     // elements in this pass
    op: u32,      // 0 add, 1 sub, 2 mul, 3 div
    rank: u32,
    base: u32,    // flat output index of this pass's first element
    windowed: u32, // bit 0: lhs bound as this pass's window (same shape as the output); bit 1: rhs
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    shape: array<u32, 8>,     // output shape, outermost first
    lhs_strides: array<u32, 8>, // 0 where lhs is broadcast
    rhs_strides: array<u32, 8>,
}

struct Axpby {
    len: u32,
    a: f32,
    b: f32,
    _pad: u32,
}

struct Geglu {
    len: u32,     // output elements
    half: u32,    // output row length; input rows are twice as long
}

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.y * nwg.x + wid.x) * 256u + lid.x;
}

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

// erf with |error| < 1.2e-7 (Numerical Recipes' erfc, Chebyshev fit).
fn erf_approx(x: f32) -> f32 {
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 +
        t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 +
        t * (-0.82215223 + t * 0.17087277))))))));
    let erfc = t * exp(poly);
    return select(erfc - 1.0, 1.0 - erfc, x >= 0.0);
}

fn gelu(x: f32) -> f32 {
    return 0.5 * x * (1.0 + erf_approx(x * 0.70710678118654752));
}

@group(0) @binding(0) var<storage, read> unary_p: Unary;
@group(0) @binding(1) var<storage, read> unary_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> unary_out: array<f32>;

@compute @workgroup_size(256)
fn unary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= unary_p.len) { return; }
    let x = unary_x[i];
    var y: f32;
    switch unary_p.op {
        case 0u: { y = x * sigmoid(x); }
        case 1u: { y = gelu(x); }
        case 2u: { y = x * sigmoid(1.702 * x); }
        case 3u: { y = x * unary_p.a + unary_p.b; }
        case 4u: { y = min(max(x, unary_p.a), unary_p.b); }
        case 5u: { y = sqrt(x); }
        default: { y = exp(x); }
    }
    unary_out[i] = y;
}

@group(0) @binding(0) var<storage, read> binary_p: Binary;
@group(0) @binding(1) var<storage, read> binary_lhs: array<f32>;
@group(0) @binding(2) var<storage, read> binary_rhs: array<f32>;
@group(0) @binding(3) var<storage, read_write> binary_out: array<f32>;

@compute @workgroup_size(256)
fn binary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= binary_p.len) { return; }
    var rem = binary_p.base + i;
    var ia = 0u;
    var ib = 0u;
    for (var d = i32(binary_p.rank) - 1; d >= 0; d = d - 1) {
        let extent = binary_p.shape[d];
        let idx = rem % extent;
        rem = rem / extent;
        ia = ia + idx * binary_p.lhs_strides[d];
        ib = ib + idx * binary_p.rhs_strides[d];
    }
    if ((binary_p.windowed & 1u) != 0u) { ia = i; }
    if ((binary_p.windowed & 2u) != 0u) { ib = i; }
    let a = binary_lhs[ia];
    let b = binary_rhs[ib];
    var y: f32;
    switch binary_p.op {
        case 0u: { y = a + b; }
        case 1u: { y = a - b; }
        case 2u: { y = a * b; }
        default: { y = a / b; }
    }
    binary_out[i] = y;
}

@group(0) @binding(0) var<storage, read> axpby_p: Axpby;
@group(0) @binding(1) var<storage, read> axpby_x: array<f32>;
@group(0) @binding(2) var<storage, read> axpby_y: array<f32>;
@group(0) @binding(3) var<storage, read_write> axpby_out: array<f32>;

@compute @workgroup_size(256)
fn axpby(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= axpby_p.len) { return; }
    axpby_out[i] = axpby_p.a * axpby_x[i] + axpby_p.b * axpby_y[i];
}

@group(0) @binding(0) var<storage, read> geglu_p: Geglu;
@group(0) @binding(1) var<storage, read> geglu_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> geglu_out: array<f32>;

@compute @workgroup_size(256)
fn geglu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= geglu_p.len) { return; }
    let row = i / geglu_p.half;
    let j = i % geglu_p.half;
    let base = row * 2u * geglu_p.half;
    geglu_out[i] = geglu_x[base + j] * gelu(geglu_x[base + geglu_p.half + j]);
}

// `widen`'s input element type W: f16 in the variant that widens f16 weights to f32 (the
// header the host generates declares it: context::Kernel::header).

@group(0) @binding(0) var<storage, read> widen_p: Geglu;   // len = elements; half unused
@group(0) @binding(1) var<storage, read> widen_x: array<W>;
@group(0) @binding(2) var<storage, read_write> widen_out: array<f32>;

@compute @workgroup_size(256)
fn widen(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= widen_p.len) { return; }
    widen_out[i] = f32(widen_x[i]);
}
