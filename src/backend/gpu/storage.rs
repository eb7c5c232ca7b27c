//! Device memory behind a GPU tensor: a buffer that goes back to the pool when the last
//! tensor holding it is dropped.
//!
//! # Element types: the f16 rule
//!
//! A buffer holds f32 values, or f16 values where the device keeps half-precision weights
//! (`GpuContext::f16`). Kernel outputs are always f32; an f16 storage is only ever made by
//! [`GpuStorage::from_f16`] (a weight from an f16 file). Every op must therefore either
//! read f16 natively or widen first:
//!
//! - the kernels that read weights natively (matmul's rhs, conv2d's weight, gather_rows's
//!   table) pick their f16 variant with [`GpuStorage::weight_kernel`] and bind the weight
//!   with [`GpuStorage::binding_any`] / [`GpuStorage::window_any`];
//! - every other op (and those kernels' other operands) calls [`GpuStorage::as_f32`] first,
//!   which widens an f16 storage with a cast kernel and borrows an f32 one.
//!
//! [`GpuStorage::binding`] and [`GpuStorage::window`] refuse an f16 storage, so a kernel
//! can never misread f16 bytes as f32.

use std::sync::Arc;

use half::f16;

use super::context::{GpuContext, GpuDevice, Kernel};
use crate::error::Result;
use crate::tensor::DType;

pub struct GpuStorage {
    /// `None` only while being dropped.
    buffer: Option<wgpu::Buffer>,
    /// Elements.
    len: usize,
    /// `F32`, or `F16` on a device that keeps f16 weights.
    dtype: DType,
    /// A kernel output from the pool, which goes back there when dropped. Uploads are
    /// freed instead: the pool then holds only buffers that kernels allocate, in the same
    /// order every denoising step, so their bind groups come from the cache.
    pooled: bool,
    pub(crate) ctx: Arc<GpuContext>,
}

impl std::fmt::Debug for GpuStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GpuStorage({} {:?} on {})",
            self.len, self.dtype, self.ctx.info.name
        )
    }
}

impl Drop for GpuStorage {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            if self.pooled {
                self.ctx.recycle(b);
            } else {
                self.ctx.release_upload(&b);
            }
        }
    }
}

/// An operand as f32: the storage itself, or a widened copy of an f16 one.
pub(crate) enum F32Operand<'a> {
    Borrowed(&'a GpuStorage),
    Widened(GpuStorage),
}

impl std::ops::Deref for F32Operand<'_> {
    type Target = GpuStorage;

    fn deref(&self) -> &GpuStorage {
        match self {
            F32Operand::Borrowed(s) => s,
            F32Operand::Widened(s) => s,
        }
    }
}

impl GpuStorage {
    /// Uploads host values.
    pub fn from_f32(device: &GpuDevice, data: &[f32]) -> Self {
        GpuStorage {
            buffer: Some(device.0.upload_tensor(bytemuck::cast_slice(data))),
            len: data.len(),
            dtype: DType::F32,
            pooled: false,
            ctx: device.0.clone(),
        }
    }

    /// Uploads half-precision values: kept as f16 where the device reads f16
    /// ([`GpuDevice::keeps_f16`]), widened to f32 on the host otherwise.
    pub fn from_f16(device: &GpuDevice, data: &[f16]) -> Self {
        if !device.0.f16 {
            let wide: Vec<f32> = data.iter().map(|v| v.to_f32()).collect();
            return Self::from_f32(device, &wide);
        }
        // Padded to whole 4-byte words (bindings and copies are sized in them).
        let mut bytes: Vec<u8> = bytemuck::cast_slice(data).to_vec();
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        GpuStorage {
            buffer: Some(device.0.upload_tensor(&bytes)),
            len: data.len(),
            dtype: DType::F16,
            pooled: false,
            ctx: device.0.clone(),
        }
    }

    /// An uninitialised f32 kernel output of `len` elements on the same device as `self`.
    pub(crate) fn output(ctx: &Arc<GpuContext>, len: usize) -> Self {
        GpuStorage {
            buffer: Some(ctx.alloc(len as u64 * 4)),
            len,
            dtype: DType::F32,
            pooled: true,
            ctx: ctx.clone(),
        }
    }

