//! The per-kernel profile (`SD_GPU_PROFILE=1`): GPU timestamps around every compute pass,
//! summed by kernel entry point.
//!
//! Each command encoder that records a pass takes a [`Batch`]: a query set of two
//! timestamps (begin, end) per pass, [`QUERIES_PER_BATCH`] in all, enough for the
//! [`PASSES_PER_SUBMIT`] passes an encoder holds at most. When the encoder is submitted the
//! batch's timestamps are resolved into a buffer and copied to a mappable one, which is
//! mapped once the GPU is done; [`Profiler::collect`] (called after every wait) adds the
//! mapped batches' pass times to the totals and keeps their query sets and buffers for
//! later encoders. Without the flag no `Profiler` exists and nothing here runs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::context::{lock, PASSES_PER_SUBMIT};

/// Timestamp queries per batch: a begin and an end for each pass of one encoder.
pub const QUERIES_PER_BATCH: u32 = 2 * PASSES_PER_SUBMIT as u32;

const QUERY_BYTES: u64 = wgpu::QUERY_SIZE as u64;

/// Whether the environment asks for a kernel profile: `SD_GPU_PROFILE=1` (read when a
/// device opens).
pub fn requested() -> bool {
    std::env::var("SD_GPU_PROFILE").is_ok_and(|v| v.trim() == "1")
}

/// The map of a batch's read-back buffer: not yet done, done, or failed.
const MAP_PENDING: u8 = 0;
const MAP_DONE: u8 = 1;
const MAP_FAILED: u8 = 2;

/// The timestamp queries of one command encoder's passes.
pub(crate) struct Batch {
    queries: wgpu::QuerySet,
    /// Where the queries are resolved (GPU-only).
    resolved: wgpu::Buffer,
    /// The resolved timestamps, copied where the host can map them.
    readback: wgpu::Buffer,
    /// The kernel of each pass, in order: pass `i` wrote queries `2i` and `2i + 1`.
    kernels: Vec<&'static str>,
    map: Arc<AtomicU8>,
}

#[derive(Default)]
struct Totals {
    /// Calls and nanoseconds by kernel entry point.
    by_kernel: HashMap<&'static str, (u64, f64)>,
}

#[derive(Default)]
struct State {
    /// Submitted batches whose read-back is mapped or being mapped, oldest first.
    in_flight: Vec<Batch>,
    /// Batches read back, for reuse.
    free: Vec<Batch>,
    totals: Totals,
}

pub(crate) struct Profiler {
    /// Nanoseconds per timestamp tick.
    period_ns: f64,
    state: Mutex<State>,
}

impl Profiler {
    pub fn new(queue: &wgpu::Queue) -> Self {
        Profiler {
            period_ns: queue.get_timestamp_period() as f64,
            state: Mutex::new(State::default()),
        }
    }

    pub fn period_ns(&self) -> f64 {
        self.period_ns
    }

