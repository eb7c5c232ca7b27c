//! The pure-Rust CPU backend: matrix products through the `gemm` crate, everything else as
//! rayon-parallel loops over contiguous f32 slices. It is the reference the GPU kernels are
//! tested against.

pub mod attention;
pub mod conv;
pub mod elementwise;
pub(crate) mod exp;
pub(crate) mod gelu;
pub mod layout;
pub mod matmul;
pub mod norm;
pub mod precision;
pub mod simd;
pub mod tuning;
pub mod winograd;

use std::borrow::Cow;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::tensor::DType;

/// Asks glibc's malloc to keep freed memory for reuse instead of handing it back to the
/// kernel at once. By default every block above 128 KiB-32 MiB is a fresh `mmap`, and the
/// heap is trimmed whenever 128 KiB at its top are free, so each op's output faults in and
/// zeroes its pages again, step after step. With blocks up to 1 GiB served from the heap
/// and the heap trimmed only above 2 GiB of free memory at its top, a guided SD 1.5 UNet
/// step on 2 EPYC cores went from 4.4 s to 3.7 s and a 512x512 VAE decode from 4.9 s to
/// 3.5 s, for about 3% more peak memory. Threads other than the main one allocate from
/// arenas whose heaps are at most 64 MiB, so their larger blocks are still mapped anew:
/// the service runs the model on the main thread for that reason.
///
/// Process-wide, so binaries call it first thing in `main`; elsewhere it does nothing.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tuning parameters; called before other threads
    // exist, it races with no allocation.
    unsafe {
        let accepted = libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1;
        if !accepted {
            tracing::warn!("this glibc refused the malloc settings; large CPU buffers will be mapped afresh per op (slower)");
        }
    }
}

/// Hands the memory [`keep_freed_memory`] keeps back to the system: for when a server goes
/// idle, so that its resident size falls back between requests.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of malloc's own heaps to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Host memory behind a CPU tensor. Weights may stay in their file's half precision;
/// ops widen them to f32 when they read them.
#[derive(Debug)]
pub enum CpuStorage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl CpuStorage {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values `start..start + dst.len()` as f32, into `dst`.
    pub(crate) fn read_f32(&self, start: usize, dst: &mut [f32]) {
        let range = start..start + dst.len();
        match self {
            CpuStorage::F32(v) => dst.copy_from_slice(&v[range]),
            CpuStorage::F16(v) => v[range].convert_to_f32_slice(dst),
            CpuStorage::BF16(v) => v[range].convert_to_f32_slice(dst),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
        }
    }

    /// The values as f32, borrowed when they already are. Half-precision weights are
    /// widened on every use (they stay half in memory): with the CPU's F16C instructions
    /// where it has them (`half`'s slice conversion detects them at run time), in parallel
    /// chunks, since a UNet step widens every weight once.
    pub fn as_f32(&self) -> Cow<'_, [f32]> {
        match self {
            CpuStorage::F32(v) => Cow::Borrowed(v),
            CpuStorage::F16(v) => Cow::Owned(widen(v)),
            CpuStorage::BF16(v) => Cow::Owned(widen(v)),
        }
    }
}

/// The values as a fresh f32 vector. Each value is converted into a small buffer that
/// stays in L1 and copied from there, so that the output is written once: zeroing it first
/// (a memset of the heap block malloc reuses) added a third pass over memory.
fn widen<T: Sync>(values: &[T]) -> Vec<f32>
where
    [T]: HalfFloatSliceExt,
{
    const CHUNK: usize = 1 << 16;
    const STAGE: usize = 1 << 10;
    let mut out = Vec::with_capacity(values.len());
    out.spare_capacity_mut()[..values.len()]
        .par_chunks_mut(CHUNK)
        .zip(values.par_chunks(CHUNK))
        .for_each(|(dst, src)| {
            let mut stage = [0f32; STAGE];
            for (dst, src) in dst.chunks_mut(STAGE).zip(src.chunks(STAGE)) {
                let stage = &mut stage[..src.len()];
                src.convert_to_f32_slice(stage);
                dst.write_copy_of_slice(stage);
            }
        });
    // SAFETY: the chunks above wrote every one of the values.len() values.
    unsafe { out.set_len(values.len()) };
    out
}

/// A raw pointer that rayon tasks may share because each task writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub *mut f32);
// SAFETY: only used to hand disjoint output regions to parallel tasks (see each use).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// A method (not field access) so closures capture the whole Sync wrapper.
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}
