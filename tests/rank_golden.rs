//! Cross-encoders on aitl's compute layer against sentence-transformers'
//! CrossEncoder (tests/fixtures/cross_encoder_golden.json, made by
//! tests/fixtures/make_cross_encoder_golden.py from two small random BERT
//! classifiers): same token ids, scores within 1e-4 absolute, batched equal
//! to single within 1e-5, the passage cut and never the query.

use std::path::PathBuf;

use aitl::{
    backend::Device,
    error::Error,
    model::cross_encoder::{CrossEncoder, CrossEncoderOptions, ScoreActivation},
};

fn fixture() -> serde_json::Value {
    serde_json::from_str(include_str!("fixtures/cross_encoder_golden.json")).expect("fixture parses")
}

fn model_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn floats(value: &serde_json::Value) -> Vec<f32> {
    value.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn cross_encoders_match_sentence_transformers() {
    let fixture = fixture();
    let device = Device::Cpu;
    for (name, expected) in fixture["models"].as_object().unwrap() {
        let model = CrossEncoder::load(&device, &model_dir(name), &CrossEncoderOptions::default()).unwrap();
        assert_eq!(model.max_length() as u64, fixture["max_length"].as_u64().unwrap());
        let want_activation = ScoreActivation::parse(expected["activation"].as_str().unwrap()).unwrap();
        assert_eq!(model.activation(), want_activation, "{name}");
        let pairs = expected["pairs"].as_array().unwrap();
        assert!(pairs.len() >= 10);

        let mut singles = Vec::new();
        let mut worst = 0f32;
        for pair in pairs {
            let (query, passage) = (pair["query"].as_str().unwrap(), pair["passage"].as_str().unwrap());
            let tokens = model.tokenize_pairs(query, &[passage]).unwrap().remove(0);
            let want_ids: Vec<u32> =
                pair["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            assert_eq!(tokens.ids, want_ids, "{name}: token ids of {query:?}");
            let scores = model.score_tokens(&device, &[&tokens]).unwrap().remove(0);
            let diff = max_diff(&scores, &floats(&pair["scores"]));
            worst = worst.max(diff);
            assert!(diff <= 1e-4, "{name}: {query:?} scores {scores:?}, want {}", pair["scores"]);
            singles.push((tokens, scores));
        }
        println!("{name}: worst absolute score difference to sentence-transformers {worst:e}");

        let batch: Vec<_> = singles.iter().map(|(t, _)| t).collect();
        let batched = model.score_tokens(&device, &batch).unwrap();
        let batch_diff = batched.iter().zip(&singles).map(|(b, (_, s))| max_diff(b, s)).fold(0.0, f32::max);
        assert!(batch_diff <= 1e-5, "{name}: batched vs single differ by {batch_diff}");
    }
}

#[test]
fn long_pairs_cut_the_passage_and_never_the_query() {
    let device = Device::Cpu;
    let model = CrossEncoder::load(&device, &model_dir("cross-encoder-1"), &CrossEncoderOptions::default()).unwrap();
    let limit = model.max_length();
    let query = "When will I get my money back after returning shoes that did not fit?";
    let passage = "Refunds are issued to the original payment method within five business days. ".repeat(20);
    let alone = model.tokenize_pairs(query, &["ok"]).unwrap().remove(0);
    let long = model.tokenize_pairs(query, &[&passage]).unwrap().remove(0);
    assert_eq!(long.ids.len(), limit, "the pair fills the model's limit exactly");
    // [CLS] query [SEP] comes through whole; the passage segment is what was cut.
    let query_part = alone.type_ids.iter().filter(|&&t| t == 0).count();
    assert_eq!(long.ids[..query_part], alone.ids[..query_part]);
    assert_eq!(long.type_ids.iter().filter(|&&t| t == 0).count(), query_part);
    assert_eq!(long.ids.last(), alone.ids.last(), "the pair still ends with [SEP]");

    let endless = "refund ".repeat(limit);
    match model.tokenize_pairs(&endless, &["ok"]) {
        Err(Error::InvalidArgument(message)) => {
            assert!(message.contains("never truncates the query"), "{message}");
            assert!(message.contains(&limit.to_string()), "{message}");
        }
        other => panic!("a query longer than the model is refused, got {:?}", other.map(|t| t.len())),
    }
}

#[test]
fn configured_activation_and_label_override_the_folder() {
    let fixture = fixture();
    let device = Device::Cpu;
    let options =
        CrossEncoderOptions { activation: Some(ScoreActivation::Identity), label: Some(1), ..Default::default() };
    let model = CrossEncoder::load(&device, &model_dir("cross-encoder-3"), &options).unwrap();
    assert_eq!(model.labels().len(), 3);
    let pair = &fixture["models"]["cross-encoder-3"]["pairs"][1];
    let tokens = model.tokenize_pairs(pair["query"].as_str().unwrap(), &[pair["passage"].as_str().unwrap()]).unwrap();
    let logits = model.score_tokens(&device, &[&tokens[0]]).unwrap().remove(0);
    assert!(max_diff(&logits, &floats(&pair["logits"])) <= 1e-4, "{logits:?} vs {}", pair["logits"]);
    assert_eq!(model.ranking_score(&logits), logits[1]);

    let out_of_range = CrossEncoderOptions { label: Some(3), ..Default::default() };
    let err = CrossEncoder::load(&device, &model_dir("cross-encoder-3"), &out_of_range).err().expect("refused");
    assert!(err.to_string().contains("3 labels"), "{err}");
}

/// In bf16 (`encoder_precision = "bf16"`, Intel AMX) the cross-encoders'
/// scores stay within 1e-2 of sentence-transformers' and rank each query's
/// pairs alike wherever the reference scores are 0.05 apart.
#[test]
fn cross_encoders_in_bf16_stay_close_to_sentence_transformers() {
    use aitl::backend::Precision;
    let fixture = fixture();
    let device = Device::Cpu;
    println!("bf16 requested, products run as {:?}", Precision::Bf16.effective(&device));
    for (name, expected) in fixture["models"].as_object().unwrap() {
        let options = CrossEncoderOptions { precision: Precision::Bf16, ..Default::default() };
        let model = CrossEncoder::load(&device, &model_dir(name), &options).unwrap();
        let mut worst = 0f32;
        let mut scored = Vec::new();
        for pair in expected["pairs"].as_array().unwrap() {
            let (query, passage) = (pair["query"].as_str().unwrap(), pair["passage"].as_str().unwrap());
            let tokens = model.tokenize_pairs(query, &[passage]).unwrap().remove(0);
            let scores = model.score_tokens(&device, &[&tokens]).unwrap().remove(0);
            let want = floats(&pair["scores"]);
            worst = worst.max(max_diff(&scores, &want));
            scored.push((scores[0], want[0]));
        }
        println!("{name} in bf16: worst absolute score difference {worst:e}");
        assert!(worst <= 1e-2, "{name}: bf16 scores differ by {worst}");
        for (i, a) in scored.iter().enumerate() {
            for b in &scored[i + 1..] {
                if (a.1 - b.1).abs() > 0.05 {
                    assert_eq!(a.0 > b.0, a.1 > b.1, "{name}: bf16 orders {a:?} and {b:?} unlike the reference");
                }
            }
        }
    }
}
