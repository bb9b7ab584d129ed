//! GSM8K answer extraction (`#### N`, the official normalization).

/// The number after the first `#### ` marker, with thousands separators removed:
/// an optional `-` followed by digits, dots and commas (the reference's
/// `#### (\-?[0-9\.\,]+)`). `None` when there is no such marker.
pub fn extract_answer(text: &str) -> Option<String> {
    let mut rest = text;
    while let Some(pos) = rest.find("#### ") {
        let after = &rest[pos + 5..];
        let neg = after.starts_with('-');
        let body = if neg { &after[1..] } else { after };
        let len = body
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ','))
            .unwrap_or(body.len());
        if len > 0 {
            let num: String = body[..len].chars().filter(|&c| c != ',').collect();
            return Some(if neg { format!("-{num}") } else { num });
        }
        rest = &rest[pos + 1..];
    }
    None
}

/// The reference answer of a GSM8K solution: extraction applied to the text after the last
/// calculator annotation (`<<...>>`), as the reference takes the last text part.
pub fn reference_answer(solution: &str) -> Option<String> {
    let tail = solution.rsplit(">>").next().unwrap_or(solution);
    extract_answer(tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extraction_follows_the_official_rule() {
        assert_eq!(extract_answer("so 5+5=10\n#### 10"), Some("10".into()));
        assert_eq!(
            extract_answer("#### 1,234.5 dollars"),
            Some("1234.5".into())
        );
        assert_eq!(extract_answer("#### -7"), Some("-7".into()));
        assert_eq!(extract_answer("no marker 42"), None);
        assert_eq!(extract_answer("####42"), None);
        assert_eq!(extract_answer("#### x then #### 3"), Some("3".into()));
        assert_eq!(extract_answer("#### 3\n#### 4"), Some("3".into()));
        // a lone minus sign is not a number; a trailing period is part of the match
        assert_eq!(extract_answer("#### - 5"), None);
        assert_eq!(extract_answer("#### 18."), Some("18.".into()));
    }

    #[test]
    fn reference_uses_last_text_part() {
        let sol = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18";
        assert_eq!(reference_answer(sol), Some("18".into()));
    }
}
