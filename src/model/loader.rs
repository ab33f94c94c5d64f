//! Opening a model from a path: a GGUF file or an HF directory, with its tokenizer and chat
//! template when the file carries them.

use std::path::{Path, PathBuf};

use crate::model::chat::ChatTemplate;
use crate::model::gguf::GgufFile;
use crate::model::hf::HfModel;
use crate::model::tokenizer::{Tokenizer, TokenizerSpec};
use crate::model::weights::{LoadError, ModelWeights};

/// Where a tokenizer came from, kept so that `convert` can store it in a flash image.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum TokenizerSource {
    /// GGUF `tokenizer.ggml.*` metadata.
    Spec(TokenizerSpec),
    /// HF `tokenizer.json` and, when present, `tokenizer_config.json`, verbatim.
    HfJson {
        tokenizer: String,
        config: Option<String>,
    },
}

impl TokenizerSource {
    pub fn build(&self) -> Result<Tokenizer, crate::model::tokenizer::TokenizerError> {
        match self {
            TokenizerSource::Spec(spec) => Tokenizer::new(spec.clone()),
            TokenizerSource::HfJson { tokenizer, config } => {
                Tokenizer::from_hf_json(tokenizer, config.as_deref())
            }
        }
    }
}

/// A model ready to run.
pub struct LoadedModel {
    pub weights: ModelWeights,
    pub tokenizer: Option<Tokenizer>,
    pub tokenizer_source: Option<TokenizerSource>,
    pub chat_template: Option<ChatTemplate>,
    /// The chat template's source text.
    pub chat_template_source: Option<String>,
    pub path: PathBuf,
    /// "gguf" or "hf".
    pub format: &'static str,
}

/// Opens `path`: a directory is read as an HF checkpoint, a file as GGUF.
pub fn load(path: &Path) -> Result<LoadedModel, LoadError> {
    if !path.exists() {
        return Err(LoadError::Invalid(format!(
            "model path {} does not exist (fetch the default model with tools/fetch-model)",
            path.display()
        )));
    }
    // Checked before anything opens it: opening a FIFO blocks until a writer appears.
    let md = crate::storage::input::file_or_dir(path)
        .map_err(|e| LoadError::Invalid(format!("model path {}: {e}", path.display())))?;
    if md.is_dir() {
        load_hf(path)
    } else {
        load_gguf(path)
    }
}

fn load_gguf(path: &Path) -> Result<LoadedModel, LoadError> {
    let file = GgufFile::open(path)?;
    let weights = ModelWeights::from_gguf(&file)?;
    let source = TokenizerSource::Spec(tokenizer_spec(&file)?);
    let tokenizer = source
        .build()
        .map_err(|e| LoadError::Invalid(format!("{}: tokenizer: {e}", path.display())))?;
    let template = file
        .get("tokenizer.chat_template")
        .and_then(|v| v.as_str())
        .map(String::from);
    let chat_template = match &template {
        Some(t) => Some(chat_template(t, &tokenizer)?),
        None => None,
    };
    Ok(LoadedModel {
        weights,
        tokenizer: Some(tokenizer),
        tokenizer_source: Some(source),
        chat_template,
        chat_template_source: template,
        path: path.to_path_buf(),
        format: "gguf",
    })
}

fn load_hf(dir: &Path) -> Result<LoadedModel, LoadError> {
    let model = HfModel::open(dir)?;
    let weights = ModelWeights::from_hf(&model)?;
    let tok_path = dir.join("tokenizer.json");
    let source = if tok_path.exists() {
        let config_path = dir.join("tokenizer_config.json");
        Some(TokenizerSource::HfJson {
            tokenizer: read(&tok_path)?,
            config: match config_path.exists() {
                true => Some(read(&config_path)?),
                false => None,
            },
        })
    } else {
        None
    };
    let tokenizer = match &source {
        Some(s) => Some(
            s.build()
                .map_err(|e| LoadError::Invalid(format!("{}: {e}", tok_path.display())))?,
        ),
        None => None,
    };
    Ok(LoadedModel {
        weights,
        tokenizer,
        tokenizer_source: source,
        chat_template: None,
        chat_template_source: None,
        path: dir.to_path_buf(),
        format: "hf",
    })
}

/// A tokenizer file: a regular file of at most [`MAX_TEXT_BYTES`] of UTF-8.
///
/// [`MAX_TEXT_BYTES`]: crate::storage::input::MAX_TEXT_BYTES
fn read(path: &Path) -> Result<String, LoadError> {
    crate::storage::input::read_text(path, crate::storage::input::MAX_TEXT_BYTES)
        .map_err(|e| LoadError::Invalid(format!("cannot read {}: {e}", path.display())))
}

fn chat_template(template: &str, tok: &Tokenizer) -> Result<ChatTemplate, LoadError> {
    let text = |id: Option<u32>| {
        id.and_then(|i| tok.token_text(i))
            .unwrap_or_default()
            .to_string()
    };
    ChatTemplate::new(template, &text(tok.bos()), &text(tok.eos()))
        .map_err(|e| LoadError::Invalid(format!("chat template: {e}")))
}

/// Collects the `tokenizer.ggml.*` keys of a GGUF file into a [`TokenizerSpec`] (what
/// [`load`] builds the tokenizer from).
pub fn tokenizer_spec(f: &GgufFile) -> Result<TokenizerSpec, LoadError> {
    let strings = |key: &str| -> Result<Vec<String>, LoadError> {
        match f.get(key) {
            Some(_) => Ok(f
                .get_str_array(key)?
                .into_iter()
                .map(String::from)
                .collect()),
            None => Ok(Vec::new()),
        }
    };
    let id = |key: &str| f.get(key).and_then(|v| v.as_u64()).map(|v| v as u32);
    let flag = |key: &str, default: bool| f.get(key).and_then(|v| v.as_bool()).unwrap_or(default);
    let token_types = match f
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.as_array())
    {
        Some(a) => a.iter().map(|v| v.as_i64().unwrap_or(1) as i32).collect(),
        None => Vec::new(),
    };
    Ok(TokenizerSpec {
        model: f.get_str("tokenizer.ggml.model")?.to_string(),
        pre: f
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default")
            .to_string(),
        tokens: strings("tokenizer.ggml.tokens")?,
        token_types,
        merges: strings("tokenizer.ggml.merges")?,
        bos: id("tokenizer.ggml.bos_token_id"),
        eos: id("tokenizer.ggml.eos_token_id"),
        eot: id("tokenizer.ggml.eot_token_id"),
        pad: id("tokenizer.ggml.padding_token_id"),
        add_bos: flag("tokenizer.ggml.add_bos_token", false),
        add_eos: flag("tokenizer.ggml.add_eos_token", false),
        scores: match f.get("tokenizer.ggml.scores").and_then(|v| v.as_array()) {
            Some(a) => a
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_f32().ok_or_else(|| {
                        LoadError::Invalid(format!(
                            "tokenizer.ggml.scores[{i}] is a {}, expected a number (the file \
                             is corrupt)",
                            v.type_name()
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        },
        add_space_prefix: f
            .get("tokenizer.ggml.add_space_prefix")
            .and_then(|v| v.as_bool()),
    })
}
