//! Persistence of ephemeral registrations across restarts and crashes. The state directory holds
//! a snapshot (`ephemeral.json`, replaced atomically: temp file, fsync, rename, fsync of the
//! directory) and a log of the changes made since it (`ephemeral.journal-<n>`, appended and
//! synced before each change is acknowledged; see [`journal`]). The snapshot names its log, so
//! a crash between writing a new snapshot and removing the old log never replays the old one.
//!
//! Loading reads the snapshot and replays its log: a line torn by a crash at the log's end is
//! dropped (it was never acknowledged); a file that cannot be read is moved aside (kept, never
//! removed as a leftover) and reported. A log whose snapshot cannot be read goes aside with it.
//! A state file from before the log existed is read as the first snapshot. One daemon owns the
//! directory at a time ([`lock`]).

mod journal;
mod lock;
mod record;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::events::Event;
use crate::model::InstanceId;
use crate::registry::{Registry, RestoredInstance, SetAside};

pub use journal::JournalWriter;

use journal::{Line, Log};
use lock::DirLock;
use record::{StoredInstance, unix_ms};

const FILE_NAME: &str = "ephemeral.json";
const LOG_PREFIX: &str = "ephemeral.journal-";
const FORMAT_VERSION: u32 = 1;

pub struct Store {
    dir: PathBuf,
    /// The log the snapshot names.
    generation: u64,
    /// The snapshot's size, against which the log's is weighed.
    snapshot_len: u64,
    /// Held while the store is; none only for tests that read what a crashed writer left.
    _lock: Option<DirLock>,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    /// The log of changes made since this snapshot; 0 in files from before logs existed.
    #[serde(default)]
    journal: u64,
    instances: Vec<StoredInstance>,
}

/// What loading found.
pub struct Loaded {
    pub instances: Vec<RestoredInstance>,
    /// A file that could not be used, moved aside.
    pub set_aside: Option<SetAside>,
}

