//! Exact arithmetic expressions: rationals, expression trees, and a small recursive-descent
//! parser for what models write (`3*(7+1)-4/2`). Shared by `arithmetic` and `countdown`.

use std::fmt;

/// A reduced fraction with a positive denominator; every operation is checked, so overflow is
/// an error rather than a wrong answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rational {
    num: i128,
    den: i128,
}

fn gcd(mut a: i128, mut b: i128) -> i128 {
    a = a.abs();
    b = b.abs();
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Rational {
    pub(crate) fn integer(value: i128) -> Self {
        Self { num: value, den: 1 }
    }

    /// `num/den`, reduced; `None` for a zero denominator or overflow.
    pub(crate) fn new(num: i128, den: i128) -> Option<Self> {
        if den == 0 {
            return None;
        }
        let divisor = gcd(num, den).max(1);
        let sign = if den < 0 { -1 } else { 1 };
        Some(Self {
            num: (num / divisor).checked_mul(sign)?,
            den: (den / divisor).checked_mul(sign)?,
        })
    }

    pub(crate) fn checked_add(self, other: Self) -> Option<Self> {
        let num = self
            .num
            .checked_mul(other.den)?
            .checked_add(other.num.checked_mul(self.den)?)?;
        Self::new(num, self.den.checked_mul(other.den)?)
    }

    pub(crate) fn checked_sub(self, other: Self) -> Option<Self> {
        self.checked_add(Self {
            num: other.num.checked_neg()?,
            den: other.den,
        })
    }

    pub(crate) fn checked_mul(self, other: Self) -> Option<Self> {
        Self::new(
            self.num.checked_mul(other.num)?,
            self.den.checked_mul(other.den)?,
        )
    }

    pub(crate) fn checked_div(self, other: Self) -> Option<Self> {
        Self::new(
            self.num.checked_mul(other.den)?,
            self.den.checked_mul(other.num)?,
        )
    }

    pub(crate) fn as_integer(self) -> Option<i128> {
        (self.den == 1).then_some(self.num)
    }
}

impl fmt::Display for Rational {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.den == 1 {
            write!(f, "{}", self.num)
        } else {
            write!(f, "{}/{}", self.num, self.den)
        }
    }
}

/// A binary operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

impl Op {
    pub(crate) fn symbol(self) -> char {
        match self {
            Op::Add => '+',
            Op::Sub => '-',
            Op::Mul => '*',
            Op::Div => '/',
        }
    }

    fn precedence(self) -> u8 {
        match self {
            Op::Add | Op::Sub => 1,
            Op::Mul | Op::Div => 2,
        }
    }
}

/// An expression over non-negative integer literals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Expr {
    Number(i128),
    Binary(Op, Box<Expr>, Box<Expr>),
}

/// Why an expression has no value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EvalError {
    #[error("division by zero")]
    DivisionByZero,
    #[error("division {0} is not exact")]
    InexactDivision(String),
    #[error("numbers too large")]
    Overflow,
}

impl Expr {
    pub(crate) fn binary(op: Op, left: Expr, right: Expr) -> Self {
        Expr::Binary(op, Box::new(left), Box::new(right))
    }

    /// The exact value. With `integer_division_only`, every division must leave an integer
    /// (the countdown rule).
    pub(crate) fn eval(&self, integer_division_only: bool) -> Result<Rational, EvalError> {
        match self {
            Expr::Number(n) => Ok(Rational::integer(*n)),
            Expr::Binary(op, left, right) => {
                let (l, r) = (
                    left.eval(integer_division_only)?,
                    right.eval(integer_division_only)?,
                );
                let value = match op {
                    Op::Add => l.checked_add(r),
                    Op::Sub => l.checked_sub(r),
                    Op::Mul => l.checked_mul(r),
                    Op::Div => {
                        if r == Rational::integer(0) {
                            return Err(EvalError::DivisionByZero);
                        }
                        let quotient = l.checked_div(r).ok_or(EvalError::Overflow)?;
                        if integer_division_only && quotient.as_integer().is_none() {
                            return Err(EvalError::InexactDivision(format!("{l}/{r}")));
                        }
                        Some(quotient)
                    }
                };
                value.ok_or(EvalError::Overflow)
            }
        }
    }

