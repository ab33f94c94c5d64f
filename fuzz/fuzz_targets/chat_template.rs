//! Chat-template renderer (minijinja with the Python-method shims). The input is split at
//! NUL bytes: the first part is the template, then one message per part (`role\x01content`,
//! or content of a "user" message without `\x01`). The first byte of the template part's
//! low bit sets `add_generation_prompt`; when the template part is empty, SmolLM2's real
//! template renders the fuzzed messages.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llmflash::model::chat::{ChatMessage, ChatTemplate};

const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let mut parts = text.split('\0');
    let template = parts.next().unwrap_or_default();
    let template = if template.is_empty() {
        SMOLLM2
    } else {
        template
    };
    let messages: Vec<ChatMessage> = parts
        .take(16)
        .map(|p| match p.split_once('\u{1}') {
            Some((role, content)) => ChatMessage::new(role, content),
            None => ChatMessage::new("user", p),
        })
        .collect();
    let Ok(t) = ChatTemplate::new(template, "<|im_start|>", "<|im_end|>") else {
        return;
    };
    let _ = t.render(&messages, flags & 1 == 1);
});