impl Store {
    /// Opens the state directory, creating it, and takes its lock.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
        let lock = DirLock::take(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            generation: 0,
            snapshot_len: 0,
            _lock: Some(lock),
        })
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    fn log_path(&self, generation: u64) -> PathBuf {
        self.dir.join(format!("{LOG_PREFIX}{generation}"))
    }

    fn tmp_path(&self) -> PathBuf {
        self.dir.join(format!(".{FILE_NAME}.tmp"))
    }

    pub fn snapshot_len(&self) -> u64 {
        self.snapshot_len
    }

    /// Reads the saved instances: the snapshot, then its log replayed over it.
    pub fn load(&mut self) -> Loaded {
        let mut instances: BTreeMap<InstanceId, StoredInstance> = BTreeMap::new();
        let set_aside = self.read_into(&mut instances);
        self.remove_leftovers();
        let mut out = Vec::with_capacity(instances.len());
        for (id, record) in instances {
            match record.into_restored() {
                Ok(inst) => out.push(inst),
                Err(e) => {
                    tracing::warn!(id = %id, error = %e, "skipping an invalid saved instance")
                }
            }
        }
        // What came before a bad line of the log is held only in memory now that the log is set
        // aside: folded into a snapshot at once, it survives a crash before the next fold.
        let log_set_aside = set_aside
            .as_ref()
            .is_some_and(|a| Path::new(&a.file) != self.path());
        if log_set_aside && let Err(e) = self.compact(&out) {
            tracing::error!(error = %e, "cannot save what came before the bad line of the journal");
        }
        Loaded {
            instances: out,
            set_aside,
        }
    }

    /// Reads the snapshot and replays its log into `instances`; returns the file set aside.
    fn read_into(
        &mut self,
        instances: &mut BTreeMap<InstanceId, StoredInstance>,
    ) -> Option<SetAside> {
        let log = match self.read_snapshot() {
            Ok(Some(file)) => {
                self.generation = file.journal;
                instances.extend(file.instances.into_iter().map(|i| (i.id, i)));
                self.log_path(self.generation)
            }
            Ok(None) => {
                // No snapshot yet: everything is in the first log.
                self.generation = 0;
                self.log_path(0)
            }
            Err(reason) => {
                let aside = self.set_aside(&self.path(), reason);
                self.set_logs_aside();
                // Without a snapshot the first log is read next time, so it must start empty.
                self.generation = 0;
                return Some(aside);
            }
        };
        replay(&log, instances)
            .err()
            .map(|reason| self.set_aside(&log, reason))
    }

    fn read_snapshot(&mut self) -> Result<Option<StateFile>, String> {
        let text = match fs::read(self.path()) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read: {e}")),
        };
        let file: StateFile =
            serde_json::from_slice(&text).map_err(|e| format!("not a valid state file: {e}"))?;
        if file.version != FORMAT_VERSION {
            return Err(format!(
                "state file version {} is not {FORMAT_VERSION}",
                file.version
            ));
        }
        self.snapshot_len = text.len() as u64;
        Ok(Some(file))
    }

    /// Logs of other generations (a crash between a new snapshot and the old log's removal) and
    /// temporary files of writes that never finished. Files set aside are not among them: they
    /// are kept for a person to inspect.
    fn remove_leftovers(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale_log = log_generation(&name).is_some_and(|g| g != self.generation);
            if (stale_log || name == format!(".{FILE_NAME}.tmp"))
                && let Err(e) = fs::remove_file(entry.path())
            {
                tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove a leftover state file");
            }
        }
    }

    /// Moves every log aside once the snapshot that says which one holds the latest changes
    /// cannot be read: replayed without their snapshot they would restore a partial state,
    /// yet they may hold what a person needs to recover by hand.
    fn set_logs_aside(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if log_generation(&name).is_some()
                && let Some(moved_to) = move_aside(&entry.path(), "orphan")
            {
                tracing::warn!(file = %entry.path().display(), %moved_to, "journal of an unreadable snapshot set aside");
            }
        }
    }

    fn set_aside(&self, path: &Path, reason: String) -> SetAside {
        SetAside {
            file: path.display().to_string(),
            moved_to: move_aside(path, "corrupt"),
            reason,
        }
    }

    /// Opens the snapshot's log for appending.
    fn open_log(&self) -> anyhow::Result<Log> {
        let path = self.log_path(self.generation);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open the journal {}", path.display()))?;
        // The log may be new (the first, or one after a set-aside): changes acknowledged in it
        // must not vanish with its directory entry at a power loss. This also makes the
        // set-asides and removals of loading durable.
        self.sync_dir()
            .with_context(|| format!("cannot sync the state directory {}", self.dir.display()))?;
        let len = file.metadata()?.len();
        Ok(Log { file, len })
    }

    /// Makes the directory's entries (files created, renamed, removed) durable.
    fn sync_dir(&self) -> std::io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    /// Writes a snapshot of `instances` that names a new, empty log, and removes the old log.
    /// On failure the old snapshot and log stay in force, and nothing half-written is left.
    fn compact(&mut self, instances: &[RestoredInstance]) -> Result<Log, String> {
        let next = self.generation + 1;
        let log_path = self.log_path(next);
        let written = self.write_snapshot(instances, next).and_then(|len| {
            let file = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&log_path)?;
            // Both new directory entries, durable at once.
            self.sync_dir()?;
            Ok((len, file))
        });
        let (len, file) = match written {
            Ok(done) => done,
            Err(e) => {
                let _ = fs::remove_file(&log_path);
                return Err(self.unwritable(&e));
            }
        };
        let old = self.log_path(self.generation);
        self.generation = next;
        self.snapshot_len = len;
        if let Err(e) = fs::remove_file(&old)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(file = %old.display(), error = %e, "cannot remove the old journal");
        }
        Ok(Log { file, len: 0 })
    }

    /// Replaces the snapshot; returns its size. The rename is made durable by the caller. On
    /// failure the temporary file is removed: nothing half-written is left.
    fn write_snapshot(&self, instances: &[RestoredInstance], journal: u64) -> std::io::Result<u64> {
        let file = StateFile {
            version: FORMAT_VERSION,
            journal,
            instances: instances
                .iter()
                .map(StoredInstance::from_restored)
                .collect(),
        };
        let json = serde_json::to_vec(&file)?;
        let tmp = self.tmp_path();
        let written = write_synced(&tmp, &json).and_then(|()| fs::rename(&tmp, self.path()));
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.map(|()| json.len() as u64)
    }

    /// The reason a write failed, for people.
    fn unwritable(&self, e: &std::io::Error) -> String {
        format!(
            "the state directory {} is not writable: {e}",
            self.dir.display()
        )
    }
}

