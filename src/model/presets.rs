//! Built-in model configs for single-file checkpoints, which carry weights only: the
//! diffusers configs of the Hugging Face repositories the original checkpoints belong to,
//! as files under `src/model/presets/<name>/` in the diffusers folder layout (so a preset
//! folder is also a valid `--model-config` folder, and diffusers' `config=` folder when
//! the tokenizers' `vocab.json` and `merges.txt` from `presets/clip_tokenizer/` are added).
//! SDXL presets also have `text_encoder_2/` and `tokenizer_2/`.

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
    tokenizer: TokenizerFiles,
    /// SDXL's second text encoder (`text_encoder_2/config.json`) and its tokenizer.
    text_encoder_2: Option<(&'static str, TokenizerFiles)>,
}

/// A tokenizer's own files; the BPE files are `clip_tokenizer/`'s.
#[derive(Debug)]
struct TokenizerFiles {
    /// `tokenizer` or `tokenizer_2`, for errors.
    dir: &'static str,
    tokenizer_config: &'static str,
    special_tokens_map: &'static str,
}

/// A preset file's text: `preset_file!("sd15", "unet/config.json")`, the path after the
/// preset's folder given in pieces.
macro_rules! preset_file {
    ($dir:literal, $($file:literal),+) => {
        include_str!(concat!("presets/", $dir, "/", $($file),+))
    };
}

macro_rules! tokenizer_files {
    ($dir:literal, $tokenizer:literal) => {
        TokenizerFiles {
            dir: $tokenizer,
            tokenizer_config: preset_file!($dir, $tokenizer, "/tokenizer_config.json"),
            special_tokens_map: preset_file!($dir, $tokenizer, "/special_tokens_map.json"),
        }
    };
}

