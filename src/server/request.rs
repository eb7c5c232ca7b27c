//! The body of `POST /generate`: parsed field by field so every mistake names its field,
//! with the API guide's defaults and the deployment's limits. The other dialects (A1111's
//! txt2img, OpenAI's images) name some fields differently and go through the same checks
//! with their own names ([`Dialect`]).

use std::sync::Arc;

use base64::Engine as _;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::error::ApiError;
use crate::model::lora::LoraChoice;
use crate::model::prompt_syntax::PromptSyntax;
use crate::pipeline::noise::random_seed;
use crate::pipeline::{GenerateParams, InitImage, MaskImage, ModelDefaults, RgbImage};

/// What a deployment accepts and what it assumes when a field is left out.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Longest prompt (and negative prompt), in characters.
    pub max_prompt_chars: usize,
    pub max_steps: u64,
    /// Largest width × height.
    pub max_pixels: u64,
    /// The operator's `--default-steps` and `--default-guidance`; `None`: the model's.
    pub default_steps: Option<u64>,
    pub default_guidance: Option<f64>,
    /// The loaded model's defaults for what a request leaves out (the API guide's until a
    /// model is loaded): see [`Limits::for_model`].
    pub model_defaults: ModelDefaults,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_prompt_chars: 2000,
            max_steps: 150,
            max_pixels: 2048 * 2048,
            default_steps: None,
            default_guidance: None,
            model_defaults: ModelDefaults::GUIDE,
        }
    }
}

impl Limits {
    /// These limits with the loaded model's defaults, when there is one.
    pub fn for_model(&self, defaults: Option<ModelDefaults>) -> Limits {
        Limits {
            model_defaults: defaults.unwrap_or(self.model_defaults),
            ..self.clone()
        }
    }
}

/// Smallest and largest side, in pixels.
pub const MIN_SIDE: u64 = 64;
pub const MAX_SIDE: u64 = 2048;
/// Sides must be multiples of this (the VAE factor of every real model).
pub const SIDE_MULTIPLE: u64 = 8;
pub const MAX_GUIDANCE: f64 = 30.0;

/// A validated request. `seed` is `None` for "pick one" (-1 or absent).
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    /// Additive: SDXL's second text encoder's prompts (diffusers' `prompt_2`,
    /// `negative_prompt_2`).
    pub prompt_2: Option<String>,
    pub negative_prompt_2: Option<String>,
    pub steps: u64,
    pub guidance_scale: f64,
    pub width: u64,
    pub height: u64,
    pub seed: Option<u64>,
    /// Additive: a scheduler class name or alias replacing the model's own.
    pub scheduler: Option<String>,
    /// Additive: image-to-image (`init_image`, `strength`) or inpainting (with `mask_image`).
    pub init: Option<InitImage>,
    /// Additive: LoRAs by name, from the `loras` field and `<lora:name:scale>` in the prompt.
    pub loras: Vec<LoraRequest>,
    /// Additive: `prompt_syntax`, diffusers' plain text or AUTOMATIC1111's.
    pub prompt_syntax: PromptSyntax,
}

/// A LoRA a request names, and its weight.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraRequest {
    pub name: String,
    pub scale: f64,
    /// Where the request named it (`loras`, or `prompt` for a tag), for messages.
    pub field: &'static str,
}

/// The largest LoRA weight taken, either sign: the common range is -2..2, and far beyond
/// it the merged weights make noise.
pub const MAX_LORA_SCALE: f64 = 10.0;

impl GenerateRequest {
    /// The engine's parameters for this request, with its LoRAs as loaded; a random seed
    /// when it asked for one.
    pub fn into_params(self, loras: Vec<LoraChoice>) -> GenerateParams {
        GenerateParams {
            prompt: self.prompt,
            negative_prompt: self.negative_prompt,
            prompt_2: self.prompt_2,
            negative_prompt_2: self.negative_prompt_2,
            steps: self.steps as usize,
            guidance_scale: self.guidance_scale,
            width: self.width as usize,
            height: self.height as usize,
            seed: self.seed.unwrap_or_else(random_seed),
            scheduler: self.scheduler,
            scheduler_overrides: Default::default(),
            init: self.init,
            loras,
            prompt_syntax: self.prompt_syntax,
        }
    }
}