/// The generation of a log named `name`; none for any other file, a set-aside log included.
fn log_generation(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(LOG_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Renames `path` to `<name>.<label>-<unix ms>` beside it; returns the new path, or none (and
/// says why in the log) if it could not be moved.
fn move_aside(path: &Path, label: &str) -> Option<String> {
    let aside = path.with_file_name(format!(
        "{}.{label}-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        unix_ms(SystemTime::now())
    ));
    match fs::rename(path, &aside) {
        Ok(()) => Some(aside.display().to_string()),
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "cannot move a state file aside");
            None
        }
    }
}

/// Writes `bytes` to a new file at `path` and syncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Replays the log at `path` over `instances`. A last line without its newline was torn by a
/// crash and is dropped; a bad line before the end is corruption: what came before it stands,
/// and the reason is returned.
fn replay(path: &Path, instances: &mut BTreeMap<InstanceId, StoredInstance>) -> Result<(), String> {
    let text = match fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot read: {e}")),
    };
    let complete = text.rsplit_once_newline();
    for (number, line) in complete.split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Line>(line) {
            Ok(Line::Put(instance)) => {
                instances.insert(instance.id, *instance);
            }
            Ok(Line::Remove(id)) => {
                instances.remove(&id);
            }
            Err(e) => return Err(format!("line {} is not a journal entry: {e}", number + 1)),
        }
    }
    Ok(())
}

trait CompleteLines {
    /// Everything up to and including the last newline.
    fn rsplit_once_newline(&self) -> &[u8];
}

impl CompleteLines for Vec<u8> {
    fn rsplit_once_newline(&self) -> &[u8] {
        match self.iter().rposition(|b| *b == b'\n') {
            Some(end) => &self[..=end],
            None => &[],
        }
    }
}

