use super::byte_level::unicode_to_byte;
use super::pre::Cat;
use super::*;

/// A vocabulary of the 256 byte symbols (id = byte) plus a few merges and specials.
fn tiny(pre: &str) -> Tokenizer {
    let b2u = bytes_to_unicode();
    let mut tokens: Vec<String> = b2u.iter().map(|c| c.to_string()).collect();
    let merges = [
        "Ġ t", "h e", "Ġt he", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d",
    ];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let mut token_types = vec![token_type::NORMAL; tokens.len()];
    for (t, ty) in [
        ("<|im_start|>", 3),
        ("<|im_end|>", 3),
        ("<|endoftext|>", 3),
        ("<tool>", 4),
    ] {
        tokens.push(t.to_string());
        token_types.push(ty);
    }
    let n = tokens.len() as u32;
    Tokenizer::new(TokenizerSpec {
        model: "gpt2".into(),
        pre: pre.into(),
        tokens,
        token_types,
        merges: merges.iter().map(|s| s.to_string()).collect(),
        bos: Some(n - 4),
        eos: Some(n - 3),
        add_bos: true,
        ..Default::default()
    })
    .unwrap()
}

fn split(pre: PreTokenizer, s: &str) -> Vec<&str> {
    pre.split(s).into_iter().map(|r| &s[r]).collect()
}

#[test]
fn bytes_to_unicode_is_a_bijection_onto_printables() {
    let t = bytes_to_unicode();
    let mut seen = std::collections::HashSet::new();
    for (b, &c) in t.iter().enumerate() {
        assert!(seen.insert(c), "duplicate {c:?}");
        assert!(
            !c.is_whitespace() && !c.is_control(),
            "byte {b} maps to {c:?}"
        );
        assert_eq!(unicode_to_byte(c), Some(b as u8));
    }
    assert_eq!(t[b' ' as usize], 'Ġ');
    assert_eq!(t[b'\n' as usize], 'Ċ');
    assert_eq!(t[b'a' as usize], 'a');
    assert_eq!(t[0], 'Ā');
    assert_eq!(t[0xAD], 'Ń');
    assert_eq!(unicode_to_byte('€'), None);
}

#[test]
fn unicode_categories() {
    assert_eq!(Cat::of('é'), Cat::Letter);
    assert_eq!(Cat::of('中'), Cat::Letter);
    assert_eq!(Cat::of('٣'), Cat::Number);
    assert_eq!(Cat::of('Ⅻ'), Cat::Number); // Nl: numeric, not a letter
    assert_eq!(Cat::of('\u{0345}'), Cat::Other); // Mn, yet Alphabetic
    assert_eq!(Cat::of('\u{093E}'), Cat::Other); // Devanagari vowel sign AA (Mc)
    assert_eq!(Cat::of('Ⓐ'), Cat::Other); // So, yet Alphabetic
    assert_eq!(Cat::of('\u{00A0}'), Cat::Space);
    assert_eq!(Cat::of('\u{3000}'), Cat::Space);
    assert_eq!(Cat::of('\u{200B}'), Cat::Other);
    assert_eq!(Cat::of('😀'), Cat::Other);
}

#[test]
fn pre_tokenizer_gpt2() {
    let p = PreTokenizer::Gpt2;
    assert_eq!(
        split(p, " don't  stop\n\n 123456 "),
        [" don", "'t", " ", " stop", "\n\n", " 123456", " "]
    );
    assert_eq!(split(p, "Hello, world!"), ["Hello", ",", " world", "!"]);
    assert_eq!(split(p, "a\n\n\nb"), ["a", "\n\n", "\n", "b"]);
    assert_eq!(split(p, "  leading"), [" ", " leading"]);
    assert_eq!(split(p, "DON'T"), ["DON", "'", "T"]);
}

#[test]
fn pre_tokenizer_smollm() {
    let p = PreTokenizer::Smollm;
    assert_eq!(
        split(p, " don't  stop\n\n 123456 "),
        [" don", "'t", " ", " stop", "\n\n ", "1", "2", "3", "4", "5", "6", " "]
    );
    assert_eq!(split(p, "Hello, world!"), ["Hello", ",", " world", "!"]);
    assert_eq!(split(p, "a\n\n\nb"), ["a", "\n\n", "\n", "b"]);
    assert_eq!(split(p, "  leading"), [" ", " leading"]);
    assert_eq!(split(p, "x2y"), ["x", "2", "y"]);
}

