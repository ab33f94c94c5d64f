//! What the planner tells its user about choices it made for them: typed, so that the
//! command line can add the flag that changes each one and an application can show them its
//! own way (or not at all).

use std::fmt;

/// A choice the planner made that the user may want to know about.
#[derive(Clone, Debug, PartialEq)]
pub enum Notice {
    /// Every FFN neuron is computed: at this budget that is expected to read `dense` bytes
    /// per token against `predicted` with the predictors. `plan` names the plan ("memory
    /// plan", "VRAM plan").
    Dense {
        /// Which plan: "memory plan" or "VRAM plan".
        plan: &'static str,
        /// Bytes per token computing every neuron is expected to read.
        dense: f64,
        /// Bytes per token the predictors are expected to read.
        predicted: f64,
    },
    /// Every FFN neuron is computed because the budget cannot hold the predictors.
    NoRoomForPredictors {
        /// Which plan.
        plan: &'static str,
    },
    /// These tables (embedding, output head) are streamed from the image.
    Streaming {
        /// The tables' tensor names.
        tables: Vec<String>,
    },
    /// A separate draft model takes `bytes` of the budget.
    DraftModel {
        /// Bytes it holds.
        bytes: u64,
    },
    /// A self draft holds `held` of the `asked` neurons per layer, in `bytes`.
    DraftNeurons {
        /// Neurons per layer it holds.
        held: usize,
        /// Neurons per layer asked for.
        asked: usize,
        /// Bytes they take.
        bytes: u64,
    },
    /// The drafting head holds `held` of the `asked` token rows.
    DraftHead {
        /// Rows it holds.
        held: usize,
        /// Rows asked for.
        asked: usize,
    },
    /// A model file was converted into a flash image in the cache (`path`), or found there.
    Converted {
        /// The image.
        path: std::path::PathBuf,
        /// It was there from an earlier run.
        reused: bool,
    },
}

/// Where notices go.
pub type Notify = Box<dyn Fn(&Notice) + Send>;

/// The default: notices are logged at the `warn` level.
pub fn log_notice() -> Notify {
    Box::new(|n| log::warn!("{n}"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mb = |b: f64| b / 1e6;
        match self {
            Notice::Dense {
                plan,
                dense,
                predicted,
            } => write!(
                f,
                "{plan}: computing every FFN neuron: at this budget that is expected to read \
                 {:.1} MB per token, known in advance, against {:.1} MB with the predictors",
                mb(*dense),
                mb(*predicted)
            ),
            Notice::NoRoomForPredictors { plan } => write!(
                f,
                "{plan}: computing every FFN neuron: the budget cannot hold the predictors"
            ),
            Notice::Streaming { tables } => write!(
                f,
                "memory plan: streaming {} from the image (budget below what keeping them needs)",
                tables.join(", ")
            ),
            Notice::DraftModel { bytes } => write!(
                f,
                "memory plan: {:.1} MiB of the budget hold the draft model",
                mib(*bytes)
            ),
            Notice::DraftNeurons { held, asked, bytes } => write!(
                f,
                "memory plan: {:.1} MiB of the budget hold the self draft's {held} neurons per \
                 layer (of {asked} asked)",
                mib(*bytes)
            ),
            Notice::DraftHead { held, asked } => write!(
                f,
                "memory plan: the drafting head holds {held} of the {asked} rows asked"
            ),
            Notice::Converted { path, reused: true } => {
                write!(
                    f,
                    "using the flash image converted before: {}",
                    path.display()
                )
            }
            Notice::Converted {
                path,
                reused: false,
            } => write!(f, "converted into a flash image: {}", path.display()),
        }
    }
}
