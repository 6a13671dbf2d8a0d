//! Reading a numeric answer the way people write it: `1,234`, `$12.50`, `3/4`, `\frac{3}{4}`,
//! `\boxed{7}`, `#### 7`, `7 apples`, `-2.5%`. Compared exactly as rationals.

use super::expr::Rational;
use crate::chat::final_answer;

/// Longest decimal expansion accepted (keeps the rational arithmetic in range).
const MAX_DIGITS: usize = 30;

/// Rewrites `\frac{a}{b}` (and `\dfrac`, `\tfrac`) as `a/b`; drops other LaTeX noise.
fn strip_latex(text: &str) -> String {
    let mut out = text.to_string();
    for command in ["\\dfrac", "\\tfrac", "\\frac"] {
        while let Some(start) = out.find(command) {
            let rest = &out[start + command.len()..];
            let Some((numerator, after_num)) = braced(rest) else {
                break;
            };
            let Some((denominator, after_den)) = braced(after_num) else {
                break;
            };
            let replacement = format!("{numerator}/{denominator}");
            let consumed = out.len() - after_den.len();
            out.replace_range(start..consumed, &replacement);
        }
    }
    for noise in [
        "\\$", "$", "\\%", "%", "\\,", "\\!", "\\left", "\\right", "\\text", "\\mathrm", "{", "}",
    ] {
        out = out.replace(noise, " ");
    }
    out
}

/// `{inner}rest` → `(inner, rest)`.
fn braced(text: &str) -> Option<(&str, &str)> {
    let text = text.trim_start();
    let body = text.strip_prefix('{')?;
    let close = body.find('}')?;
    Some((&body[..close], &body[close + 1..]))
}

/// The numeric tokens of `text` (`-1,234.5`, `3/4`), in order.
fn number_tokens(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let negative = i > 0
            && matches!(chars[i - 1], '-' | '−')
            && (i < 2 || !chars[i - 2].is_ascii_alphanumeric());
        let mut token = String::from(if negative { "-" } else { "" });
        let continues = |j: usize, sep: char| {
            j + 1 < chars.len() && chars[j] == sep && chars[j + 1].is_ascii_digit()
        };
        while i < chars.len() {
            if chars[i].is_ascii_digit() {
                token.push(chars[i]);
                i += 1;
            } else if continues(i, ',') {
                i += 1; // thousands separator
            } else if continues(i, '.') || continues(i, '/') {
                token.push(chars[i]);
                i += 1;
            } else {
                break;
            }
        }
        tokens.push(token);
    }
    tokens
}

/// Parses one token: an integer, a decimal, or a fraction of integers.
pub(crate) fn parse_number_token(token: &str) -> Option<Rational> {
    if token.len() > MAX_DIGITS {
        return None;
    }
    if let Some((numerator, denominator)) = token.split_once('/') {
        let n = parse_number_token(numerator)?;
        let d = parse_number_token(denominator)?;
        return n.checked_div(d).filter(|_| d != Rational::integer(0));
    }
    let (negative, digits) = match token.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, token),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty()
        || !whole
            .chars()
            .chain(fraction.chars())
            .all(|c| c.is_ascii_digit())
    {
        return None;
    }
    let scale = 10_i128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
    let magnitude: i128 = format!("{whole}{fraction}").parse().ok()?;
    Rational::new(if negative { -magnitude } else { magnitude }, scale)
}

/// The number a response answers with: its final answer (boxed, tagged or after `####`),
/// and within that the last number written. `None` when there is no number.
pub(crate) fn parse_numeric_answer(response: &str) -> Option<Rational> {
    let cleaned = strip_latex(final_answer(response));
    number_tokens(&cleaned)
        .last()
        .and_then(|token| parse_number_token(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(text: &str) -> Option<String> {
        parse_numeric_answer(text).map(|r| r.to_string())
    }

    #[test]
    fn common_answer_spellings() {
        assert_eq!(n("19").as_deref(), Some("19"));
        assert_eq!(n("1,234 apples").as_deref(), Some("1234"));
        assert_eq!(n("$12.50").as_deref(), Some("25/2"));
        assert_eq!(n("\\boxed{\\frac{3}{4}}").as_deref(), Some("3/4"));
        assert_eq!(n("so 3+4 = 7\n#### 7").as_deref(), Some("7"));
        assert_eq!(n("The answer is -5.").as_deref(), Some("-5"));
        assert_eq!(n("0.750").as_deref(), Some("3/4"));
        assert_eq!(n("it is 40%").as_deref(), Some("40"));
        assert_eq!(
            n("x-3").as_deref(),
            Some("3"),
            "a hyphen after a word is not a sign"
        );
    }

    #[test]
    fn no_number_means_none() {
        assert_eq!(n("seven"), None);
        assert_eq!(n(""), None);
        assert_eq!(n("1/0"), None);
        assert_eq!(parse_number_token("1/0"), None);
        assert_eq!(parse_number_token(&"9".repeat(40)), None);
    }
}
