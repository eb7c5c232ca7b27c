//! Device memory behind a GPU tensor: an f32 buffer that goes back to the pool when the
//! last tensor holding it is dropped.

use std::sync::Arc;

use super::context::{GpuContext, GpuDevice};
use crate::error::Result;

pub struct GpuStorage {
    /// `None` only while being dropped.
    buffer: Option<wgpu::Buffer>,
    /// Elements (f32).
    len: usize,
    pub(crate) ctx: Arc<GpuContext>,
}

impl std::fmt::Debug for GpuStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuStorage({} f32 on {})", self.len, self.ctx.info.name)
    }
}

impl Drop for GpuStorage {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            self.ctx.recycle(b);
        }
    }
}

impl GpuStorage {
    /// Uploads host values.
    pub fn from_f32(device: &GpuDevice, data: &[f32]) -> Self {
        GpuStorage {
            buffer: Some(device.0.upload(bytemuck::cast_slice(data))),
            len: data.len(),
            ctx: device.0.clone(),
        }
    }

    /// An uninitialised kernel output of `len` elements on the same device as `self`.
    pub(crate) fn output(ctx: &Arc<GpuContext>, len: usize) -> Self {
        GpuStorage {
            buffer: Some(ctx.alloc(len as u64 * 4)),
            len,
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

    pub fn device(&self) -> GpuDevice {
        GpuDevice(self.ctx.clone())
    }

    pub(crate) fn buffer(&self) -> &wgpu::Buffer {
        self.buffer
            .as_ref()
            .expect("the buffer is only taken in drop")
    }

    /// Elements `start..start + len` as a binding (`start` a multiple of the adapter's
    /// offset alignment, see [`BindLimit`]).
    pub(crate) fn window(&self, start: usize, len: usize) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: self.buffer(),
            offset: start as u64 * 4,
            size: std::num::NonZeroU64::new(len as u64 * 4),
        })
    }

    /// The whole buffer as a binding.
    pub(crate) fn binding(&self) -> wgpu::BindingResource<'_> {
        self.buffer().as_entire_binding()
    }

    /// Copies the values to the host (submits pending work and waits for it).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        self.ctx.take_error()?;
        let bytes = self.ctx.read(self.buffer(), self.len as u64 * 4)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}

/// How much of a buffer one binding may cover.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BindLimit {
    /// Largest binding, in f32 elements (also kept under 2³² so indices fit u32).
    pub max_elems: usize,
    /// Binding offsets are multiples of this many elements.
    pub align_elems: usize,
}

impl BindLimit {
    pub fn of(ctx: &GpuContext) -> Self {
        Self::new(ctx, ctx.limits.max_storage_buffer_binding_size)
    }

    /// The adapter's alignment with a binding limit of `max_bytes` (tests use small ones).
    pub fn new(ctx: &GpuContext, max_bytes: u64) -> Self {
        let align = u64::from(ctx.limits.min_storage_buffer_offset_alignment).max(4);
        BindLimit {
            max_elems: (max_bytes / 4).min(u64::from(u32::MAX)) as usize,
            align_elems: (align / 4) as usize,
        }
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
