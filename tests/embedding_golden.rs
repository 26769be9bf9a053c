//! all-MiniLM-L6-v2 on aitl's own compute layer against sentence-transformers'
//! numbers (tests/fixtures/minilm_golden.json, made by
//! tests/fixtures/make_minilm_golden.py): cosine ≥ 0.9999 per text, and
//! batched equals single within 1e-5.

mod common;

use aitl::{backend::Device, model::sentence::SentenceEmbedder};

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn minilm_matches_sentence_transformers() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/minilm_golden.json")).expect("fixture parses");
    let dir = common::default_embedder_dir();
    let device = Device::Cpu;
    let embedder = SentenceEmbedder::load(&device, &dir).unwrap();
    assert_eq!(embedder.max_seq_length() as u64, fixture["max_seq_length"].as_u64().unwrap());
    let cases = fixture["cases"].as_array().unwrap();
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let want: Vec<Vec<f32>> = cases
        .iter()
        .map(|c| c["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect())
        .collect();
    assert!(texts.len() >= 20);

    let batched = embedder.embed(&device, &texts, 8192).unwrap();
    let mut worst = 1.0f64;
    for ((text, got), want) in texts.iter().zip(&batched).zip(&want) {
        let c = cosine(got, want);
        worst = worst.min(c);
        assert!(c >= 0.9999, "cosine {c} for {text:?}");
    }
    println!("worst cosine to sentence-transformers over {} texts: {worst:.7}", texts.len());

    let mut max_diff = 0f32;
    for (text, batched) in texts.iter().zip(&batched) {
        let single = embedder.embed(&device, &[text], 8192).unwrap().remove(0);
        for (a, b) in single.iter().zip(batched) {
            max_diff = max_diff.max((a - b).abs());
        }
    }
    assert!(max_diff <= 1e-5, "batched vs single differ by {max_diff}");
    println!("batched vs single: max abs difference {max_diff:e}");
}

/// The opt-in bf16 mode (`encoder_precision = "bf16"`, Intel AMX) keeps
/// cosine ≥ 0.999 to sentence-transformers on the same texts. On a CPU
/// without AMX the mode falls back to f32, which the test says and checks.
#[test]
fn minilm_in_bf16_stays_within_cosine_0_999_of_sentence_transformers() {
    use aitl::backend::Precision;
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/minilm_golden.json")).expect("fixture parses");
    let device = Device::Cpu;
    let runs_as = Precision::Bf16.effective(&device);
    println!("bf16 requested, products run as {runs_as:?}");
    let embedder = SentenceEmbedder::load_in(&device, &common::default_embedder_dir(), Precision::Bf16).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let got = embedder.embed(&device, &texts, 8192).unwrap();
    let f32_embedder = SentenceEmbedder::load(&device, &common::default_embedder_dir()).unwrap();
    let full = f32_embedder.embed(&device, &texts, 8192).unwrap();
    let (mut worst, mut differs) = (1.0f64, false);
    for ((case, got), full) in cases.iter().zip(&got).zip(&full) {
        let want: Vec<f32> = case["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let c = cosine(got, &want);
        worst = worst.min(c);
        assert!(c >= 0.999, "bf16 cosine {c} for {:?}", case["text"]);
        differs |= got != full;
    }
    println!("bf16: worst cosine to sentence-transformers over {} texts: {worst:.6}", texts.len());
    // bf16 products are not f32 ones: the mode is really on where AMX is.
    assert_eq!(differs, runs_as == Precision::Bf16, "bf16 outputs differ from f32 only where AMX runs them");
}
