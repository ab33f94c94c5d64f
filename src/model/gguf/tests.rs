use std::path::{Path, PathBuf};

use super::reader::matrix_shape;
use super::*;
use crate::quant::DType;

fn s(v: &str) -> MetaValue {
    MetaValue::String(v.to_string())
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

fn parse_err(bytes: Vec<u8>) -> GgufError {
    match GgufFile::from_bytes(bytes) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

/// A small valid file: a couple of keys and two tensors.
fn sample() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_meta("general.architecture", s("llama"))
        .add_meta("llama.block_count", MetaValue::U32(2))
        .add_tensor(
            "a",
            &[4, 2],
            DType::F32,
            f32_bytes(&[1., 2., 3., 4., 5., 6., 7., 8.]),
        )
        .add_tensor("b", &[3], DType::F32, f32_bytes(&[9., 10., 11.]));
    w
}

fn header_len() -> usize {
    4 + 4 + 8 + 8
}

#[test]
fn round_trip_every_metadata_type() {
    let values = vec![
        ("u8", MetaValue::U8(200)),
        ("i8", MetaValue::I8(-5)),
        ("u16", MetaValue::U16(60000)),
        ("i16", MetaValue::I16(-30000)),
        ("u32", MetaValue::U32(4_000_000_000)),
        ("i32", MetaValue::I32(-2_000_000_000)),
        ("f32", MetaValue::F32(1.5e-5)),
        ("bool_t", MetaValue::Bool(true)),
        ("bool_f", MetaValue::Bool(false)),
        ("string", s("héllo ✓")),
        ("empty_string", s("")),
        ("u64", MetaValue::U64(u64::MAX)),
        ("i64", MetaValue::I64(i64::MIN)),
        ("f64", MetaValue::F64(-2.25e300)),
        (
            "arr_i32",
            MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(-2)]),
        ),
        ("arr_str", MetaValue::Array(vec![s("a"), s(""), s("ccc")])),
        (
            "arr_arr_str",
            MetaValue::Array(vec![
                MetaValue::Array(vec![s("x"), s("y")]),
                MetaValue::Array(vec![]),
                MetaValue::Array(vec![s("z")]),
            ]),
        ),
        ("arr_empty", MetaValue::Array(vec![])),
    ];
    let bytes = write_gguf(
        &values
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect::<Vec<_>>(),
        &[],
    );
    let f = GgufFile::from_bytes(bytes).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 32);
    assert!(f.tensors.is_empty());
    assert_eq!(f.metadata.len(), values.len());
    for ((k, v), (rk, rv)) in values.iter().zip(&f.metadata) {
        assert_eq!(k, rk);
        assert_eq!(v, rv, "key {k}");
    }
    assert_eq!(f.get("u8").unwrap().as_u64(), Some(200));
    assert_eq!(f.get("i8").unwrap().as_u64(), None);
    assert_eq!(f.get("i8").unwrap().as_i64(), Some(-5));
    assert_eq!(f.get("u64").unwrap().as_i64(), None);
    assert_eq!(f.get("i32").unwrap().as_f32(), Some(-2e9));
    assert_eq!(f.get("bool_t").unwrap().as_bool(), Some(true));
    assert_eq!(f.get("string").unwrap().as_str(), Some("héllo ✓"));
    assert_eq!(f.get_str_array("arr_str").unwrap(), vec!["a", "", "ccc"]);
    let nested = f.get("arr_arr_str").unwrap().as_array().unwrap();
    assert_eq!(nested[0].as_array().unwrap()[1].as_str(), Some("y"));
}

