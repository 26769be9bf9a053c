//! Limits a hostile or careless client meets (kernel/middleware): half-sent
//! messages cannot take the server's memory, connections are capped and
//! closed when idle, calls past `max_in_flight` are shed with a retry hint
//! while health checks still answer, deadlines end calls DEADLINE_EXCEEDED,
//! and shutdown drains within its deadline.

mod common;

use std::time::{Duration, Instant};

use aitl::proto::{
    ListKnowledgeRequest, Passages, RankRequest, UpsertKnowledgeRequest,
    knowledge_service_client::KnowledgeServiceClient, rank_request::Candidates,
};
use bytes::Bytes;
use common::*;
use tokio::io::AsyncReadExt;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A server process that goes with the test, even one that fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024.0
}

/// An HTTP/2 connection that speaks raw frames, as an attacker's would.
async fn raw_connection(addr: &str) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client.ready().await.unwrap()
}

/// The headers of a gRPC call to `path`, for a raw HTTP/2 stream.
fn grpc_request(addr: &str, path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// A SubmitAnnotation stream that announces a message of `announced` bytes
/// and sends only `sent` of them.
struct HalfSent {
    response: h2::client::ResponseFuture,
    _body: h2::SendStream<Bytes>,
}

impl HalfSent {
    async fn open(client: &mut h2::client::SendRequest<Bytes>, addr: &str, announced: u32, sent: usize) -> Self {
        let request = grpc_request(addr, "/aitl.v1.SupportService/SubmitAnnotation");
        *client = client.clone().ready().await.unwrap();
        let (response, mut body) = client.send_request(request, false).unwrap();
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&announced.to_be_bytes());
        body.send_data(Bytes::from(prefix), false).unwrap();
        body.send_data(Bytes::from(vec![b'x'; sent]), false).unwrap();
        HalfSent { response, _body: body }
    }

    /// The gRPC status the server answered with, if it answered within `wait`.
    async fn answer(&mut self, wait: Duration) -> Option<i32> {
        let answered = tokio::time::timeout(wait, &mut self.response).await.ok()?.ok()?;
        answered.headers().get("grpc-status").and_then(|v| v.to_str().ok()?.parse().ok())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_messages_cannot_exhaust_the_servers_memory() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("aitl.toml");
    std::fs::write(
        &config,
        "[limits]\nmax_message_mib = 16\nmax_buffered_request_mib = 32\nmax_buffered_request_mib_per_connection = 16\n",
    )
    .unwrap();
    let (child, addr) = serve_process(&dir.path().join("data"), Some(&config));
    let child = KillOnDrop(child);
    let pid = child.0.id();
    let before = rss_mib(pid);

    // 64 streams on 4 connections, each announcing 15 MiB and sending 3 MiB
    // of it: 192 MiB if the server held them all.
    let mut streams = Vec::new();
    let mut connections = Vec::new();
    for _ in 0..4 {
        let mut connection = raw_connection(&addr).await;
        for _ in 0..16 {
            streams.push(HalfSent::open(&mut connection, &addr, 15 << 20, 3 << 20).await);
        }
        connections.push(connection);
    }
    let mut refused = 0;
    for stream in &mut streams {
        if let Some(code) = stream.answer(Duration::from_millis(300)).await {
            assert_eq!(code, Code::ResourceExhausted as i32);
            refused += 1;
        }
    }
    let peak = rss_mib(pid);
    println!("half-sent flood: 64 streams × 3 MiB sent; server RSS {before:.0} → {peak:.0} MiB; {refused} refused");
    assert!(refused >= 48, "at most 32 MiB of 192 MiB may be held: {refused} of 64 streams refused");
    assert!(peak - before < 32.0 + 48.0, "RSS grew {:.0} MiB: the 32 MiB budget plus buffers", peak - before);

    // A good client is still served meanwhile.
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let health = HealthClient::new(channel.clone()).check(HealthCheckRequest::default()).await.unwrap();
    assert_eq!(health.into_inner().status, 1);
    let listed = KnowledgeServiceClient::new(channel).list_knowledge(ListKnowledgeRequest::default()).await.unwrap();
    assert!(listed.into_inner().objects.is_empty());
    drop((streams, connections, child));
}

/// Reads until the peer closes; the bytes it sent before.
async fn until_closed(connection: &mut tokio::net::TcpStream) -> usize {
    let (mut total, mut buf) = (0, [0u8; 256]);
    loop {
        match connection.read(&mut buf).await {
            Ok(0) | Err(_) => return total,
            Ok(n) => total += n,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_and_closed_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.limits.max_connections = 3;
    config.limits.handshake_timeout_s = 1;
    config.limits.idle_timeout_s = 2;
    let server = aitl::server::start(config).await.unwrap();
    let addr = server.addr;

    // Three silent connections take every slot; a fourth is closed at once.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fourth = tokio::net::TcpStream::connect(addr).await.unwrap();
    let read = tokio::time::timeout(Duration::from_millis(500), until_closed(&mut fourth)).await;
    assert_eq!(read, Ok(0), "over the cap: closed before the server's HTTP/2 preface");

    // The silent ones never sent the HTTP/2 preface: closed after 1 s (the
    // server's own SETTINGS frame is all they got).
    let started = Instant::now();
    for connection in &mut silent {
        let got = tokio::time::timeout(Duration::from_secs(5), until_closed(connection)).await.unwrap();
        assert!(got < 100, "{got} bytes before closing");
    }
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(3), "closed after the 1 s handshake timeout, waited {waited:?}");
    drop(silent);

    // A connection that made a call lives through a call's length, then
    // closes after 2 s idle.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let request = grpc_request(&addr.to_string(), "/grpc.health.v1.Health/Check");
    let (response, mut body) = client.ready().await.unwrap().send_request(request, false).unwrap();
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true).unwrap();
    assert_eq!(response.await.unwrap().status(), 200);
    let idle_from = Instant::now();
    tokio::time::timeout(Duration::from_secs(6), connection).await.expect("the idle connection is closed").ok();
    let idle = idle_from.elapsed();
    assert!(idle >= Duration::from_millis(1_500) && idle < Duration::from_secs(5), "closed after {idle:?} idle");
    server.shutdown().await.unwrap();
}

/// An UpsertKnowledge stream that stays open holds its call slot.
async fn open_upsert(
    kb: &mut KnowledgeServiceClient<tonic::transport::Channel>,
    timeout: Option<Duration>,
) -> tokio::task::JoinHandle<Result<tonic::Response<aitl::proto::UpsertKnowledgeResponse>, tonic::Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<UpsertKnowledgeRequest>(1);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    let mut kb = kb.clone();
    tokio::spawn(async move {
        let _keep_open = tx;
        kb.upsert_knowledge(request).await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_the_limit_are_shed_and_deadlines_say_deadline_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.limits.max_in_flight = 2;
    config.limits.request_timeout_s = 2;
    config.limits.drain_timeout_s = 1;
    let server = aitl::server::start(config).await.unwrap();
    let channel = channel(&server).await;
    let mut kb = KnowledgeServiceClient::new(channel.clone());

    let held = [open_upsert(&mut kb, None).await, open_upsert(&mut kb, None).await];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let shed = kb.list_knowledge(ListKnowledgeRequest::default()).await.unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");
    assert!(shed.message().contains("limits.max_in_flight (2)"), "{}", shed.message());
    assert_eq!(shed.metadata().get("grpc-retry-pushback-ms").unwrap(), "1000");
    let health = HealthClient::new(channel.clone()).check(HealthCheckRequest::default()).await.unwrap();
    assert_eq!(health.into_inner().status, 1, "health checks are never shed");

    // The held calls end at the server's 2 s deadline, as DEADLINE_EXCEEDED.
    for call in held {
        let ended = call.await.unwrap().unwrap_err();
        assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended:?}");
        assert!(ended.message().contains("limits.request_timeout_s"), "{}", ended.message());
    }
    // A client's own shorter deadline too, not CANCELLED.
    let started = Instant::now();
    let ended = open_upsert(&mut kb, Some(Duration::from_millis(300))).await.await.unwrap().unwrap_err();
    assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    // Slots came back: a call goes through.
    kb.list_knowledge(ListKnowledgeRequest::default()).await.unwrap();

    // Shutdown waits at most drain_timeout_s for a call that does not end.
    let _stuck = open_upsert(&mut kb, None).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    server.shutdown().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3), "drained in {:?}", started.elapsed());
}