#[test]
fn pre_tokenizer_llama3() {
    let p = PreTokenizer::Llama3;
    assert_eq!(
        split(p, " don't  stop\n\n 123456 "),
        [" don", "'t", " ", " stop", "\n\n", " ", "123", "456", " "]
    );
    assert_eq!(split(p, "Hello, world!"), ["Hello", ",", " world", "!"]);
    assert_eq!(split(p, "a\n\n\nb"), ["a", "\n\n\n", "b"]);
    assert_eq!(split(p, "  leading"), [" ", " leading"]);
    assert_eq!(split(p, "DON'T 12345"), ["DON", "'T", " ", "123", "45"]);
    assert_eq!(split(p, "(x);\n\ty"), ["(x", ");\n", "\ty"]);
}

#[test]
fn pre_tokenizer_qwen2() {
    let p = PreTokenizer::Qwen2;
    assert_eq!(
        split(p, " don't  stop\n\n 123456 "),
        [" don", "'t", " ", " stop", "\n\n", " ", "1", "2", "3", "4", "5", "6", " "]
    );
    assert_eq!(split(p, "Hello, world!"), ["Hello", ",", " world", "!"]);
    assert_eq!(split(p, "a\n\n\nb"), ["a", "\n\n\n", "b"]);
    assert_eq!(split(p, "  leading"), [" ", " leading"]);
}

#[test]
fn pre_tokenizer_covers_text() {
    for p in [
        PreTokenizer::Gpt2,
        PreTokenizer::Smollm,
        PreTokenizer::Llama3,
        PreTokenizer::Qwen2,
    ] {
        let s = "héllo 世界 🎉\t\tx  \r\n 12,345.6e-7 ''' \u{00A0}z\u{0301}";
        assert_eq!(split(p, s).concat(), s);
    }
}

#[test]
fn bpe_merges_by_rank() {
    let t = tiny("gpt2");
    let id = |s: &str| t.token_id(s).unwrap();
    assert_eq!(
        t.encode("hello the world", false, false),
        [id("hello"), id("Ġthe"), id("Ġworld")]
    );
    // "Ġt" (rank 0) is made before "he" (rank 1) could, so " th" stays "Ġt"+"h".
    assert_eq!(t.encode(" th", false, false), [id("Ġt"), b'h' as u32]);
    assert_eq!(t.encode("hellx", false, false), [id("hell"), b'x' as u32]);
    assert_eq!(t.encode("", true, false), [t.bos().unwrap()]);
}

