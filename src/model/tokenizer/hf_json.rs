//! Building a [`Tokenizer`] from a Hugging Face `tokenizer.json` (and `tokenizer_config.json`).

use super::{token_type, Tokenizer, TokenizerError, TokenizerSpec};

impl Tokenizer {
    /// Builds a tokenizer from a Hugging Face `tokenizer.json` of a byte-level BPE model
    /// (and optionally `tokenizer_config.json`, for BOS/EOS/padding and `add_bos_token`).
    pub fn from_hf_json(
        tokenizer_json: &str,
        tokenizer_config_json: Option<&str>,
    ) -> Result<Tokenizer, TokenizerError> {
        use serde_json::Value;
        let fmt = |s: String| TokenizerError::HfFormat(s);
        let root: Value = serde_json::from_str(tokenizer_json)
            .map_err(|e| TokenizerError::Json(e.to_string()))?;
        let config: Option<Value> = match tokenizer_config_json {
            Some(s) => Some(
                serde_json::from_str(s)
                    .map_err(|e| TokenizerError::Json(format!("tokenizer_config.json: {e}")))?,
            ),
            None => None,
        };
        let model = root
            .get("model")
            .ok_or_else(|| fmt("no `model` section; expected a tokenizers-library file".into()))?;
        let mtype = model.get("type").and_then(Value::as_str).unwrap_or("BPE");
        if mtype != "BPE" {
            return Err(TokenizerError::UnsupportedModel(format!(
                "{mtype} (tokenizer.json)"
            )));
        }
        if model.get("byte_fallback").and_then(Value::as_bool) == Some(true)
            || !contains_type(&root, "ByteLevel")
        {
            return Err(TokenizerError::UnsupportedModel(
                "BPE without a ByteLevel pre-tokenizer/decoder (sentencepiece-style, tokenizer.json)".into(),
            ));
        }
        let vocab = model
            .get("vocab")
            .and_then(Value::as_object)
            .ok_or_else(|| fmt("`model.vocab` is missing or not an object".into()))?;
        let mut pairs: Vec<(String, u32)> = Vec::with_capacity(vocab.len());
        for (k, v) in vocab {
            let id = v.as_u64().filter(|&id| id < (1 << 24)).ok_or_else(|| {
                fmt(format!(
                    "vocab entry `{k}` has id {v}, expected an integer below 2^24"
                ))
            })?;
            pairs.push((k.clone(), id as u32));
        }
        let mut added: Vec<(String, u32, bool)> = Vec::new();
        if let Some(list) = root.get("added_tokens").and_then(Value::as_array) {
            for t in list {
                let content = t.get("content").and_then(Value::as_str);
                let id = t
                    .get("id")
                    .and_then(Value::as_u64)
                    .filter(|&id| id < (1 << 24));
                let (Some(content), Some(id)) = (content, id) else {
                    return Err(fmt(format!(
                        "added token {t} lacks `content` or a valid `id`"
                    )));
                };
                let special = t.get("special").and_then(Value::as_bool).unwrap_or(false);
                added.push((content.to_string(), id as u32, special));
            }
        }
        let size = pairs
            .iter()
            .map(|p| p.1)
            .chain(added.iter().map(|a| a.1))
            .max()
            .map_or(0, |m| m as usize + 1);
        let mut tokens = vec![String::new(); size];
        let mut types = vec![token_type::UNUSED; size];
        for (k, id) in pairs {
            tokens[id as usize] = k;
            types[id as usize] = token_type::NORMAL;
        }
        for (content, id, special) in &added {
            tokens[*id as usize] = content.clone();
            types[*id as usize] = if *special {
                token_type::CONTROL
            } else {
                token_type::USER_DEFINED
            };
        }
        let mut merges = Vec::new();
        if let Some(list) = model.get("merges").and_then(Value::as_array) {
            for (i, m) in list.iter().enumerate() {
                match m {
                    Value::String(s) => merges.push(s.clone()),
                    Value::Array(a) if a.len() == 2 => match (a[0].as_str(), a[1].as_str()) {
                        (Some(l), Some(r)) => merges.push(format!("{l} {r}")),
                        _ => return Err(fmt(format!("merge #{i} {m} is not a pair of strings"))),
                    },
                    _ => return Err(fmt(format!("merge #{i} {m} is neither \"a b\" nor [a, b]"))),
                }
            }
        }
        let pre = detect_hf_pre(root.get("pre_tokenizer").unwrap_or(&Value::Null));
        let ignore_merges = model.get("ignore_merges").and_then(Value::as_bool);

        let id_of = |v: Option<&Value>| -> Option<u32> {
            let v = v?;
            let text = v
                .as_str()
                .or_else(|| v.get("content").and_then(Value::as_str))?;
            tokens.iter().position(|t| t == text).map(|p| p as u32)
        };
        let cfg = config.as_ref();
        let mut bos = id_of(cfg.and_then(|c| c.get("bos_token")));
        let eos = id_of(cfg.and_then(|c| c.get("eos_token")));
        let pad = id_of(cfg.and_then(|c| c.get("pad_token")));
        // Without add_bos_token, a TemplateProcessing post-processor that starts with a
        // special token adds it.
        let post_first = root
            .get("post_processor")
            .and_then(|p| find_template_single(p))
            .and_then(|single| single.first().cloned())
            .and_then(|first| {
                first
                    .get("SpecialToken")
                    .and_then(|s| s.get("id"))
                    .and_then(Value::as_str)
                    .map(String::from)
            });
        let add_bos = match cfg
            .and_then(|c| c.get("add_bos_token"))
            .and_then(Value::as_bool)
        {
            Some(b) => b,
            None => match post_first {
                Some(text) => {
                    if bos.is_none() {
                        bos = tokens.iter().position(|t| *t == text).map(|p| p as u32);
                    }
                    bos.is_some()
                }
                None => false,
            },
        };
        let add_eos = cfg
            .and_then(|c| c.get("add_eos_token"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let spec = TokenizerSpec {
            model: "gpt2".into(),
            pre: pre.to_string(),
            tokens,
            token_types: types,
            merges,
            bos,
            eos,
            eot: None,
            pad,
            add_bos,
            add_eos,
            scores: Vec::new(),
            add_space_prefix: None,
        };
        Self::build(spec, ignore_merges.map(|b| b || pre == "llama3"))
    }
}

fn contains_type(v: &serde_json::Value, ty: &str) -> bool {
    match v {
        serde_json::Value::Object(m) => {
            m.get("type").and_then(|t| t.as_str()) == Some(ty)
                || m.values().any(|x| contains_type(x, ty))
        }
        serde_json::Value::Array(a) => a.iter().any(|x| contains_type(x, ty)),
        _ => false,
    }
}

fn collect_pre(v: &serde_json::Value, patterns: &mut Vec<String>, digits: &mut bool) {
    match v {
        serde_json::Value::Object(m) => {
            match m.get("type").and_then(|t| t.as_str()) {
                Some("Split") => {
                    if let Some(p) = m.get("pattern") {
                        if let Some(s) = p
                            .get("Regex")
                            .or_else(|| p.get("String"))
                            .and_then(|s| s.as_str())
                        {
                            patterns.push(s.to_string());
                        }
                    }
                }
                Some("Digits")
                    if m.get("individual_digits").and_then(|b| b.as_bool()) == Some(true) =>
                {
                    *digits = true;
                }
                _ => {}
            }
            for x in m.values() {
                collect_pre(x, patterns, digits);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_pre(x, patterns, digits)),
        _ => {}
    }
}

/// Maps an HF pre-tokenizer section to one of ours (by its Split regex, else Digits + ByteLevel).
fn detect_hf_pre(pre: &serde_json::Value) -> &'static str {
    let mut patterns = Vec::new();
    let mut digits = false;
    collect_pre(pre, &mut patterns, &mut digits);
    for p in &patterns {
        if p.contains(r"\p{N}{1,3}") && p.contains(r"[^\r\n\p{L}\p{N}]?\p{L}+") {
            return "llama3";
        }
        if p.contains(r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|") {
            return "qwen2";
        }
        if p.contains(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+") {
            return if digits { "smollm" } else { "gpt2" };
        }
    }
    if let Some(p) = patterns.first() {
        log::warn!("tokenizer.json: unrecognised pre-tokenizer pattern `{p}`; using the GPT-2 one");
    }
    if digits {
        "smollm"
    } else {
        "gpt2"
    }
}

fn find_template_single(p: &serde_json::Value) -> Option<&Vec<serde_json::Value>> {
    match p.get("type").and_then(|t| t.as_str()) {
        Some("TemplateProcessing") => p.get("single").and_then(|s| s.as_array()),
        Some("Sequence") => p
            .get("processors")
            .and_then(|a| a.as_array())
            .and_then(|a| a.iter().find_map(find_template_single)),
        _ => None,
    }
}
