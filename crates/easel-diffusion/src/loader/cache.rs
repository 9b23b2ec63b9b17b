//! The Hugging Face hub cache, as `huggingface_hub` lays it out:
//!
//! ```text
//! <cache>/models--<org>--<name>/
//!     refs/<revision>            a file holding a commit hash (refs/main, refs/pr/1, ...)
//!     snapshots/<commit>/...     the repository's files at that commit (symlinks into blobs/)
//!     blobs/<etag>               the file contents
//! ```
//!
//! where `<cache>` is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// The hub cache folder from the environment, as `huggingface_hub.constants`
/// computes it (`HF_HUB_CACHE`, its legacy name `HUGGINGFACE_HUB_CACHE`,
/// `HF_HOME`, `XDG_CACHE_HOME`, then `~/.cache/huggingface/hub`); `None`
/// when not even a home folder is known.
pub(crate) fn hub_cache_from_env(env: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return Some(expand_home(&dir, &env));
    }
    Some(hf_home_from_env(&env)?.join("hub"))
}

/// `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub(crate) fn hf_home_from_env(env: &impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
    if let Some(home) = var("HF_HOME") {
        return Some(expand_home(&home, env));
    }
    if let Some(xdg) = var("XDG_CACHE_HOME") {
        return Some(expand_home(&xdg, env).join("huggingface"));
    }
    Some(home_dir(env)?.join(".cache").join("huggingface"))
}

fn home_dir(env: &impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    env("HOME")
        .or_else(|| env("USERPROFILE"))
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `~/x` → `$HOME/x`, as Python's `os.path.expanduser` does for these variables.
fn expand_home(path: &str, env: &impl Fn(&str) -> Option<String>) -> PathBuf {
    match path.strip_prefix("~/") {
        Some(rest) => match home_dir(env) {
            Some(home) => home.join(rest),
            None => PathBuf::from(path),
        },
        None if path == "~" => home_dir(env).unwrap_or_else(|| PathBuf::from(path)),
        None => PathBuf::from(path),
    }
}

/// `models--org--name`, the cache folder of a model repo.
pub(crate) fn repo_folder_name(repo_id: &str) -> String {
    format!("models--{}", repo_id.replace('/', "--"))
}

/// The repo id of a cache folder name (`models--org--name` → `org/name`).
pub(crate) fn repo_id_of_folder(folder: &str) -> Option<String> {
    let rest = folder.strip_prefix("models--")?;
    Some(rest.replace("--", "/"))
}

/// Whether `s` is a full commit hash (40 hex digits).
pub(crate) fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A cached snapshot of a repo at a revision.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub(crate) path: PathBuf,
    pub(crate) commit: String,
}

/// Finds the snapshot of `repo_id` at `revision` in `cache`: through
/// `refs/<revision>`, or directly `snapshots/<revision>` when the revision
/// is a commit hash (as `huggingface_hub`'s `try_to_load_from_cache` does).
/// `None` when it is not there or has no `model_index.json`.
pub(crate) fn find_snapshot(cache: &Path, repo_id: &str, revision: &str) -> Option<Snapshot> {
    let repo = cache.join(repo_folder_name(repo_id));
    let commit = match std::fs::read_to_string(ref_path(&repo, revision)) {
        Ok(commit) => commit.trim().to_string(),
        Err(_) if is_commit_hash(revision) => revision.to_string(),
        Err(_) => return None,
    };
    if commit.is_empty() || !super::weights::is_plain_file_name(&commit) {
        return None;
    }
    let path = repo.join("snapshots").join(&commit);
    path.join("model_index.json")
        .is_file()
        .then_some(Snapshot { path, commit })
}

/// `refs/<revision>` of a repo folder (a revision may contain `/`, e.g. `refs/pr/1`).
pub(crate) fn ref_path(repo: &Path, revision: &str) -> PathBuf {
    let mut path = repo.join("refs");
    for part in revision.split('/') {
        path.push(part);
    }
    path
}

/// A snapshot found by scanning the cache.
#[derive(Debug, Clone)]
pub(crate) struct ScannedSnapshot {
    pub(crate) repo_id: String,
    pub(crate) commit: String,
    /// The refs pointing at it (`main`, `v1.0`, `refs/pr/1`), sorted.
    pub(crate) refs: Vec<String>,
    pub(crate) path: PathBuf,
}

