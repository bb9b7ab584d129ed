//! The calculator tool the chat models call between `<|python_start|>` and `<|python_end|>`.
//!
//! nanochat hands the expression to Python's `eval` after a character whitelist. Here the same
//! accepted language is parsed and evaluated directly, so nothing but arithmetic and
//! `"literal".count("literal")` can ever run:
//! - arithmetic: `+ - * / //`, unary signs, parentheses, integer and decimal literals, with
//!   Python's result types (`/` always gives a float, `7 // 2` an int) and Python's printing of
//!   the result (`5.0`, `0.30000000000000004`, `1e+16`); commas are dropped first (`1,000`);
//!   `**` is refused;
//! - strings: `'text'.count('t')` (either quote style, optional surrounding parentheses),
//!   refused when the text mentions a name from nanochat's deny list (`open`, `eval`, ...).
//!
//! Everything else — syntax errors, division by zero, integers beyond 128 bits, over-long or
//! over-nested input — yields `None`, which means "no tool output", exactly as a failed `eval`
//! does in the reference. Work is linear in the input, which is capped at [`MAX_EXPR_BYTES`].

/// Longest expression evaluated; longer ones are refused without being parsed.
pub const MAX_EXPR_BYTES: usize = 1024;
/// Deepest parenthesis / unary-sign nesting accepted (bounds recursion).
const MAX_DEPTH: usize = 64;

const MATH_CHARS: &str = "0123456789*+-/.() ";
const DENIED_WORDS: [&str; 17] = [
    "__",
    "import",
    "exec",
    "eval",
    "compile",
    "open",
    "file",
    "input",
    "raw_input",
    "globals",
    "locals",
    "vars",
    "dir",
    "getattr",
    "setattr",
    "delattr",
    "hasattr",
];

/// Evaluates a calculator call; `Some(text)` is what the tool prints, `None` means the call is
/// refused or failed and produces no output.
pub fn use_calculator(expr: &str) -> Option<String> {
    if expr.len() > MAX_EXPR_BYTES {
        return None;
    }
    let expr: String = expr.chars().filter(|&c| c != ',').collect();
    if expr.chars().all(|c| MATH_CHARS.contains(c)) {
        if expr.contains("**") {
            return None;
        }
        return eval_arithmetic(&expr).map(|n| n.to_python_string());
    }
    let string_op_ok = expr
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "'\"()._ ".contains(c));
    if !string_op_ok {
        return None;
    }
    let lower = expr.to_ascii_lowercase();
    if DENIED_WORDS.iter().any(|w| lower.contains(w)) || !expr.contains(".count(") {
        return None;
    }
    eval_count(&expr).map(|n| n.to_string())
}

/// A Python number: `int` (bounded here to i128) or `float`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Num {
    Int(i128),
    Float(f64),
}

impl Num {
    fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }

    fn to_python_string(self) -> String {
        match self {
            Num::Int(i) => i.to_string(),
            Num::Float(f) => python_float_repr(f),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Tok {
    Num(Num),
    Plus,
    Minus,
    Star,
    Slash,
    SlashSlash,
    LParen,
    RParen,
}

fn lex_arithmetic(s: &str) -> Option<Vec<Tok>> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' => i += 1,
            b'+' => (out.push(Tok::Plus), i += 1).1,
            b'-' => (out.push(Tok::Minus), i += 1).1,
            b'*' => (out.push(Tok::Star), i += 1).1,
            b'(' => (out.push(Tok::LParen), i += 1).1,
            b')' => (out.push(Tok::RParen), i += 1).1,
            b'/' if b.get(i + 1) == Some(&b'/') => (out.push(Tok::SlashSlash), i += 2).1,
            b'/' => (out.push(Tok::Slash), i += 1).1,
            b'0'..=b'9' | b'.' => {
                let start = i;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                let int_end = i;
                let is_float = i < b.len() && b[i] == b'.';
                if is_float {
                    i += 1;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                }
                let text = &s[start..i];
                if text == "." {
                    return None;
                }
                if is_float {
                    out.push(Tok::Num(Num::Float(text.parse().ok()?)));
                } else {
                    let digits = &s[start..int_end];
                    // Python rejects decimal integers with leading zeros ("007"), but "000" is 0.
                    if digits.len() > 1
                        && digits.starts_with('0')
                        && digits.bytes().any(|d| d != b'0')
                    {
                        return None;
                    }
                    out.push(Tok::Num(Num::Int(digits.parse().ok()?)));
                }
            }
            _ => return None,
        }
    }
    Some(out)
}