/// The body of `POST /generate` and `POST /jobs` as the OpenAPI document describes it;
/// [`parse`] reads it field by field (a test keeps the two in step).
#[derive(ToSchema)]
#[schema(example = json!({"prompt": "A serene mountain landscape at sunset", "num_inference_steps": 30}))]
#[allow(dead_code)] // describes the wire format only
pub struct GenerateBody {
    /// Text description of the image to generate.
    prompt: String,
    /// What to avoid in the image.
    negative_prompt: Option<String>,
    /// SDXL only: the prompt its second text encoder reads (diffusers' `prompt_2`); default
    /// `prompt`.
    prompt_2: Option<String>,
    /// SDXL only: the second text encoder's negative prompt; default `negative_prompt`. A
    /// missing `negative_prompt` still gives SDXL's zero negative embeddings, as in
    /// diffusers.
    negative_prompt_2: Option<String>,
    /// Denoising steps (1 to the server's `--max-steps`, 150 by default); default 50.
    num_inference_steps: Option<u64>,
    /// How closely to follow the prompt, 0 to 30; default 7.5.
    guidance_scale: Option<f64>,
    /// Pixels, a multiple of 8 from 64 to 2048; default 512.
    width: Option<u64>,
    /// Pixels, a multiple of 8 from 64 to 2048; default 512.
    height: Option<u64>,
    /// -1 (the default) for a random seed.
    seed: Option<i64>,
    /// A diffusers scheduler class name or a short name (see /health's `schedulers`)
    /// replacing the model's own.
    scheduler: Option<String>,
    /// Image-to-image: a PNG or JPEG in base64 (raw or a `data:` URL) to start from. The
    /// output has its size (sides multiples of 8); `width` and `height` may be left out.
    init_image: Option<String>,
    /// Inpainting (needs `init_image`): a PNG or JPEG mask of the same size, white where
    /// the image is repainted, black where it is kept.
    mask_image: Option<String>,
    /// With `init_image`: how much of the schedule runs, above 0 and at most 1; default
    /// 0.8 (1.0 with `mask_image`).
    strength: Option<f64>,
    /// LoRAs from the server's `--lora-dir` (see /health's `loras`), each with its weight;
    /// `<lora:name:weight>` in the prompt does the same (AUTOMATIC1111's syntax, removed
    /// from the text).
    loras: Option<Vec<LoraBody>>,
    /// How the prompts are read: `diffusers` (the default: the text as written, cut at 75
    /// tokens, as diffusers' pipelines read it) or `a1111` (AUTOMATIC1111's `(word:1.2)`,
    /// `[word]`, `BREAK`, and prompts of any length in chunks of 75 tokens).
    prompt_syntax: Option<String>,
}

/// One entry of `loras`.
#[derive(ToSchema)]
#[allow(dead_code)] // describes the wire format only
pub struct LoraBody {
    /// A LoRA file's name in the server's `--lora-dir`, without `.safetensors`.
    name: String,
    /// Its weight, -10 to 10; default 1.
    scale: Option<f64>,
}

/// How a dialect names the fields the checks read.
pub struct Dialect {
    pub steps: &'static str,
    pub guidance: &'static str,
    /// `None` where the dialect picks the scheduler its own way.
    pub scheduler: Option<&'static str>,
    /// Whether a field the dialect does not know is an error (ours) or ignored (A1111's,
    /// whose clients send many options this server has no use for).
    pub refuse_unknown: bool,
    /// The steps assumed when the field is absent (`None`: the deployment's default).
    pub default_steps: Option<u64>,
    pub default_guidance: Option<f64>,
    /// Whether `init_image`, `mask_image` and `strength` are read.
    pub init_image: bool,
    /// Whether the `loras` field is read (`<lora:...>` in the prompt always is).
    pub loras: bool,
    /// The prompt syntax, or `None` where the `prompt_syntax` field chooses (diffusers'
    /// when absent).
    pub prompt_syntax: Option<PromptSyntax>,
    /// Whether `prompt_2` and `negative_prompt_2` (SDXL's second encoder) are read.
    pub second_prompts: bool,
}

