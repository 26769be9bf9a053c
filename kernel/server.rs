//! Assembles the server: stores opened and verified, indexes rebuilt from the
//! log, services behind explicit limits, health that follows the log's real
//! state, and reflection so grpcurl needs no proto files.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    api::{AppState, Flywheel, Knowledge, Support},
    config::Config,
    error::{Error, Result},
    feedback::{self, AnnotationIntake, InteractionBook},
    kb::KnowledgeStore,
    kb::{QueryComposition, SemanticIndex},
    keys::KeyStore,
    middleware::{self, AuthLayer, CallLimits, CallLimitsLayer, ConnectionLimits, Keys},
    proto::{
        self, flywheel_service_server::FlywheelServiceServer, knowledge_service_server::KnowledgeServiceServer,
        support_service_server::SupportServiceServer,
    },
    registry::{Registry, Role},
    serving::{
        Generators, ServedModels, Slot,
        follow::{Follower, Targets},
        load,
    },
    trainlog::{LogHealth, TrainingLog},
};

const SUPPORT_SERVICE: &str = "aitl.v1.SupportService";
const KNOWLEDGE_SERVICE: &str = "aitl.v1.KnowledgeService";

/// What a shed client is told to wait before retrying.
const RETRY_AFTER: Duration = Duration::from_millis(1_000);

pub struct RunningServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    /// The call limits in force; their counters are live.
    pub calls: CallLimitsLayer,
    drain: Duration,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::result::Result<(), tonic::transport::Error>>,
    follower: JoinHandle<()>,
    keys_follower: JoinHandle<()>,
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.follower.abort();
        self.keys_follower.abort();
    }
}

/// Says at start whether calls need a key, and warns when a server that
/// trusts everyone listens beyond loopback.
fn announce_authentication(keys: &KeyStore, config: &Config) {
    let path = KeyStore::path(&config.data_dir);
    if keys.enforced() {
        let live = keys.keys.iter().filter(|k| k.revoked_at.is_none()).count();
        tracing::info!(keys = live, file = %path.display(), "API keys required (health and reflection stay open)");
    } else if config.listen.ip().is_loopback() {
        tracing::info!(
            file = %path.display(),
            "no API keys: every client on loopback is trusted; `aitl keys create` turns authentication on"
        );
    } else {
        tracing::warn!(
            listen = %config.listen,
            "no API keys and listening beyond loopback: anyone who reaches this address can call every method; \
             `aitl keys create` turns authentication on"
        );
    }
}

impl RunningServer {
    /// Stops accepting calls, gives those in flight `limits.drain_timeout_s`
    /// to finish (then drops them), and closes the log.
    pub async fn shutdown(mut self) -> Result<()> {
        self.follower.abort();
        self.keys_follower.abort();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let served = match tokio::time::timeout(self.drain, &mut self.task).await {
            Ok(served) => served,
            Err(_) => {
                tracing::warn!(
                    drain_s = self.drain.as_secs(),
                    "calls still in flight past limits.drain_timeout_s are dropped"
                );
                self.task.abort();
                Ok(Ok(()))
            }
        };
        let log = self.state.log.clone();
        tokio::task::spawn_blocking(move || log.close()).await.ok();
        served
            .map_err(|e| Error::Internal(format!("server task: {e}")))?
            .map_err(|e| Error::Internal(format!("server: {e}")))
    }

    /// Resolves when the server stops by itself (it only does on error).
    pub async fn wait(&mut self) -> Result<()> {
        (&mut self.task)
            .await
            .map_err(|e| Error::Internal(format!("server task: {e}")))?
            .map_err(|e| Error::Internal(format!("server: {e}")))
    }
}

