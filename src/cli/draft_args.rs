//! Speculative decoding options (`--draft` and friends), shared by `generate` and `bench`.

use anyhow::{bail, Context};

use crate::backend::kv_cache::{KvCache, KvType};
use crate::draft::{
    same_vocabulary, Draft, DraftOptions, DraftSource, ModelDraft, NgramDraft, SelfDraft,
    DEFAULT_DRAFT_MAX, DEFAULT_P_MIN,
};
use crate::engine::model::Model;
use crate::engine::Session;

use crate::api::{DraftNeeds, Runner};

/// Rows of the drafting head a self draft keeps when the output head is streamed.
pub const DEFAULT_DRAFT_HEAD_ROWS: usize = 8192;

#[derive(clap::Args, Clone, Debug)]
pub struct DraftArgs {
    /// Speculative decoding: draft tokens cheaply, verify several per pass of the full model.
    /// none; self (the model restricted to the neurons its memory budget pins: no flash
    /// reads); ngram (prompt lookup); or the path of a smaller model with the same
    /// vocabulary. Greedy output is unchanged; sampled output keeps its distribution.
    /// Default: ngram for a flash image under --memory-budget (where a pass of flash reads
    /// costs most: see docs/benchmarks.md), none otherwise.
    #[arg(long)]
    pub draft: Option<DraftSource>,
    /// Tokens drafted per verify pass at most.
    #[arg(long, default_value_t = DEFAULT_DRAFT_MAX, value_parser = draft_length)]
    pub draft_max: usize,
    /// Tokens drafted per pass at least (default 0: each pass drafts the length that its
    /// measured costs and acceptance favour, none where drafting does not pay); set it to
    /// --draft-max for a fixed length.
    #[arg(long, default_value_t = 0, value_parser = draft_min)]
    pub draft_min: usize,
    /// A model draft (self or a path) stops when its most likely token's probability is
    /// below this.
    #[arg(long, default_value_t = DEFAULT_P_MIN, value_parser = probability)]
    pub draft_p_min: f64,
    /// With --draft self, when the memory plan streams the output head: rows (token ids
    /// 0..N, the most frequent in a BPE vocabulary) of the drafting head kept in memory,
    /// taken from the budget.
    #[arg(long, default_value_t = DEFAULT_DRAFT_HEAD_ROWS, value_parser = super::values::head_rows)]
    pub draft_head_rows: usize,
    /// With --draft self on a flash image: the share of each layer's FFN neurons the draft
    /// computes, chosen as the most active over the prompt and read into memory once after
    /// it (taken from the budget; neurons the window pins are not copied). 0: draft from the
    /// window's pinned neurons only (the calibration's hottest). CPU only: on --backend gpu
    /// the self draft computes the neurons pinned in the GPU windows.
    #[arg(long, default_value_t = DEFAULT_DRAFT_NEURONS, value_parser = probability)]
    pub draft_neurons: f64,
}

/// Share of each layer's FFN a self draft computes by default.
pub const DEFAULT_DRAFT_NEURONS: f64 = 0.25;

fn draft_length(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(v) if (1..=MAX_DRAFT).contains(&v) => Ok(v),
        _ => Err(format!(
            "`{s}` is not a draft length; give 1 to {MAX_DRAFT}"
        )),
    }
}

fn draft_min(s: &str) -> Result<usize, String> {
    super::values::count_in(s, 0, MAX_DRAFT)
}

/// Longest draft accepted: a verify pass holds this many rows of vocabulary-sized logits.
const MAX_DRAFT: usize = 32;

fn probability(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number; give a probability in [0, 1]"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{v} is not a probability; give a value in [0, 1]"));
    }
    Ok(v)
}

impl DraftArgs {
    /// Fixes the default source: n-gram drafts for a flash image under a memory budget
    /// (`budgeted_image`), where they measured 1.2-3x faster than none; none elsewhere, where
    /// a verify pass costs about as much compute as the steps it replaces.
    pub fn resolve(&mut self, budgeted_image: bool) {
        if self.draft.is_none() {
            self.draft = Some(match budgeted_image {
                true => DraftSource::Ngram,
                false => DraftSource::None,
            });
        }
    }

    /// The draft source (`none` until [`DraftArgs::resolve`] picks the default).
    pub fn source(&self) -> &DraftSource {
        self.draft.as_ref().unwrap_or(&DraftSource::None)
    }

    pub fn options(&self) -> DraftOptions {
        DraftOptions {
            max: self.draft_max,
            min: self.draft_min,
            p_min: self.draft_p_min,
        }
    }

    /// The prompt-lookup options when the resolved source is `ngram`; `None` for `none`, and
    /// for `self` or a model path with a note on stderr that `command` drafts with n-grams
    /// only (`why` says why).
    pub fn ngram_only(&self, command: &str, why: &str) -> Option<DraftOptions> {
        match self.source() {
            DraftSource::None => None,
            DraftSource::Ngram => Some(self.options()),
            other => {
                eprintln!(
                    "note: {command} drafts with --draft ngram only{why}; --draft {} is off here",
                    other.name()
                );
                None
            }
        }
    }

    pub fn enabled(&self) -> bool {
        *self.source() != DraftSource::None
    }