/// The API guide's dialect.
pub const NATIVE: Dialect = Dialect {
    steps: "num_inference_steps",
    guidance: "guidance_scale",
    scheduler: Some("scheduler"),
    refuse_unknown: true,
    default_steps: None,
    default_guidance: None,
    init_image: true,
    loras: true,
    prompt_syntax: None,
    second_prompts: true,
};

impl Dialect {
    fn fields(&self) -> Vec<&'static str> {
        let mut fields = vec!["prompt", "negative_prompt"];
        if self.second_prompts {
            fields.extend(["prompt_2", "negative_prompt_2"]);
        }
        fields.extend([self.steps, self.guidance]);
        fields.extend(["width", "height", "seed"]);
        fields.extend(self.scheduler);
        if self.init_image {
            fields.extend(["init_image", "mask_image", "strength"]);
        }
        if self.loras {
            fields.push("loras");
        }
        if self.prompt_syntax.is_none() {
            fields.push("prompt_syntax");
        }
        fields
    }
}

/// Parses and validates a request body of the guide's dialect.
pub fn parse(body: &[u8], limits: &Limits) -> Result<GenerateRequest, ApiError> {
    parse_as(&json_object(body)?, limits, &NATIVE)
}

/// A request body as a JSON object, or a 400 that says what is wrong with it.
pub fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        if body.iter().all(u8::is_ascii_whitespace) {
            ApiError::bad_request(
                "the request body is empty; send a JSON object such as {\"prompt\": \"a cat\"}",
            )
        } else {
            ApiError::bad_request(format!("the request body is not valid JSON: {e}"))
        }
    })?;
    match value {
        Value::Object(fields) => Ok(fields),
        _ => Err(ApiError::bad_request(
            "the request body must be a JSON object such as {\"prompt\": \"a cat\"}",
        )),
    }
}

