//! The source layout is the data-flow picture: no module imports one that
//! (through others) imports it back. This reads every `src/` file, takes
//! the `crate::…` paths outside test code (and outside test-only modules),
//! and fails naming the modules of any import cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("src/ readable") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/protocol/consensus/pbft.rs` → `consensus::pbft`; `src/edges/net.rs` → `net`.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?.with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts.first().is_some_and(|p| p == "bin") || parts == ["lib"] {
        return None; // the binary and the crate root sit above everything
    }
    Some(parts.join("::"))
}

/// The code outside `#[cfg(test)] mod tests { … }` (always a file's tail here).
fn non_test(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    }
}

/// Modules declared `#[cfg(test)]` (`mod sim;` and the like): test code.
fn test_only_modules(src: &Path, files: &[PathBuf]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for f in files {
        let parent = match f.file_name().and_then(|n| n.to_str()) {
            Some("lib.rs") => String::new(),
            Some("mod.rs") => module_of(src, f).unwrap_or_default(),
            _ => continue,
        };
        let text = std::fs::read_to_string(f).expect("readable");
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for w in lines.windows(2) {
            if w[0] == "#[cfg(test)]" {
                let decl = w[1].trim_start_matches("pub(crate) ").trim_start_matches("pub ");
                if let Some(name) = decl.strip_prefix("mod ").and_then(|d| d.strip_suffix(';')) {
                    out.insert(if parent.is_empty() { name.to_string() } else { format!("{parent}::{name}") });
                }
            }
        }
    }
    out
}

/// Every path named after `crate::` (a `{…}` group gives each of its items).
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let mut out = vec![];
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group, up to its closing brace.
            let (mut depth, mut item, mut end) = (0usize, String::new(), group.len());
            for (k, ch) in group.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        end = k;
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(segments(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    item.push(ch);
                }
            }
            out.push(segments(&item));
            rest = &group[end..];
        } else {
            out.push(segments(rest));
        }
    }
    out
}

fn segments(s: &str) -> Vec<String> {
    let path: String = s.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
    path.split("::").filter(|p| !p.is_empty()).map(str::to_string).collect()
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    impl<'a> T<'a> {
        fn visit(&mut self, v: &'a str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on.insert(v);
            for w in self.g.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let l = self.low[v].min(self.low[w]);
                    self.low.insert(v, l);
                } else if self.on.contains(w) {
                    let l = self.low[v].min(self.index[w]);
                    self.low.insert(v, l);
                }
            }
            if self.low[v] == self.index[v] {
                let mut comp = vec![];
                while let Some(w) = self.stack.pop() {
                    self.on.remove(w);
                    comp.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    self.out.push(comp);
                }
            }
        }
    }
    let mut t =
        T { g: graph, index: BTreeMap::new(), low: BTreeMap::new(), stack: vec![], on: BTreeSet::new(), out: vec![] };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out
}

fn import_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = vec![];
    rust_files(src, &mut files);
    let test_only = test_only_modules(src, &files);
    let is_test = |m: &str| test_only.iter().any(|t| m == t || m.starts_with(&format!("{t}::")));
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(src, f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(m) = module_of(src, f).filter(|m| !is_test(m)) else { continue };
        let text = std::fs::read_to_string(f).expect("readable");
        let deps = graph.entry(m.clone()).or_default();
        for path in crate_paths(non_test(&text)) {
            // The longest prefix that is a module: `crate::protocol::node::Output` → `node`.
            let target = (1..=path.len()).rev().map(|k| path[..k].join("::")).find(|p| modules.contains(p));
            if let Some(t) = target.filter(|t| *t != m && !is_test(t)) {
                deps.insert(t);
            }
        }
    }
    graph
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = import_graph(&src);
    assert!(graph.len() > 20 && graph.contains_key("protocol::consensus::pbft"), "modules found: {:?}", graph.keys());
    assert!(
        graph["protocol::node"].contains("protocol::consensus::pbft") && graph["runtime"].contains("protocol::node"),
        "edges found"
    );
    let found = cycles(&graph);
    assert!(found.is_empty(), "import cycles between modules (each set imports itself through the others): {found:?}");
}

/// The three folders are layers: the pure core (`protocol`) imports neither
/// the I/O edges nor the runtime, and the edges do not import the runtime.
#[test]
fn no_folder_imports_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = import_graph(&src);
    let layer =
        |m: &str| ["protocol", "edges", "runtime"].iter().position(|l| m == *l || m.starts_with(&format!("{l}::")));
    let mut upward = vec![];
    for (from, deps) in &graph {
        let Some(lf) = layer(from) else { continue };
        for to in deps {
            if layer(to).is_some_and(|lt| lt > lf) {
                upward.push(format!("{from} → {to}"));
            }
        }
    }
    assert!(graph.keys().all(|m| layer(m).is_some()), "a module outside the three folders: {:?}", graph.keys());
    assert!(upward.is_empty(), "imports of a folder above (protocol < edges < runtime): {upward:?}");
}

/// The checker itself finds a cycle when there is one.
#[test]
fn the_checker_reports_a_cycle() {
    let edge = |a: &str, b: &str| (a.to_string(), BTreeSet::from([b.to_string()]));
    let g = BTreeMap::from([edge("a", "b"), edge("b", "c"), edge("c", "a"), edge("d", "a")]);
    assert_eq!(cycles(&g), vec![vec!["a".to_string(), "b".to_string(), "c".to_string()]]);
    let paths =
        crate_paths("use crate::{node::Output, consensus::pbft::{Rid, Seq}};\nlet x = crate::edges::api::serve;");
    assert_eq!(paths, vec![vec!["node", "Output"], vec!["consensus", "pbft"], vec!["edges", "api", "serve"]]);
}
