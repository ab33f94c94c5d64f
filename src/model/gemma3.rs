//! Gemma 3's parameters beyond the llama-style ones, read as llama.cpp reads them
//! (`src/models/gemma3.cpp`, `llama_model_gemma3::load_arch_hparams`).

use crate::model::config::Config;
use crate::model::gguf::GgufFile;
use crate::model::weights::LoadError;

/// Every `n`-th layer is global (attends to the whole context); the others slide. llama.cpp's
/// default for gemma3 when the file gives no pattern.
pub const DEFAULT_SWA_PATTERN: usize = 6;

/// The RoPE base of the sliding layers when the file gives none (llama.cpp's
/// `rope_freq_base_train_swa` default; Gemma 3's `rope_local_base_freq`).
pub const DEFAULT_SLIDING_ROPE_THETA: f32 = 10_000.0;

/// Whether layer `l` slides under a period-`n` pattern: llama.cpp's `set_swa_pattern`
/// (`il % n < n - 1`: layers 0..n-2 slide, layer n-1 is global, and so on).
pub fn sliding_by_period(n_layers: usize, n: usize) -> Vec<bool> {
    (0..n_layers).map(|l| n == 0 || l % n < n - 1).collect()
}

fn invalid(msg: String) -> LoadError {
    LoadError::Invalid(msg)
}

/// Fills the sliding window, its layer pattern and RoPE base, the query scale and the logit
/// soft-cap of a gemma3 GGUF into `c`.
pub fn gguf_params(f: &GgufFile, c: &mut Config) -> Result<(), LoadError> {
    let key = |k: &str| format!("gemma3.{k}");
    let window = match f.get(&key("attention.sliding_window")) {
        Some(v) => v.as_u64().ok_or_else(|| {
            invalid(format!(
                "GGUF metadata `{}` is a {}, expected an unsigned integer",
                key("attention.sliding_window"),
                v.type_name()
            ))
        })? as usize,
        None => 0,
    };
    if window > 0 {
        c.sliding_window = Some(window);
        let pattern_key = key("attention.sliding_window_pattern");
        c.sliding_layers = match f.get(&pattern_key) {
            // One flag per layer (newer converters).
            Some(v) if v.as_array().is_some() => {
                let flags = v.as_array().unwrap_or_default();
                let layers: Option<Vec<bool>> = flags.iter().map(|b| b.as_bool()).collect();
                let layers = layers.ok_or_else(|| {
                    invalid(format!(
                        "GGUF metadata `{pattern_key}` is not an array of booleans"
                    ))
                })?;
                if layers.len() < c.n_layers {
                    return Err(invalid(format!(
                        "GGUF metadata `{pattern_key}` has {} flags for {} layers",
                        layers.len(),
                        c.n_layers
                    )));
                }
                layers[..c.n_layers].to_vec()
            }
            Some(v) => {
                let n = v.as_u64().ok_or_else(|| {
                    invalid(format!(
                        "GGUF metadata `{pattern_key}` is a {}, expected a period or an array of \
                         booleans",
                        v.type_name()
                    ))
                })?;
                sliding_by_period(c.n_layers, n as usize)
            }
            None => sliding_by_period(c.n_layers, DEFAULT_SWA_PATTERN),
        };
        let theta_key = key("rope.freq_base_swa");
        let theta = match f.get(&theta_key) {
            Some(_) => f.get_f32(&theta_key)?,
            None => DEFAULT_SLIDING_ROPE_THETA,
        };
        crate::model::config::check_positive(&theta_key, theta)
            .map_err(|e| invalid(format!("GGUF metadata {e}")))?;
        c.rope_theta_sliding = Some(theta);
    }
    let cap_key = key("final_logit_softcapping");
    if f.get(&cap_key).is_some() {
        let cap = f.get_f32(&cap_key)?;
        // llama.cpp: 0 means none.
        if cap != 0.0 {
            crate::model::config::check_positive(&cap_key, cap)
                .map_err(|e| invalid(format!("GGUF metadata {e}")))?;
            c.final_logit_softcap = Some(cap);
        }
    }
    // gemma_pytorch's config: the 27B model scales queries by 1/sqrt(hidden / heads) (its
    // query_pre_attn_scalar), the others by 1/sqrt(head_dim). llama.cpp tells them apart by
    // their 62 layers.
    if c.n_layers == 62 {
        c.attn_scale = Some(1.0 / ((c.hidden_size / c.n_heads) as f32).sqrt());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sixth_layer_is_global() {
        let s = sliding_by_period(18, 6);
        let global: Vec<usize> = (0..18).filter(|&l| !s[l]).collect();
        assert_eq!(global, [5, 11, 17]);
        assert!(sliding_by_period(4, 0).iter().all(|&b| b));
    }
}
