//! Which paths take part in a sync: `.gitignore` semantics (nested files, negation, anchoring,
//! `.git/info/exclude`, the global excludes file) through the `ignore` crate, plus
//! `.devsyncignore` files (same syntax, always honoured) and `--exclude` patterns.
//!
//! Both peers apply the same options: the sender to choose what to send, the receiver to know
//! which of its own entries are excluded and therefore protected from `--delete`.

use std::path::Path;

use ignore::WalkBuilder;
use ignore::overrides::OverrideBuilder;
use serde::{Deserialize, Serialize};

/// Per-directory ignore file read in addition to (or, with `--no-gitignore`, instead of)
/// `.gitignore`.
pub const DEVSYNC_IGNORE: &str = ".devsyncignore";
/// Version-control metadata directories excluded by `--exclude-vcs`.
pub const VCS_DIRS: &[&str] = &[".git", ".hg", ".svn", ".jj", ".bzr", "_darcs", "CVS"];

#[cfg_attr(test, derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterOptions {
    /// Honour `.gitignore`, `.git/info/exclude` and git's global excludes file.
    pub gitignore: bool,
    /// Leave version-control directories (`.git/` …) out of the sync.
    pub exclude_vcs: bool,
    /// Extra gitignore-style patterns to exclude (`--exclude`).
    pub excludes: Vec<String>,
}

impl Default for FilterOptions {
    fn default() -> Self {
        FilterOptions {
            gitignore: true,
            exclude_vcs: false,
            excludes: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("invalid --exclude pattern {pattern:?}: {source}")]
    BadPattern {
        pattern: String,
        source: ignore::Error,
    },
}

/// Limits peers can send; far above anything typed on a command line.
pub const MAX_EXCLUDES: usize = 10_000;
pub const MAX_PATTERN_LEN: usize = 4096;

impl FilterOptions {
    /// A configured walker rooted at `root` (not yet started).
    pub fn walker(&self, root: &Path) -> Result<WalkBuilder, FilterError> {
        let mut overrides = OverrideBuilder::new(root);
        let vcs = if self.exclude_vcs { VCS_DIRS } else { &[] };
        let patterns = self
            .excludes
            .iter()
            .map(String::as_str)
            .chain(vcs.iter().copied());
        for pattern in patterns {
            // An override glob whitelists; with a leading '!' it excludes, like `--exclude`.
            overrides
                .add(&format!("!{pattern}"))
                .map_err(|source| FilterError::BadPattern {
                    pattern: pattern.to_string(),
                    source,
                })?;
        }
        let overrides = overrides
            .build()
            .map_err(|source| FilterError::BadPattern {
                pattern: self.excludes.join(" "),
                source,
            })?;
        let mut b = WalkBuilder::new(root);
        b.standard_filters(false)
            .hidden(false)
            .follow_links(false)
            .git_ignore(self.gitignore)
            .git_exclude(self.gitignore)
            .git_global(self.gitignore)
            .require_git(false)
            .parents(true)
            .ignore(false)
            .add_custom_ignore_filename(DEVSYNC_IGNORE)
            .overrides(overrides)
            // devsync's own temp and partial files are never synced (a user's file that only
            // looks like one is: see `tempname`).
            .filter_entry(|e| super::tempname::ours(e.file_name().as_encoded_bytes()).is_none());
        Ok(b)
    }
}