/// Validates the fields of a request in `dialect`'s names.
pub fn parse_as(
    fields: &Map<String, Value>,
    limits: &Limits,
    dialect: &Dialect,
) -> Result<GenerateRequest, ApiError> {
    let known = dialect.fields();
    if let Some(unknown) = fields
        .keys()
        .find(|k| dialect.refuse_unknown && !known.contains(&k.as_str()))
    {
        return Err(ApiError::bad_request(format!(
            "unknown field `{unknown}`; the fields are {}",
            known.join(", ")
        )));
    }

    let prompt = match fields.get("prompt") {
        None | Some(Value::Null) => return Err(ApiError::bad_request("`prompt` is required")),
        Some(_) => text(fields, "prompt", limits)?.unwrap_or_default(),
    };
    if prompt.trim().is_empty() {
        return Err(ApiError::bad_request("`prompt` must not be empty"));
    }
    let mut loras = if dialect.loras {
        lora_list(fields)?
    } else {
        Vec::new()
    };
    let (prompt, tagged) = lora_tags(&prompt)?;
    loras.extend(tagged);
    let prompt_syntax = match dialect.prompt_syntax {
        Some(syntax) => syntax,
        None => match fields.get("prompt_syntax") {
            None | Some(Value::Null) => PromptSyntax::Plain,
            Some(Value::String(name)) => PromptSyntax::parse(name).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "`prompt_syntax` must be \"diffusers\" or \"a1111\", got {name:?}"
                ))
            })?,
            Some(other) => return Err(type_error("prompt_syntax", "a string", other)),
        },
    };
    let negative_prompt = text(fields, "negative_prompt", limits)?;
    let (prompt_2, negative_prompt_2) = if dialect.second_prompts {
        (
            text(fields, "prompt_2", limits)?,
            text(fields, "negative_prompt_2", limits)?,
        )
    } else {
        (None, None)
    };
    let steps_field = dialect.steps;
    let steps = integer(fields, steps_field)?
        .or(dialect.default_steps)
        .or(limits.default_steps)
        .unwrap_or(limits.model_defaults.steps as u64);
    if !(1..=limits.max_steps).contains(&steps) {
        return Err(ApiError::bad_request(format!(
            "`{steps_field}` must be between 1 and {}, got {steps}",
            limits.max_steps
        )));
    }
    let guidance_field = dialect.guidance;
    let guidance_scale = match fields.get(guidance_field) {
        None | Some(Value::Null) => dialect
            .default_guidance
            .or(limits.default_guidance)
            .unwrap_or(limits.model_defaults.guidance_scale),
        Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
        Some(other) => return Err(type_error(guidance_field, "a number", other)),
    };
    if !guidance_scale.is_finite() || !(0.0..=MAX_GUIDANCE).contains(&guidance_scale) {
        return Err(ApiError::bad_request(format!(
            "`{guidance_field}` must be a number between 0 and {MAX_GUIDANCE}, got {}",
            short_number(guidance_scale)
        )));
    }
    let init = if dialect.init_image {
        init_image(fields, limits)?
    } else {
        None
    };
    let (width, height) = match &init {
        Some(init) => (
            image_side(fields, "width", init.image.width)?,
            image_side(fields, "height", init.image.height)?,
        ),
        None => {
            let d = &limits.model_defaults;
            (
                side(fields, "width", d.width as u64)?,
                side(fields, "height", d.height as u64)?,
            )
        }
    };
    if width * height > limits.max_pixels {
        return Err(ApiError::bad_request(format!(
            "`width` x `height` = {width}x{height} = {} pixels is over this server's limit of {} pixels",
            width * height,
            limits.max_pixels
        )));
    }
    let seed = match fields.get("seed") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_i64() == Some(-1) => None,
        Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64(),
        Some(Value::Number(n)) if n.is_i64() => {
            return Err(ApiError::bad_request(format!(
                "`seed` must be -1 (random) or a non-negative integer, got {n}"
            )))
        }
        Some(other) => return Err(type_error("seed", "an integer (-1 for random)", other)),
    };
    let scheduler = match dialect.scheduler.map(|field| (field, fields.get(field))) {
        None | Some((_, None | Some(Value::Null))) => None,
        Some((_, Some(Value::String(s)))) => Some(s.clone()),
        Some((field, Some(other))) => return Err(type_error(field, "a string", other)),
    };
    Ok(GenerateRequest {
        prompt,
        negative_prompt,
        prompt_2,
        negative_prompt_2,
        steps,
        guidance_scale,
        width,
        height,
        seed,
        scheduler,
        init,
        loras,
        prompt_syntax,
    })
}

/// The `loras` field: `[{"name": ..., "scale": ...}]`, scale 1 when left out.
fn lora_list(fields: &Map<String, Value>) -> Result<Vec<LoraRequest>, ApiError> {
    let list = match fields.get("loras") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(other) => {
            return Err(type_error(
                "loras",
                "an array of {\"name\", \"scale\"} objects",
                other,
            ))
        }
    };
    list.iter()
        .enumerate()
        .map(|(i, entry)| {
            let field = format!("loras[{i}]");
            let Value::Object(entry) = entry else {
                return Err(type_error(&field, "an object {\"name\", \"scale\"}", entry));
            };
            if let Some(unknown) = entry
                .keys()
                .find(|k| !["name", "scale"].contains(&k.as_str()))
            {
                return Err(ApiError::bad_request(format!(
                    "unknown field `{field}.{unknown}`; a LoRA has `name` and `scale`"
                )));
            }
            let name = match entry.get("name") {
                Some(Value::String(name)) if !name.is_empty() => name.clone(),
                Some(Value::String(_)) | None | Some(Value::Null) => {
                    return Err(ApiError::bad_request(format!("`{field}.name` is required")))
                }
                Some(other) => return Err(type_error(&format!("{field}.name"), "a string", other)),
            };
            let scale = match entry.get("scale") {
                None | Some(Value::Null) => 1.0,
                Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
                Some(other) => {
                    return Err(type_error(&format!("{field}.scale"), "a number", other))
                }
            };
            lora_request(name, scale, &format!("`{field}.scale`"), "loras")
        })
        .collect()
}