    /// Opens a draft model (`--draft PATH`), refused unless it shares `target`'s vocabulary.
    pub fn open_model(&self, target: &Model) -> anyhow::Result<Option<Model>> {
        let DraftSource::Model(path) = self.source() else {
            return Ok(None);
        };
        let mut draft = Model::open(path)
            .with_context(|| format!("loading the draft model {}", path.display()))?;
        // The draft computes in the target's arithmetic.
        draft.weights.activations = target.weights.activations;
        match (&target.tokenizer, &draft.tokenizer) {
            (Some(t), Some(d)) => same_vocabulary(t, d).map_err(|e| {
                anyhow::anyhow!(
                    "{} cannot draft for {}: {e}",
                    path.display(),
                    target.path.display()
                )
            })?,
            _ => {
                if target.weights.config.vocab_size != draft.weights.config.vocab_size {
                    bail!(
                        "{} cannot draft for {}: their vocabularies differ in size ({} and {})",
                        path.display(),
                        target.path.display(),
                        draft.weights.config.vocab_size,
                        target.weights.config.vocab_size
                    );
                }
            }
        }
        Ok(Some(draft))
    }

    /// Neurons per layer a self draft chooses from the prompt for `target` (0: pinned only).
    pub fn prompt_neurons(&self, target: &Model) -> usize {
        let n = target.weights.config.intermediate_size;
        (self.draft_neurons * n as f64).round() as usize
    }

    /// What the draft takes from a memory plan of `target` over `ctx` positions.
    pub fn needs(&self, target: &Model, draft_model: Option<&Model>, ctx: usize) -> DraftNeeds {
        let model = draft_model.map_or(0, |m| {
            let file = std::fs::metadata(&m.path).map_or(0, |md| md.len());
            file + KvCache::bytes_for(&m.weights.config, ctx, KvType::default())
        });
        let (neurons, neuron_bytes) = match (self.source(), &target.image) {
            (DraftSource::SelfModel, Some(image)) => {
                let layers = target.weights.config.n_layers;
                let per_neuron = (layers * image.bundle().stride) as u64;
                (self.prompt_neurons(target), per_neuron)
            }
            _ => (0, 0),
        };
        let head_rows = match self.source() {
            DraftSource::SelfModel => self.draft_head_rows,
            _ => 0,
        };
        DraftNeeds {
            reserved: model,
            neurons,
            neuron_bytes,
            head_rows,
        }
    }

    /// `runner` planned for drafting (a no-op without a draft).
    pub fn plan(&self, runner: Runner, draft_model: Option<&Model>, ctx: usize) -> Runner {
        if !self.enabled() {
            return runner;
        }
        let needs = self.needs(&runner.model, draft_model, ctx);
        runner.drafting(self.draft_max, needs)
    }
}

/// A built draft, owning what it needs.
pub enum BuiltDraft<'m> {
    None,
    Ngram(NgramDraft),
    SelfModel(SelfDraft),
    Model(Box<ModelDraft<'m>>),
}

impl<'m> BuiltDraft<'m> {
    /// The draft `args` ask for, for decoding with `target`.
    /// The draft `args` ask for, for decoding with `target`, a session `runner` built (its
    /// plan says how many neurons a self draft may hold).
    pub fn new(
        args: &DraftArgs,
        runner: &Runner,
        target: &Session,
        draft_model: Option<&'m Model>,
        ctx: usize,
    ) -> anyhow::Result<BuiltDraft<'m>> {
        let p_min = args.draft_p_min;
        let target_model = &runner.model;
        // Unbudgeted sessions hold what they ask for; planned ones what the plan left room for.
        let neurons = match target_model.image {
            Some(_) => {
                (runner.draft_neurons()).unwrap_or_else(|| args.prompt_neurons(target_model))
            }
            None => 0,
        };
        Ok(match (args.source(), draft_model) {
            (DraftSource::None, _) => BuiltDraft::None,
            (DraftSource::Ngram, _) => BuiltDraft::Ngram(NgramDraft::new()),
            (DraftSource::SelfModel, _) if neurons > 0 => {
                BuiltDraft::SelfModel(SelfDraft::from_prompt(p_min, neurons))
            }
            (DraftSource::SelfModel, _) => BuiltDraft::SelfModel(SelfDraft::new(target, p_min)?),
            (DraftSource::Model(_), Some(m)) => {
                let bytes = args.needs(target_model, Some(m), ctx).reserved as usize;
                let session = m.session(ctx, None, None)?;
                BuiltDraft::Model(Box::new(ModelDraft::new(session, args.draft_p_min, bytes)))
            }
            (DraftSource::Model(p), None) => {
                bail!("the draft model {} was not opened", p.display())
            }
        })
    }

    /// The draft as the decode loop takes it, with its name for the statistics.
    pub fn as_dyn<'s, 'w>(
        &'s mut self,
        name: &'s str,
    ) -> Option<(&'s mut dyn Draft<Session<'w>>, &'s str)> {
        let d: &mut dyn Draft<Session<'w>> = match self {
            BuiltDraft::None => return None,
            BuiltDraft::Ngram(d) => d,
            BuiltDraft::SelfModel(d) => d,
            BuiltDraft::Model(d) => d.as_mut(),
        };
        Some((d, name))
    }
}
