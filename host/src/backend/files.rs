//! The file capability: plain file names inside one directory chosen by the operator. Writes
//! replace a file atomically (temporary file in the same directory, fsync, rename, directory
//! fsync), which is also the only kind of change Envoy's file watcher reacts to.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Largest file an adapter may write.
const MAX_FILE: usize = 64 << 20;

pub struct ConfinedDir {
    dir: PathBuf,
}

impl ConfinedDir {
    /// Creates the directory if needed.
    pub fn new(dir: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A plain, visible file name: no separators, no `.`/`..`, no leading dot (temporary files
    /// are hidden), no control characters.
    fn path(&self, name: &str) -> Result<PathBuf, String> {
        let plain = !name.is_empty()
            && name.len() <= 255
            && !name.starts_with('.')
            && !name.contains('/')
            && !name.chars().any(|c| c.is_control() || c == '\\');
        if plain {
            Ok(self.dir.join(name))
        } else {
            Err(format!(
                "{name:?} is not a plain file name (no '/', no leading '.', at most 255 bytes)"
            ))
        }
    }

    pub fn write(&self, name: &str, contents: &[u8]) -> Result<(), String> {
        let path = self.path(name)?;
        if contents.len() > MAX_FILE {
            return Err(format!(
                "{name}: {} bytes is over the {MAX_FILE}-byte limit",
                contents.len()
            ));
        }
        let tmp = self.dir.join(format!(
            ".{name}.tmp-{}-{:x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let written = (|| -> std::io::Result<()> {
            // Not readable by others: Envoy's secret files hold private keys. The group may
            // read, for a proxy that runs as another user of Harbor's group.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o640)
                .open(&tmp)?;
            f.write_all(contents)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            // The rename itself is durable only once the directory is synced.
            std::fs::File::open(&self.dir)?.sync_all()
        })();
        written.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("{name}: {e}")
        })
    }

    pub fn read(&self, name: &str) -> Result<Vec<u8>, String> {
        let path = self.path(name)?;
        let meta = std::fs::metadata(&path).map_err(|e| format!("{name}: {e}"))?;
        if meta.len() > MAX_FILE as u64 {
            return Err(format!("{name}: too large to read"));
        }
        std::fs::read(&path).map_err(|e| format!("{name}: {e}"))
    }

    pub fn remove(&self, name: &str) -> Result<(), String> {
        let path = self.path(name)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("{name}: {e}")),
        }
    }

    pub fn list(&self) -> Result<Vec<String>, String> {
        let entries =
            std::fs::read_dir(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_inside_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ConfinedDir::new(tmp.path().join("xds")).unwrap();
        for bad in [
            "",
            "..",
            ".",
            "../x",
            "a/b",
            "/etc/passwd",
            ".hidden",
            "a\nb",
        ] {
            assert!(dir.write(bad, b"x").is_err(), "{bad:?}");
            assert!(dir.read(bad).is_err(), "{bad:?}");
            assert!(dir.remove(bad).is_err(), "{bad:?}");
        }
        dir.write("cds.json", b"one").unwrap();
        dir.write("cds.json", b"two").unwrap();
        assert_eq!(dir.read("cds.json").unwrap(), b"two");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tmp.path().join("xds/cds.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o007, 0, "others may not read what may hold keys");
        assert_eq!(dir.list().unwrap(), vec!["cds.json".to_owned()]);
        dir.remove("cds.json").unwrap();
        dir.remove("cds.json").unwrap();
        assert!(dir.list().unwrap().is_empty());
    }
}
