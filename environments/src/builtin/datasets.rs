//! Reading JSONL datasets supplied by users (GSM8K, ARC/MMLU, IFEval rows).

use std::path::Path;

use crate::error::EnvError;

/// One parsed JSONL row with its 1-based line number.
pub(crate) struct Row {
    pub line: usize,
    pub value: serde_json::Value,
}

/// Parses JSONL text; blank lines are skipped, a malformed line is an error naming it.
pub(crate) fn parse_jsonl(text: &str, source_name: &str) -> Result<Vec<Row>, EnvError> {
    let mut rows = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str(line).map_err(|err| EnvError::DatasetRow {
            source_name: source_name.to_string(),
            line: index + 1,
            message: format!("not JSON: {err}"),
        })?;
        rows.push(Row {
            line: index + 1,
            value,
        });
    }
    if rows.is_empty() {
        return Err(EnvError::DatasetRow {
            source_name: source_name.to_string(),
            line: 0,
            message: "the dataset has no rows".to_string(),
        });
    }
    Ok(rows)
}

/// Reads a JSONL file.
pub(crate) fn read_jsonl(path: &Path) -> Result<Vec<Row>, EnvError> {
    let text = std::fs::read_to_string(path).map_err(|source| EnvError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_jsonl(&text, &path.display().to_string())
}

/// The error for a row that lacks what it needs.
pub(crate) fn row_error(source_name: &str, line: usize, message: impl Into<String>) -> EnvError {
    EnvError::DatasetRow {
        source_name: source_name.to_string(),
        line,
        message: message.into(),
    }
}

/// The string field `key` of a row.
pub(crate) fn string_field<'a>(
    row: &'a Row,
    key: &str,
    source_name: &str,
) -> Result<&'a str, EnvError> {
    row.value.get(key).and_then(|v| v.as_str()).ok_or_else(|| {
        row_error(
            source_name,
            row.line,
            format!("missing string field `{key}`"),
        )
    })
}
