//! Every Markdown file that a comment, script or document names exists in the repository, and
//! every `#section` anchor after it names a heading of that file: a reader who follows a module
//! header's "see docs/ARCHITECTURE.md#cache-tiers-and-keys" must land somewhere.
//!
//! A path resolves from the directory of the file that mentions it or from any directory above it
//! up to the repository root (so `docs/MODEL.md` works from `gateway/src/cache.rs`, and a link
//! inside `docs/` may name its neighbour alone); a bare file name also resolves when a file of that
//! name exists anywhere in the repository. Web addresses and shell-variable paths are not checked.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

/// Text files whose comments or prose may point at documents.
fn is_checked(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
    matches!(extension, "rs" | "md" | "sh" | "py" | "toml" | "yaml" | "yml" | "cu" | "proto" | "txt")
        || name.starts_with("Dockerfile")
        || path.parent().and_then(Path::file_name).is_some_and(|dir| dir == ".ci")
}

/// Every file of the repository: everything under the root except build output, installed npm
/// packages and hidden directories other than `.ci` and `.github` (virtual environments, caches,
/// git).
fn repository_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            let hidden = name.starts_with('.') && name != ".ci" && name != ".github";
            if !hidden && name != "target" && name != "node_modules" {
                repository_files(&path, out);
            }
        } else {
            out.push(path);
        }
    }
}

/// The files whose text is scanned: prose and code, not fixtures (data).
fn files_to_scan(files: &[PathBuf]) -> Vec<&PathBuf> {
    let fixtures = root().join("tests/fixtures");
    files.iter().filter(|f| is_checked(f) && !f.starts_with(&fixtures)).collect()
}

/// GitHub's anchor for a heading: lower case, punctuation other than `-` and `_` dropped, spaces
/// turned into `-`.
fn anchor_of(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown document's headings (outside fenced code blocks).
fn anchors(markdown: &str) -> Vec<String> {
    let mut in_code = false;
    let mut found = Vec::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            found.push(anchor_of(line.trim_start_matches('#')));
        }
    }
    found
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')
}

/// A document named in `text`: the path before `.md` and the anchor after it, if any.
#[derive(Debug, PartialEq)]
struct Mention {
    path: String,
    anchor: Option<String>,
    /// Headings named in quotes right after the file name (`, "Some heading"`).
    sections: Vec<String>,
}

/// The quoted heading names after a mention: `, "A"`, `, section "A"` or `, sections "A" and "B"`,
/// up to the closing parenthesis; a quote the line does not close is left out.
fn quoted_sections(after: &str) -> Vec<String> {
    let opening = ["", "section ", "sections "].iter().find_map(|s| after.strip_prefix(&format!(", {s}\"")));
    let Some(rest) = opening else { return Vec::new() };
    let mut sections = Vec::new();
    let mut name = String::new();
    let mut quoted = true;
    for c in rest.chars() {
        match (quoted, c) {
            (true, '"') => {
                sections.push(std::mem::take(&mut name));
                quoted = false;
            }
            (true, c) => name.push(c),
            (false, '"') => quoted = true,
            (false, ')') => break,
            (false, _) => {}
        }
    }
    sections
}

/// Where the text after the last character matching `stop` starts (0 when none matches).
fn after_last(text: &str, stop: impl Fn(char) -> bool) -> usize {
    text.char_indices().rev().find(|&(_, c)| stop(c)).map_or(0, |(i, c)| i + c.len_utf8())
}

/// Every Markdown file name (with an optional `#anchor`) in `text`, web addresses and paths built
/// from shell variables left out.
fn mentions(text: &str) -> Vec<Mention> {
    let mut found = Vec::new();
    for (at, _) in text.match_indices(".md") {
        let end = at + 3;
        let after = &text[end..];
        if after.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // `.mdx`, `.md_file`: not a Markdown name
        }
        let mut start = after_last(&text[..at], |c| !is_path_char(c));
        // `${DOC:-docs/X}`: the path starts after the dashes.
        while text[start..at].starts_with('-') {
            start += 1;
        }
        // The whole word around it, to tell web addresses (`https://…/README.md`) apart.
        let word_start = after_last(&text[..start], |c| {
            c.is_whitespace() || matches!(c, '(' | '<' | '`' | '"' | '\'' | '[')
        });
        let word = &text[word_start..end];
        let stem = &text[start..at];
        let web = word.contains("://") || word.starts_with("www.");
        if web || word.contains('$') || stem.is_empty() || stem.ends_with('/') {
            continue;
        }
        let anchor = after
            .strip_prefix('#')
            .map(|rest| rest.chars().take_while(|c| c.is_alphanumeric() || matches!(c, '-' | '_')).collect());
        let sections = quoted_sections(after);
        found.push(Mention { path: text[start..end].to_string(), anchor, sections });
    }
    found
}

/// What is wrong with a mention made by a file in `dir`, if anything; the file names
/// of the repository, `files`, resolve bare names.
fn problem(mention: &Mention, dir: &Path, root: &Path, files: &[PathBuf]) -> Option<String> {
    let relative = mention.path.trim_start_matches("./");
    let target = dir
        .ancestors()
        .take_while(|d| d.starts_with(root))
        .map(|d| d.join(relative))
        .find(|candidate| candidate.is_file())
        .or_else(|| {
            let bare = !relative.contains('/');
            bare.then(|| files.iter().find(|f| f.file_name().is_some_and(|n| n == relative)).cloned())
                .flatten()
        });
    let Some(target) = target else {
        return Some(format!("`{}` is not a file in the repository", mention.path));
    };
    let headings = anchors(&std::fs::read_to_string(&target).unwrap());
    if let Some(anchor) = &mention.anchor
        && !headings.contains(anchor)
    {
        return Some(format!("`{}#{anchor}`: no such heading (headings: {headings:?})", mention.path));
    }
    // A section may be named by its heading's leading words ("Quantized LLM" for "Quantized LLM
    // (`llm-worker quantize`)").
    let named = |name: &String| {
        let wanted = anchor_of(name);
        headings.iter().any(|h| *h == wanted || h.starts_with(&format!("{wanted}-")))
    };
    let missing: Vec<&String> = mention.sections.iter().filter(|s| !named(s)).collect();
    if !missing.is_empty() {
        return Some(format!("`{}`: no section named {missing:?} (headings: {headings:?})", mention.path));
    }
    None
}

