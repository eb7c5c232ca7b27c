//! 2-D convolution (`shaders/conv.wgsl`). Mirrors `backend::cpu::conv`.
//!
//! One kernel, an implicit GEMM: the output `[oc, n * oh * ow]` is the weight `[oc, c * kh *
//! kw]` times the im2col columns, which workgroups gather from the input tile by tile while
//! filling workgroup memory (no column buffer). Each workgroup computes one output tile in
//! K-slices of 16, each thread a block of it in registers; the tile's shape ([`TileShape`],
//! the shader's override constants) follows the layer and the device's tuning
//! ([`TileShape::of`]), and [`NARROW`] for passes of at most 16 output channels.
//!
//! On devices with cooperative matrices a convolution that fits one pass is instead an
//! explicit product: the im2col rows of a range of output pixels are written to a buffer
//! and multiplied by the weight with the matrix-product kernel (gemm_coop.wgsl's
//! `matmul_nt_coop`), and the result moved into the NCHW output. On the H200 a gather
//! inside a cooperative-matrix kernel cost more integer work than its tensor-core products
//! (16 TFLOP/s at [2,320,64,64], against 43-95 TFLOP/s for products of similar size), while
//! the im2col buffer's write and read cost little next to the product: 25.7 TFLOP/s there.
//! Windowed passes (tensors beyond one binding) keep the SIMT kernel.
//!
//! The weight may be f16: the kernel's f16 variant reads it directly, accumulating in f32.
//! The input and the bias are widened to f32 when they are f16.

use bytemuck::{Pod, Zeroable};

use super::context::{GpuContext, Kernel, TileShape, WORKGROUP_1D};
use super::elementwise::u32_of;
use super::storage::BindLimit;
use super::GpuStorage;
use crate::error::{Error, Result};
use crate::shader;
use crate::tensor::params::Conv2dParams;
use crate::tensor::params::MatmulDims;

/// The im2col rows of a range of output pixels (see the module documentation).
const IM2COL: Kernel = Kernel::new(shader!("conv"), "im2col");
/// A `[pixel][oc]` product's rows into the NCHW output.
const ROWS_TO_NCHW: Kernel = Kernel::new(shader!("conv"), "rows_to_nchw");

/// Every kernel of this family, for the translation test (see `super::kernels`).
pub(super) const KERNELS: &[Kernel] = &[
    conv_kernel(TileShape::WIDE),
    conv_kernel(NARROW),
    conv_kernel(TileShape::FEW_THREADS),
    IM2COL,
    ROWS_TO_NCHW,
];

