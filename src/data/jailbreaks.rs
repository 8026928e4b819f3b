//! Jailbreak templates: PyRIT's single-prompt wrappers (role play, "DAN", instruction
//! suppression, prefix injection…) with the request at `{{ prompt }}`.
//!
//! Each template is one YAML file (`name:`, `value: >` and metadata). Only what the files use is
//! read: top-level `key: scalar` lines and block scalars (`>`/`|` with an optional chomping
//! indicator), folded and chomped as YAML 1.1 says; the slot is Jinja's `{{ prompt }}` (any
//! spacing) and nothing else of Jinja is accepted, so a template that would need a Jinja
//! renderer is an error rather than a silently different text. [`JailbreakTemplate::fill`]
//! gives the text PyRIT's `render_template_value(prompt=…)` gives (Jinja drops one trailing
//! newline); a golden file made with PyYAML and Jinja2 checks every template.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::{DataError, Result};

/// The asset holding the templates (`assets.toml`).
pub const TEMPLATES_ASSET: &str = "pyrit-jailbreak-templates";

/// One template, as read from its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailbreakTemplate {
    /// The file's stem (`aim` for aim.yaml): how a template is named on the command line.
    pub id: String,
    /// The template's own `name:`.
    pub name: String,
    /// The `value:` as YAML reads it, `{{ prompt }}` still in it.
    pub text: String,
}

impl JailbreakTemplate {
    /// Reads one template file's text (`path` names it in errors and gives the id).
    pub fn parse(path: &Path, yaml: &str) -> Result<Self> {
        let err = |message: String| DataError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let id = path
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| err("no file name".into()))?
            .to_owned();
        let (mut name, mut text) = (None, None);
        let lines: Vec<&str> = yaml.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            let line = lines[i];
            i += 1;
            if line.starts_with([' ', '\t', '#', '-']) || line.trim().is_empty() {
                // Document markers, comments, and the items or continuations of keys not read.
                continue;
            }
            let Some((key, rest)) = line.split_once(':') else {
                return Err(err(format!("line {i}: expected `key: value`")));
            };
            let rest = rest.trim();
            let value = if rest.starts_with(['>', '|']) {
                let (value, next) =
                    block_scalar(&lines, i, rest).map_err(|m| err(format!("line {i}: {m}")))?;
                i = next;
                value
            } else {
                inline_scalar(rest).map_err(|m| err(format!("line {i}: {m}")))?
            };
            match key {
                "name" => name = Some(value),
                "value" => text = Some(value),
                _ => {}
            }
        }
        let name = name.ok_or_else(|| err("no `name:`".into()))?;
        let text = text.ok_or_else(|| err("no `value:`".into()))?;
        check_jinja(&text).map_err(err)?;
        Ok(Self { id, name, text })
    }

    /// The template with `request` in its slot, as Jinja renders it (one trailing newline
    /// dropped; the request inserted verbatim, never read as a template itself).
    pub fn fill(&self, request: &str) -> String {
        let text = self.text.strip_suffix('\n').unwrap_or(&self.text);
        let mut out = String::with_capacity(text.len() + request.len());
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            // `parse` refuses any other `{{`; one in a hand-made template is kept as text.
            match slot_at(&rest[start..]) {
                Some(len) => {
                    out.push_str(request);
                    rest = &rest[start + len..];
                }
                None => {
                    out.push_str("{{");
                    rest = &rest[start + 2..];
                }
            }
        }
        out.push_str(rest);
        out
    }

    /// sha256 of the template's text: what a run records, so a changed file is noticed.
    pub fn sha256(&self) -> String {
        hex::encode(Sha256::digest(self.text.as_bytes()))
    }
}

