//! The decoding engine: one OS thread owns the decoder, its KV caches and
//! the queue. Requests are admitted between steps (continuous batching):
//! each request's prompt is prefilled once, its candidates fork that cache,
//! and every active candidate of every request advances together in one
//! forward step. A request whose caller has gone is dropped at the next step;
//! a full queue answers RESOURCE_EXHAUSTED.
//!
//! Prompts are prefilled one request at a time, in chunks of
//! `prefill_chunk` tokens with a decode step between chunks: a grounded
//! prompt takes seconds to prefill on a few cores, and run whole it stopped
//! every other stream for that long (at 4 copilot agents the gap between
//! deltas reached p99 0.3 s). The chunks depend only on the prompt's length,
//! so a request's text does not depend on the traffic beside it.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    time::Instant,
};

use tokio::sync::mpsc::UnboundedSender;

use super::sampler::{Sampler, SamplingConfig};
use crate::{
    backend::{Device, Precision},
    error::{Error, Result},
    model::{
        chat::ChatTokenizer,
        gguf::GgufFile,
        llama::{DEFAULT_PREFILL, DEFAULT_PREFILL_CHUNK, KvCache, Llama, SharedBase, Step},
        lora::LoraAdapter,
    },
};

#[derive(Debug, Clone)]
pub struct GeneratorOptions {
    /// Requests waiting beyond this are refused.
    pub queue_capacity: usize,
    /// Most candidates decoded together.
    pub max_sequences: usize,
    /// Prompts' products against block-quantized weights (see
    /// [`crate::model::llama::DEFAULT_PREFILL`]).
    pub prefill: Precision,
    /// Prompt tokens per forward pass between decode steps.
    pub prefill_chunk: usize,
}

impl Default for GeneratorOptions {
    fn default() -> Self {
        GeneratorOptions {
            queue_capacity: 64,
            max_sequences: 16,
            prefill: DEFAULT_PREFILL,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model ended its turn.
    Stop,
    /// `max_new_tokens` reached (or the context is full).
    Length,
    /// A stop string matched; it is not part of the text.
    StopSequence,
}

/// What the engine reports about a request, per candidate.
#[derive(Debug, Clone)]
pub enum GenerateEvent {
    /// The worker took the request from the queue and starts its prefill.
    Admitted,
    Delta {
        candidate: usize,
        text: String,
    },
    Finished {
        candidate: usize,
        text: String,
        finish: Finish,
        completion_tokens: usize,
    },
    Failed(String),
}

pub struct GenerateJob {
    pub prompt: Vec<u32>,
    pub candidates: usize,
    /// Candidate `c` samples with `seed + c`.
    pub sampling: SamplingConfig,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub events: UnboundedSender<GenerateEvent>,
}

/// What the worker has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct GeneratorCounters {
    pub requests: AtomicU64,
    /// Requests dropped because their caller went away before they finished.
    pub cancelled: AtomicU64,
    pub steps: AtomicU64,
}

struct Shared {
    counters: Arc<GeneratorCounters>,
    queue: SyncSender<GenerateJob>,
    tokenizer: Arc<ChatTokenizer>,
    version: String,
    context: usize,
    options: GeneratorOptions,
    /// The device's label, for responses' timings.
    device: String,
}

/// Handle to the decoding worker; cheap to clone.
#[derive(Clone)]
pub struct GeneratorEngine {
    shared: Arc<Shared>,
}

/// A decoder and its chat tokenizer, from a GGUF file or a Hugging Face folder.
pub struct Checkpoint {
    pub model: Llama,
    pub tokenizer: ChatTokenizer,
    /// `{file or folder name}@{first 12 hex digits of the weights' SHA-256}`.
    pub version: String,
}

/// Bases loaded in this process, so generator versions over one base (a
/// champion and a challenger that differ by adapter) share its weights.
static BASES: std::sync::Mutex<Vec<(BaseKey, SharedBase)>> = std::sync::Mutex::new(Vec::new());

impl Checkpoint {
    /// A GGUF file, a Hugging Face folder, or a PEFT LoRA adapter folder
    /// over one of them (`base_model_name_or_path`): version
    /// `{base version}+{adapter version}`.
    pub fn load(device: &Device, path: &Path, prefill: Precision) -> Result<Self> {
        if !LoraAdapter::is_adapter(path) {
            return Self::load_base(device, path, prefill);
        }
        let base_path = LoraAdapter::base_of(path)?;
        let base = Self::load_base(device, &base_path, prefill)?;
        let config = base.model.config();
        let adapter = LoraAdapter::load(device, path, config, config.rope_style)?;
        let version = format!("{}+{}", base.version, adapter.version);
        let model = base.model.with_adapter(Arc::new(adapter))?;
        Ok(Checkpoint { model, tokenizer: base.tokenizer, version })
    }

