//! The training log's durability contract: torn tails are cut and reported,
//! corruption before the tail refuses to open (naming file and offset), so
//! does damage to a tail the durable watermark says was acknowledged,
//! segments roll over, and concurrent appends share syncs without losing or
//! reordering anything.

use std::{ops::ControlFlow, path::Path, sync::Arc};

use aitl::{
    proto::{InteractionRecord, log_record::Body},
    trainlog::{LogError, LogOptions, LogReader, TrainingLog},
};

fn body(i: u64) -> Body {
    Body::Interaction(InteractionRecord {
        interaction_id: format!("ix-{i:06}-{}", "p".repeat((i % 7) as usize * 13)),
        ..Default::default()
    })
}

fn append_all(log: &TrainingLog, range: std::ops::Range<u64>) -> Vec<u64> {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        futures_util::future::join_all(range.map(|i| async move { log.append(&body(i)).await.unwrap() })).await
    })
}

fn read_ids(dir: &Path) -> Vec<(u64, String)> {
    let mut seen = Vec::new();
    LogReader::new(dir)
        .read_from(1, |record| {
            if let Some(Body::Interaction(ix)) = record.body {
                seen.push((record.sequence, ix.interaction_id));
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    seen
}

fn only_segment(dir: &Path) -> std::path::PathBuf {
    let mut segments: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segments.sort();
    segments.pop().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

#[test]
fn torn_tail_at_every_offset_of_the_last_record_recovers_all_earlier_records() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = TrainingLog::open(dir.path(), LogOptions::default()).unwrap();
    append_all(&log, 1..20);
    log.close();
    let segment = only_segment(dir.path());
    let before_last = std::fs::metadata(&segment).unwrap().len();
    let (log, _) = TrainingLog::open(dir.path(), LogOptions::default()).unwrap();
    append_all(&log, 20..21);
    log.close();
    let full = std::fs::metadata(&segment).unwrap().len();
    assert!(full > before_last + 8);

    for cut in before_last..full {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), copy.path());
        let torn = copy.path().join(segment.file_name().unwrap());
        std::fs::OpenOptions::new().write(true).open(&torn).unwrap().set_len(cut).unwrap();
        // As a crash mid-write leaves it: record 20 was never acknowledged.
        std::fs::write(copy.path().join("DURABLE"), 20u64.to_le_bytes()).unwrap();
        let (log, report) = TrainingLog::open(copy.path(), LogOptions::default()).unwrap();
        assert_eq!(report.records, 19, "cut at {cut}");
        assert_eq!(report.next_sequence, 20);
        match report.truncated {
            Some((_, offset, dropped)) => {
                assert_eq!((offset, dropped), (before_last, cut - before_last), "cut at {cut}")
            }
            None => assert_eq!(cut, before_last, "a cut inside the record must be reported"),
        }
        if cut == before_last + 5 {
            // The log keeps working after the repair: the next record is 20.
            assert_eq!(append_all(&log, 100..101), [20]);
        }
        log.close();
        let ids = read_ids(copy.path());
        assert_eq!(ids.len(), if cut == before_last + 5 { 20 } else { 19 });
        assert!(ids.iter().enumerate().all(|(i, (seq, _))| *seq == i as u64 + 1));
    }
}

/// Nineteen records written and closed; the segment's path and the offset
/// where record 19 starts.
fn nineteen_acknowledged(dir: &Path) -> (std::path::PathBuf, u64) {
    let (log, _) = TrainingLog::open(dir, LogOptions::default()).unwrap();
    append_all(&log, 1..19);
    log.close();
    let segment = only_segment(dir);
    let last_record_at = std::fs::metadata(&segment).unwrap().len();
    let (log, _) = TrainingLog::open(dir, LogOptions::default()).unwrap();
    append_all(&log, 19..20);
    log.close();
    (segment, last_record_at)
}

fn refusal(dir: &Path) -> (std::path::PathBuf, u64, String) {
    match TrainingLog::open(dir, LogOptions::default()).err().expect("acknowledged damage is refused") {
        LogError::Corrupt { path, offset, reason } => (path, offset, reason),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn damage_to_the_acknowledged_last_record_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let (segment, last_record_at) = nineteen_acknowledged(dir.path());
    let full = std::fs::metadata(&segment).unwrap().len();
    for flip_at in [last_record_at + 1, last_record_at + 5, full - 1] {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), copy.path());
        let path = copy.path().join(segment.file_name().unwrap());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[flip_at as usize] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let (at, offset, reason) = refusal(copy.path());
        assert_eq!((at, offset), (path.clone(), last_record_at), "flip at {flip_at}");
        assert!(reason.contains("records 19..=19 were acknowledged"), "{reason}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "a refused log is left as it was");
    }
    // Cut at a frame boundary: nothing looks torn, but record 19 is gone.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    let path = copy.path().join(segment.file_name().unwrap());
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(last_record_at).unwrap();
    let (_, offset, reason) = refusal(copy.path());
    assert_eq!(offset, last_record_at);
    assert!(reason.contains("the log ends") && reason.contains("remove it to accept"), "{reason}");
    // Without the watermark (an operator's decision) the log opens as it is.
    std::fs::remove_file(copy.path().join("DURABLE")).unwrap();
    let (log, report) = TrainingLog::open(copy.path(), LogOptions::default()).unwrap();
    assert_eq!(report.next_sequence, 19);
    log.close();
}

#[test]
fn an_empty_newest_segment_after_acknowledged_records_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = TrainingLog::open(dir.path(), LogOptions { segment_bytes: 256, ..LogOptions::default() }).unwrap();
    for i in 1..30 {
        append_all(&log, i..i + 1);
    }
    log.close();
    let newest = only_segment(dir.path());
    let first: u64 = newest.file_stem().unwrap().to_str().unwrap().parse().unwrap();
    assert!(first > 1, "the records span several segments");
    std::fs::write(&newest, b"").unwrap();
    let (path, offset, reason) = refusal(dir.path());
    assert_eq!((path, offset), (newest.clone(), 0));
    assert!(
        reason.contains("shorter than its header") && reason.contains(&format!("records {first}..=29")),
        "{reason}"
    );

    // The same empty file at the watermark is a segment whose creation a
    // crash cut short: it holds nothing acknowledged and is started again.
    std::fs::write(dir.path().join("DURABLE"), first.to_le_bytes()).unwrap();
    let (log, report) = TrainingLog::open(dir.path(), LogOptions::default()).unwrap();
    assert_eq!(report.next_sequence, first);
    log.close();
}

