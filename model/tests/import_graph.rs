//! The modules of `model/src` import each other without a cycle.
//!
//! A cycle between top-level modules (say `params` needing `engine` while `engine` needs
//! `params`) means neither can be read, tested or moved on its own; this test keeps the crate a
//! layered graph. It reads every file under `src/`, resolves each `crate::…` and `super::…` path
//! (in `use` items and inline paths alike) to the top-level module it names, and fails with the
//! cycle and the lines that make it. Comments and string literals are skipped, so a doc link
//! such as [`crate::engine`] is not a dependency.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One edge of the graph, with where it comes from for the failure message.
#[derive(Clone, Debug)]
struct Edge {
    to: String,
    file: String,
    line: usize,
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Semi,
    Other,
}

/// Tokens with their line numbers; comments, strings and char literals are dropped.
fn tokenize(src: &str) -> Vec<(Tok, usize)> {
    let b = src.as_bytes();
    let mut out = vec![];
    let (mut i, mut line) = (0, 1);
    while i < b.len() {
        let c = b[i];
        match c {
            b'\n' => {
                line += 1;
                i += 1;
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        if b[i] == b'\n' {
                            line += 1;
                        }
                        i += 1;
                    }
                }
            }
            b'r' if matches!(b.get(i + 1), Some(b'"') | Some(b'#')) => {
                // Raw string r"…" or r#"…"#: skip to the matching closing quote and hashes.
                let mut j = i + 1;
                let mut hashes = 0;
                while b.get(j) == Some(&b'#') {
                    hashes += 1;
                    j += 1;
                }
                if b.get(j) != Some(&b'"') {
                    out.push((Tok::Ident("r".into()), line));
                    i += 1;
                    continue;
                }
                j += 1;
                loop {
                    if j >= b.len() {
                        break;
                    }
                    if b[j] == b'\n' {
                        line += 1;
                    }
                    if b[j] == b'"' && b[j + 1..].iter().take(hashes).all(|&h| h == b'#') {
                        j += 1 + hashes;
                        break;
                    }
                    j += 1;
                }
                i = j;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    if i < b.len() && b[i] == b'\n' {
                        line += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'\'' => {
                // A char literal ('x', '\n', '\u{..}') or a lifetime ('a): a lifetime has no
                // closing quote right after its first character.
                if b.get(i + 1) == Some(&b'\\') {
                    i += 2;
                    while i < b.len() && b[i] != b'\'' {
                        i += 1;
                    }
                    i += 1;
                } else if b.get(i + 2) == Some(&b'\'') {
                    i += 3;
                } else {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                out.push((Tok::Ident(src[start..i].to_string()), line));
            }
            b':' if b.get(i + 1) == Some(&b':') => {
                out.push((Tok::PathSep, line));
                i += 2;
            }
            b'{' => {
                out.push((Tok::Open, line));
                i += 1;
            }
            b'}' => {
                out.push((Tok::Close, line));
                i += 1;
            }
            b',' => {
                out.push((Tok::Comma, line));
                i += 1;
            }
            b';' => {
                out.push((Tok::Semi, line));
                i += 1;
            }
            c if c.is_ascii_whitespace() => i += 1,
            _ => {
                out.push((Tok::Other, line));
                i += 1;
            }
        }
    }
    out
}

/// The module path of a file under `src/`: `engine/generate.rs` → `[engine, generate]`,
/// `engine/mod.rs` → `[engine]`, `lib.rs` → `[]`.
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts
}

/// The first identifier of each entry of a `{…}` group starting at `toks[at]` (the `{`).
fn group_heads(toks: &[(Tok, usize)], at: usize) -> Vec<String> {
    let mut heads = vec![];
    let mut depth = 0;
    let mut expect_head = true;
    for (t, _) in &toks[at..] {
        match t {
            Tok::Open => {
                depth += 1;
                if depth == 1 {
                    expect_head = true;
                }
            }
            Tok::Close => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            Tok::Comma if depth == 1 => expect_head = true,
            Tok::Ident(name) if depth == 1 && expect_head => {
                heads.push(name.clone());
                expect_head = false;
            }
            _ if depth == 1 => expect_head = false,
            _ => {}
        }
    }
    heads
}