/// Opens the state directory, loads what it holds into the registry, and starts the journal
/// that every later change goes through. A file set aside is reported as an event (before any
/// client can subscribe) and kept in the state's condition (which they can read).
pub fn open(
    dir: &Path,
    registry: &std::sync::Arc<Registry>,
    metrics: &crate::metrics::Metrics,
) -> anyhow::Result<(std::sync::Arc<JournalWriter>, usize)> {
    let mut store = Store::open(dir)?;
    let loaded = store.load();
    if let Some(bad) = &loaded.set_aside {
        tracing::error!(
            file = %bad.file,
            moved_to = bad.moved_to.as_deref().unwrap_or("-"),
            reason = %bad.reason,
            "state file set aside; starting without what it held"
        );
        registry.bus().publish(Event::StateFileError {
            file: bad.file.clone(),
            reason: bad.reason.clone(),
        });
    }
    let restored = registry.restore(loaded.instances);
    let journal = JournalWriter::start(
        store,
        std::sync::Arc::downgrade(registry),
        registry.bus().clone(),
        metrics,
        loaded.set_aside,
    )?;
    registry.set_journal(journal.clone());
    Ok((journal, restored))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::events::EventBus;
    use crate::metrics::Metrics;
    use crate::registry::{LeaseLimits, Registration};

    fn registry() -> (Arc<Registry>, Metrics) {
        let bus = Arc::new(EventBus::new(1024));
        let metrics = Arc::new(Metrics::new().unwrap());
        let r = Arc::new(Registry::new(bus, metrics, LeaseLimits::default()));
        (r, Metrics::new().unwrap())
    }

    fn reg(service: &str, upstream: &str) -> Registration {
        crate::registry::tests::reg(service, upstream, 60)
    }

    fn upstreams(r: &Registry) -> Vec<String> {
        let mut all: Vec<String> = r
            .ephemeral_instances()
            .iter()
            .map(|i| i.registration.upstream.addr.to_string())
            .collect();
        all.sort();
        all
    }

    /// The record of one registered instance (`a` at 127.0.0.1:1), as the journal stores it.
    fn one_instance() -> StoredInstance {
        let (r, _) = registry();
        r.register(reg("a", "127.0.0.1:1")).unwrap();
        StoredInstance::from_restored(&r.ephemeral_instances()[0])
    }

    #[tokio::test]
    async fn saved_changes_come_back_in_order_and_a_torn_last_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (r, metrics) = registry();
        let (journal, _) = open(dir.path(), &r, &metrics).unwrap();
        r.register_saved(reg("a", "127.0.0.1:1")).await.unwrap();
        let gone = r.register_saved(reg("a", "127.0.0.1:2")).await.unwrap();
        r.renew_saved(gone.id, None).await.unwrap();
        r.deregister_saved(gone.id).await.unwrap();
        let mut with_settings = reg("b", "127.0.0.1:3");
        with_settings.route.strategy_settings =
            crate::model::StrategySettings::from_json(&serde_json::json!({"table_size": 5003}))
                .unwrap();
        r.register_saved(with_settings).await.unwrap();
        // A crash: the writer never folds its log into a snapshot, and the last write tore.
        std::mem::forget(journal);
        let log = dir.path().join(format!("{LOG_PREFIX}0"));
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"{\"put\": {\"id\": \"half").unwrap();
        drop(f);
        drop(r);

        let mut store = Store::open_unlocked(dir.path());
        let loaded = store.load();
        assert!(loaded.set_aside.is_none(), "a torn end is not corruption");
        let (again, _) = registry();
        again.restore(loaded.instances);
        assert_eq!(upstreams(&again), ["127.0.0.1:1", "127.0.0.1:3"]);
        let b = again
            .service(&crate::model::ServiceName::parse("b").unwrap())
            .unwrap();
        assert_eq!(b.route.strategy_settings.text(), r#"{"table_size":5003}"#);
    }

    #[test]
    fn a_bad_line_before_the_end_sets_the_log_aside_and_keeps_what_came_before() {
        let dir = tempfile::tempdir().unwrap();
        let good = serde_json::to_string(&Line::Put(Box::new(one_instance()))).unwrap();
        let log = dir.path().join(format!("{LOG_PREFIX}0"));
        let bad = format!("{good}\nnot json\n{good}\n");
        fs::write(&log, &bad).unwrap();
        let mut store = Store::open_unlocked(dir.path());
        let loaded = store.load();
        assert_eq!(loaded.instances.len(), 1);
        let aside = loaded.set_aside.expect("reported");
        assert!(aside.reason.contains("line 2"), "{}", aside.reason);
        let moved_to = PathBuf::from(aside.moved_to.expect("moved"));
        assert_eq!(
            fs::read_to_string(&moved_to).unwrap(),
            bad,
            "kept as it was"
        );
        // What came before the bad line is folded into a snapshot naming a new, empty log.
        store.open_log().unwrap();
        let next = dir.path().join(format!("{LOG_PREFIX}1"));
        assert_eq!(fs::read(&next).unwrap(), b"", "a new, empty log");
        assert!(!log.exists(), "the bad log is only where it was moved");

        // A crash now loses none of it.
        let mut again = Store::open_unlocked(dir.path());
        let loaded = again.load();
        assert!(loaded.set_aside.is_none());
        assert_eq!(loaded.instances.len(), 1, "what came before the bad line");
        assert_eq!(
            fs::read_to_string(&moved_to).unwrap(),
            bad,
            "still kept after another start"
        );
    }

    #[test]
    fn an_unreadable_snapshot_is_set_aside_with_its_log_and_both_outlast_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let good = serde_json::to_string(&Line::Put(Box::new(one_instance()))).unwrap();
        let snapshot = dir.path().join(FILE_NAME);
        let bad = r#"{"version": 1, "journal": 3, "instances": [tru"#;
        fs::write(&snapshot, bad).unwrap();
        let log = dir.path().join(format!("{LOG_PREFIX}3"));
        fs::write(&log, format!("{good}\n")).unwrap();

        let mut store = Store::open_unlocked(dir.path());
        let loaded = store.load();
        assert!(
            loaded.instances.is_empty(),
            "a log is not read without its snapshot"
        );
        let aside = loaded.set_aside.expect("reported");
        assert!(
            aside.reason.contains("not a valid state file"),
            "{}",
            aside.reason
        );
        let moved_to = PathBuf::from(aside.moved_to.expect("moved"));
        assert_eq!(fs::read_to_string(&moved_to).unwrap(), bad);
        let orphans = files_containing(dir.path(), ".orphan-");
        assert_eq!(orphans.len(), 1, "{orphans:?}");
        assert!(
            orphans[0].starts_with(&format!("{LOG_PREFIX}3.")),
            "{orphans:?}"
        );
        assert!(!log.exists(), "moved aside");
        store.open_log().unwrap();
        assert!(
            dir.path().join(format!("{LOG_PREFIX}0")).exists(),
            "a fresh first log"
        );

        let mut again = Store::open_unlocked(dir.path());
        let loaded = again.load();
        assert!(loaded.set_aside.is_none());
        assert_eq!(fs::read_to_string(&moved_to).unwrap(), bad);
        assert_eq!(
            fs::read_to_string(dir.path().join(&orphans[0])).unwrap(),
            format!("{good}\n"),
            "the log is kept as it was"
        );
    }

    #[test]
    fn only_logs_of_other_generations_and_temporary_files_are_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            "ephemeral.journal-1",
            "ephemeral.journal-2",
            "ephemeral.journal-1.corrupt-5",
            "ephemeral.journal-1.orphan-5",
            "ephemeral.json.corrupt-5",
            ".ephemeral.json.tmp",
        ];
        for name in names {
            fs::write(dir.path().join(name), "x").unwrap();
        }
        let mut store = Store::open_unlocked(dir.path());
        store.generation = 2;
        store.remove_leftovers();
        let mut left = files_containing(dir.path(), "ephemeral");
        left.sort();
        assert_eq!(
            left,
            [
                "ephemeral.journal-1.corrupt-5",
                "ephemeral.journal-1.orphan-5",
                "ephemeral.journal-2",
                "ephemeral.json.corrupt-5",
            ]
        );
    }

    fn files_containing(dir: &Path, part: &str) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(part))
            .collect()
    }

    #[tokio::test]
    async fn a_grown_log_is_folded_into_a_snapshot_that_names_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let (r, metrics) = registry();
        let (journal, _) = open(dir.path(), &r, &metrics).unwrap();
        let mut ids = Vec::new();
        for i in 0..50 {
            ids.push(
                r.register_saved(reg("a", &format!("127.0.0.1:{}", 1000 + i)))
                    .await
                    .unwrap()
                    .id,
            );
        }
        // Renewals until the log is past its limit several times over.
        for _ in 0..80 {
            for id in &ids {
                r.renew_saved(*id, None).await.unwrap();
            }
        }
        let logs: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(LOG_PREFIX))
            .collect();
        assert_eq!(logs.len(), 1, "{logs:?}");
        assert_ne!(logs[0], format!("{LOG_PREFIX}0"), "a new generation");
        let log_len = fs::metadata(dir.path().join(&logs[0])).unwrap().len();
        assert!(log_len <= 2 << 20, "the log was folded: {log_len} bytes");
        journal.close();
        let mut store = Store::open_unlocked(dir.path());
        assert_eq!(store.load().instances.len(), 50);
    }

    #[test]
    fn a_state_file_from_before_the_journal_is_read_as_the_first_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let record = serde_json::to_value(one_instance()).unwrap();
        let old = serde_json::json!({"version": 1, "instances": [record]});
        fs::write(dir.path().join(FILE_NAME), old.to_string()).unwrap();
        let mut store = Store::open_unlocked(dir.path());
        let loaded = store.load();
        assert!(loaded.set_aside.is_none());
        assert_eq!(loaded.instances.len(), 1);
    }

    impl Store {
        /// A store for reading what another left, as a restarted daemon would.
        fn open_unlocked(dir: &Path) -> Store {
            Store {
                dir: dir.to_owned(),
                generation: 0,
                snapshot_len: 0,
                _lock: None,
            }
        }
    }
}
