//! Which dead files have been folded into the archive, which of those folds are on disk, and which
//! files wait to be removed.
//!
//! The rule that keeps a full disk (or a crash) from losing a dead worker's totals: **a folded file
//! is removed only once an archive recording its fold has been saved durably.** Folding happens in
//! memory ([`Folds::record`]); the next [`Folds::save`] writes the archive (fsync'd file and
//! directory); only files whose ids that archive lists are removed ([`Folds::remove_saved`]).
//! While saves fail, the files stay where they are, are not read again (their values are in the
//! in-memory archive already), saves are retried at every pass, and each failure is counted and
//! logged.
//!
//! The archive lists the ids of folded files that may still exist, so a restart never folds one
//! twice. That list is pruned to files that are still in the directory, so it stays as small as
//! the number of files waiting for removal, however many workers have come and gone. The ids of
//! recently folded files are also kept in memory for a while (bounded), so that a copy of a folded
//! file put back into the directory is not folded again.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How many recently folded ids are remembered besides the ones the archive lists.
const RECENT: usize = 16_384;
/// While saves keep failing, at most one error line per this period.
const ERROR_LOG_PERIOD: Duration = Duration::from_secs(60);

/// Fold bookkeeping of one aggregator.
#[derive(Debug, Default)]
pub(super) struct Folds {
    /// Ids of folded files that may still exist; persisted in the archive.
    pending: BTreeSet<String>,
    /// Of `pending`, the ids an archive on disk records.
    saved: HashSet<String>,
    /// Folded files waiting for removal, by name in the directory: (id, path).
    doomed: HashMap<String, (String, PathBuf)>,
    /// Recently folded ids, oldest first, and the same as a set.
    recent: VecDeque<String>,
    recent_set: HashSet<String>,
    /// The in-memory archive has changes no saved archive holds yet.
    dirty: bool,
    /// The saved archive lists ids of files that are gone: the next upkeep pass saves a shorter
    /// list (but a shutdown need not).
    stale_list: bool,
    /// Saves that failed, since start.
    pub save_errors: u64,
    /// When saves started failing (None while they work), and when that was last logged.
    failing: Option<(Instant, u64, Instant)>,
}

impl Folds {
    /// Bookkeeping for an archive just loaded (its `folded` list is on disk by definition).
    pub fn loaded(folded: Vec<String>) -> Folds {
        let pending: BTreeSet<String> = folded.into_iter().collect();
        let saved = pending.iter().cloned().collect();
        Folds { pending, saved, ..Folds::default() }
    }

    /// Whether a file with this id was folded (by this aggregator or one before it).
    pub fn is_folded(&self, id: &str) -> bool {
        self.pending.contains(id) || self.recent_set.contains(id)
    }

    /// Whether `name` is a folded file waiting for removal (not to be opened again).
    pub fn is_doomed(&self, name: &str) -> bool {
        self.doomed.contains_key(name)
    }

    /// Files waiting for removal.
    pub fn doomed_count(&self) -> usize {
        self.doomed.len()
    }

    /// The ids to persist in the archive.
    pub fn pending(&self) -> Vec<String> {
        self.pending.iter().cloned().collect()
    }

    /// A file was just folded into the in-memory archive.
    pub fn record(&mut self, id: &str, name: &str, path: PathBuf) {
        self.pending.insert(id.to_string());
        if self.recent_set.insert(id.to_string()) {
            self.recent.push_back(id.to_string());
            while self.recent.len() > RECENT {
                if let Some(old) = self.recent.pop_front() {
                    self.recent_set.remove(&old);
                }
            }
        }
        self.doomed.insert(name.to_string(), (id.to_string(), path));
        self.dirty = true;
    }

    /// A file whose id was folded already is in the directory: remove it once an archive listing
    /// its id is on disk (at once if the loaded or last saved archive lists it; else after the
    /// next save, so that a crash before the removal cannot make a later aggregator fold it again).
    pub fn found(&mut self, id: &str, name: &str, path: PathBuf) {
        if self.pending.insert(id.to_string()) {
            self.dirty = true;
        }
        self.doomed.insert(name.to_string(), (id.to_string(), path));
    }

    /// Something the archive holds changed (not a fold: CPU of gone processes, say).
    pub fn touch(&mut self) {
        self.dirty = true;
    }

