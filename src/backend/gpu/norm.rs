//! Group norm (with fused SiLU) and layer norm (`shaders/norm.wgsl`). Mirrors `backend::cpu::norm`.
//!
//! Both normalise contiguous "slabs" sharing one mean and variance: a (sample, group) of a
//! group norm, a row of a layer norm (a group norm of one group, `d` channels of one value).
//! Statistics are f32, two-pass per chunk of values held in registers ([`chunk`]: 1024 or 4096), chunks
//! merged with Chan's pairwise formula. A slab of at most one chunk takes one pass (`fused`,
//! a workgroup per slab); a longer one three (`partials` per chunk, `finalize` per slab,
//! `apply` per value), so even a few huge groups keep the whole GPU busy.
//!
//! Tensors whose bytes exceed the adapter's storage-binding limit are processed in batches
//! of whole slabs, each bound as a window of the input and output buffers.

use bytemuck::{Pod, Zeroable};

use super::context::{GpuContext, Kernel, Tuning};
use super::elementwise::u32_of;
use super::storage::BindLimit;
use super::GpuStorage;
use crate::error::{Error, Result};
use crate::shader;

const FUSED: Kernel = Kernel::new(shader!("norm"), "fused");
const PARTIALS: Kernel = Kernel::new(shader!("norm"), "partials");
const FINALIZE: Kernel = Kernel::new(shader!("norm"), "finalize");
const APPLY: Kernel = Kernel::new(shader!("norm"), "apply");

/// Every kernel of this family at each tuning's workgroup size, for the translation test
/// (see `super::kernels`).
pub(super) const KERNELS: &[Kernel] = &{
    let entries = [FUSED, PARTIALS, FINALIZE, APPLY];
    let sizes = [HARDWARE_WORKGROUP, SOFTWARE_WORKGROUP];
    let mut all = [FUSED; 8];
    let mut i = 0;
    while i < all.len() {
        all[i] = entries[i / 2].with_constant("WG", sizes[i % 2]);
        i += 1;
    }
    all
};

/// Threads per workgroup of every norm kernel (the shader's override `WG`) on hardware
/// GPUs: the size measured on the H200.
const HARDWARE_WORKGROUP: u32 = 256;
/// The same on software adapters (see [`Tuning`]): there each of a reduction's barriers
/// costs a coroutine switch per 8 threads. On llvmpipe (2 EPYC cores) the tests' tiny SD
/// 1.x model spent 3.9 ms per fused group norm with 64 threads against 13.6 ms with 256
/// (and 5.2 ms with 32 threads of 32 values, whose private arrays cost more).
const SOFTWARE_WORKGROUP: u32 = 64;
/// Values each thread holds while reducing a chunk (`ITEMS` in the shader).
const ITEMS: u32 = 16;

/// The norm kernels' workgroup size on `ctx`.
fn workgroup(ctx: &GpuContext) -> u32 {
    match ctx.tuning {
        Tuning::Hardware => HARDWARE_WORKGROUP,
        Tuning::Software => SOFTWARE_WORKGROUP,
    }
}

/// `kernel` built for `ctx`'s workgroup size.
fn sized(kernel: Kernel, ctx: &GpuContext) -> Kernel {
    kernel.with_constant("WG", workgroup(ctx))
}

/// Values one workgroup reduces at once on `ctx` (a chunk: `WG * ITEMS` in the shader).
fn chunk(ctx: &GpuContext) -> usize {
    (workgroup(ctx) * ITEMS) as usize
}

/// Most bytes one dispatch binds of the input or output, whatever the adapter allows: keeps
/// every index (and the overshoot of a 2-D grid) well inside u32.
const MAX_WINDOW_BYTES: u64 = 1 << 31;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    slabs: u32,
    len: u32,
    spatial: u32,
    per_group: u32,
    groups: u32,
    chunks: u32,
    slab0: u32,
    silu: u32,
    eps: f32,
    total: u32,
    _pad0: u32,
    _pad1: u32,
}

