//! GGUF reader: arbitrary bytes into `GgufFile::from_bytes`; a file that parses is read the
//! way the loader reads it (every metadata value, every tensor, the tokenizer spec and, when
//! the metadata holds one, the tokenizer built from it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use llmflash::model::gguf::GgufFile;
use llmflash::model::loader::tokenizer_spec;
use llmflash::model::tokenizer::Tokenizer;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    for (k, v) in &f.metadata {
        let _ = (k.len(), v.describe(), v.as_u64(), v.as_str(), v.type_name());
    }
    for t in &f.tensors {
        // The parser validated every range: reading a tensor must not fail on bounds.
        let tensor = f.tensor(&t.name).expect("a validated tensor reads");
        assert_eq!(tensor.bytes().len() as u64, t.n_bytes);
    }
    if let Ok(spec) = tokenizer_spec(&f) {
        if let Ok(tok) = Tokenizer::new(spec) {
            let ids = tok.encode("Hello, world! <|im_start|> 123", true, true);
            let _ = tok.decode(&ids);
        }
    }
});
