//! The server's source layout (issue 13): no two files import each other,
//! and nothing outside `routes/` imports a route module.
//!
//! "Imports" means any `crate::...` or `super::...` path in code (comments
//! are skipped), mapped to the file that defines the module it names; the
//! crate root's re-exports (`crate::AppState`, `crate::JobEvent`, ...) count
//! as imports of the file that defines them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Root re-exports of `lib.rs` and the module that defines each.
const ROOT_REEXPORTS: &[(&str, &str)] = &[
    ("AppState", "state"),
    ("StartError", "state"),
    ("JobEvent", "job"),
    ("ApiError", "error"),
    ("Config", "config"),
    ("serve_on", "listener"),
];

/// The circles the layout keeps: opening the state starts the background
/// tasks (the worker thread, the webhook dispatcher), which then work on
/// the state. Anything else is new.
const ALLOWED: &[(&str, &str)] = &[("state", "worker"), ("state", "webhooks")];

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/routes/mod.rs` -> `routes`, `src/store/jobs.rs` -> `store::jobs`,
/// `src/lib.rs` -> `` (the root).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts.join("::")
}

/// The code of `text` without `//` comments (line and doc comments).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            // Keep `//` inside strings such as "http://...".
            Some(i) if l[..i].matches('"').count() % 2 == 0 => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Paths (`a::b::c`) named after each `prefix` (`crate::`, `super::`),
/// with `prefix{a, b::c}` groups expanded one level.
fn paths_after(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let item = item.trim().trim_start_matches('{');
                if !item.is_empty() {
                    out.push(path_at(item));
                }
            }
        } else {
            out.push(path_at(rest));
        }
    }
    out
}

fn path_at(text: &str) -> String {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(text.len());
    text[..end].trim_end_matches(':').to_string()
}

/// The module (of `modules`) that `path` names: its longest module prefix,
/// the defining module of a root re-export, or `base` itself for an item
/// of `base`.
fn target(path: &str, base: &str, modules: &BTreeSet<String>) -> Option<String> {
    let parts: Vec<&str> = path.split("::").collect();
    if base.is_empty() {
        if let Some((_, m)) = ROOT_REEXPORTS.iter().find(|(n, _)| *n == parts[0]) {
            return Some(m.to_string());
        }
    }
    let found = (1..=parts.len()).rev().find_map(|k| {
        let joined = parts[..k].join("::");
        let candidate = if base.is_empty() {
            joined
        } else {
            format!("{base}::{joined}")
        };
        modules.contains(&candidate).then_some(candidate)
    });
    // `super::item`: an item of the parent module itself.
    found.or_else(|| (!base.is_empty()).then(|| base.to_string()))
}

fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut graph = BTreeMap::new();
    for file in &files {
        let module = module_of(&src, file);
        let text = code(&std::fs::read_to_string(file).unwrap());
        let parent = module.rsplit_once("::").map_or("", |(p, _)| p).to_string();
        let mut deps = BTreeSet::new();
        for path in paths_after(&text, "crate::") {
            deps.extend(target(&path, "", &modules));
        }
        for path in paths_after(&text, "super::") {
            deps.extend(target(&path, &parent, &modules));
        }
        deps.remove(&module);
        deps.remove("");
        graph.insert(module, deps);
    }
    graph
}

#[test]
fn no_two_server_files_import_each_other() {
    let graph = imports();
    // The scan must see the imports it is about (else it proves nothing).
    assert!(graph["routes::generations"].contains("jobs"), "{graph:?}");
    assert!(graph["worker"].contains("jobs"), "{graph:?}");
    assert!(graph["state"].contains("worker"), "{graph:?}");
    let mut circles = Vec::new();
    for (a, deps) in &graph {
        for b in deps {
            let allowed = ALLOWED.contains(&(a.as_str(), b.as_str()))
                || ALLOWED.contains(&(b.as_str(), a.as_str()));
            if a < b && graph.get(b).is_some_and(|d| d.contains(a)) && !allowed {
                circles.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(circles.is_empty(), "import circles: {circles:?}");
}

#[test]
fn only_the_crate_root_imports_the_routes() {
    let graph = imports();
    let outside: Vec<_> = graph
        .iter()
        .filter(|(m, _)| !m.is_empty() && !m.starts_with("routes"))
        .filter(|(_, deps)| deps.iter().any(|d| d.starts_with("routes")))
        .map(|(m, _)| m.clone())
        .collect();
    assert!(outside.is_empty(), "import route modules: {outside:?}");
}
