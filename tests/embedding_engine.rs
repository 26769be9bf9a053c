//! The embedding engine's scheduling contract: concurrent requests are
//! batched and answered with the same vectors as alone, a full queue answers
//! RESOURCE_EXHAUSTED, and requests whose caller has gone cost no compute.

mod common;

use aitl::{
    backend::Device,
    engine::{EmbeddingEngine, EncoderOptions},
    error::Error,
};
use futures_util::FutureExt;

fn long_text(i: usize) -> String {
    format!("Passage {i}: ") + &"refunds are issued within fourteen business days of the return ".repeat(20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_concurrent_requests_and_refuses_when_full() {
    let options = EncoderOptions { token_budget: 1024, queue_capacity: 2, ..Default::default() };
    let engine = EmbeddingEngine::load(Device::Cpu, &common::default_embedder_dir(), options).unwrap();
    let alone = engine.embed(&["Can I get a refund?"]).await.unwrap().0.remove(0);

    let calls: Vec<_> = (0..40)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let text = if i == 0 { "Can I get a refund?".to_string() } else { long_text(i) };
                (i, engine.embed(&[text.as_str()]).await)
            })
        })
        .collect();
    let (mut refused, mut served) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            (i, Ok((vectors, _))) => {
                served += 1;
                if i == 0 {
                    let diff = vectors[0].iter().zip(&alone).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(diff <= 1e-5, "batched result differs from single by {diff}");
                }
            }
            (_, Err(Error::ResourceExhausted(message))) => {
                assert!(message.contains("queue is full"), "{message}");
                refused += 1;
            }
            (_, Err(other)) => panic!("unexpected error {other}"),
        }
    }
    assert!(refused > 0, "a queue of 2 cannot take 40 long requests at once");
    assert!(served >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_whose_caller_left_are_dropped_unrun() {
    let options = EncoderOptions { token_budget: 2048, queue_capacity: 64, ..Default::default() };
    let engine = EmbeddingEngine::load(Device::Cpu, &common::default_embedder_dir(), options).unwrap();
    let texts: Vec<String> = (0..48).map(long_text).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let busy = engine.embed(&refs);
    let mut busy = Box::pin(busy);
    assert!(busy.as_mut().now_or_never().is_none(), "the big request is queued and running");
    for i in 0..5 {
        // Polled once (enqueued), then dropped: the caller went away.
        assert!(engine.embed(&[long_text(100 + i).as_str()]).now_or_never().is_none());
    }
    busy.await.unwrap();
    // One more request flushes the queue behind the dropped ones.
    engine.embed(&["after"]).await.unwrap();
    let dropped = engine.counters().dropped.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(dropped, 5);
}
