//! The pending command encoder: recording passes, submitting, waiting, errors reported by
//! wgpu, and read-backs.

use super::{lock, GpuContext};
use crate::backend::gpu::profile::Batch;
use crate::error::{Error, Result};

/// Passes recorded before the encoder is submitted: few submits per step, but not one
/// unbounded command buffer.
pub const PASSES_PER_SUBMIT: usize = 256;

/// The encoder being recorded, and its passes so far.
#[derive(Default)]
pub(super) struct Pending {
    encoder: Option<wgpu::CommandEncoder>,
    passes: usize,
    /// The timestamp queries of the encoder's passes (only when profiling).
    timestamps: Option<Batch>,
}

impl GpuContext {
    /// The error wgpu reported since the last check, if any.
    /// After an error, the work recorded but not yet submitted belongs to the failed job
    /// (and may reference its invalid buffers): it is dropped so the next job starts clean.
    pub fn take_error(&self) -> Result<()> {
        if lock(&self.error).is_some() {
            // A lost device shows first as errors of the work on it; let wgpu run the
            // device-lost callback so that the job's error says so.
            let _ = self.device.poll(wgpu::PollType::Poll);
        }
        if let Some(why) = lock(&self.lost).clone() {
            lock(&self.error).take();
            let mut pending = lock(&self.pending);
            pending.encoder = None;
            pending.passes = 0;
            pending.timestamps = None;
            return Err(Error::Gpu(format!(
                "the GPU device {} was lost ({why}); the model must be loaded again",
                self.info.name
            )));
        }
        let error = lock(&self.error).take();
        match error {
            Some(e) => {
                let mut pending = lock(&self.pending);
                pending.encoder = None;
                pending.passes = 0;
                // The dropped passes' timestamps were never written.
                pending.timestamps = None;
                Err(Error::Gpu(e))
            }
            None => Ok(()),
        }
    }

    /// Submits the pending encoder.
    pub fn flush(&self) {
        self.submit(&mut lock(&self.pending));
    }

    /// Submits `pending`'s encoder, if any, with the resolve of its passes' timestamps.
    fn submit(&self, pending: &mut Pending) {
        if let Some(mut encoder) = pending.encoder.take() {
            let timestamps = pending.timestamps.take();
            if let (Some(profiler), Some(batch)) = (&self.profiler, &timestamps) {
                profiler.resolve(&mut encoder, batch);
            }
            self.queue.submit([encoder.finish()]);
            if let (Some(profiler), Some(batch)) = (&self.profiler, timestamps) {
                profiler.submitted(batch);
            }
        }
        pending.passes = 0;
    }

    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
        if let Some(p) = &self.profiler {
            let failed = lock(&self.error).is_some();
            p.collect(failed);
        }
        self.take_error()
    }

    /// Records work into the pending encoder, submitting when enough has piled up.
    pub fn record(&self, f: impl FnOnce(&mut wgpu::CommandEncoder)) {
        self.record_pass(None, |encoder, _| f(encoder));
    }

    /// Records work into the pending encoder like [`GpuContext::record`]; when profiling and
    /// `kernel` is given, `f` also gets the timestamp writes of the compute pass it records
    /// (exactly one) for that kernel.
    pub(super) fn record_pass(
        &self,
        kernel: Option<&'static str>,
        f: impl FnOnce(&mut wgpu::CommandEncoder, Option<wgpu::ComputePassTimestampWrites<'_>>),
    ) {
        let mut guard = lock(&self.pending);
        let pending = &mut *guard;
        let encoder = pending.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
        });
        let timestamp_writes = match (&self.profiler, kernel) {
            (Some(p), Some(kernel)) => p.next_pass(&self.device, &mut pending.timestamps, kernel),
            _ => None,
        };
        f(encoder, timestamp_writes);
        pending.passes += 1;
        if pending.passes >= PASSES_PER_SUBMIT {
            self.submit(pending);
        }
    }

    /// Reads a buffer's first `bytes` bytes back (submitting and waiting).
    pub fn read(&self, buffer: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        let size = bytes.max(4).next_multiple_of(4);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.record(|encoder| encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, size));
        self.flush();
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|_| Error::Gpu("the read-back was dropped".into()))?
            .map_err(|e| Error::Gpu(format!("reading a buffer back: {e}")))?;
        let data = staging
            .get_mapped_range(..)
            .map_err(|e| Error::Gpu(format!("reading a buffer back: {e}")))?
            .to_vec();
        staging.unmap();
        Ok(data[..bytes as usize].to_vec())
    }
}