/// The most elements of one im2col buffer (256 MiB of f32): the product's rows are taken in
/// ranges that stay under it (and under the binding limit).
const COLUMN_BUDGET: usize = 64 << 20;
/// Rows per `matmul_nt_coop` tile: ranges of output pixels are whole tiles where they can be.
const PRODUCT_ROWS: usize = 128;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Im2colParams {
    h: u32,
    w: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad_top: u32,
    pad_left: u32,
    oh: u32,
    ow: u32,
    k: u32,
    row0: u32,
    rows: u32,
    x_img: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ToNchwParams {
    oc: u32,
    pixels: u32,
    row0: u32,
    rows: u32,
}

/// `conv2d` with a tile shape (rows: output channels; columns: output pixels over the
/// batch).
const fn conv_kernel(shape: TileShape) -> Kernel {
    shape.apply(Kernel::new(shader!("conv"), "conv2d").reading_weights())
}

/// 16 x 128 tiles (32 x 4 threads of 4 x 4 values), for passes of at most 16 output
/// channels: there the 64 x 64 tile computed 4 to 64 times the useful work. On llvmpipe (2
/// EPYC cores) a 3x3 layer of 8 channels at 256x256 took as long as one of 64 channels
/// (0.83 s against 0.88 s), and a VAE's last layer (64 -> 3 channels at 512x512) 21 s.
const NARROW: TileShape = TileShape {
    tx: 32,
    ty: 4,
    rm: 4,
    cn: 1,
};
// TileShape::FEW_THREADS on software adapters: measured on llvmpipe (2 EPYC cores) with 3x3
// convolutions of the tests' tiny models, [2, 64, 4, 4] / [2, 32, 8, 8] / [1, 64, 32, 32] /
// [1, 32, 32, 32]: WIDE 11.3 / 7.9 / 89 / 45 ms; FEW_THREADS 3.5-3.7 / 2.0-3.1 / 53-57 /
// 14-15 ms; 64 x 64 tiles of 64 threads of 8 x 8 6.5-7.0 / 4.6-4.9 / 49-50 / 25-26 ms;
// 32 x 32 tiles of 16 threads 2.0-4.0 / 1.9-2.1 / 60-61 / 16.4 ms; 4-value blocks slower.

/// The shader's private arrays' sizes (`MAX_LOADS`, `MAX_BLOCK`): a thread's weight and
/// column loads per slice, and its accumulators (vec4s).
const MAX_LOADS: u32 = 8;
const MAX_BLOCK: u32 = 16;

// Every shape fits the shader: whole channel quads per thread, whole passes of the threads
// over a slice's column-quad rows, and loads and accumulators within the private arrays.
const _: () = {
    let shapes = [TileShape::WIDE, NARROW, TileShape::FEW_THREADS];
    let mut i = 0;
    while i < shapes.len() {
        let s = shapes[i];
        let threads = s.tx * s.ty;
        assert!(
            s.rm.is_multiple_of(4) && s.ty.is_multiple_of(s.cn) && (16 * s.cn).is_multiple_of(s.ty)
        );
        assert!((4 * s.ty * s.rm).div_ceil(threads) <= MAX_LOADS && 16 * s.cn / s.ty <= MAX_LOADS);
        assert!(s.rm * s.cn <= MAX_BLOCK);
        i += 1;
    }
};

/// The tile shape for a pass of `oc` output channels on `ctx`.
fn tile_shape(ctx: &GpuContext, oc: usize) -> TileShape {
    if oc <= NARROW.rows() {
        NARROW
    } else {
        TileShape::of(ctx.tuning)
    }
}

/// The shader's `Params`: one pass over `n` images, or over one image's slice of input and
/// output channels (see [`conv2d`]).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ConvParams {
    n: u32,
    h: u32,
    w: u32,
    oc: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad_top: u32,
    pad_left: u32,
    oh: u32,
    ow: u32,
    k: u32,
    cols: u32,
    tiles_n: u32,
    x_off: u32,
    x_img: u32,
    w_off: u32,
    w_row: u32,
    out_off: u32,
    out_img: u32,
    bias_off: u32,
    has_bias: u32,
    accumulate: u32,
    _pad0: u32,
}

/// Convolution of `x` (`[n, c, h, w]`) with `weight` (`[oc, c, kh, kw]`) plus an optional
/// bias (`[oc]`), as `backend::cpu::conv::conv2d`.
///
/// Tensors within the adapter's storage-binding limit are bound whole and take one pass.
/// Larger ones (a VAE decoder's 256 MiB activations at 512x512) are bound in windows: one
/// image at a time, output channels in slices whose output and weight rows fit a window,
/// input channels in slices whose planes fit one, the passes after an output slice's first
/// adding their partial sums onto it.
pub fn conv2d(
    x: &GpuStorage,
    weight: &GpuStorage,
    bias: Option<&GpuStorage>,
    p: &Conv2dParams,
) -> Result<GpuStorage> {
    conv2d_limited(x, weight, bias, p, &BindLimit::of(&x.ctx), None)
}