/// Every template of the asset (fetched on first use), in file-name order.
pub fn load_jailbreak_templates() -> Result<Vec<JailbreakTemplate>> {
    let fetched = crate::assets::ensure_all(TEMPLATES_ASSET)?;
    let mut out = Vec::with_capacity(fetched.files.len());
    for path in &fetched.files {
        let yaml = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            path: path.clone(),
            source,
        })?;
        out.push(JailbreakTemplate::parse(path, &yaml)?);
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// The templates `ids` names, in that order; an unknown id is an error listing the known ones.
pub fn select_templates(
    all: &[JailbreakTemplate],
    ids: &[String],
) -> Result<Vec<JailbreakTemplate>> {
    ids.iter()
        .map(|id| {
            all.iter()
                .find(|t| &t.id == id)
                .cloned()
                .ok_or_else(|| DataError::UnknownTemplate {
                    id: id.clone(),
                    known: all
                        .iter()
                        .map(|t| t.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        })
        .collect()
}

/// `k` templates drawn with `seed`: ordered by the sha256 of the seed and the template's id, so a
/// seed draws the same templates whatever order they come in.
pub fn sample_templates(
    all: &[JailbreakTemplate],
    k: usize,
    seed: u64,
) -> Result<Vec<JailbreakTemplate>> {
    if k == 0 || k > all.len() {
        return Err(DataError::TemplateDraw {
            k,
            available: all.len(),
        });
    }
    let mut drawn = all.to_vec();
    drawn.sort_by_cached_key(|t| Sha256::digest(format!("{seed}\0{}", t.id).as_bytes()).to_vec());
    drawn.truncate(k);
    Ok(drawn)
}

/// `{{ prompt }}` (any whitespace inside the braces) at the start of `s`: its length.
fn slot_at(s: &str) -> Option<usize> {
    let inner = s.strip_prefix("{{")?;
    let end = inner.find("}}")?;
    (inner[..end].trim() == "prompt").then_some(2 + end + 2)
}

/// A template must hold the slot and no other Jinja syntax (which fill would not render).
fn check_jinja(text: &str) -> std::result::Result<(), String> {
    let mut slots = 0;
    let mut rest = text;
    while let Some(start) = rest.find('{') {
        let tail = &rest[start..];
        if tail.starts_with("{{") {
            let len = slot_at(tail).ok_or_else(|| {
                format!(
                    "a Jinja expression other than {{{{ prompt }}}}: {:?}",
                    tail.chars().take(40).collect::<String>()
                )
            })?;
            slots += 1;
            rest = &tail[len..];
        } else if tail.starts_with("{%") || tail.starts_with("{#") {
            return Err(format!(
                "Jinja statements and comments are not supported: {:?}",
                tail.chars().take(40).collect::<String>()
            ));
        } else {
            rest = &tail[1..];
        }
    }
    if slots == 0 {
        return Err("the template has no {{ prompt }} slot".into());
    }
    Ok(())
}

/// A one-line scalar: plain, 'single-quoted' ('' is a quote) or "double-quoted" (\" \\ \n \t).
fn inline_scalar(s: &str) -> std::result::Result<String, String> {
    if let Some(inner) = s.strip_prefix('\'') {
        let inner = inner
            .strip_suffix('\'')
            .ok_or("a single-quoted scalar that does not end on its line")?;
        return Ok(inner.replace("''", "'"));
    }
    if let Some(inner) = s.strip_prefix('"') {
        let inner = inner
            .strip_suffix('"')
            .ok_or("a double-quoted scalar that does not end on its line")?;
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(c @ ('"' | '\\' | '/')) => out.push(c),
                other => return Err(format!("an escape this reader does not know: \\{other:?}")),
            }
        }
        return Ok(out);
    }
    // A plain scalar ends at a comment.
    Ok(s.split(" #").next().unwrap_or("").trim_end().to_owned())
}

/// A block scalar starting on `lines[start]` under a key at column 0 whose header (`>`, `|-`,
/// `>+`…) is `header`. Returns the value and the index of the first line after it.
fn block_scalar(
    lines: &[&str],
    start: usize,
    header: &str,
) -> std::result::Result<(String, usize), String> {
    let header = header.split(" #").next().unwrap_or("").trim_end();
    let mut chars = header.chars();
    let folded = chars.next() == Some('>');
    let chomp = match chars.as_str() {
        "" => Chomp::Clip,
        "-" => Chomp::Strip,
        "+" => Chomp::Keep,
        other => {
            return Err(format!(
                "a block scalar header this reader does not know: {other:?}"
            ))
        }
    };
    let indent_of = |l: &str| l.len() - l.trim_start_matches(' ').len();
    let is_empty = |l: &str| l.trim().is_empty();
    // The content's indentation is the first non-empty line's; the scalar ends at a non-empty
    // line indented less.
    let indent = lines[start..]
        .iter()
        .find(|l| !is_empty(l))
        .map(|l| indent_of(l))
        .unwrap_or(0);
    if indent == 0 {
        return Err("an empty or unindented block scalar".into());
    }
    let mut end = start;
    while end < lines.len() && (is_empty(lines[end]) || indent_of(lines[end]) >= indent) {
        end += 1;
    }
    let body = &lines[start..end];
    // Trailing empty lines belong to the chomping, not the content.
    let content_end = body.iter().rposition(|l| !is_empty(l)).map_or(0, |p| p + 1);
    let trailing = body.len() - content_end;
    let mut out = String::new();
    let mut previous: Option<bool> = None; // Some(more_indented) of the last content line
    let mut empties = 0;
    for line in &body[..content_end] {
        if is_empty(line) {
            empties += 1;
            continue;
        }
        let content = &line[indent..];
        let more_indented = content.starts_with([' ', '\t']);
        match previous {
            // Folding: one line break between two ordinary lines becomes a space; each empty
            // line between them stays a line break. Around a more-indented line nothing folds.
            Some(false) if folded && !more_indented && empties == 0 => out.push(' '),
            Some(prev_more) if folded && !prev_more && !more_indented => {
                out.push_str(&"\n".repeat(empties))
            }
            Some(_) => out.push_str(&"\n".repeat(empties + 1)),
            None => out.push_str(&"\n".repeat(empties)),
        }
        out.push_str(content);
        previous = Some(more_indented);
        empties = 0;
    }
    match chomp {
        Chomp::Strip => {}
        Chomp::Clip if !out.is_empty() => out.push('\n'),
        Chomp::Clip => {}
        Chomp::Keep => out.push_str(&"\n".repeat(1 + trailing)),
    }
    Ok((out, end))
}

#[derive(Debug, Clone, Copy)]
enum Chomp {
    Clip,
    Strip,
    Keep,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<JailbreakTemplate> {
        JailbreakTemplate::parse(Path::new("/t/some_name.yaml"), yaml)
    }

    #[test]
    fn folded_value_joins_lines_and_keeps_paragraphs() {
        let t = parse(
            "---\nname: Some name\nauthors:\n  - A\nvalue: >\n  First line\n  goes on.\n\n  Second\n  paragraph:\n\n\n  {{ prompt }}\nnext: x\n",
        )
        .unwrap();
        assert_eq!(t.id, "some_name");
        assert_eq!(t.name, "Some name");
        assert_eq!(
            t.text,
            "First line goes on.\nSecond paragraph:\n\n{{ prompt }}\n"
        );
        assert_eq!(t.fill("Q?"), "First line goes on.\nSecond paragraph:\n\nQ?");
    }

    #[test]
    fn more_indented_lines_keep_their_breaks_and_literal_blocks_keep_all() {
        let t = parse("name: n\nvalue: >\n  a\n    code\n  b\n  c {{prompt}}\n").unwrap();
        assert_eq!(t.text, "a\n  code\nb c {{prompt}}\n");
        let t = parse("name: n\nvalue: |-\n  a\n  b {{ prompt }}\n\n").unwrap();
        assert_eq!(t.text, "a\nb {{ prompt }}");
        let t = parse("name: n\nvalue: >+\n  {{ prompt }}\n\n").unwrap();
        assert_eq!(t.text, "{{ prompt }}\n\n");
    }

    #[test]
    fn the_request_is_inserted_verbatim_at_every_slot() {
        let t = parse("name: 'It''s'\nvalue: >\n  [{{ prompt }}] and [{{prompt}}]\n").unwrap();
        assert_eq!(t.name, "It's");
        assert_eq!(
            t.fill("{{ prompt }} \\n"),
            "[{{ prompt }} \\n] and [{{ prompt }} \\n]"
        );
    }

    #[test]
    fn templates_this_reader_cannot_render_are_errors() {
        for (yaml, want) in [
            ("name: n\nvalue: >\n  no slot\n", "no {{ prompt }} slot"),
            ("name: n\nvalue: >\n  {{ other }}\n", "other than"),
            (
                "name: n\nvalue: >\n  {% raw %}x{% endraw %}{{ prompt }}\n",
                "not supported",
            ),
            ("value: >\n  {{ prompt }}\n", "no `name:`"),
            ("name: n\n", "no `value:`"),
            ("name: n\nvalue: >\n{{ prompt }}\n", "unindented"),
            ("name: n\nvalue: >2\n  {{ prompt }}\n", "header"),
            ("name: 'n\nvalue: >\n  {{ prompt }}\n", "single-quoted"),
            ("just text\n", "key: value"),
        ] {
            let e = parse(yaml).unwrap_err().to_string();
            assert!(e.contains(want), "{yaml:?}: {e}");
            assert!(e.contains("some_name.yaml"), "{e}");
        }
    }

    #[test]
    fn select_names_the_known_templates_when_one_is_unknown() {
        let all = vec![parse("name: n\nvalue: >\n  {{ prompt }}\n").unwrap()];
        assert_eq!(
            select_templates(&all, &["some_name".into()]).unwrap().len(),
            1
        );
        let e = select_templates(&all, &["nope".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"nope\"") && e.contains("some_name"), "{e}");
    }
}
