//! Layout kernels (`shaders/layout.wgsl`): permute, narrow, cat, nearest upsampling and
//! embedding lookup. Mirrors `backend::cpu::layout`.
//!
//! Permute, narrow and cat are all one strided copy, `out[out_offset + Σ i_d·os_d] =
//! in[in_offset + Σ i_d·is_d]` over a shape of rank ≤ 8 (after merging the dimensions that
//! are contiguous in both buffers): a copy that is one contiguous block on both sides becomes
//! a plain buffer-to-buffer copy (narrow and cat along the outermost non-unit dimension), the
//! rest run the `strided_copy` kernel, one thread per element.
//!
//! Every kernel binds windows of its buffers (offsets aligned to the adapter's
//! `min_storage_buffer_offset_alignment`), so tensors larger than
//! `max_storage_buffer_binding_size` (128 MiB on llvmpipe) are handled by splitting the work
//! into pieces whose reads and writes each fit one window: a VAE decoder's 256 MiB upsampled
//! activation, or SD 1.5's 152 MB token-embedding table.

use bytemuck::{Pod, Zeroable};

use super::context::{Kernel, WORKGROUP_1D};
use super::elementwise::u32_of;
use super::storage::BindLimit;
use super::GpuStorage;
use crate::error::{Error, Result};
use crate::shader;
use crate::tensor::params::nearest_source;

const STRIDED_COPY: Kernel = Kernel::new(shader!("layout"), "strided_copy");
const UPSAMPLE: Kernel = Kernel::new(shader!("layout"), "upsample_nearest");
const GATHER: Kernel = Kernel::new(shader!("layout"), "gather_rows").reading_weights();

/// Every kernel of this family, for the translation test (see `super::kernels`).
pub(super) const KERNELS: &[Kernel] = &[STRIDED_COPY, UPSAMPLE, GATHER];

/// Highest rank the strided copy takes, after merging contiguous dimensions (`MAX_RANK` in
/// the shader).
const MAX_RANK: usize = 8;

