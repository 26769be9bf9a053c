//! The single writer: one OS thread owns the active segment. Appenders hand it
//! encoded records over a bounded queue; it writes whatever has queued up as
//! one batch, makes it durable with one fdatasync (group commit), and only
//! then answers each appender. A failed write or sync is undone (the segment
//! is cut back to its last durable length) before anything else is written.

use std::{
    fs::{self, File, OpenOptions},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        mpsc::{self, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use prost::Message;
use tokio::sync::{oneshot, watch};

use super::{
    FaultInjector, LogError, format,
    reader::{Tail, list_segments, scan_segment},
};
use crate::proto::{LogRecord, log_record::Body};

#[derive(Debug, Clone)]
pub struct LogOptions {
    /// A segment is sealed and a new one started past this size.
    pub segment_bytes: u64,
    /// Appends waiting for the writer beyond this are refused (QueueFull).
    pub queue_capacity: usize,
    /// Upper bound on one group commit.
    pub max_batch_bytes: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions { segment_bytes: 64 << 20, queue_capacity: 16_384, max_batch_bytes: 8 << 20 }
    }
}

/// Whether the log can take appends; published on every change of state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogHealth {
    Writable,
    Failing(String),
}

/// What opening the log found and repaired.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: u64,
    pub next_sequence: u64,
    /// A torn tail that was cut off: file, offset, bytes dropped.
    pub truncated: Option<(PathBuf, u64, u64)>,
}

struct Append {
    body: Vec<u8>,
    reply: oneshot::Sender<Result<u64, LogError>>,
}

/// Handle to the log; cheap to clone, shared by all request handlers.
#[derive(Clone)]
pub struct TrainingLog {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    queue: Mutex<Option<SyncSender<Append>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    health: watch::Receiver<LogHealth>,
    faults: Arc<FaultInjector>,
    queue_capacity: usize,
}

const PROBE_INTERVAL: Duration = Duration::from_millis(500);

impl TrainingLog {
    /// Opens (creating if needed) the log in `dir`: takes its lock, verifies
    /// every segment, cuts a torn tail off the last one, and starts the writer.
    pub fn open(dir: &Path, options: LogOptions) -> Result<(TrainingLog, RecoveryReport), LogError> {
        create_dir_durably(dir).map_err(|e| LogError::io(dir, e))?;
        let lock = take_writer_lock(dir)?;
        let (active, durable_len, report) = recover(dir)?;
        let watermark = DurableWatermark::create(dir).map_err(|e| LogError::io(dir, e))?;
        watermark.publish(report.next_sequence).map_err(|e| LogError::io(dir, e))?;
        let (health_tx, health) = watch::channel(LogHealth::Writable);
        let (queue, rx) = mpsc::sync_channel(options.queue_capacity);
        let faults = Arc::new(FaultInjector::default());
        let writer = Writer {
            dir: dir.into(),
            _lock: lock,
            watermark,
            active,
            durable_len,
            dirty: false,
            next_sequence: report.next_sequence,
            options: options.clone(),
            rx,
            health: health_tx,
            faults: faults.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("aitl-trainlog".into())
            .spawn(move || writer.run())
            .map_err(|e| LogError::io(dir, e))?;
        let inner = Inner {
            dir: dir.into(),
            queue: Mutex::new(Some(queue)),
            writer: Mutex::new(Some(handle)),
            health,
            faults,
            queue_capacity: options.queue_capacity,
        };
        Ok((TrainingLog { inner: Arc::new(inner) }, report))
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Appends one record and waits until it is durable; returns its sequence.
    pub async fn append(&self, body: &Body) -> Result<u64, LogError> {
        let mut bytes = Vec::with_capacity(body.encoded_len());
        body.encode(&mut bytes);
        // Room for the fields the writer prepends (version, sequence, time).
        if bytes.len() + 64 > format::MAX_RECORD_LEN {
            return Err(LogError::RecordTooLarge(bytes.len()));
        }
        let (reply, answer) = oneshot::channel();
        {
            let queue = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
            let queue = queue.as_ref().ok_or(LogError::Closed)?;
            match queue.try_send(Append { body: bytes, reply }) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    return Err(LogError::QueueFull(self.inner.queue_capacity));
                }
                Err(TrySendError::Disconnected(_)) => return Err(LogError::Closed),
            }
        }
        answer.await.map_err(|_| LogError::Closed)?
    }