fn lora_request(
    name: String,
    scale: f64,
    what: &str,
    field: &'static str,
) -> Result<LoraRequest, ApiError> {
    if !scale.is_finite() || scale.abs() > MAX_LORA_SCALE {
        return Err(ApiError::bad_request(format!(
            "{what} must be a number from -{MAX_LORA_SCALE} to {MAX_LORA_SCALE}, got {}",
            short_number(scale)
        )));
    }
    Ok(LoraRequest { name, scale, field })
}

/// AUTOMATIC1111's `<lora:name>` and `<lora:name:weight>` taken out of a prompt: the text
/// without them, and the LoRAs they name. A1111 keeps the text around a tag as it is
/// (`a cat <lora:x:1>, sitting` encodes `a cat , sitting`), and so does this.
pub fn lora_tags(prompt: &str) -> Result<(String, Vec<LoraRequest>), ApiError> {
    let mut text = String::with_capacity(prompt.len());
    let mut loras = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        let Some(len) = rest[start..].find('>') else {
            break;
        };
        let tag = &rest[start + "<lora:".len()..start + len];
        text.push_str(&rest[..start]);
        rest = &rest[start + len + 1..];
        // A1111: `<lora:name:te_weight:unet_weight>` exists too; one weight is read here.
        let mut parts = tag.split(':');
        let name = parts.next().unwrap_or_default().trim().to_string();
        let scale = match parts.next() {
            None => 1.0,
            Some(weight) => weight.trim().parse::<f64>().map_err(|_| {
                ApiError::bad_request(format!(
                    "`prompt`: the weight in `<lora:{tag}>` is not a number"
                ))
            })?,
        };
        if parts.next().is_some() {
            return Err(ApiError::bad_request(format!(
                "`prompt`: `<lora:{tag}>` has more than one weight; write `<lora:name:weight>`"
            )));
        }
        if name.is_empty() {
            return Err(ApiError::bad_request(format!(
                "`prompt`: `<lora:{tag}>` names no LoRA"
            )));
        }
        let what = format!("`prompt`: the weight in `<lora:{tag}>`");
        loras.push(lora_request(name, scale, &what, "prompt")?);
    }
    text.push_str(rest);
    Ok((text, loras))
}

/// `init_image`, `mask_image` and `strength`, each checked and named in its error.
fn init_image(fields: &Map<String, Value>, limits: &Limits) -> Result<Option<InitImage>, ApiError> {
    let max_pixels = usize::try_from(limits.max_pixels).unwrap_or(usize::MAX);
    let image = image_field(fields, "init_image", |b| RgbImage::decode(b, max_pixels))?;
    let mask = image_field(fields, "mask_image", |b| MaskImage::decode(b, max_pixels))?;
    let strength = match fields.get("strength") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(n.as_f64().unwrap_or(f64::NAN)),
        Some(other) => return Err(type_error("strength", "a number", other)),
    };
    let Some(image) = image else {
        if let Some(field) = [
            ("mask_image", mask.is_some()),
            ("strength", strength.is_some()),
        ]
        .iter()
        .find_map(|(f, given)| given.then_some(f))
        {
            return Err(ApiError::bad_request(format!(
                "`{field}` needs `init_image`, the image to start from"
            )));
        }
        return Ok(None);
    };
    let allowed = |v: usize| {
        (v as u64).is_multiple_of(SIDE_MULTIPLE) && (MIN_SIDE..=MAX_SIDE).contains(&(v as u64))
    };
    if !allowed(image.width) || !allowed(image.height) {
        return Err(ApiError::bad_request(format!(
            "`init_image` is {}x{}; its sides must be multiples of {SIDE_MULTIPLE} between {MIN_SIDE} and {MAX_SIDE}",
            image.width, image.height
        )));
    }
    if let Some(mask) = &mask {
        if (mask.width, mask.height) != (image.width, image.height) {
            return Err(ApiError::bad_request(format!(
                "`mask_image` is {}x{} but `init_image` is {}x{}: they must be the same size",
                mask.width, mask.height, image.width, image.height
            )));
        }
    }
    // diffusers' defaults: StableDiffusionImg2ImgPipeline 0.8, StableDiffusionInpaintPipeline 1.0.
    let strength = strength.unwrap_or(if mask.is_some() { 1.0 } else { 0.8 });
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(ApiError::bad_request(format!(
            "`strength` must be above 0 and at most 1, got {}",
            short_number(strength)
        )));
    }
    Ok(Some(InitImage {
        image: Arc::new(image),
        mask: mask.map(Arc::new),
        strength,
    }))
}