/// Which top-level module each item re-exported by `lib.rs` comes from (`NemotronH` →
/// `nemotron_h`), so `crate::NemotronH` counts as a use of `nemotron_h`.
fn root_reexports(lib: &str, modules: &BTreeSet<String>) -> BTreeMap<String, String> {
    let toks = tokenize(lib);
    let mut map = BTreeMap::new();
    let mut i = 0;
    while i < toks.len() {
        if toks[i].0 == Tok::Ident("use".into())
            && let Some((Tok::Ident(m), _)) = toks.get(i + 1)
            && modules.contains(m)
        {
            let mut j = i + 2;
            while j < toks.len() && toks[j].0 != Tok::Semi {
                if let Tok::Ident(name) = &toks[j].0
                    && toks.get(j + 1).map(|t| &t.0) != Some(&Tok::PathSep)
                    && name != "as"
                    && name != "self"
                {
                    map.insert(name.clone(), m.clone());
                }
                j += 1;
            }
            i = j;
        }
        i += 1;
    }
    map
}

/// The edges of one file: every top-level module other than its own that it names.
fn file_edges(
    rel: &Path,
    src: &str,
    modules: &BTreeSet<String>,
    reexports: &BTreeMap<String, String>,
) -> Vec<Edge> {
    let file_mod = module_path(rel);
    let Some(own) = file_mod.first().cloned() else {
        // lib.rs declares and re-exports every module; it is the root, not a node.
        return vec![];
    };
    let toks = tokenize(src);
    let mut edges = vec![];
    // Inline `mod name { … }` blocks, with the brace depth at which each opened.
    let mut inline: Vec<(String, usize)> = vec![];
    let mut depth = 0usize;
    let resolve = |name: &str| -> Option<String> {
        if modules.contains(name) {
            Some(name.to_string())
        } else {
            reexports.get(name).cloned()
        }
    };
    let push = |names: Vec<String>, line: usize, edges: &mut Vec<Edge>| {
        for n in names {
            if let Some(m) = resolve(&n)
                && m != own
            {
                edges.push(Edge {
                    to: m,
                    file: rel.display().to_string(),
                    line,
                });
            }
        }
    };
    let mut i = 0;
    while i < toks.len() {
        let (tok, line) = &toks[i];
        match tok {
            Tok::Open => depth += 1,
            Tok::Close => {
                depth -= 1;
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            Tok::Ident(kw) if kw == "mod" => {
                if let (Some((Tok::Ident(name), _)), Some((Tok::Open, _))) =
                    (toks.get(i + 1), toks.get(i + 2))
                {
                    inline.push((name.clone(), depth));
                }
            }
            Tok::Ident(kw)
                if (kw == "crate" || kw == "super")
                    && toks.get(i + 1).map(|t| &t.0) == Some(&Tok::PathSep)
                    && (i == 0 || toks[i - 1].0 != Tok::PathSep) =>
            {
                // Where the path starts: the root for `crate`, else the current module with
                // one level dropped per `super`.
                let mut base: Vec<String> = if kw == "crate" {
                    vec![]
                } else {
                    let mut here = file_mod.clone();
                    here.extend(inline.iter().map(|(n, _)| n.clone()));
                    here.pop();
                    here
                };
                let mut j = i + 2;
                while let (Some((Tok::Ident(s), _)), Some((Tok::PathSep, _))) =
                    (toks.get(j), toks.get(j + 1))
                {
                    if s != "super" {
                        break;
                    }
                    base.pop();
                    j += 2;
                }
                if let Some(top) = base.first() {
                    push(vec![top.clone()], *line, &mut edges);
                } else {
                    match toks.get(j) {
                        Some((Tok::Ident(name), _)) => push(vec![name.clone()], *line, &mut edges),
                        Some((Tok::Open, _)) => push(group_heads(&toks, j), *line, &mut edges),
                        _ => {}
                    }
                }
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    edges
}

/// The module graph of the sources `files` (paths relative to `src/`).
fn graph_of(files: &[(PathBuf, String)]) -> BTreeMap<String, Vec<Edge>> {
    let modules: BTreeSet<String> = files
        .iter()
        .filter_map(|(p, _)| module_path(p).first().cloned())
        .collect();
    let lib = files
        .iter()
        .find(|(p, _)| p == Path::new("lib.rs"))
        .map(|(_, s)| s.as_str())
        .unwrap_or("");
    let reexports = root_reexports(lib, &modules);
    let mut graph: BTreeMap<String, Vec<Edge>> =
        modules.iter().map(|m| (m.clone(), vec![])).collect();
    for (p, src) in files {
        if let Some(own) = module_path(p).first() {
            let edges = file_edges(p, src, &modules, &reexports);
            graph.get_mut(own).expect("a known module").extend(edges);
        }
    }
    graph
}

/// A cycle as its edges in order, if the graph has one.
fn find_cycle(graph: &BTreeMap<String, Vec<Edge>>) -> Option<Vec<(String, Edge)>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnStack,
        Done,
    }
    fn visit(
        n: &str,
        graph: &BTreeMap<String, Vec<Edge>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<(String, Edge)>,
    ) -> Option<Vec<(String, Edge)>> {
        marks.insert(n.to_string(), Mark::OnStack);
        for e in &graph[n] {
            match marks[&e.to] {
                Mark::OnStack => {
                    stack.push((n.to_string(), e.clone()));
                    let start = stack
                        .iter()
                        .position(|(from, _)| *from == e.to)
                        .expect("the target is on the stack");
                    return Some(stack[start..].to_vec());
                }
                Mark::New => {
                    stack.push((n.to_string(), e.clone()));
                    if let Some(c) = visit(&e.to, graph, marks, stack) {
                        return Some(c);
                    }
                    stack.pop();
                }
                Mark::Done => {}
            }
        }
        marks.insert(n.to_string(), Mark::Done);
        None
    }
    let mut marks: BTreeMap<String, Mark> = graph.keys().map(|k| (k.clone(), Mark::New)).collect();
    for n in graph.keys() {
        if marks[n] == Mark::New
            && let Some(c) = visit(n, graph, &mut marks, &mut vec![])
        {
            return Some(c);
        }
    }
    None
}

fn describe(cycle: &[(String, Edge)]) -> String {
    let mut names: Vec<&str> = cycle.iter().map(|(from, _)| from.as_str()).collect();
    names.push(&cycle[0].0);
    let mut s = names.join(" -> ");
    for (from, e) in cycle {
        s.push_str(&format!("\n  {from} -> {}: {}:{}", e.to, e.file, e.line));
    }
    s
}

fn read_sources(dir: &Path, root: &Path, out: &mut Vec<(PathBuf, String)>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            read_sources(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(root).expect("under src/").to_path_buf();
            out.push((rel, std::fs::read_to_string(&path).expect("read a source")));
        }
    }
}

#[test]
fn model_src_imports_have_no_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    read_sources(&root, &root, &mut files);
    let graph = graph_of(&files);
    // The graph must see the crate's real dependencies, or an empty graph would pass.
    assert!(
        graph["engine"].iter().any(|e| e.to == "params"),
        "the engine builds from Params; the parser missed it: {graph:?}"
    );
    if let Some(c) = find_cycle(&graph) {
        panic!("model/src has an import cycle: {}", describe(&c));
    }
    // The names every module shares stay a leaf, so nothing can close a cycle through them.
    assert!(
        graph["layout"].is_empty(),
        "layout.rs must import nothing from the crate: {:?}",
        graph["layout"]
    );
}

