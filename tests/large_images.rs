//! A VAE decode whose activations exceed one storage binding (128 MiB on llvmpipe, and
//! WebGPU's default): the GPU backend splits those tensors into windows and must still
//! match the CPU backend. The VAE is tiny but has the real factor-8-style layout (six
//! levels, factor 32) so its mid-block attention stays small while the last levels are
//! large.

use std::path::Path;

use sd_wgpu::model::config::VaeConfig;
use sd_wgpu::model::vae::{BandPolicy, VaeDecoder};
use sd_wgpu::model::weights::Weights;
use sd_wgpu::pipeline::noise::TorchRng;
use sd_wgpu::tensor::Device;

mod common;
use common::assert_close;

#[test]
fn a_decode_with_activations_over_one_storage_binding_matches_the_cpu() {
    let devices = common::devices();
    let Some((_, gpu)) = devices.iter().find(|(name, _)| name == "gpu") else {
        return; // common::devices() said loudly why there is no GPU run.
    };
    // The second level's 16 channels reach full resolution before the last block:
    // 16 x 1536 x 1536 f32 = 151 MB.
    let config = VaeConfig {
        block_out_channels: vec![8, 16, 8, 8, 8, 8],
        up_block_types: vec!["UpDecoderBlock2D".into(); 6],
        layers_per_block: 1,
        norm_num_groups: 8,
        ..VaeConfig::default()
    };
    let (side, factor) = (1536, config.downscale_factor());
    assert!(
        16 * side * side * 4 > 128 << 20,
        "the test must cross the 128 MiB binding limit"
    );
    let latents = TorchRng::new(3)
        .randn_tensor(&[1, 4, side / factor, side / factor], &Device::Cpu)
        .unwrap();
    let decode = |device: &Device| {
        let weights = Weights::random(7, device);
        let vae = VaeDecoder::new(&config, &weights, Path::new("large-vae")).unwrap();
        vae.decode(&latents.to_device(device).unwrap()).unwrap()
    };
    let expected = decode(&Device::Cpu);
    let got = decode(gpu);
    assert_eq!(got.shape(), [1, 3, side, side]);
    let expected: Vec<f64> = expected
        .to_vec()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    assert_close(
        "1536x1536 VAE decode, GPU vs CPU",
        &got.to_vec().unwrap(),
        &expected,
        1e-4,
    );
}

/// A decode whose up blocks would need buffers over the device's largest allocation (here
/// a limit far below the adapter's, so the test stays small) runs in row bands and gives
/// the image of a whole decode, on every device; one that cannot fit even one latent row
/// per band is a clear error.
#[test]
fn a_decode_over_the_largest_buffer_runs_in_row_bands_with_the_same_image() {
    let config = VaeConfig {
        block_out_channels: vec![8, 16, 16],
        up_block_types: vec!["UpDecoderBlock2D".into(); 3],
        layers_per_block: 1,
        norm_num_groups: 4,
        ..VaeConfig::default()
    };
    let latents = TorchRng::new(5)
        .randn_tensor(&[1, 4, 23, 17], &Device::Cpu)
        .unwrap();
    let reference = {
        let vae =
            VaeDecoder::new(&config, &Weights::random(9, &Device::Cpu), Path::new("vae")).unwrap();
        vae.decode_within(&latents, None).unwrap()
    };
    let expected: Vec<f64> = reference
        .to_vec()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    // The largest map is 16 channels at 4x: 16 * 92 * 68 * 4 bytes = 400 KB; the first
    // block's is 16 channels at 2x, 100 KB. A buffer limit of 150 KB (75 KB per band) takes
    // 6 bands of 3 or 4 latent rows from the first block on; one of 300 KB, 3 bands from
    // the second block on (the first runs whole). The memory policies band from the second
    // block: in 14 bands of 30 KB, and (a latent row being 17 KB) in 23 bands of one row.
    let policies = [
        BandPolicy::within_buffer(150_000),
        BandPolicy::within_buffer(300_000),
        BandPolicy {
            band_maps_over: 150_000,
            band_bytes: 30_000,
            strict: false,
        },
        BandPolicy {
            band_maps_over: 150_000,
            band_bytes: 10_000,
            strict: false,
        },
    ];
    for (name, device) in common::devices() {
        let vae = VaeDecoder::new(&config, &Weights::random(9, &device), Path::new("vae")).unwrap();
        for policy in policies {
            let got = vae
                .decode_within(&latents.to_device(&device).unwrap(), Some(policy))
                .unwrap();
            assert_eq!(got.shape(), [1, 3, 92, 68]);
            assert_close(
                &format!("decode in row bands under {policy:?} on {name}"),
                &got.to_vec().unwrap(),
                &expected,
                1e-4,
            );
        }
        let err = vae
            .decode_within(
                &latents.to_device(&device).unwrap(),
                Some(BandPolicy::within_buffer(20_000)),
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("largest buffer") && err.contains("smaller image"),
            "{err}"
        );
    }
}

/// A one-shot pass run as the pipeline runs the VAE (`Device::without_buffer_reuse`) gives
/// the same image, holds no more device memory at its peak than with the pool keeping
/// every freed buffer (less, as the levels change size), and leaves nothing pooled and
/// nothing of its own in use.
#[test]
fn a_decode_without_buffer_reuse_gives_the_same_image_in_less_memory() {
    let devices = common::devices();
    let Some((_, Device::Gpu(shared))) = devices.iter().find(|(name, _)| name == "gpu") else {
        return; // common::devices() said loudly why there is no GPU run.
    };
    // A device of its own, so that other tests' tensors do not count.
    let gpu = sd_wgpu::backend::gpu::GpuDevice::new(Some(&shared.name())).unwrap();
    let device = Device::Gpu(gpu.clone());
    let config = VaeConfig {
        block_out_channels: vec![8, 16, 16, 8],
        up_block_types: vec!["UpDecoderBlock2D".into(); 4],
        layers_per_block: 1,
        norm_num_groups: 8,
        ..VaeConfig::default()
    };
    let vae = VaeDecoder::new(&config, &Weights::random(5, &device), Path::new("vae")).unwrap();
    let latents = TorchRng::new(4)
        .randn_tensor(&[1, 4, 32, 32], &device)
        .unwrap();
    let held = gpu.memory().in_use;
    let decode = |reuse: bool| {
        gpu.reset_memory_peak();
        // Read back inside the pass, as the pipeline does: a tensor that outlives it goes
        // to the pool when dropped.
        let run = || vae.decode(&latents).and_then(|t| t.to_vec());
        let image = if reuse {
            run()
        } else {
            device.without_buffer_reuse(run)
        }
        .unwrap();
        (image, gpu.memory().peak)
    };
    let (pooled_image, pooled_peak) = decode(true);
    gpu.release_idle_memory();
    let (image, peak) = decode(false);
    assert_eq!(image, pooled_image);
    assert!(
        peak < pooled_peak,
        "peak {peak} bytes without reuse, {pooled_peak} with"
    );
    let after = gpu.memory();
    assert_eq!((after.in_use, after.pooled), (held, 0));
}
