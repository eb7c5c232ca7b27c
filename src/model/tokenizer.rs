//! The CLIP tokenizer, built from the model's own files exactly as transformers'
//! `CLIPTokenizer` builds it: NFC, whitespace runs to one space, lower-case, CLIP's split
//! regex, byte-level BPE with `</w>` word ends; then BOS + at most 75 ids + EOS, padded with
//! the tokenizer's own pad token to `model_max_length`.

use std::path::Path;

use serde::Deserialize;
use tokenizers::models::bpe::{self, BPE};
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

/// CLIP's BPE files, the same for every SD 1.x and 2.x model (`tokenizer/vocab.json` and
/// `tokenizer/merges.txt` of the Hub repositories), for single-file checkpoints.
const BUILTIN_VOCAB: &str = include_str!("presets/clip_tokenizer/vocab.json");
const BUILTIN_MERGES: &str = include_str!("presets/clip_tokenizer/merges.txt");

/// CLIP's pre-tokenisation pattern (from transformers' `CLIPTokenizer`).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A special token as the tokenizer configs write it: a string or an AddedToken object.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Plain(String),
    Full {
        content: String,
        #[serde(default)]
        lstrip: bool,
        #[serde(default)]
        rstrip: bool,
        #[serde(default)]
        normalized: Option<bool>,
        #[serde(default)]
        single_word: bool,
        #[serde(default)]
        special: Option<bool>,
    },
}

impl TokenSpec {
    fn content(&self) -> &str {
        match self {
            TokenSpec::Plain(s) => s,
            TokenSpec::Full { content, .. } => content,
        }
    }

    fn added_token(&self, default_special: bool) -> AddedToken {
        match self {
            TokenSpec::Plain(s) => AddedToken::from(s.clone(), default_special),
            TokenSpec::Full {
                content,
                lstrip,
                rstrip,
                normalized,
                single_word,
                special,
            } => {
                let special = special.unwrap_or(default_special);
                AddedToken::from(content.clone(), special)
                    .lstrip(*lstrip)
                    .rstrip(*rstrip)
                    .single_word(*single_word)
                    .normalized(normalized.unwrap_or(!special))
            }
        }
    }
}

/// The fields of `tokenizer_config.json` / `special_tokens_map.json` that matter here.
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    bos_token: Option<TokenSpec>,
    eos_token: Option<TokenSpec>,
    unk_token: Option<TokenSpec>,
    pad_token: Option<TokenSpec>,
    model_max_length: Option<f64>,
    #[serde(default)]
    added_tokens_decoder: std::collections::BTreeMap<String, TokenSpec>,
}

fn read_optional_config(path: &Path) -> Result<TokenizerConfig> {
    if path.exists() {
        crate::model::config::read_json(path)
    } else {
        Ok(TokenizerConfig::default())
    }
}

/// A prompt turned into exactly `max_length` ids.
#[derive(Clone, Debug, PartialEq)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    /// How many of the prompt's tokens did not fit (0 if none were cut).
    pub dropped: usize,
}

pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_length: usize,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{}: {e}", path.display()))
}

/// The text of `vocab.json` or `merges.txt` and where it came from, for errors.
struct BpeFile<'a> {
    origin: &'a Path,
    text: &'a str,
}

impl<'a> BpeFile<'a> {
    fn new(origin: &'a (impl AsRef<Path> + ?Sized), text: &'a str) -> Self {
        BpeFile {
            origin: origin.as_ref(),
            text,
        }
    }

    /// `vocab.json`: token → id.
    fn vocab(&self) -> Result<bpe::Vocab> {
        let vocab: std::collections::HashMap<String, u32> =
            serde_json::from_str(self.text).map_err(|e| tok_err(self.origin, e))?;
        Ok(vocab.into_iter().collect())
    }