    fn new_batch(device: &wgpu::Device) -> Batch {
        let bytes = QUERIES_PER_BATCH as u64 * QUERY_BYTES;
        Batch {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("kernel timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: QUERIES_PER_BATCH,
            }),
            resolved: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("kernel timestamps (resolved)"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            readback: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("kernel timestamps (read-back)"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            kernels: Vec::with_capacity(PASSES_PER_SUBMIT),
            map: Arc::new(AtomicU8::new(MAP_PENDING)),
        }
    }

    /// The timestamp writes of the next pass of the encoder whose batch is `slot` (taking
    /// a batch for it if it has none yet), which runs `kernel`. `None` if the batch is full,
    /// which an encoder submitted every [`PASSES_PER_SUBMIT`] passes never makes it.
    pub fn next_pass<'a>(
        &self,
        device: &wgpu::Device,
        slot: &'a mut Option<Batch>,
        kernel: &'static str,
    ) -> Option<wgpu::ComputePassTimestampWrites<'a>> {
        let batch = slot.get_or_insert_with(|| {
            lock(&self.state)
                .free
                .pop()
                .unwrap_or_else(|| Self::new_batch(device))
        });
        let first = 2 * batch.kernels.len() as u32;
        if first + 2 > QUERIES_PER_BATCH {
            debug_assert!(false, "more passes in one encoder than PASSES_PER_SUBMIT");
            return None;
        }
        batch.kernels.push(kernel);
        Some(wgpu::ComputePassTimestampWrites {
            query_set: &batch.queries,
            beginning_of_pass_write_index: Some(first),
            end_of_pass_write_index: Some(first + 1),
        })
    }

    /// Records the resolve of `batch`'s timestamps at the end of `encoder`, which is about to
    /// be submitted. Call [`Profiler::submitted`] with the batch once it has been.
    pub fn resolve(&self, encoder: &mut wgpu::CommandEncoder, batch: &Batch) {
        let queries = 2 * batch.kernels.len() as u32;
        if queries == 0 {
            return;
        }
        encoder.resolve_query_set(&batch.queries, 0..queries, &batch.resolved, 0);
        encoder.copy_buffer_to_buffer(
            &batch.resolved,
            0,
            &batch.readback,
            0,
            queries as u64 * QUERY_BYTES,
        );
    }

    /// Maps the read-back of a batch whose encoder was just submitted (done once the GPU is).
    pub fn submitted(&self, batch: Batch) {
        let mut state = lock(&self.state);
        if batch.kernels.is_empty() {
            state.free.push(batch);
            return;
        }
        batch.map.store(MAP_PENDING, Ordering::Release);
        let flag = batch.map.clone();
        let bytes = 2 * batch.kernels.len() as u64 * QUERY_BYTES;
        batch
            .readback
            .map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
                flag.store(
                    if r.is_ok() { MAP_DONE } else { MAP_FAILED },
                    Ordering::Release,
                );
            });
        state.in_flight.push(batch);
    }

    /// Adds the pass times of every batch whose read-back has been mapped (the device was
    /// polled since its submit finished) to the totals; with `discard`, drops them instead
    /// (after a GPU error, whose failed submit resolved nothing: its read-back would hold
    /// an earlier batch's times).
    pub fn collect(&self, discard: bool) {
        let mut state = lock(&self.state);
        let State {
            in_flight,
            free,
            totals,
        } = &mut *state;
        let mut i = 0;
        while i < in_flight.len() {
            let status = in_flight[i].map.load(Ordering::Acquire);
            if status == MAP_PENDING {
                i += 1;
                continue;
            }
            let mut batch = in_flight.remove(i);
            if status == MAP_DONE && discard {
                batch.readback.unmap();
            } else if status == MAP_DONE {
                let bytes = 2 * batch.kernels.len() as u64 * QUERY_BYTES;
                match batch.readback.get_mapped_range(0..bytes) {
                    Ok(view) => {
                        let tick = |i: usize| {
                            let bytes = &view[i * QUERY_BYTES as usize..][..8];
                            u64::from_le_bytes(bytes.try_into().expect("8 bytes"))
                        };
                        for (i, kernel) in batch.kernels.iter().enumerate() {
                            // Ticks can go backwards on some drivers: count it as zero.
                            let ticks = tick(2 * i + 1).saturating_sub(tick(2 * i));
                            let ns = ticks as f64 * self.period_ns;
                            let entry = totals.by_kernel.entry(kernel).or_default();
                            entry.0 += 1;
                            entry.1 += ns;
                        }
                    }
                    Err(e) => tracing::warn!("kernel profile: reading timestamps back: {e}"),
                }
                batch.readback.unmap();
            } else {
                tracing::warn!("kernel profile: a timestamp read-back failed to map");
            }
            batch.kernels.clear();
            free.push(batch);
        }
    }

    /// Calls and total GPU time by kernel entry point, the longest total first.
    pub fn profile(&self) -> Vec<(String, u64, Duration)> {
        let state = lock(&self.state);
        let mut rows: Vec<(String, u64, Duration)> = state
            .totals
            .by_kernel
            .iter()
            .map(|(name, &(calls, ns))| {
                (
                    name.to_string(),
                    calls,
                    Duration::from_nanos(ns.max(0.0).round() as u64),
                )
            })
            .collect();
        rows.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
        rows
    }

    /// Forgets the totals (passes still in flight are counted when they are read back).
    pub fn reset(&self) {
        lock(&self.state).totals = Totals::default();
    }
}