    pub fn health(&self) -> watch::Receiver<LogHealth> {
        self.inner.health.clone()
    }

    pub fn faults(&self) -> &FaultInjector {
        &self.inner.faults
    }

    /// Stops taking appends, lets the writer finish what is queued, and
    /// releases the directory lock.
    pub fn close(&self) {
        self.inner.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = self.inner.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = handle.join();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.queue.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = self.writer.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = handle.join();
        }
    }
}

/// The writer's exclusive lock on `LOCK`. Readers take a shared lock for an
/// instant to learn whether a writer is live, so a few retries ride that out.
fn take_writer_lock(dir: &Path) -> Result<File, LogError> {
    let path = dir.join(LOCK_FILE);
    let lock = File::create(&path).map_err(|e| LogError::io(&path, e))?;
    for attempt in 0.. {
        match lock.try_lock() {
            Ok(()) => return Ok(lock),
            Err(fs::TryLockError::WouldBlock) if attempt < 20 => std::thread::sleep(Duration::from_millis(25)),
            Err(fs::TryLockError::WouldBlock) => return Err(LogError::Locked(dir.into())),
            Err(fs::TryLockError::Error(e)) => return Err(LogError::io(&path, e)),
        }
    }
    unreachable!("the loop returns")
}

pub(crate) const LOCK_FILE: &str = "LOCK";
pub(crate) const WATERMARK_FILE: &str = "DURABLE";

/// The first sequence not yet durable, published after every sync so that
/// readers in other processes never see a record a failed sync may undo.
/// Eight little-endian bytes, overwritten in place; it needs no fsync of its
/// own: after a crash no writer is live and readers read every whole frame,
/// and a watermark that lags (lost with the page cache) only weakens the
/// check recovery makes with it, that no acknowledged record is cut.
struct DurableWatermark(File);

impl DurableWatermark {
    fn create(dir: &Path) -> std::io::Result<Self> {
        Ok(DurableWatermark(
            OpenOptions::new().write(true).create(true).truncate(false).open(dir.join(WATERMARK_FILE))?,
        ))
    }

    fn publish(&self, next_sequence: u64) -> std::io::Result<()> {
        self.0.write_all_at(&next_sequence.to_le_bytes(), 0)
    }
}

/// The watermark the last writer published: every sequence below it was
/// acknowledged. None for a log that never had one (nothing to check against).
fn acknowledged_before(dir: &Path) -> Result<Option<u64>, LogError> {
    let path = dir.join(WATERMARK_FILE);
    match fs::read(&path) {
        Ok(bytes) if bytes.is_empty() => Ok(None),
        Ok(bytes) => match <[u8; 8]>::try_from(bytes.as_slice()) {
            Ok(bytes) => Ok(Some(u64::from_le_bytes(bytes))),
            Err(_) => Err(LogError::Corrupt {
                path,
                offset: 0,
                reason: format!("watermark is {} bytes, expected 8", bytes.len()),
            }),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LogError::io(&path, e)),
    }
}

/// Refuses a recovery that would drop acknowledged records: what a torn
/// tail cut (or a shorter log) cannot have held one, since the watermark is
/// published only after the sync that made its records durable.
fn check_acknowledged(
    acknowledged: Option<u64>,
    next_sequence: u64,
    path: &Path,
    offset: u64,
    found: &str,
) -> Result<(), LogError> {
    match acknowledged {
        Some(watermark) if watermark > next_sequence => Err(LogError::Corrupt {
            path: path.into(),
            offset,
            reason: format!(
                "{found}, but records {next_sequence}..={} were acknowledged (the DURABLE watermark is {watermark}); \
                 restore this log from a copy, or, if DURABLE itself is the damaged file, remove it to accept \
                 the log as it is",
                watermark - 1
            ),
        }),
        _ => Ok(()),
    }
}

