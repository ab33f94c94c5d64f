//! A model ready to decode, from any of the files `-m` accepts: a GGUF file or an HF
//! directory (every weight resident), or a flash image (FFN weights on the SSD).

use std::path::{Path, PathBuf};

use crate::engine::flash::{FlashError, FlashFfn, FlashOptions};
use crate::engine::Session;
use crate::image::{is_flash_image, FlashImage, ImageError};
use crate::model::chat::ChatTemplate;
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::{LoadError, ModelWeights};
use crate::sparsity::Sparsity;

pub struct Model {
    pub path: PathBuf,
    pub weights: ModelWeights,
    pub tokenizer: Option<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    /// Set for a flash image: where the FFN bundles live.
    pub image: Option<FlashImage>,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Flash(#[from] FlashError),
    #[error("{0}")]
    Other(String),
}

impl Model {
    /// Opens a GGUF file, an HF directory or a flash image (resident tensors mapped).
    pub fn open(path: &Path) -> Result<Model, ModelError> {
        Model::open_with(path, None, &[])
    }

    /// Like [`Model::open`]; for a flash image with `load_direct = Some(direct)`, the
    /// resident tensors are read into process memory (direct reads when `direct`) instead of
    /// being mapped, so that a memory cap cannot evict them.
    /// Tensors named in `stream` stay mapped and untouched (see [`crate::backend::streamed`]).
    pub fn open_with(
        path: &Path,
        load_direct: Option<bool>,
        stream: &[&str],
    ) -> Result<Model, ModelError> {
        if is_flash_image(path) {
            let image = match load_direct {
                Some(direct) => FlashImage::open_loaded(path, direct, stream)?,
                None => FlashImage::open(path)?,
            };
            return Model::from_image(image);
        }
        let m = crate::model::load(path)?;
        Ok(Model {
            path: m.path,
            weights: m.weights,
            tokenizer: m.tokenizer,
            chat_template: m.chat_template,
            image: None,
        })
    }

    fn from_image(mut image: FlashImage) -> Result<Model, ModelError> {
        let path = image.path.clone();
        let path = path.as_path();
        let weights = image.weights()?;
        // Built once, then the source is dropped: for a 150k-token vocabulary its strings
        // would otherwise stay in memory twice, outside any budget.
        let tokenizer =
            match image.meta.tokenizer.take() {
                Some(src) => Some(src.build().map_err(|e| {
                    ModelError::Other(format!("{}: tokenizer: {e}", path.display()))
                })?),
                None => None,
            };
        let chat_template = match (image.chat_template(), &tokenizer) {
            (Some(t), Some(tok)) => {
                let text = |id: Option<u32>| {
                    id.and_then(|i| tok.token_text(i))
                        .unwrap_or_default()
                        .to_string()
                };
                Some(
                    ChatTemplate::new(t, &text(tok.bos()), &text(tok.eos()))
                        .map_err(|e| ModelError::Other(format!("chat template: {e}")))?,
                )
            }
            _ => None,
        };
        Ok(Model {
            path: path.to_path_buf(),
            weights,
            tokenizer,
            chat_template,
            image: Some(image),
        })
    }

    /// A decoding session. A flash image needs `flash` options (strategy, window, budget);
    /// other models ignore them and run dense from memory.
    pub fn session<'m>(
        &'m self,
        ctx: usize,
        flash: Option<FlashOptions>,
        sparsity: Option<&'m dyn Sparsity>,
    ) -> Result<Session<'m>, ModelError> {
        match &self.image {
            Some(image) => {
                let opts = flash.unwrap_or_default();
                let ffn = FlashFfn::new(image, &self.weights, sparsity, opts)?;
                Ok(Session::with_ffn(&self.weights, ctx, Box::new(ffn)))
            }
            None => Ok(Session::new(&self.weights, ctx)),
        }
    }
}