/// `preset!(name, dir, repo, description)`, and `..., description, text_encoder_2)` for a
/// pipeline with SDXL's second text encoder and tokenizer.
macro_rules! preset {
    ($name:literal, $dir:literal, $repo:literal, $description:literal $(, $second:ident)?) => {
        Preset {
            name: $name,
            repo: $repo,
            description: $description,
            unet: preset_file!($dir, "unet/config.json"),
            vae: preset_file!($dir, "vae/config.json"),
            text_encoder: preset_file!($dir, "text_encoder/config.json"),
            scheduler: preset_file!($dir, "scheduler/scheduler_config.json"),
            tokenizer: tokenizer_files!($dir, "tokenizer"),
            text_encoder_2: preset!(@second [$($second)?] $dir),
        }
    };
    (@second [] $dir:literal) => {
        None
    };
    (@second [text_encoder_2] $dir:literal) => {
        Some((
            preset_file!($dir, "text_encoder_2/config.json"),
            tokenizer_files!($dir, "tokenizer_2"),
        ))
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
pub static SDXL_BASE: Preset = preset!(
    "sdxl-base-1.0",
    "sdxl_base",
    "stabilityai/stable-diffusion-xl-base-1.0",
    "SDXL 1.0 base (1024x1024, epsilon, Euler leading)",
    text_encoder_2
);
pub static SDXL_TURBO: Preset = preset!(
    "sdxl-turbo",
    "sdxl_turbo",
    "stabilityai/sdxl-turbo",
    "SDXL-Turbo (512x512, epsilon, Euler ancestral trailing)",
    text_encoder_2
);

pub static ALL: [&Preset; 5] = [&SD15, &SD21_BASE, &SD21, &SDXL_BASE, &SDXL_TURBO];

impl Preset {
    /// The preset called `name` (`sd1.5`, `sd2.1-base`, `sd2.1`, `sdxl-base-1.0`,
    /// `sdxl-turbo`).
    pub fn by_name(name: &str) -> Option<&'static Preset> {
        ALL.iter().copied().find(|p| p.name == name)
    }

    pub fn names() -> String {
        ALL.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
    }

    /// Whether the pipeline has SDXL's second text encoder and tokenizer.
    pub fn has_text_encoder_2(&self) -> bool {
        self.text_encoder_2.is_some()
    }

    /// A component's config JSON (the scheduler's `scheduler_config.json`).
    pub fn config_text(&self, c: Component) -> Result<&'static str> {
        match c {
            Component::Unet => Ok(self.unet),
            Component::Vae => Ok(self.vae),
            Component::TextEncoder => Ok(self.text_encoder),
            Component::Scheduler => Ok(self.scheduler),
            Component::Tokenizer | Component::Tokenizer2 => Err(Error::Other(
                "a tokenizer has no config.json; use Preset::tokenizer".into(),
            )),
            Component::TextEncoder2 => match &self.text_encoder_2 {
                Some((config, _)) => Ok(config),
                None => Err(Error::Other(format!(
                    "preset {} has one text encoder",
                    self.name
                ))),
            },
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
        self.builtin_tokenizer(&self.tokenizer)
    }

    /// SDXL's second tokenizer (the same BPE files; pads with `!`), for a preset that has
    /// a second text encoder.
    pub fn tokenizer_2(&self) -> Result<Option<ClipTokenizer>> {
        self.text_encoder_2
            .as_ref()
            .map(|(_, files)| self.builtin_tokenizer(files))
            .transpose()
    }

    fn builtin_tokenizer(&self, files: &TokenizerFiles) -> Result<ClipTokenizer> {
        ClipTokenizer::builtin(
            files.tokenizer_config,
            files.special_tokens_map,
            &format!("<built-in preset {}>/{}", self.name, files.dir),
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
            // SD 2.x pads with `!` (id 0); SD 1.5 and SDXL's first tokenizer with the end.
            let pad = if p.name.starts_with("sd2") { 0 } else { 49407 };
            assert_eq!(ids[7], pad, "{}", p.name);
        }
    }

    #[test]
    fn sdxl_presets_have_the_second_encoder_and_tokenizer() {
        use crate::model::config::PerLevel;
        for p in [&SD15, &SD21_BASE, &SD21] {
            assert!(!p.has_text_encoder_2(), "{}", p.name);
            assert!(p.config_text(Component::TextEncoder2).is_err());
            assert!(p.tokenizer_2().unwrap().is_none());
        }
        // CLIPTokenizer from transformers 5.23 on these files (and clip_tokenizer/'s BPE):
        // `!` is SD 2.x's and tokenizer_2's pad token, matched in the text too.
        let prompt = "a cat! <|endoftext|> <|STARTOFTEXT|> ! wow";
        for p in [&SDXL_BASE, &SDXL_TURBO] {
            parse_valid::<ClipTextConfig>(p, Component::TextEncoder2);
            let c: ClipTextConfig =
                serde_json::from_str(p.config_text(Component::TextEncoder2).unwrap()).unwrap();
            assert_eq!(
                (c.hidden_size, c.num_hidden_layers, c.num_attention_heads),
                (1280, 32, 20)
            );
            assert_eq!((c.intermediate_size, c.projection_dim), (5120, 1280));
            assert_eq!((c.hidden_act.as_str(), c.eos_token_id), ("gelu", 2));
            let u: UNetConfig =
                serde_json::from_str(p.config_text(Component::Unet).unwrap()).unwrap();
            assert_eq!(u.addition_embed_type.as_deref(), Some("text_time"));
            assert_eq!(u.projection_class_embeddings_input_dim, Some(2816));
            // `"upcast_attention": null` in both repos, false to diffusers.
            assert!(!u.upcast_attention);
            assert_eq!(u.cross_attention_dim, PerLevel::One(2048));
            assert_eq!(
                u.transformer_layers_per_block,
                PerLevel::Each(vec![1, 2, 10])
            );
            let v: VaeConfig =
                serde_json::from_str(p.config_text(Component::Vae).unwrap()).unwrap();
            assert_eq!(v.scaling_factor, 0.13025);

            let first = p.tokenizer().unwrap().encode(prompt).unwrap().ids;
            assert_eq!(
                &first[..10],
                &[49406, 320, 2368, 256, 49407, 49406, 256, 2781, 49407, 49407]
            );
            let second = p
                .tokenizer_2()
                .unwrap()
                .unwrap()
                .encode(prompt)
                .unwrap()
                .ids;
            assert_eq!(
                &second[..10],
                &[49406, 320, 2368, 0, 49407, 49406, 0, 2781, 49407, 0]
            );
            assert_eq!(second.len(), 77);
        }
        // Base: 1024x1024 (sample_size 128) with Euler leading; Turbo: 512x512 (64), Euler
        // ancestral trailing.
        let field = |p: &Preset, c: Component, key: &str| -> serde_json::Value {
            let v: serde_json::Value = serde_json::from_str(p.config_text(c).unwrap()).unwrap();
            v[key].clone()
        };
        assert_eq!(field(&SDXL_BASE, Component::Unet, "sample_size"), 128);
        assert_eq!(field(&SDXL_TURBO, Component::Unet, "sample_size"), 64);
        for (p, class, spacing) in [
            (&SDXL_BASE, "EulerDiscreteScheduler", "leading"),
            (&SDXL_TURBO, "EulerAncestralDiscreteScheduler", "trailing"),
        ] {
            assert_eq!(field(p, Component::Scheduler, "_class_name"), class);
            assert_eq!(field(p, Component::Scheduler, "timestep_spacing"), spacing);
        }
        assert_eq!(
            Preset::by_name("sdxl-turbo").unwrap().repo,
            "stabilityai/sdxl-turbo"
        );
        assert!(Preset::names().ends_with("sdxl-base-1.0, sdxl-turbo"));
    }
}
