//! Hugging Face `config.json`: arbitrary text into `parse_config`; a config it accepts must
//! validate.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llmflash::model::hf::parse_config;

fuzz_target!(|data: &[u8]| {
    let Ok(json) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = parse_config(json) {
        c.validate().expect("an accepted config validates");
    }
});