/// A profile as a table: kernel, calls, total milliseconds and share of the total, one
/// line each, with a header and a total line (no newline after it).
pub fn table(profile: &[(String, u64, Duration)]) -> String {
    let total: Duration = profile.iter().map(|r| r.2).sum();
    let calls: u64 = profile.iter().map(|r| r.1).sum();
    let total_s = total.as_secs_f64();
    let width = profile
        .iter()
        .map(|r| r.0.len())
        .chain([6])
        .max()
        .unwrap_or(6);
    let mut out = format!(
        "{:<width$} {:>9} {:>12} {:>7}\n",
        "kernel", "calls", "total ms", "share"
    );
    for (name, n, t) in profile {
        let share = if total_s > 0.0 {
            100.0 * t.as_secs_f64() / total_s
        } else {
            0.0
        };
        out += &format!(
            "{name:<width$} {n:>9} {:>12.3} {share:>6.1}%\n",
            t.as_secs_f64() * 1e3
        );
    }
    out += &format!(
        "{:<width$} {calls:>9} {:>12.3} {:>6.1}%",
        "(all)",
        total_s * 1e3,
        if total_s > 0.0 { 100.0 } else { 0.0 }
    );
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::table;
    use crate::backend::gpu::context::{adapters, GpuDevice};
    use crate::backend::gpu::test_device;
    use crate::tensor::{Device, Tensor};

    #[test]
    fn table_has_shares() {
        let rows = vec![
            ("conv2d".to_string(), 3, Duration::from_millis(3)),
            ("unary".to_string(), 10, Duration::from_millis(1)),
        ];
        let t = table(&rows);
        assert!(t.contains("conv2d"), "{t}");
        assert!(t.contains("75.0%"), "{t}");
        assert!(t.contains("25.0%"), "{t}");
        assert!(t.contains("(all)"), "{t}");
        assert!(table(&[]).contains("(all)"));
    }

    #[test]
    fn profiling_device_times_each_kernel() {
        // The adapter the other kernel tests use (and their rules for a missing one).
        let Some(_) = test_device() else { return };
        let adapter = adapters()
            .into_iter()
            .next()
            .expect("test_device found one");
        let name = adapter.get_info().name;
        let has_timestamps = adapter.features().contains(wgpu::Features::TIMESTAMP_QUERY);
        let gpu = GpuDevice::open(adapter, true).expect("opening a profiling device");
        assert_eq!(gpu.is_profiling(), has_timestamps);
        let device = Device::Gpu(gpu.clone());

        let x =
            Tensor::from_vec((0..64).map(|i| i as f32 * 0.1).collect(), &[8, 8], &device).unwrap();
        let y = x.silu().unwrap();
        let z = y.matmul(&x).unwrap();
        let z = z.silu().unwrap();
        assert_eq!(z.to_vec().unwrap().len(), 64);
        gpu.synchronize().unwrap();
        let profile = gpu.profile();

        if !has_timestamps {
            eprintln!("{name} has no TIMESTAMP_QUERY: the profile stays empty");
            assert!(profile.is_empty(), "{profile:?}");
            return;
        }
        eprintln!("{name}:\n{}", table(&profile));
        let find = |pred: &dyn Fn(&str) -> bool| profile.iter().find(|r| pred(&r.0)).cloned();
        let (_, silu_calls, _) = find(&|n| n == "unary").expect("silu (unary) in the profile");
        assert!(silu_calls >= 2, "{profile:?}");
        let (_, mm_calls, _) =
            find(&|n| n.starts_with("matmul")).expect("a matmul kernel in the profile");
        assert!(mm_calls >= 1, "{profile:?}");
        // Sorted by total time, longest first.
        assert!(profile.windows(2).all(|w| w[0].2 >= w[1].2), "{profile:?}");

        gpu.reset_profile();
        assert!(gpu.profile().is_empty());
        // Passes recorded after a reset are counted again.
        let again = x.silu().unwrap();
        gpu.synchronize().unwrap();
        drop(again);
        let profile = gpu.profile();
        assert_eq!(profile.len(), 1, "{profile:?}");
        assert_eq!((profile[0].0.as_str(), profile[0].1), ("unary", 1));
    }
}