/// [`conv2d`] binding at most `limit` of each buffer at once (tests use small limits).
/// `product`: `Some(budget)` runs a convolution that fits one pass as im2col + product with
/// im2col buffers of at most `budget` elements, as devices with cooperative matrices do
/// (tests reach it on any device); `None` chooses by the device.
fn conv2d_limited(
    x: &GpuStorage,
    weight: &GpuStorage,
    bias: Option<&GpuStorage>,
    p: &Conv2dParams,
    limit: &BindLimit,
    product: Option<usize>,
) -> Result<GpuStorage> {
    // The weight is read natively in either element type; the others as f32.
    let x = &*x.as_f32()?;
    let bias = bias.map(GpuStorage::as_f32).transpose()?;
    let bias = bias.as_deref();
    // The weight's windows are counted in its own elements.
    let w_limit = limit.for_elem(weight.elem_bytes());
    let ctx = &x.ctx;
    let khw = p.kh * p.kw;
    let patch = p.c * khw;
    let plane = p.h * p.w;
    let pixels = p.oh * p.ow;
    let out_len = p.n * p.oc * pixels;
    let sizes = || {
        format!(
            "input [{}, {}, {}, {}], weight [{}, {}, {}, {}], stride {}, padding {} above and {} left, output {}x{}",
            p.n, p.c, p.h, p.w, p.oc, p.c, p.kh, p.kw, p.stride, p.pad_top, p.pad_left, p.oh, p.ow
        )
    };
    if x.len() != p.n * p.c * plane
        || weight.len() != p.oc * patch
        || bias.is_some_and(|b| b.len() != p.oc)
    {
        return Err(Error::Gpu(format!(
            "conv2d: buffer lengths do not match {}",
            sizes()
        )));
    }
    for (what, n) in [
        ("input", x.len()),
        ("weight", weight.len()),
        ("output", out_len),
    ] {
        u32_of(&format!("conv2d {what} elements"), n)?;
    }
    let out = GpuStorage::output(ctx, out_len);
    if out_len == 0 {
        return Ok(out);
    }
    let max_elems = limit.max_elems;
    if x.len() <= max_elems && weight.len() <= w_limit.max_elems && out_len <= max_elems {
        let product = product.or(ctx.coop.then_some(COLUMN_BUDGET));
        if let Some(budget) = product {
            conv2d_as_product(ctx, p, x, weight, bias, &out, budget.min(max_elems))?;
            return Ok(out);
        }
        let pass = Pass {
            images: p.n,
            oc: p.oc,
            channels: p.c,
            x: Window::whole(x),
            weight: Window::whole(weight),
            out: Window::whole(&out),
            bias_off: 0,
            has_bias: bias.is_some(),
            accumulate: false,
        };
        return run(ctx, p, &pass, x, weight, bias, &out).map(|()| out);
    }

    // Windowed: a window starts at an aligned offset, so it may hold elements before the
    // slice it is for; `span` elements fit wherever the slice starts.
    let span = limit.span();
    let c_step = span / plane.max(1);
    let oc_step = (span / pixels).min(w_limit.span() / patch.max(1));
    if c_step == 0 || oc_step == 0 || p.c == 0 {
        return Err(Error::Gpu(format!(
            "conv2d: {} needs bindings larger than this adapter's limit ({} bytes) \
             even one channel at a time",
            sizes(),
            limit.max_bytes()
        )));
    }
    let window_in = |limit: &BindLimit, first: usize, len: usize| {
        let (start, len) = limit.window(first, first + len);
        Window {
            start,
            len,
            off: first - start,
        }
    };
    let window = |first: usize, len: usize| window_in(limit, first, len);
    for b in 0..p.n {
        for oc0 in (0..p.oc).step_by(oc_step) {
            let ol = oc_step.min(p.oc - oc0);
            let out_w = window((b * p.oc + oc0) * pixels, ol * pixels);
            let w_rows = window_in(&w_limit, oc0 * patch, ol * patch);
            for c0 in (0..p.c).step_by(c_step) {
                let cl = c_step.min(p.c - c0);
                let pass = Pass {
                    images: 1,
                    oc: ol,
                    channels: cl,
                    x: window((b * p.c + c0) * plane, cl * plane),
                    weight: Window {
                        off: w_rows.off + c0 * khw,
                        ..w_rows
                    },
                    out: out_w,
                    bias_off: oc0,
                    has_bias: bias.is_some() && c0 == 0,
                    accumulate: c0 > 0,
                };
                run(ctx, p, &pass, x, weight, bias, &out)?;
            }
        }
    }
    Ok(out)
}

