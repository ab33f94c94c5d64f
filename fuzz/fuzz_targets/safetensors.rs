//! safetensors header: arbitrary bytes as a whole `.safetensors` file into
//! `parse_safetensors`; every entry it accepts must make a tensor (`Tensor::new`).
#![no_main]

use std::path::Path;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use llmflash::model::hf::parse_safetensors;
use llmflash::model::tensor::{Storage, Tensor};

fuzz_target!(|data: &[u8]| {
    let Ok(entries) = parse_safetensors(Path::new("fuzz.safetensors"), data) else {
        return;
    };
    for e in entries {
        let bytes = data[e.offset..e.offset + e.len].to_vec();
        Tensor::new(
            e.name,
            e.dtype,
            e.rows,
            e.cols,
            Storage::Owned(Arc::new(bytes)),
        )
        .expect("an accepted entry makes a tensor");
    }
});
