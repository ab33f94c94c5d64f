//! The command line's side of error messages: the library says what went wrong in its own
//! terms ("a longer context", "the CPU backend"); here a typed error found anywhere in the
//! chain becomes a hint naming the flag that changes it.

use crate::api::Notice;
use crate::backend::gpu::GpuError;
use crate::budget::BudgetError;
use crate::draft::DraftError;
use crate::engine::perplexity::PerplexityError;
use crate::engine::EngineError;
use crate::window::WindowError;

/// The flags that would change what `error` reports, if any of its causes is one we know.
pub fn hint(error: &anyhow::Error) -> Option<String> {
    error.chain().find_map(|cause| {
        None.or_else(|| cause.downcast_ref::<EngineError>().and_then(engine))
            .or_else(|| cause.downcast_ref::<PerplexityError>().and_then(perplexity))
            .or_else(|| cause.downcast_ref::<GpuError>().and_then(gpu))
            .or_else(|| cause.downcast_ref::<DraftError>().and_then(draft))
            .or_else(|| cause.downcast_ref::<BudgetError>().map(budget))
            .or_else(|| {
                cause
                    .downcast_ref::<WindowError>()
                    .map(|_| BUDGET.to_string())
            })
    })
}

const READ: &str = "`llmflash inspect --verify MODEL` checks the whole image; --no-checksums \
                    skips the per-read checks (only to measure their cost)";

const BUDGET: &str = "--memory-budget (or --vram-budget with --backend gpu) sets the budget";

fn engine(e: &EngineError) -> Option<String> {
    match e {
        EngineError::ContextFull { .. } => {
            Some("--ctx sets the context length (the KV cache's positions)".into())
        }
        EngineError::NonFinite { .. } => {
            Some("`llmflash inspect --verify MODEL` checks every checksum of an image".into())
        }
        EngineError::Read(_) => Some(READ.into()),
        _ => None,
    }
}

/// `notice` as the command line prints it: with the flag that changes it, if one does.
pub fn notice(notice: &Notice) -> String {
    let flag = match notice {
        Notice::Dense { .. } => Some("--predictor keeps the predictors"),
        Notice::DraftNeurons { .. } => Some("--draft-neurons"),
        Notice::DraftHead { .. } => Some("--draft-head-rows"),
        _ => None,
    };
    match flag {
        Some(flag) => format!("{notice} ({flag})"),
        None => notice.to_string(),
    }
}

/// A transparent wrapper hides its inner error from the chain: unwrap it here.
fn draft(e: &DraftError) -> Option<String> {
    match e {
        DraftError::Engine(e) => engine(e),
        DraftError::Gpu(e) => gpu(e),
        DraftError::Setup(_) => None,
    }
}

fn perplexity(e: &PerplexityError) -> Option<String> {
    match e {
        PerplexityError::TooShort { .. } | PerplexityError::BadCtx(_) => {
            Some("--ctx sets the context of each scored window".into())
        }
        PerplexityError::Engine(e) => engine(e),
    }
}

fn gpu(e: &GpuError) -> Option<String> {
    match e {
        GpuError::NoAdapter { .. }
        | GpuError::RequestDevice { .. }
        | GpuError::UnsupportedDtype { .. } => {
            Some("--backend cpu runs on the CPU; --gpu-adapter picks an adapter".into())
        }
        GpuError::TooLarge { .. } => Some("--ctx shortens the context; --backend cpu".into()),
        GpuError::ContextFull { .. } => {
            Some("--ctx sets the context length (the KV cache's positions)".into())
        }
        GpuError::Read(_) => Some(READ.into()),
        _ => None,
    }
}

fn budget(_: &BudgetError) -> String {
    format!("{BUDGET}; --ctx shortens the KV cache")
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn a_known_cause_anywhere_in_the_chain_names_its_flag() {
        let e = anyhow::Error::new(EngineError::ContextFull { capacity: 8 }).context("generating");
        assert!(hint(&e).unwrap().contains("--ctx"));
        let e = Err::<(), _>(PerplexityError::BadCtx(2))
            .context("scoring")
            .unwrap_err();
        assert!(hint(&e).unwrap().contains("--ctx"));
        let e = anyhow::Error::new(GpuError::NoAdapter {
            detail: String::new(),
        });
        assert!(hint(&e).unwrap().contains("--backend cpu"));
        // Through a transparent wrapper too.
        let e = anyhow::Error::new(DraftError::Engine(EngineError::ContextFull { capacity: 8 }));
        assert!(hint(&e).unwrap().contains("--ctx"));
    }

    #[test]
    fn an_unknown_error_gets_no_hint() {
        assert_eq!(hint(&anyhow::anyhow!("something else")), None);
        let e = anyhow::Error::new(EngineError::EmptyPrompt);
        assert_eq!(hint(&e), None);
    }
}
