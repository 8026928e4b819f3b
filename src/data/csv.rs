//! A small RFC 4180 CSV reader: quoted fields (with `""` escapes and line breaks inside), CRLF or
//! LF line ends, and optional `#` comment lines before the header.

use super::{DataError, Result};
use std::path::Path;

/// A parsed table: the header and the rows, each as long as the header.
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// Index of `name` in the header, or an error naming the file.
    pub fn column(&self, name: &str, path: &Path) -> Result<usize> {
        self.header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| DataError::MissingColumn {
                path: path.to_path_buf(),
                column: name.to_owned(),
                header: self.header.clone(),
            })
    }
}

/// Parses `text`. With `skip_comments`, a line starting with `#` outside a quoted field is skipped.
pub fn parse(text: &str, path: &Path, skip_comments: bool) -> Result<Table> {
    let bad = |line: usize, message: String| DataError::Parse {
        path: path.to_path_buf(),
        message: format!("line {line}: {message}"),
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut records: Vec<(usize, Vec<String>)> = Vec::new();
    let mut field = String::new();
    let mut record: Vec<String> = Vec::new();
    let mut in_quotes = false;
    let mut at_field_start = true;
    let mut at_line_start = true;
    let mut line = 1;
    let mut record_line = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if at_line_start && !in_quotes && skip_comments && c == '#' {
            for c in chars.by_ref() {
                if c == '\n' {
                    break;
                }
            }
            line += 1;
            record_line = line;
            continue;
        }
        at_line_start = false;
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push('\n');
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if at_field_start => {
                in_quotes = true;
                at_field_start = false;
            }
            '"' => return Err(bad(line, "quote inside an unquoted field".into())),
            ',' => {
                record.push(std::mem::take(&mut field));
                at_field_start = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                record.push(std::mem::take(&mut field));
                if !(record.len() == 1 && record[0].is_empty()) {
                    records.push((record_line, std::mem::take(&mut record)));
                }
                record.clear();
                at_field_start = true;
                at_line_start = true;
                line += 1;
                record_line = line;
            }
            _ => {
                field.push(c);
                at_field_start = false;
            }
        }
    }
    if in_quotes {
        return Err(bad(record_line, "unterminated quoted field".into()));
    }
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push((record_line, record));
    }
    let mut records = records.into_iter();
    let (_, header) = records
        .next()
        .ok_or_else(|| bad(1, "empty file: no header".into()))?;
    let mut rows = Vec::new();
    for (n, r) in records {
        if r.len() != header.len() {
            return Err(bad(
                n,
                format!("{} fields, the header has {}", r.len(), header.len()),
            ));
        }
        rows.push(r);
    }
    Ok(Table { header, rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_fields_with_commas_quotes_and_newlines() {
        let t = parse(
            "# v1\na,b\r\n\"x, \"\"y\"\"\",\"two\nlines\"\nplain,\n",
            Path::new("t.csv"),
            true,
        )
        .unwrap();
        assert_eq!(t.header, ["a", "b"]);
        assert_eq!(t.rows[0], ["x, \"y\"", "two\nlines"]);
        assert_eq!(t.rows[1], ["plain", ""]);
    }

    #[test]
    fn ragged_and_unterminated_rows_name_file_and_line() {
        let e = parse("a,b\n1,2,3\n", Path::new("f.csv"), false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("f.csv") && e.contains("line 2"), "{e}");
        let e = parse("a\n\"open\n", Path::new("g.csv"), false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("g.csv") && e.contains("unterminated"), "{e}");
    }
}
