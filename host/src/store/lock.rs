//! One daemon per state directory: an exclusive lock on a file in it, held for the daemon's
//! life, with the holder's PID written inside for the error a second daemon gets. The kernel
//! drops the lock when the process ends however it ends, so a crash leaves nothing to clean up.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::Path;

use anyhow::Context;

const LOCK_FILE: &str = "harbor.lock";

/// The held lock; released when dropped.
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock on `dir`, or says which process holds it.
    pub fn take(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    "another process".to_owned()
                } else {
                    format!("another Harbor (PID {holder})")
                };
                anyhow::bail!(
                    "the state directory {} is in use by {who}; one daemon per state directory (choose another with --state-dir)",
                    dir.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_directory_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().expect("dir");
        let held = DirLock::take(dir.path()).expect("the first lock");
        let Err(e) = DirLock::take(dir.path()) else {
            panic!("a second lock was granted");
        };
        let message = format!("{e:#}");
        assert!(
            message.contains(&format!("PID {}", std::process::id())),
            "{message}"
        );
        drop(held);
        DirLock::take(dir.path()).expect("free again once released");
    }
}
