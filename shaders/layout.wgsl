// Layout kernels: a strided copy (permute, narrow, cat), nearest upsampling and row gathers
// (embedding lookup). One thread per output element, 256 per workgroup
// (context::WORKGROUP_1D); the flat index comes from a 2-D grid (context::groups_1d) and
// every kernel returns past `len`. Buffers may be bound as windows of larger buffers: every
// index is relative to its window, and every read and write is checked against
// arrayLength of the binding it touches.

const MAX_RANK: u32 = 8u;

// out[out_offset + sum_d idx_d * out_strides[d]] = in[in_offset + sum_d idx_d * in_strides[d]]
// for every index (idx_0, .., idx_{rank-1}) of `shape` (row-major, flat index < len).
struct Copy {
    len: u32,
    rank: u32,
    in_offset: u32,
    out_offset: u32,
    shape: array<u32, 8>,
    in_strides: array<u32, 8>,
    out_strides: array<u32, 8>,
}

// Planes of h x w become planes of oh x ow; map[0..oh] holds the source row of each output
// row and map[oh..oh+ow] the source column of each output column (computed on the host by
// the CPU backend's rule, so both agree exactly).
struct Upsample {
    len: u32,     // planes * oh * ow
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    in_offset: u32,   // where the window's first plane starts in the input window
    out_offset: u32,  // and in the output window
    _pad: u32,
}

// `count` rows of `d` values: pairs[2k] is the output row of the k-th copy and pairs[2k+1]
// the element offset of its source row in the table window.
struct Gather {
    len: u32,     // count * d
    d: u32,
    _pad0: u32,
    _pad1: u32,
}

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.y * nwg.x + wid.x) * 256u + lid.x;
}

@group(0) @binding(0) var<storage, read> copy_p: Copy;
@group(0) @binding(1) var<storage, read> copy_in: array<f32>;
@group(0) @binding(2) var<storage, read_write> copy_out: array<f32>;

@compute @workgroup_size(256)
fn strided_copy(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= copy_p.len) { return; }
    var rem = i;
    var si = copy_p.in_offset;
    var di = copy_p.out_offset;
    let rank = min(copy_p.rank, MAX_RANK);
    for (var d = i32(rank) - 1; d >= 0; d = d - 1) {
        let extent = max(copy_p.shape[d], 1u);
        let idx = rem % extent;
        rem = rem / extent;
        si = si + idx * copy_p.in_strides[d];
        di = di + idx * copy_p.out_strides[d];
    }
    if (si < arrayLength(&copy_in) && di < arrayLength(&copy_out)) {
        copy_out[di] = copy_in[si];
    }
}

@group(0) @binding(0) var<storage, read> up_p: Upsample;
@group(0) @binding(1) var<storage, read> up_map: array<u32>;
@group(0) @binding(2) var<storage, read> up_in: array<f32>;
@group(0) @binding(3) var<storage, read_write> up_out: array<f32>;

@compute @workgroup_size(256)
fn upsample_nearest(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= up_p.len) { return; }
    let ox = i % up_p.ow;
    let row = i / up_p.ow;
    let oy = row % up_p.oh;
    let plane = row / up_p.oh;
    let mi = up_p.oh + ox;
    if (oy >= arrayLength(&up_map) || mi >= arrayLength(&up_map)) { return; }
    let si = up_p.in_offset + (plane * up_p.h + up_map[oy]) * up_p.w + up_map[mi];
    let di = up_p.out_offset + i;
    if (si < arrayLength(&up_in) && di < arrayLength(&up_out)) {
        up_out[di] = up_in[si];
    }
}

@group(0) @binding(0) var<storage, read> gather_p: Gather;
@group(0) @binding(1) var<storage, read> gather_pairs: array<u32>;
// The table's element type W: f16 for tables kept in half precision (declared by the header
// the host generates: context::Kernel::header).

@group(0) @binding(2) var<storage, read> gather_table: array<W>;
@group(0) @binding(3) var<storage, read_write> gather_out: array<f32>;

@compute @workgroup_size(256)
fn gather_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= gather_p.len) { return; }
    let k = i / gather_p.d;
    let j = i % gather_p.d;
    if (2u * k + 1u >= arrayLength(&gather_pairs)) { return; }
    let di = gather_pairs[2u * k] * gather_p.d + j;
    let si = gather_pairs[2u * k + 1u] + j;
    if (si < arrayLength(&gather_table) && di < arrayLength(&gather_out)) {
        gather_out[di] = f32(gather_table[si]);
    }
}
