//! Where in the plan file a problem is: field paths (`rule[2].match.ctx`),
//! byte spans to `line:column`, and the path of the value a span falls in.
//!
//! The TOML document is parsed once more into `toml`'s spanned tree
//! ([`DeTable`]) for this; plans are small, so the cost does not matter.

use std::fmt;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One step of a [`FieldPath`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// The path of a field from the plan's root, e.g. `rule[0].match.fence.to`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath(Vec<Seg>);

impl FieldPath {
    pub fn root() -> Self {
        FieldPath(Vec::new())
    }

    pub fn key(&self, key: &str) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Key(key.to_string()));
        p
    }

    pub fn index(&self, i: usize) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }

    pub fn segments(&self) -> &[Seg] {
        &self.0
    }

    /// The rule this path is inside (`rule[i]…`), if any.
    pub fn rule_index(&self) -> Option<usize> {
        match self.0.as_slice() {
            [Seg::Key(k), Seg::Index(i), ..] if k == "rule" => Some(*i),
            _ => None,
        }
    }

    /// The path as a user reads it: inside a rule, the rule by name and the
    /// rest relative to it (`rule "slow tail": match.probability`).
    pub fn describe(&self, rule_name: impl Fn(usize) -> Option<String>) -> String {
        match self.rule_index() {
            Some(i) => {
                let rule = match rule_name(i) {
                    Some(name) => format!("rule {name:?}"),
                    None => format!("rule #{}", i + 1),
                };
                let rest = FieldPath(self.0[2..].to_vec());
                if rest.0.is_empty() {
                    rule
                } else {
                    format!("{rule}: {rest}")
                }
            }
            None => self.to_string(),
        }
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if n == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(i) => write!(f, "[{i}]")?,
            }
        }
        Ok(())
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = floor_char_boundary(text, offset.min(text.len()));
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    while offset > 0 && !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

/// The spanned tree of a TOML document, for mapping paths and spans.
pub struct SourceMap<'a> {
    text: &'a str,
    root: Option<Spanned<DeTable<'a>>>,
}

impl<'a> SourceMap<'a> {
    /// `root` is `None` when the document does not parse (then only byte
    /// positions can be given).
    pub fn new(text: &'a str) -> Self {
        SourceMap {
            text,
            root: DeTable::parse(text).ok(),
        }
    }

    pub fn line_column(&self, offset: usize) -> (usize, usize) {
        line_column(self.text, offset)
    }

    /// The span of the value at `path`, or of its deepest existing parent.
    pub fn span_of(&self, path: &FieldPath) -> Option<Range<usize>> {
        let root = self.root.as_ref()?;
        let mut best = None;
        let mut table = Some(root.get_ref());
        let mut array: Option<&[Spanned<DeValue<'_>>]> = None;
        for seg in path.segments() {
            let next = match (seg, table, array) {
                (Seg::Key(k), Some(t), _) => {
                    t.iter().find(|(key, _)| key.get_ref() == k).map(|(_, v)| v)
                }
                (Seg::Index(i), _, Some(a)) => a.get(*i),
                _ => None,
            };
            let Some(next) = next else { break };
            best = Some(next.span());
            table = next.get_ref().as_table();
            array = next.get_ref().as_array().map(|a| &a[..]);
        }
        best
    }

    /// The path of the smallest key or value whose span holds `span`.
    pub fn path_at(&self, span: &Range<usize>) -> FieldPath {
        let mut best: Option<(usize, FieldPath)> = None;
        if let Some(root) = &self.root {
            visit_table(root.get_ref(), &FieldPath::root(), &mut |path, spans| {
                for s in spans {
                    if s.start <= span.start && span.end <= s.end {
                        let len = s.end - s.start;
                        // `<=`: on a tie the deeper node (visited later) wins.
                        if best.as_ref().is_none_or(|(l, _)| len <= *l) {
                            best = Some((len, path.clone()));
                        }
                    }
                }
            });
        }
        best.map(|(_, p)| p).unwrap_or_default()
    }

    /// The `name` of the `i`-th `[[rule]]`, when it is a string.
    pub fn rule_name(&self, i: usize) -> Option<String> {
        let rules = self.root.as_ref()?.get_ref().iter().find_map(|(k, v)| {
            (k.get_ref() == "rule")
                .then(|| v.get_ref().as_array())
                .flatten()
        })?;
        let rule = rules.get(i)?.get_ref().as_table()?;
        rule.iter()
            .find(|(k, _)| k.get_ref() == "name")
            .and_then(|(_, v)| v.get_ref().as_str().map(str::to_string))
    }
}

type Visit<'f> = dyn FnMut(&FieldPath, [Range<usize>; 2]) + 'f;

fn visit_table(table: &DeTable<'_>, path: &FieldPath, f: &mut Visit<'_>) {
    for (key, value) in table.iter() {
        let p = path.key(key.get_ref());
        f(&p, [key.span(), value.span()]);
        visit_value(value.get_ref(), &p, f);
    }
}

fn visit_value(value: &DeValue<'_>, path: &FieldPath, f: &mut Visit<'_>) {
    match value {
        DeValue::Table(t) => visit_table(t, path, f),
        DeValue::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                let p = path.index(i);
                f(&p, [v.span(), v.span()]);
                visit_value(v.get_ref(), &p, f);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_count_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        let x = text.find("\"x").unwrap();
        assert_eq!(line_column(text, x), (2, 6));
        assert_eq!(line_column(text, 10_000), (3, 1));
    }

    #[test]
    fn paths_read_well() {
        let p = FieldPath::root()
            .key("rule")
            .index(1)
            .key("match")
            .key("ctx")
            .index(0);
        assert_eq!(p.to_string(), "rule[1].match.ctx[0]");
        assert_eq!(
            p.describe(|_| Some("slow".into())),
            "rule \"slow\": match.ctx[0]"
        );
        assert_eq!(p.describe(|_| None), "rule #2: match.ctx[0]");
        assert_eq!(FieldPath::root().key("seed").describe(|_| None), "seed");
    }

    #[test]
    fn spans_map_to_paths_and_back() {
        let text = "seed = 1\n[[rule]]\nname = \"a\"\n[[rule]]\nname = \"b\"\n[rule.match]\nctx = [1, 2]\n";
        let map = SourceMap::new(text);
        let path = FieldPath::root()
            .key("rule")
            .index(1)
            .key("match")
            .key("ctx");
        let span = map.span_of(&path).unwrap();
        assert_eq!(&text[span.clone()], "[1, 2]");
        assert_eq!(map.line_column(span.start), (7, 7));
        let two = text.find("2]").unwrap();
        assert_eq!(map.path_at(&(two..two + 1)), path.index(1));
        assert_eq!(map.rule_name(1).as_deref(), Some("b"));
        assert_eq!(map.rule_name(2), None);
        // A missing leaf falls back to its parent: for an array-of-tables
        // element, its `[[rule]]` header.
        let missing = FieldPath::root().key("rule").index(0).key("latency");
        let span = map.span_of(&missing).unwrap();
        assert_eq!(&text[span.clone()], "[[rule]]");
        assert_eq!(map.line_column(span.start), (2, 1));
    }
}
