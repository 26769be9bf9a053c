//! `aitl load` against a scripted server on loopback: fixed latencies and
//! errors, so the report's counts, status codes and latency floors are known.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use aitl::{
    eval::dataset::LabelledQuery,
    load::{Arrival, LoadOptions, Pattern, report::LoadReport},
    proto::{
        self, GenerateEvent, GenerateRequest, GenerateResponse, KnowledgeObject, RankRequest, RankResponse,
        RetrieveRequest, RetrieveResponse, ScoredKnowledge, SubmitAnnotationRequest, SubmitAnnotationResponse,
        annotation, generate_event,
        support_service_server::{SupportService, SupportServiceServer},
    },
};
use tonic::{Request, Response, Status};

const RETRIEVE_MS: u64 = 20;
const RANK_MS: u64 = 10;
const DELTA_MS: u64 = 10;
const DELTAS: u32 = 5;

/// Retrieve takes 20 ms and fails for questions that say "outage"; Rank
/// takes 10 ms; GenerateStream sends two candidates five deltas each, 10 ms
/// apart; relevance annotations are refused, the other kinds acknowledged.
#[derive(Default)]
struct Scripted {
    calls: AtomicU64,
}

fn scored(n: usize) -> Vec<ScoredKnowledge> {
    (0..n)
        .map(|i| ScoredKnowledge {
            knowledge: Some(KnowledgeObject { id: format!("k{i}"), ..Default::default() }),
            score: 1.0 / (i + 1) as f32,
            rank: i as u32 + 1,
        })
        .collect()
}

#[tonic::async_trait]
impl SupportService for Scripted {
    async fn retrieve(&self, request: Request<RetrieveRequest>) -> Result<Response<RetrieveResponse>, Status> {
        tokio::time::sleep(Duration::from_millis(RETRIEVE_MS)).await;
        let request = request.into_inner();
        if request.query.contains("outage") {
            return Err(Status::unavailable("scripted outage"));
        }
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(RetrieveResponse {
            interaction_id: format!("r{n}"),
            results: scored(request.top_k as usize),
            ..Default::default()
        }))
    }

    async fn rank(&self, request: Request<RankRequest>) -> Result<Response<RankResponse>, Status> {
        tokio::time::sleep(Duration::from_millis(RANK_MS)).await;
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let items = scored(request.into_inner().top_n as usize)
            .into_iter()
            .map(|k| proto::RankedItem { score: k.score, rank: k.rank, knowledge: Some(k), passage_index: 0 })
            .collect();
        Ok(Response::new(RankResponse { interaction_id: format!("k{n}"), items, ..Default::default() }))
    }

    async fn generate(&self, _: Request<GenerateRequest>) -> Result<Response<GenerateResponse>, Status> {
        Err(Status::unimplemented("the load generator streams"))
    }

    type GenerateStreamStream = tokio_stream::wrappers::ReceiverStream<Result<GenerateEvent, Status>>;

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let candidates = request.into_inner().num_candidates;
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let ids: Vec<String> = (0..candidates).map(|c| format!("g{n}-c{c}")).collect();
            let event = |e: generate_event::Event| Ok(GenerateEvent { event: Some(e) });
            let started = generate_event::Started {
                interaction_id: format!("g{n}"),
                candidate_ids: ids.clone(),
                ..Default::default()
            };
            sender.send(event(generate_event::Event::Started(started))).await.unwrap();
            for _ in 0..DELTAS {
                tokio::time::sleep(Duration::from_millis(DELTA_MS)).await;
                for id in &ids {
                    let delta = generate_event::Delta { candidate_id: id.clone(), text: "word ".into() };
                    sender.send(event(generate_event::Event::Delta(delta))).await.unwrap();
                }
            }
            for id in &ids {
                let finished =
                    proto::Candidate { candidate_id: id.clone(), completion_tokens: DELTAS, ..Default::default() };
                sender.send(event(generate_event::Event::Finished(finished))).await.unwrap();
            }
            sender.send(event(generate_event::Event::Done(Default::default()))).await.unwrap();
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(receiver)))
    }

    async fn submit_annotation(
        &self,
        request: Request<SubmitAnnotationRequest>,
    ) -> Result<Response<SubmitAnnotationResponse>, Status> {
        let annotation = request.into_inner().annotation.unwrap_or_default();
        match annotation.kind {
            Some(annotation::Kind::Relevance(_)) => Err(Status::invalid_argument("scripted rejection")),
            Some(_) => Ok(Response::new(SubmitAnnotationResponse {
                annotation_id: annotation.annotation_id,
                ..Default::default()
            })),
            None => Err(Status::invalid_argument("annotation.kind is required")),
        }
    }
}

async fn scripted_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SupportServiceServer::new(Scripted::default()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))),
    );
    format!("http://{address}")
}

fn question(id: &str, text: &str, relevant: &str) -> LabelledQuery {
    LabelledQuery {
        id: id.into(),
        index: 0,
        query: text.into(),
        context: Vec::new(),
        relevant: vec![relevant.into()],
        judged_irrelevant: None,
        reference_reply: String::new(),
    }
}

