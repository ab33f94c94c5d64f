//! A model opened to run, and the sessions it plans under a memory budget: which neurons
//! each token computes, the window's slots and pins, what is streamed from the image, what a
//! speculative draft may hold.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{bail, Context};

use super::notice::{Notice, Notify};
use super::options::RunOptions;
use crate::backend::kv_cache::{KvCache, KvType};
use crate::backend::streamed::{OutputRows, RowSource, STREAM_STAGING, TABLES};
use crate::budget::{self, Needs, Table};
use crate::engine::flash::{lookahead_extra_bytes, Selection, Strategy};
use crate::engine::model::Model;
use crate::engine::{Session, BUDGET_SCORE_BATCH};
use crate::image::{is_flash_image, FlashImage};
use crate::sparsity::synthetic::SyntheticActivity;
use crate::sparsity::{Calibration, Sets, Sparsity};
use crate::storage::DiskCurve;

/// The predictor is kept under a budget only if it is expected to read less than this share
/// of what computing every neuron reads. Dense reads are the same every token, so lookahead
/// reads them in the background, in large requests, while the previous layer computes: on
/// Qwen2.5-1.5B under a 512 MiB cap, dense reads of 772 MB per token ran at 2.36 tokens/s and
/// predicted reads of 781 MB at 1.04 (docs/benchmarks.md).
pub const PREDICTOR_READ_SHARE: f64 = 0.75;

/// The choice between a plan with the predictors and one computing every neuron: the
/// predictor's if it is expected to read under `share` of the dense bytes per token
/// (`reads(plan, selection)`) or the dense plan does not fit, the dense one otherwise (said
/// through `say`, naming the plan `label`). Both errors when neither fits.
pub fn choose_selection<P, E>(
    label: &'static str,
    plans: (Result<P, E>, Result<P, E>),
    share: f64,
    reads: impl Fn(&P, Selection) -> f64,
    say: impl Fn(Notice),
) -> Result<(Selection, P), (E, E)> {
    let mb = |b: f64| b / 1e6;
    match plans {
        (Ok(p), Ok(d)) => {
            let predicted = reads(&p, Selection::Predictor);
            let dense = reads(&d, Selection::All);
            log::info!(
                "{label}: expected reads per token: {:.1} MB predicting, {:.1} MB dense",
                mb(predicted),
                mb(dense)
            );
            if predicted < share * dense {
                return Ok((Selection::Predictor, p));
            }
            say(Notice::Dense {
                plan: label,
                dense,
                predicted,
            });
            Ok((Selection::All, d))
        }
        (Ok(p), Err(_)) => Ok((Selection::Predictor, p)),
        (Err(_), Ok(d)) => {
            say(Notice::NoRoomForPredictors { plan: label });
            Ok((Selection::All, d))
        }
        (Err(p), Err(d)) => Err((p, d)),
    }
}

/// A model opened to run with its [`RunOptions`]: it plans and builds the sessions that
/// decode it (under a memory budget: which neurons, window slots and pins, streamed tables).
pub struct Runner {
    /// The model, its tokenizer and (for a flash image) the image.
    pub model: Model,
    /// How the model runs.
    options: RunOptions,
    /// Where the planner's notices go.
    notices: Notify,
    /// The image's calibration without its predictors (thresholds, frequencies), when it has
    /// one: what planning and the oracle need.
    pub calibration: Option<Calibration>,
    /// The calibration with its predictors, loaded by the first session that uses them (a
    /// budget may be better spent on window slots than on predictors).
    predicting: OnceLock<Calibration>,
    /// Random active sets instead of a predictor (`--synthetic-activity`).
    synthetic: Option<SyntheticActivity>,
    /// The embedding and output head were left out of the load: each session reads them
    /// (or streams them) as its memory plan says.
    tables_deferred: bool,
    /// What the process holds outside any plan (code, tokenizer, threads: see
    /// [`budget::process`]), taken from every memory budget.
    process: u64,
    /// Rows of logits a session holds at once: 1 to generate, a scored batch's for perplexity,
    /// a verify pass's when drafting, one per sequence when serving several.
    logits_rows: usize,
    /// Sequences decoded together, each with a KV cache of its own (see [`Runner::batch`]).
    sequences: usize,
    /// What drafting takes from the budget and what it needs from the session.
    draft: DraftNeeds,
    /// The draft neurons per layer the last planned session holds room for (`None` before
    /// any session was planned under a budget).
    draft_neurons: std::cell::Cell<Option<usize>>,
    /// Rows of the drafting head the last planned session holds room for.
    draft_head_rows: std::cell::Cell<usize>,
    /// Planning attempts that may be dropped say nothing.
    quiet: std::cell::Cell<bool>,
}