/// What is normalised: `slabs` runs of `per_group * spatial` values; the slab `s` holds
/// channels `(s % groups) * per_group ..` of gamma and beta.
struct Layout {
    slabs: usize,
    per_group: usize,
    spatial: usize,
    groups: usize,
}

#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &GpuStorage,
    gamma: &GpuStorage,
    beta: &GpuStorage,
    n: usize,
    c: usize,
    spatial: usize,
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<GpuStorage> {
    let layout = group_layout("group_norm", x, n, c, spatial, groups)?;
    check_lengths("group_norm", x, gamma, beta, n * c * spatial, c)?;
    let limit = norm_limit(&x.ctx);
    normalise("group_norm", x, gamma, beta, &layout, eps, silu, &limit)
}

/// Mean and biased variance of each (sample, group) of `[n, c, spatial]`: `[n, groups, 2]`.
pub fn group_moments(
    x: &GpuStorage,
    n: usize,
    c: usize,
    spatial: usize,
    groups: usize,
) -> Result<GpuStorage> {
    let layout = group_layout("group_moments", x, n, c, spatial, groups)?;
    moments("group_moments", x, &layout, &norm_limit(&x.ctx))
}

/// [`group_norm`] with given `[n, groups, 2]` means and variances (see [`group_moments`]).
#[allow(clippy::too_many_arguments)]
pub fn group_norm_with_moments(
    x: &GpuStorage,
    moments: &GpuStorage,
    gamma: &GpuStorage,
    beta: &GpuStorage,
    n: usize,
    c: usize,
    spatial: usize,
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<GpuStorage> {
    let op = "group_norm_with_moments";
    let layout = group_layout(op, x, n, c, spatial, groups)?;
    check_lengths(op, x, gamma, beta, n * c * spatial, c)?;
    if moments.len() != n * groups * 2 {
        return Err(Error::Gpu(format!(
            "{op}: expected {} moments, got {}",
            n * groups * 2,
            moments.len()
        )));
    }
    apply(
        op,
        x,
        moments,
        gamma,
        beta,
        &layout,
        eps,
        silu,
        &norm_limit(&x.ctx),
    )
}

fn group_layout(
    op: &str,
    x: &GpuStorage,
    n: usize,
    c: usize,
    spatial: usize,
    groups: usize,
) -> Result<Layout> {
    if groups == 0 || !c.is_multiple_of(groups) || x.len() != n * c * spatial {
        return Err(Error::Gpu(format!(
            "{op}: {} values are not [{n}, {c}, {spatial}] in {groups} groups",
            x.len()
        )));
    }
    Ok(Layout {
        slabs: n * groups,
        per_group: c / groups,
        spatial,
        groups,
    })
}

pub fn layer_norm(
    x: &GpuStorage,
    gamma: &GpuStorage,
    beta: &GpuStorage,
    d: usize,
    eps: f32,
) -> Result<GpuStorage> {
    if d == 0 {
        return check_lengths("layer_norm", x, gamma, beta, 0, 0)
            .map(|()| GpuStorage::output(&x.ctx, 0));
    }
    if !x.len().is_multiple_of(d) {
        return Err(Error::Gpu(format!(
            "layer_norm: {} values are not rows of {d}",
            x.len()
        )));
    }
    check_lengths("layer_norm", x, gamma, beta, x.len(), d)?;
    let layout = Layout {
        slabs: x.len() / d,
        per_group: d,
        spatial: 1,
        groups: 1,
    };
    let limit = norm_limit(&x.ctx);
    normalise("layer_norm", x, gamma, beta, &layout, eps, false, &limit)
}

fn check_lengths(
    op: &str,
    x: &GpuStorage,
    gamma: &GpuStorage,
    beta: &GpuStorage,
    len: usize,
    c: usize,
) -> Result<()> {
    if x.len() != len || gamma.len() < c || beta.len() < c {
        return Err(Error::Gpu(format!(
            "{op}: expected {len} values and {c} weights and biases, got {}, {} and {}",
            x.len(),
            gamma.len(),
            beta.len()
        )));
    }
    Ok(())
}

/// The adapter's binding limit, capped at [`MAX_WINDOW_BYTES`].
fn norm_limit(ctx: &GpuContext) -> BindLimit {
    let max = ctx.limits.max_storage_buffer_binding_size;
    BindLimit::new(ctx, max.min(MAX_WINDOW_BYTES))
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Consecutive batches of whole slabs, `(first slab, slabs)`, each binding at most
/// `limit.max_elems` values of a tensor of `layout`'s `slabs * len` values.
fn slab_batches(op: &str, layout: &Layout, limit: &BindLimit) -> Result<Vec<(usize, usize)>> {
    let len = layout.per_group * layout.spatial;
    if layout.slabs == 0 || len == 0 {
        return Ok(Vec::new());
    }
    u32_of("elements", layout.slabs * len)?;
    // Windows start on whole slabs at offsets the adapter accepts.
    let step = limit.align_elems / gcd(len, limit.align_elems);
    let per_batch = if layout.slabs * len <= limit.max_elems {
        layout.slabs
    } else {
        limit.max_elems / len / step * step
    };
    if per_batch == 0 {
        return Err(Error::Gpu(format!(
            "{op}: {step} group(s) of {len} values ({} bytes, the least one aligned window holds) exceed the \
             adapter's storage binding limit of {} bytes",
            step * len * 4,
            limit.max_bytes()
        )));
    }
    Ok((0..layout.slabs)
        .step_by(per_batch)
        .map(|slab0| (slab0, per_batch.min(layout.slabs - slab0)))
        .collect())
}

/// One batch of slabs: its params and how to bind `x` or the output (whole, or a window).
struct Batch {
    params: Params,
    start: usize,
    size: usize,
    whole: bool,
}

impl Batch {
    fn new(
        ctx: &GpuContext,
        layout: &Layout,
        (slab0, slabs): (usize, usize),
        eps: f32,
        silu: bool,
    ) -> Result<Self> {
        let len = layout.per_group * layout.spatial;
        let chunks = len.div_ceil(chunk(ctx));
        Ok(Batch {
            params: Params {
                slabs: u32_of("groups", slabs)?,
                len: u32_of("group size", len)?,
                spatial: u32_of("spatial size", layout.spatial)?,
                per_group: u32_of("channels per group", layout.per_group)?,
                groups: u32_of("groups", layout.groups)?,
                chunks: u32_of("chunks", chunks)?,
                slab0: u32_of("group index", slab0)?,
                silu: silu as u32,
                eps,
                total: u32_of("elements", slabs * len)?,
                _pad0: 0,
                _pad1: 0,
            },
            start: slab0 * len,
            size: slabs * len,
            whole: slab0 == 0 && slabs == layout.slabs,
        })
    }

    fn bind<'a>(&self, s: &'a GpuStorage) -> wgpu::BindingResource<'a> {
        if self.whole {
            s.binding()
        } else {
            s.window(self.start, self.size)
        }
    }
}

