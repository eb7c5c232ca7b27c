//! The opt-in reduced-precision mode (`--precision bf16`): every matrix product of the CPU
//! backend (linear layers, the convolutions' GEMMs, attention's two products) rounds its
//! operands to bfloat16 and accumulates in f32, on the CPU's bf16 instructions; everything
//! else (norms, softmax, activations, Winograd's transforms, the sums between products)
//! stays f32. This is what PyTorch's bfloat16 autocast does to the same products on the
//! CPU. The default is f32 and exact; this mode trades the last bits of every product for
//! speed on processors with AMX-BF16 (Intel Xeon from Sapphire Rapids) or AVX512_BF16
//! (those, and AMD from Zen 4).
//!
//! One driver for both kernels: the operands are rounded once into packed bf16 copies
//! (rows of the left-hand side; the right-hand side in 16-column panels whose k pairs are
//! interleaved, the layout both instruction sets read), and the kernel computes each 32 x 32
//! block of the result from them, writing it to (or adding it to) the destination: in
//! place, or through a local block at the destination's edges.

mod amx;
mod avx512;
mod pack;

use std::sync::OnceLock;

use rayon::prelude::*;

use super::matmul::{Dst, Product};
use super::simd::{self, Level};
use super::SharedMut;
use crate::error::{Error, Result};

/// How the CPU backend computes its matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// f32 operands and sums: the images match diffusers' float32 ones.
    #[default]
    F32,
    /// bf16 operands, f32 sums (PyTorch's bfloat16 autocast on the CPU).
    Bf16,
}

/// The instructions a bf16 product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles: `tdpbf16ps`, 16 x 16 results from 16 x 32 by 32 x 16 per instruction.
    Amx,
    /// AVX512_BF16's `vdpbf16ps`: 16 results of a k pair per instruction.
    Avx512,
}

/// The kernels this CPU has, best first. Both need AVX-512 (the packing and the epilogue
/// are compiled for it), so `SD_CPU_SIMD` below `avx512` leaves none; `SD_CPU_BF16=avx512`
/// leaves AMX out (to measure on a Xeon what a CPU without AMX, such as AMD's, runs).
pub fn kernels() -> Vec<Kernel> {
    let mut found = Vec::new();
    if simd::level() < Level::Avx512 {
        return found;
    }
    let amx_allowed = std::env::var("SD_CPU_BF16").as_deref() != Ok("avx512");
    // Every CPU with AMX-BF16 also has AVX512_BF16, which the packing uses.
    if amx_allowed && amx::usable() && avx512::usable() {
        found.push(Kernel::Amx);
    }
    if avx512::usable() {
        found.push(Kernel::Avx512);
    }
    found
}

static ACTIVE: OnceLock<Option<Kernel>> = OnceLock::new();

/// Chooses the precision of the CPU products for the whole process, before the first
/// product (the service and `generate` call it at start). bf16 on a CPU without bf16
/// instructions is an error that says so; asking again for what is set is fine.
pub fn set_precision(precision: Precision) -> Result<()> {
    let kernel = match precision {
        Precision::F32 => None,
        Precision::Bf16 => Some(*kernels().first().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "--precision bf16 needs a CPU with AMX-BF16 or AVX512_BF16 (Intel Xeon from \
                 Sapphire Rapids, AMD from Zen 4); {}",
                if simd::level() < simd::detected() {
                    "SD_CPU_SIMD caps this one below AVX-512, which both need"
                } else {
                    "this one has neither"
                }
            ))
        })?),
    };
    let set = *ACTIVE.get_or_init(|| kernel);
    if set != kernel {
        return Err(Error::InvalidArgument(format!(
            "the CPU products are already set to {}",
            describe(set)
        )));
    }
    if let Some(kernel) = kernel {
        tracing::info!("CPU matrix products in bf16 with f32 sums ({kernel:?})");
    }
    if kernel == Some(Kernel::Avx512) {
        // Measured on a 2-core Xeon (2026-12-07): 140-205 GFLOP/s at SD 1.5's shapes
        // against gemm's f32 260-370; on AMD (no AMX) it is not measured yet.
        tracing::warn!(
            "this CPU has AVX512_BF16 but no usable AMX: bf16 products may be no faster than \
             f32 here (on an Intel Xeon they were slower); compare with the bench"
        );
    }
    Ok(())
}

/// The kernel every product runs on, if `--precision bf16` was set; f32 otherwise.
pub(crate) fn active() -> Option<Kernel> {
    *ACTIVE.get_or_init(|| None)
}