/// A speculative draft's claims on a session's memory plan.
#[derive(Clone, Debug, Default)]
pub struct DraftNeeds {
    /// Bytes held outside the target (a separate draft model and its cache).
    pub reserved: u64,
    /// Neurons per layer a self draft asks to hold (chosen from the prompt), and the bytes
    /// each such neuron costs over all layers: the planner gives it fewer when the budget
    /// cannot hold them beside what the model needs.
    pub neurons: usize,
    /// Bytes one such neuron costs over all layers.
    pub neuron_bytes: u64,
    /// Token rows of the drafting head to keep resident when the plan streams the output
    /// head (a self draft); 0 for none.
    pub head_rows: usize,
}

impl Runner {
    /// Opens `path` to run with `args`; a flash image's resident tensors are read into memory
    /// (direct reads unless `args.direct` is off), except for the `mmap` strategy, which maps
    /// everything.
    pub fn open(path: &Path, args: RunOptions) -> anyhow::Result<Runner> {
        Runner::open_with(path, args, super::notice::log_notice())
    }

    /// [`Runner::open`] with the planner's notices going to `notices`. Under a memory or
    /// VRAM budget a model file that is not a flash image is opened through the conversion
    /// cache ([`super::cache`]): converted on first use, reused after.
    pub fn open_with(path: &Path, args: RunOptions, notices: Notify) -> anyhow::Result<Runner> {
        let budgeted = args.memory_budget.is_some() || args.vram_budget.is_some();
        let converted;
        let path = if budgeted && !is_flash_image(path) {
            let dir = match &args.cache_dir {
                Some(dir) => dir.clone(),
                None => super::cache::cache_dir()?,
            };
            let (image, reused) = super::cache::image_for(path, &dir, args.progress)?;
            notices(&Notice::Converted {
                path: image.clone(),
                reused,
            });
            converted = image;
            converted.as_path()
        } else {
            path
        };
        let load = (args.strategy != Strategy::Mmap).then_some(args.direct);
        let tables_deferred =
            load.is_some() && args.memory_budget.is_some() && is_flash_image(path);
        let defer: &[&str] = if tables_deferred { &TABLES } else { &[] };
        let mut model = Model::open_with(path, load, defer)
            .with_context(|| format!("loading {}", path.display()))?;
        model.weights.activations = args.activations;
        let process = process_overhead(&model, &args);
        let calibration = match &model.image {
            Some(image) => Calibration::load_stats(image)
                .with_context(|| format!("reading the calibration of {}", path.display()))?,
            None => None,
        };
        let c = &model.weights.config;
        let synthetic = args.synthetic_activity.map(|density| {
            SyntheticActivity::new(
                c.n_layers,
                c.intermediate_size,
                density,
                args.synthetic_churn,
                0x5eed,
            )
        });
        Ok(Runner {
            model,
            options: args,
            notices,
            calibration,
            predicting: OnceLock::new(),
            synthetic,
            tables_deferred,
            process,
            logits_rows: 1,
            sequences: 1,
            draft: DraftNeeds::default(),
            draft_neurons: std::cell::Cell::new(None),
            draft_head_rows: std::cell::Cell::new(0),
            quiet: std::cell::Cell::new(false),
        })
    }

    /// Passes `notice` to where notices go.
    pub fn notify(&self, notice: &Notice) {
        (self.notices)(notice)
    }

    /// The options the model runs with.
    pub fn options(&self) -> &RunOptions {
        &self.options
    }

    /// Tells the user of a choice made for them (unless planning quietly).
    fn say(&self, notice: Notice) {
        if !self.quiet.get() {
            self.notify(&notice)
        }
    }

