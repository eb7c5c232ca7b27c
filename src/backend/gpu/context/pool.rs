//! The buffer pool (kernel outputs, reused by size) and uploads.

use super::{lock, GpuContext};

impl GpuContext {
    /// A kernel-output buffer of `bytes` bytes, from the pool when one is free.
    pub fn alloc(&self, bytes: u64) -> wgpu::Buffer {
        let bytes = bytes.max(4);
        if let Some(b) = lock(&self.pool)
            .get_mut(&bytes)
            .and_then(std::collections::BTreeSet::pop_first)
        {
            return b;
        }
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Returns a buffer to the pool. Commands already recorded may still use it; anything
    /// that later writes it is recorded after them, and wgpu orders the two.
    pub fn recycle(&self, buffer: wgpu::Buffer) {
        if buffer.size() > self.limits.max_buffer_size {
            return; // Its creation failed (and was reported); never hand it out again.
        }
        lock(&self.pool)
            .entry(buffer.size())
            .or_default()
            .insert(buffer);
    }

    /// A buffer holding `data`, created mapped (not through the queue, whose staged writes
    /// would all land before any recorded pass that reads them).
    pub fn upload(&self, data: &[u8]) -> wgpu::Buffer {
        let padded;
        let contents = if data.is_empty() {
            padded = [0u8; 4];
            &padded[..]
        } else {
            data
        };
        let size = (contents.len() as u64).next_multiple_of(4);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: true,
        });
        // wgpu's create_buffer_init panics where the buffer is invalid (a lost device, a
        // refused allocation); that is a job's error, reported at its read-back.
        match buffer.slice(..).get_mapped_range_mut() {
            Ok(mut view) => {
                view.slice(..contents.len()).copy_from_slice(contents);
                drop(view);
                buffer.unmap();
            }
            Err(e) => {
                lock(&self.error).get_or_insert(format!("uploading {size} bytes: {e}"));
            }
        }
        buffer
    }
}
