//! Personal-data redaction per KB of text, as the server pays it before each
//! log append: prose with no digit (the detectors are skipped), prose with
//! order numbers and dates but no personal data, and prose dense with it.
//! Criterion reports throughput in bytes; the time per KB is its inverse.
//!
//! `cargo bench --bench redaction`

use aitl::privacy::{Redactions, Redactor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// About 1 KB made of `sentence` repeated.
fn kilobyte(sentence: &str) -> String {
    let mut text = String::new();
    while text.len() < 1_024 {
        text.push_str(sentence);
        text.push(' ');
    }
    text
}

fn redaction(c: &mut Criterion) {
    let redactor = Redactor::default();
    let texts = [
        ("no_digits", kilobyte("Hello, I would like to know when my refund arrives and whether shipping is free.")),
        (
            "numbers_no_pii",
            kilobyte("Order #A-48213-77 of 2024-03-15 cost $1,299.00, invoice INV-2024-00123, 2 rooms."),
        ),
        (
            "dense_pii",
            kilobyte("Mail jane.doe@example.com or +1 415-555-0132, card 4111 1111 1111 1111 cvv 123, 42 Elm Street."),
        ),
    ];
    let mut group = c.benchmark_group("redact");
    for (name, text) in &texts {
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(*name, |b| {
            b.iter(|| {
                let mut counts = Redactions::new();
                std::hint::black_box(redactor.redact(std::hint::black_box(text), &mut counts).len())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, redaction);
criterion_main!(benches);
