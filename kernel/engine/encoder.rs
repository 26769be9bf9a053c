//! The encoder engine: one OS thread owns the device and an encoder model
//! (sentence embedder or cross-encoder); async callers enqueue tokenized
//! sequences and await one output row each. The worker takes
//! whatever is queued up to a token budget, drops requests whose caller has
//! gone, orders the batch by length and runs it as one ragged batch (no
//! padding). A full queue is refused (RESOURCE_EXHAUSTED) rather than grown.
//! Follows text-embeddings-inference's queue/infer split.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, SyncSender, TrySendError},
    },
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

use crate::{
    backend::Device,
    error::{Error, Result},
    model::bert::Tokens,
};

/// A model the encoder worker runs: token sequences in, one row out per sequence.
pub trait EncoderModel: Send + Sync + 'static {
    /// Output rows in input order; `batch` is sorted by length.
    fn run(&self, device: &Device, batch: &[&Tokens]) -> Result<Vec<Vec<f32>>>;
    fn version(&self) -> &str;
}

#[derive(Debug, Clone)]
pub struct EncoderOptions {
    /// Most tokens in one forward pass.
    pub token_budget: usize,
    /// Requests waiting beyond this are refused.
    pub queue_capacity: usize,
    /// Arithmetic of the model's matrix products.
    pub precision: crate::backend::Precision,
}

impl Default for EncoderOptions {
    fn default() -> Self {
        EncoderOptions { token_budget: 8_192, queue_capacity: 1_024, precision: crate::backend::Precision::F32 }
    }
}

/// What one call spent, for interaction timings.
#[derive(Debug, Clone, Copy, Default)]
pub struct EncodeTimings {
    pub queue: Duration,
    pub compute: Duration,
}

struct Job {
    texts: Vec<Tokens>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<(Vec<Vec<f32>>, EncodeTimings)>>,
}

struct Shared<M> {
    model: Arc<M>,
    device: Device,
    /// What the queue serves, for messages ("embedding", "ranking").
    role: &'static str,
    queue: SyncSender<Job>,
    options: EncoderOptions,
    counters: Arc<Counters>,
}

/// What the worker has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub batches: AtomicU64,
    pub texts: AtomicU64,
    /// Requests skipped because their caller had gone before they ran.
    pub dropped: AtomicU64,
}

/// Handle to an encoder worker; cheap to clone.
pub struct EncoderEngine<M> {
    shared: Arc<Shared<M>>,
}

impl<M> Clone for EncoderEngine<M> {
    fn clone(&self) -> Self {
        EncoderEngine { shared: self.shared.clone() }
    }
}

impl<M: EncoderModel> EncoderEngine<M> {
    /// Starts a worker thread that owns `device` and runs `model`.
    pub fn start(device: Device, model: M, options: EncoderOptions, role: &'static str) -> Result<Self> {
        let model = Arc::new(model);
        let (queue, jobs) = mpsc::sync_channel(options.queue_capacity);
        let worker_model = model.clone();
        let budget = options.token_budget;
        let counters = Arc::new(Counters::default());
        let worker_counters = counters.clone();
        let handle = device.clone();
        std::thread::Builder::new()
            .name(format!("aitl-{role}-{}", device.name()))
            .spawn(move || run_worker(device, &*worker_model, jobs, budget, &worker_counters, role))
            .map_err(|e| Error::Internal(format!("cannot start the {role} worker: {e}")))?;
        Ok(EncoderEngine { shared: Arc::new(Shared { model, device: handle, role, queue, options, counters }) })
    }

    pub fn model(&self) -> &M {
        &self.shared.model
    }

    pub fn version(&self) -> &str {
        self.shared.model.version()
    }

    /// The device the worker runs the model on.
    pub fn device(&self) -> &Device {
        &self.shared.device
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Runs sequences through the model; rows come back in input order.
    pub async fn run(&self, sequences: Vec<Tokens>) -> Result<(Vec<Vec<f32>>, EncodeTimings)> {
        if sequences.is_empty() {
            return Ok((Vec::new(), EncodeTimings::default()));
        }
        let role = self.shared.role;
        let (reply, answer) = oneshot::channel();
        match self.shared.queue.try_send(Job { texts: sequences, enqueued: Instant::now(), reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(Error::ResourceExhausted(format!(
                    "the {role} queue is full ({} requests waiting); retry with backoff",
                    self.shared.options.queue_capacity
                )));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(Error::Unavailable(format!("the {role} worker has stopped")));
            }
        }
        answer.await.map_err(|_| Error::Unavailable(format!("the {role} worker has stopped")))?
    }
}

fn run_worker<M: EncoderModel>(
    device: Device,
    model: &M,
    jobs: mpsc::Receiver<Job>,
    budget: usize,
    counters: &Counters,
    role: &str,
) {
    let mut pending: Option<Job> = None;
    loop {
        let first = match pending.take() {
            Some(job) => job,
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let mut batch = vec![first];
        let mut tokens: usize = batch[0].texts.iter().map(|t| t.ids.len()).sum();
        while tokens < budget {
            match jobs.try_recv() {
                Ok(job) => {
                    let size: usize = job.texts.iter().map(|t| t.ids.len()).sum();
                    if tokens + size > budget {
                        pending = Some(job);
                        break;
                    }
                    tokens += size;
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        // A caller that gave up (deadline, disconnect) costs no compute.
        let queued = batch.len();
        batch.retain(|job| !job.reply.is_closed());
        counters.dropped.fetch_add((queued - batch.len()) as u64, Ordering::Relaxed);
        if batch.is_empty() {
            continue;
        }
        let started = Instant::now();
        let mut refs: Vec<(usize, usize, &Tokens)> = Vec::new();
        for (j, job) in batch.iter().enumerate() {
            for (t, text) in job.texts.iter().enumerate() {
                refs.push((j, t, text));
            }
        }
        refs.sort_by_key(|(_, _, text)| text.ids.len());
        let result = run_in_budget(&device, model, &refs, budget);
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters.texts.fetch_add(refs.len() as u64, Ordering::Relaxed);
        let compute = started.elapsed();
        match result {
            Ok(vectors) => {
                let mut per_job: Vec<Vec<Vec<f32>>> =
                    batch.iter().map(|job| vec![Vec::new(); job.texts.len()]).collect();
                for ((j, t, _), vector) in refs.iter().zip(vectors) {
                    per_job[*j][*t] = vector;
                }
                for (job, vectors) in batch.into_iter().zip(per_job) {
                    let timings = EncodeTimings { queue: started.duration_since(job.enqueued), compute };
                    let _ = job.reply.send(Ok((vectors, timings)));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, role, "encoder batch failed");
                let message = e.to_string();
                for job in batch {
                    let _ = job.reply.send(Err(Error::Internal(format!("{role} failed: {message}"))));
                }
            }
        }
    }
}

/// Runs length-sorted texts in forward passes of at most `budget` tokens
/// (one job larger than the budget is split, never refused).
fn run_in_budget<M: EncoderModel>(
    device: &Device,
    model: &M,
    refs: &[(usize, usize, &Tokens)],
    budget: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(refs.len());
    let mut start = 0;
    while start < refs.len() {
        let mut end = start;
        let mut used = 0;
        while end < refs.len() && (end == start || used + refs[end].2.ids.len() <= budget) {
            used += refs[end].2.ids.len();
            end += 1;
        }
        let chunk: Vec<&Tokens> = refs[start..end].iter().map(|r| r.2).collect();
        out.extend(model.run(device, &chunk)?);
        start = end;
    }
    Ok(out)
}