    /// For sessions that score every position ([`Session::score`]): under a budget they hold a
    /// batch of logits rows at once, which the plan then counts.
    pub fn scoring(self) -> Runner {
        Runner {
            logits_rows: BUDGET_SCORE_BATCH,
            ..self
        }
    }

    /// For batches of `n` sequences decoded together (`Session::into_batch`): the plan counts
    /// their KV caches and a logits row for each.
    pub fn serving(self, n: usize) -> Runner {
        Runner {
            logits_rows: self.logits_rows.max(n),
            sequences: n.max(1),
            ..self
        }
    }

    /// For sessions that verify drafts of up to `max_draft` tokens: the plan counts their
    /// logits rows and `needs`.
    pub fn drafting(self, max_draft: usize, needs: DraftNeeds) -> Runner {
        Runner {
            logits_rows: self.logits_rows.max(max_draft + 1),
            draft: needs,
            ..self
        }
    }

    /// What decides `selection`'s neurons: the synthetic activity, or the calibration (with
    /// its predictors loaded when the predictor selects).
    fn sparsity(&self, selection: Selection) -> anyhow::Result<Option<&dyn Sparsity>> {
        if let Some(s) = &self.synthetic {
            return Ok(Some(s));
        }
        Ok(match selection {
            Selection::All => None,
            Selection::Oracle => self.calibration.as_ref().map(|c| c as &dyn Sparsity),
            Selection::Predictor => self.predicting()?.map(|c| c as &dyn Sparsity),
        })
    }

    /// The calibration with its predictors (loaded on first use), if the image has one.
    pub fn predicting(&self) -> anyhow::Result<Option<&Calibration>> {
        let Some(image) = &self.model.image else {
            return Ok(None);
        };
        let Some(stats) = &self.calibration else {
            return Ok(None);
        };
        if self.predicting.get().is_none() {
            let full = stats
                .with_predictors(image)
                .with_context(|| format!("reading the predictors of {}", image.file().display()))?;
            let _ = self.predicting.set(full);
        }
        Ok(self.predicting.get())
    }

