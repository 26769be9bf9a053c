//! Reading segments: the scan that recovery and every reader share, and a
//! reader that is safe to run beside a live writer (an incomplete last frame
//! is a record still being written, not an error).

use std::{
    fs,
    ops::ControlFlow,
    path::{Path, PathBuf},
};

use prost::Message;

use super::{LogError, format};
use crate::proto::{LogRecord, log_record::Body};

pub(crate) struct Segment {
    pub first_sequence: u64,
    pub path: PathBuf,
}

pub(crate) fn list_segments(dir: &Path) -> Result<Vec<Segment>, LogError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LogError::io(dir, e)),
    };
    let mut segments = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| LogError::io(dir, e))?;
        let name = entry.file_name();
        if let Some(first_sequence) = name.to_str().and_then(format::parse_segment_file_name) {
            segments.push(Segment { first_sequence, path: entry.path() });
        }
    }
    segments.sort_by_key(|s| s.first_sequence);
    Ok(segments)
}

/// How a segment's frames end.
pub(crate) enum Tail {
    Clean,
    /// Bytes from `offset` on are an incomplete or failed frame with nothing
    /// valid after it.
    Torn {
        offset: usize,
        reason: &'static str,
    },
}

/// One segment's valid records (payload ranges into `bytes`) and its tail.
/// Corruption (a bad frame with valid frames after it, a bad header, a
/// sequence out of order) is an error naming the file and offset.
pub(crate) struct ScannedSegment {
    pub bytes: Vec<u8>,
    pub records: Vec<(u64, std::ops::Range<usize>)>,
    pub tail: Tail,
}

pub(crate) fn scan_segment(segment: &Segment) -> Result<ScannedSegment, LogError> {
    let path = &segment.path;
    let bytes = fs::read(path).map_err(|e| LogError::io(path, e))?;
    let corrupt =
        |offset: usize, reason: String| LogError::Corrupt { path: path.clone(), offset: offset as u64, reason };
    format::check_segment_header(&bytes).map_err(|reason| corrupt(0, reason))?;
    let mut records = Vec::new();
    let mut at = format::SEGMENT_HEADER_LEN;
    let mut expected = segment.first_sequence;
    let tail = loop {
        match format::read_frame(&bytes, at) {
            format::Frame::End => break Tail::Clean,
            format::Frame::Bad(reason) => {
                let later = |payload: &[u8]| {
                    record_sequence(payload).is_ok_and(|s| s > expected && s - expected <= MAX_SEQUENCE_GAP)
                };
                if format::valid_frame_after(&bytes, at, later) {
                    return Err(corrupt(at, format!("{reason}, and valid records follow it")));
                }
                break Tail::Torn { offset: at, reason };
            }
            format::Frame::Valid { payload, next } => {
                let sequence = record_sequence(&bytes[payload.clone()])
                    .map_err(|e| corrupt(at, format!("record does not decode: {e}")))?;
                if sequence != expected {
                    return Err(corrupt(at, format!("sequence {sequence}, expected {expected}")));
                }
                records.push((sequence, payload));
                expected += 1;
                at = next;
            }
        }
    };
    Ok(ScannedSegment { bytes, records, tail })
}

/// How far past a bad frame a valid one may be numbered and still prove that
/// the bad frame is corruption rather than a torn tail.
const MAX_SEQUENCE_GAP: u64 = 1 << 20;

/// Decodes only the sequence field, skipping the body.
fn record_sequence(payload: &[u8]) -> Result<u64, prost::DecodeError> {
    #[derive(Clone, PartialEq, prost::Message)]
    struct SequenceOnly {
        #[prost(uint64, tag = "2")]
        sequence: u64,
    }
    Ok(SequenceOnly::decode(payload)?.sequence)
}

/// Per-segment figures for `aitl log stats`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SegmentStats {
    pub file: String,
    pub first_sequence: u64,
    pub records: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LogStats {
    pub segments: Vec<SegmentStats>,
    pub records: u64,
    pub interactions: u64,
    pub annotations: u64,
    pub bytes: u64,
    pub first_sequence: Option<u64>,
    pub last_sequence: Option<u64>,
    /// Bytes at the end of the last segment that are not (yet) a whole record.
    pub incomplete_tail_bytes: u64,
}

/// Reads a log directory, alone or beside the live writer.
pub struct LogReader {
    dir: PathBuf,
}