fn eval_arithmetic(s: &str) -> Option<Num> {
    let toks = lex_arithmetic(s)?;
    let mut p = Parser { toks, pos: 0 };
    let v = p.expr(0)?;
    (p.pos == p.toks.len()).then_some(v)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<Tok> {
        self.toks.get(self.pos).copied()
    }

    fn expr(&mut self, depth: usize) -> Option<Num> {
        let mut acc = self.term(depth)?;
        while let Some(op @ (Tok::Plus | Tok::Minus)) = self.peek() {
            self.pos += 1;
            let rhs = self.term(depth)?;
            acc = binary(op, acc, rhs)?;
        }
        Some(acc)
    }

    fn term(&mut self, depth: usize) -> Option<Num> {
        let mut acc = self.factor(depth)?;
        while let Some(op @ (Tok::Star | Tok::Slash | Tok::SlashSlash)) = self.peek() {
            self.pos += 1;
            let rhs = self.factor(depth)?;
            acc = binary(op, acc, rhs)?;
        }
        Some(acc)
    }

    fn factor(&mut self, depth: usize) -> Option<Num> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            Tok::Plus => {
                self.pos += 1;
                self.factor(depth + 1)
            }
            Tok::Minus => {
                self.pos += 1;
                match self.factor(depth + 1)? {
                    Num::Int(i) => i.checked_neg().map(Num::Int),
                    Num::Float(f) => Some(Num::Float(-f)),
                }
            }
            Tok::Num(n) => {
                self.pos += 1;
                Some(n)
            }
            Tok::LParen => {
                self.pos += 1;
                let v = self.expr(depth + 1)?;
                (self.peek()? == Tok::RParen).then(|| self.pos += 1)?;
                Some(v)
            }
            _ => None,
        }
    }
}

fn binary(op: Tok, a: Num, b: Num) -> Option<Num> {
    use Num::{Float, Int};
    match (op, a, b) {
        (Tok::Plus, Int(x), Int(y)) => x.checked_add(y).map(Int),
        (Tok::Minus, Int(x), Int(y)) => x.checked_sub(y).map(Int),
        (Tok::Star, Int(x), Int(y)) => x.checked_mul(y).map(Int),
        (Tok::SlashSlash, Int(x), Int(y)) => {
            if y == 0 {
                return None;
            }
            let q = x.checked_div(y)?;
            // Python floors toward negative infinity; Rust truncates toward zero.
            let adjust = x % y != 0 && ((x < 0) != (y < 0));
            Some(Int(if adjust { q - 1 } else { q }))
        }
        (Tok::Slash, _, _) => {
            let d = b.as_f64();
            (d != 0.0).then(|| Float(a.as_f64() / d))
        }
        (Tok::SlashSlash, _, _) => {
            let d = b.as_f64();
            (d != 0.0).then(|| Float((a.as_f64() / d).floor()))
        }
        (Tok::Plus, _, _) => Some(Float(a.as_f64() + b.as_f64())),
        (Tok::Minus, _, _) => Some(Float(a.as_f64() - b.as_f64())),
        (Tok::Star, _, _) => Some(Float(a.as_f64() * b.as_f64())),
        _ => None,
    }
}

/// `repr(float)` as Python prints it: shortest round-trip digits, fixed notation for decimal
/// exponents in [-4, 16), scientific (`1e+16`, `1.5e-05`) outside, always a `.0` on whole numbers.
fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    // Rust's `{:e}` already yields the shortest round-trip digits: "d.ddde-N".
    let sci = format!("{:e}", x);
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            let (int_part, frac) = if digits.len() > int_len {
                (digits[..int_len].to_string(), digits[int_len..].to_string())
            } else {
                (format!("{digits:0<int_len$}"), String::new())
            };
            let frac = if frac.is_empty() { "0".into() } else { frac };
            format!("{sign}{int_part}.{frac}")
        } else {
            let zeros = "0".repeat((-exp - 1) as usize);
            format!("{sign}0.{zeros}{digits}")
        }
    } else {
        let (lead, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{lead}{frac}e{esign}{:02}", exp.abs())
    }
}

/// `'haystack'.count('needle')`, optionally wrapped in parentheses, with free spacing.
fn eval_count(s: &str) -> Option<usize> {
    let mut rest = s.trim();
    let mut depth = 0;
    while let Some(inner) = rest.strip_prefix('(') {
        rest = inner.trim_start().strip_suffix(')')?.trim_end();
        depth += 1;
        if depth > MAX_DEPTH {
            return None;
        }
    }
    let (haystack, rest) = string_literal(rest)?;
    let rest = rest.trim_start().strip_prefix('.')?.trim_start();
    let rest = rest.strip_prefix("count")?.trim_start().strip_prefix('(')?;
    let (needle, rest) = string_literal(rest.trim_start())?;
    if rest.trim() != ")" {
        return None;
    }
    // Non-overlapping occurrences; the empty needle matches at every char boundary, as in Python.
    Some(haystack.matches(needle).count())
}