    /// Every literal, left to right.
    pub(crate) fn numbers(&self) -> Vec<i128> {
        match self {
            Expr::Number(n) => vec![*n],
            Expr::Binary(_, left, right) => {
                let mut all = left.numbers();
                all.extend(right.numbers());
                all
            }
        }
    }

    fn precedence(&self) -> u8 {
        match self {
            Expr::Number(_) => 3,
            Expr::Binary(op, _, _) => op.precedence(),
        }
    }

    fn write(&self, out: &mut String) {
        match self {
            Expr::Number(n) => out.push_str(&n.to_string()),
            Expr::Binary(op, left, right) => {
                let left_parens = left.precedence() < op.precedence();
                // a-(b+c) and a/(b*c) need their parentheses; a+(b+c) does not.
                let right_parens = right.precedence() < op.precedence()
                    || (right.precedence() == op.precedence() && matches!(op, Op::Sub | Op::Div));
                write_grouped(out, left, left_parens);
                out.push(op.symbol());
                write_grouped(out, right, right_parens);
            }
        }
    }
}

fn write_grouped(out: &mut String, expr: &Expr, parens: bool) {
    if parens {
        out.push('(');
    }
    expr.write(out);
    if parens {
        out.push(')');
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        self.write(&mut out);
        f.write_str(&out)
    }
}

/// Longest expression the parser accepts, in bytes.
const MAX_EXPRESSION_BYTES: usize = 512;
/// Deepest parenthesis nesting the parser accepts (keeps recursion bounded).
const MAX_NESTING: usize = 32;

/// Why text is not an expression.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ParseError {
    #[error("expression is empty")]
    Empty,
    #[error("expression is longer than {MAX_EXPRESSION_BYTES} bytes")]
    TooLong,
    #[error("parentheses nested deeper than {MAX_NESTING}")]
    TooDeep,
    #[error("unexpected {found} at position {position}")]
    Unexpected { found: String, position: usize },
    #[error("number too large at position {0}")]
    NumberTooLarge(usize),
}

struct Parser {
    chars: Vec<char>,
    position: usize,
    depth: usize,
}

/// Parses `+ - * /` (also `×`, `÷`), parentheses and non-negative integers; spaces are ignored.
pub(crate) fn parse_expression(text: &str) -> Result<Expr, ParseError> {
    if text.len() > MAX_EXPRESSION_BYTES {
        return Err(ParseError::TooLong);
    }
    let chars: Vec<char> = text.chars().collect();
    if text.trim().is_empty() {
        return Err(ParseError::Empty);
    }
    let mut parser = Parser {
        chars,
        position: 0,
        depth: 0,
    };
    let expr = parser.sum()?;
    match parser.peek() {
        None => Ok(expr),
        Some(c) => Err(parser.unexpected(c)),
    }
}

impl Parser {
    /// The next non-space character.
    fn peek(&mut self) -> Option<char> {
        while self
            .chars
            .get(self.position)
            .is_some_and(|c| c.is_whitespace())
        {
            self.position += 1;
        }
        self.chars.get(self.position).copied()
    }

    fn unexpected(&self, c: char) -> ParseError {
        ParseError::Unexpected {
            found: format!("`{c}`"),
            position: self.position,
        }
    }

    fn sum(&mut self) -> Result<Expr, ParseError> {
        let mut expr = self.product()?;
        while let Some(op) = self.peek().and_then(|c| match c {
            '+' => Some(Op::Add),
            '-' | '−' => Some(Op::Sub),
            _ => None,
        }) {
            self.position += 1;
            expr = Expr::binary(op, expr, self.product()?);
        }
        Ok(expr)
    }