fn sources(files: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
    files
        .iter()
        .map(|(p, s)| (PathBuf::from(p), s.to_string()))
        .collect()
}

#[test]
fn a_cycle_through_use_items_inline_paths_and_reexports_is_found() {
    let files = sources(&[
        (
            "lib.rs",
            "mod a; mod b; mod c;\npub use c::{Thing, other::More};",
        ),
        ("a.rs", "use crate::b::X;"),
        ("b/mod.rs", "mod inner;"),
        (
            "b/inner.rs",
            "fn f() { let _ = super::super::Thing::new(); }",
        ),
        ("c.rs", "fn g() -> crate::a::Y { todo!() }"),
    ]);
    let graph = graph_of(&files);
    let cycle = find_cycle(&graph).expect("a -> b -> c -> a");
    let text = describe(&cycle);
    assert!(text.starts_with("a -> b -> c -> a"), "{text}");
    assert!(text.contains("b/inner.rs:1"), "{text}");
}

#[test]
fn grouped_imports_count_and_comments_strings_and_tests_do_not() {
    let files = sources(&[
        ("lib.rs", "mod a; mod b;"),
        (
            "a.rs",
            "use crate::{b::X};\n/// See [`crate::b`].\nmod tests { use super::*; }",
        ),
        (
            "b.rs",
            "// crate::a::Z\nconst S: &str = \"crate::a::Z\";\nconst R: &str = r#\"crate::a\"#;\n\
             fn l<'x>(c: char) -> bool { c == '\"' }\nmod tests { use super::*; }",
        ),
    ]);
    let graph = graph_of(&files);
    assert_eq!(
        graph["a"].iter().map(|e| e.to.as_str()).collect::<Vec<_>>(),
        ["b"]
    );
    assert!(graph["b"].is_empty(), "{:?}", graph["b"]);
    assert!(find_cycle(&graph).is_none());
}