/// Normalises every slab, binding at most `limit.max_elems` values of `x` and of the output
/// at once.
#[allow(clippy::too_many_arguments)]
fn normalise(
    op: &str,
    x: &GpuStorage,
    gamma: &GpuStorage,
    beta: &GpuStorage,
    layout: &Layout,
    eps: f32,
    silu: bool,
    limit: &BindLimit,
) -> Result<GpuStorage> {
    let x = &*x.as_f32()?;
    if layout.per_group * layout.spatial > chunk(&x.ctx) {
        let stats = moments(op, x, layout, limit)?;
        return apply(op, x, &stats, gamma, beta, layout, eps, silu, limit);
    }
    let (gamma, beta) = (&*gamma.as_f32()?, &*beta.as_f32()?);
    let ctx = &x.ctx;
    let out = GpuStorage::output(ctx, x.len());
    for batch in slab_batches(op, layout, limit)? {
        let b = Batch::new(ctx, layout, batch, eps, silu)?;
        ctx.dispatch(
            sized(FUSED, ctx),
            bytemuck::bytes_of(&b.params),
            &[b.bind(x), gamma.binding(), beta.binding(), b.bind(&out)],
            ctx.groups_1d(batch.1, 1),
        );
    }
    Ok(out)
}

/// Mean and (biased) variance of every slab, `[slabs, 2]`.
fn moments(op: &str, x: &GpuStorage, layout: &Layout, limit: &BindLimit) -> Result<GpuStorage> {
    let x = &*x.as_f32()?;
    let ctx = &x.ctx;
    let stats = GpuStorage::output(ctx, layout.slabs * 2);
    for batch in slab_batches(op, layout, limit)? {
        let b = Batch::new(ctx, layout, batch, 0.0, false)?;
        let params = bytemuck::bytes_of(&b.params);
        let chunks = b.params.chunks as usize;
        let partials = GpuStorage::output(ctx, batch.1 * chunks * 2);
        ctx.dispatch(
            sized(PARTIALS, ctx),
            params,
            &[b.bind(x), partials.binding()],
            ctx.groups_1d(batch.1 * chunks, 1),
        );
        ctx.dispatch(
            sized(FINALIZE, ctx),
            params,
            &[partials.binding(), stats.binding()],
            ctx.groups_1d(batch.1, 1),
        );
    }
    Ok(stats)
}

