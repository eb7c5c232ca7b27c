//! Matrix products through the `gemm` crate (SIMD microkernels, rayon threads).

use std::cell::RefCell;
use std::marker::PhantomData;
use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::simd::{self, Level};
use super::{CpuStorage, SharedMut};
use crate::tensor::params::MatmulDims;
use crate::tensor::DType;

/// A strided view of a row-major matrix inside a slice.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major matrix of `cols` columns.
    pub fn row_major(data: &'a [f32], cols: usize) -> Self {
        MatRef {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// This matrix transposed (the same values).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// The transpose of a row-major matrix of `cols` columns (a `cols x rows` view).
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        MatRef {
            data,
            row_stride: 1,
            col_stride: cols,
        }
    }
}

/// One matrix product: `dst = lhs @ rhs` (or `dst += lhs @ rhs` with `accumulate`), lhs
/// `m x k`, rhs `k x n`, into an `m x n` destination whose rows are `dst_row_stride` apart
/// (unit column stride).
#[derive(Clone, Copy)]
pub(crate) struct Product<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lhs: MatRef<'a>,
    pub rhs: MatRef<'a>,
    pub dst_row_stride: usize,
    pub accumulate: bool,
}

/// Where a product writes: `len` values from `ptr`, borrowed mutably for `'a`. Made from
/// values (which a product may add to) or from uninitialised memory, such as a fresh op
/// output, which a product may only overwrite: that spares the output's zeroing, a pass
/// over memory that cost linear layers 5-15% at the UNet's shapes on 2 Xeon cores (8192 x
/// 5120 x 640: 216 -> 188 ms).
pub(crate) struct Dst<'a> {
    ptr: *mut f32,
    len: usize,
    initialised: bool,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: a Dst is a mutable borrow of its values, which may move to another thread as
// `&mut [f32]` may.
unsafe impl Send for Dst<'_> {}

impl<'a> From<&'a mut [f32]> for Dst<'a> {
    fn from(values: &'a mut [f32]) -> Self {
        Dst {
            ptr: values.as_mut_ptr(),
            len: values.len(),
            initialised: true,
            _borrow: PhantomData,
        }
    }
}

impl<'a> From<&'a mut [MaybeUninit<f32>]> for Dst<'a> {
    fn from(values: &'a mut [MaybeUninit<f32>]) -> Self {
        Dst {
            ptr: values.as_mut_ptr().cast(),
            len: values.len(),
            initialised: false,
            _borrow: PhantomData,
        }
    }
}

impl<'a> Dst<'a> {
    pub fn len(&self) -> usize {
        self.len
    }

    /// The first value, for writes within `len` (and reads, where initialised).
    pub fn ptr(&self) -> *mut f32 {
        self.ptr
    }

    /// Panics if a product that `accumulate`s would read uninitialised values.
    pub fn check_accumulate(&self, accumulate: bool) {
        assert!(
            !accumulate || self.initialised,
            "a product cannot add to uninitialised values"
        );
    }

    /// Consecutive disjoint parts of `size` values (the last may be shorter).
    pub fn chunks(self, size: usize) -> Vec<Dst<'a>> {
        assert!(size > 0, "chunks of 0 values");
        (0..self.len)
            .step_by(size)
            .map(|start| Dst {
                // SAFETY: start < len, so inside the borrowed values.
                ptr: unsafe { self.ptr.add(start) },
                len: size.min(self.len - start),
                ..self
            })
            .collect()
    }
}

/// Runs `p` into `dst`, on rayon's threads with `parallel` (else on this one): in f32 with
/// `gemm`'s microkernels, or rounding the operands to bf16 under `--precision bf16`.
/// Accumulating needs an initialised `dst`.
pub(crate) fn sgemm<'a>(p: Product, dst: impl Into<Dst<'a>>, parallel: bool) {
    let dst = dst.into();
    if let Some(kernel) = super::precision::active() {
        return super::precision::gemm(kernel, p, dst, parallel);
    }
    sgemm_at(simd::level(), p, dst, parallel)
}