    /// A session over `ctx` positions; for a flash image, with the options' strategy and
    /// budget.
    pub fn session(&self, ctx: usize) -> anyhow::Result<Session<'_>> {
        let args = &self.options;
        let session =
            (self.build_session(ctx, args)?).with_kv_type(args.kv_type.unwrap_or_default());
        // The plan counted the whole cache: hold it from the start.
        Ok(match args.memory_budget {
            Some(_) => session.with_resident_kv(),
            None => session,
        })
    }

    fn build_session(&self, ctx: usize, args: &RunOptions) -> anyhow::Result<Session<'_>> {
        let Some(image) = &self.model.image else {
            if args.memory_budget.is_some() {
                bail!(
                    "a memory budget needs a flash image, and {} is not one: open it through \
                     the conversion cache (api::cache) or convert it first",
                    self.model.path.display()
                );
            }
            return Ok(self.model.session(ctx, None, None)?);
        };
        let calibrated = self.synthetic.is_some() || self.calibration.is_some();
        let selection = args.selection(calibrated);
        if selection == Selection::All && !args.dense {
            log::warn!(
                "{} is not calibrated: computing every FFN neuron (run `llmflash calibrate`)",
                self.model.path.display()
            );
        }
        let mut opts = args.flash_options(selection);
        if let Some(path) = &args.disk_curve {
            let curve = DiskCurve::load(path)
                .with_context(|| format!("reading the disk curve {}", path.display()))?;
            opts.io_threads = fastest_concurrency(&curve, opts.coalesce.max_read, opts.io_threads);
            log::info!("disk curve: {} concurrent reads", opts.io_threads);
        }
        let Some(budget) = args.memory_budget else {
            return Ok(self
                .model
                .session(ctx, Some(opts), self.sparsity(selection)?)?);
        };
        let kv = args.kv_type.unwrap_or_default();
        let choice = (args.predictor, args.lookahead);
        let budget = self.target_budget(budget)?;
        let wanted = selection;
        let (selection, plan) = self
            .plan_with_draft(image, budget, |b| {
                self.plan(image, ctx, b, wanted, kv, choice)
            })
            .context("planning the memory budget")?;
        opts.selection = selection;
        let sparsity = self.sparsity(selection)?;
        log::info!("memory plan: {plan:?}");
        if !plan.streamed.is_empty() {
            self.say(Notice::Streaming {
                tables: plan.streamed.clone(),
            });
        }
        opts.pinned = self.pins(selection, &plan.window_slots);
        opts.window_slots = Some(plan.window_slots.clone());
        let session = self.model.session(ctx, Some(opts), sparsity)?;
        if !self.tables_deferred {
            return Ok(session);
        }
        let session = session.with_rows(output_rows(image, &plan, args)?);
        let rows = self.draft_head_rows.get();
        if draft_head_bytes(image, &plan, rows) == 0 {
            return Ok(session);
        }
        let name = output_table(image);
        let head = RowSource::resident_prefix(image, name, args.direct, rows)?;
        Ok(session.with_draft_head(head))
    }

    /// Draft neurons per layer the last session planned under a budget has room for (see
    /// [`DraftNeeds`]); `None` when no session was planned.
    pub fn draft_neurons(&self) -> Option<usize> {
        self.draft_neurons.get()
    }

    /// Plans with `plan` what is left of `budget` once a self draft has its share: its chosen
    /// neurons, and its head when the plan streams the output head. The neurons' share is
    /// halved until the rest plans (down to none: the draft then uses the window's pinned
    /// neurons), then the head's rows (down to none: the draft then reads the streamed head).
    fn plan_with_draft(
        &self,
        image: &FlashImage,
        budget: u64,
        plan: impl Fn(u64) -> anyhow::Result<(Selection, budget::Plan)>,
    ) -> anyhow::Result<(Selection, budget::Plan)> {
        let (mut n, mut rows) = (self.draft.neurons, self.draft.head_rows);
        loop {
            let held = n as u64 * self.draft.neuron_bytes;
            self.quiet.set(true);
            let tried = self.try_draft_plan(image, budget, held, rows, &plan);
            self.quiet.set(false);
            if let Some(rest) = tried {
                self.say_draft_plan(n, held, rows);
                self.draft_neurons.set(Some(n));
                self.draft_head_rows.set(rows);
                // Once more, aloud: the same budget gives the same plan.
                return plan(rest);
            }
            match (n, rows) {
                (0, 0) => return plan(budget),
                (0, r) => rows = if r > 1024 { r / 2 } else { 0 },
                (k, _) => n = k / 2,
            }
        }
    }

    /// The budget left once `held` bytes and, when the plan of the rest streams the output
    /// head, a drafting head of `rows` rows are taken out, if what is left plans.
    fn try_draft_plan(
        &self,
        image: &FlashImage,
        budget: u64,
        held: u64,
        rows: usize,
        plan: &impl Fn(u64) -> anyhow::Result<(Selection, budget::Plan)>,
    ) -> Option<u64> {
        let rest = budget.checked_sub(held)?;
        let first = plan(rest).ok()?;
        let head = draft_head_bytes(image, &first.1, rows);
        if head == 0 {
            return Some(rest);
        }
        let rest = rest.checked_sub(head)?;
        plan(rest).ok().map(|_| rest)
    }

    fn say_draft_plan(&self, n: usize, held: u64, rows: usize) {
        if self.draft.neurons > 0 {
            self.say(Notice::DraftNeurons {
                held: n,
                asked: self.draft.neurons,
                bytes: held,
            });
        }
        if self.draft.head_rows > 0 && rows < self.draft.head_rows {
            self.say(Notice::DraftHead {
                held: rows,
                asked: self.draft.head_rows,
            });
        }
    }

    /// The budget left for the target once a draft model has its share.
    fn target_budget(&self, budget: u64) -> anyhow::Result<u64> {
        let reserved = self.draft.reserved;
        if reserved == 0 {
            return Ok(budget);
        }
        if reserved >= budget {
            bail!(
                "the draft model needs {:.1} MiB, all of the {:.1} MiB budget: give a larger \
                 budget or a smaller draft model",
                reserved as f64 / (1 << 20) as f64,
                budget as f64 / (1 << 20) as f64
            );
        }
        self.say(Notice::DraftModel { bytes: reserved });
        Ok(budget - reserved)
    }

    /// The memory plan for `budget` and the selection it runs. The predictor, when it would
    /// select, gives way to computing every neuron unless it is expected to read clearly
    /// fewer bytes per token (with `lookahead`, [`PREDICTOR_READ_SHARE`] of the dense reads;
    /// without, any less). Without the predictors their memory holds window slots, which for
    /// a predictor that keeps most neurons (SwiGLU models) saves about as much as it skips;
    /// and dense reads are known in advance, so lookahead overlaps them with compute. `forced`
    /// keeps the predictor.
    fn plan(
        &self,
        image: &FlashImage,
        ctx: usize,
        budget: u64,
        selection: Selection,
        kv: KvType,
        (forced, lookahead): (bool, bool),
    ) -> anyhow::Result<(Selection, budget::Plan)> {
        let needs = |s| self.needs(image, ctx, s, kv);
        let (Selection::Predictor, false, None, Some(cal)) =
            (selection, forced, &self.synthetic, &self.calibration)
        else {
            return Ok((selection, budget::plan(budget, &needs(selection))?));
        };
        let n = self.model.weights.config.intermediate_size;
        let (pn, dn) = (needs(Selection::Predictor), needs(Selection::All));
        let plans = (budget::plan(budget, &pn), budget::plan(budget, &dn));
        let share = if lookahead { PREDICTOR_READ_SHARE } else { 1.0 };
        let reads = |plan: &budget::Plan, selection| match selection {
            Selection::Predictor => {
                plan.expected_reads(&pn, |l, s| cal.expected_misses(Sets::Predicted, l, s))
            }
            _ => plan.expected_reads(&dn, |_, s| n.saturating_sub(s) as f64),
        };
        // Neither fits: report the smaller of the two minimums.
        choose_selection("memory plan", plans, share, reads, |n| self.say(n))
            .map_err(|(p, d)| if d.minimum() < p.minimum() { d } else { p }.into())
    }

    /// Expected active neurons per token, per layer, under `selection`.
    pub fn expected_active(&self, selection: Selection) -> Vec<f64> {
        let c = &self.model.weights.config;
        let dense = || vec![c.intermediate_size as f64; c.n_layers];
        match (selection, &self.synthetic, &self.calibration) {
            (Selection::All, _, _) => dense(),
            (_, Some(s), _) => s.expected_active(),
            (_, None, Some(cal)) => cal.expected_active(sets(selection)),
            (_, None, None) => dense(),
        }
    }

    /// What a session over `ctx` positions needs from the planner, the embedding and output
    /// head listed apart as tables it may stream.
    fn needs(
        &self,
        image: &FlashImage,
        ctx: usize,
        selection: Selection,
        kv_type: KvType,
    ) -> Needs {
        let c = &self.model.weights.config;
        let n = c.intermediate_size;
        let tied = image.meta.tensor(TABLES[1]).is_none();
        // With every neuron computed, the next layers' tails are read while this one computes,
        // straight into buffers of their own: what those need beyond the planner's reserve.
        let lookahead_staging = match selection {
            Selection::All => lookahead_extra_bytes(n * image.bundle().stride) as u64,
            _ => 0,
        };
        let tables: Vec<Table> = TABLES
            .iter()
            .filter_map(|&name| image.meta.tensor(name))
            .map(|t| Table {
                name: t.name.clone(),
                bytes: t.len,
                cheap: !tied && t.name == TABLES[0],
            })
            .collect();
        Needs {
            resident: image.meta.resident_bytes() - tables.iter().map(|t| t.bytes).sum::<u64>(),
            tables,
            stream_staging: STREAM_STAGING as u64,
            predictors: match (selection, &self.synthetic, &self.calibration) {
                (Selection::Predictor, None, Some(cal)) => cal.predictor_bytes(),
                _ => 0,
            },
            kv_cache: KvCache::bytes_for(c, ctx.min(c.max_positions), kv_type)
                * self.sequences as u64,
            // Logits, activations, the FFN's per-token vectors.
            scratch: (self.logits_rows * c.vocab_size * 4 + 8 * c.hidden_size * 4 + 4 * n * 4)
                as u64
                + lookahead_staging,
            stride: image.bundle().stride as u64,
            process: self.process,
            neurons: vec![n; c.n_layers],
            active: self.expected_active(selection),
        }
    }

    /// Neurons to pin in windows of `slots`: for dense runs each section's first bundles (every
    /// neuron is needed every token, pins beat LRU's cyclic misses, and the rest is one
    /// contiguous tail on disk), else the calibration's hot ones.
    pub fn pins(&self, selection: Selection, slots: &[usize]) -> Option<Vec<Vec<u32>>> {
        let image = self.model.image.as_ref()?;
        match (selection, &self.calibration, &self.synthetic) {
            (Selection::All, _, _) => Some(
                slots
                    .iter()
                    .enumerate()
                    .map(|(l, &s)| match &image.ffn_section(l).permutation {
                        Some(perm) => perm[..s.min(perm.len())].to_vec(),
                        None => (0..s as u32).collect(),
                    })
                    .collect(),
            ),
            (_, Some(cal), None) => Some(cal.hot_neurons(sets(selection), slots)),
            _ => None,
        }
    }
}