    /// `len` zeros.
    pub fn zeros(device: &GpuDevice, len: usize) -> Self {
        let out = Self::output(&device.0, len);
        let buffer = out.buffer();
        device
            .0
            .record(|encoder| encoder.clear_buffer(buffer, 0, None));
        out
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `F32`, or `F16` for a weight kept in half precision.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn is_f16(&self) -> bool {
        self.dtype == DType::F16
    }

    /// Bytes per element.
    pub fn elem_bytes(&self) -> usize {
        if self.is_f16() {
            2
        } else {
            4
        }
    }

    /// Bytes of data (the buffer itself is padded to a multiple of 4).
    pub fn byte_len(&self) -> u64 {
        (self.len * self.elem_bytes()) as u64
    }

    /// Size of the device buffer in bytes.
    pub fn buffer_bytes(&self) -> u64 {
        self.buffer().size()
    }

    pub fn device(&self) -> GpuDevice {
        GpuDevice(self.ctx.clone())
    }

    pub(crate) fn buffer(&self) -> &wgpu::Buffer {
        self.buffer
            .as_ref()
            .expect("the buffer is only taken in drop")
    }

    /// `kernel`, or its f16-weight variant when this storage holds f16: for the kernels
    /// that read a weight natively (see the module documentation).
    pub(crate) fn weight_kernel(&self, kernel: Kernel) -> Kernel {
        if self.is_f16() {
            kernel.with_f16_weights()
        } else {
            kernel
        }
    }

    /// This storage as f32: itself, or (f16) a widened copy made on the device. Every op
    /// that does not read f16 natively calls this on its operands (see the module
    /// documentation).
    pub(crate) fn as_f32(&self) -> Result<F32Operand<'_>> {
        if self.is_f16() {
            super::elementwise::widen_f16(self).map(F32Operand::Widened)
        } else {
            Ok(F32Operand::Borrowed(self))
        }
    }

    fn assert_f32(&self) {
        assert!(
            !self.is_f16(),
            "an f16 storage bound as f32: widen it with `as_f32` or bind it with `*_any`"
        );
    }

    /// Elements `start..start + len` of an f32 buffer as a binding (`start` a multiple of
    /// the adapter's offset alignment, see [`BindLimit`]).
    pub(crate) fn window(&self, start: usize, len: usize) -> wgpu::BindingResource<'_> {
        self.assert_f32();
        self.window_any(start, len)
    }

    /// [`GpuStorage::window`] for either element type (kernels that read f16 natively;
    /// `start` aligned with a [`BindLimit::for_elem`] of this element size). An f16 window
    /// is rounded up to whole 4-byte words: it may end one element past `len`, still
    /// inside the padded buffer.
    pub(crate) fn window_any(&self, start: usize, len: usize) -> wgpu::BindingResource<'_> {
        let elem = self.elem_bytes() as u64;
        let offset = start as u64 * elem;
        debug_assert!(
            offset.is_multiple_of(u64::from(
                self.ctx.limits.min_storage_buffer_offset_alignment
            )),
            "a misaligned window"
        );
        let size = (len as u64 * elem).next_multiple_of(4);
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: self.buffer(),
            offset,
            size: std::num::NonZeroU64::new(size),
        })
    }

    /// The whole f32 buffer as a binding.
    pub(crate) fn binding(&self) -> wgpu::BindingResource<'_> {
        self.assert_f32();
        self.binding_any()
    }

    /// The whole buffer as a binding, either element type (kernels that read f16 natively).
    pub(crate) fn binding_any(&self) -> wgpu::BindingResource<'_> {
        self.buffer().as_entire_binding()
    }

    /// Copies the values to the host as f32 (submits pending work and waits for it).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        self.ctx.take_error()?;
        let bytes = self.ctx.read(self.buffer(), self.byte_len())?;
        Ok(if self.is_f16() {
            bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect()
        } else {
            bytemuck::pod_collect_to_vec(&bytes)
        })
    }
}

/// How much of a buffer one binding may cover, in elements of one size (f32 unless made
/// with [`BindLimit::for_elem`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct BindLimit {
    /// Largest binding, in elements (also kept under 2³² so indices fit u32).
    pub max_elems: usize,
    /// Binding offsets are multiples of this many elements.
    pub align_elems: usize,
    /// The limit and alignment in bytes, for [`BindLimit::for_elem`].
    max_bytes: u64,
    align_bytes: u64,
}