    /// A base decoder, sharing the weights of one already loaded from the
    /// same path in the same precision.
    fn load_base(device: &Device, path: &Path, prefill: Precision) -> Result<Self> {
        let weights = match path.join("model.safetensors") {
            _ if !path.is_dir() => path.to_owned(),
            single if single.exists() => single,
            // Sharded: the index names every shard.
            _ => path.join("model.safetensors.index.json"),
        };
        let version = format!(
            "{}@{}",
            path.file_stem().map_or_else(|| "generator".into(), |s| s.to_string_lossy().into_owned()),
            crate::model::hf_folder::digest_prefix(&weights)?
        );
        // One base is the same file (named in any way), of the same
        // contents, in the same precision, on the same device.
        let key = BaseKey {
            path: std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned()),
            version: version.clone(),
            prefill,
            device: device.label(),
        };
        // Held through the load: two versions loading one base at once
        // must not each keep a copy.
        let mut bases = BASES.lock().unwrap_or_else(|p| p.into_inner());
        bases.retain(|(_, base)| base.upgrade().is_some());
        let shared = bases.iter().find(|(k, _)| *k == key).and_then(|(_, base)| base.upgrade());
        let loaded = shared.is_none();
        let (model, tokenizer) = if path.is_dir() {
            let model = match shared {
                Some(model) => model,
                None => Llama::from_hf_folder(device, path)?,
            };
            (model, ChatTokenizer::from_hf_folder(path)?)
        } else {
            let file = GgufFile::open(path)?;
            let model = match shared {
                Some(model) => model,
                None => Llama::from_gguf_in(device, &file, prefill)?,
            };
            (model, ChatTokenizer::from_gguf(&file)?)
        };
        if loaded {
            bases.push((key, model.share()));
        }
        Ok(Checkpoint { model, tokenizer, version })
    }
}

/// What makes two loaded bases one.
#[derive(PartialEq)]
struct BaseKey {
    path: std::path::PathBuf,
    version: String,
    prefill: Precision,
    device: String,
}

impl GeneratorEngine {
    /// Loads a llama-family GGUF file or Hugging Face folder and starts its worker.
    pub fn load(device: Device, path: &Path, options: GeneratorOptions) -> Result<Self> {
        let Checkpoint { model, tokenizer, version } = Checkpoint::load(&device, path, options.prefill)?;
        let tokenizer = Arc::new(tokenizer);
        let context = model.config().context;
        let (queue, jobs) = mpsc::sync_channel(options.queue_capacity);
        let worker_tokenizer = tokenizer.clone();
        let max_sequences = options.max_sequences;
        let counters = Arc::new(GeneratorCounters::default());
        let label = device.label();
        let worker = Worker {
            device,
            model,
            tokenizer: worker_tokenizer,
            max_sequences,
            prefill_chunk: options.prefill_chunk.max(1),
            counters: counters.clone(),
        };
        std::thread::Builder::new()
            .name(format!("aitl-decode-{}", worker.device.name()))
            .spawn(move || worker.run(jobs))
            .map_err(|e| Error::Internal(format!("cannot start the decoding worker: {e}")))?;
        tracing::info!(model = %version, context, "generator loaded");
        let shared = Shared { counters, queue, tokenizer, version, context, options, device: label };
        Ok(GeneratorEngine { shared: Arc::new(shared) })
    }

    pub fn version(&self) -> &str {
        &self.shared.version
    }

    /// Where the decoding runs (`cpu`, `cuda:0 (NVIDIA H200, sm_90)`).
    pub fn device(&self) -> &str {
        &self.shared.device
    }

    pub fn counters(&self) -> &GeneratorCounters {
        &self.shared.counters
    }

    pub fn tokenizer(&self) -> &Arc<ChatTokenizer> {
        &self.shared.tokenizer
    }

    /// Positions the model attends over: prompt plus new tokens.
    pub fn context(&self) -> usize {
        self.shared.context
    }

    /// Queues a request; its events arrive on `job.events`.
    pub fn submit(&self, job: GenerateJob) -> Result<()> {
        match self.shared.queue.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(Error::ResourceExhausted(format!(
                "the generation queue is full ({} requests waiting); retry with backoff",
                self.shared.options.queue_capacity
            ))),
            Err(TrySendError::Disconnected(_)) => Err(Error::Unavailable("the decoding worker has stopped".into())),
        }
    }
}