/// The convolution as im2col + product (see the module documentation): output pixels in
/// ranges whose im2col rows and product rows take at most `budget` elements. Every buffer
/// is bound whole (the caller checked `x`, `weight` and `out` fit one binding).
fn conv2d_as_product(
    ctx: &std::sync::Arc<GpuContext>,
    p: &Conv2dParams,
    x: &GpuStorage,
    weight: &GpuStorage,
    bias: Option<&GpuStorage>,
    out: &GpuStorage,
    budget: usize,
) -> Result<()> {
    let k = p.c * p.kh * p.kw;
    let pixels = p.oh * p.ow;
    let total = p.n * pixels;
    let mut range = (budget / k.max(p.oc).max(1)).max(1);
    if range >= PRODUCT_ROWS {
        range -= range % PRODUCT_ROWS;
    }
    // Every value below is at most an element count already checked to fit 32 bits.
    let u = |v: usize| v as u32;
    for row0 in (0..total).step_by(range) {
        let rows = range.min(total - row0);
        let cols = GpuStorage::output(ctx, rows * k);
        if rows * k > 0 {
            let params = Im2colParams {
                h: u(p.h),
                w: u(p.w),
                kh: u(p.kh),
                kw: u(p.kw),
                stride: u32_of("conv2d stride", p.stride)?,
                pad_top: u32_of("conv2d padding", p.pad_top)?,
                pad_left: u32_of("conv2d padding", p.pad_left)?,
                oh: u(p.oh),
                ow: u(p.ow),
                k: u(k),
                row0: u(row0),
                rows: u(rows),
                x_img: u(p.c * p.h * p.w),
            };
            ctx.dispatch(
                IM2COL,
                bytemuck::bytes_of(&params),
                &[x.binding(), cols.binding()],
                ctx.groups_1d(rows * k, WORKGROUP_1D),
            );
        }
        let dims = MatmulDims {
            batch: 1,
            m: rows,
            n: p.oc,
            k,
            rhs_batched: false,
            transpose_rhs: true,
        };
        let y = super::matmul::matmul(&cols, weight, bias, dims)?;
        drop(cols);
        let params = ToNchwParams {
            oc: u(p.oc),
            pixels: u(pixels),
            row0: u(row0),
            rows: u(rows),
        };
        ctx.dispatch(
            ROWS_TO_NCHW,
            bytemuck::bytes_of(&params),
            &[y.binding(), out.binding()],
            ctx.groups_1d(rows * p.oc, WORKGROUP_1D),
        );
    }
    Ok(())
}

/// Elements `start..start + len` of a buffer, bound; the pass's data begins `off` in.
#[derive(Clone, Copy)]
struct Window {
    start: usize,
    len: usize,
    off: usize,
}

impl Window {
    fn whole(s: &GpuStorage) -> Self {
        Window {
            start: 0,
            len: s.len(),
            off: 0,
        }
    }

    /// The window of an f32 buffer.
    fn bind<'a>(&self, s: &'a GpuStorage) -> wgpu::BindingResource<'a> {
        assert!(!s.is_f16(), "conv2d binds only its weight as f16");
        self.bind_any(s)
    }

    /// The window of a buffer of either element type (the weight).
    fn bind_any<'a>(&self, s: &'a GpuStorage) -> wgpu::BindingResource<'a> {
        if self.start == 0 && self.len == s.len() {
            // The whole buffer (also right for an empty tensor, whose buffer is 4 bytes).
            return s.binding_any();
        }
        s.window_any(self.start, self.len)
    }
}

/// One dispatch: `images` images, `oc` output channels and `channels` input channels.
struct Pass {
    images: usize,
    oc: usize,
    channels: usize,
    x: Window,
    weight: Window,
    out: Window,
    bias_off: usize,
    has_bias: bool,
    accumulate: bool,
}