/// [`sgemm`] with the microkernels of `level` (at most what the CPU has).
fn sgemm_at(level: Level, p: Product, dst: Dst, parallel: bool) {
    let Product {
        m,
        n,
        k,
        lhs,
        rhs,
        dst_row_stride,
        ..
    } = p;
    assert!(level <= simd::detected(), "{level:?} is past this CPU");
    dst.check_accumulate(p.accumulate);
    if m == 0 || n == 0 {
        return;
    }
    let extent =
        |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs + 1;
    assert!(
        dst.len() >= extent(m, n, dst_row_stride, 1),
        "gemm dst out of bounds"
    );
    if k > 0 {
        assert!(
            lhs.data.len() >= extent(m, k, lhs.row_stride, lhs.col_stride),
            "gemm lhs out of bounds"
        );
        assert!(
            rhs.data.len() >= extent(k, n, rhs.row_stride, rhs.col_stride),
            "gemm rhs out of bounds"
        );
    }
    let threads = rayon::current_num_threads();
    let big = m * n * k >= PARALLEL_MIN_WORK;
    let few_rows = m < SMALL_M && big;
    // Few rows (77 text tokens): gemm's own threading splits rows, so the threads would
    // share little; each thread gets its own band of columns instead. Transposed (see
    // `few_rows_transposed`) where rhs is a linear layer's weight (rows of k in place,
    // of at least TRANSPOSED_MIN_RHS values) and from TRANSPOSED_MIN_M rows on, whatever the
    // threads: the orientation changes how values round, and a request must give the same
    // image on any number of cores.
    let transposed =
        few_rows && m >= TRANSPOSED_MIN_M && rhs.row_stride == 1 && n * k >= TRANSPOSED_MIN_RHS;
    if transposed || (parallel && few_rows && n >= threads * 64) {
        let bands = if parallel { threads } else { 1 };
        let band = n.div_ceil(bands).next_multiple_of(16);
        let dst_ptr = super::SharedMut(dst.ptr());
        let run = |i: usize| {
            let (j0, cols) = (i * band, band.min(n - i * band));
            let (p, dst) = (Product { n: cols, ..p }, dst_ptr.ptr());
            // SAFETY: as below; the bands' columns are disjoint, so no two tasks write
            // the same element of dst.
            unsafe {
                if transposed {
                    few_rows_transposed(level, p, dst.add(j0), j0)
                } else {
                    gemm_raw(level, p, dst.add(j0), j0, gemm::Parallelism::None)
                }
            }
        };
        if parallel {
            (0..n.div_ceil(band)).into_par_iter().for_each(run);
        } else {
            (0..n.div_ceil(band)).for_each(run);
        }
        return;
    }
    let parallelism = if parallel && big {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every access of the three strided matrices inside
    // their slices, and dst is borrowed mutably so nothing else aliases it; gemm reads it
    // only when accumulating, which the assert above allows on initialised values only.
    unsafe { gemm_raw(level, p, dst.ptr(), 0, parallelism) };
}

/// Products with fewer rows than this split their columns across threads.
const SMALL_M: usize = 256;

/// Few-row products from this many rows run transposed. Below it gemm could sum a band's
/// values in other blocks of k than the whole product's (it picks k blocks from the sizes
/// when both are at most 64, from k alone otherwise), so the result would depend on how
/// many threads split the columns; from 65 rows on a band's width changes no rounding.
const TRANSPOSED_MIN_M: usize = 65;

/// Few-row products run transposed only for a right-hand side of at least this many values
/// (512 KiB): the transposed path spares packing a weight that does not fit in L2, which
/// the UNets' and text encoders' attention keys (`k^T`, also stored with unit row stride:
/// heads of at most 160 values, so at most 160 x 512 = 80K values a block) always do; the
/// VAE's one 512-wide head (512 x 512 keys a block) keeps the transposed path for a last
/// query block of 65-255 rows. Taking it for the text encoders' 77-token
/// self-attention slower: on 2 Zen 3 cores (fastest of alternated runs) 0.23-0.26 -> 0.18-0.20
/// ms for CLIP ViT-L's 12 heads, 0.35-0.45 -> 0.29-0.31 ms for OpenCLIP bigG's 20; a UNet
/// attention whose last block has 65-255 queries (1200 or 4225 tokens) 0-3% faster. The
/// smallest weight in a few-row product is 320 x 768 (SD 1.5's cross-attention keys and
/// values): 246K values.
const TRANSPOSED_MIN_RHS: usize = 1 << 17;

/// Products of fewer multiply-adds (`m * n * k`) than this run on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// `gemm::gemm` of `p.lhs` by columns `first_col..first_col + p.n` of `p.rhs` into `dst`,
/// with at most AVX2 + FMA at `level` Avx2.
///
/// # Safety
/// `p.lhs` and those columns of `p.rhs` must lie inside their slices, `dst` must point at
/// an `m x n` region (row stride `p.dst_row_stride`) that no other thread writes, and
/// `level` must be one the CPU has; with `p.accumulate` that region must be initialised
/// (without it gemm only writes there).
unsafe fn gemm_raw(
    level: Level,
    p: Product,
    dst: *mut f32,
    first_col: usize,
    parallelism: gemm::Parallelism,
) {
    let (m, n, k, accumulate) = (p.m, p.n, p.k, p.accumulate);
    let (lhs, rhs) = (p.lhs, p.rhs);
    let (lhs_ptr, rhs_ptr) = (
        lhs.data.as_ptr(),
        rhs.data[first_col * rhs.col_stride..].as_ptr(),
    );
    let (lhs_cs, lhs_rs) = (lhs.col_stride as isize, lhs.row_stride as isize);
    let (rhs_cs, rhs_rs) = (rhs.col_stride as isize, rhs.row_stride as isize);
    let dst_rs = p.dst_row_stride as isize;
    // Under `SD_CPU_SIMD=avx2` `gemm::gemm` would still pick AVX-512 (it asks the CPU
    // itself), so the capped run goes through its driver with its AVX2 + FMA microkernels.
    // At `baseline` gemm keeps its own pick: it has no SSE kernels, only scalar ones, with
    // which the tests' tiny 64x64 UNet step took 0.67 s (three timing tests of
    // tests/hardening.rs then see a machine too slow for their premises); the baseline
    // level is there to check sd-wgpu's own portable loops, and gemm's are gemm's.
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx2 {
        use gemm_common::simd::{MixedSimd, V3};
        use gemm_f32::microkernel::fma::f32 as ukr;
        // f32 lanes of one AVX2 register (gemm's `N` for its fma kernels).
        const LANES: usize = 8;
        // `level` is at most what the CPU has (sgemm_at asserts it).
        let simd = <V3 as MixedSimd<f32, f32, f32, f32>>::try_new().expect("AVX2 + FMA checked");
        // gemm's driver wants a column-major destination: as `gemm::gemm` does for a
        // row-major one, compute dst^T = rhs^T lhs^T (every stride here is positive, so
        // none needs flipping).
        unsafe {
            gemm_common::gemm::gemm_basic_generic::<
                _,
                f32,
                LANES,
                { ukr::MR_DIV_N * LANES },
                { ukr::NR },
                { ukr::MR_DIV_N },
                { ukr::H_M },
                { ukr::H_N },
            >(
                simd,
                n,
                m,
                k,
                dst,
                dst_rs,
                1,
                accumulate,
                rhs_ptr,
                rhs_rs,
                rhs_cs,
                lhs_ptr,
                lhs_rs,
                lhs_cs,
                1.0,
                1.0,
                false,
                false,
                false,
                |a, b, c| a * b + c,
                &ukr::UKR,
                &ukr::H_UKR,
                false,
                parallelism,
            )
        };
        return;
    }
    // gemm's own choice: AVX-512 where the CPU has it (the `x86-v4` feature), else AVX2 +
    // FMA, else scalar; NEON on aarch64.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs,
            accumulate,
            lhs_ptr,
            lhs_cs,
            lhs_rs,
            rhs_ptr,
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    };
}