#[test]
fn every_markdown_file_named_in_the_repository_exists() {
    let root = root();
    let mut files = Vec::new();
    repository_files(&root, &mut files);
    files.sort();
    let scanned = files_to_scan(&files);
    assert!(
        scanned.iter().any(|f| f.ends_with("README.md")),
        "scanned {} files, no README.md",
        scanned.len()
    );
    let mut broken = Vec::new();
    for file in scanned {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        for (number, line) in text.lines().enumerate() {
            for mention in mentions(line) {
                if let Some(problem) = problem(&mention, file.parent().unwrap(), &root, &files) {
                    let shown = file.strip_prefix(&root).unwrap().display();
                    broken.push(format!("{shown}:{}: {problem}", number + 1));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "{} references to documents that do not exist (point them at a heading of \
         docs/ARCHITECTURE.md or docs/MODEL.md, or say it inline):\n{}",
        broken.len(),
        broken.join("\n")
    );
}

#[test]
fn the_scanner_finds_names_and_anchors_and_skips_web_addresses() {
    // Names are assembled at run time so that this file itself holds no broken reference.
    let missing = format!("see docs/{}.{} and {}.{}#x", "nowhere", "md", "gone", "md");
    let found = mentions(&missing);
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(
        found[0],
        Mention { path: format!("docs/{}.{}", "nowhere", "md"), anchor: None, sections: vec![] }
    );
    assert_eq!(found[1].anchor.as_deref(), Some("x"));
    let skipped = format!(
        "<https://example.org/a/{}.{}>, a {}.{}x file, \"$OUT/e2e.{}\"",
        "README", "md", "b", "md", "md"
    );
    assert!(mentions(&skipped).is_empty(), "{:?}", mentions(&skipped));
    let defaulted = mentions(&format!("DOC=\"${{BENCH_DOC:-docs/BENCHMARKS.{}}}\"", "md"));
    assert!(defaulted.is_empty(), "a path built from a variable is not checked: {defaulted:?}");
    let after_unicode = mentions(&format!("→ docs/BENCHMARKS.{} (…/x.{})", "md", "md"));
    assert_eq!(after_unicode.len(), 2, "{after_unicode:?}");
    assert_eq!(after_unicode[1].path, format!("/x.{}", "md"));
    let dashed = mentions(&format!("--doc=-docs/BENCHMARKS.{}", "md"));
    assert_eq!(dashed[0].path, format!("docs/BENCHMARKS.{}", "md"));

    let root = root();
    let mut files = Vec::new();
    repository_files(&root, &mut files);
    let gateway_src = root.join("gateway/src");
    let readme = mentions(&format!("(README.{})", "md"));
    assert_eq!(problem(&readme[0], &gateway_src, &root, &files), None, "found from an ancestor");
    let nowhere = mentions(&found[0].path);
    assert!(problem(&nowhere[0], &gateway_src, &root, &files).is_some());
    let neighbour = mentions(&format!("[model](MODEL.{})", "md"));
    assert_eq!(problem(&neighbour[0], &root.join("docs"), &root, &files), None, "next to the file");
    let lowercase = mentions(&format!("see model.{}", "md"));
    assert!(problem(&lowercase[0], &gateway_src, &root, &files).is_some(), "names are case-sensitive");
    let bad_anchor = mentions(&format!("README.{}#no-such-heading-here", "md"));
    assert!(problem(&bad_anchor[0], &root, &root, &files).unwrap().contains("no such heading"));
    let good_anchor = mentions(&format!("README.{}#the-api", "md"));
    assert_eq!(problem(&good_anchor[0], &root, &root, &files), None);
    let named = mentions(&format!("(README.{}, sections \"The API\" and \"Layout\"): more", "md"));
    assert_eq!(named[0].sections, ["The API", "Layout"]);
    let leading = mentions(&format!("(README.{}, \"The\")", "md"));
    assert_eq!(problem(&leading[0], &root, &root, &files), None, "leading words of `The API`");
    let partial_word = mentions(&format!("(README.{}, \"The AP\")", "md"));
    assert!(problem(&partial_word[0], &root, &root, &files).is_some(), "whole words only");
    assert_eq!(problem(&named[0], &root, &root, &files), None);
    let misnamed = mentions(&format!("(README.{}, \"No such part\") and \"text\"", "md"));
    assert_eq!(misnamed[0].sections, ["No such part"], "quotes after the parenthesis are prose");
    assert!(problem(&misnamed[0], &root, &root, &files).unwrap().contains("no section named"));
    let unclosed = mentions(&format!("(README.{}, sections \"The API\" and \"Lay", "md"));
    assert_eq!(unclosed[0].sections, ["The API"], "a name the line does not close is left out");
    assert_eq!(anchor_of(" Cache tiers and keys (Redis, `memory`)"), "cache-tiers-and-keys-redis-memory");
}