    /// Whether the in-memory archive has changes not yet on disk.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Saves the archive with `save` if anything changed (or its list of folded ids can shrink);
    /// counts and logs failures (retried at the next call).
    pub fn save(&mut self, save: impl FnOnce(&[String]) -> crate::Result<()>) {
        if !self.dirty && !self.stale_list {
            return;
        }
        let pending = self.pending();
        match save(&pending) {
            Ok(()) => {
                self.saved = pending.into_iter().collect();
                self.dirty = false;
                self.stale_list = false;
                if let Some((since, failures, _)) = self.failing.take() {
                    tracing::info!(
                        "the archive is saved again, after {failures} failed attempts over {:.0} s; \
                         the dead workers' files kept meanwhile are removed now",
                        since.elapsed().as_secs_f64()
                    );
                }
            }
            Err(e) => {
                self.save_errors += 1;
                let now = Instant::now();
                let (since, failures, logged) = self.failing.get_or_insert((now, 0, now));
                *failures += 1;
                if *failures == 1 || logged.elapsed() >= ERROR_LOG_PERIOD {
                    tracing::error!(
                        "cannot save the archive ({} failed attempts in {:.0} s, retried at every \
                         upkeep pass): {e}; dead workers' files are kept, and their totals with \
                         them, until it works",
                        *failures,
                        since.elapsed().as_secs_f64()
                    );
                    *logged = now;
                }
            }
        }
    }

    /// Removes the files waiting for removal whose fold a saved archive records.
    pub fn remove_saved(&mut self) {
        let ready: Vec<String> = self
            .doomed
            .iter()
            .filter(|(_, (id, _))| self.saved.contains(id))
            .map(|(n, _)| n.clone())
            .collect();
        for name in ready {
            let Some((id, path)) = self.doomed.get(&name).cloned() else { continue };
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    // Kept (and listed): retried at the next pass, never folded again.
                    tracing::warn!(file = %path.display(), "cannot remove a dead worker's file: {e}");
                    continue;
                }
            }
            self.doomed.remove(&name);
            self.pending.remove(&id);
            self.saved.remove(&id);
            // The next save drops the id from the archive's list: it stays as short as the files
            // actually waiting for removal.
            self.stale_list = true;
        }
    }

    /// Forgets files that are no longer in the directory (`present`: its names).
    pub fn prune(&mut self, present: &HashSet<&str>) {
        self.doomed.retain(|name, _| present.contains(name.as_str()));
        let doomed_ids: HashSet<&str> = self.doomed.values().map(|(id, _)| id.as_str()).collect();
        let mut gone = Vec::new();
        for id in &self.pending {
            if !doomed_ids.contains(id.as_str()) && !still_present(id, present) {
                gone.push(id.clone());
            }
        }
        for id in gone {
            self.pending.remove(&id);
            // The archive on disk still lists it: the next save writes the shorter list (else it
            // would wait for an unrelated change, and a restart after a crash keeps it long).
            if self.saved.remove(&id) {
                self.stale_list = true;
            }
        }
    }
}

/// Whether a folded id (a writer's file id, or `py:<name>:<inode>`) may still name a file among
/// `present`.
fn still_present(id: &str, present: &HashSet<&str>) -> bool {
    if let Some(rest) = id.strip_prefix("py:") {
        let name = rest.rsplit_once(':').map_or(rest, |(n, _)| n);
        return present.contains(format!("{}{name}", super::python::ASIDE_PREFIX).as_str())
            || present.contains(name);
    }
    let tail = format!("-{id}.shm");
    present.iter().any(|n| n.ends_with(tail.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_go_only_after_a_successful_save() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("w-1-aa.shm");
        std::fs::write(&p, b"x").unwrap();
        let mut f = Folds::default();
        f.record("aa", "w-1-aa.shm", p.clone());
        f.save(|_| Err(crate::Error::Corrupt("disk full".into())));
        f.remove_saved();
        assert!(p.exists(), "not removed while the save fails");
        assert_eq!((f.save_errors, f.is_dirty(), f.is_folded("aa")), (1, true, true));
        let mut listed = Vec::new();
        f.save(|ids| {
            listed = ids.to_vec();
            Ok(())
        });
        assert_eq!(listed, vec!["aa".to_string()]);
        f.remove_saved();
        assert!(!p.exists());
        assert!(f.pending().is_empty(), "a removed file's id is not persisted any more");
        assert!(f.stale_list && !f.is_dirty(), "the next pass writes the shorter list; a shutdown need not");
        assert!(f.is_folded("aa"), "but remembered for a while");
    }

    #[test]
    fn the_persisted_list_is_pruned_to_present_files() {
        let mut f = Folds::loaded(vec!["aa".into(), "bb".into(), "py:counter_1.db:7".into()]);
        let present: HashSet<&str> = ["w-3-bb.shm", ".compact-counter_1.db"].into_iter().collect();
        assert!(!f.stale_list);
        f.prune(&present);
        assert_eq!(f.pending(), vec!["bb".to_string(), "py:counter_1.db:7".to_string()]);
        assert!(f.stale_list, "the archive on disk lists aa: the next save shortens it");
    }
}