/// Verifies all segments and repairs the last one; returns the active
/// segment, its durable length and the report.
fn recover(dir: &Path) -> Result<(File, u64, RecoveryReport), LogError> {
    let segments = list_segments(dir)?;
    let acknowledged = acknowledged_before(dir)?;
    let mut report = RecoveryReport { segments: segments.len(), next_sequence: 1, ..Default::default() };
    let Some(last) = segments.last() else {
        check_acknowledged(acknowledged, 1, dir, 0, "the log holds no segment")?;
        let (file, len) = create_segment(dir, 1).map_err(|e| LogError::io(dir, e))?;
        report.segments = 1;
        return Ok((file, len, report));
    };
    for (i, segment) in segments.iter().enumerate() {
        let is_last = i + 1 == segments.len();
        if segment.first_sequence != report.next_sequence {
            return Err(LogError::Corrupt {
                path: segment.path.clone(),
                offset: 0,
                reason: format!(
                    "segment starts at sequence {}, expected {} (a segment is missing)",
                    segment.first_sequence, report.next_sequence
                ),
            });
        }
        let len = fs::metadata(&segment.path).map_err(|e| LogError::io(&segment.path, e))?.len();
        if is_last && (len as usize) < format::SEGMENT_HEADER_LEN {
            check_acknowledged(
                acknowledged,
                segment.first_sequence,
                &segment.path,
                0,
                &format!("the newest segment is {len} bytes, shorter than its header"),
            )?;
            // Crashed while creating this segment: start it again.
            let (file, header_len) = create_segment(dir, segment.first_sequence).map_err(|e| LogError::io(dir, e))?;
            report.truncated = Some((segment.path.clone(), 0, len));
            return Ok((file, header_len, report));
        }
        let scanned = scan_segment(segment)?;
        report.records += scanned.records.len() as u64;
        report.next_sequence = segment.first_sequence + scanned.records.len() as u64;
        if let Tail::Torn { offset, reason } = scanned.tail {
            if !is_last {
                return Err(LogError::Corrupt {
                    path: segment.path.clone(),
                    offset: offset as u64,
                    reason: format!("{reason} in a sealed segment"),
                });
            }
            check_acknowledged(
                acknowledged,
                report.next_sequence,
                &segment.path,
                offset as u64,
                &format!("{reason} at the end of the newest segment"),
            )?;
            let dropped = scanned.bytes.len() - offset;
            tracing::warn!(
                file = %segment.path.display(), offset, dropped,
                "training log: cut off a torn tail ({reason}); it held no acknowledged record"
            );
            report.truncated = Some((segment.path.clone(), offset as u64, dropped as u64));
        }
    }
    let end = fs::metadata(&last.path).map_err(|e| LogError::io(&last.path, e))?.len();
    check_acknowledged(acknowledged, report.next_sequence, &last.path, end, "the log ends")?;
    let file = OpenOptions::new().read(true).write(true).open(&last.path).map_err(|e| LogError::io(&last.path, e))?;
    let durable_len = match &report.truncated {
        Some((_, offset, _)) => {
            file.set_len(*offset).and_then(|()| file.sync_all()).map_err(|e| LogError::io(&last.path, e))?;
            *offset
        }
        None => file.metadata().map_err(|e| LogError::io(&last.path, e))?.len(),
    };
    Ok((file, durable_len, report))
}

/// Creates `dir` and any missing parents, syncing each parent whose entry
/// changed, so a log created moments before a power cut still exists after it.
fn create_dir_durably(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => {
            create_dir_durably(parent)?;
            match fs::create_dir(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
            File::open(parent)?.sync_all()
        }
        None => fs::create_dir(dir),
    }
}

/// Creates (or restarts) a segment: header written and synced, and the
/// directory synced so the new name survives a crash.
fn create_segment(dir: &Path, first_sequence: u64) -> std::io::Result<(File, u64)> {
    let path = dir.join(format::segment_file_name(first_sequence));
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
    let header = format::segment_header();
    file.write_all_at(&header, 0)?;
    file.sync_all()?;
    File::open(dir)?.sync_all()?;
    Ok((file, header.len() as u64))
}

struct Writer {
    dir: PathBuf,
    _lock: File,
    watermark: DurableWatermark,
    active: File,
    durable_len: u64,
    /// Bytes past `durable_len` may be on disk from a failed batch.
    dirty: bool,
    next_sequence: u64,
    options: LogOptions,
    rx: mpsc::Receiver<Append>,
    health: watch::Sender<LogHealth>,
    faults: Arc<FaultInjector>,
}

