//! How tokens are chosen, for the commands that generate (`generate`, `chat`).

use crate::engine::sampler::Sampling;

#[derive(clap::Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Always take the most likely token (the default unless --temp is given).
    #[arg(long, conflicts_with_all = ["temp", "top_p", "top_k", "seed"])]
    pub greedy: bool,
    /// Sampling temperature (0: the most likely token).
    #[arg(long, allow_negative_numbers = true, value_parser = super::values::temperature)]
    pub temp: Option<f32>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true, value_parser = super::values::top_p)]
    pub top_p: f32,
    /// Keep only the K most likely tokens before sampling (0 = all).
    #[arg(long, default_value_t = 40, allow_negative_numbers = true, value_parser = super::values::top_k)]
    pub top_k: usize,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    /// The sampling these flags ask for: random only with a temperature and no --greedy.
    pub fn sampling(&self) -> Sampling {
        match self.temp {
            Some(t) if !self.greedy => Sampling::Random {
                temperature: t,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
            },
            _ => Sampling::Greedy,
        }
    }
}