/// An optional image field: base64 (raw or a `data:image/...;base64,` URL) of a PNG or JPEG.
pub fn image_field<T>(
    fields: &Map<String, Value>,
    field: &str,
    decode: impl Fn(&[u8]) -> crate::Result<T>,
) -> Result<Option<T>, ApiError> {
    let text = match fields.get(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s,
        Some(other) => return Err(type_error(field, "a base64-encoded PNG or JPEG", other)),
    };
    let data = match text.split_once(',') {
        Some((head, data)) if head.starts_with("data:") => {
            if !head.ends_with(";base64") {
                return Err(ApiError::bad_request(format!(
                    "`{field}` is a data URL without `;base64`: send the image base64-encoded"
                )));
            }
            data
        }
        _ => text.as_str(),
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::bad_request(format!("`{field}` is not valid base64: {e}")))?;
    decode(&bytes)
        .map(Some)
        .map_err(|e| ApiError::bad_request(format!("`{field}`: {}", plain(&e))))
}

/// An error's message without the "invalid argument: " heading.
pub fn plain(e: &crate::Error) -> String {
    match e {
        crate::Error::InvalidArgument(m) => m.clone(),
        other => other.to_string(),
    }
}

/// `width` or `height` with an init image: absent, or the image's own.
fn image_side(fields: &Map<String, Value>, field: &str, actual: usize) -> Result<u64, ApiError> {
    match integer(fields, field)? {
        Some(v) if v != actual as u64 => Err(ApiError::bad_request(format!(
            "`{field}` is {v} but `init_image` is {actual} pixels {}: leave `width` and `height` out to use the image's size",
            if field == "width" { "wide" } else { "high" }
        ))),
        _ => Ok(actual as u64),
    }
}

fn describe(value: &Value) -> String {
    let text = value.to_string();
    let kind = match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    if text.len() > 40 {
        kind.to_string()
    } else {
        format!("{kind} ({text})")
    }
}

pub fn type_error(field: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::bad_request(format!(
        "`{field}` must be {expected}, got {}",
        describe(got)
    ))
}

/// An optional string field within the prompt length limit.
fn text(
    fields: &Map<String, Value>,
    field: &str,
    limits: &Limits,
) -> Result<Option<String>, ApiError> {
    match fields.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let chars = s.chars().count();
            if chars > limits.max_prompt_chars {
                return Err(ApiError::bad_request(format!(
                    "`{field}` is {chars} characters long; this server accepts at most {}",
                    limits.max_prompt_chars
                )));
            }
            Ok(Some(s.clone()))
        }
        Some(other) => Err(type_error(field, "a string", other)),
    }
}

/// An optional non-negative integer field (`30`, not `30.5` or `"30"`).
pub fn integer(fields: &Map<String, Value>, field: &str) -> Result<Option<u64>, ApiError> {
    match fields.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) => Ok(Some(v)),
            None if n.is_i64() => Err(ApiError::bad_request(format!(
                "`{field}` must be a positive integer, got {n}"
            ))),
            None => Err(type_error(field, "an integer", &Value::Number(n.clone()))),
        },
        Some(other) => Err(type_error(field, "an integer", other)),
    }
}

