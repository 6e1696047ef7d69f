//! SKELETON (issue 11 part 3): `--text-dir` — replaced by the writer of the text metrics dir.

use std::path::PathBuf;
use std::sync::Arc;

use crate::job::Job;

/// Keeps `dir` in step with the job's merged series until aborted.
pub async fn run(_job: Arc<Job>, _dir: PathBuf) {}
