//! On-disk layout of the training log. This table is the format's
//! specification; a reader in any language needs only it and
//! `proto/aitl/v1/trainlog.proto`.
//!
//! A log is a directory of segment files named `{first_sequence:020}.seg`,
//! read in name order. Each segment:
//!
//! | offset | size | field                                                       |
//! |--------|------|-------------------------------------------------------------|
//! | 0      | 8    | magic `b"AITLLOG\0"`                                        |
//! | 8      | 4    | format version, u32 little-endian (1)                       |
//! | 12     | 4    | CRC32C of bytes 0..12, u32 little-endian                    |
//! | 16     | ...  | frames, back to back, no padding                            |
//!
//! Each frame:
//!
//! | size | field                                                             |
//! |------|-------------------------------------------------------------------|
//! | 4    | payload length `n`, u32 little-endian, 1..=16 MiB                 |
//! | 4    | CRC32C (Castagnoli) of the 4 length bytes followed by the payload |
//! | n    | payload: one `aitl.v1.LogRecord` in protobuf encoding             |
//!
//! Sequences are dense: the first record of a segment carries the sequence in
//! its name and each next record the one after. Covering the length with the
//! CRC means a flipped length bit is caught instead of misframing the rest.
//!
//! Beside the segments: `LOCK` (the writer holds an exclusive flock on it),
//! `DURABLE` (8 bytes, little-endian: the first sequence not yet fsync'd; a
//! reader honours it only while a writer holds `LOCK`) and `cursors/`.
//!
//! A frame that is cut short or fails its CRC with no valid frame after it is a
//! torn tail (a write that never completed); one followed by a valid frame
//! holding a later sequence is corruption, and the log refuses to open. So is
//! a tail, torn or cleanly ended, before the sequence `DURABLE` names: those
//! records were acknowledged, so their loss is damage, not an unfinished write.
//! (Requiring the later sequence keeps bytes inside a payload — client text —
//! from posing as a frame.)

use std::ops::Range;

pub const SEGMENT_MAGIC: [u8; 8] = *b"AITLLOG\0";
pub const FORMAT_VERSION: u32 = 1;
pub const SEGMENT_HEADER_LEN: usize = 16;
pub const FRAME_HEADER_LEN: usize = 8;
/// Largest payload a frame may carry.
pub const MAX_RECORD_LEN: usize = 16 << 20;

pub fn segment_header() -> [u8; SEGMENT_HEADER_LEN] {
    let mut header = [0u8; SEGMENT_HEADER_LEN];
    header[..8].copy_from_slice(&SEGMENT_MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let crc = crc32c::crc32c(&header[..12]);
    header[12..].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Checks a segment's first bytes; the error says what is wrong.
pub fn check_segment_header(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < SEGMENT_HEADER_LEN {
        return Err(format!("header is {} bytes, expected {SEGMENT_HEADER_LEN}", bytes.len()));
    }
    if bytes[..8] != SEGMENT_MAGIC {
        return Err("bad magic: not an aitl training-log segment".into());
    }
    let crc = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    if crc != crc32c::crc32c(&bytes[..12]) {
        return Err("header checksum mismatch".into());
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(format!("format version {version}, this build reads {FORMAT_VERSION}"));
    }
    Ok(())
}

pub fn segment_file_name(first_sequence: u64) -> String {
    format!("{first_sequence:020}.seg")
}

pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".seg")?;
    (stem.len() == 20).then(|| stem.parse().ok()).flatten()
}

fn frame_crc(len_bytes: &[u8; 4], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(len_bytes), payload)
}

/// Appends one frame around `payload` (at most [`MAX_RECORD_LEN`] bytes).
pub fn push_frame(buf: &mut Vec<u8>, payload: &[u8]) {
    debug_assert!(!payload.is_empty() && payload.len() <= MAX_RECORD_LEN);
    let len_bytes = (payload.len() as u32).to_le_bytes();
    buf.extend_from_slice(&len_bytes);
    buf.extend_from_slice(&frame_crc(&len_bytes, payload).to_le_bytes());
    buf.extend_from_slice(payload);
}

pub enum Frame {
    /// A whole, valid frame; its payload and where the next frame starts.
    Valid { payload: Range<usize>, next: usize },
    /// No bytes left: a clean end.
    End,
    /// Cut short or failing its checksum.
    Bad(&'static str),
}

pub fn read_frame(bytes: &[u8], at: usize) -> Frame {
    let rest = &bytes[at.min(bytes.len())..];
    if rest.is_empty() {
        return Frame::End;
    }
    if rest.len() < FRAME_HEADER_LEN {
        return Frame::Bad("frame header cut short");
    }
    let len_bytes: [u8; 4] = rest[..4].try_into().expect("4 bytes");
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len == 0 || len > MAX_RECORD_LEN {
        return Frame::Bad("frame length out of range");
    }
    if rest.len() < FRAME_HEADER_LEN + len {
        return Frame::Bad("frame cut short");
    }
    let stored = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    let payload = &rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
    if stored != frame_crc(&len_bytes, payload) {
        return Frame::Bad("frame checksum mismatch");
    }
    let start = at + FRAME_HEADER_LEN;
    Frame::Valid { payload: start..start + len, next: start + len }
}

/// Whether a valid frame whose payload `accept`s starts after `offset`:
/// decides torn tail (none) from corruption (some). Only runs on the error path.
pub fn valid_frame_after(bytes: &[u8], offset: usize, accept: impl Fn(&[u8]) -> bool) -> bool {
    (offset + 1..bytes.len().saturating_sub(FRAME_HEADER_LEN - 1))
        .any(|at| matches!(read_frame(bytes, at), Frame::Valid { ref payload, .. } if accept(&bytes[payload.clone()])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_reject_any_single_bit_flip() {
        let mut buf = Vec::new();
        push_frame(&mut buf, b"first record");
        push_frame(&mut buf, b"second");
        let Frame::Valid { payload, next } = read_frame(&buf, 0) else { panic!("first frame") };
        assert_eq!(&buf[payload], b"first record");
        let Frame::Valid { payload, next: end } = read_frame(&buf, next) else { panic!("second") };
        assert_eq!(&buf[payload], b"second");
        assert!(matches!(read_frame(&buf, end), Frame::End));

        for bit in 0..(FRAME_HEADER_LEN + 12) * 8 {
            let mut flipped = buf.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                !matches!(read_frame(&flipped, 0), Frame::Valid { next: n, .. } if n == next),
                "bit {bit} flip went unnoticed"
            );
        }
    }

    #[test]
    fn header_checks_magic_version_and_checksum() {
        let header = segment_header();
        assert!(check_segment_header(&header).is_ok());
        let mut bad = header;
        bad[9] ^= 1;
        assert!(check_segment_header(&bad).unwrap_err().contains("checksum"));
        assert!(check_segment_header(&header[..10]).is_err());
        assert_eq!(parse_segment_file_name(&segment_file_name(42)), Some(42));
        assert_eq!(parse_segment_file_name("42.seg"), None);
    }
}