/// Opens the data dir and starts serving on `config.listen`.
pub async fn start(config: Config) -> Result<RunningServer> {
    config.validate()?;
    let redactor = Arc::new(crate::privacy::Redactor::new(&config.privacy)?);
    if redactor.enabled() {
        tracing::info!(
            custom_patterns = config.privacy.patterns.len(),
            "personal data is redacted before it is logged"
        );
    } else {
        tracing::warn!("privacy.redact is off: personal data in requests and annotations is logged verbatim");
    }
    let (log_dir, kb_path, log_options) = (config.log_dir(), config.knowledge_path(), config.log_options());
    let (log, kb, report) = tokio::task::spawn_blocking(move || -> Result<_> {
        let (log, report) = TrainingLog::open(&log_dir, log_options)?;
        let kb = KnowledgeStore::open(&kb_path)?;
        Ok((log, kb, report))
    })
    .await
    .map_err(|e| Error::Internal(format!("opening stores: {e}")))??;
    if let Some((file, offset, dropped)) = &report.truncated {
        tracing::warn!(file = %file.display(), offset, dropped, "training log: torn tail truncated");
    }
    let kb = Arc::new(kb);
    let interactions = Arc::new(InteractionBook::new(log.clone(), redactor.clone()));
    let annotations = AnnotationIntake::new(
        log.clone(),
        interactions.clone(),
        kb.clone(),
        Duration::from_secs(config.annotations.max_clock_skew_s),
        redactor,
    );
    let started = std::time::Instant::now();
    let records = feedback::rebuild(&log, &interactions, &annotations)?;
    tracing::info!(records, interactions = interactions.len(), elapsed = ?started.elapsed(), "indexes rebuilt from the training log");
    // Promoted versions replace the configured models; the follower below
    // applies later promotions while serving.
    let (registry, registry_bytes) = Registry::read(&config.data_dir)?;
    let targets = Targets::of(&config, &registry);
    let serving = registry.serving_config(&config);
    let named = |role: Role, e: Error| match &registry.role(role).serving {
        Some(version) => Error::Unavailable(format!(
            "the registry names {version} as the {role}, which cannot be loaded: {e} \
             (`aitl models rollback {role}` puts back the previous one)"
        )),
        None => e,
    };
    let semantic = match load::embedder(&serving).await.map_err(|e| named(Role::Retriever, e))? {
        Some(engine) => {
            Some(Arc::new(SemanticIndex::open(engine, kb.clone(), serving.retrieve.vector_precision).await?))
        }
        None => None,
    };
    let ranker = load::ranker(&serving, semantic.as_ref()).await.map_err(|e| named(Role::Ranker, e))?;
    let champion = load::generator(&serving).await.map_err(|e| named(Role::Generator, e))?;
    let challenger = match &targets.challenger {
        Some(path) => {
            let mut challenger = config.clone();
            challenger.models.generator.clone_from(path);
            load::generator(&challenger).await?
        }
        None => None,
    };
    let status = ServedModels::at_start(
        &registry,
        &targets,
        [
            semantic.as_ref().map(|i| i.model_version().into()),
            ranker.as_ref().map(|r| r.version().into()),
            champion.as_ref().map(|g| g.version().into()),
        ],
    );
    status.update(Role::Generator, |s| s.challenger = challenger.as_ref().map(|g| g.version().into()));
    let state = Arc::new(AppState {
        kb,
        log,
        interactions,
        annotations,
        semantic: Slot::shared(semantic),
        ranker: Slot::new(ranker),
        generators: Slot::new(Some(Generators { champion, challenger, challenger_share: targets.challenger_share })),
        knowledge_writes: Default::default(),
        serving: status,
        default_max_new_tokens: config.models.default_max_new_tokens,
        query_composition: QueryComposition { context_turns: config.retrieve.context_turns },
        default_top_k: config.retrieve.default_top_k,
        max_message_bytes: config.limits.max_message_mib << 20,
    });

    let follower = Follower::new(state.clone(), config.clone(), targets, registry_bytes)
        .spawn(Duration::from_millis(config.models.registry_poll_ms.max(10)));

    let (reporter, health_service) = tonic_health::server::health_reporter();
    spawn_health_follower(reporter, state.log.health()).await;

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_err = |e: tonic_reflection::server::Error| Error::Internal(format!("reflection: {e}"));
    let reflection_v1 = reflection().build_v1().map_err(reflection_err)?;
    // grpcurl and older tools still ask the v1alpha service.
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_err)?;

    let max_message = config.limits.max_message_mib << 20;
    let support = SupportServiceServer::new(Support::new(state.clone()))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let knowledge = KnowledgeServiceServer::new(Knowledge::new(state.clone()))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);

    let flywheel = FlywheelServiceServer::new(Flywheel::new(config.worker_dir(), state.clone()));

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::Unavailable(format!("cannot listen on {}: {e}", config.listen)))?;
    let addr = listener.local_addr().map_err(|e| Error::Internal(e.to_string()))?;
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let limits = &config.limits;
    let calls = CallLimitsLayer::new(CallLimits {
        max_in_flight: limits.max_in_flight,
        request_timeout: config.request_timeout(),
        max_buffered_bytes: limits.max_buffered_request_mib << 20,
        max_buffered_bytes_per_connection: limits.max_buffered_request_mib_per_connection << 20,
        retry_after: RETRY_AFTER,
    });
    let connections = ConnectionLimits {
        max_connections: limits.max_connections,
        idle_timeout: Duration::from_secs(limits.idle_timeout_s),
        handshake_timeout: Duration::from_secs(limits.handshake_timeout_s),
    };
    // Deadlines are the call-limits layer's (tonic's own timeout would end
    // calls CANCELLED rather than DEADLINE_EXCEEDED).
    let keys = Keys::new(KeyStore::load(&config.data_dir)?);
    announce_authentication(&keys.current(), &config);
    let keys_follower = keys.follow(config.data_dir.clone(), Duration::from_millis(500));
    let router = tonic::transport::Server::builder()
        .layer(AuthLayer::new(keys))
        .layer(calls.clone())
        .concurrency_limit_per_connection(config.limits.concurrency_per_connection)
        .max_concurrent_streams(Some(config.limits.max_concurrent_streams))
        .http2_max_pending_accept_reset_streams(Some(256))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .trace_fn(|request| tracing::debug_span!("grpc", path = %request.uri().path()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(support)
        .add_service(knowledge)
        .add_service(flywheel);
    // Accepted sockets need TCP_NODELAY set here: the builder's flag only
    // covers listeners it binds itself, and without it a multi-frame response
    // waits out the peer's delayed ACK (~40 ms).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let incoming = middleware::tracked(incoming, connections);
    let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = shutdown_rx.await;
    }));
    let drain = Duration::from_secs(config.limits.drain_timeout_s);
    Ok(RunningServer { addr, state, calls, drain, shutdown: Some(shutdown_tx), task, follower, keys_follower })
}

/// Publishes the log's state as gRPC health: while the log cannot write, the
/// server as a whole and SupportService (whose calls all log) are NOT_SERVING;
/// KnowledgeService does not depend on the log and stays SERVING.
async fn spawn_health_follower(reporter: HealthReporter, mut health: tokio::sync::watch::Receiver<LogHealth>) {
    reporter.set_service_status(KNOWLEDGE_SERVICE, ServingStatus::Serving).await;
    let publish = move |reporter: HealthReporter, state: LogHealth| async move {
        let status = match state {
            LogHealth::Writable => ServingStatus::Serving,
            LogHealth::Failing(_) => ServingStatus::NotServing,
        };
        reporter.set_service_status("", status).await;
        reporter.set_service_status(SUPPORT_SERVICE, status).await;
    };
    let initial = health.borrow_and_update().clone();
    publish(reporter.clone(), initial).await;
    tokio::spawn(async move {
        while health.changed().await.is_ok() {
            let state = health.borrow_and_update().clone();
            publish(reporter.clone(), state).await;
        }
    });
}