/// What could not be logged is refused before any compute, and what could
/// not be sent is refused before it is logged as shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_logged_or_sent_is_refused_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_with_embedder(dir.path());
    config.limits.max_message_mib = 1;
    config.limits.max_buffered_request_mib_per_connection = 1;
    let server = aitl::server::start(config).await.unwrap();
    let (mut support, mut kb) = clients(&server).await;
    let objects: Vec<_> = (0..20).map(|i| knowledge(&format!("long-{i}"), &"refund policy ".repeat(4_500))).collect();
    let batches: Vec<_> = objects.chunks(5).map(|c| UpsertKnowledgeRequest { objects: c.to_vec() }).collect();
    kb.upsert_knowledge(tokio_stream::iter(batches)).await.unwrap();
    let logged = server.state.interactions.len();
    let retrieve = aitl::proto::RetrieveRequest { query: "refund?".into(), top_k: 20, ..Default::default() };
    let refused = support.retrieve(retrieve).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("over limits.max_message_mib") && refused.message().contains("top_k"));
    assert_eq!(server.state.interactions.len(), logged, "a response that could not be sent is not logged as shown");
    let fits = aitl::proto::RetrieveRequest { query: "refund?".into(), top_k: 5, ..Default::default() };
    assert_eq!(support.retrieve(fits).await.unwrap().into_inner().results.len(), 5);
    assert_eq!(server.state.interactions.len(), logged + 1);
    server.shutdown().await.unwrap();

    // A Rank request within every field's limit, but larger than a log
    // record may be: refused at once, not after scoring 1,000 passages.
    let dir = tempfile::tempdir().unwrap();
    let server = aitl::server::start(config_with_embedder(dir.path())).await.unwrap();
    let (mut support, _) = clients(&server).await;
    let rank = RankRequest {
        query: "refund?".into(),
        context: (0..13).map(|_| aitl::proto::ConversationTurn { speaker: 1, text: "x".repeat(16_000) }).collect(),
        candidates: Some(Candidates::Passages(Passages { texts: vec!["p".repeat(16_384); 1_000] })),
        ..Default::default()
    };
    let started = Instant::now();
    let refused = support.rank(rank).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("the training log records at most"), "{}", refused.message());
    assert!(started.elapsed() < Duration::from_secs(10), "refused before scoring ({:?})", started.elapsed());
    server.shutdown().await.unwrap();
}
