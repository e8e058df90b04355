//! containerd's filter language, as clients send it to `List` and
//! `ListStatuses`: each string is a comma-separated conjunction of selectors
//! (`field.path`, `field.path==value`, `!=`, `~=` regex); several strings are
//! alternatives. No crate implements it, so it is parsed here, following the
//! grammar of containerd's `filters` package.

use std::iter::Peekable;
use std::str::Chars;

use regex::Regex;

/// A parse error, reported to the client as InvalidArgument.
#[derive(Debug, thiserror::Error)]
#[error("invalid filter {filter:?}: {why}")]
pub struct FilterError {
    filter: String,
    why: String,
}

/// Parsed filters: matches when any alternative matches.
#[derive(Debug)]
pub struct Filter {
    alternatives: Vec<Vec<Selector>>,
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    test: Test,
}

#[derive(Debug)]
enum Test {
    Present,
    Equal(String),
    NotEqual(String),
    /// `None` for a regex that does not compile: containerd matches nothing.
    Matches(Option<Regex>),
}

impl Filter {
    /// Parses every filter string; none at all (or an empty one) matches everything.
    pub fn parse_all(filters: &[String]) -> Result<Self, FilterError> {
        let mut alternatives = Vec::with_capacity(filters.len());
        for filter in filters {
            if filter.trim().is_empty() {
                return Ok(Self::everything());
            }
            alternatives.push(Parser::new(filter).selectors().map_err(|why| FilterError {
                filter: filter.clone(),
                why,
            })?);
        }
        if alternatives.is_empty() {
            return Ok(Self::everything());
        }
        Ok(Self { alternatives })
    }

    fn everything() -> Self {
        Self {
            alternatives: vec![Vec::new()],
        }
    }

    /// Whether an object matches; `field` looks up a field path of it.
    pub fn matches<'a>(&self, field: impl Fn(&[String]) -> Option<&'a str>) -> bool {
        self.alternatives
            .iter()
            .any(|selectors| selectors.iter().all(|s| s.matches(&field)))
    }
}

impl Selector {
    fn matches<'a>(&self, field: &impl Fn(&[String]) -> Option<&'a str>) -> bool {
        let value = field(&self.path);
        match &self.test {
            Test::Present => value.is_some(),
            Test::Equal(want) => value == Some(want.as_str()),
            Test::NotEqual(want) => value.unwrap_or("") != want,
            Test::Matches(re) => re
                .as_ref()
                .is_some_and(|re| re.is_match(value.unwrap_or(""))),
        }
    }
}

/// Characters that may make up a bare field name.
fn is_field_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn is_operator_char(c: char) -> bool {
    matches!(c, '=' | '!' | '~')
}