thread_local! {
    /// Per-thread f32 copy of a band of half-precision weight rows.
    static WIDENED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Per-thread transposed result of one band of a few-row product.
    static TRANSPOSED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// [`gemm_raw`] of a product of few rows (`p.m` < [`SMALL_M`], on this thread), computed as
/// its transpose `rhs^T lhs^T` into a per-thread buffer that stays in L2, then copied (or
/// added) into `dst`. For a row-major destination gemm puts the destination's columns
/// along its microkernel's vectors (64 values) and packs the right-hand side, a linear
/// layer's whole weight, before it multiplies; transposed, the few rows run along the
/// vectors and gemm reads the weight rows in place. On 2 Xeon cores (AVX-512), f32
/// weights cycled so that they come from memory, in two column bands: 77 x 1280 x 5120
/// went from 111 to 205 GFLOP/s, 77 x 5120 x 1280 from 150 to 187, 77 x 1280 x 1280 from
/// 132 to 176, 77 x 768 x 768 stayed at 164.
///
/// # Safety
/// As [`gemm_raw`].
unsafe fn few_rows_transposed(level: Level, p: Product, dst: *mut f32, first_col: usize) {
    let (m, n) = (p.m, p.n);
    let rhs_band = MatRef {
        data: &p.rhs.data[first_col * p.rhs.col_stride..],
        ..p.rhs
    };
    TRANSPOSED.with_borrow_mut(|t| {
        t.resize(m * n, 0.0);
        let t = &mut t[..m * n];
        let product = Product {
            m: n,
            n: m,
            k: p.k,
            lhs: rhs_band.t(),
            rhs: p.lhs.t(),
            dst_row_stride: m,
            accumulate: false,
        };
        // SAFETY: the caller's guarantees for p's operands are the transposed product's;
        // t holds its n x m values.
        unsafe { gemm_raw(level, product, t.as_mut_ptr(), 0, gemm::Parallelism::None) };
        for i in 0..m {
            // SAFETY: row i's n values from dst are the caller's m x n region.
            let row = unsafe { dst.add(i * p.dst_row_stride) };
            let column = t[i..].iter().step_by(m);
            for (j, &v) in column.enumerate() {
                // SAFETY: as above; read only when accumulating (then initialised).
                unsafe {
                    if p.accumulate {
                        *row.add(j) += v;
                    } else {
                        row.add(j).write(v);
                    }
                }
            }
        }
    });
}

/// Widened weight values per band: 512 KiB, a quarter of a core's L2 on the Xeon measured
/// (2 MiB). Bands of 1 MiB were up to 15% slower at 77 rows there, 256 KiB no faster.
const WIDENED_BAND: usize = 1 << 17;

/// `dst (+)= x @ w^T` for fewer than [`SMALL_M`] rows `x` (`m x k`) by a half-precision
/// weight `w` (`n x k`), `dst` `m x n`: each thread widens a band of the weight's rows at a
/// time into its own buffer, small enough to stay in L2, and multiplies it there. Widening
/// the whole weight into a fresh f32 copy first (as large products do, where it is paid
/// once for many rows) costs as much as the product itself at 77 rows: in DRAM, that copy
/// is written and read back. On 2 Xeon cores (AVX-512), 77 x 768 x 768 went from 113 to
/// 162 GFLOP/s (an f32 weight's: 179), 77 x 768 x 3072 from 113 to 144 (f32: 141), and
/// the SD 1.5 text encoder with fp16 weights from 0.12 to 0.09 s (with f32 weights: 0.09).
#[allow(clippy::too_many_arguments)]
fn few_rows_by_half_weight(
    level: Level,
    x: &[f32],
    m: usize,
    k: usize,
    w: &CpuStorage,
    n: usize,
    dst: Dst,
    accumulate: bool,
) {
    assert!(x.len() >= m * k && w.len() == n * k && dst.len() >= m * n);
    dst.check_accumulate(accumulate);
    if m == 0 || n == 0 {
        return;
    }
    // As many bands for each thread, each at most WIDENED_BAND values (in whole 16-column
    // panels where it can).
    let threads = rayon::current_num_threads();
    let bands = (n * k)
        .div_ceil(WIDENED_BAND)
        .max(1)
        .next_multiple_of(threads);
    let rows = n.div_ceil(bands).next_multiple_of(16);
    let dst_ptr = SharedMut(dst.ptr());
    let band = |band: usize| {
        let (j0, cols) = (band * rows, rows.min(n - band * rows));
        WIDENED.with_borrow_mut(|widened| {
            widened.resize(cols * k, 0.0);
            let widened = &mut widened[..cols * k];
            w.read_f32(j0 * k, widened);
            let product = Product {
                m,
                n: cols,
                k,
                lhs: MatRef::row_major(x, k),
                rhs: MatRef::transposed(widened, k),
                dst_row_stride: n,
                accumulate,
            };
            // SAFETY: x holds m x k values and the widened band cols x k (asserted and
            // sized above); dst + j0 is the m x cols region of columns j0..j0 + cols of
            // the m x n dst, which no other band writes, initialised if accumulating.
            unsafe {
                gemm_raw(
                    level,
                    product,
                    dst_ptr.ptr().add(j0),
                    0,
                    gemm::Parallelism::None,
                )
            };
        });
    };
    if m * n * k < PARALLEL_MIN_WORK {
        // The time embedding's 2 rows: less work than handing it to threads.
        (0..n.div_ceil(rows)).for_each(band);
    } else {
        (0..n.div_ceil(rows)).into_par_iter().for_each(band);
    }
}

/// Batched `lhs @ rhs` (+ bias broadcast over rows).
pub fn matmul(
    lhs: &CpuStorage,
    rhs: &CpuStorage,
    bias: Option<&CpuStorage>,
    d: MatmulDims,
) -> CpuStorage {
    let lhs = lhs.as_f32();
    let (m, n, k) = (d.m, d.n, d.k);
    let total = d.batch * m * n;
    // The output is not zeroed: the products overwrite it, or add to the bias rows
    // written first.
    let mut out: Vec<f32> = Vec::with_capacity(total);
    let fresh = &mut out.spare_capacity_mut()[..total];
    let bias = bias.map(|b| b.as_f32());
    let dst: Dst = match &bias {
        Some(bias) => {
            fresh.par_chunks_mut(n.max(1)).for_each(|row| {
                row.write_copy_of_slice(bias);
            });
            // SAFETY: every value was just written (total is a multiple of n = bias.len()).
            unsafe { &mut *(fresh as *mut [MaybeUninit<f32>] as *mut [f32]) }.into()
        }
        None => fresh.into(),
    };
    let accumulate = bias.is_some();
    let linear_layer = d.batch == 1 && d.transpose_rhs && !d.rhs_batched;
    // Under `--precision bf16` every product goes through `sgemm`, which rounds.
    if linear_layer
        && m < SMALL_M
        && rhs.dtype() != DType::F32
        && super::precision::active().is_none()
    {
        few_rows_by_half_weight(simd::level(), &lhs, m, k, rhs, n, dst, accumulate);
    } else {
        let rhs = rhs.as_f32();
        // The product of batch entry `b`.
        let product = |b: usize| {
            let off = if d.rhs_batched { b * k * n } else { 0 };
            let data = &rhs[off..off + k * n];
            Product {
                m,
                n,
                k,
                lhs: MatRef::row_major(&lhs[b * m * k..(b + 1) * m * k], k),
                rhs: if d.transpose_rhs {
                    MatRef::transposed(data, k)
                } else {
                    MatRef::row_major(data, n)
                },
                dst_row_stride: n,
                accumulate,
            }
        };
        if d.batch == 1 {
            sgemm(product(0), dst, true);
        } else if total > 0 {
            // Many small products (attention heads): one thread per product.
            let parallel_inside = d.batch < rayon::current_num_threads();
            dst.chunks(m * n)
                .into_par_iter()
                .enumerate()
                .for_each(|(b, dst)| sgemm(product(b), dst, parallel_inside));
        }
    }
    // SAFETY: the products wrote all batch x m x n values (rows of n, no gaps; gemm writes
    // zeros when k = 0), or added to the bias rows written above.
    unsafe { out.set_len(total) };
    CpuStorage::F32(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::testing::random;

    /// `lhs @ rhs` (+ `dst` when accumulating) in f64, row-major.
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        lhs: &[f32],
        rhs: MatRef,
        dst: Option<&[f32]>,
    ) -> Vec<f64> {
        (0..m * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                let products = (0..k).map(|j| {
                    let b = rhs.data[j * rhs.row_stride + c * rhs.col_stride];
                    lhs[r * k + j] as f64 * b as f64
                });
                products.sum::<f64>() + dst.map_or(0.0, |d| d[i] as f64)
            })
            .collect()
    }

    /// Every level the CPU has runs the product (the column-band path for few rows, gemm's
    /// own threads for many, a transposed right-hand side, accumulation, each path with and
    /// without it) to within f32 rounding of an f64 sum; and where gemm's own choice is AVX2 (no AVX-512 here), the
    /// capped AVX2 path is bit for bit what `gemm::gemm` gives, which checks its
    /// transposition of the operands.
    #[test]
    fn every_simd_level_computes_the_product() {
        let levels = [Level::Baseline, Level::Avx2, Level::Avx512];
        // (m, n, k, transposed rhs, accumulate): 77 rows x 1280 columns take the column band
        // path, 130 rows by a weight-sized transposed rhs (at least TRANSPOSED_MIN_RHS
        // values) the band path that computes the transposed product.
        let cases = [
            (77, 1280, 96, false, false),
            (130, 1280, 112, true, true),
            (300, 200, 70, true, true),
            (1, 33, 5, false, true),
        ];
        for (case, &(m, n, k, transposed, accumulate)) in cases.iter().enumerate() {
            let seed = 10 * case as u64;
            let lhs = random(&[m, k], seed).to_vec().unwrap();
            let rhs_data = random(&[k, n], seed + 1).to_vec().unwrap();
            let rhs = if transposed {
                MatRef::transposed(&rhs_data, k)
            } else {
                MatRef::row_major(&rhs_data, n)
            };
            let initial = random(&[m, n], seed + 2).to_vec().unwrap();
            let lhs_ref = MatRef::row_major(&lhs, k);
            let want = reference(m, n, k, &lhs, rhs, accumulate.then_some(&initial[..]));
            let fresh = || {
                if accumulate {
                    initial.clone()
                } else {
                    vec![f32::NAN; m * n]
                }
            };
            let product = Product {
                m,
                n,
                k,
                lhs: lhs_ref,
                rhs,
                dst_row_stride: n,
                accumulate,
            };
            for &level in levels.iter().filter(|&&l| l <= simd::detected()) {
                let mut dst = fresh();
                sgemm_at(level, product, (&mut dst[..]).into(), true);
                for (i, (&got, &want)) in dst.iter().zip(&want).enumerate() {
                    // f32 sums of k products: a few ulps per sqrt(k) terms.
                    let bound = 4e-7 * 8.0 * (k as f64).sqrt() * want.abs().max(1.0);
                    assert!(
                        (got as f64 - want).abs() <= bound,
                        "{level:?} case {case} element {i}: {got} vs {want}"
                    );
                }
            }
            if simd::detected() == Level::Avx2 {
                let mut capped = fresh();
                sgemm_at(Level::Avx2, product, (&mut capped[..]).into(), false);
                let mut own = fresh();
                // SAFETY: the extents sgemm_at asserts for the same operands; own is a
                // local m x n buffer.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        own.as_mut_ptr(),
                        1,
                        n as isize,
                        accumulate,
                        lhs.as_ptr(),
                        1,
                        k as isize,
                        rhs_data.as_ptr(),
                        rhs.col_stride as isize,
                        rhs.row_stride as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                };
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&capped), bits(&own), "case {case}");
            }
        }
    }

    /// Few rows by a half-precision weight (`nn.Linear`'s `[out, in]`), widened band by
    /// band: many bands per thread and a partial last one, the 2-row product kept on one
    /// thread, with bias and without, at every SIMD level the CPU has; against an f64
    /// product of the weight's stored values.
    /// A few-row product gives the same bits on 1, 2 or 3 threads and when asked to stay on
    /// one (the service runs on however many cores it finds; the tests' server on one): the
    /// transposed band path for 77 and 130 rows by a weight-sized rhs, the plain column
    /// bands for 77 rows by 70K values (as attention's keys take), gemm's own threads for
    /// 300; accumulating,
    /// with k beyond gemm's 512-value blocks, where the transposed path (which adds its
    /// sums to the destination at the end) rounds unlike gemm (which adds each block's).
    #[test]
    fn few_row_products_do_not_depend_on_the_thread_count() {
        for (case, &(m, n, k)) in [
            (77, 200, 700),
            (77, 100, 700),
            (130, 1000, 600),
            (300, 150, 40),
        ]
        .iter()
        .enumerate()
        {
            let seed = 300 + 10 * case as u64;
            let lhs = random(&[m, k], seed).to_vec().unwrap();
            let rhs = random(&[n, k], seed + 1).to_vec().unwrap();
            let product = Product {
                m,
                n,
                k,
                lhs: MatRef::row_major(&lhs, k),
                rhs: MatRef::transposed(&rhs, k),
                dst_row_stride: n,
                accumulate: true,
            };
            let initial = random(&[m, n], seed + 2).to_vec().unwrap();
            let run = |threads: usize, parallel: bool| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut dst = initial.clone();
                pool.install(|| sgemm_at(simd::level(), product, (&mut dst[..]).into(), parallel));
                dst
            };
            let one = run(1, true);
            for (threads, parallel) in [(2, true), (3, true), (2, false)] {
                let other = run(threads, parallel);
                let same = one
                    .iter()
                    .zip(&other)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "case {case}: {threads} threads, parallel {parallel}");
            }
        }
    }

    /// The op fills every value of its output, which it does not zero first: batched
    /// products with a shared or a per-entry right-hand side, plain or transposed, with and
    /// without bias, f32 and half-precision weights (few rows, many), and k = 0, against f64.
    /// A NaN-filled block of the output's size is freed just before, so that a value left
    /// unwritten would likely show as NaN.
    #[test]
    fn matmul_op_writes_every_value() {
        // (batch, m, n, k, rhs batched, rhs transposed)
        let cases = [
            (1, 300, 70, 40, false, true),
            (1, 77, 64, 32, false, true),
            (3, 20, 17, 9, true, false),
            (2, 5, 8, 0, false, true),
        ];
        for (case, &(batch, m, n, k, rhs_batched, transpose_rhs)) in cases.iter().enumerate() {
            let seed = 200 + 10 * case as u64;
            let lhs = random(&[batch * m * k], seed).to_vec().unwrap();
            let entries = if rhs_batched { batch } else { 1 };
            let rhs = random(&[entries * k * n], seed + 1).to_vec().unwrap();
            let bias = random(&[n], seed + 2).to_vec().unwrap();
            let halves = [
                CpuStorage::F32(rhs.clone()),
                CpuStorage::F16(rhs.iter().map(|&v| half::f16::from_f32(v)).collect()),
            ];
            let d = MatmulDims {
                batch,
                m,
                n,
                k,
                rhs_batched,
                transpose_rhs,
            };
            for weight in &halves {
                let stored = weight.as_f32();
                for with_bias in [false, true] {
                    drop(std::hint::black_box(vec![f32::NAN; batch * m * n]));
                    let bias_storage = CpuStorage::F32(bias.clone());
                    let got = matmul(
                        &CpuStorage::F32(lhs.clone()),
                        weight,
                        with_bias.then_some(&bias_storage),
                        d,
                    );
                    let got = got.as_f32();
                    let initial: Vec<f32> = (0..m).flat_map(|_| bias.iter().copied()).collect();
                    for b in 0..batch {
                        let data = &stored[if rhs_batched { b * k * n } else { 0 }..][..k * n];
                        let rhs = if transpose_rhs {
                            MatRef::transposed(data, k)
                        } else {
                            MatRef::row_major(data, n)
                        };
                        let lhs = &lhs[b * m * k..(b + 1) * m * k];
                        let want = reference(m, n, k, lhs, rhs, with_bias.then_some(&initial[..]));
                        let got = &got[b * m * n..(b + 1) * m * n];
                        for (i, (&got, &want)) in got.iter().zip(&want).enumerate() {
                            let bound = 4e-7 * 8.0 * (k as f64).sqrt() * want.abs().max(1.0);
                            assert!(
                                (got as f64 - want).abs() <= bound,
                                "case {case} {:?} bias {with_bias} entry {b} element {i}: {got} vs {want}",
                                weight.dtype()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn few_rows_by_half_weight_computes_the_product() {
        let levels = [Level::Baseline, Level::Avx2, Level::Avx512];
        // 77 x 1000 x 300: 300k weight values make 4+ bands of 16-column panels, the
        // last one short.
        // (3, 5, 0): no inputs at all, so zeros (or the bias).
        for (case, &(m, n, k)) in [
            (77, 1000, 300),
            (2, 40, 33),
            (SMALL_M - 1, 24, 9),
            (3, 5, 0),
        ]
        .iter()
        .enumerate()
        {
            let seed = 100 + 10 * case as u64;
            let x = random(&[m, k], seed).to_vec().unwrap();
            let w = random(&[n, k], seed + 1).to_vec().unwrap();
            let bias = random(&[n], seed + 2).to_vec().unwrap();
            for weight in [
                CpuStorage::F16(w.iter().map(|&v| half::f16::from_f32(v)).collect()),
                CpuStorage::BF16(w.iter().map(|&v| half::bf16::from_f32(v)).collect()),
            ] {
                let stored = weight.as_f32();
                for with_bias in [false, true] {
                    let initial: Vec<f32> = (0..m).flat_map(|_| bias.iter().copied()).collect();
                    let want = reference(
                        m,
                        n,
                        k,
                        &x,
                        MatRef::transposed(&stored, k),
                        with_bias.then_some(&initial[..]),
                    );
                    for &level in levels.iter().filter(|&&l| l <= simd::detected()) {
                        let mut dst = if with_bias {
                            initial.clone()
                        } else {
                            vec![f32::NAN; m * n]
                        };
                        few_rows_by_half_weight(
                            level,
                            &x,
                            m,
                            k,
                            &weight,
                            n,
                            (&mut dst[..]).into(),
                            with_bias,
                        );
                        for (i, (&got, &want)) in dst.iter().zip(&want).enumerate() {
                            let bound = 4e-7 * 8.0 * (k as f64).sqrt() * want.abs().max(1.0);
                            assert!(
                                (got as f64 - want).abs() <= bound,
                                "{level:?} {:?} case {case} bias {with_bias} element {i}: {got} vs {want}",
                                weight.dtype()
                            );
                        }
                    }
                }
            }
        }
    }
}