#[test]
fn a_flipped_bit_before_the_tail_is_reported_with_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = TrainingLog::open(dir.path(), LogOptions::default()).unwrap();
    append_all(&log, 1..5);
    log.close();
    let segment = only_segment(dir.path());
    let fifth_record_at = std::fs::metadata(&segment).unwrap().len();
    let (log, _) = TrainingLog::open(dir.path(), LogOptions::default()).unwrap();
    append_all(&log, 5..12);
    log.close();

    for flip_at in [fifth_record_at + 2, fifth_record_at + 6, fifth_record_at + 20] {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), copy.path());
        let path = copy.path().join(segment.file_name().unwrap());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[flip_at as usize] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let err = TrainingLog::open(copy.path(), LogOptions::default()).err().expect("corruption is refused");
        match &err {
            LogError::Corrupt { path: p, offset, .. } => {
                assert_eq!(p, &path);
                assert_eq!(*offset, fifth_record_at, "flip at {flip_at}");
            }
            other => panic!("expected Corrupt, got {other}"),
        }
        assert!(err.to_string().contains(&format!("byte offset {fifth_record_at}")));
        assert!(LogReader::new(copy.path()).read_from(1, |_| ControlFlow::Continue(())).is_err());
    }
}

#[test]
fn segments_roll_over_and_concurrent_appends_keep_dense_order() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions { segment_bytes: 4096, ..LogOptions::default() };
    let (log, _) = TrainingLog::open(dir.path(), options.clone()).unwrap();
    let log = Arc::new(log);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    let sequences: Vec<u64> = rt.block_on(async {
        let tasks: Vec<_> = (0..64u64)
            .map(|client| {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut seqs = Vec::new();
                    for i in 0..25 {
                        seqs.push(log.append(&body(client * 1000 + i)).await.unwrap());
                    }
                    seqs
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            let seqs = task.await.unwrap();
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "one client's appends keep their order");
            all.extend(seqs);
        }
        all
    });
    log.close();
    let mut sorted = sequences.clone();
    sorted.sort();
    assert_eq!(sorted, (1..=1600).collect::<Vec<_>>());
    let segments = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "seg"))
        .count();
    assert!(segments > 10, "{segments} segments");
    let ids = read_ids(dir.path());
    assert_eq!(ids.len(), 1600);
    let (log, report) = TrainingLog::open(dir.path(), options).unwrap();
    assert_eq!((report.records, report.next_sequence, report.segments), (1600, 1601, segments));
    log.close();
    let stats = LogReader::new(dir.path()).stats().unwrap();
    assert_eq!((stats.records, stats.interactions, stats.last_sequence), (1600, 1600, Some(1600)));
}

#[test]
fn a_second_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = TrainingLog::open(dir.path(), LogOptions::default()).unwrap();
    assert!(matches!(TrainingLog::open(dir.path(), LogOptions::default()), Err(LogError::Locked(_))));
    log.close();
    TrainingLog::open(dir.path(), LogOptions::default()).unwrap().0.close();
}

#[test]
fn serve_refuses_a_corrupt_log_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    let (log, _) = TrainingLog::open(&log_dir, LogOptions::default()).unwrap();
    append_all(&log, 1..6);
    log.close();
    let segment = only_segment(&log_dir);
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[16 + 3] ^= 1; // first record's length field
    std::fs::write(&segment, &bytes).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_aitl"))
        .args(["--data-dir", dir.path().to_str().unwrap(), "serve", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&segment.display().to_string()) && stderr.contains("byte offset 16"), "{stderr}");
}

#[test]
fn a_reader_beside_a_live_writer_stops_at_the_durable_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = TrainingLog::open(dir.path(), LogOptions::default()).unwrap();
    append_all(&log, 1..4);
    assert_eq!(read_ids(dir.path()).len(), 3);
    // As if record 3 were written but its fsync still pending.
    std::fs::write(dir.path().join("DURABLE"), 3u64.to_le_bytes()).unwrap();
    assert_eq!(read_ids(dir.path()).len(), 2, "a live writer's unsynced records stay invisible");
    log.close();
    assert_eq!(read_ids(dir.path()).len(), 3, "with no writer, every whole frame is durable");
}