/// "f32", or "bf16 (Amx)": for logs and /health.
pub fn describe(kernel: Option<Kernel>) -> String {
    match kernel {
        None => "f32".into(),
        Some(k) => format!("bf16 ({k:?})"),
    }
}

/// The precision the products run at now.
pub fn current() -> String {
    describe(active())
}

/// Rows and columns of the result block one kernel call computes: two AMX tiles each way.
const BLOCK: usize = 32;
/// Columns of one packed panel of the right-hand side (one AMX tile's, one zmm's).
const PANEL: usize = 16;
/// The k extent of one AMX tile row (64 bytes of bf16); the packed k is padded to it so
/// that both kernels read the same layout (the AVX-512 kernel skips the zero padding).
const K_STEP: usize = 32;

/// One 32 x 32 block of results from `BLOCK` packed rows (`a`, `kp` each) and two packed
/// panels (`b`, `PANEL * kp` each), over the first `k` (the rest is zeros), written to (or
/// added to) `out`.
pub(super) type BlockFn = unsafe fn(a: &[u16], b: &[u16], k: usize, kp: usize, out: Target);

/// Where a kernel writes its 32 x 32 block: straight into the destination when the block
/// lies inside it (no copy), else into a [`Block`] that the driver copies from.
#[derive(Clone, Copy)]
pub(super) struct Target {
    pub ptr: *mut f32,
    /// Between rows, in f32 values.
    pub row_stride: usize,
    /// Add to what is there instead of overwriting it.
    pub accumulate: bool,
}

/// A kernel's output block for the blocks at the destination's edges.
#[repr(C, align(64))]
pub(super) struct Block(pub [[f32; BLOCK]; BLOCK]);