#[test]
fn merge_result_outside_vocab_falls_back_to_bytes() {
    let b2u = bytes_to_unicode();
    let tokens: Vec<String> = b2u.iter().map(|c| c.to_string()).collect();
    let t = Tokenizer::new(TokenizerSpec {
        model: "gpt2".into(),
        pre: "gpt2".into(),
        tokens,
        merges: vec!["a b".into()],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(t.encode("ab", false, false), [b'a' as u32, b'b' as u32]);
}

#[test]
fn round_trip() {
    for pre in ["gpt2", "smollm", "llama3", "qwen2"] {
        let t = tiny(pre);
        for s in [
            "Hello, world!",
            "Ça va? Élève naïve — façade",
            "日本語のテキストと中文",
            "emoji 🎉👩‍👩‍👧 done",
            "line1\nline2\r\n\n\ttab\t\tend",
            "multiple     spaces   here ",
            " don't  stop\n\n 123456 ",
            "\u{0}\u{7f}\u{ad}\u{200b}",
        ] {
            let ids = t.encode(s, false, false);
            assert_eq!(t.decode(&ids), s, "pre {pre}");
            let bos = t.encode(s, true, false);
            assert_eq!(bos[0], t.bos().unwrap());
            assert_eq!(t.decode(&bos), s);
        }
    }
}

#[test]
fn special_tokens() {
    let t = tiny("smollm");
    let (start, end) = (
        t.token_id("<|im_start|>").unwrap(),
        t.token_id("<|im_end|>").unwrap(),
    );
    let ids = t.encode("<|im_start|>hello<|im_end|>", false, true);
    assert_eq!(ids, [start, t.token_id("hello").unwrap(), end]);
    // Not parsed: the text is tokenised as ordinary text.
    let raw = t.encode("<|im_start|>hello", false, false);
    assert!(!raw.contains(&start));
    assert_eq!(t.decode(&raw), "<|im_start|>hello");
    // Control tokens are skipped by decode, user-defined ones always matched and rendered.
    assert_eq!(t.decode(&ids), "hello");
    let tool = t.token_id("<tool>").unwrap();
    assert_eq!(
        t.encode("a<tool>b", false, false),
        [b'a' as u32, tool, b'b' as u32]
    );
    assert_eq!(t.decode(&[tool]), "<tool>");
    assert!(t.is_end_of_generation(end));
    assert!(t.is_end_of_generation(t.token_id("<|endoftext|>").unwrap()));
    assert!(!t.is_end_of_generation(start));
    assert_eq!(t.eot(), Some(end));
}

#[test]
fn stream_decoder_joins_split_characters() {
    let t = tiny("gpt2");
    let euro = "€".as_bytes(); // 3 bytes, one token each
    let mut d = StreamDecoder::new();
    assert_eq!(d.push(&t, b'a' as u32), "a");
    assert_eq!(d.push(&t, euro[0] as u32), "");
    assert_eq!(d.push(&t, euro[1] as u32), "");
    assert_eq!(d.push(&t, euro[2] as u32), "€");
    assert_eq!(d.push(&t, t.token_id("<|im_end|>").unwrap()), "");
    assert_eq!(d.push(&t, 0xF0), "");
    assert_eq!(d.finish(), "\u{FFFD}");
    // invalid byte in the middle is replaced, not held
    assert_eq!(d.push(&t, 0xFF), "\u{FFFD}");
    let s = "x😀y";
    let ids = t.encode(s, false, false);
    let mut d = StreamDecoder::new();
    let mut out: String = ids.iter().map(|&i| d.push(&t, i)).collect();
    out.push_str(&d.finish());
    assert_eq!(out, s);
}

#[test]
fn errors_are_reported() {
    let base = || TokenizerSpec {
        model: "gpt2".into(),
        pre: "gpt2".into(),
        tokens: vec!["a".into()],
        ..Default::default()
    };
    let e = Tokenizer::new(TokenizerSpec {
        model: "ugm".into(),
        ..base()
    })
    .unwrap_err();
    assert!(e.to_string().contains("`ugm` is not supported"), "{e}");
    assert!(matches!(
        Tokenizer::new(TokenizerSpec {
            pre: "nope".into(),
            ..base()
        }),
        Err(TokenizerError::UnknownPreTokenizer(_))
    ));
    assert!(matches!(
        Tokenizer::new(TokenizerSpec {
            token_types: vec![1, 1],
            ..base()
        }),
        Err(TokenizerError::TokenTypesLength { .. })
    ));
    assert!(matches!(
        Tokenizer::new(TokenizerSpec {
            bos: Some(5),
            ..base()
        }),
        Err(TokenizerError::SpecialIdOutOfRange { .. })
    ));
    assert!(matches!(
        Tokenizer::new(TokenizerSpec {
            merges: vec!["ab".into()],
            ..base()
        }),
        Err(TokenizerError::BadMerge { .. })
    ));
    assert!(matches!(
        Tokenizer::new(TokenizerSpec {
            tokens: vec![],
            ..base()
        }),
        Err(TokenizerError::EmptyVocab)
    ));
    let t = Tokenizer::new(base()).unwrap();
    assert_eq!(t.token_bytes(99), b"");
    assert_eq!(t.decode(&[99, 0]), "a");
    assert!(Tokenizer::from_hf_json("{", None).is_err());
    assert!(Tokenizer::from_hf_json("{\"model\":{\"type\":\"Unigram\"}}", None).is_err());
}

#[test]
fn from_hf_json_smollm_style() {
    let json = r#"{
          "added_tokens": [
            {"id": 0, "content": "<|endoftext|>", "special": true},
            {"id": 1, "content": "<|im_start|>", "special": true},
            {"id": 2, "content": "<|im_end|>", "special": true}
          ],
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
          ]},
          "decoder": {"type": "ByteLevel"},
          "model": {"type": "BPE", "vocab": {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2,
             "h": 3, "i": 4, "Ġ": 5, "1": 6, "2": 7, "hi": 8, "Ġhi": 9},
             "merges": ["h i", ["Ġ", "hi"]]}
        }"#;
    let cfg = r#"{"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": false}"#;
    let t = Tokenizer::from_hf_json(json, Some(cfg)).unwrap();
    assert_eq!(t.pre_tokenizer(), PreTokenizer::Smollm);
    assert_eq!(t.bos(), Some(1));
    assert_eq!(t.eos(), Some(2));
    assert!(!t.add_bos());
    assert_eq!(t.encode("<|im_start|>hi hi12", true, true), [1, 8, 9, 6, 7]);
    assert!(t.is_end_of_generation(0) && t.is_end_of_generation(2));
}

