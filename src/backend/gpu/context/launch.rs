//! Launching kernels: pipelines and their layouts, parameter buffers and bind groups (both
//! cached), dispatches and their grids.

use std::collections::HashMap;

use super::{lock, GpuContext, Kernel};

/// A bind group's identity: the kernel and each binding's (buffer, offset, size).
#[derive(Clone, PartialEq, Eq, Hash)]
struct BindKey {
    kernel: Kernel,
    bindings: Vec<(wgpu::Buffer, u64, Option<u64>)>,
}

/// The most parameter blocks and bind groups kept; past it both caches start over (a
/// generation of a given size needs a few hundred of each, steady from step to step).
const MAX_CACHED: usize = 8192;

/// Parameter buffers by content and bind groups by their bindings: a denoising step
/// repeats the previous step's launches with the same shapes, and the buffer pool hands
/// out the same buffers in the same order, so after the first step nearly every launch
/// reuses both instead of creating them.
#[derive(Default)]
pub(super) struct BindCache {
    params: HashMap<Vec<u8>, wgpu::Buffer>,
    groups: HashMap<BindKey, wgpu::BindGroup>,
    pub(super) hits: u64,
    pub(super) misses: u64,
}

impl BindCache {
    pub(super) fn forget_groups(&mut self) {
        self.groups.clear();
    }
}

impl GpuContext {
    fn pipeline(&self, kernel: Kernel) -> (wgpu::ComputePipeline, wgpu::BindGroupLayout) {
        if let Some(p) = lock(&self.pipelines).get(&kernel) {
            return p.clone();
        }
        let module = {
            let mut modules = lock(&self.modules);
            modules
                .entry((kernel.file, kernel.f16_weights))
                .or_insert_with(|| {
                    debug_assert!(!kernel.f16_weights || self.f16, "an f16 kernel without f16");
                    let desc = wgpu::ShaderModuleDescriptor {
                        label: Some(kernel.file),
                        source: wgpu::ShaderSource::Wgsl(kernel.wgsl().into()),
                    };
                    // SAFETY: every kernel guards its own reads and writes against the sizes it
                    // is given (each shader file says how), so wgpu's inserted bounds checks
                    // would only cost time.
                    unsafe {
                        self.device.create_shader_module_trusted(
                            desc,
                            wgpu::ShaderRuntimeChecks::unchecked(),
                        )
                    }
                })
                .clone()
        };
        let constants: Vec<(&str, f64)> = kernel
            .constants()
            .map(|(name, value)| (name, value as f64))
            .collect();
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(kernel.entry),
                layout: None,
                module: &module,
                entry_point: Some(kernel.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    ..Default::default()
                },
                cache: None,
            });
        // Two threads may both miss and both create the kernel's pipeline. The first one
        // stored is the one everybody uses: a bind group made from one pipeline's layout is
        // refused with another's ("exclusive pipelines don't match"), and bind groups are
        // cached by kernel, so a second pipeline stored over the first would meet groups
        // made for the first (seen in CI: group norm's tests failing when run in parallel).
        lock(&self.pipelines)
            .entry(kernel)
            .or_insert_with(|| {
                let layout = pipeline.get_bind_group_layout(0);
                (pipeline, layout)
            })
            .clone()
    }

    /// Records one compute pass: `kernel` with its parameter block at binding 0 and
    /// `buffers` at bindings 1, 2, ... (each a whole buffer or a window of one).
    pub fn dispatch(
        &self,
        kernel: Kernel,
        params: &[u8],
        buffers: &[wgpu::BindingResource<'_>],
        groups: [u32; 3],
    ) {
        #[cfg(test)]
        if dispatch_log::note(kernel) {
            return;
        }
        self.launches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.dry_run.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let (pipeline, layout) = self.pipeline(kernel);
        let bind_group = self.bind_group(kernel, &layout, params, buffers);
        self.record_pass(Some(kernel.entry), |encoder, timestamp_writes| {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(kernel.entry),
                timestamp_writes,
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        });
    }

    /// The bind group of `params` (binding 0) and `buffers` (1, 2, ...) for `kernel`: from
    /// the cache, or made and kept.
    fn bind_group(
        &self,
        kernel: Kernel,
        layout: &wgpu::BindGroupLayout,
        params: &[u8],
        buffers: &[wgpu::BindingResource<'_>],
    ) -> wgpu::BindGroup {
        let mut cache = lock(&self.binds);
        if cache.params.len() >= MAX_CACHED || cache.groups.len() >= MAX_CACHED {
            cache.params.clear();
            cache.groups.clear();
        }
        let params_buffer = match cache.params.get(params) {
            Some(b) => b.clone(),
            None => {
                let b = self.upload(params);
                cache.params.insert(params.to_vec(), b.clone());
                b
            }
        };
        let mut bindings = Vec::with_capacity(buffers.len() + 1);
        bindings.push((params_buffer, 0, None));
        for resource in buffers {
            match resource {
                wgpu::BindingResource::Buffer(b) => {
                    bindings.push((b.buffer.clone(), b.offset, b.size.map(|s| s.get())))
                }
                _ => unreachable!("kernels bind only storage buffers"),
            }
        }
        let key = BindKey { kernel, bindings };
        if let Some(group) = cache.groups.get(&key) {
            let group = group.clone();
            cache.hits += 1;
            return group;
        }
        cache.misses += 1;
        let entries: Vec<wgpu::BindGroupEntry> = key
            .bindings
            .iter()
            .enumerate()
            .map(|(i, (buffer, offset, size))| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer,
                    offset: *offset,
                    size: size.and_then(std::num::NonZeroU64::new),
                }),
            })
            .collect();
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout,
            entries: &entries,
        });
        cache.groups.insert(key, group.clone());
        group
    }

    /// Workgroup counts covering `items` with `per_group` each, spread over x and y so no
    /// dimension exceeds the adapter's limit. Kernels recover the flat index as
    /// `(wid.y * num_workgroups.x + wid.x) * per_group + lid.x` and skip indices past the end.
    pub fn groups_1d(&self, items: usize, per_group: u32) -> [u32; 3] {
        let groups = items.div_ceil(per_group as usize).max(1) as u64;
        let max = self.limits.max_compute_workgroups_per_dimension.max(1) as u64;
        let x = groups.min(max);
        let y = groups.div_ceil(x);
        [x as u32, y as u32, 1]
    }
}