/// Runs `p` into `dst` with bf16 operands and f32 sums, as [`super::matmul::sgemm`] takes
/// it.
pub(crate) fn gemm(kernel: Kernel, p: Product, dst: Dst, parallel: bool) {
    let Product {
        m,
        n,
        k,
        lhs,
        rhs,
        dst_row_stride,
        accumulate,
    } = p;
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        dst.len() >= (m - 1) * dst_row_stride + n,
        "bf16 gemm dst out of bounds"
    );
    dst.check_accumulate(accumulate);
    if k == 0 {
        if !accumulate {
            // SAFETY: row r's n values lie inside dst (the assert above).
            (0..m).for_each(|r| unsafe {
                std::ptr::write_bytes(dst.ptr().add(r * dst_row_stride), 0, n)
            });
        }
        return;
    }
    let kp = k.next_multiple_of(K_STEP);
    // Indexing the operand slices in the packing checks their extents.
    let a = pack::rows(m, k, kp, lhs, parallel);
    let b = pack::panels(n, k, kp, rhs, parallel);
    let (row_blocks, col_blocks) = (m.div_ceil(BLOCK), n.div_ceil(BLOCK));
    let block: BlockFn = match kernel {
        Kernel::Amx => amx::block,
        Kernel::Avx512 => avx512::block,
    };
    let prepare = match kernel {
        Kernel::Amx => amx::configure as fn(),
        Kernel::Avx512 => || {},
    };
    let dst_ptr = SharedMut(dst.ptr());
    // The blocks of row block `rb`, columns blocks `cbs`, written into dst.
    let run = |rb: usize, cbs: std::ops::Range<usize>| {
        prepare();
        let mut out = Block([[0.0; BLOCK]; BLOCK]);
        let rows = &a[rb * BLOCK * kp..(rb + 1) * BLOCK * kp];
        for cb in cbs {
            let panels = &b[cb * BLOCK * kp..(cb + 1) * BLOCK * kp];
            let (r0, c0) = (rb * BLOCK, cb * BLOCK);
            if r0 + BLOCK <= m && c0 + BLOCK <= n {
                let target = Target {
                    // SAFETY: the block's rows and columns lie inside dst (the assert
                    // above); each (rb, cb) block is written by one task only.
                    ptr: unsafe { dst_ptr.ptr().add(r0 * dst_row_stride + c0) },
                    row_stride: dst_row_stride,
                    accumulate,
                };
                // SAFETY: `kernels()` listed this kernel, so the CPU (and for AMX the OS)
                // has its instructions; the slices hold the BLOCK rows and two panels it
                // reads, the target 32 rows of 32 values.
                unsafe { block(rows, panels, k, kp, target) };
                continue;
            }
            let target = Target {
                ptr: out.0.as_mut_ptr().cast(),
                row_stride: BLOCK,
                accumulate: false,
            };
            // SAFETY: as above; `out` is a whole block.
            unsafe { block(rows, panels, k, kp, target) };
            for (i, row) in out.0.iter().enumerate().take(BLOCK.min(m - r0)) {
                let width = BLOCK.min(n - c0);
                // SAFETY: row r0 + i < m and columns c0..c0 + width < n lie inside dst (the
                // assert above); each (rb, cb) block is written by one task only, and read
                // only when accumulating, which needs initialised values (asserted above).
                unsafe {
                    let d = dst_ptr.ptr().add((r0 + i) * dst_row_stride + c0);
                    if accumulate {
                        std::slice::from_raw_parts_mut(d, width)
                            .iter_mut()
                            .zip(row)
                            .for_each(|(d, s)| *d += s);
                    } else {
                        std::ptr::copy_nonoverlapping(row.as_ptr(), d, width);
                    }
                }
            }
        }
        if kernel == Kernel::Amx {
            amx::release();
        }
    };
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    if threads == 1 {
        (0..row_blocks).for_each(|rb| run(rb, 0..col_blocks));
    } else if row_blocks >= 2 * threads {
        (0..row_blocks)
            .into_par_iter()
            .for_each(|rb| run(rb, 0..col_blocks));
    } else {
        // Few rows (77 text tokens): every block is a task.
        (0..row_blocks * col_blocks)
            .into_par_iter()
            .for_each(|i| run(i / col_blocks, i % col_blocks..i % col_blocks + 1));
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;
    use crate::backend::cpu::matmul::MatRef;
    use crate::tensor::testing::random;

    fn round(x: f32) -> f64 {
        bf16::from_f32(x).to_f64()
    }

    /// Each kernel this CPU has computes the product of the bf16-rounded operands to within
    /// f32 summation error (the only rounding left), over shapes with partial blocks and
    /// tiles, a k that is not a multiple of the tile's, a transposed rhs, a strided dst,
    /// accumulation, and both the threaded and the single-thread paths.
    #[test]
    fn every_kernel_computes_the_rounded_product() {
        let cases = [
            // (m, n, k, transposed rhs, accumulate, parallel)
            (77, 320, 96, false, false, true),
            (300, 40, 70, true, true, true),
            (1, 33, 5, false, true, false),
            (64, 64, 1, false, false, false),
            (33, 17, 64, true, false, true),
        ];
        let found = kernels();
        eprintln!("bf16 kernels on this CPU: {found:?}");
        for (case, &(m, n, k, transposed, accumulate, parallel)) in cases.iter().enumerate() {
            let seed = 100 + 10 * case as u64;
            let lhs = random(&[m, k], seed).to_vec().unwrap();
            let rhs_data = random(&[k, n], seed + 1).to_vec().unwrap();
            let rhs = if transposed {
                MatRef::transposed(&rhs_data, k)
            } else {
                MatRef::row_major(&rhs_data, n)
            };
            let lhs_ref = MatRef::row_major(&lhs, k);
            // dst rows padded by 3 columns, which must stay untouched.
            let stride = n + 3;
            let initial = random(&[m, stride], seed + 2).to_vec().unwrap();
            for &kernel in &found {
                let mut dst = initial.clone();
                let product = Product {
                    m,
                    n,
                    k,
                    lhs: lhs_ref,
                    rhs,
                    dst_row_stride: stride,
                    accumulate,
                };
                gemm(kernel, product, (&mut dst[..]).into(), parallel);
                for r in 0..m {
                    for c in 0..stride {
                        let got = dst[r * stride + c];
                        if c >= n {
                            assert_eq!(got.to_bits(), initial[r * stride + c].to_bits());
                            continue;
                        }
                        let sum: f64 = (0..k)
                            .map(|j| {
                                round(lhs[r * k + j])
                                    * round(rhs.data[j * rhs.row_stride + c * rhs.col_stride])
                            })
                            .sum();
                        let want = sum
                            + if accumulate {
                                initial[r * stride + c] as f64
                            } else {
                                0.0
                            };
                        // f32 sums of k exact products (bf16 x bf16 fits in f32): a few
                        // ulps per sqrt(k) terms.
                        let bound = 4e-7 * 8.0 * (k as f64).sqrt() * want.abs().max(1.0);
                        assert!(
                            (got as f64 - want).abs() <= bound,
                            "{kernel:?} case {case} ({r}, {c}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Without bf16 instructions the mode is refused, naming what is missing.
    #[test]
    fn bf16_needs_bf16_instructions() {
        if kernels().is_empty() {
            let e = set_precision(Precision::Bf16).unwrap_err().to_string();
            assert!(e.contains("AMX-BF16 or AVX512_BF16"), "{e}");
        }
        // f32 is always available (and, set or not, what the other tests run at).
        set_precision(Precision::F32).unwrap();
    }
}