#[test]
fn typed_getters_and_errors() {
    let f = GgufFile::from_bytes(sample().to_bytes()).unwrap();
    assert_eq!(f.get_u64("llama.block_count").unwrap(), 2);
    assert_eq!(f.get_f32("llama.block_count").unwrap(), 2.0);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    let e = f.get_u64("general.architecture").unwrap_err();
    assert!(matches!(e, GgufError::WrongType { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("general.architecture") && msg.contains("llama"),
        "{msg}"
    );
    let e = f.get_str("nope").unwrap_err();
    assert!(matches!(e, GgufError::MissingKey { .. }) && e.to_string().contains("nope"));
    assert!(matches!(
        f.get_str_array("llama.block_count"),
        Err(GgufError::WrongType { .. })
    ));
    assert!(matches!(
        f.tensor("zzz"),
        Err(GgufError::TensorNotFound { .. })
    ));
}

#[test]
fn str_array_with_non_string_element_is_an_error() {
    let bytes = write_gguf(&[("arr", MetaValue::Array(vec![MetaValue::U8(1)]))], &[]);
    let f = GgufFile::from_bytes(bytes).unwrap();
    assert!(matches!(
        f.get_str_array("arr"),
        Err(GgufError::WrongType { .. })
    ));
}

#[test]
fn tensors_round_trip_and_shapes() {
    let f = GgufFile::from_bytes(sample().to_bytes()).unwrap();
    let a = f.tensor_info("a").unwrap();
    assert_eq!(
        (a.dims.clone(), a.dtype, a.n_bytes, a.offset),
        (vec![4, 2], DType::F32, 32, 0)
    );
    assert_eq!(f.tensor_info("b").unwrap().offset, 32);
    assert_eq!(f.data_offset % 32, 0);
    let t = f.tensor("a").unwrap();
    assert_eq!((t.rows, t.cols), (2, 4));
    assert_eq!(t.bytes(), &f32_bytes(&[1., 2., 3., 4., 5., 6., 7., 8.])[..]);
    let t = f.tensor("b").unwrap();
    assert_eq!((t.rows, t.cols), (1, 3));
    assert_eq!(t.bytes(), &f32_bytes(&[9., 10., 11.])[..]);
}

#[test]
fn higher_rank_tensors_collapse_trailing_ones() {
    let mut w = GgufWriter::new();
    w.add_tensor("ok", &[2, 3, 1, 1], DType::F32, vec![0u8; 24])
        .add_tensor("cube", &[2, 2, 2], DType::F32, vec![0u8; 32]);
    let f = GgufFile::from_bytes(w.to_bytes()).unwrap();
    let t = f.tensor("ok").unwrap();
    assert_eq!((t.rows, t.cols), (3, 2));
    assert!(matches!(
        f.tensor("cube"),
        Err(GgufError::NotAMatrix { .. })
    ));
}

#[test]
fn zero_copy_from_mapped_file() {
    let q8: Vec<u8> = (0..34u8 * 2).collect();
    let mut w = sample();
    w.add_tensor("q", &[32, 2], DType::Q8_0, q8.clone());
    let path = std::env::temp_dir().join(format!("llmflash-gguf-test-{}.gguf", std::process::id()));
    std::fs::write(&path, w.to_bytes()).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let t = f.tensor("q").unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!((t.rows, t.cols, t.dtype), (2, 32, DType::Q8_0));
    assert_eq!(t.bytes(), &q8[..]);
    assert_eq!(t.row(1), &q8[34..]);
}

#[test]
fn open_missing_file_is_io_error() {
    let e = GgufFile::open(Path::new("/nonexistent/x.gguf")).unwrap_err();
    assert!(matches!(e, GgufError::Io { .. }) && e.to_string().contains("x.gguf"));
}

#[test]
fn alignment_64_is_honoured() {
    let mut w = sample();
    w.alignment(64);
    w.add_tensor("c", &[5], DType::F32, f32_bytes(&[1.; 5]));
    let f = GgufFile::from_bytes(w.to_bytes()).unwrap();
    assert_eq!(f.alignment, 64);
    assert_eq!(f.data_offset % 64, 0);
    let offsets: Vec<u64> = f.tensors.iter().map(|t| t.offset).collect();
    assert_eq!(offsets, vec![0, 64, 128]);
    assert_eq!(f.tensor("c").unwrap().bytes(), &f32_bytes(&[1.; 5])[..]);
    assert_eq!(
        f.tensor("b").unwrap().bytes(),
        &f32_bytes(&[9., 10., 11.])[..]
    );
}

#[test]
fn bad_alignment_values() {
    let mut w = sample();
    w.alignment(48);
    assert!(matches!(
        parse_err(w.to_bytes()),
        GgufError::BadAlignment { .. }
    ));
    let mut w = sample();
    w.alignment(0);
    assert!(matches!(
        parse_err(w.to_bytes()),
        GgufError::BadAlignment { .. }
    ));
    let mut w = sample();
    w.add_meta(ALIGNMENT_KEY, MetaValue::U64(32));
    let e = parse_err(w.to_bytes());
    assert!(
        matches!(e, GgufError::BadAlignment { .. }) && e.to_string().contains("u64"),
        "{e}"
    );
}

#[test]
fn bad_magic() {
    let mut bytes = sample().to_bytes();
    bytes[0] = b'X';
    assert!(matches!(parse_err(bytes), GgufError::BadMagic { .. }));
    assert!(matches!(
        parse_err(b"GG".to_vec()),
        GgufError::BadMagic { .. }
    ));
    assert!(matches!(parse_err(Vec::new()), GgufError::BadMagic { .. }));
}

#[test]
fn versions() {
    for v in [0, 1, 4, 99] {
        let mut w = sample();
        w.version(v);
        let e = parse_err(w.to_bytes());
        assert!(
            matches!(e, GgufError::UnsupportedVersion { version, .. } if version == v),
            "{e}"
        );
    }
    let mut w = sample();
    w.version(2);
    assert_eq!(GgufFile::from_bytes(w.to_bytes()).unwrap().version, 2);
}

#[test]
fn truncation_anywhere_is_an_error() {
    let full = sample().to_bytes();
    // Every proper prefix must fail cleanly (never panic), and with a typed error.
    for len in 0..full.len() {
        let e = parse_err(full[..len].to_vec());
        assert!(
            matches!(
                e,
                GgufError::BadMagic { .. }
                    | GgufError::Truncated { .. }
                    | GgufError::CountTooLarge { .. }
                    | GgufError::DataOutOfBounds { .. }
            ),
            "prefix {len}: {e}"
        );
    }
    assert!(GgufFile::from_bytes(full).is_ok());
}

#[test]
fn truncated_tensor_data_names_the_tensor() {
    let mut full = sample().to_bytes();
    full.truncate(full.len() - 1);
    let e = parse_err(full);
    assert!(
        matches!(&e, GgufError::DataOutOfBounds { tensor, .. } if tensor == "b"),
        "{e}"
    );
}

#[test]
fn truncated_value_names_the_key() {
    let bytes = write_gguf(&[("some.key", s("a long string value"))], &[]);
    // Header, key (8 + 8), type (4), length (8), then 19 bytes of value; cut 3 short.
    let end = header_len() + 16 + 4 + 8 + 19;
    let e = parse_err(bytes[..end - 3].to_vec());
    assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("some.key"), "{e}");
}

#[test]
fn absurd_string_length() {
    let mut bytes = write_gguf(&[("k", s("v"))], &[]);
    // The value's length field: header, key (8 + 1), type (4).
    let at = header_len() + 9 + 4;
    bytes[at..at + 8].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    let e = parse_err(bytes);
    assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
    // Key length too.
    let mut bytes = write_gguf(&[("k", s("v"))], &[]);
    bytes[header_len()..header_len() + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(parse_err(bytes), GgufError::Truncated { .. }));
}

#[test]
fn absurd_array_count() {
    let mut bytes = write_gguf(&[("k", MetaValue::Array(vec![s("a")]))], &[]);
    // Header, key (8 + 1), type (4), element type (4), then the count.
    let at = header_len() + 9 + 4 + 4;
    bytes[at..at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    let e = parse_err(bytes);
    assert!(matches!(e, GgufError::CountTooLarge { .. }), "{e}");
    assert!(e.to_string().contains('k'));
}

#[test]
fn absurd_tensor_and_kv_counts() {
    let mut bytes = sample().to_bytes();
    bytes[8..16].copy_from_slice(&(u64::MAX).to_le_bytes());
    assert!(matches!(parse_err(bytes), GgufError::CountTooLarge { .. }));
    let mut bytes = sample().to_bytes();
    bytes[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(matches!(parse_err(bytes), GgufError::CountTooLarge { .. }));
}

#[test]
fn invalid_utf8_key_is_an_error_value_is_lossy() {
    let mut bytes = write_gguf(&[("k", s("v"))], &[]);
    bytes[header_len() + 8] = 0xff; // the key's only byte
    assert!(matches!(parse_err(bytes), GgufError::InvalidUtf8 { .. }));

    let mut bytes = write_gguf(&[("k", s("v"))], &[]);
    let at = header_len() + 9 + 4 + 8; // the value's only byte
    bytes[at] = 0xff;
    let f = GgufFile::from_bytes(bytes).unwrap();
    assert_eq!(f.get_str("k").unwrap(), "\u{fffd}");

    let mut w = GgufWriter::new();
    w.add_tensor("t", &[1], DType::F32, vec![0u8; 4]);
    let mut bytes = w.to_bytes();
    bytes[header_len() + 8] = 0xc3; // truncated 2-byte sequence as the name
    assert!(matches!(parse_err(bytes), GgufError::InvalidUtf8 { .. }));
}

#[test]
fn unknown_metadata_value_type() {
    let mut bytes = write_gguf(&[("k", MetaValue::U8(1))], &[]);
    let at = header_len() + 9;
    bytes[at..at + 4].copy_from_slice(&13u32.to_le_bytes());
    let e = parse_err(bytes);
    assert!(
        matches!(&e, GgufError::UnknownValueType { key, type_id: 13 } if key == "k"),
        "{e}"
    );
    // Unknown element type inside an array.
    let mut bytes = write_gguf(&[("k", MetaValue::Array(vec![MetaValue::U8(1)]))], &[]);
    let at = header_len() + 9 + 4;
    bytes[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
    assert!(matches!(
        parse_err(bytes),
        GgufError::UnknownValueType { type_id: 77, .. }
    ));
}

#[test]
fn deep_nesting_is_refused() {
    let mut v = MetaValue::Array(vec![MetaValue::U8(1)]);
    for _ in 0..MAX_ARRAY_DEPTH {
        v = MetaValue::Array(vec![v]);
    }
    let e = parse_err(write_gguf(&[("deep", v)], &[]));
    assert!(matches!(e, GgufError::NestingTooDeep { .. }), "{e}");
}

#[test]
fn unknown_tensor_type() {
    let mut w = GgufWriter::new();
    w.add_tensor_raw("blk.0.weird", &[32], 99, None, vec![0u8; 64]);
    let e = parse_err(w.to_bytes());
    assert!(
        matches!(&e, GgufError::UnknownTensorType { type_id: 99, tensor } if tensor == "blk.0.weird")
    );
    let msg = e.to_string();
    assert!(
        msg.contains("99") && msg.contains("Q8_0") && msg.contains("blk.0.weird"),
        "{msg}"
    );
}

#[test]
fn bad_dims() {
    let cases: Vec<(&[u64], DType)> = vec![
        (&[], DType::F32),
        (&[1, 1, 1, 1, 1], DType::F32),
        (&[4, 0], DType::F32),
        (&[u64::MAX, 2], DType::F32),
        (&[1 << 32, 1 << 32], DType::F32),
        (&[48, 2], DType::Q8_0),
        (&[128], DType::Q4K),
    ];
    for (dims, dtype) in cases {
        let mut w = GgufWriter::new();
        w.add_tensor("t", dims, dtype, vec![0u8; 64]);
        let e = parse_err(w.to_bytes());
        assert!(
            matches!(&e, GgufError::BadDims { tensor, .. } if tensor == "t"),
            "{dims:?}: {e}"
        );
    }
}

#[test]
fn misaligned_offset() {
    let mut w = GgufWriter::new();
    w.add_tensor_raw("t", &[1], 0, Some(4), vec![0u8; 64]);
    let e = parse_err(w.to_bytes());
    assert!(
        matches!(
            e,
            GgufError::MisalignedOffset {
                offset: 4,
                alignment: 32,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn offset_past_end_or_overflowing() {
    for off in [1u64 << 20, u64::MAX - 31] {
        let mut w = GgufWriter::new();
        w.add_tensor_raw("t", &[8], 0, Some(off), vec![0u8; 32]);
        let e = parse_err(w.to_bytes());
        assert!(matches!(e, GgufError::DataOutOfBounds { .. }), "{e}");
    }
}

#[test]
fn overlapping_tensors() {
    let mut w = GgufWriter::new();
    w.add_tensor("a", &[16], DType::F32, vec![0u8; 64])
        .add_tensor_raw("b", &[8], 0, Some(32), vec![0u8; 32]);
    let e = parse_err(w.to_bytes());
    assert!(matches!(e, GgufError::OverlappingTensors { .. }), "{e}");
}

#[test]
fn duplicate_tensor_names() {
    let mut w = GgufWriter::new();
    w.add_tensor("t", &[1], DType::F32, vec![0u8; 4])
        .add_tensor("t", &[1], DType::F32, vec![0u8; 4]);
    assert!(matches!(parse_err(w.to_bytes()), GgufError::DuplicateTensor { name } if name == "t"));
}

#[test]
fn duplicate_metadata_keys() {
    let bytes = write_gguf(&[("k", MetaValue::U8(1)), ("k", MetaValue::U8(2))], &[]);
    assert!(matches!(parse_err(bytes), GgufError::DuplicateKey { key } if key == "k"));
}

#[test]
fn fuzz_single_byte_corruption_never_panics() {
    let mut w = sample();
    w.add_meta(
        "arr",
        MetaValue::Array(vec![MetaValue::Array(vec![s("x")])]),
    );
    let full = w.to_bytes();
    for i in 0..full.len() {
        for b in [0u8, 0x7f, 0xff] {
            let mut bytes = full.clone();
            bytes[i] = b;
            if let Ok(f) = GgufFile::from_bytes(bytes) {
                for t in &f.tensors {
                    let _ = f.tensor(&t.name);
                }
            }
        }
    }
}

/// A file written by llama.cpp's own `gguf` Python package (gguf-py 0.x `GGUFWriter`),
/// so the reader is checked against the reference writer, not only against ours.
const GGUF_PY_FILE_HEX: &[&str] = &[
    "474755460300000003000000000000000700000000000000140000000000000067656e6572616c2e61726368",
    "69746563747572650800000005000000000000006c6c616d6111000000000000006c6c616d612e626c6f636b",
    "5f636f756e74040000001e00000026000000000000006c6c616d612e617474656e74696f6e2e6c617965725f",
    "6e6f726d5f726d735f657073696c6f6e06000000acc527371c00000000000000746f6b656e697a65722e6767",
    "6d6c2e6164645f626f735f746f6b656e07000000011500000000000000746f6b656e697a65722e67676d6c2e",
    "746f6b656e730900000008000000030000000000000003000000000000003c733e060000000000000068c3a9",
    "6c6c6f01000000000000006206000000000000006e6573746564090000000900000002000000000000000800",
    "0000020000000000000001000000000000007801000000000000007908000000010000000000000001000000",
    "000000007a03000000000000006936340b000000f9ffffffffffffff0800000000000000742e776569676874",
    "02000000200000000000000002000000000000000000000000000000000000000800000000000000712e7765",
    "6967687402000000200000000000000002000000000000000800000000010000000000000100000000000000",
    "68010000000700000000000000010000006001000000000000000000000000000000803f0000004000004040",
    "000080400000a0400000c0400000e04000000041000010410000204100003041000040410000504100006041",
    "00007041000080410000884100009041000098410000a0410000a8410000b0410000b8410000c0410000c841",
    "0000d0410000d8410000e0410000e8410000f0410000f84100000042000004420000084200000c4200001042",
    "000014420000184200001c4200002042000024420000284200002c4200003042000034420000384200003c42",
    "00004042000044420000484200004c4200005042000054420000584200005c42000060420000644200006842",
    "00006c4200007042000074420000784200007c42000102030405060708090a0b0c0d0e0f1011121314151617",
    "18191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f40414243",
    "00000000000000000000000000000000000000000000000000000000003c003c003c003c003c003c003c0000",
    "00000000000000000000000000000000",
];

#[test]
fn reads_file_written_by_gguf_py() {
    let hex: String = GGUF_PY_FILE_HEX.concat();
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let f = GgufFile::from_bytes(bytes).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_u64("llama.block_count").unwrap(), 30);
    assert_eq!(
        f.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(),
        1e-5
    );
    assert_eq!(
        f.get("tokenizer.ggml.add_bos_token").unwrap().as_bool(),
        Some(true)
    );
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens").unwrap(),
        vec!["<s>", "héllo", "b"]
    );
    let nested = f.get("nested").unwrap().as_array().unwrap();
    assert_eq!(nested[1].as_array().unwrap()[0].as_str(), Some("z"));
    assert_eq!(f.get("i64").unwrap().as_i64(), Some(-7));
    let t = f.tensor("t.weight").unwrap();
    assert_eq!((t.dtype, t.rows, t.cols), (DType::F32, 2, 32));
    let want: Vec<f32> = (0..64).map(|i| i as f32).collect();
    assert_eq!(t.bytes(), &f32_bytes(&want)[..]);
    let q = f.tensor("q.weight").unwrap();
    assert_eq!((q.dtype, q.rows, q.cols), (DType::Q8_0, 2, 32));
    assert_eq!(q.bytes(), &(0..68u8).collect::<Vec<_>>()[..]);
    let h = f.tensor("h").unwrap();
    assert_eq!((h.dtype, h.rows, h.cols), (DType::F16, 1, 7));
    assert_eq!(h.bytes(), &[0x00, 0x3c].repeat(7)[..]);
}

#[test]
fn large_vocabulary_parses() {
    let tokens: Vec<MetaValue> = (0..150_000).map(|i| s(&format!("tok{i}"))).collect();
    let bytes = write_gguf(&[("tokenizer.ggml.tokens", MetaValue::Array(tokens))], &[]);
    let start = std::time::Instant::now();
    let f = GgufFile::from_bytes(bytes).unwrap();
    let toks = f.get_str_array("tokenizer.ggml.tokens").unwrap();
    eprintln!("150k-token vocabulary parsed in {:?}", start.elapsed());
    assert_eq!((toks.len(), toks[149_999]), (150_000, "tok149999"));
}

/// Finds a real GGUF model under `models/` (SmolLM2 preferred).
fn real_model() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    found.sort_by_key(|p| !p.to_string_lossy().contains("SmolLM2-135M-Instruct"));
    found.into_iter().next()
}

/// Opens whatever `models/*.gguf` exists (skips if none) and loads every tensor; for
/// SmolLM2-135M-Instruct also checks known facts about the file.
#[test]
fn opens_real_model_if_present() {
    let Some(path) = real_model() else {
        eprintln!("skipping: no models/*.gguf (run the model fetch script)");
        return;
    };
    let start = std::time::Instant::now();
    let f = GgufFile::open(&path).unwrap();
    eprintln!("parsed {} in {:?}", path.display(), start.elapsed());
    assert!(f.version == 2 || f.version == 3);
    for info in &f.tensors {
        if matrix_shape(&info.dims).is_some() {
            f.tensor(&info.name).unwrap();
        }
    }
    if !path.to_string_lossy().contains("SmolLM2-135M-Instruct") {
        eprintln!(
            "{} is not SmolLM2-135M-Instruct; skipping its checks",
            path.display()
        );
        return;
    }
    assert_eq!(f.version, 3);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_u64("llama.block_count").unwrap(), 30);
    let emb = f.tensor_info("token_embd.weight").unwrap();
    assert_eq!(
        (emb.dtype, emb.dims.clone()),
        (DType::Q8_0, vec![576, 49152])
    );
    let gate = f.tensor_info("blk.0.ffn_gate.weight").unwrap();
    assert_eq!(
        (gate.dtype, gate.dims.clone()),
        (DType::Q4_1, vec![576, 1536])
    );
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
        49152
    );
    let t = f.tensor("token_embd.weight").unwrap();
    assert_eq!((t.rows, t.cols), (49152, 576));
}