impl BindLimit {
    /// The adapter's limit for f32 elements.
    pub fn of(ctx: &GpuContext) -> Self {
        Self::new(ctx, ctx.limits.max_storage_buffer_binding_size)
    }

    /// The adapter's alignment with a binding limit of `max_bytes` (tests use small ones),
    /// for f32 elements.
    pub fn new(ctx: &GpuContext, max_bytes: u64) -> Self {
        let align_bytes = u64::from(ctx.limits.min_storage_buffer_offset_alignment).max(4);
        Self::from_bytes(max_bytes, align_bytes, 4)
    }

    fn from_bytes(max_bytes: u64, align_bytes: u64, elem_bytes: u64) -> Self {
        BindLimit {
            max_elems: (max_bytes / elem_bytes).min(u64::from(u32::MAX)) as usize,
            align_elems: (align_bytes / elem_bytes) as usize,
            max_bytes,
            align_bytes,
        }
    }

    /// The same limit counted in elements of `elem_bytes` (2 for an f16 weight).
    pub fn for_elem(&self, elem_bytes: usize) -> Self {
        Self::from_bytes(self.max_bytes, self.align_bytes, elem_bytes as u64)
    }

    /// This limit with window starts aligned for elements of `elem_bytes` too: for a pass
    /// that binds windows of the same elements in buffers of two element types.
    pub fn aligned_for(&self, elem_bytes: usize) -> Self {
        BindLimit {
            align_elems: self.align_elems.max(self.for_elem(elem_bytes).align_elems),
            ..*self
        }
    }

    /// The largest binding in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The longest run of elements that fits one window wherever it starts.
    pub fn span(&self) -> usize {
        self.max_elems.saturating_sub(self.align_elems - 1)
    }

    /// The window covering elements `first..end`: its start (aligned) and length.
    pub fn window(&self, first: usize, end: usize) -> (usize, usize) {
        let start = first / self.align_elems * self.align_elems;
        (start, end - start)
    }
}

#[cfg(test)]
mod tests {
    use crate::backend::gpu::test_device;
    use crate::error::Error;
    use crate::tensor::{Device, Tensor};

    #[test]
    fn an_allocation_the_device_refuses_is_an_error_and_the_device_keeps_working() {
        let Some(gpu) = test_device() else { return };
        // A device of its own: the error would otherwise reach whichever test reads back
        // next from the shared device (and its pending work would be dropped), as it did
        // on the H200 with tests in parallel.
        let gpu = crate::backend::gpu::GpuDevice::new(Some(&gpu.name())).unwrap();
        let device = Device::Gpu(gpu.clone());
        // One buffer larger than the adapter allows: wgpu reports it as an error, which
        // must come back as Error::Gpu at the read-back, not as a panic.
        let too_big = (gpu.0.limits.max_buffer_size / 4 + 1024) as usize;
        let result = Tensor::zeros(&[too_big], &device)
            .and_then(|t| t.silu())
            .and_then(|t| t.to_vec());
        match result {
            Err(Error::Gpu(message)) => println!("refused as expected: {message}"),
            other => panic!(
                "a {too_big}-element buffer was not refused: {:?}",
                other.map(|v| v.len())
            ),
        }
        // The error is reported once; later work on the same device is unaffected.
        let x = Tensor::from_vec(vec![1.0, -2.0, 3.0, 0.5], &[4], &device).unwrap();
        assert_eq!(
            x.affine(2.0, 1.0).unwrap().to_vec().unwrap(),
            vec![3.0, -3.0, 7.0, 2.0]
        );
    }

    #[test]
    fn work_on_a_lost_device_fails_with_an_error_not_a_panic_or_a_hang() {
        let Some(gpu) = test_device() else { return };
        // A device of its own: the shared test device must survive.
        let gpu = crate::backend::gpu::GpuDevice::new(Some(&gpu.name())).unwrap();
        let device = Device::Gpu(gpu.clone());
        let x = Tensor::from_vec(vec![1.0; 4096], &[64, 64], &device).unwrap();
        let y = x.matmul(&x).unwrap();
        gpu.lose_for_test();
        for attempt in 0..2 {
            let result = y.silu().and_then(|t| t.to_vec());
            match result {
                Err(Error::Gpu(message)) => {
                    assert!(message.contains("lost"), "attempt {attempt}: {message}")
                }
                other => panic!("attempt {attempt}: work on a lost device gave {other:?}"),
            }
        }
        assert!(gpu.is_lost());
    }
}