#[test]
fn from_hf_json_detects_llama3_and_qwen2() {
    let mk = |pattern: &str| {
        format!(
            r#"{{"pre_tokenizer": {{"type": "Sequence", "pretokenizers": [
                    {{"type": "Split", "pattern": {{"Regex": {}}}, "behavior": "Isolated"}},
                    {{"type": "ByteLevel", "use_regex": false}}]}},
                   "post_processor": {{"type": "TemplateProcessing", "single": [{{"SpecialToken": {{"id": "<s>", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}]}},
                   "added_tokens": [{{"id": 2, "content": "<s>", "special": true}}],
                   "model": {{"type": "BPE", "vocab": {{"a": 0, "1": 1}}, "merges": []}}}}"#,
            serde_json::to_string(pattern).unwrap()
        )
    };
    let l3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let q2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let t = Tokenizer::from_hf_json(&mk(l3), None).unwrap();
    assert_eq!(t.pre_tokenizer(), PreTokenizer::Llama3);
    assert!(t.add_bos());
    assert_eq!(t.encode("a1", true, false), [2, 0, 1]);
    let t = Tokenizer::from_hf_json(&mk(q2), None).unwrap();
    assert_eq!(t.pre_tokenizer(), PreTokenizer::Qwen2);
}

/// A SentencePiece vocabulary: byte-fallback tokens, a few pieces with scores, a control and a
/// user-defined token.
fn tiny_spm(add_space_prefix: Option<bool>) -> Tokenizer {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut token_types = vec![
        token_type::UNKNOWN,
        token_type::CONTROL,
        token_type::CONTROL,
    ];
    let mut scores = vec![0.0, 0.0, 0.0];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        token_types.push(token_type::BYTE);
        scores.push(0.0);
    }
    // Higher score merges first: "▁he" (-1) beats "ll" (-2), which beats "he" (-3).
    for (piece, score) in [
        ("h", -10.0),
        ("e", -10.0),
        ("l", -10.0),
        ("o", -10.0),
        ("▁", -10.0),
        ("he", -3.0),
        ("ll", -2.0),
        ("▁h", -4.0),
        ("▁he", -1.0),
        ("llo", -1.5),
        ("▁hello", -0.5),
        ("▁hell", -6.0),
    ] {
        tokens.push(piece.into());
        token_types.push(token_type::NORMAL);
        scores.push(score);
    }
    tokens.push("<tag>".into());
    token_types.push(token_type::USER_DEFINED);
    scores.push(0.0);
    Tokenizer::new(TokenizerSpec {
        model: "llama".into(),
        tokens,
        token_types,
        scores,
        bos: Some(1),
        eos: Some(2),
        add_bos: true,
        add_space_prefix,
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn sentencepiece_merges_by_score_and_falls_back_to_bytes() {
    let t = tiny_spm(Some(false));
    let id = |s: &str| t.token_id(s).unwrap();
    // " hello" is ▁ h e l l o: "ll" (-2) merges first (the best pair present), then "llo"
    // (-1.5), "he" (-3), "▁he" (-1) and "▁hello" (-0.5); "▁h" (-4) went stale on the way.
    assert_eq!(t.encode(" hello", false, false), [id("▁hello")]);
    // "hex": "he" merges, "x" is not a piece: its byte token.
    assert_eq!(t.encode("hex", false, false), [id("he"), id("<0x78>")]);
    // A character outside the vocabulary becomes its UTF-8 bytes.
    assert_eq!(t.encode("é", false, false), [id("<0xC3>"), id("<0xA9>")]);
    // BOS, user-defined tokens split out, control texts only with parse_special.
    assert_eq!(
        t.encode("he<tag>he", true, false),
        [1, id("he"), id("<tag>"), id("he")]
    );
    assert_eq!(t.encode("</s>", false, true), [2]);
    assert_ne!(t.encode("</s>", false, false), [2]);
    // Decoding: ▁ back to a space, byte tokens to their bytes, control tokens hidden.
    let ids = t.encode("<s> hello é", false, true);
    assert_eq!(t.decode(&ids), " hello é");
}

#[test]
fn sentencepiece_space_prefix_follows_the_file() {
    let id = |t: &Tokenizer, s: &str| t.token_id(s).unwrap();
    // llama.cpp's default: a space before the text and after every special token.
    let t = tiny_spm(None);
    assert_eq!(t.encode("hello", false, false), [id(&t, "▁hello")]);
    let t = tiny_spm(Some(false));
    assert_ne!(t.encode("hello", false, false), [id(&t, "▁hello")]);
}

#[test]
fn sentencepiece_needs_one_score_per_token() {
    let e = Tokenizer::new(TokenizerSpec {
        model: "llama".into(),
        tokens: vec!["a".into(), "b".into()],
        scores: vec![0.0],
        ..Default::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("one score per token"), "{e}");
}