fn options(server: String, pattern: Pattern, arrival: Arrival) -> LoadOptions {
    LoadOptions {
        server,
        pattern,
        arrival,
        duration: Duration::from_secs(60),
        warmup: Duration::ZERO,
        max_turns: None,
        think: Duration::ZERO,
        candidates: 2,
        max_new_tokens: 8,
        queries: vec![
            question("q0", "is there wifi?", "k1"),
            question("q1", "is there parking?", "k30"),
            question("q2", "an outage question", "k2"),
        ],
        passages: vec!["a passage".into()],
        seed: 3,
    }
}

fn rpc<'a>(report: &'a LoadReport, name: &str) -> &'a aitl::load::report::RpcReport {
    report.rpcs.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("no {name} in {report}"))
}

fn codes(report: &LoadReport, name: &str) -> Vec<(String, u64)> {
    rpc(report, name).status_code_distribution.iter().map(|(c, n)| (c.clone(), *n)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copilot_pattern_reports_every_call_with_its_status_and_timings() {
    let server = scripted_server().await;
    let options =
        LoadOptions { max_turns: Some(6), ..options(server, Pattern::Copilot, Arrival::Closed { agents: 2 }) };
    let report = aitl::load::run(&options).await.unwrap();
    print!("{report}");
    assert_eq!((report.turns_started, report.turns_finished), (6, 6));
    // Turns 2 and 5 ask the outage question: Retrieve fails and the turn ends there.
    assert_eq!(codes(&report, "Retrieve"), [("OK".into(), 4), ("Unavailable".into(), 2)]);
    assert_eq!(rpc(&report, "Retrieve").error_distribution["Unavailable: scripted outage"], 2);
    assert_eq!(codes(&report, "Rank"), [("OK".into(), 4)]);
    assert_eq!(codes(&report, "GenerateStream"), [("OK".into(), 4)]);
    // Four annotations per finished turn; the relevance ones are refused.
    assert_eq!(codes(&report, "SubmitAnnotation"), [("InvalidArgument".into(), 4), ("OK".into(), 12)]);
    let seconds = report.total as f64 / 1e9;
    assert!((report.annotations_per_second * seconds - 12.0).abs() < 1e-6, "{report}");
    // Failed calls count in the latencies: every Retrieve, failed or not, took its 20 ms.
    let retrieve = &rpc(&report, "Retrieve").latency;
    assert_eq!(retrieve.count, 6);
    assert!(retrieve.fastest >= RETRIEVE_MS * 1_000_000, "{retrieve:?}");
    assert!(rpc(&report, "Rank").latency.fastest >= RANK_MS * 1_000_000);
    let histogram: u64 = rpc(&report, "Retrieve").histogram.iter().map(|b| b.count).sum();
    assert_eq!(histogram, 6);
    let stream = rpc(&report, "GenerateStream").stream.as_ref().unwrap();
    assert_eq!(stream.time_to_first_token.count, 4);
    assert!(stream.time_to_first_token.fastest >= DELTA_MS * 1_000_000);
    // Per candidate, the gaps between its five deltas: 4 streams × 2 candidates × 4 gaps.
    assert_eq!(stream.inter_token.count, 32);
    assert!(
        stream.inter_token.latency_distribution.iter().find(|p| p.percentage == 50.0).unwrap().latency >= 9_000_000
    );
    // Ten tokens a stream over about 50 ms: at most 200 tokens/s each.
    assert!(stream.tokens_per_second_p50 > 0.0 && stream.tokens_per_second_p50 <= 10.0 / 0.05, "{report}");
    assert!((stream.tokens_per_second_total * seconds - 40.0).abs() < 1e-6);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["rpcs"][0]["statusCodeDistribution"]["Unavailable"], 2, "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_that_cannot_run_are_refused_before_connecting() {
    // Nothing listens there: a refusal that names the option comes before any connection attempt.
    let server = "http://127.0.0.1:9".to_string();
    let cases =
        [(Arrival::Open { rate: 0.0, max_in_flight: 1 }, "--rate 0"), (Arrival::Closed { agents: 0 }, "--agents 0")];
    for (arrival, flag) in cases {
        let err = aitl::load::run(&options(server.clone(), Pattern::Retrieve, arrival)).await.unwrap_err();
        assert!(matches!(err, aitl::error::Error::InvalidArgument(_)) && err.to_string().contains(flag), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_arrival_rate_counts_offered_achieved_and_dropped_turns() {
    let server = scripted_server().await;
    // 100 turns/s offered, one in flight at a time, each Retrieve 20 ms: about half can start.
    let options = LoadOptions {
        duration: Duration::from_millis(1000),
        warmup: Duration::from_millis(200),
        ..options(server, Pattern::Retrieve, Arrival::Open { rate: 100.0, max_in_flight: 1 })
    };
    let report = aitl::load::run(&options).await.unwrap();
    print!("{report}");
    assert_eq!(report.offered_rate, Some(100.0));
    let retrieve = rpc(&report, "Retrieve");
    assert_eq!(retrieve.count, report.turns_started, "the warm-up's calls are not reported");
    assert!(report.turns_dropped > 0, "{report}");
    assert!((5..=52).contains(&report.turns_started), "at most one 20 ms call at a time: {report}");
    let offered = report.turns_started + report.turns_dropped;
    assert!((50..=102).contains(&offered), "about 100 offered in the measured second: {report}");
    assert!(report.achieved_rate < 60.0, "{report}");
    assert!(rpc(&report, "Retrieve").latency.fastest >= RETRIEVE_MS * 1_000_000);
}