/// `width` or `height`: `default` when absent, a multiple of 8 within the side limits.
fn side(fields: &Map<String, Value>, field: &str, default: u64) -> Result<u64, ApiError> {
    let value = integer(fields, field)?.unwrap_or(default);
    if !(MIN_SIDE..=MAX_SIDE).contains(&value) || value % SIDE_MULTIPLE != 0 {
        return Err(ApiError::bad_request(format!(
            "`{field}` must be a multiple of {SIDE_MULTIPLE} between {MIN_SIDE} and {MAX_SIDE}, got {value}"
        )));
    }
    Ok(value)
}

/// `x` as written by people: 1e308 as `1e308`, not as its 309 digits.
fn short_number(x: f64) -> String {
    if x != 0.0 && !(1e-4..1e6).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        x.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_str(body: &str) -> Result<GenerateRequest, String> {
        parse(body.as_bytes(), &Limits::default()).map_err(|e| e.message)
    }

    #[test]
    fn the_documented_body_has_the_parsed_fields() {
        let schema =
            serde_json::to_value(<GenerateBody as utoipa::PartialSchema>::schema()).unwrap();
        let mut documented: Vec<&str> = schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut parsed = NATIVE.fields();
        documented.sort();
        parsed.sort();
        assert_eq!(documented, parsed);
        assert_eq!(schema["required"], json!(["prompt"]));
    }

    #[test]
    fn loras_come_from_the_field_and_from_prompt_tags() {
        let r = parse_str(
            r#"{"prompt": "a cat <lora:ink:0.6>, sitting<lora:film>", "loras": [{"name": "style", "scale": -0.5}, {"name": "x"}]}"#,
        )
        .unwrap();
        assert_eq!(r.prompt, "a cat , sitting");
        let got: Vec<(&str, f64, &str)> = r
            .loras
            .iter()
            .map(|l| (l.name.as_str(), l.scale, l.field))
            .collect();
        assert_eq!(
            got,
            [
                ("style", -0.5, "loras"),
                ("x", 1.0, "loras"),
                ("ink", 0.6, "prompt"),
                ("film", 1.0, "prompt")
            ]
        );
        // Text that only looks like a tag stays.
        let (text, loras) = lora_tags("a <lora without end, <b>").unwrap();
        assert_eq!(
            (text.as_str(), loras.len()),
            ("a <lora without end, <b>", 0)
        );

        for (body, message) in [
            (
                r#"{"prompt": "a", "loras": "ink"}"#,
                "`loras` must be an array",
            ),
            (
                r#"{"prompt": "a", "loras": [3]}"#,
                "`loras[0]` must be an object",
            ),
            (
                r#"{"prompt": "a", "loras": [{"scale": 1}]}"#,
                "`loras[0].name` is required",
            ),
            (
                r#"{"prompt": "a", "loras": [{"name": "x", "weight": 1}]}"#,
                "unknown field `loras[0].weight`",
            ),
            (
                r#"{"prompt": "a", "loras": [{"name": "x", "scale": "1"}]}"#,
                "`loras[0].scale` must be a number",
            ),
            (
                r#"{"prompt": "a", "loras": [{"name": "x", "scale": 11}]}"#,
                "`loras[0].scale` must be a number from -10 to 10, got 11",
            ),
            (
                r#"{"prompt": "a <lora:x:strong>"}"#,
                "the weight in `<lora:x:strong>` is not a number",
            ),
            (r#"{"prompt": "a <lora::1>"}"#, "`<lora::1>` names no LoRA"),
            (r#"{"prompt": "a <lora:x:1:0.5>"}"#, "more than one weight"),
            (
                r#"{"prompt": "a <lora:x:-20>"}"#,
                "the weight in `<lora:x:-20>` must be a number from -10 to 10",
            ),
        ] {
            let err = parse_str(body).unwrap_err();
            assert!(err.contains(message), "{body}: {err}");
        }
    }

    #[test]
    fn defaults_are_the_api_guides() {
        let r = parse_str(r#"{"prompt": "a cat"}"#).unwrap();
        assert_eq!(
            (r.steps, r.guidance_scale, r.width, r.height, r.seed),
            (50, 7.5, 512, 512, None)
        );
        let r = parse_str(r#"{"prompt": "a cat", "seed": -1, "negative_prompt": null}"#).unwrap();
        assert_eq!((r.seed, r.negative_prompt), (None, None));
        let r = parse_str(r#"{"prompt": "a cat", "seed": 18446744073709551615}"#).unwrap();
        assert_eq!(r.seed, Some(u64::MAX));
    }

    #[test]
    fn every_mistake_names_its_field() {
        for (body, field) in [
            (r#"{}"#, "prompt"),
            (r#"{"prompt": ""}"#, "prompt"),
            (r#"{"prompt": "   "}"#, "prompt"),
            (r#"{"prompt": 5}"#, "prompt"),
            (
                r#"{"prompt": "a", "negative_prompt": []}"#,
                "negative_prompt",
            ),
            (
                r#"{"prompt": "a", "num_inference_steps": "30"}"#,
                "num_inference_steps",
            ),
            (
                r#"{"prompt": "a", "num_inference_steps": 30.5}"#,
                "num_inference_steps",
            ),
            (
                r#"{"prompt": "a", "num_inference_steps": 0}"#,
                "num_inference_steps",
            ),
            (
                r#"{"prompt": "a", "num_inference_steps": -3}"#,
                "num_inference_steps",
            ),
            (
                r#"{"prompt": "a", "num_inference_steps": 151}"#,
                "num_inference_steps",
            ),
            (r#"{"prompt": "a", "guidance_scale": 31}"#, "guidance_scale"),
            (r#"{"prompt": "a", "guidance_scale": -1}"#, "guidance_scale"),
            (
                r#"{"prompt": "a", "guidance_scale": "high"}"#,
                "guidance_scale",
            ),
            (r#"{"prompt": "a", "width": 500}"#, "width"),
            (r#"{"prompt": "a", "height": 32}"#, "height"),
            (r#"{"prompt": "a", "height": 4096}"#, "height"),
            (r#"{"prompt": "a", "seed": -2}"#, "seed"),
            (r#"{"prompt": "a", "seed": 1.5}"#, "seed"),
            (r#"{"prompt": "a", "seed": "42"}"#, "seed"),
            (r#"{"prompt": "a", "steps": 30}"#, "steps"),
        ] {
            let message = parse_str(body).expect_err(body);
            assert!(message.contains(&format!("`{field}`")), "{body}: {message}");
        }
        let huge = parse_str(r#"{"prompt": "a", "guidance_scale": 1e308}"#).unwrap_err();
        assert!(huge.ends_with("got 1e308"), "{huge}");
        let long = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(2001));
        assert!(parse_str(&long).unwrap_err().contains("`prompt`"));
    }

    #[test]
    fn malformed_bodies_are_refused() {
        assert!(parse_str("").unwrap_err().contains("empty"));
        assert!(parse_str("{\"prompt\": ")
            .unwrap_err()
            .contains("not valid JSON"));
        assert!(parse_str("prompt=a+cat")
            .unwrap_err()
            .contains("not valid JSON"));
        assert!(parse_str("[1, 2]").unwrap_err().contains("JSON object"));
    }

    #[test]
    fn the_pixel_budget_applies_to_the_product() {
        let limits = Limits {
            max_pixels: 512 * 512,
            ..Limits::default()
        };
        let err = parse(br#"{"prompt": "a", "width": 1024, "height": 512}"#, &limits).unwrap_err();
        assert!(
            err.message.contains("`width` x `height`"),
            "{}",
            err.message
        );
        assert!(parse(br#"{"prompt": "a", "width": 256, "height": 1024}"#, &limits).is_ok());
    }
}