/// A quoted literal at the start of `s`: returns its contents and what follows.
fn string_literal(s: &str) -> Option<(&str, &str)> {
    let quote = s.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let body = &s[1..];
    let end = body.find(quote)?;
    Some((&body[..end], &body[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calc(s: &str) -> Option<String> {
        use_calculator(s)
    }

    #[test]
    fn arithmetic_matches_python_results() {
        let cases = [
            ("1+2", "3"),
            ("2*3+4", "10"),
            ("2*(3+4)", "14"),
            ("10/2", "5.0"),
            ("1/3", "0.3333333333333333"),
            ("0.1+0.2", "0.30000000000000004"),
            ("7//2", "3"),
            ("-7//2", "-4"),
            ("7.5//2", "3.0"),
            ("-3", "-3"),
            ("--3", "3"),
            ("-(2+3)*2", "-10"),
            ("1,000 * 3", "3000"),
            ("1.5 * 2", "3.0"),
            (".5+1.", "1.5"),
            ("100000000 * 100000000", "10000000000000000"),
            ("100000000.0 * 100000000", "1e+16"),
            ("1/100000", "1e-05"),
            ("1/10000", "0.0001"),
            ("  ( 12 )  ", "12"),
            ("000", "0"),
            ("-0.0", "-0.0"),
            ("1000000000000000.0", "1000000000000000.0"),
            ("123456789 * 987654321", "121932631112635269"),
        ];
        for (expr, want) in cases {
            assert_eq!(calc(expr).as_deref(), Some(want), "{expr}");
        }
    }

    #[test]
    fn arithmetic_failures_give_no_output() {
        for expr in [
            "2**10", "1/0", "1//0", "1.0/0", "(1", "1)", "1 2", "", "()", "1..2", "1.2.3", "007",
            "1 / / 2", "2 * * 3", "+", ".",
        ] {
            assert_eq!(calc(expr), None, "{expr:?}");
        }
    }

    #[test]
    fn refuses_code_and_unknown_forms() {
        for expr in [
            "__import__('os').system('ls')",
            "open('/etc/passwd').read()",
            "'open door'.count('o')",
            "print(1)",
            "'abc'.upper()",
            "exec('1')",
            "[1,2]",
            "'a'.count('a'); 1",
            "lambda x: x",
            "'abc'.count('a') + 1",
            "x.count('a')",
            "'abc'.count(1)",
            "1 if 1 else 2",
        ] {
            assert_eq!(calc(expr), None, "{expr:?}");
        }
    }

    #[test]
    fn string_count_form() {
        assert_eq!(calc("'strawberry'.count('r')").as_deref(), Some("3"));
        assert_eq!(calc("\"banana\".count(\"an\")").as_deref(), Some("2"));
        assert_eq!(calc("('aaaa'.count('aa'))").as_deref(), Some("2"));
        assert_eq!(calc("'abc'.count( 'z' )").as_deref(), Some("0"));
        // nanochat looks for the literal text ".count(" first.
        assert_eq!(calc("'abc' . count('z')"), None);
        assert_eq!(calc("'abc'.count('')").as_deref(), Some("4"));
        // Commas vanish before evaluation, as in nanochat.
        assert_eq!(calc("'a,b,c'.count('b')").as_deref(), Some("1"));
    }

    #[test]
    fn bounds_huge_inputs() {
        let deep = format!("{}1{}", "(".repeat(500), ")".repeat(500));
        assert_eq!(calc(&deep), None);
        let long = "1+".repeat(MAX_EXPR_BYTES) + "1";
        assert_eq!(calc(&long), None);
        let big = "9".repeat(60);
        assert_eq!(calc(&format!("{big}*{big}")), None); // beyond 128-bit integers
        let minus = "-".repeat(200) + "1";
        assert_eq!(calc(&minus), None);
        let hay = "a".repeat(MAX_EXPR_BYTES + 1);
        assert_eq!(calc(&format!("'{hay}'.count('a')")), None);
    }

    #[test]
    fn float_repr_edge_cases() {
        assert_eq!(python_float_repr(1e16), "1e+16");
        assert_eq!(python_float_repr(1.5e-5), "1.5e-05");
        assert_eq!(python_float_repr(123.0), "123.0");
        assert_eq!(python_float_repr(1e100), "1e+100");
        assert_eq!(python_float_repr(-2.5), "-2.5");
        assert_eq!(python_float_repr(f64::INFINITY), "inf");
        assert_eq!(python_float_repr(0.0), "0.0");
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "[0-9+*/().\\- ,'\"a-z_]{0,64}") {
            let _ = use_calculator(&s);
        }

        #[test]
        fn integer_sums_are_exact(a in -1_000_000i64..1_000_000, b in -1_000_000i64..1_000_000) {
            let got = use_calculator(&format!("{a} + ({b}) * 3"));
            proptest::prop_assert_eq!(got, Some((a as i128 + b as i128 * 3).to_string()));
        }
    }
}
