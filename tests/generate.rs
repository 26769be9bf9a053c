//! Generate and GenerateStream end to end with the default generator
//! (SmolLM2-135M-Instruct Q4_1) over gRPC: grounded candidates with ids and
//! citations, seeded sampling that repeats, greedy output equal to the model
//! decoding alone, batched requests equal to solo ones, stop strings,
//! streaming deltas that add up to the candidates, the interaction in the log
//! so that agents can annotate it, and an abandoned stream that stops decoding.

mod common;

use aitl::{
    backend::Device,
    engine::grounding,
    model::{
        chat::ChatTokenizer,
        gguf::GgufFile,
        llama::{Llama, Step},
    },
    proto::{
        self, ConversationTurn, FinishReason, GenerateRequest, KnowledgeIds, SamplingParams, Speaker,
        SubmitAnnotationRequest, UpsertKnowledgeRequest, generate_event::Event, generate_request::Grounding,
    },
};
use common::*;

fn customer(text: &str) -> ConversationTurn {
    ConversationTurn { speaker: Speaker::Customer as i32, text: text.into() }
}

fn request(question: &str, sampling: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        conversation: vec![customer(question)],
        grounding: Some(Grounding::KnowledgeIds(KnowledgeIds { ids: vec!["refund".into(), "shipping".into()] })),
        sampling: Some(sampling),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_grounds_samples_streams_and_logs() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = default_generator_gguf();
    let mut config = config(dir.path());
    config.models.generator = gguf.display().to_string();
    let server = aitl::server::start(config).await.unwrap();
    let (mut support, mut kb) = clients(&server).await;
    let objects = vec![
        knowledge("refund", "Refunds go back to the original card within 14 days of the return."),
        knowledge("shipping", "Standard shipping is free on orders over 50 dollars."),
    ];
    kb.upsert_knowledge(tokio_stream::iter(vec![UpsertKnowledgeRequest { objects: objects.clone() }])).await.unwrap();

    // Two sampled candidates, grounded in the two objects, in prompt order.
    let sampled = SamplingParams { temperature: 0.8, top_p: 0.95, seed: 42, max_new_tokens: 20, ..Default::default() };
    let answer = support.generate(request("When do I get my refund?", sampled.clone())).await.unwrap().into_inner();
    assert_eq!(answer.candidates.len(), 2);
    let grounding_ids: Vec<&str> = answer.grounding.iter().map(|g| g.knowledge.as_ref().unwrap().id.as_str()).collect();
    assert_eq!(grounding_ids, ["refund", "shipping"]);
    let version = answer.models.as_ref().unwrap().generator.clone();
    assert!(version.starts_with("SmolLM2-135M-Instruct.Q4_1@"), "{version}");
    for (i, c) in answer.candidates.iter().enumerate() {
        assert_eq!(c.candidate_id, format!("{}/c{i}", answer.interaction_id));
        assert!(!c.text.trim().is_empty());
        assert!(c.completion_tokens >= 1 && c.completion_tokens <= 20, "{}", c.completion_tokens);
        assert_ne!(c.finish_reason, FinishReason::Unspecified as i32);
        assert_eq!(c.model_version, version);
        assert!(c.prompt_tokens > 50);
        assert!(c.cited_knowledge_ids.iter().all(|id| grounding_ids.contains(&id.as_str())));
    }
    assert_ne!(answer.candidates[0].text, answer.candidates[1].text, "two seeds, two replies");
    // Same seed, same request: same text.
    let again = support.generate(request("When do I get my refund?", sampled.clone())).await.unwrap().into_inner();
    let texts = |r: &proto::GenerateResponse| r.candidates.iter().map(|c| c.text.clone()).collect::<Vec<_>>();
    assert_eq!(texts(&again), texts(&answer));

    // Greedy through the server equals the model decoding the same prompt alone.
    let greedy = SamplingParams { max_new_tokens: 12, ..Default::default() };
    let mut one = request("Is shipping free?", greedy.clone());
    one.num_candidates = 1;
    let served = support.generate(one.clone()).await.unwrap().into_inner().candidates.remove(0);
    let file = GgufFile::open(&gguf).unwrap();
    let (model, tokenizer) = (Llama::from_gguf(&Device::Cpu, &file).unwrap(), ChatTokenizer::from_gguf(&file).unwrap());
    let messages = grounding::messages(grounding::DEFAULT_SYSTEM_PROMPT, &objects, &one.conversation);
    let refs: Vec<_> = messages.iter().map(|(r, t)| (*r, t.as_str())).collect();
    let prompt = tokenizer.encode(&tokenizer.render(&refs)).unwrap();
    assert_eq!(served.prompt_tokens as usize, prompt.len());
    let mut cache = model.new_cache();
    let mut logits = model.forward(&Device::Cpu, &mut [Step { tokens: &prompt, cache: &mut cache }]).unwrap().remove(0);
    let mut alone = Vec::new();
    for _ in 0..12 {
        let next = aitl::engine::sampler::argmax(&logits);
        if next == tokenizer.eos {
            break;
        }
        alone.push(next);
        logits = model.forward(&Device::Cpu, &mut [Step { tokens: &[next], cache: &mut cache }]).unwrap().remove(0);
    }
    assert_eq!(served.text, tokenizer.decode(&alone).unwrap());

    // Requests decoded together give what each gives alone.
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let (mut support, req) = (support.clone(), request("When do I get my refund?", sampled.clone()));
            tokio::spawn(async move { support.generate(req).await.unwrap().into_inner() })
        })
        .collect();
    for call in calls {
        assert_eq!(texts(&call.await.unwrap()), texts(&answer));
    }

    // A stop string ends the candidate before it.
    let full = served.text.clone();
    let cut_at = full.find(' ').expect("a reply of several words");
    let word = full[cut_at..].split_whitespace().next().unwrap().to_string();
    let mut stopped = one.clone();
    stopped.sampling = Some(SamplingParams { stop: vec![word.clone()], ..greedy.clone() });
    let stopped = support.generate(stopped).await.unwrap().into_inner().candidates.remove(0);
    assert_eq!(stopped.finish_reason, FinishReason::StopSequence as i32);
    assert!(full.starts_with(&stopped.text) && !stopped.text.contains(&word), "{:?} / {word:?}", stopped.text);

    // Streaming: started, deltas that add up to each candidate, done.
    let mut stream = support.generate_stream(request("When do I get my refund?", sampled)).await.unwrap().into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        events.push(event.event.unwrap());
    }
    let Some(Event::Started(started)) = events.first() else { panic!("first event is Started: {:?}", events.first()) };
    assert!(matches!(events.last(), Some(Event::Done(_))));
    let mut finished = 0;
    for id in &started.candidate_ids {
        let deltas: String = events
            .iter()
            .filter_map(|e| match e {
                Event::Delta(d) if &d.candidate_id == id => Some(d.text.as_str()),
                _ => None,
            })
            .collect();
        let done = events.iter().find_map(|e| match e {
            Event::Finished(c) if &c.candidate_id == id => Some(c),
            _ => None,
        });
        assert_eq!(deltas, done.expect("each candidate finishes").text);
        finished += 1;
    }
    assert_eq!(finished, 2);
    let streamed_texts: Vec<String> =
        events.iter().filter_map(|e| if let Event::Finished(c) = e { Some(c.text.clone()) } else { None }).collect();
    assert_eq!(streamed_texts.len(), 2);
    assert!(texts(&answer).iter().all(|t| streamed_texts.contains(t)), "streaming samples as Generate does");

    // The streamed interaction is in the log: the agent can prefer one candidate.
    let record = proto::InteractionRecord {
        interaction_id: started.interaction_id.clone(),
        candidates: started
            .candidate_ids
            .iter()
            .map(|id| proto::Candidate { candidate_id: id.clone(), ..Default::default() })
            .collect(),
        ..Default::default()
    };
    let ack = support
        .submit_annotation(SubmitAnnotationRequest {
            annotation: Some(preference("pref-stream", &record, "The first one cites the refund policy.")),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!ack.duplicate);

    // A caller that goes away mid-stream frees its candidates at the next step.
    let engine = server.state.generators.get().and_then(|g| g.champion.clone()).expect("a generator is loaded");
    let cancelled = || engine.counters().cancelled.load(std::sync::atomic::Ordering::Relaxed);
    let before = cancelled();
    let long = SamplingParams { temperature: 0.8, seed: 7, max_new_tokens: 2000, ..Default::default() };
    let mut stream = support.generate_stream(request("Tell me about refunds.", long)).await.unwrap().into_inner();
    let Some(Event::Started(abandoned)) = stream.message().await.unwrap().unwrap().event else {
        panic!("a stream starts with Started")
    };
    let Some(Event::Delta(first)) = stream.message().await.unwrap().unwrap().event else { panic!("then a delta") };
    drop(stream);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while cancelled() == before {
        assert!(std::time::Instant::now() < deadline, "the abandoned request kept decoding");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // What the abandoned stream had sent is logged, and can be annotated.
    let record = proto::InteractionRecord {
        interaction_id: abandoned.interaction_id.clone(),
        candidates: abandoned
            .candidate_ids
            .iter()
            .map(|id| proto::Candidate { candidate_id: id.clone(), ..Default::default() })
            .collect(),
        ..Default::default()
    };
    let annotation = preference("pref-abandoned", &record, "The first one had started well.");
    loop {
        let request = SubmitAnnotationRequest { annotation: Some(annotation.clone()) };
        match support.submit_annotation(request).await {
            Ok(_) => break,
            Err(status) if status.code() == tonic::Code::NotFound => {
                assert!(std::time::Instant::now() < deadline, "the abandoned stream was never logged: {status:?}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    server.shutdown().await.unwrap();
    let mut logged = None;
    aitl::trainlog::LogReader::new(dir.path().join("log"))
        .read_from(1, |r| {
            if let Some(proto::log_record::Body::Interaction(ix)) = r.body
                && ix.interaction_id == abandoned.interaction_id
            {
                logged = Some(ix);
            }
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    let logged = logged.expect("the abandoned interaction is in the log");
    assert_eq!(logged.candidates.len(), 2);
    let sent = logged.candidates.iter().find(|c| c.candidate_id == first.candidate_id).unwrap();
    assert!(sent.text.starts_with(&first.text), "{:?} was sent first; logged {:?}", first.text, sent.text);
    assert!(logged.candidates.iter().all(|c| c.finish_reason == FinishReason::Cancelled as i32));
}
