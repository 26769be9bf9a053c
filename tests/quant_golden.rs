//! ggml block dequantization against the `gguf` package's reference
//! implementation (tests/fixtures/quant_golden.json, made by
//! tests/fixtures/make_quant_golden.py): random blocks of every quantized
//! type aitl reads. The block dot products are tested against this
//! dequantization in the library's unit tests.

use aitl::backend::quant::{GgmlType, dequantize_row};

fn hex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn dequantization_matches_the_gguf_reference() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/quant_golden.json")).expect("fixture parses");
    let types = [
        ("Q4_0", GgmlType::Q4_0),
        ("Q4_1", GgmlType::Q4_1),
        ("Q8_0", GgmlType::Q8_0),
        ("Q4_K", GgmlType::Q4K),
        ("Q5_K", GgmlType::Q5K),
        ("Q6_K", GgmlType::Q6K),
    ];
    assert_eq!(fixture.as_object().unwrap().len(), types.len());
    for (name, dtype) in types {
        let case = &fixture[name];
        let bytes = hex(case["bytes"].as_str().unwrap());
        let want: Vec<f32> = case["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(bytes.len(), dtype.row_bytes(want.len()), "{name}");
        let mut got = vec![0f32; want.len()];
        dequantize_row(dtype, &bytes, &mut got);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            // Both compute scale × quant (+ min) in f32; allow one rounding apart.
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{name} value {i}: {a} vs reference {b}");
        }
    }
}
