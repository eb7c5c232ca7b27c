//! The buffer pool (kernel outputs, reused by size), uploads, and the account of the
//! device memory tensors hold.

use super::{lock, GpuContext};

/// Device memory in tensors' buffers, in bytes: the backend's own account (wgpu has no
/// portable query of a device's memory). Weights, inputs and kernel outputs are counted;
/// parameter blocks, index maps and read-back staging buffers (kilobytes to a few
/// megabytes, short-lived or shared) are not, nor the driver's own allocations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GpuMemory {
    /// Held by tensors now: weights, inputs, kernel outputs still referenced.
    pub in_use: u64,
    /// Idle kernel-output buffers the pool keeps for reuse.
    pub pooled: u64,
    /// The most `in_use + pooled` (what the device held for this process at once) since
    /// the device opened or the last [`super::GpuDevice::reset_memory_peak`].
    pub peak: u64,
}

impl GpuMemory {
    fn take(&mut self, bytes: u64, from_pool: bool) {
        if from_pool {
            self.pooled -= bytes;
        }
        self.in_use += bytes;
        self.peak = self.peak.max(self.in_use + self.pooled);
    }
}

impl GpuContext {
    /// A kernel-output buffer of `bytes` bytes, from the pool when one is free.
    pub fn alloc(&self, bytes: u64) -> wgpu::Buffer {
        let bytes = bytes.max(4);
        let pooled = lock(&self.pool)
            .get_mut(&bytes)
            .and_then(std::collections::BTreeSet::pop_first);
        lock(&self.memory).take(bytes, pooled.is_some());
        if let Some(b) = pooled {
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
        let mut memory = lock(&self.memory);
        memory.in_use -= buffer.size();
        if buffer.size() > self.limits.max_buffer_size {
            return; // Its creation failed (and was reported); never hand it out again.
        }
        if !self.keep_freed.load(std::sync::atomic::Ordering::Relaxed) {
            return; // Freed once the work recorded with it is done.
        }
        memory.pooled += buffer.size();
        lock(&self.pool)
            .entry(buffer.size())
            .or_default()
            .insert(buffer);
    }

    /// Whether buffers tensors let go of are kept for reuse (see
    /// [`super::GpuDevice::without_buffer_reuse`]).
    pub fn keep_freed(&self, keep: bool) {
        self.keep_freed
            .store(keep, std::sync::atomic::Ordering::Relaxed);
    }

    /// Frees the pool's idle buffers, and the cached bind groups that would keep them
    /// alive. The next launches make their buffers and bind groups again, so this is for
    /// between stages whose tensors differ in size (the UNet's and the VAE's), not between
    /// denoising steps.
    pub fn release_pool(&self) {
        let idle = std::mem::take(&mut *lock(&self.pool));
        lock(&self.binds).forget_groups();
        lock(&self.memory).pooled = 0;
        drop(idle);
    }

    /// A tensor's buffer holding `data` (an upload that the account counts until
    /// [`Self::release_upload`]).
    pub fn upload_tensor(&self, data: &[u8]) -> wgpu::Buffer {
        let buffer = self.upload(data);
        lock(&self.memory).take(buffer.size(), false);
        buffer
    }

    /// A tensor's uploaded buffer is being dropped.
    pub fn release_upload(&self, buffer: &wgpu::Buffer) {
        lock(&self.memory).in_use -= buffer.size();
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

#[cfg(test)]
mod tests {
    use crate::backend::gpu::{test_device, GpuDevice};
    use crate::tensor::testing::random;
    use crate::tensor::{Device, Tensor};

    /// A few ops whose outputs are dropped as they go, as a model's are.
    fn work(device: &Device) -> Tensor {
        let x = random(&[4, 64], 1).to_device(device).unwrap();
        let w = random(&[32, 64], 2).to_device(device).unwrap();
        let h = x.linear(&w, None).unwrap().silu().unwrap();
        h.add(&h).unwrap()
    }

    /// The account follows the tensors: uploads and outputs are in use while held, an
    /// output dropped is pooled, releasing the pool frees it, and the peak is the most
    /// held at once.
    #[test]
    fn the_account_follows_tensors_and_the_pool() {
        let Some(shared) = test_device() else { return };
        // A device of its own, so other tests' tensors do not count.
        let gpu = GpuDevice::new(Some(&shared.name())).unwrap();
        let device = Device::Gpu(gpu.clone());
        assert_eq!(gpu.memory().in_use + gpu.memory().pooled, 0);
        let x = random(&[1000], 3).to_device(&device).unwrap();
        assert_eq!(gpu.memory().in_use, 4000);
        let y = x.silu().unwrap();
        assert_eq!(gpu.memory().in_use, 8000);
        drop(y);
        let m = gpu.memory();
        assert_eq!((m.in_use, m.pooled, m.peak), (4000, 4000, 8000));
        // The pooled buffer is handed out again, not made anew.
        let y = x.silu().unwrap();
        assert_eq!((gpu.memory().in_use, gpu.memory().pooled), (8000, 0));
        drop(y);
        gpu.release_idle_memory();
        assert_eq!((gpu.memory().in_use, gpu.memory().pooled), (4000, 0));
        drop(x);
        assert_eq!(gpu.memory().in_use, 0);
        gpu.reset_memory_peak();
        assert_eq!(gpu.memory().peak, 0);
        let out = work(&device).to_vec().unwrap();
        assert!(out.iter().all(|v| v.is_finite()));
        assert!(gpu.memory().peak > 0 && gpu.memory().in_use == 0);
    }

    /// A dry run (no kernel recorded) allocates exactly what a real run does, which is what
    /// the bench's `--memory-only` reports.
    #[test]
    fn a_dry_run_allocates_as_a_real_one() {
        let Some(shared) = test_device() else { return };
        let run = |dry: bool| {
            let gpu = GpuDevice::new(Some(&shared.name())).unwrap();
            gpu.set_dry_run(dry);
            let before = gpu.launches();
            let out = work(&Device::Gpu(gpu.clone()));
            gpu.synchronize().unwrap();
            let held = gpu.memory();
            drop(out);
            (held, gpu.memory(), gpu.launches() - before)
        };
        let real = run(false);
        let dry = run(true);
        assert_eq!(real, dry);
        assert!(real.2 >= 3, "{} launches", real.2);
    }
}