/// A request with candidates still decoding.
struct Request {
    job: GenerateJob,
    remaining: usize,
}

/// One candidate being decoded.
struct Sequence {
    job: usize,
    candidate: usize,
    cache: KvCache,
    sampler: Sampler,
    history: Vec<u32>,
    generated: Vec<u32>,
    /// The reply so far, complete characters only.
    text: String,
    /// `generated[prefix..read]` is the window already folded into `text`
    /// (see `catch_up`).
    prefix: usize,
    read: usize,
    /// Bytes of `text` already sent as deltas.
    sent: usize,
    /// The token to feed next (sampled, not yet checked or cached).
    next: u32,
}

struct Worker {
    device: Device,
    model: Llama,
    tokenizer: Arc<ChatTokenizer>,
    max_sequences: usize,
    prefill_chunk: usize,
    counters: Arc<GeneratorCounters>,
}

/// The request whose prompt is being prefilled, chunk by chunk.
struct Prefill {
    /// Its index in the worker's requests.
    index: usize,
    cache: KvCache,
    /// Prompt tokens already in `cache`.
    done: usize,
}

impl Worker {
    fn run(self, jobs: Receiver<GenerateJob>) {
        // Requests with candidates still decoding; None once done or dropped.
        let mut requests: Vec<Option<Request>> = Vec::new();
        let mut active: Vec<Sequence> = Vec::new();
        let mut prefill: Option<Prefill> = None;
        loop {
            // Admit one request when its candidates fit and none is prefilling;
            // block only when there is nothing to decode or prefill.
            if prefill.is_none() && active.len() < self.max_sequences {
                let job = if active.is_empty() {
                    match jobs.recv() {
                        Ok(job) => Some(job),
                        Err(_) => return,
                    }
                } else {
                    jobs.try_recv().ok()
                };
                if let Some(job) = job {
                    if job.events.is_closed() {
                        self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    self.counters.requests.fetch_add(1, Ordering::Relaxed);
                    let _ = job.events.send(GenerateEvent::Admitted);
                    prefill = Some(Prefill { index: requests.len(), cache: self.model.new_cache(), done: 0 });
                    requests.push(Some(Request { remaining: job.candidates, job }));
                }
            }
            // A caller that went away frees its candidates' slots now.
            for request in requests.iter_mut() {
                if request.as_ref().is_some_and(|r| r.job.events.is_closed()) {
                    *request = None;
                    self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Some(mut p) = prefill.take() {
                if let Some(request) = requests[p.index].as_ref() {
                    match self.prefill_chunk(&request.job, &mut p) {
                        Ok(Some(sequences)) => active.extend(sequences),
                        Ok(None) => prefill = Some(p),
                        Err(e) => {
                            let _ = request.job.events.send(GenerateEvent::Failed(e.to_string()));
                            requests[p.index] = None;
                        }
                    }
                }
            }
            active.retain(|s| requests[s.job].is_some());
            active = self.advance(active, &mut requests);
            if active.is_empty() && prefill.is_none() {
                requests.clear();
            }
        }
    }

    /// Runs the next chunk of the prompt; after the last, forks one cache
    /// per candidate from it.
    fn prefill_chunk(&self, job: &GenerateJob, p: &mut Prefill) -> Result<Option<Vec<Sequence>>> {
        let end = (p.done + self.prefill_chunk).min(job.prompt.len());
        let mut logits =
            self.model.forward(&self.device, &mut [Step { tokens: &job.prompt[p.done..end], cache: &mut p.cache }])?;
        p.done = end;
        if end < job.prompt.len() {
            return Ok(None);
        }
        let logits = logits.remove(0);
        Ok(Some(
            (0..job.candidates)
                .map(|candidate| {
                    let mut sampler = Sampler::new(SamplingConfig {
                        seed: job.sampling.seed.wrapping_add(candidate as u64),
                        ..job.sampling.clone()
                    });
                    let next = sampler.sample(&mut logits.clone(), &job.prompt);
                    Sequence {
                        job: p.index,
                        candidate,
                        cache: p.cache.clone(),
                        sampler,
                        history: job.prompt.clone(),
                        generated: Vec::new(),
                        text: String::new(),
                        prefix: 0,
                        read: 0,
                        sent: 0,
                        next,
                    }
                })
                .collect(),
        ))
    }

    /// Appends the text of tokens not yet in `seq.text`, decoding only a
    /// short window of recent tokens (byte-level pieces merge across token
    /// boundaries) rather than the whole reply every step. A character whose
    /// bytes are not all generated yet waits, unless `flush`.
    fn catch_up(&self, seq: &mut Sequence, flush: bool) {
        let known = self.tokenizer.decode(&seq.generated[seq.prefix..seq.read]).unwrap_or_default();
        let window = self.tokenizer.decode(&seq.generated[seq.prefix..]).unwrap_or_default();
        if window.len() > known.len() && window.starts_with(&known) && (flush || !window.ends_with('\u{FFFD}')) {
            seq.text.push_str(&window[known.len()..]);
            seq.prefix = seq.read;
            seq.read = seq.generated.len();
        }
    }

    /// Takes each sequence's sampled token: finishes it or feeds it, then
    /// runs one forward step over all that continue.
    fn advance(&self, active: Vec<Sequence>, requests: &mut [Option<Request>]) -> Vec<Sequence> {
        let mut continuing = Vec::with_capacity(active.len());
        for mut seq in active {
            let Some(request) = requests[seq.job].as_mut() else { continue };
            let job = &request.job;
            let finish = if seq.next == self.tokenizer.eos || self.tokenizer.is_end_of_turn(seq.next) {
                Some(Finish::Stop)
            } else {
                seq.generated.push(seq.next);
                seq.history.push(seq.next);
                None
            };
            let before = seq.text.len();
            self.catch_up(&mut seq, finish.is_some());
            // Only the new text, and the bytes a stop string could straddle, are searched.
            let hold = job.stop.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0);
            let mut from = before.saturating_sub(hold);
            while !seq.text.is_char_boundary(from) {
                from -= 1;
            }
            let stopped = job.stop.iter().filter_map(|s| seq.text[from..].find(s.as_str()).map(|at| from + at)).min();
            let finish = match (finish, stopped) {
                (Some(f), _) => Some(f),
                (None, Some(at)) => {
                    seq.text.truncate(at);
                    Some(Finish::StopSequence)
                }
                (None, None)
                    if seq.generated.len() >= job.max_new_tokens
                        || seq.cache.len() + 1 >= self.model.config().context =>
                {
                    Some(Finish::Length)
                }
                (None, None) => None,
            };
            match finish {
                Some(finish) => {
                    if finish == Finish::Length {
                        self.catch_up(&mut seq, true);
                    }
                    let text = std::mem::take(&mut seq.text);
                    if text.len() > seq.sent {
                        let _ = job.events.send(GenerateEvent::Delta {
                            candidate: seq.candidate,
                            text: text[seq.sent..].to_string(),
                        });
                    }
                    let _ = job.events.send(GenerateEvent::Finished {
                        candidate: seq.candidate,
                        text,
                        finish,
                        completion_tokens: seq.generated.len(),
                    });
                    request.remaining -= 1;
                    if request.remaining == 0 {
                        requests[seq.job] = None;
                    }
                }
                None => {
                    // Hold back what a stop string could still claim.
                    let mut upto = seq.text.len().saturating_sub(hold);
                    while upto > seq.sent && !seq.text.is_char_boundary(upto) {
                        upto -= 1;
                    }
                    if upto > seq.sent {
                        let _ = job.events.send(GenerateEvent::Delta {
                            candidate: seq.candidate,
                            text: seq.text[seq.sent..upto].to_string(),
                        });
                        seq.sent = upto;
                    }
                    continuing.push(seq);
                }
            }
        }
        if continuing.is_empty() {
            return continuing;
        }
        let started = Instant::now();
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        let tokens: Vec<[u32; 1]> = continuing.iter().map(|s| [s.next]).collect();
        let mut steps: Vec<Step> =
            continuing.iter_mut().zip(&tokens).map(|(s, t)| Step { tokens: t, cache: &mut s.cache }).collect();
        match self.model.forward(&self.device, &mut steps) {
            Ok(logits) => {
                for (seq, mut logits) in continuing.iter_mut().zip(logits) {
                    seq.next = seq.sampler.sample(&mut logits, &seq.history);
                }
                tracing::trace!(sequences = continuing.len(), elapsed = ?started.elapsed(), "decode step");
                continuing
            }
            Err(e) => {
                tracing::error!(error = %e, "decode step failed");
                for seq in &continuing {
                    if let Some(request) = requests[seq.job].take() {
                        let _ = request.job.events.send(GenerateEvent::Failed(e.to_string()));
                    }
                }
                Vec::new()
            }
        }
    }
}
