// Raw ggml blocks read from the storage array `W` (declared by the kernel that includes this
// file: the Rust side prepends this library to the kernel's source). Weights are uploaded as
// the file's bytes, unchanged, so that bundles copied from the flash image need no repacking.
// Every block size is even, so every field starts at an even byte offset, but not always at a
// multiple of 4 (a Q8_0 block is 34 bytes): loads go through `w_u32`, which splices two words
// when the offset is 2 mod 4. Storage buffers are padded by 4 bytes so the spliced load of the
// last word stays in bounds.
//
// f16 fields are read through `w_f16`/`w_f16x2`: unpacked from the u32 words in the packed form,
// or loaded from `W_H`, an `array<f16>` view of the same buffer, in the native form (see
// src/backend/gpu/shaders.rs).

//@native @group(1) @binding(0) var<storage, read> W_H: array<f16>;

// Dtype codes (the Rust side maps `DType` to these in `kernels::dtype_code`).
const DT_F32: u32 = 0u;
const DT_F16: u32 = 1u;
const DT_BF16: u32 = 2u;
const DT_Q4_0: u32 = 3u;
const DT_Q4_1: u32 = 4u;
const DT_Q8_0: u32 = 5u;
const DT_Q4_K: u32 = 6u;
const DT_Q6_K: u32 = 7u;

// Set by the host when every row (or bundle part) starts at a multiple of 4 bytes and its blocks
// are multiples of 4 bytes (F32, F16/BF16 rows of even length, Q4_1's 20-byte and Q4_K's 144-byte
// blocks): the check below then folds away. Q8_0 (34-byte), Q4_0 (18-byte) and Q6_K (210-byte)
// blocks leave it false.
override ALIGNED: bool = false;

// The 4 bytes at even byte offset `b`, little-endian.
fn w_u32(b: u32) -> u32 {
    let i = b >> 2u;
    if (ALIGNED || (b & 3u) == 0u) {
        return W[i];
    }
    return (W[i] >> 16u) | (W[i + 1u] << 16u);
}

// The 2 bytes at even byte offset `b`.
fn w_u16(b: u32) -> u32 {
    return (W[b >> 2u] >> ((b & 2u) * 8u)) & 0xffffu;
}

fn w_byte(b: u32) -> u32 {
    return (W[b >> 2u] >> ((b & 3u) * 8u)) & 0xffu;
}

// The f16 at even byte offset `b`.
fn w_f16(b: u32) -> f32 {
    //@packed return unpack2x16float(w_u16(b)).x;
    //@native return f32(W_H[b >> 1u]);
}

// The two f16 at even byte offset `b` (bytes b..b+4).
fn w_f16x2(b: u32) -> vec2<f32> {
    //@packed return unpack2x16float(w_u32(b));
    //@native return vec2<f32>(f32(W_H[b >> 1u]), f32(W_H[(b >> 1u) + 1u]));
}

// Sign-extends byte `k` (0..3) of `w` to an i32.
fn i8_of(w: u32, k: u32) -> i32 {
    return bitcast<i32>(w << (24u - 8u * k)) >> 24u;
}

// Values per block of `dt`.
fn block_len(dt: u32) -> u32 {
    if (dt <= DT_BF16) {
        return 1u;
    }
    if (dt >= DT_Q4_K) {
        return 256u;
    }
    return 32u;
}

// Bytes per block of `dt` (ggml's sizes).
fn block_bytes(dt: u32) -> u32 {
    switch dt {
        case 0u: { return 4u; }
        case 1u, 2u: { return 2u; }
        case 3u: { return 18u; }
        case 4u: { return 20u; }
        case 6u: { return 144u; }
        case 7u: { return 210u; }
        default: { return 34u; }
    }
}