/// Recursive-descent parser over one filter string.
struct Parser<'a> {
    chars: Peekable<Chars<'a>>,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Self {
            chars: input.chars().peekable(),
        }
    }

    fn skip_space(&mut self) {
        while self.chars.next_if(|c| c.is_whitespace()).is_some() {}
    }

    fn selectors(&mut self) -> Result<Vec<Selector>, String> {
        let mut selectors = vec![self.selector()?];
        loop {
            self.skip_space();
            match self.chars.next() {
                None => return Ok(selectors),
                Some(',') => selectors.push(self.selector()?),
                Some(c) => return Err(format!("unexpected {c:?} after a selector")),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, String> {
        let mut path = vec![self.field()?];
        loop {
            self.skip_space();
            if self.chars.next_if_eq(&'.').is_none() {
                break;
            }
            path.push(self.field()?);
        }
        if !self.chars.peek().copied().is_some_and(is_operator_char) {
            return Ok(Selector {
                path,
                test: Test::Present,
            });
        }
        let mut operator = String::new();
        while let Some(c) = self.chars.next_if(|&c| is_operator_char(c)) {
            operator.push(c);
        }
        self.skip_space();
        let test = match operator.as_str() {
            "==" => Test::Equal(self.value(false)?),
            "!=" => Test::NotEqual(self.value(false)?),
            "~=" => Test::Matches(Regex::new(&self.value(true)?).ok()),
            other => return Err(format!("unknown operator {other:?}")),
        };
        Ok(Selector { path, test })
    }

    fn field(&mut self) -> Result<String, String> {
        self.skip_space();
        if self.chars.next_if_eq(&'"').is_some() {
            return self.quoted('"', false);
        }
        let mut field = String::new();
        while let Some(c) = self.chars.next_if(|&c| is_field_char(c)) {
            field.push(c);
        }
        if field.is_empty() {
            return Err("expected a field name".into());
        }
        Ok(field)
    }

    /// A value: quoted, or a bare run up to a comma or white space. Regex
    /// values may also be delimited by `/` or `|`.
    fn value(&mut self, regex: bool) -> Result<String, String> {
        match self.chars.peek() {
            Some('"') => {
                self.chars.next();
                return self.quoted('"', regex);
            }
            Some(&q @ ('/' | '|')) if regex => {
                self.chars.next();
                return self.quoted(q, true);
            }
            Some(c) if matches!(c, ',' | '.' | '/' | '|') || is_operator_char(*c) => {
                return Err(format!("a value cannot start with {c:?}"));
            }
            _ => {}
        }
        let mut value = String::new();
        while let Some(c) = self.chars.next_if(|&c| c != ',' && !c.is_whitespace()) {
            value.push(c);
        }
        if value.is_empty() {
            return Err("expected a value".into());
        }
        Ok(value)
    }

    /// The rest of a quoted string whose opening `quote` was consumed, with
    /// escapes resolved. In regexes, unknown escapes are kept for the regex.
    fn quoted(&mut self, quote: char, regex: bool) -> Result<String, String> {
        let mut out = String::new();
        loop {
            let c = self.chars.next().ok_or("unterminated quoted string")?;
            match c {
                c if c == quote => return Ok(out),
                '\n' => return Err("newline in quoted string".into()),
                '\\' => self.escape(quote, regex, &mut out)?,
                c => out.push(c),
            }
        }
    }

    fn escape(&mut self, quote: char, regex: bool, out: &mut String) -> Result<(), String> {
        let c = self.chars.next().ok_or("unterminated escape")?;
        let simple = match c {
            'a' => Some('\x07'),
            'b' => Some('\x08'),
            'f' => Some('\x0c'),
            'n' => Some('\n'),
            'r' => Some('\r'),
            't' => Some('\t'),
            'v' => Some('\x0b'),
            '\\' => Some('\\'),
            c if c == quote => Some(c),
            _ => None,
        };
        if let Some(c) = simple {
            out.push(c);
            return Ok(());
        }
        let code = match c {
            'x' => self.hex_digits(2)?,
            'u' => self.hex_digits(4)?,
            'U' => self.hex_digits(8)?,
            '0'..='7' => {
                let mut code = c.to_digit(8).expect("octal digit");
                for _ in 0..2 {
                    let d = self
                        .chars
                        .next()
                        .and_then(|d| d.to_digit(8))
                        .ok_or("bad octal escape")?;
                    code = code * 8 + d;
                }
                code
            }
            other if regex => {
                out.push('\\');
                out.push(other);
                return Ok(());
            }
            other => return Err(format!("unknown escape \\{other}")),
        };
        out.push(char::from_u32(code).ok_or("escape is not a character")?);
        Ok(())
    }

    fn hex_digits(&mut self, n: usize) -> Result<u32, String> {
        let mut code = 0;
        for _ in 0..n {
            let d = self
                .chars
                .next()
                .and_then(|d| d.to_digit(16))
                .ok_or("bad hex escape")?;
            code = code * 16 + d;
        }
        Ok(code)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Looks fields up in a flat map keyed by the dotted path.
    fn lookup(fields: &HashMap<&str, &'static str>) -> impl Fn(&[String]) -> Option<&'static str> {
        move |path: &[String]| fields.get(path.join(".").as_str()).copied()
    }

    fn matches(filters: &[&str], fields: &[(&str, &'static str)]) -> bool {
        let fields: HashMap<_, _> = fields.iter().copied().collect();
        let filters: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
        Filter::parse_all(&filters)
            .unwrap()
            .matches(lookup(&fields))
    }

    #[test]
    fn empty_filters_match_everything() {
        assert!(matches(&[], &[]));
        assert!(matches(&[""], &[("digest", "x")]));
    }

    #[test]
    fn operators() {
        let info = [
            ("digest", "sha256:abc"),
            ("labels.containerd.io/gc.root", "yes"),
        ];
        assert!(matches(&["digest==sha256:abc"], &info));
        assert!(!matches(&["digest==sha256:abd"], &info));
        assert!(matches(&["digest!=sha256:abd"], &info));
        assert!(matches(&["labels.\"containerd.io/gc.root\""], &info));
        assert!(!matches(&["labels.missing"], &info));
        assert!(matches(&["labels.missing!=x"], &info));
        assert!(matches(&["digest~=^sha256:a"], &info));
        assert!(matches(&["digest~=/b.$/"], &info));
        assert!(
            !matches(&["digest~=/[/"], &info),
            "a bad regex matches nothing"
        );
    }

    #[test]
    fn commas_and_and_strings_or() {
        let info = [("digest", "d1"), ("labels.a", "1")];
        assert!(matches(&["digest==d1, labels.a==1"], &info));
        assert!(!matches(&["digest==d1,labels.a==2"], &info));
        assert!(matches(&["digest==d2", "labels.a==1"], &info));
    }

    #[test]
    fn quoted_values_and_escapes() {
        let info = [("labels.k", "a b,\"c\"")];
        assert!(matches(&[r#"labels.k=="a b,\"c\"""#], &info));
        assert!(matches(&[r#"labels."k"=="a\x20b,\u0022c\042""#], &info));
    }

    #[test]
    fn rejects_malformed_filters() {
        for bad in [
            "labels.",
            "digest==",
            "digest=x",
            "digest<>x",
            "digest==a,",
            "labels.\"unterminated",
            "labels.key==/value",
            "a b",
            "\"bad\\qescape\"",
        ] {
            assert!(
                Filter::parse_all(&[bad.to_string()]).is_err(),
                "accepted {bad:?}"
            );
        }
    }
}
