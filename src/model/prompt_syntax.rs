//! AUTOMATIC1111's prompt syntax: emphasis (`(word)` x1.1, `[word]` /1.1, `(word:1.5)`,
//! `\(` for a literal bracket), `BREAK`, and prompts of any length in chunks of 75 tokens,
//! each encoded on its own between start and end tokens (A1111's `prompt_parser.py`
//! `parse_prompt_attention` and `sd_hijack_clip.py` `tokenize_line`, read from its source).
//!
//! diffusers has none of this: its pipelines encode a prompt's first 75 tokens as written.
//! So the plain syntax stays the default, and this one is asked for (`prompt_syntax`) or
//! implied by the A1111 routes.

use crate::error::Result;
use crate::model::tokenizer::ClipTokenizer;

/// How a prompt's text is read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PromptSyntax {
    /// diffusers': the text as written, cut at the tokenizer's length.
    #[default]
    Plain,
    /// AUTOMATIC1111's: emphasis weights, BREAK, and chunks of 75 tokens.
    A1111,
}

impl PromptSyntax {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "diffusers" | "plain" => Some(PromptSyntax::Plain),
            "a1111" | "automatic1111" => Some(PromptSyntax::A1111),
            _ => None,
        }
    }
}

/// A run of prompt text with its emphasis weight, or a `BREAK`.
#[derive(Clone, Debug, PartialEq)]
pub enum Segment {
    Text(String, f64),
    Break,
}

const ROUND: f64 = 1.1;
const SQUARE: f64 = 1.0 / 1.1;