    /// `merges.txt`: one `left right` pair a line, by rank, after an optional `#version`
    /// line. Without merges BPE would split every word into bytes: a broken file.
    fn merges(&self) -> Result<bpe::Merges> {
        let merges = self
            .text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|(i, l)| match l.split(' ').collect::<Vec<_>>()[..] {
                [a, b] if !a.is_empty() && !b.is_empty() => Ok((a.to_string(), b.to_string())),
                _ => Err(tok_err(
                    self.origin,
                    format!(
                        "line {} is not a merge (two tokens separated by a space): {l:?}",
                        i + 1
                    ),
                )),
            })
            .collect::<Result<bpe::Merges>>()?;
        if merges.is_empty() {
            return Err(tok_err(self.origin, "has no merges"));
        }
        Ok(merges)
    }
}

impl ClipTokenizer {
    /// Loads `tokenizer/` of a diffusers model folder: `tokenizer.json` when present,
    /// otherwise `vocab.json` + `merges.txt`, with the special tokens and length from
    /// `tokenizer_config.json` and `special_tokens_map.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = read_optional_config(&dir.join("tokenizer_config.json"))?;
        let map = read_optional_config(&dir.join("special_tokens_map.json"))?;
        let json = dir.join("tokenizer.json");
        let tokenizer = if json.exists() {
            Tokenizer::from_file(&json).map_err(|e| tok_err(&json, e))?
        } else {
            Self::from_vocab_and_merges(dir)?
        };
        Self::finish(tokenizer, config, map, &dir.display().to_string())
    }

    /// The built-in copy of CLIP's BPE files (the same `vocab.json` and `merges.txt` in
    /// every SD 1.x and 2.x repository) with a model's own `tokenizer_config.json` and
    /// `special_tokens_map.json` (SD 2.x pads with `!`, SD 1.x with `<|endoftext|>`).
    /// `origin` names them in errors.
    pub fn builtin(tokenizer_config: &str, special_tokens_map: &str, origin: &str) -> Result<Self> {
        let parse = |text: &str, file: &str| {
            serde_json::from_str::<TokenizerConfig>(text)
                .map_err(|e| Error::Tokenizer(format!("{origin}/{file}: {e}")))
        };
        let config = parse(tokenizer_config, "tokenizer_config.json")?;
        let map = parse(special_tokens_map, "special_tokens_map.json")?;
        let tokenizer = Self::clip_pipeline(
            BpeFile::new("built-in vocab.json", BUILTIN_VOCAB),
            BpeFile::new("built-in merges.txt", BUILTIN_MERGES),
        )?;
        Self::finish(tokenizer, config, map, origin)
    }

    /// Special tokens, added tokens and length from the two config files, as transformers
    /// sets them up; `origin` names the tokenizer in errors.
    fn finish(
        mut tokenizer: Tokenizer,
        mut config: TokenizerConfig,
        map: TokenizerConfig,
        origin: &str,
    ) -> Result<Self> {
        // special_tokens_map.json wins, as in transformers.
        config.bos_token = map.bos_token.or(config.bos_token);
        config.eos_token = map.eos_token.or(config.eos_token);
        config.unk_token = map.unk_token.or(config.unk_token);
        config.pad_token = map.pad_token.or(config.pad_token);

        let spec = |t: &Option<TokenSpec>, default: &str| {
            t.clone()
                .unwrap_or_else(|| TokenSpec::Plain(default.to_string()))
        };
        let bos = spec(&config.bos_token, "<|startoftext|>");
        let eos = spec(&config.eos_token, "<|endoftext|>");
        let unk = spec(&config.unk_token, "<|endoftext|>");
        let pad = spec(&config.pad_token, "<|endoftext|>");
        // Added tokens as transformers registers them (matched in the text before BPE):
        // those listed in the config's `added_tokens_decoder` as they are, then the special
        // tokens in its order (bos, eos, unk, pad) unless the config already lists their
        // text. Among the special tokens a later one with the same text but other flags
        // replaces the earlier one: with SD 1.x's files the plain-string pad `<|endoftext|>`
        // (`normalized: false`) replaces the eos entry (`normalized: true`), so
        // `<|ENDOFTEXT|>` stays text while `<|STARTOFTEXT|>` is the bos token.
        let mut added: Vec<AddedToken> = config
            .added_tokens_decoder
            .values()
            .map(|t| t.added_token(false))
            .collect();
        let listed = added.len();
        for token in [&bos, &eos, &unk, &pad].map(|t| t.added_token(true)) {
            if added[..listed].iter().any(|a| a.content == token.content) {
                continue;
            }
            match added[listed..]
                .iter_mut()
                .find(|a| a.content == token.content)
            {
                Some(earlier) => *earlier = token,
                None => added.push(token),
            }
        }
        tokenizer.add_special_tokens(&added);

        let id = |t: &TokenSpec| {
            tokenizer.token_to_id(t.content()).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{origin}: special token {:?} is not in the vocabulary",
                    t.content()
                ))
            })
        };
        // transformers stores "no limit" as a huge float; CLIP's position table is 77.
        let max_length = match config.model_max_length {
            Some(n) if (2.0..=1e6).contains(&n) => n as usize,
            _ => 77,
        };
        Ok(ClipTokenizer {
            bos: id(&bos)?,
            eos: id(&eos)?,
            pad: id(&pad)?,
            max_length,
            tokenizer,
        })
    }

    fn from_vocab_and_merges(dir: &Path) -> Result<Tokenizer> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        for f in [&vocab, &merges] {
            if !f.exists() {
                return Err(Error::Tokenizer(format!(
                    "{}: missing (a tokenizer needs tokenizer.json or vocab.json + merges.txt)",
                    f.display()
                )));
            }
        }
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| tok_err(p, e));
        let (vocab_text, merges_text) = (read(&vocab)?, read(&merges)?);
        Self::clip_pipeline(
            BpeFile::new(&vocab, &vocab_text),
            BpeFile::new(&merges, &merges_text),
        )
    }

    /// CLIP's normaliser, pre-tokeniser and BPE options around the BPE files; errors name
    /// the file that is wrong.
    fn clip_pipeline(vocab: BpeFile, merges: BpeFile) -> Result<Tokenizer> {
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.vocab()?, merges.merges()?)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .fuse_unk(false)
            .unk_token("<|endoftext|>".into())
            .build()
            .map_err(|e| match e.downcast_ref::<bpe::Error>() {
                Some(bpe::Error::MergeTokenOutOfVocabulary(token)) => tok_err(
                    merges.origin,
                    format!(
                        "the merge token {token:?} is not in {}",
                        vocab.origin.display()
                    ),
                ),
                _ => tok_err(vocab.origin, e),
            })?;
        let dir = vocab.origin;
        let mut tokenizer = Tokenizer::new(bpe);
        let whitespace = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(|e| tok_err(dir, e))?;
        tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])));
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| tok_err(dir, e))?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::default().add_prefix_space(false).into(),
        ])));
        tokenizer.with_decoder(Some(ByteLevel::default()));
        Ok(tokenizer)
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The tokens of `text` alone: no start, end or padding (`add_special_tokens=False`).
    pub fn tokens(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Start of text, end of text, padding.
    pub fn special_ids(&self) -> (u32, u32, u32) {
        (self.bos, self.eos, self.pad)
    }

    /// The id of one vocabulary entry (`",</w>"`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// `tokenizer(prompt, padding="max_length", max_length=..., truncation=True).input_ids`.
    pub fn encode(&self, prompt: &str) -> Result<Tokenized> {
        let tokens = self.tokens(prompt)?;
        let body = tokens.as_slice();
        let room = self.max_length - 2;
        let kept = &body[..body.len().min(room)];
        let dropped = body.len() - kept.len();
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend_from_slice(kept);
        ids.push(self.eos);
        ids.resize(self.max_length, self.pad);
        Ok(Tokenized { ids, dropped })
    }
}