/// Whose sets a window under `selection` sees: the true ones for oracle runs, so that their
/// window is planned and pinned as a perfect predictor's would be.
/// What the process holds beside what a plan counts, measured now that `model` is open (its
/// code, tokenizer and metadata), with an allowance for the threads a session starts: the
/// I/O pool's and the compute pool's.
fn process_overhead(model: &Model, args: &RunOptions) -> u64 {
    budget::process::release_freed();
    let loaded = model.image.as_ref().map_or(0, |i| i.owned_bytes());
    let threads = args.io_threads + rayon::current_num_threads();
    match budget::process::overhead(loaded, threads) {
        Some(bytes) => bytes,
        None => {
            let guess = 32 << 20;
            log::warn!(
                "cannot read this process's resident set: the memory plan leaves {} to the \
                 process itself, a guess",
                budget::Bytes(guess)
            );
            guess
        }
    }
}

fn sets(selection: Selection) -> Sets {
    match selection {
        Selection::Oracle => Sets::True,
        _ => Sets::Predicted,
    }
}

/// Bytes of a drafting head of `rows` rows under `plan`: rows of the output head, when the
/// plan streams it (otherwise a draft uses the head itself).
fn draft_head_bytes(image: &FlashImage, plan: &budget::Plan, rows: usize) -> u64 {
    let name = output_table(image);
    if rows == 0 || !plan.streamed.iter().any(|s| s == name) {
        return 0;
    }
    let Some(t) = image.meta.tensor(name) else {
        return 0;
    };
    let row = t.len / t.rows.max(1) as u64;
    row * rows.min(t.rows) as u64
}

