//! The crate's module layering, read from the `use` lines of `src/`: the
//! wire protocol depends on nothing else of ours, the supernode's scheduler
//! and service don't reach into the node's mesh, and no two files import
//! each other. Runs as any user, in milliseconds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`["mesh", "session"]`) → the `use` paths its file imports,
/// resolved to absolute module paths inside the crate.
type Imports = BTreeMap<Vec<String>, BTreeSet<Vec<String>>>;

#[test]
fn the_protocol_depends_on_nothing_else_of_ours() {
    let imports = crate_imports();
    for (module, used) in imports
        .iter()
        .filter(|(m, _)| m.first().is_some_and(|s| s == "protocol"))
    {
        for target in used {
            assert_eq!(
                target[0],
                "protocol",
                "{} imports {}",
                module.join("::"),
                target.join("::")
            );
        }
    }
}

#[test]
fn scheduler_and_service_use_only_the_protocol_and_the_supernode() {
    let imports = crate_imports();
    let checked = ["scheduler", "service"];
    let mut seen = 0;
    for (module, used) in &imports {
        if module.len() < 2 || module[0] != "supernode" || !checked.contains(&module[1].as_str()) {
            continue;
        }
        seen += 1;
        for target in used {
            assert!(
                target[0] == "protocol" || target[0] == "supernode",
                "{} imports {}",
                module.join("::"),
                target.join("::")
            );
        }
    }
    assert!(
        seen >= checked.len(),
        "found only {seen} of the files to check"
    );
}

/// A `mod.rs` and its own children are one module split over files (the
/// parent re-exports, the children share its types), so only imports between
/// files of different modules count.
#[test]
fn no_two_files_import_each_other() {
    let imports = crate_imports();
    let mut cycles = Vec::new();
    for (module, used) in &imports {
        for target in used {
            let parent_and_child = target.len() == module.len() + 1 && target.starts_with(module);
            if !parent_and_child
                && module < target
                && imports
                    .get(target)
                    .is_some_and(|back| back.contains(module))
            {
                cycles.push(format!("{} <-> {}", module.join("::"), target.join("::")));
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "files that import each other: {cycles:#?}"
    );
}

/// Every library file's module and the modules it imports.
fn crate_imports() -> Imports {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    collect(&src, &src, &mut files);
    assert!(files.len() > 20, "found only {} source files", files.len());
    let modules: BTreeSet<Vec<String>> = files.keys().cloned().collect();
    files
        .iter()
        .map(|(module, text)| {
            let used = use_paths(text)
                .into_iter()
                .filter_map(|path| resolve(module, &path, &modules))
                .filter(|target| target != module)
                .collect();
            (module.clone(), used)
        })
        .collect()
}

/// Reads every `.rs` file under `dir` (binaries excluded) by module path.
fn collect(src: &Path, dir: &Path, files: &mut BTreeMap<Vec<String>, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path != src.join("bin") {
                collect(src, &path, files);
            }
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let relative = path.strip_prefix(src).unwrap().with_extension("");
        let mut module: Vec<String> = relative
            .iter()
            .map(|part| part.to_string_lossy().into_owned())
            .collect();
        if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
            module.pop();
        }
        files.insert(module, std::fs::read_to_string(&path).unwrap());
    }
}

/// The paths named by the file's own `use` items (not its inline test
/// module's, which start at the first `#[cfg(test)]`), braces expanded.
fn use_paths(text: &str) -> Vec<Vec<String>> {
    let own = text.split("#[cfg(test)]").next().unwrap_or_default();
    let mut paths = Vec::new();
    let mut rest = own;
    while let Some(start) = find_use(rest) {
        let item = &rest[start..];
        let end = item.find(';').expect("use item ends with ;");
        expand("", &item[..end], &mut paths);
        rest = &item[end..];
    }
    paths
        .into_iter()
        .map(|p| p.split("::").map(str::to_owned).collect())
        .collect()
}

/// Where the next `use` or `pub use` item's path starts.
fn find_use(text: &str) -> Option<usize> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        for keyword in ["use ", "pub use ", "pub(crate) use "] {
            if trimmed.starts_with(keyword) {
                return Some(offset + indent + keyword.len());
            }
        }
        offset += line.len();
    }
    None
}

/// Expands `a::{b, c::{d}}` under `prefix` into whole paths.
fn expand(prefix: &str, tree: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    let join = |tail: &str| {
        if prefix.is_empty() {
            tail.to_owned()
        } else {
            format!("{prefix}::{tail}")
        }
    };
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap_or(tree).trim();
        out.push(join(path));
        return;
    };
    let head = tree[..open].trim_end_matches("::");
    let inner = &tree[open + 1..tree.rfind('}').expect("balanced braces")];
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                expand(&join(head), &inner[start..i], out);
                start = i + 1;
            }
            _ => {}
        }
    }
    if !inner[start..].trim().is_empty() {
        expand(&join(head), &inner[start..], out);
    }
}

/// The crate module a path used from `module` lands in: the longest prefix
/// that is a source file. `None` for paths outside the crate.
fn resolve(
    module: &[String],
    path: &[String],
    modules: &BTreeSet<Vec<String>>,
) -> Option<Vec<String>> {
    let mut absolute: Vec<String> = match path.first().map(String::as_str) {
        Some("crate") => Vec::new(),
        Some("super") => module[..module.len().checked_sub(1)?].to_vec(),
        Some("self") => module.to_vec(),
        Some(first) if modules.contains(&[module, &[first.to_owned()]].concat()) => {
            let mut child = module.to_vec();
            child.push(first.to_owned());
            return longest_module(child, &path[1..], modules);
        }
        _ => return None,
    };
    let mut rest = &path[1..];
    while rest.first().is_some_and(|s| s == "super") {
        absolute.pop();
        rest = &rest[1..];
    }
    longest_module(absolute, rest, modules)
}

/// Extends `base` by the segments of `rest` while they name source files.
fn longest_module(
    mut base: Vec<String>,
    rest: &[String],
    modules: &BTreeSet<Vec<String>>,
) -> Option<Vec<String>> {
    for segment in rest {
        base.push(segment.clone());
        if !modules.contains(&base) {
            base.pop();
            break;
        }
    }
    (!base.is_empty()).then_some(base)
}