impl LogReader {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LogReader { dir: dir.into() }
    }

    /// Calls `visit` with every record whose sequence is `from` or later, in
    /// order, until it breaks. Returns the sequence after the last record seen.
    pub fn read_from(&self, from: u64, mut visit: impl FnMut(LogRecord) -> ControlFlow<()>) -> Result<u64, LogError> {
        let segments = list_segments(&self.dir)?;
        let durable_end = self.live_writer_watermark()?;
        let mut next = from;
        for (i, segment) in segments.iter().enumerate() {
            let is_last = i + 1 == segments.len();
            if !is_last && segments[i + 1].first_sequence <= from {
                continue;
            }
            let scanned = match scan_segment(segment) {
                Ok(scanned) => scanned,
                // The writer may have created the file but not its header yet.
                Err(LogError::Corrupt { offset: 0, .. }) if is_last && header_pending(segment) => {
                    break;
                }
                Err(e) => return Err(e),
            };
            if let (false, Tail::Torn { offset, reason }) = (is_last, &scanned.tail) {
                return Err(LogError::Corrupt {
                    path: segment.path.clone(),
                    offset: *offset as u64,
                    reason: format!("{reason} in a sealed segment"),
                });
            }
            for (sequence, range) in scanned.records {
                if sequence < from {
                    continue;
                }
                if durable_end.is_some_and(|end| sequence >= end) {
                    return Ok(next);
                }
                let record = LogRecord::decode(&scanned.bytes[range.clone()]).map_err(|e| LogError::Corrupt {
                    path: segment.path.clone(),
                    offset: (range.start - format::FRAME_HEADER_LEN) as u64,
                    reason: format!("record does not decode: {e}"),
                })?;
                next = sequence + 1;
                if visit(record).is_break() {
                    return Ok(next);
                }
            }
        }
        Ok(next)
    }

    /// With a writer live, the first sequence it has not made durable yet;
    /// None when no writer holds the log (every whole frame is then durable).
    fn live_writer_watermark(&self) -> Result<Option<u64>, LogError> {
        let lock_path = self.dir.join(super::writer::LOCK_FILE);
        let lock = match fs::File::open(&lock_path) {
            Ok(lock) => lock,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(LogError::io(&lock_path, e)),
        };
        match lock.try_lock_shared() {
            Ok(()) => return Ok(None),
            Err(fs::TryLockError::WouldBlock) => {}
            Err(fs::TryLockError::Error(e)) => return Err(LogError::io(&lock_path, e)),
        }
        let path = self.dir.join(super::writer::WATERMARK_FILE);
        let bytes = fs::read(&path).map_err(|e| LogError::io(&path, e))?;
        let bytes: [u8; 8] = bytes.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(|| LogError::Corrupt {
            path: path.clone(),
            offset: 0,
            reason: format!("watermark is {} bytes, expected 8", bytes.len()),
        })?;
        Ok(Some(u64::from_le_bytes(bytes)))
    }

    pub fn stats(&self) -> Result<LogStats, LogError> {
        let segments = list_segments(&self.dir)?;
        let mut stats = LogStats::default();
        for (i, segment) in segments.iter().enumerate() {
            let is_last = i + 1 == segments.len();
            let scanned = match scan_segment(segment) {
                Err(LogError::Corrupt { offset: 0, .. }) if is_last && header_pending(segment) => {
                    break;
                }
                other => other?,
            };
            if let Tail::Torn { offset, .. } = scanned.tail {
                stats.incomplete_tail_bytes = (scanned.bytes.len() - offset) as u64;
            }
            for (sequence, range) in &scanned.records {
                stats.first_sequence.get_or_insert(*sequence);
                stats.last_sequence = Some(*sequence);
                match LogRecord::decode(&scanned.bytes[range.clone()]).ok().and_then(|r| r.body) {
                    Some(Body::Interaction(_)) => stats.interactions += 1,
                    Some(Body::Annotation(_)) => stats.annotations += 1,
                    None => {}
                }
            }
            stats.records += scanned.records.len() as u64;
            stats.bytes += scanned.bytes.len() as u64;
            stats.segments.push(SegmentStats {
                file: segment.path.file_name().unwrap_or_default().to_string_lossy().into(),
                first_sequence: segment.first_sequence,
                records: scanned.records.len() as u64,
                bytes: scanned.bytes.len() as u64,
            });
        }
        Ok(stats)
    }
}

fn header_pending(segment: &Segment) -> bool {
    fs::metadata(&segment.path).map(|m| (m.len() as usize) < format::SEGMENT_HEADER_LEN).unwrap_or(false)
}