/// Every model snapshot in the cache that has a `model_index.json`.
pub(crate) fn scan(cache: &Path) -> Vec<ScannedSnapshot> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(cache) else {
        return out;
    };
    let mut repos: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            Some((repo_id_of_folder(&name)?, e.path()))
        })
        .collect();
    repos.sort();
    for (repo_id, repo) in repos {
        let mut refs: BTreeMap<String, Vec<String>> = BTreeMap::new();
        collect_refs(&repo.join("refs"), String::new(), &mut refs, 0);
        let Ok(snapshots) = std::fs::read_dir(repo.join("snapshots")) else {
            continue;
        };
        let mut snapshots: Vec<(String, PathBuf)> = snapshots
            .flatten()
            .filter_map(|e| Some((e.file_name().to_str()?.to_string(), e.path())))
            .filter(|(_, p)| p.join("model_index.json").is_file())
            .collect();
        snapshots.sort();
        for (commit, path) in snapshots {
            let mut names = refs.get(&commit).cloned().unwrap_or_default();
            names.sort();
            out.push(ScannedSnapshot {
                repo_id: repo_id.clone(),
                commit,
                refs: names,
                path,
            });
        }
    }
    out
}

/// Reads `refs/` recursively into commit → ref names. A ref named as its own
/// commit (written by some downloaders) is not a name worth showing.
fn collect_refs(dir: &Path, prefix: String, out: &mut BTreeMap<String, Vec<String>>, depth: usize) {
    if depth > 8 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let full = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let path = entry.path();
        if path.is_dir() {
            collect_refs(&path, full, out, depth + 1);
        } else if let Ok(commit) = std::fs::read_to_string(&path) {
            let commit = commit.trim().to_string();
            if commit != full {
                out.entry(commit).or_default().push(full);
            }
        }
    }
}

/// The bytes on disk of a folder's files, following file symlinks (into
/// `blobs/`) and counting each target once; folder symlinks are not followed.
pub(crate) fn size_on_disk(root: &Path) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            if file_type.is_dir() {
                stack.push(path);
            } else if let Ok(meta) = std::fs::metadata(&path) {
                if meta.is_file() {
                    let key = std::fs::canonicalize(&path).unwrap_or(path);
                    if seen.insert(key) {
                        total += meta.len();
                    }
                }
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn cache_location_follows_huggingface_hub() {
        let home = [("HOME", "/home/u")];
        assert_eq!(
            hub_cache_from_env(env(&home)),
            Some(PathBuf::from("/home/u/.cache/huggingface/hub"))
        );
        assert_eq!(
            hub_cache_from_env(env(&[("HOME", "/home/u"), ("HF_HOME", "/data/hf")])),
            Some(PathBuf::from("/data/hf/hub"))
        );
        assert_eq!(
            hub_cache_from_env(env(&[
                ("HOME", "/home/u"),
                ("HF_HOME", "/data/hf"),
                ("HF_HUB_CACHE", "~/hub")
            ])),
            Some(PathBuf::from("/home/u/hub"))
        );
        assert_eq!(
            hub_cache_from_env(env(&[("HOME", "/h"), ("HUGGINGFACE_HUB_CACHE", "/old")])),
            Some(PathBuf::from("/old"))
        );
        assert_eq!(
            hub_cache_from_env(env(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/xdg")])),
            Some(PathBuf::from("/xdg/huggingface/hub"))
        );
        assert_eq!(hub_cache_from_env(env(&[])), None);
        // Empty variables count as unset.
        assert_eq!(
            hub_cache_from_env(env(&[("HOME", "/h"), ("HF_HUB_CACHE", "")])),
            Some(PathBuf::from("/h/.cache/huggingface/hub"))
        );
    }

    #[test]
    fn folder_names() {
        assert_eq!(
            repo_folder_name("stabilityai/stable-diffusion-xl-base-1.0"),
            "models--stabilityai--stable-diffusion-xl-base-1.0"
        );
        assert_eq!(
            repo_id_of_folder("models--black-forest-labs--FLUX.1-dev").as_deref(),
            Some("black-forest-labs/FLUX.1-dev")
        );
        assert_eq!(repo_id_of_folder("datasets--a--b"), None);
        assert!(is_commit_hash("1d0c4ebf6ff58a5caecab40fa1406526bca4b5b9"));
        assert!(!is_commit_hash("main"));
    }
}