/// A1111's `parse_prompt_attention`: the prompt as runs of equal weight. Brackets left
/// open apply to the end; a `)` or `]` with nothing open is kept as text; runs with equal
/// weights next to each other are joined.
pub fn parse_emphasis(prompt: &str) -> Vec<Segment> {
    // (text, weight); a BREAK is weight -1, as A1111 marks it.
    let mut res: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<(String, f64)>, from: usize, by: f64| {
        for r in &mut res[from..] {
            r.1 *= by;
        }
    };
    let mut rest = prompt;
    while let Some(c) = rest.chars().next() {
        match c {
            '\\' => {
                // `\(`, `\)`, `\[`, `\]`, `\\` are the character; a lone `\` is dropped
                // (A1111 keeps what follows the backslash of its match, here nothing).
                let next = rest[1..].chars().next();
                match next {
                    Some(n @ ('(' | ')' | '[' | ']' | '\\')) => {
                        res.push((n.to_string(), 1.0));
                        rest = &rest[2..];
                    }
                    _ => {
                        res.push((String::new(), 1.0));
                        rest = &rest[1..];
                    }
                }
            }
            '(' => {
                round.push(res.len());
                rest = &rest[1..];
            }
            '[' => {
                square.push(res.len());
                rest = &rest[1..];
            }
            ':' => {
                // `:` number `)` closes a weighted round bracket.
                match weight_close(&rest[1..]) {
                    Some((weight, len)) if !round.is_empty() => {
                        let from = round.pop().unwrap_or_default();
                        multiply(&mut res, from, weight);
                        rest = &rest[1 + len..];
                    }
                    _ => {
                        push_text(&mut res, ":");
                        rest = &rest[1..];
                    }
                }
            }
            ')' if !round.is_empty() => {
                let from = round.pop().unwrap_or_default();
                multiply(&mut res, from, ROUND);
                rest = &rest[1..];
            }
            ']' if !square.is_empty() => {
                let from = square.pop().unwrap_or_default();
                multiply(&mut res, from, SQUARE);
                rest = &rest[1..];
            }
            ')' | ']' => {
                push_text(&mut res, &c.to_string());
                rest = &rest[1..];
            }
            _ => {
                // Text up to the next special character.
                let end = rest
                    .find(['\\', '(', ')', '[', ']', ':'])
                    .unwrap_or(rest.len());
                push_text(&mut res, &rest[..end]);
                rest = &rest[end..];
            }
        }
    }
    for from in round {
        multiply(&mut res, from, ROUND);
    }
    for from in square {
        multiply(&mut res, from, SQUARE);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    // Join neighbours of equal weight.
    let mut joined: Vec<(String, f64)> = Vec::with_capacity(res.len());
    for (text, weight) in res {
        match joined.last_mut() {
            Some(last) if last.1 == weight => last.0.push_str(&text),
            _ => joined.push((text, weight)),
        }
    }
    joined
        .into_iter()
        // A BREAK inside brackets has had its -1 multiplied and is text, as in A1111.
        .map(|(text, weight)| {
            if weight == -1.0 && text == "BREAK" {
                Segment::Break
            } else {
                Segment::Text(text, weight)
            }
        })
        .collect()
}

/// A run of plain text: each `BREAK` (a word of its own, with the spaces around it) splits
/// it, as A1111's `re_break` does.
fn push_text(res: &mut Vec<(String, f64)>, text: &str) {
    let mut parts = split_breaks(text).into_iter();
    if let Some(first) = parts.next() {
        res.push((first, 1.0));
    }
    for part in parts {
        res.push(("BREAK".into(), -1.0));
        res.push((part, 1.0));
    }
}

/// `re.split(r"\s*\bBREAK\b\s*", text)`.
fn split_breaks(text: &str) -> Vec<String> {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let mut parts = Vec::new();
    let mut start = 0;
    let mut search = 0;
    while let Some(found) = text[search..].find("BREAK") {
        let at = search + found;
        let end = at + "BREAK".len();
        let before_ok = !text[..at].chars().next_back().is_some_and(word);
        let after_ok = !text[end..].chars().next().is_some_and(word);
        if before_ok && after_ok {
            let cut_start = text[..at].trim_end().len();
            let rest = &text[end..];
            let cut_end = end + (rest.len() - rest.trim_start().len());
            parts.push(text[start..cut_start.max(start)].to_string());
            start = cut_end;
            search = cut_end;
        } else {
            search = end;
        }
    }
    parts.push(text[start..].to_string());
    parts
}

/// `\s*([+-]?[.\d]+)\s*\)` after a `:`: the weight and the characters it took.
fn weight_close(s: &str) -> Option<(f64, usize)> {
    let trimmed = s.trim_start();
    let skipped = s.len() - trimmed.len();
    let digits = trimmed
        .char_indices()
        .take_while(|&(i, c)| c.is_ascii_digit() || c == '.' || (i == 0 && (c == '+' || c == '-')))
        .map(|(i, c)| i + c.len_utf8())
        .last()?;
    let number = &trimmed[..digits];
    let after = &trimmed[digits..];
    let close = after.trim_start();
    if !close.starts_with(')') {
        return None;
    }
    // A1111 takes `float(...)` of what the pattern matched; one that is not a number
    // (`1.2.3`) is an error there and plain text here.
    let weight: f64 = number.parse().ok()?;
    Some((weight, skipped + digits + (after.len() - close.len()) + 1))
}

/// One chunk: the tokenizer's length of ids (start, up to 75 tokens, end, padding) and a
/// weight per id.
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

/// How far back from a full chunk A1111 looks for a comma to break at (its
/// `comma_padding_backtrack` option, default 20).
const COMMA_BACKTRACK: usize = 20;

/// A1111's `tokenize_line`: the prompt's segments tokenized one by one and laid into chunks
/// of `max_length - 2` tokens; a chunk that fills up within 20 tokens of a comma breaks
/// after the comma; `BREAK` starts a new chunk. Each chunk is wrapped in start and end and
/// padded (the tokenizer's padding after the first end, as A1111 does for SD 2.x, the end
/// token itself for SD 1.x). At least one chunk.
pub fn chunks(tokenizer: &ClipTokenizer, prompt: &str) -> Result<Vec<Chunk>> {
    let (bos, eos, pad) = tokenizer.special_ids();
    let length = tokenizer.max_length() - 2;
    let comma = tokenizer.token_id(",</w>");
    let mut done: Vec<Chunk> = Vec::new();
    let mut ids: Vec<u32> = Vec::new();
    let mut weights: Vec<f32> = Vec::new();
    let mut last_comma: Option<usize> = None;
    let close = |ids: &mut Vec<u32>, weights: &mut Vec<f32>, done: &mut Vec<Chunk>| {
        let mut chunk_ids = Vec::with_capacity(length + 2);
        chunk_ids.push(bos);
        chunk_ids.append(ids);
        chunk_ids.push(eos);
        chunk_ids.resize(length + 2, pad);
        let mut chunk_weights = Vec::with_capacity(length + 2);
        chunk_weights.push(1.0);
        chunk_weights.append(weights);
        chunk_weights.resize(length + 2, 1.0);
        done.push(Chunk {
            ids: chunk_ids,
            weights: chunk_weights,
        });
    };
    for segment in parse_emphasis(prompt) {
        let (text, weight) = match segment {
            Segment::Break => {
                close(&mut ids, &mut weights, &mut done);
                last_comma = None;
                continue;
            }
            Segment::Text(text, weight) => (text, weight as f32),
        };
        for token in tokenizer.tokens(&text)? {
            if Some(token) == comma {
                last_comma = Some(ids.len());
            } else if ids.len() == length {
                if let Some(at) = last_comma.filter(|&at| length - at <= COMMA_BACKTRACK) {
                    // Move what follows the comma into the next chunk.
                    let moved_ids = ids.split_off(at + 1);
                    let moved_weights = weights.split_off(at + 1);
                    close(&mut ids, &mut weights, &mut done);
                    last_comma = None;
                    ids = moved_ids;
                    weights = moved_weights;
                }
            }
            if ids.len() == length {
                close(&mut ids, &mut weights, &mut done);
                last_comma = None;
            }
            ids.push(token);
            weights.push(weight);
        }
    }
    if !ids.is_empty() || done.is_empty() {
        close(&mut ids, &mut weights, &mut done);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(t: &str, w: f64) -> Segment {
        Segment::Text(t.into(), w)
    }

    fn close(a: &[Segment], b: &[Segment]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|pair| match pair {
                (Segment::Text(x, v), Segment::Text(y, w)) => x == y && (v - w).abs() < 1e-12,
                (Segment::Break, Segment::Break) => true,
                _ => false,
            })
    }

    /// A1111's own examples (`parse_prompt_attention`'s docstring), and the corners.
    #[test]
    fn emphasis_parses_as_automatic1111_does() {
        let cases: Vec<(&str, Vec<Segment>)> = vec![
            ("normal text", vec![text("normal text", 1.0)]),
            (
                "an (important) word",
                vec![text("an ", 1.0), text("important", 1.1), text(" word", 1.0)],
            ),
            ("(unbalanced", vec![text("unbalanced", 1.1)]),
            ("\\(literal\\]", vec![text("(literal]", 1.0)]),
            (
                "(unnecessary)(parens)",
                vec![text("unnecessaryparens", 1.1)],
            ),
            (
                "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
                vec![
                    text("a ", 1.0),
                    text("house", 1.3 * 1.1 * 1.1),
                    text(" ", 1.1),
                    text("on", 1.0),
                    text(" a ", 1.1),
                    text("hill", 0.55),
                    text(", sun, ", 1.1),
                    text("sky", 1.1 * 1.1 * 1.1 * 1.1),
                    text(".", 1.1),
                ],
            ),
            ("[faint]", vec![text("faint", 1.0 / 1.1)]),
            ("((a:2) b)", vec![text("a", 2.2), text(" b", 1.1)]),
            ("(a: 0.5 )", vec![text("a", 0.5)]),
            ("a:b (c:d)", vec![text("a:b ", 1.0), text("c:d", 1.1)]),
            ("stray) and ]", vec![text("stray) and ]", 1.0)]),
            (
                "a BREAK b",
                vec![text("a", 1.0), Segment::Break, text("b", 1.0)],
            ),
            ("BREAKFAST", vec![text("BREAKFAST", 1.0)]),
            ("", vec![text("", 1.0)]),
            ("a \\ b", vec![text("a  b", 1.0)]),
            ("(x:1.5", vec![text("x:1.5", 1.1)]),
        ];
        for (prompt, want) in cases {
            let got = parse_emphasis(prompt);
            assert!(close(&got, &want), "{prompt:?}: {got:?}, want {want:?}");
        }
    }

    fn tokenizer() -> ClipTokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models/sd1/tokenizer");
        ClipTokenizer::from_dir(&dir).unwrap()
    }

    #[test]
    fn short_prompts_chunk_as_diffusers_tokenizes_them() {
        let t = tokenizer();
        for prompt in ["a photo of a cat", "", "an astronaut, riding a horse"] {
            let chunks = chunks(&t, prompt).unwrap();
            assert_eq!(chunks.len(), 1, "{prompt}");
            assert_eq!(chunks[0].ids, t.encode(prompt).unwrap().ids, "{prompt}");
            assert!(chunks[0].weights.iter().all(|&w| w == 1.0));
        }
    }

    #[test]
    fn long_prompts_break_in_chunks_at_commas_and_break() {
        let t = tokenizer();
        let (bos, eos, _) = t.special_ids();
        let cat = t.tokens("cat").unwrap()[0];
        let comma = t.token_id(",</w>").unwrap();

        // 80 words: 75 in the first chunk, 5 in the second.
        let prompt = vec!["cat"; 80].join(" ");
        let c = chunks(&t, &prompt).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].ids.len(), 77);
        assert!(c[0].ids[1..76].iter().all(|&id| id == cat));
        assert_eq!((c[0].ids[0], c[0].ids[76]), (bos, eos));
        assert_eq!(&c[1].ids[..7], &[bos, cat, cat, cat, cat, cat, eos]);

        // A comma 10 tokens before the end of the first chunk: what follows it moves on.
        let prompt = format!(
            "{}, {}",
            vec!["cat"; 65].join(" "),
            vec!["cat"; 20].join(" ")
        );
        let c = chunks(&t, &prompt).unwrap();
        assert_eq!(c[0].ids[66], comma);
        assert_eq!(c[0].ids[67], eos);
        assert_eq!(c[1].ids[1..21], [cat; 20]);

        // BREAK: a new chunk, the rest padded.
        let c = chunks(&t, "cat BREAK (cat:1.5)").unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(&c[0].ids[..3], &[bos, cat, eos]);
        assert_eq!((c[1].ids[1], c[1].weights[1]), (cat, 1.5));
        assert_eq!(c[1].weights[0], 1.0);
    }
}