/// Most passes one op may split into to fit the binding limit; beyond that it is refused
/// (only a permute of a tensor far over the limit gets near it).
const MAX_PIECES: usize = 4096;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct CopyParams {
    len: u32,
    rank: u32,
    in_offset: u32,
    out_offset: u32,
    shape: [u32; MAX_RANK],
    in_strides: [u32; MAX_RANK],
    out_strides: [u32; MAX_RANK],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct UpsampleParams {
    len: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    in_offset: u32,
    out_offset: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct GatherParams {
    len: u32,
    d: u32,
    _pad: [u32; 2],
}

/// Row-major strides of `shape`.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// One strided copy: `shape` with the input's and output's element strides and offsets.
#[derive(Clone, Debug, PartialEq)]
struct StridedCopy {
    shape: Vec<usize>,
    in_strides: Vec<usize>,
    out_strides: Vec<usize>,
    in_offset: usize,
    out_offset: usize,
}

impl StridedCopy {
    /// The same copy with unit dimensions dropped and neighbours that are contiguous in both
    /// buffers merged (at least one dimension remains).
    fn collapsed(self) -> StridedCopy {
        let (mut shape, mut is, mut os) = (Vec::new(), Vec::new(), Vec::new());
        for d in 0..self.shape.len() {
            let n = self.shape[d];
            if n == 1 {
                continue;
            }
            match (shape.last_mut(), is.last_mut(), os.last_mut()) {
                (Some(ln), Some(li), Some(lo))
                    if *li == self.in_strides[d] * n && *lo == self.out_strides[d] * n =>
                {
                    *ln *= n;
                    *li = self.in_strides[d];
                    *lo = self.out_strides[d];
                }
                _ => {
                    shape.push(n);
                    is.push(self.in_strides[d]);
                    os.push(self.out_strides[d]);
                }
            }
        }
        if shape.is_empty() {
            (shape, is, os) = (vec![1], vec![1], vec![1]);
        }
        StridedCopy {
            shape,
            in_strides: is,
            out_strides: os,
            ..self
        }
    }

    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Elements from the first to the last one touched, with strides `s`.
    fn span(&self, s: &[usize]) -> usize {
        1 + self
            .shape
            .iter()
            .zip(s)
            .map(|(&n, &st)| (n - 1) * st)
            .sum::<usize>()
    }

    /// One contiguous block on both sides.
    fn is_block(&self) -> bool {
        self.shape.len() == 1 && self.in_strides[0] == 1 && self.out_strides[0] == 1
    }

    /// Splits the copy into pieces that are blocks or whose reads and writes each fit one
    /// window, halving the outermost dimension (dropping it when it is 1) until they do.
    fn split(self, limit: &BindLimit, pieces: &mut Vec<StridedCopy>) -> Result<()> {
        if pieces.len() >= MAX_PIECES {
            return Err(Error::Gpu(format!(
                "more than {MAX_PIECES} pieces to stay under the adapter's {} MiB binding limit",
                limit.max_bytes() >> 20
            )));
        }
        let fits = self.span(&self.in_strides) <= limit.span()
            && self.span(&self.out_strides) <= limit.span();
        if self.is_block() || fits {
            pieces.push(self);
            return Ok(());
        }
        if self.shape[0] > 1 {
            let k = self.shape[0] / 2;
            let mut second = self.clone();
            second.shape[0] -= k;
            second.in_offset += k * self.in_strides[0];
            second.out_offset += k * self.out_strides[0];
            let mut first = self;
            first.shape[0] = k;
            first.split(limit, pieces)?;
            second.split(limit, pieces)
        } else if self.shape.len() == 1 {
            Err(Error::Gpu(
                "the binding limit is smaller than one element".into(),
            ))
        } else {
            let mut rest = self;
            rest.shape.remove(0);
            rest.in_strides.remove(0);
            rest.out_strides.remove(0);
            rest.split(limit, pieces)
        }
    }
}

/// Runs the copies `copies` from `src` into `dst`, splitting them to fit `limit`.
fn run_copies(
    op: &str,
    src: &GpuStorage,
    dst: &GpuStorage,
    copies: Vec<StridedCopy>,
    limit: &BindLimit,
) -> Result<()> {
    let ctx = &src.ctx;
    let mut pieces = Vec::new();
    for c in copies {
        if c.shape.contains(&0) {
            continue;
        }
        let c = c.collapsed();
        if c.shape.len() > MAX_RANK {
            return Err(Error::Gpu(format!(
                "{op}: {} dimensions remain after merging contiguous ones (at most {MAX_RANK})",
                c.shape.len()
            )));
        }
        c.split(limit, &mut pieces)
            .map_err(|e| Error::Gpu(format!("{op} of {} elements: {e}", src.len())))?;
    }
    for c in pieces {
        let len = c.numel();
        if c.is_block() {
            let (s, d) = (src.buffer(), dst.buffer());
            ctx.record(|encoder| {
                encoder.copy_buffer_to_buffer(
                    s,
                    c.in_offset as u64 * 4,
                    d,
                    c.out_offset as u64 * 4,
                    len as u64 * 4,
                )
            });
            continue;
        }
        let (in_start, in_len) = limit.window(c.in_offset, c.in_offset + c.span(&c.in_strides));
        let (out_start, out_len) =
            limit.window(c.out_offset, c.out_offset + c.span(&c.out_strides));
        let mut p = CopyParams {
            len: u32_of("elements", len)?,
            rank: c.shape.len() as u32,
            in_offset: u32_of("offset", c.in_offset - in_start)?,
            out_offset: u32_of("offset", c.out_offset - out_start)?,
            shape: [1; MAX_RANK],
            in_strides: [0; MAX_RANK],
            out_strides: [0; MAX_RANK],
        };
        for d in 0..c.shape.len() {
            p.shape[d] = u32_of("dimension", c.shape[d])?;
            p.in_strides[d] = u32_of("stride", c.in_strides[d])?;
            p.out_strides[d] = u32_of("stride", c.out_strides[d])?;
        }
        ctx.dispatch(
            STRIDED_COPY,
            bytemuck::bytes_of(&p),
            &[src.window(in_start, in_len), dst.window(out_start, out_len)],
            ctx.groups_1d(len, WORKGROUP_1D),
        );
    }
    Ok(())
}

pub fn permute(x: &GpuStorage, shape: &[usize], axes: &[usize]) -> Result<GpuStorage> {
    permute_within(&*x.as_f32()?, shape, axes, &BindLimit::of(&x.ctx))
}

fn permute_within(
    x: &GpuStorage,
    shape: &[usize],
    axes: &[usize],
    limit: &BindLimit,
) -> Result<GpuStorage> {
    let in_strides = strides(shape);
    let out_shape: Vec<usize> = axes.iter().map(|&a| shape[a]).collect();
    let copy = StridedCopy {
        in_strides: axes.iter().map(|&a| in_strides[a]).collect(),
        out_strides: strides(&out_shape),
        shape: out_shape,
        in_offset: 0,
        out_offset: 0,
    };
    let out = GpuStorage::output(&x.ctx, copy.numel());
    run_copies("permute", x, &out, vec![copy], limit)?;
    Ok(out)
}

pub fn narrow(
    x: &GpuStorage,
    shape: &[usize],
    dim: usize,
    start: usize,
    len: usize,
) -> Result<GpuStorage> {
    narrow_within(
        &*x.as_f32()?,
        shape,
        dim,
        start,
        len,
        &BindLimit::of(&x.ctx),
    )
}

fn narrow_within(
    x: &GpuStorage,
    shape: &[usize],
    dim: usize,
    start: usize,
    len: usize,
    limit: &BindLimit,
) -> Result<GpuStorage> {
    let in_strides = strides(shape);
    let mut out_shape = shape.to_vec();
    out_shape[dim] = len;
    let copy = StridedCopy {
        in_offset: start * in_strides[dim],
        out_offset: 0,
        out_strides: strides(&out_shape),
        in_strides,
        shape: out_shape,
    };
    let out = GpuStorage::output(&x.ctx, copy.numel());
    run_copies("narrow", x, &out, vec![copy], limit)?;
    Ok(out)
}

pub fn cat(parts: &[(&GpuStorage, &[usize])], dim: usize) -> Result<GpuStorage> {
    let Some((first, _)) = parts.first() else {
        return Err(Error::Gpu("cat: no tensors".into()));
    };
    let wide = parts
        .iter()
        .map(|(x, _)| x.as_f32())
        .collect::<Result<Vec<_>>>()?;
    let parts: Vec<(&GpuStorage, &[usize])> = wide
        .iter()
        .zip(parts)
        .map(|(x, (_, shape))| (&**x, *shape))
        .collect();
    cat_within(&parts, dim, &BindLimit::of(&first.ctx))
}

fn cat_within(
    parts: &[(&GpuStorage, &[usize])],
    dim: usize,
    limit: &BindLimit,
) -> Result<GpuStorage> {
    let Some((first, first_shape)) = parts.first() else {
        return Err(Error::Gpu("cat: no tensors".into()));
    };
    let mut out_shape = first_shape.to_vec();
    out_shape[dim] = parts.iter().map(|(_, s)| s[dim]).sum();
    let out_strides = strides(&out_shape);
    let out = GpuStorage::output(&first.ctx, out_shape.iter().product());
    let mut at = 0;
    for (x, shape) in parts {
        let copy = StridedCopy {
            shape: shape.to_vec(),
            in_strides: strides(shape),
            out_strides: out_strides.clone(),
            in_offset: 0,
            out_offset: at * out_strides[dim],
        };
        at += shape[dim];
        run_copies("cat", x, &out, vec![copy], limit)?;
    }
    Ok(out)
}

pub fn upsample_nearest(
    x: &GpuStorage,
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> Result<GpuStorage> {
    upsample_within(&*x.as_f32()?, planes, h, w, oh, ow, &BindLimit::of(&x.ctx))
}

fn upsample_within(
    x: &GpuStorage,
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    limit: &BindLimit,
) -> Result<GpuStorage> {
    let ctx = &x.ctx;
    let out = GpuStorage::output(ctx, planes * oh * ow);
    if out.is_empty() {
        return Ok(out);
    }
    if h == 0 || w == 0 {
        return Err(Error::Gpu(format!(
            "upsample_nearest: an empty {h}x{w} input cannot fill {oh}x{ow}"
        )));
    }
    let (plane_in, plane_out) = (h * w, oh * ow);
    // Whole planes per pass, as many as fit one window on both sides.
    let per_pass = (limit.span() / plane_in)
        .min(limit.span() / plane_out)
        .min(planes);
    if per_pass == 0 {
        return Err(Error::Gpu(format!(
            "upsample_nearest: one {h}x{w} -> {oh}x{ow} plane exceeds the adapter's {} MiB binding limit",
            limit.max_bytes() >> 20
        )));
    }
    let map: Vec<u32> = (0..oh)
        .map(|i| nearest_source(i, h, oh))
        .chain((0..ow).map(|j| nearest_source(j, w, ow)))
        .map(|i| i as u32)
        .collect();
    let map = ctx.upload(bytemuck::cast_slice(&map));
    let mut p0 = 0;
    while p0 < planes {
        let n = per_pass.min(planes - p0);
        let (in_start, in_len) = limit.window(p0 * plane_in, (p0 + n) * plane_in);
        let (out_start, out_len) = limit.window(p0 * plane_out, (p0 + n) * plane_out);
        let p = UpsampleParams {
            len: u32_of("elements", n * plane_out)?,
            h: u32_of("height", h)?,
            w: u32_of("width", w)?,
            oh: u32_of("height", oh)?,
            ow: u32_of("width", ow)?,
            in_offset: u32_of("offset", p0 * plane_in - in_start)?,
            out_offset: u32_of("offset", p0 * plane_out - out_start)?,
            _pad: 0,
        };
        ctx.dispatch(
            UPSAMPLE,
            bytemuck::bytes_of(&p),
            &[
                map.as_entire_binding(),
                x.window(in_start, in_len),
                out.window(out_start, out_len),
            ],
            ctx.groups_1d(n * plane_out, WORKGROUP_1D),
        );
        p0 += n;
    }
    Ok(out)
}

pub fn gather_rows(table: &GpuStorage, d: usize, ids: &[u32]) -> Result<GpuStorage> {
    gather_within(table, d, ids, &BindLimit::of(&table.ctx))
}

/// Gathers per window of the table: each pass binds one window (as large as the binding
/// limit allows) and copies the rows of `ids` that lie wholly inside it. An f16 table (a
/// token embedding kept in half precision) is read natively by the kernel's f16 variant.
fn gather_within(
    table: &GpuStorage,
    d: usize,
    ids: &[u32],
    limit: &BindLimit,
) -> Result<GpuStorage> {
    let ctx = &table.ctx;
    let out = GpuStorage::output(ctx, ids.len() * d);
    if out.is_empty() {
        return Ok(out);
    }
    let rows = table.len() / d;
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= rows) {
        return Err(Error::Gpu(format!(
            "gather_rows: id {bad} is outside the table of {rows} rows"
        )));
    }
    // The output is f32; the table's windows are counted in its own elements.
    let table_limit = limit.for_elem(table.elem_bytes());
    if out.len() > limit.max_elems || d > table_limit.span() {
        return Err(Error::Gpu(format!(
            "gather_rows: {} rows of {d} exceed the adapter's {} MiB binding limit",
            ids.len(),
            limit.max_bytes() >> 20
        )));
    }
    u32_of("elements", out.len())?;
    // (id, output row), by id.
    let mut order: Vec<(usize, u32)> = ids
        .iter()
        .enumerate()
        .map(|(k, &id)| (id as usize, k as u32))
        .collect();
    order.sort_unstable();
    let mut next = 0;
    while next < order.len() {
        let first_row = order[next].0;
        let (start, _) = table_limit.window(first_row * d, first_row * d);
        let end = table.len().min(start + table_limit.max_elems);
        let mut pairs = Vec::new();
        while next < order.len() && (order[next].0 + 1) * d <= end {
            let (id, row) = order[next];
            pairs.extend([row, u32_of("offset", id * d - start)?]);
            next += 1;
        }
        let count = pairs.len() / 2;
        let p = GatherParams {
            len: u32_of("elements", count * d)?,
            d: u32_of("row length", d)?,
            _pad: [0; 2],
        };
        let pairs = ctx.upload(bytemuck::cast_slice(&pairs));
        ctx.dispatch(
            table.weight_kernel(GATHER),
            bytemuck::bytes_of(&p),
            &[
                pairs.as_entire_binding(),
                table.window_any(start, end - start),
                out.binding(),
            ],
            ctx.groups_1d(count * d, WORKGROUP_1D),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::{layout as cpu, CpuStorage};
    use crate::backend::gpu::context::GpuContext;
    use crate::backend::gpu::test_device;
    use crate::tensor::testing::{assert_ops_agree, random, random_f16};
    use crate::tensor::{Device, Tensor};

    /// Values that are all distinct, so a misplaced element never goes unnoticed.
    fn distinct(n: usize) -> Vec<f32> {
        (0..n).map(|i| i as f32 * 0.5 - 1000.0).collect()
    }

    fn cpu_values(s: CpuStorage) -> Vec<f32> {
        match s {
            CpuStorage::F32(v) => v,
            _ => unreachable!("layout ops give f32"),
        }
    }

    /// A tiny binding limit (in elements), so small tensors take the windowed paths.
    fn tiny(ctx: &GpuContext, elems: usize) -> BindLimit {
        BindLimit::new(ctx, (elems as u64 + 64) * 4)
    }

    #[test]
    fn permutes_of_rank_one_to_five_match_the_cpu() {
        let cases: [(&[usize], &[usize]); 9] = [
            (&[37], &[0]),
            (&[5, 7], &[1, 0]),
            (&[1, 9], &[1, 0]),
            (&[3, 5, 7], &[2, 0, 1]),
            (&[3, 5, 7], &[0, 2, 1]),
            (&[2, 3, 5, 7], &[0, 2, 1, 3]),
            (&[2, 3, 5, 7], &[3, 1, 0, 2]),
            (&[2, 1, 3, 5, 7], &[4, 2, 0, 1, 3]),
            (&[3, 4, 1, 5, 2], &[0, 1, 2, 3, 4]),
        ];
        for (i, (shape, axes)) in cases.into_iter().enumerate() {
            assert_ops_agree(
                &format!("permute {shape:?} {axes:?}"),
                &[random(shape, i as u64)],
                |t| t[0].permute(axes),
            );
        }
        // Rank 8 with nothing to merge: 2x3 alternating so no neighbours stay adjacent.
        let shape = [2, 3, 2, 3, 2, 3, 2, 3];
        assert_ops_agree("permute rank 8", &[random(&shape, 20)], |t| {
            t[0].permute(&[7, 5, 3, 1, 6, 4, 2, 0])
        });
        // Attention's head split: [b, n, h, d] -> [b, h, n, d].
        assert_ops_agree("permute heads", &[random(&[2, 300, 8, 40], 21)], |t| {
            t[0].permute(&[0, 2, 1, 3])
        });
    }

    #[test]
    fn narrow_on_every_dim_matches_the_cpu() {
        let x = random(&[3, 5, 7, 11], 30);
        for (dim, start, len) in [
            (0, 1, 2),
            (0, 0, 3),
            (1, 2, 3),
            (1, 4, 1),
            (2, 0, 6),
            (2, 3, 0),
            (3, 5, 6),
            (3, 10, 1),
        ] {
            assert_ops_agree(
                &format!("narrow {dim} {start} {len}"),
                std::slice::from_ref(&x),
                |t| t[0].narrow(dim, start, len),
            );
        }
        assert_ops_agree("narrow rank 1", &[random(&[1000], 31)], |t| {
            t[0].narrow(0, 333, 555)
        });
    }

    #[test]
    fn cat_of_three_parts_matches_the_cpu() {
        let shapes = |dim: usize| -> Vec<Vec<usize>> {
            [2, 5, 3]
                .iter()
                .map(|&n| {
                    let mut s = vec![3, 4, 7];
                    s[dim] = n;
                    s
                })
                .collect()
        };
        for dim in 0..3 {
            let inputs: Vec<Tensor> = shapes(dim)
                .iter()
                .enumerate()
                .map(|(i, s)| random(s, 40 + i as u64))
                .collect();
            assert_ops_agree(&format!("cat dim {dim}"), &inputs, |t| {
                Tensor::cat(&[&t[0], &t[1], &t[2]], dim)
            });
        }
        let one = [random(&[4, 6], 45)];
        assert_ops_agree("cat of one", &one, |t| Tensor::cat(&[&t[0]], 1));
        let with_empty = [
            random(&[2, 3], 46),
            random(&[2, 0], 47),
            random(&[2, 5], 48),
        ];
        assert_ops_agree("cat with an empty part", &with_empty, |t| {
            Tensor::cat(&[&t[0], &t[1], &t[2]], 1)
        });
    }

    #[test]
    fn upsample_nearest_matches_the_cpu() {
        for (oh, ow) in [(10, 14), (5, 7), (7, 9), (15, 21), (13, 4), (2, 3)] {
            assert_ops_agree(
                &format!("upsample to {oh}x{ow}"),
                &[random(&[2, 3, 5, 7], 50)],
                |t| t[0].upsample_nearest(oh, ow),
            );
        }
    }

    #[test]
    fn embedding_matches_the_cpu() {
        let ids = [5, 0, 99, 5, 42, 98, 1];
        assert_ops_agree("embedding", &[random(&[100, 37], 60)], |t| {
            t[0].embedding(&ids)
        });
        assert_ops_agree("embedding none", &[random(&[10, 8], 61)], |t| {
            t[0].embedding(&[])
        });
        // A table kept in f16 (SD's token embedding from an fp16 file), odd row length.
        assert_ops_agree("embedding f16", &[random_f16(&[100, 37], 62)], |t| {
            t[0].embedding(&ids)
        });
        assert_ops_agree("embedding f16 even", &[random_f16(&[100, 64], 63)], |t| {
            t[0].embedding(&ids)
        });
    }

    #[test]
    fn layout_ops_widen_f16_operands() {
        let x = random_f16(&[3, 5, 7], 64);
        assert_ops_agree("permute f16", std::slice::from_ref(&x), |t| {
            t[0].permute(&[2, 0, 1])
        });
        assert_ops_agree("narrow f16", std::slice::from_ref(&x), |t| {
            t[0].narrow(1, 1, 3)
        });
        assert_ops_agree(
            "cat f16 and f32",
            &[x.clone(), random(&[3, 2, 7], 65)],
            |t| Tensor::cat(&[&t[0], &t[1], &t[0]], 1),
        );
        assert_ops_agree("upsample f16", &[random_f16(&[1, 2, 3, 5], 66)], |t| {
            t[0].upsample_nearest(6, 10)
        });
    }

    /// Every op again with a binding limit of a few hundred elements, so they split into
    /// many windowed passes; compared exactly with the CPU backend.
    #[test]
    fn windowed_passes_match_the_cpu() {
        let Some(device) = test_device() else { return };
        let ctx = device.0.clone();
        let check = |what: &str, got: GpuStorage, expected: CpuStorage| {
            assert_eq!(got.to_f32().unwrap(), cpu_values(expected), "{what}");
        };
        let shape = [3, 5, 7, 11];
        let data = distinct(shape.iter().product());
        let (g, c) = (
            GpuStorage::from_f32(&device, &data),
            CpuStorage::F32(data.clone()),
        );
        for elems in [16, 100, 400, 1000] {
            let limit = tiny(&ctx, elems);
            for axes in [[0, 1, 2, 3], [3, 2, 1, 0], [0, 2, 1, 3], [1, 0, 3, 2]] {
                check(
                    &format!("permute {axes:?} in {elems}"),
                    permute_within(&g, &shape, &axes, &limit).unwrap(),
                    cpu::permute(&c, &shape, &axes),
                );
            }
            for (dim, start, len) in [(0, 1, 2), (1, 1, 3), (2, 2, 4), (3, 3, 7)] {
                check(
                    &format!("narrow {dim} in {elems}"),
                    narrow_within(&g, &shape, dim, start, len, &limit).unwrap(),
                    cpu::narrow(&c, &shape, dim, start, len),
                );
            }
            for dim in 0..4 {
                let other = {
                    let mut s = shape.to_vec();
                    s[dim] = 2;
                    s
                };
                let od = distinct(other.iter().product());
                let (og, oc) = (GpuStorage::from_f32(&device, &od), CpuStorage::F32(od));
                check(
                    &format!("cat {dim} in {elems}"),
                    cat_within(&[(&g, &shape), (&og, &other), (&g, &shape)], dim, &limit).unwrap(),
                    cpu::cat(&[(&c, &shape), (&oc, &other), (&c, &shape)], dim),
                );
            }
            let (planes, h, w) = (15, 7, 11);
            for (oh, ow) in [(14, 22), (10, 13)] {
                if oh * ow <= limit.span() {
                    check(
                        &format!("upsample {oh}x{ow} in {elems}"),
                        upsample_within(&g, planes, h, w, oh, ow, &limit).unwrap(),
                        cpu::upsample_nearest(&c, planes, h, w, oh, ow),
                    );
                }
            }
            let (rows, d) = (shape.iter().product::<usize>() / 7, 7);
            // The output is bound whole: as many ids as the limit allows.
            let n = 200.min(limit.max_elems / d);
            let ids: Vec<u32> = (0..n).map(|i| (i * 37 % rows) as u32).collect();
            check(
                &format!("gather in {elems}"),
                gather_within(&g, d, &ids, &limit).unwrap(),
                cpu::gather_rows(&c, d, &ids),
            );
            // The same values as an f16 table (exact in f16), windowed in f16 elements.
            let halves: Vec<half::f16> = data.iter().map(|&v| half::f16::from_f32(v)).collect();
            let g16 = GpuStorage::from_f16(&device, &halves);
            assert_eq!(g16.is_f16(), device.keeps_f16());
            check(
                &format!("gather f16 in {elems}"),
                gather_within(&g16, d, &ids, &limit).unwrap(),
                cpu::gather_rows(&c, d, &ids),
            );
        }
    }

    #[test]
    fn collapsing_merges_contiguous_dimensions() {
        let identity = StridedCopy {
            shape: vec![2, 1, 3, 4],
            in_strides: strides(&[2, 1, 3, 4]),
            out_strides: strides(&[2, 1, 3, 4]),
            in_offset: 5,
            out_offset: 0,
        };
        let c = identity.collapsed();
        assert_eq!(
            (c.shape, c.in_strides, c.out_strides),
            (vec![24], vec![1], vec![1])
        );
        let transpose = StridedCopy {
            shape: vec![4, 3],
            in_strides: vec![1, 4],
            out_strides: vec![3, 1],
            in_offset: 0,
            out_offset: 0,
        };
        assert_eq!(transpose.clone().collapsed(), transpose);
    }

    /// SD 1.5's token table (49408 x 768 f32, 152 MB) is over llvmpipe's 128 MiB binding
    /// limit: the lookup binds it in windows.
    #[test]
    fn embedding_of_a_table_over_the_binding_limit() {
        let Some(device) = test_device() else { return };
        let (rows, d) = (49408, 768);
        let limit = device.0.limits.max_storage_buffer_binding_size;
        if (rows * d * 4) as u64 <= limit {
            eprintln!("the adapter binds {limit} bytes: the table fits one window");
        }
        let table: Vec<f32> = (0..rows * d).map(|i| (i % 1_000_003) as f32).collect();
        let ids: Vec<u32> = vec![
            49406, 0, 320, 1929, 49407, 43690, 43691, 43689, 49407, 22000, 1,
        ];
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&i| table[i as usize * d..][..d].to_vec())
            .collect();
        let t = Tensor::from_vec(table, &[rows, d], &Device::Gpu(device)).unwrap();
        let got = t.embedding(&ids).unwrap();
        assert_eq!(got.shape(), &[ids.len(), d]);
        assert_eq!(got.to_vec().unwrap(), want);
    }
}