/// The tensor that holds the output head: `output.weight`, or the embedding when tied.
fn output_table(image: &FlashImage) -> &'static str {
    match image.meta.tensor(TABLES[1]) {
        Some(_) => TABLES[1],
        None => TABLES[0],
    }
}

/// The embedding and output head of a session whose tables were left out of the load: read
/// into memory, or streamed where `plan` says so.
fn output_rows(
    image: &FlashImage,
    plan: &budget::Plan,
    args: &RunOptions,
) -> anyhow::Result<OutputRows> {
    let source = |name: &str| -> anyhow::Result<RowSource> {
        let direct = args.direct;
        Ok(if plan.streamed.iter().any(|s| s == name) {
            RowSource::streamed(image, name, direct, args.io_threads)?
        } else {
            RowSource::resident(image, name, direct)?
        })
    };
    let head = match image.meta.tensor(TABLES[1]) {
        Some(_) => Some(source(TABLES[1])?),
        None => None,
    };
    Ok(OutputRows {
        embed: source(TABLES[0])?,
        head,
    })
}

/// The measured concurrency that reads `chunk`-byte pieces fastest (ties: the fewer threads);
/// `fallback` when the curve has no points.
fn fastest_concurrency(curve: &DiskCurve, chunk: usize, fallback: usize) -> usize {
    let mut concurrencies: Vec<usize> = curve.points.iter().map(|p| p.concurrency).collect();
    concurrencies.sort_unstable();
    concurrencies.dedup();
    concurrencies
        .into_iter()
        .map(|c| (c, curve.throughput(chunk, c)))
        .fold(None, |best: Option<(usize, f64)>, (c, t)| match best {
            Some((_, bt)) if bt >= t => best,
            _ => Some((c, t)),
        })
        .map_or(fallback, |(c, _)| c)
}