fn run(
    ctx: &std::sync::Arc<GpuContext>,
    p: &Conv2dParams,
    pass: &Pass,
    x: &GpuStorage,
    weight: &GpuStorage,
    bias: Option<&GpuStorage>,
    out: &GpuStorage,
) -> Result<()> {
    let pixels = p.oh * p.ow;
    let cols = pass.images * pixels;
    let shape = tile_shape(ctx, pass.oc);
    let tiles_n = cols.div_ceil(shape.cols());
    let tiles_m = pass.oc.div_ceil(shape.rows());
    // Every value below is at most an element count already checked to fit 32 bits.
    let u = |v: usize| v as u32;
    let params = ConvParams {
        n: u(pass.images),
        h: u(p.h),
        w: u(p.w),
        oc: u(pass.oc),
        kh: u(p.kh),
        kw: u(p.kw),
        stride: u32_of("conv2d stride", p.stride)?,
        pad_top: u32_of("conv2d padding", p.pad_top)?,
        pad_left: u32_of("conv2d padding", p.pad_left)?,
        oh: u(p.oh),
        ow: u(p.ow),
        k: u(pass.channels * p.kh * p.kw),
        cols: u(cols),
        tiles_n: u(tiles_n),
        x_off: u(pass.x.off),
        x_img: u(p.c * p.h * p.w),
        w_off: u(pass.weight.off),
        w_row: u(p.c * p.kh * p.kw),
        out_off: u(pass.out.off),
        out_img: u(p.oc * pixels),
        bias_off: u(pass.bias_off),
        has_bias: pass.has_bias as u32,
        accumulate: pass.accumulate as u32,
        _pad0: 0,
    };
    // Column tiles over x and y, output-channel tiles along z.
    let [gx, gy, _] = ctx.groups_1d(tiles_n, 1);
    let gz = u(tiles_m);
    if gz > ctx.limits.max_compute_workgroups_per_dimension {
        return Err(Error::Gpu(format!(
            "conv2d: {} output channels need too many workgroups",
            p.oc
        )));
    }
    let x_bind = pass.x.bind(x);
    let w_bind = pass.weight.bind_any(weight);
    // Without a bias the shader never reads binding 3; the input window fills it.
    let b_bind = match bias {
        Some(b) => b.binding(),
        None => pass.x.bind(x),
    };
    ctx.dispatch(
        weight.weight_kernel(conv_kernel(shape)),
        bytemuck::bytes_of(&params),
        &[x_bind, w_bind, b_bind, pass.out.bind(out)],
        [gx, gy, gz],
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::conv2d_limited;
    use crate::backend::gpu::storage::BindLimit;
    use crate::backend::gpu::{test_device, test_devices, GpuDevice, GpuStorage};
    use crate::tensor::params::{Conv2dParams, Padding2d};
    use crate::tensor::testing::{assert_ops_agree, f16_values, random_f16, random_f16_exact};
    use crate::tensor::Tensor;

    /// Conv of a random `[n, c, h, w]` input with a random `[oc, c, k, k]` kernel, with and
    /// without a bias.
    fn check(input: [usize; 4], oc: usize, k: usize, stride: usize, padding: usize, seed: u64) {
        let [_, c, _, _] = input;
        let inputs = [
            random_f16_exact(&input, seed),
            random_f16_exact(&[oc, c, k, k], seed + 1),
            random_f16_exact(&[oc], seed + 2),
        ];
        let what = format!("conv2d {input:?} -> {oc}, {k}x{k} stride {stride} padding {padding}");
        assert_ops_agree(&format!("{what} with bias"), &inputs, |t| {
            t[0].conv2d(&t[1], Some(&t[2]), stride, padding)
        });
        assert_ops_agree(&what, &inputs, |t| {
            t[0].conv2d(&t[1], None, stride, padding)
        });
    }

    #[test]
    fn f16_weights_match_the_cpu() {
        for (input, oc, k, stride, padding) in [
            ([2, 5, 9, 7], 6, 3, 1, 1),
            ([1, 3, 5, 5], 1, 3, 1, 0),
            ([2, 7, 13, 11], 67, 3, 2, 1),
            ([1, 65, 3, 3], 70, 1, 1, 0),
            ([1, 64, 16, 16], 64, 3, 1, 1),
        ] {
            let inputs = [
                random_f16_exact(&input, 140),
                random_f16(&[oc, input[1], k, k], 141),
                random_f16_exact(&[oc], 142),
            ];
            let what = format!("conv2d {input:?} -> {oc}, f16 {k}x{k} stride {stride}");
            assert_ops_agree(&format!("{what} with bias"), &inputs, |t| {
                t[0].conv2d(&t[1], Some(&t[2]), stride, padding)
            });
            assert_ops_agree(&what, &inputs, |t| {
                t[0].conv2d(&t[1], None, stride, padding)
            });
        }
    }

    #[test]
    fn three_by_three_matches_the_cpu() {
        check([2, 5, 9, 7], 6, 3, 1, 1, 10);
        check([1, 3, 5, 5], 1, 3, 1, 0, 20);
        check([2, 7, 13, 11], 67, 3, 1, 1, 30);
    }

    #[test]
    fn strided_matches_the_cpu() {
        check([2, 5, 9, 7], 6, 3, 2, 1, 40);
        check([1, 4, 8, 8], 5, 3, 2, 0, 50);
        check([2, 3, 9, 9], 7, 3, 2, 0, 60);
        check([1, 6, 10, 10], 9, 3, 2, 1, 70);
    }

    #[test]
    fn one_by_one_matches_the_cpu() {
        check([2, 5, 9, 7], 6, 1, 1, 0, 80);
        check([1, 4, 8, 8], 128, 1, 1, 0, 90);
        check([1, 65, 3, 3], 70, 1, 1, 0, 100);
        check([1, 3, 8, 8], 4, 1, 2, 0, 110);
    }

    /// Padding on some sides only (row bands, diffusers' `Downsample2D(padding=0)`), on the
    /// direct kernel and on im2col + product, strided too.
    #[test]
    fn uneven_padding_matches_the_cpu() {
        for (top, bottom, left, right, stride) in [
            (0, 0, 1, 1, 1),
            (1, 0, 1, 1, 1),
            (0, 1, 1, 1, 1),
            (0, 1, 0, 1, 2),
            (2, 0, 0, 2, 1),
        ] {
            let padding = Padding2d {
                top,
                bottom,
                left,
                right,
            };
            let inputs = [
                random_f16_exact(&[2, 5, 9, 7], 150),
                random_f16_exact(&[6, 5, 3, 3], 151),
                random_f16_exact(&[6], 152),
            ];
            assert_ops_agree(
                &format!("conv2d padded {padding:?}, stride {stride}"),
                &inputs,
                |t| t[0].conv2d_padded(&t[1], Some(&t[2]), stride, padding),
            );
            for path in [Path::Product(50), Path::Windowed(150)] {
                check_path([2, 5, 9, 7], 6, 3, stride, padding, path, true, false);
            }
        }
    }

    #[test]
    fn wide_output_channels_match_the_cpu() {
        check([1, 4, 8, 8], 128, 3, 1, 1, 120);
    }

    /// Both tile shapes at their boundary (16 output channels take the narrow one, 17 the
    /// 64 x 64 one), a VAE-like last layer (3 channels out of 64), and narrow tiles over
    /// several column tiles of two images with a partial last one.
    #[test]
    fn narrow_and_wide_tiles_match_the_cpu() {
        check([2, 9, 20, 20], 16, 3, 1, 1, 160);
        check([2, 9, 20, 20], 17, 3, 1, 1, 170);
        check([1, 64, 12, 12], 3, 3, 1, 1, 180);
        check([2, 3, 13, 17], 8, 1, 1, 0, 190);
    }

    /// How [`check_path`] runs the convolution.
    #[derive(Clone, Copy, Debug)]
    enum Path {
        /// Windowed, with a binding limit that holds this many elements wherever a window
        /// starts.
        Windowed(usize),
        /// As im2col + product, with im2col buffers of at most this many elements.
        Product(usize),
    }

    /// Runs `path` against the CPU backend on each test device (both tunings).
    #[allow(clippy::too_many_arguments)]
    fn check_path(
        input: [usize; 4],
        oc: usize,
        k: usize,
        stride: usize,
        padding: Padding2d,
        path: Path,
        bias: bool,
        f16: bool,
    ) {
        let [n, c, h, w] = input;
        // With `f16`, the weight and the bias are f16 storages (the bias widened by conv2d).
        let (x, weight, b) = if f16 {
            (
                random_f16_exact(&input, 7),
                random_f16(&[oc, c, k, k], 8),
                random_f16(&[oc], 9),
            )
        } else {
            (
                random_f16_exact(&input, 7),
                random_f16_exact(&[oc, c, k, k], 8),
                random_f16_exact(&[oc], 9),
            )
        };
        let expected = x
            .conv2d_padded(&weight, bias.then_some(&b), stride, padding)
            .unwrap();
        let [oh, ow] = [expected.shape()[2], expected.shape()[3]];
        let p = Conv2dParams {
            n,
            c,
            h,
            w,
            oc,
            kh: k,
            kw: k,
            stride,
            pad_top: padding.top,
            pad_left: padding.left,
            oh,
            ow,
        };
        let expected_values = expected.to_vec().unwrap();
        for gpu in &test_devices() {
            check_path_on(
                gpu,
                &p,
                [&x, &weight, &b],
                &expected_values,
                path,
                bias,
                f16,
            );
        }
    }

    /// [`check_path`] on one device: `inputs` are the input, the weight and the bias.
    fn check_path_on(
        gpu: &GpuDevice,
        p: &Conv2dParams,
        [x, weight, b]: [&Tensor; 3],
        expected: &[f32],
        path: Path,
        bias: bool,
        f16: bool,
    ) {
        let up = |t: &Tensor| {
            if f16 {
                GpuStorage::from_f16(gpu, &f16_values(t))
            } else {
                GpuStorage::from_f32(gpu, &t.to_vec().unwrap())
            }
        };
        let (xg, wg, bg) = (
            GpuStorage::from_f32(gpu, &x.to_vec().unwrap()),
            up(weight),
            up(b),
        );
        assert_eq!(wg.is_f16(), f16 && gpu.keeps_f16());
        let (limit, product) = match path {
            Path::Windowed(span) => {
                let align = (gpu.0.limits.min_storage_buffer_offset_alignment.max(4) / 4) as usize;
                let max_bytes = ((span + align - 1) * 4) as u64;
                assert!(
                    max_bytes < (x.numel().max(weight.numel()).max(expected.len()) * 4) as u64,
                    "not windowed"
                );
                let limit = BindLimit::new(&gpu.0, max_bytes);
                assert_eq!(limit.span(), span);
                (limit, None)
            }
            Path::Product(budget) => (BindLimit::of(&gpu.0), Some(budget)),
        };
        let got = conv2d_limited(&xg, &wg, bias.then_some(&bg), p, &limit, product)
            .unwrap()
            .to_f32()
            .unwrap();
        let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (g, e)) in got.iter().zip(expected).enumerate() {
            assert!(
                (g - e).abs() <= 1e-4 * scale,
                "{:?} -> {} {path:?} (f16 {f16}, {:?}): {g} vs {e} at {i}",
                x.shape(),
                p.oc,
                gpu.0.tuning
            );
        }
    }

    /// A layer as [`check_path`] takes it: input `[n, c, h, w]`, output channels, kernel
    /// side, stride, uniform padding.
    type Layer = ([usize; 4], usize, usize, usize, usize);

    /// [`check_path`] on each `(layer, path, bias)`, with f32 and with f16 weights.
    fn check_paths(cases: &[(Layer, Path, bool)]) {
        for f16 in [false, true] {
            for &((input, oc, k, stride, pad), path, bias) in cases {
                let padding = Padding2d::uniform(pad);
                check_path(input, oc, k, stride, padding, path, bias, f16);
            }
        }
    }

    #[test]
    fn tensors_beyond_the_binding_limit_are_windowed() {
        // Two input channels and two output channels per pass.
        let w = Path::Windowed;
        check_paths(&[
            (([2, 5, 9, 7], 6, 3, 1, 1), w(150), true),
            (([2, 5, 9, 7], 6, 3, 1, 1), w(150), false),
            (([1, 6, 10, 10], 9, 3, 2, 1), w(250), true),
            (([2, 7, 5, 5], 70, 1, 1, 0), w(60), true),
            // The upsampler's shape at a smaller size: [1, 256, 512, 512] is 256 MiB.
            (([1, 16, 16, 16], 16, 3, 1, 1), w(16 * 16 * 16 / 3), true),
        ]);
    }

    #[test]
    fn im2col_and_a_product_match_the_cpu() {
        // What devices with cooperative matrices run for a convolution that fits one pass:
        // one range of pixels, ranges of whole 128-row tiles and a ragged last one, ranges
        // of a row or two, across images; strided, 1x1, no bias, f16 weights.
        let pr = Path::Product;
        check_paths(&[
            (([2, 5, 9, 7], 6, 3, 1, 1), pr(1 << 20), true),
            (([2, 4, 16, 20], 8, 3, 1, 1), pr(128 * 36), true),
            (([2, 5, 9, 7], 6, 3, 1, 1), pr(50), false),
            (([1, 6, 10, 10], 9, 3, 2, 1), pr(54 * 7), true),
            (([2, 7, 5, 5], 70, 1, 1, 0), pr(1 << 20), true),
            (([1, 3, 8, 8], 4, 1, 2, 0), pr(10), true),
        ]);
    }

    #[test]
    fn a_plane_beyond_the_binding_limit_is_refused() {
        let Some(gpu) = test_device() else {
            return;
        };
        let p = Conv2dParams {
            n: 1,
            c: 2,
            h: 64,
            w: 64,
            oc: 2,
            kh: 3,
            kw: 3,
            stride: 1,
            pad_top: 1,
            pad_left: 1,
            oh: 64,
            ow: 64,
        };
        let x = GpuStorage::zeros(&gpu, 2 * 64 * 64);
        let w = GpuStorage::zeros(&gpu, 2 * 2 * 9);
        let err = conv2d_limited(&x, &w, None, &p, &BindLimit::new(&gpu.0, 1024), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("conv2d") && err.contains("[1, 2, 64, 64]"),
            "{err}"
        );
    }

    #[test]
    fn sd_sized_layer_matches_the_cpu() {
        check([2, 320, 64, 64], 320, 3, 1, 1, 130);
    }
}
