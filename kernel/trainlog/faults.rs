//! Injected storage failures, so tests and drills can show what clients see
//! when the disk fills or fails, and that the log recovers when it comes back.
//! Checked before every write and sync of the log (a relaxed atomic load).

use std::{
    io,
    sync::atomic::{AtomicU8, Ordering},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    None = 0,
    /// Writes fail with ENOSPC, as on a full disk.
    WriteNoSpace = 1,
    /// Writes fail with EIO.
    WriteIo = 2,
    /// fdatasync fails with EIO.
    SyncIo = 3,
}

#[derive(Debug, Default)]
pub struct FaultInjector {
    mode: AtomicU8,
}

impl FaultInjector {
    pub fn set(&self, fault: Fault) {
        self.mode.store(fault as u8, Ordering::Relaxed);
    }

    fn current(&self) -> u8 {
        self.mode.load(Ordering::Relaxed)
    }

    pub(crate) fn before_write(&self) -> io::Result<()> {
        match self.current() {
            x if x == Fault::WriteNoSpace as u8 => Err(io::Error::from_raw_os_error(28)),
            x if x == Fault::WriteIo as u8 => Err(io::Error::from_raw_os_error(5)),
            _ => Ok(()),
        }
    }

    pub(crate) fn before_sync(&self) -> io::Result<()> {
        if self.current() == Fault::SyncIo as u8 {
            return Err(io::Error::from_raw_os_error(5));
        }
        Ok(())
    }
}