// Sub-block `s` (0..7) of the Q4_K block at byte `blk`: its 6-bit scale and min, packed in the
// 12 bytes after the two f16 (ggml's get_scale_min_k4).
fn q4k_scale_min(blk: u32, s: u32) -> vec2<f32> {
    let q = blk + 4u;
    if (s < 4u) {
        return vec2<f32>(f32(w_byte(q + s) & 63u), f32(w_byte(q + s + 4u) & 63u));
    }
    let sc = (w_byte(q + s + 4u) & 15u) | ((w_byte(q + s - 4u) >> 6u) << 4u);
    let m = (w_byte(q + s + 4u) >> 4u) | ((w_byte(q + s) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(m));
}

// The i8 at byte `b`, as f32.
fn w_i8(b: u32) -> f32 {
    return f32(bitcast<i32>(w_byte(b) << 24u) >> 24u);
}

// Value `j` of the row of dtype `dt` that starts at byte `row`: the shader twin of
// `quant::dequantize`.
fn w_value(dt: u32, row: u32, j: u32) -> f32 {
    switch dt {
        case 0u: {
            return bitcast<f32>(w_u32(row + 4u * j));
        }
        case 1u: {
            return w_f16(row + 2u * j);
        }
        case 2u: {
            // A bf16 is the top half of an f32.
            return bitcast<f32>(w_u16(row + 2u * j) << 16u);
        }
        case 3u: {
            // Q4_0: {f16 d; u8 qs[16]}, value k = (nibble - 8) * d; low nibbles hold 0..15,
            // high nibbles 16..31.
            let blk = row + (j / 32u) * 18u;
            let k = j % 32u;
            let byte = w_byte(blk + 2u + (k % 16u));
            let q = select(byte & 15u, byte >> 4u, k >= 16u);
            return (f32(q) - 8.0) * w_f16(blk);
        }
        case 4u: {
            // Q4_1: {f16 d; f16 m; u8 qs[16]}, value = nibble * d + m.
            let blk = row + (j / 32u) * 20u;
            let k = j % 32u;
            let byte = w_byte(blk + 4u + (k % 16u));
            let q = select(byte & 15u, byte >> 4u, k >= 16u);
            let dm = w_f16x2(blk);
            return f32(q) * dm.x + dm.y;
        }
        case 6u: {
            // Q4_K: {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]} over 256 values in 8
            // sub-blocks of 32: value = d * scale * nibble - dmin * min. Sub-blocks 2c and
            // 2c + 1 are the low and high nibbles of qs[32c..32c + 32].
            let blk = row + (j / 256u) * 144u;
            let r = j % 256u;
            let s = r / 32u;
            let byte = w_byte(blk + 16u + 32u * (s / 2u) + r % 32u);
            let q = select(byte & 15u, byte >> 4u, (s & 1u) == 1u);
            let dm = w_f16x2(blk);
            let sm = q4k_scale_min(blk, s);
            return dm.x * sm.x * f32(q) - dm.y * sm.y;
        }
        case 7u: {
            // Q6_K: {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d} over 256 values, two halves
            // of 128 in four quarters of 32: value = d * scale * (6-bit q - 32), the low 4 bits
            // from ql (quarters 0/1 low nibbles, 2/3 high), the top 2 from qh, a scale per 16.
            let blk = row + (j / 256u) * 210u;
            let r = j % 256u;
            let n = r / 128u;
            let qq = (r % 128u) / 32u;
            let l = r % 32u;
            let lo = w_byte(blk + 64u * n + 32u * (qq & 1u) + l);
            let nib = select(lo & 15u, lo >> 4u, qq >= 2u);
            let hi = (w_byte(blk + 128u + 32u * n + l) >> (2u * qq)) & 3u;
            let q = f32(i32(nib | (hi << 4u)) - 32);
            let sc = w_i8(blk + 192u + 8u * n + l / 16u + 2u * qq);
            return w_f16(blk + 208u) * sc * q;
        }
        default: {
            // Q8_0: {f16 d; i8 qs[32]}, value = q * d.
            let blk = row + (j / 32u) * 34u;
            let k = j % 32u;
            let q = bitcast<i32>(w_byte(blk + 2u + k) << 24u) >> 24u;
            return f32(q) * w_f16(blk);
        }
    }
}
