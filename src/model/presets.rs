//! Built-in model configs for single-file checkpoints, which carry weights only: the
//! diffusers configs of the Hugging Face repositories the original checkpoints belong to,
//! as files under `src/model/presets/<name>/` in the diffusers folder layout (so a preset
//! folder is also a valid `--model-config` folder, and diffusers' `config=` folder when
//! the tokenizer's `vocab.json` and `merges.txt` from `presets/clip_tokenizer/` are added).

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::model::folder::Component;
use crate::model::tokenizer::ClipTokenizer;

/// One built-in pipeline config.
#[derive(Debug)]
pub struct Preset {
    /// What `--model-config` accepts for it.
    pub name: &'static str,
    /// The repository the values come from.
    pub repo: &'static str,
    pub description: &'static str,
    unet: &'static str,
    vae: &'static str,
    text_encoder: &'static str,
    scheduler: &'static str,
    tokenizer_config: &'static str,
    special_tokens_map: &'static str,
}

macro_rules! preset {
    ($name:literal, $dir:literal, $repo:literal, $description:literal) => {
        Preset {
            name: $name,
            repo: $repo,
            description: $description,
            unet: include_str!(concat!("presets/", $dir, "/unet/config.json")),
            vae: include_str!(concat!("presets/", $dir, "/vae/config.json")),
            text_encoder: include_str!(concat!("presets/", $dir, "/text_encoder/config.json")),
            scheduler: include_str!(concat!(
                "presets/",
                $dir,
                "/scheduler/scheduler_config.json"
            )),
            tokenizer_config: include_str!(concat!(
                "presets/",
                $dir,
                "/tokenizer/tokenizer_config.json"
            )),
            special_tokens_map: include_str!(concat!(
                "presets/",
                $dir,
                "/tokenizer/special_tokens_map.json"
            )),
        }
    };
}

pub static SD15: Preset = preset!(
    "sd1.5",
    "sd15",
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "SD 1.5 (512x512, epsilon, PNDM)"
);
pub static SD21_BASE: Preset = preset!(
    "sd2.1-base",
    "sd21_base",
    "stabilityai/stable-diffusion-2-1-base",
    "SD 2.1-base (512x512, epsilon, PNDM)"
);
pub static SD21: Preset = preset!(
    "sd2.1",
    "sd21",
    "stabilityai/stable-diffusion-2-1",
    "SD 2.1 (768x768, v_prediction, DDIM)"
);

pub static ALL: [&Preset; 3] = [&SD15, &SD21_BASE, &SD21];

impl Preset {
    /// The preset called `name` (`sd1.5`, `sd2.1-base`, `sd2.1`).
    pub fn by_name(name: &str) -> Option<&'static Preset> {
        ALL.iter().copied().find(|p| p.name == name)
    }

    pub fn names() -> String {
        ALL.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
    }

    /// A component's config JSON (the scheduler's `scheduler_config.json`).
    pub fn config_text(&self, c: Component) -> Result<&'static str> {
        match c {
            Component::Unet => Ok(self.unet),
            Component::Vae => Ok(self.vae),
            Component::TextEncoder => Ok(self.text_encoder),
            Component::Scheduler => Ok(self.scheduler),
            Component::Tokenizer | Component::Tokenizer2 => Err(Error::Other(
                "the tokenizer has no config.json; use Preset::tokenizer".into(),
            )),
            Component::TextEncoder2 => Err(Error::Other(format!(
                "preset {} has one text encoder",
                self.name
            ))),
        }
    }

    /// Where a component's config comes from, for errors and logs:
    /// `<built-in preset sd1.5>/unet/config.json`.
    pub fn config_path(&self, c: Component) -> PathBuf {
        let file = match c {
            Component::Scheduler => "scheduler_config.json",
            _ => "config.json",
        };
        PathBuf::from(format!("<built-in preset {}>", self.name))
            .join(c.dir_name())
            .join(file)
    }

    /// The built-in CLIP BPE files with this model's special tokens.
    pub fn tokenizer(&self) -> Result<ClipTokenizer> {
        ClipTokenizer::builtin(
            self.tokenizer_config,
            self.special_tokens_map,
            &format!("<built-in preset {}>/tokenizer", self.name),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{ClipTextConfig, ComponentConfig, UNetConfig, VaeConfig};

    fn parse_valid<T: ComponentConfig>(p: &Preset, c: Component) {
        let config: T = serde_json::from_str(p.config_text(c).unwrap()).unwrap();
        config.validate(&p.config_path(c)).unwrap();
    }

    #[test]
    fn presets_parse_validate_and_tokenize() {
        for p in ALL {
            parse_valid::<UNetConfig>(p, Component::Unet);
            parse_valid::<VaeConfig>(p, Component::Vae);
            parse_valid::<ClipTextConfig>(p, Component::TextEncoder);
            let t = p.tokenizer().unwrap();
            let ids = t.encode("a photo of a cat").unwrap().ids;
            assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
            let pad = if p.name == "sd1.5" { 49407 } else { 0 };
            assert_eq!(ids[7], pad, "{}", p.name);
        }
    }
}