/// Normalises every slab with the given `[slabs, 2]` means and variances.
#[allow(clippy::too_many_arguments)]
fn apply(
    op: &str,
    x: &GpuStorage,
    stats: &GpuStorage,
    gamma: &GpuStorage,
    beta: &GpuStorage,
    layout: &Layout,
    eps: f32,
    silu: bool,
    limit: &BindLimit,
) -> Result<GpuStorage> {
    let (x, stats) = (&*x.as_f32()?, &*stats.as_f32()?);
    let (gamma, beta) = (&*gamma.as_f32()?, &*beta.as_f32()?);
    let ctx = &x.ctx;
    let out = GpuStorage::output(ctx, x.len());
    for batch in slab_batches(op, layout, limit)? {
        let b = Batch::new(ctx, layout, batch, eps, silu)?;
        ctx.dispatch(
            sized(APPLY, ctx),
            bytemuck::bytes_of(&b.params),
            &[
                b.bind(x),
                gamma.binding(),
                beta.binding(),
                stats.binding(),
                b.bind(&out),
            ],
            ctx.groups_1d(b.size, workgroup(ctx)),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu;
    use crate::backend::gpu::{test_device, GpuDevice};
    use crate::tensor::testing::{assert_close, assert_ops_agree, f16_values, random, random_f16};
    use crate::tensor::Tensor;

    #[test]
    fn f16_inputs_and_weights_are_widened() {
        // An f16 activation through the Tensor API, and f16 gamma and beta (vectors, which
        // `Tensor::from_f16` widens at upload) straight into the kernels.
        let [g, b] = affine(8, 30);
        let x = random_f16(&[2, 8, 3, 5], 32);
        assert_ops_agree("group_norm f16", &[x, g, b], |t| {
            t[0].clone().group_norm(4, &t[1], &t[2], 1e-5, true)
        });
        let Some(gpu) = test_device() else { return };
        let (x, gamma, beta) = (
            random_f16(&[6, 40], 33),
            random_f16(&[40], 34),
            random_f16(&[40], 35),
        );
        let up = |t: &Tensor| GpuStorage::from_f16(&gpu, &f16_values(t));
        let cpu_of = |t: &Tensor| crate::backend::cpu::CpuStorage::F16(f16_values(t));
        let got = layer_norm(&up(&x), &up(&gamma), &up(&beta), 40, 1e-5).unwrap();
        let want = cpu::norm::layer_norm(&cpu_of(&x), &cpu_of(&gamma), &cpu_of(&beta), 40, 1e-5);
        assert_close("layer_norm f16", &got.to_f32().unwrap(), &want.as_f32());
        let got = group_norm(&up(&x), &up(&gamma), &up(&beta), 2, 40, 3, 5, 1e-5, false).unwrap();
        let want = cpu::norm::group_norm(
            &cpu_of(&x),
            &cpu_of(&gamma),
            &cpu_of(&beta),
            2,
            40,
            3,
            5,
            1e-5,
            false,
        );
        assert_close("group_norm f16", &got.to_f32().unwrap(), &want.as_f32());
    }

    fn affine(c: usize, seed: u64) -> [Tensor; 2] {
        [
            random(&[c], seed).affine(0.5, 1.0).unwrap(),
            random(&[c], seed + 1).affine(0.3, 0.0).unwrap(),
        ]
    }

    fn check_group_norm(what: &str, x: Tensor, groups: usize, silu: bool) {
        let c = x.shape()[1];
        let [g, b] = affine(c, 100 + c as u64);
        assert_ops_agree(&format!("{what} silu={silu}"), &[x, g, b], |t| {
            t[0].clone().group_norm(groups, &t[1], &t[2], 1e-5, silu)
        });
    }

    #[test]
    fn group_norm_matches_the_cpu_on_odd_sizes() {
        for silu in [false, true] {
            check_group_norm("c6 g3 7x5", random(&[1, 6, 7, 5], 1), 3, silu);
            check_group_norm("n2 c32 g16 9x11", random(&[2, 32, 9, 11], 2), 16, silu);
            check_group_norm("n2 c6 g2 1-d", random(&[2, 6, 13], 3), 2, silu);
            check_group_norm("c4 g4 no spatial", random(&[3, 4], 4), 4, silu);
        }
    }

    #[test]
    fn group_norm_matches_the_cpu_on_groups_of_many_chunks() {
        for silu in [false, true] {
            // 65536 values per group (16 chunks); 40 * 33 * 31 = 40920 (not a whole chunk).
            check_group_norm("c64 g4 64x64", random(&[1, 64, 64, 64], 5), 4, silu);
            check_group_norm("n2 c40 g2 33x31", random(&[2, 40, 33, 31], 6), 2, silu);
        }
        // One group of over a million values: 256+ chunks merged by the finalize tree.
        check_group_norm("c8 g1 383x383", random(&[1, 8, 383, 383], 7), 1, false);
    }

    #[test]
    fn moments_and_a_norm_with_given_moments_match_the_cpu() {
        for (shape, groups) in [
            ([2, 6, 7, 5], 3),
            ([1, 64, 64, 64], 4),
            ([2, 40, 33, 31], 2),
        ] {
            let x = random(&shape, 20).affine(0.5, 3.0).unwrap();
            assert_ops_agree(
                &format!("group_moments {shape:?}"),
                std::slice::from_ref(&x),
                |t| t[0].group_moments(groups),
            );
            // Moments of another tensor, so the kernel cannot be recomputing its own.
            let other = random(&shape, 21).group_moments(groups).unwrap();
            let [g, b] = affine(shape[1], 22);
            for silu in [false, true] {
                assert_ops_agree(
                    &format!("group_norm_with_moments {shape:?} silu={silu}"),
                    &[x.clone(), other.clone(), g.clone(), b.clone()],
                    |t| t[0].group_norm_with_moments(groups, &t[1], &t[2], &t[3], 1e-5, silu),
                );
            }
        }
    }

    #[test]
    fn group_norm_keeps_precision_under_a_large_mean() {
        for shape in [[1, 6, 7, 5], [2, 32, 64, 64]] {
            let x = random(&shape, 8).affine(0.1, 50.0).unwrap();
            check_group_norm("offset 50", x, shape[1] / 2, true);
        }
        let x = random(&[1, 4, 256, 256], 9).affine(0.1, 1000.0).unwrap();
        check_group_norm("offset 1000", x, 2, false);
    }

    #[test]
    fn layer_norm_matches_the_cpu() {
        for (rows, d) in [
            (2 * 77, 32),
            (2 * 77, 768),
            (2 * 77, 37),
            (4096, 32),
            (4096, 37),
            (7, 768),
            (3, 4097),
        ] {
            let [g, b] = affine(d, 200 + d as u64);
            let x = random(&[rows, d], d as u64);
            assert_ops_agree(
                &format!("layer_norm {rows}x{d}"),
                &[x, g.clone(), b.clone()],
                |t| t[0].layer_norm(&t[1], &t[2], 1e-5),
            );
            let shifted = random(&[rows, d], 1 + d as u64).affine(0.1, 50.0).unwrap();
            assert_ops_agree(
                &format!("layer_norm {rows}x{d} offset 50"),
                &[shifted, g, b],
                |t| t[0].layer_norm(&t[1], &t[2], 1e-5),
            );
        }
        let [g, b] = affine(320, 300);
        assert_ops_agree(
            "layer_norm 2x4096x320",
            &[random(&[2, 4096, 320], 10), g, b],
            |t| t[0].layer_norm(&t[1], &t[2], 1e-5),
        );
    }

    /// Runs `normalise` with a tiny binding limit, so it goes window by window, and
    /// compares with the CPU group norm.
    fn windowed(shape: [usize; 3], groups: usize, max_binding: u64) {
        for dev in crate::backend::gpu::test_devices() {
            windowed_on(&dev, shape, groups, max_binding);
        }
    }

    fn windowed_on(dev: &GpuDevice, shape: [usize; 3], groups: usize, max_binding: u64) {
        let [n, c, spatial] = shape;
        let x = random(&[n * c * spatial], 11).to_vec().unwrap();
        let g = random(&[c], 12).to_vec().unwrap();
        let b = random(&[c], 13).to_vec().unwrap();
        let cpu = |v: &[f32]| cpu::CpuStorage::F32(v.to_vec());
        let expected = cpu::norm::group_norm(
            &cpu(&x),
            &cpu(&g),
            &cpu(&b),
            n,
            c,
            spatial,
            groups,
            1e-5,
            true,
        );
        let expected = expected.as_f32();
        let (gx, gg, gb) = (
            GpuStorage::from_f32(dev, &x),
            GpuStorage::from_f32(dev, &g),
            GpuStorage::from_f32(dev, &b),
        );
        let layout = Layout {
            slabs: n * groups,
            per_group: c / groups,
            spatial,
            groups,
        };
        let limit = BindLimit::new(&dev.0, max_binding);
        let got = normalise("test", &gx, &gg, &gb, &layout, 1e-5, true, &limit)
            .unwrap()
            .to_f32()
            .unwrap();
        let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = got
            .iter()
            .zip(expected.iter())
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= 1e-4 * scale,
            "{shape:?} / {groups} in windows of {max_binding} bytes ({:?}): off by {worst:e}",
            dev.0.tuning
        );
    }

    #[test]
    fn tensors_over_the_binding_limit_go_in_windows() {
        // Slabs of 3 * 16 * 4 = 192 bytes: windows of whole alignment steps (4 slabs at 256).
        windowed([64, 6, 16], 2, 1024);
        // Many-chunk slabs (2 * 4160 values), two per window.
        windowed([3, 8, 4160], 4, 2 * 8320 * 4);
        let Some(dev) = crate::backend::gpu::test_device() else {
            return;
        };
        let x = GpuStorage::from_f32(&dev, &[0.0; 4096]);
        let w = GpuStorage::from_f32(&dev, &[1.0; 4]);
        let layout = Layout {
            slabs: 1,
            per_group: 4,
            spatial: 1024,
            groups: 1,
        };
        let limit = BindLimit::new(&dev.0, 1024);
        let err = normalise("group_norm", &x, &w, &w, &layout, 1e-5, false, &limit).err();
        assert!(err.is_some_and(|e| e.to_string().contains("group_norm")));
    }
}