impl Writer {
    fn run(mut self) {
        loop {
            let failing = !matches!(*self.health.borrow(), LogHealth::Writable);
            let first = if failing {
                match self.rx.recv_timeout(PROBE_INTERVAL) {
                    Ok(append) => append,
                    Err(RecvTimeoutError::Timeout) => {
                        self.probe();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match self.rx.recv() {
                    Ok(append) => append,
                    Err(_) => return,
                }
            };
            let mut bytes = first.body.len();
            let mut batch = vec![first];
            while bytes < self.options.max_batch_bytes {
                match self.rx.try_recv() {
                    Ok(append) => {
                        bytes += append.body.len();
                        batch.push(append);
                    }
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
    }

    fn commit(&mut self, batch: Vec<Append>) {
        match self.write_batch(&batch) {
            Ok(first) => {
                self.set_health(LogHealth::Writable);
                for (i, append) in batch.into_iter().enumerate() {
                    let _ = append.reply.send(Ok(first + i as u64));
                }
            }
            Err(e) => {
                let error = LogError::from_write(&e);
                tracing::error!(error = %error, "training log append failed");
                self.set_health(LogHealth::Failing(error.to_string()));
                for append in batch {
                    let _ = append.reply.send(Err(error.clone()));
                }
            }
        }
    }

    fn write_batch(&mut self, batch: &[Append]) -> std::io::Result<u64> {
        self.undo_failed_write()?;
        let framed: usize = batch.iter().map(|a| a.body.len() + 40).sum();
        if self.durable_len > format::SEGMENT_HEADER_LEN as u64
            && self.durable_len + framed as u64 > self.options.segment_bytes
        {
            let (file, len) = create_segment(&self.dir, self.next_sequence)?;
            self.active = file;
            self.durable_len = len;
        }
        let written_at = Some(prost_types::Timestamp::from(SystemTime::now()));
        let mut buf = Vec::with_capacity(framed);
        let mut payload = Vec::new();
        for (i, append) in batch.iter().enumerate() {
            payload.clear();
            let head = LogRecord {
                format_version: format::FORMAT_VERSION,
                sequence: self.next_sequence + i as u64,
                written_at,
                body: None,
            };
            head.encode(&mut payload).expect("Vec grows");
            // A message's encoding is the concatenation of its fields': the
            // appender already encoded the body field.
            payload.extend_from_slice(&append.body);
            format::push_frame(&mut buf, &payload);
        }
        self.dirty = true;
        self.faults.before_write()?;
        self.active.write_all_at(&buf, self.durable_len)?;
        self.faults.before_sync()?;
        self.active.sync_data()?;
        self.dirty = false;
        self.durable_len += buf.len() as u64;
        let first = self.next_sequence;
        self.next_sequence += batch.len() as u64;
        if let Err(e) = self.watermark.publish(self.next_sequence) {
            // The batch is durable and must be acknowledged; readers in other
            // processes merely lag until the next publish succeeds.
            tracing::warn!(error = %e, "training log: could not publish the durable watermark");
        }
        Ok(first)
    }

    /// Cuts the segment back to what was durable before a failed batch, so a
    /// half-written frame never sits before a good one.
    fn undo_failed_write(&mut self) -> std::io::Result<()> {
        if self.dirty {
            self.active.set_len(self.durable_len)?;
            self.active.sync_all()?;
            self.dirty = false;
        }
        Ok(())
    }

    /// While failing and idle: can the disk take a write again?
    fn probe(&mut self) {
        let probe = self.dir.join(".probe");
        let result = self.undo_failed_write().and_then(|()| {
            self.faults.before_write()?;
            let file = File::create(&probe)?;
            file.write_all_at(&[0u8; 4096], 0)?;
            self.faults.before_sync()?;
            file.sync_data()?;
            fs::remove_file(&probe)
        });
        match result {
            Ok(()) => {
                tracing::info!("training log is writable again");
                self.set_health(LogHealth::Writable);
            }
            Err(e) => {
                let _ = fs::remove_file(&probe);
                self.set_health(LogHealth::Failing(LogError::from_write(&e).to_string()));
            }
        }
    }

    fn set_health(&self, health: LogHealth) {
        self.health.send_if_modified(|current| {
            let changed = *current != health;
            *current = health;
            changed
        });
    }
}
