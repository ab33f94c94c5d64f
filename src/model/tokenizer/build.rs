//! Building a [`Tokenizer`] from a [`TokenizerSpec`] (what a GGUF file's `tokenizer.ggml.*`
//! keys say), checking everything it is given.

use std::collections::HashMap;

use super::byte_level::{bytes_to_unicode, unicode_to_byte};
use super::{token_type, PreTokenizer, Tokenizer, TokenizerError, TokenizerSpec};

/// Texts llama.cpp treats as end of generation wherever they appear in a vocabulary.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

/// Texts llama.cpp takes as the end-of-turn token when the file names none.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "_<EOT>",
    "<|end▁of▁sentence|>",
];
impl Tokenizer {
    /// Builds a tokenizer from what a model file says; checks everything it is given.
    pub fn new(spec: TokenizerSpec) -> Result<Tokenizer, TokenizerError> {
        Self::build(spec, None)
    }

    pub(super) fn build(
        spec: TokenizerSpec,
        ignore_merges: Option<bool>,
    ) -> Result<Tokenizer, TokenizerError> {
        let sentencepiece = match spec.model.as_str() {
            "gpt2" => false,
            "llama" => true,
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };
        // SentencePiece does not pre-tokenise (llama.cpp ignores `tokenizer.ggml.pre` for it).
        let pre = match sentencepiece {
            true => PreTokenizer::Gpt2,
            false => PreTokenizer::from_name(&spec.pre)?,
        };
        let n = spec.tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        if sentencepiece && spec.scores.len() != n {
            return Err(TokenizerError::ScoresLength {
                scores: spec.scores.len(),
                tokens: n,
            });
        }
        if n > u32::MAX as usize / 2 {
            return Err(TokenizerError::HfFormat(format!(
                "vocabulary of {n} tokens is too large"
            )));
        }
        let types = if spec.token_types.is_empty() {
            vec![token_type::NORMAL; n]
        } else if spec.token_types.len() != n {
            return Err(TokenizerError::TokenTypesLength {
                types: spec.token_types.len(),
                tokens: n,
            });
        } else {
            spec.token_types
        };
        for (which, id) in [
            ("BOS", spec.bos),
            ("EOS", spec.eos),
            ("EOT", spec.eot),
            ("padding", spec.pad),
        ] {
            if let Some(id) = id {
                if id as usize >= n {
                    return Err(TokenizerError::SpecialIdOutOfRange {
                        which,
                        id,
                        vocab: n,
                    });
                }
            }
        }
        let tokens = spec.tokens;
        let mut token_to_id = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            // llama.cpp: a later duplicate wins.
            token_to_id.insert(t.clone(), i as u32);
        }

        // Symbols and merges.
        let mut extra: Vec<String> = Vec::new();
        let mut extra_ids: HashMap<String, u32> = HashMap::new();
        let mut sym = |s: &str, extra: &mut Vec<String>| -> u32 {
            if let Some(&id) = token_to_id.get(s) {
                return id;
            }
            if let Some(&id) = extra_ids.get(s) {
                return id;
            }
            let id = (n + extra.len()) as u32;
            extra.push(s.to_string());
            extra_ids.insert(s.to_string(), id);
            id
        };
        let b2u = bytes_to_unicode();
        let mut byte_sym = [0u32; 256];
        let mut buf = [0u8; 4];
        for b in 0..256 {
            byte_sym[b] = sym(b2u[b].encode_utf8(&mut buf), &mut extra);
        }
        let mut merges = HashMap::with_capacity(spec.merges.len());
        for (rank, m) in spec.merges.iter().enumerate() {
            // llama.cpp: split at the first space after the first byte.
            let split = m
                .as_bytes()
                .iter()
                .skip(1)
                .position(|&b| b == b' ')
                .map(|p| p + 1);
            let Some(p) = split else {
                return Err(TokenizerError::BadMerge {
                    index: rank,
                    merge: m.clone(),
                });
            };
            let (l, r) = (&m[..p], &m[p + 1..]);
            let li = sym(l, &mut extra);
            let ri = sym(r, &mut extra);
            let mi = sym(&format!("{l}{r}"), &mut extra);
            merges.entry((li, ri)).or_insert((rank as u32, mi));
        }