    fn product(&mut self) -> Result<Expr, ParseError> {
        let mut expr = self.atom()?;
        while let Some(op) = self.peek().and_then(|c| match c {
            '*' | '×' => Some(Op::Mul),
            '/' | '÷' => Some(Op::Div),
            _ => None,
        }) {
            self.position += 1;
            expr = Expr::binary(op, expr, self.atom()?);
        }
        Ok(expr)
    }

    fn atom(&mut self) -> Result<Expr, ParseError> {
        match self.peek() {
            None => Err(ParseError::Unexpected {
                found: "end".into(),
                position: self.position,
            }),
            Some('(') => {
                self.depth += 1;
                if self.depth > MAX_NESTING {
                    return Err(ParseError::TooDeep);
                }
                self.position += 1;
                let inner = self.sum()?;
                match self.peek() {
                    Some(')') => {
                        self.position += 1;
                        self.depth -= 1;
                        Ok(inner)
                    }
                    Some(c) => Err(self.unexpected(c)),
                    None => Err(ParseError::Unexpected {
                        found: "end".into(),
                        position: self.position,
                    }),
                }
            }
            Some(c) if c.is_ascii_digit() => {
                let start = self.position;
                let mut value: i128 = 0;
                // Digits must be contiguous: `1 2` is two numbers, not twelve.
                while let Some(digit) = self.chars.get(self.position).and_then(|c| c.to_digit(10)) {
                    value = value
                        .checked_mul(10)
                        .and_then(|v| v.checked_add(i128::from(digit)))
                        .ok_or(ParseError::NumberTooLarge(start))?;
                    self.position += 1;
                }
                Ok(Expr::Number(value))
            }
            Some(c) => Err(self.unexpected(c)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str) -> Rational {
        parse_expression(text).unwrap().eval(false).unwrap()
    }

    #[test]
    fn precedence_and_associativity() {
        assert_eq!(value("2+3*4"), Rational::integer(14));
        assert_eq!(value("(2+3)*4"), Rational::integer(20));
        assert_eq!(value("10-4-3"), Rational::integer(3));
        assert_eq!(value("12/3/2"), Rational::integer(2));
        assert_eq!(value("1/3+1/6"), Rational::new(1, 2).unwrap());
        assert_eq!(value(" 6 × 7 "), Rational::integer(42));
    }

    #[test]
    fn rendering_round_trips_through_the_parser() {
        let tree = Expr::binary(
            Op::Sub,
            Expr::Number(10),
            Expr::binary(
                Op::Add,
                Expr::Number(2),
                Expr::binary(Op::Div, Expr::Number(6), Expr::Number(3)),
            ),
        );
        assert_eq!(tree.to_string(), "10-(2+6/3)");
        assert_eq!(
            parse_expression(&tree.to_string()).unwrap().eval(true),
            tree.eval(true)
        );
    }

    #[test]
    fn division_rules() {
        let e = parse_expression("7/2").unwrap();
        assert_eq!(e.eval(false).unwrap(), Rational::new(7, 2).unwrap());
        assert!(matches!(e.eval(true), Err(EvalError::InexactDivision(_))));
        assert_eq!(
            parse_expression("1/(2-2)").unwrap().eval(false),
            Err(EvalError::DivisionByZero)
        );
    }

    #[test]
    fn garbage_is_rejected_not_panicked_on() {
        for bad in [
            "",
            "1+",
            "(1",
            "1)",
            "a",
            "--1",
            "1 2",
            "99999999999999999999999999999999999999999",
        ] {
            assert!(parse_expression(bad).is_err(), "{bad}");
        }
        let deep = format!("{}1{}", "(".repeat(100), ")".repeat(100));
        assert_eq!(parse_expression(&deep), Err(ParseError::TooDeep));
        let huge = "9".repeat(30) + "*" + &"9".repeat(30);
        assert_eq!(
            parse_expression(&huge).unwrap().eval(false),
            Err(EvalError::Overflow)
        );
    }
}