/// A test hook (`tensor::testing::assert_ops_agree`): which kernels an op launches, and
/// which it would launch on another device without running them there, so a check under
/// a second tuning runs only where that tuning picks other kernels.
#[cfg(test)]
pub(crate) mod dispatch_log {
    use std::cell::RefCell;

    use super::Kernel;

    thread_local! {
        /// The kernels dispatched on this thread while a log is open, and whether they are
        /// only logged (`dry`).
        static LOG: RefCell<Option<(Vec<Kernel>, bool)>> = const { RefCell::new(None) };
    }

    /// Runs `f` with this thread's dispatches logged (and, with `dry`, not recorded or run:
    /// `f`'s results are then garbage); returns its result and the kernels in launch order.
    pub(crate) fn logged<R>(dry: bool, f: impl FnOnce() -> R) -> (R, Vec<Kernel>) {
        LOG.with(|log| *log.borrow_mut() = Some((Vec::new(), dry)));
        let result = f();
        let (kernels, _) = LOG
            .with(|log| log.borrow_mut().take())
            .expect("the log opened above");
        (result, kernels)
    }

    /// Logs `kernel` if a log is open; true when the dispatch is to be skipped (dry).
    pub(super) fn note(kernel: super::Kernel) -> bool {
        LOG.with(|log| match &mut *log.borrow_mut() {
            Some((kernels, dry)) => {
                kernels.push(kernel);
                *dry
            }
            None => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::tensor::testing::random;
    use crate::tensor::{Device, Tensor};

    /// The same work three times, as consecutive denoising steps do: once the buffer pool
    /// has settled (the first round allocates, the second reuses what the first freed), a
    /// round makes no bind group (every launch finds its own in the cache) and gives the
    /// same values.
    #[test]
    fn a_repeated_step_reuses_every_bind_group() {
        let Some(shared) = crate::backend::gpu::test_device() else {
            return;
        };
        // A device of its own, so other tests' launches do not count.
        let gpu = crate::backend::gpu::GpuDevice::new(Some(&shared.name())).unwrap();
        let device = Device::Gpu(gpu.clone());
        let up = |t: Tensor| t.to_device(&device).unwrap();
        let weight = up(random(&[8, 8, 3, 3], 1));
        let (gamma, beta) = (up(random(&[8], 2)), up(random(&[8], 3)));
        let step = |x: &Tensor| -> Vec<f32> {
            let h = x.conv2d(&weight, None, 1, 1).unwrap();
            let h = h.group_norm(4, &gamma, &beta, 1e-5, true).unwrap();
            let h = h.add(x).unwrap().reshape(&[2, 8, 36]).unwrap();
            let h = h.matmul_t(&h).unwrap().softmax().unwrap();
            h.to_vec().unwrap()
        };
        let x = up(random(&[2, 8, 6, 6], 4));
        let first = step(&x);
        step(&x);
        let (_, made) = gpu.bind_group_reuse();
        let second = step(&x);
        let (reused, made_after) = gpu.bind_group_reuse();
        assert_eq!(first, second);
        assert_eq!(made_after, made, "the third round made bind groups");
        assert!(reused >= made, "{reused} reused, {made} made");
    }

    /// Threads launching a kernel for the first time at once all get one pipeline: the
    /// cached bind groups are made from its layout, which no other pipeline accepts.
    #[test]
    fn threads_meeting_a_new_kernel_at_once_share_one_pipeline() {
        let Some(shared) = crate::backend::gpu::test_device() else {
            return;
        };
        // A device of its own, so the kernel is new to it.
        let gpu = crate::backend::gpu::GpuDevice::new(Some(&shared.name())).unwrap();
        let kernel = crate::backend::gpu::kernels()[0];
        let threads = 8;
        let start = std::sync::Barrier::new(threads);
        let pipelines: Vec<wgpu::ComputePipeline> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        start.wait();
                        gpu.0.pipeline(kernel).0
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a thread creating a pipeline panicked"))
                .collect()
        });
        let stored = gpu.0.pipeline(kernel).0;
        assert!(pipelines.iter().all(|p| *p == stored));
    }
}