        // Special tokens, longest first.
        let mut specials: Vec<(String, u32, bool)> = types
            .iter()
            .enumerate()
            .filter(|&(i, &t)| {
                matches!(
                    t,
                    token_type::CONTROL | token_type::USER_DEFINED | token_type::UNKNOWN
                ) && !tokens[i].is_empty()
            })
            .map(|(i, &t)| (tokens[i].clone(), i as u32, t != token_type::USER_DEFINED))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));

        // Decoded bytes.
        let mut bytes = Vec::with_capacity(n * 6);
        let mut offs = Vec::with_capacity(n + 1);
        offs.push(0);
        for (t, &ty) in tokens.iter().zip(types.iter()) {
            if matches!(
                ty,
                token_type::CONTROL | token_type::USER_DEFINED | token_type::UNKNOWN
            ) {
                bytes.extend_from_slice(t.as_bytes());
            } else if sentencepiece {
                // llama.cpp's `token_to_piece` for SPM: a byte token is its byte, a normal
                // one its text with `▁` back to spaces.
                match (ty, super::spm::parse_byte_token(t)) {
                    (token_type::BYTE, Some(b)) => bytes.push(b),
                    _ => bytes.extend_from_slice(t.replace('\u{2581}', " ").as_bytes()),
                }
            } else {
                for c in t.chars() {
                    match unicode_to_byte(c) {
                        Some(b) => bytes.push(b),
                        None => bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes()),
                    }
                }
            }
            offs.push(bytes.len());
        }

        let find = |texts: &[&str]| texts.iter().find_map(|t| token_to_id.get(*t).copied());
        let eot = spec.eot.or_else(|| find(EOT_TEXTS));
        let mut eog: Vec<u32> = [spec.eos, eot].into_iter().flatten().collect();
        eog.extend(
            EOG_TEXTS
                .iter()
                .filter_map(|t| token_to_id.get(*t).copied()),
        );
        eog.sort_unstable();
        eog.dedup();

        let mut add_bos = spec.add_bos;
        if add_bos && spec.bos.is_none() {
            log::warn!("tokenizer says to add a BOS token but names none; not adding one");
            add_bos = false;
        }
        let mut add_eos = spec.add_eos;
        if add_eos && spec.eos.is_none() {
            log::warn!("tokenizer says to add an EOS token but names none; not adding one");
            add_eos = false;
        }
        let spm = sentencepiece.then(|| {
            // llama.cpp's `byte_to_token`: the `<0xXX>` token, else the byte's own text.
            let mut byte_tokens = [None; 256];
            for (b, slot) in byte_tokens.iter_mut().enumerate() {
                let b = b as u8;
                *slot = token_to_id
                    .get(&super::spm::byte_token_text(b))
                    .or_else(|| {
                        (b < 0x80)
                            .then(|| token_to_id.get(&(b as char).to_string()))
                            .flatten()
                    })
                    .copied();
            }
            super::spm::Spm {
                scores: spec.scores.clone(),
                byte_tokens,
                add_space_prefix: spec.add_space_prefix.unwrap_or(true),
            }
        });
        Ok(Tokenizer {
            spm,
            pre,
            tokens,
            types,
            token_to_id,
            byte_sym,
            extra,
            merges,
            ignore_merges: ignore_merges.unwrap_or(pre == PreTokenizer::Llama3),
            specials,
            bytes,
            offs,
            bos: spec.bos,
            eos: spec.eos,
            eot,
            pad: spec.pad,
            add_bos,
            add_eos,
            eog,
        })
    }
}
