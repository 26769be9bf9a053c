//! Named, durable consumer positions. A consumer (the flywheel worker, an
//! export job) resumes from its cursor after a crash; it commits a position
//! only after the records before it are fully processed, so each record is
//! processed at least once and idempotent consumers see it effectively once.
//!
//! A cursor is the file `cursors/{name}.cursor` beside the segments holding
//! the next sequence to read as decimal text, replaced atomically
//! (write temp, fsync, rename, fsync dir).

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use super::LogError;

#[derive(Debug, Clone)]
pub struct Cursor {
    name: String,
    path: PathBuf,
    next_sequence: u64,
}

pub fn cursor_dir(log_dir: &Path) -> PathBuf {
    log_dir.join("cursors")
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl Cursor {
    /// Loads the cursor, or starts one at sequence 1 (the log's beginning).
    pub fn open(log_dir: &Path, name: &str) -> Result<Cursor, LogError> {
        if !valid_name(name) {
            return Err(LogError::InvalidCursorName(name.into()));
        }
        let path = cursor_dir(log_dir).join(format!("{name}.cursor"));
        let next_sequence = match fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().map_err(|_| LogError::Corrupt {
                path: path.clone(),
                offset: 0,
                reason: format!("cursor holds {text:?}, expected a sequence number"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 1,
            Err(e) => return Err(LogError::io(&path, e)),
        };
        Ok(Cursor { name: name.into(), path, next_sequence })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The first sequence this consumer has not processed yet.
    pub fn next_sequence(&self) -> u64 {
        self.next_sequence
    }

    /// Durably records that everything before `next_sequence` is processed.
    pub fn commit(&mut self, next_sequence: u64) -> Result<(), LogError> {
        let dir = self.path.parent().expect("cursor path has a parent");
        fs::create_dir_all(dir).map_err(|e| LogError::io(dir, e))?;
        let tmp = self.path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut file = fs::File::create(&tmp)?;
            writeln!(file, "{next_sequence}")?;
            file.sync_data()?;
            fs::rename(&tmp, &self.path)?;
            fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| LogError::io(&self.path, e))?;
        self.next_sequence = next_sequence;
        Ok(())
    }

    /// All cursors of a log with their positions.
    pub fn list(log_dir: &Path) -> Result<Vec<Cursor>, LogError> {
        let dir = cursor_dir(log_dir);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(LogError::io(&dir, e)),
        };
        let mut cursors = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| LogError::io(&dir, e))?;
            let file_name = entry.file_name();
            if let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".cursor")) {
                cursors.push(Cursor::open(log_dir, name)?);
            }
        }
        cursors.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(cursors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_survives_reopen_and_rejects_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut cursor = Cursor::open(dir.path(), "worker").unwrap();
        assert_eq!(cursor.next_sequence(), 1);
        cursor.commit(42).unwrap();
        assert_eq!(Cursor::open(dir.path(), "worker").unwrap().next_sequence(), 42);
        assert_eq!(Cursor::list(dir.path()).unwrap().len(), 1);
        assert!(matches!(Cursor::open(dir.path(), "../x"), Err(LogError::InvalidCursorName(_))));
    }
}
