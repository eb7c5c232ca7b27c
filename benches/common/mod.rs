//! What both benches share: the architectures they build with random weights, and what
//! they report besides time.

use std::path::{Path, PathBuf};

use sd_wgpu::model::config::{read_json, ClipTextConfig, ComponentConfig, UNetConfig, VaeConfig};
use sd_wgpu::{Error, Result};

/// The model families the benches build at full size with random weights, from the real
/// configs: those sd-wgpu's single-file presets keep (`src/model/presets/<preset>/`), the
/// same files tools/bench_vs_pytorch.py builds PyTorch's random folders from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// stable-diffusion-v1-5: one CLIP ViT-L encoder, 512x512 (64x64 latents).
    Sd15,
    /// stable-diffusion-xl-base-1.0: CLIP ViT-L and OpenCLIP bigG, the text_time UNet,
    /// 1024x1024 (128x128 latents).
    Sdxl,
}

/// The configs of one architecture's components.
pub struct Configs {
    /// One (SD 1.5) or two (SDXL) text encoders, in pipeline order.
    #[allow(dead_code)] // the GPU bench times no text encoder
    pub text_encoders: Vec<ClipTextConfig>,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
}

impl Arch {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "sd15" | "sd1.5" => Ok(Arch::Sd15),
            "sdxl" => Ok(Arch::Sdxl),
            other => Err(Error::InvalidArgument(format!(
                "--arch: `{other}` is not one of sd15, sdxl"
            ))),
        }
    }

    /// As the tables print it.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Sd15 => "SD 1.5",
            Arch::Sdxl => "SDXL",
        }
    }

    /// The preset folder with its configs.
    fn preset(self) -> &'static str {
        match self {
            Arch::Sd15 => "sd15",
            Arch::Sdxl => "sdxl_base",
        }
    }

    /// The tests' tiny random model of this family (`--tiny`), under tests/fixtures/models.
    pub fn tiny_fixture(self) -> &'static str {
        match self {
            Arch::Sd15 => "sd1",
            Arch::Sdxl => "sdxl",
        }
    }

    /// The components' configs, read and checked as a model folder's are.
    pub fn configs(self) -> Result<Configs> {
        let dir = source_path("src/model/presets").join(self.preset());
        fn read<T: ComponentConfig>(dir: &Path, component: &str) -> Result<T> {
            let path = dir.join(component).join("config.json");
            let config: T = read_json(&path)?;
            config.validate(&path)?;
            Ok(config)
        }
        let text_encoders = ["text_encoder", "text_encoder_2"]
            .into_iter()
            .filter(|c| dir.join(c).join("config.json").is_file())
            .map(|c| read(&dir, c))
            .collect::<Result<Vec<_>>>()?;
        if text_encoders.is_empty() {
            return Err(Error::Other(format!(
                "{}: no text_encoder/config.json (run from the repository root)",
                dir.display()
            )));
        }
        Ok(Configs {
            text_encoders,
            unet: read(&dir, "unet")?,
            vae: read(&dir, "vae")?,
        })
    }
}

/// A path of the repository: under the working directory (a copied checkout, as
/// tools/gpu_bench.sh runs), else under the source tree the bench was built from.
pub fn source_path(relative: &str) -> PathBuf {
    let here = Path::new(relative);
    if here.exists() {
        here.to_path_buf()
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
    }
}

/// The process's peak resident memory (VmHWM), in MiB, where /proc has it.
pub fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// [`peak_memory_mib`] as text: "1234 MiB", or "n/a".
pub fn peak_text() -> String {
    peak_memory_mib()
        .map(|m| format!("{m:.0} MiB"))
        .unwrap_or_else(|| "n/a".into())
}
