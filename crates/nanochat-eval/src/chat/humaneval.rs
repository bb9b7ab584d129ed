//! HumanEval program assembly: imports from the prompt + the model's code + the tests.

/// The leading `import`/`from` lines of a prompt (blank and comment lines skipped, stopping at
/// the first other line), stripped, joined with newlines.
pub fn extract_imports(prompt: &str) -> String {
    let mut imports = Vec::new();
    for line in prompt.split('\n') {
        let s = super::super::core::render::py_strip(line);
        if s.starts_with("import ") || s.starts_with("from ") {
            imports.push(s);
        } else if !s.is_empty() && !s.starts_with('#') {
            break;
        }
    }
    imports.join("\n")
}

/// The first fenced code block (```` ``` ```` or ```` ```python ````, closed by a newline and
/// ```` ``` ````), stripped; otherwise the whole completion, stripped.
pub fn extract_program(completion: &str) -> String {
    // Mirrors the regex ```(?:python)?\s*\n(.*?)\n``` (non-greedy, DOTALL): after an opening
    // fence and optional `python`, skip whitespace up to (and including) the last newline that
    // still leaves a closing "\n```" reachable, then take the shortest body.
    let mut search_from = 0;
    while let Some(rel) = completion[search_from..].find("```") {
        let fence = search_from + rel;
        let mut p = fence + 3;
        if completion[p..].starts_with("python") {
            // The regex may also match without consuming "python" (then \s* cannot pass 'p'),
            // so consuming it is the only way forward.
            p += 6;
        }
        if let Some(body) = match_body(completion, p) {
            return super::super::core::render::py_strip(body).to_string();
        }
        search_from = fence + 1;
    }
    super::super::core::render::py_strip(completion).to_string()
}

/// At `p` (just after the fence), match `\s*\n(.*?)\n```` and return the body.
/// `\s*` is greedy with backtracking: try the newline positions inside the leading whitespace
/// run from the last to the first, and for each the shortest body closed by "\n```".
fn match_body(text: &str, p: usize) -> Option<&str> {
    let ws_end = p + text[p..]
        .find(|c: char| !c.is_whitespace())
        .unwrap_or(text.len() - p);
    let newlines: Vec<usize> = text[p..ws_end]
        .match_indices('\n')
        .map(|(i, _)| p + i)
        .collect();
    for &nl in newlines.iter().rev() {
        let body_start = nl + 1;
        // The body may be empty only if "\n```" starts right at body_start - 1... the regex needs
        // a literal "\n" after the body, so look for "\n```" at or after body_start.
        if let Some(close) = text[body_start..].find("\n```") {
            return Some(&text[body_start..body_start + close]);
        }
    }
    None
}

/// The program executed for a completion: imports, the completion's code, the tests, and
/// `check(entry_point)`.
pub fn build_program(prompt: &str, completion: &str, test: &str, entry_point: &str) -> String {
    format!(
        "{}\n\n{}\n\n{}\ncheck({})",
        extract_imports(prompt),
        extract_program(completion),
        test,
        entry_point
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_stop_at_first_code_line() {
        let p = "from typing import List\n\nimport math\n# c\ndef f():\n    import os\n";
        assert_eq!(extract_imports(p), "from typing import List\nimport math");
        assert_eq!(extract_imports("def f(): pass"), "");
    }

    #[test]
    fn program_from_fenced_or_plain_completion() {
        assert_eq!(
            extract_program("Here:\n```python\ndef f():\n    return 1\n```\nbye"),
            "def f():\n    return 1"
        );
        assert_eq!(extract_program("```\nx = 1\n```"), "x = 1");
        assert_eq!(extract_program("  def g(): pass  \n"), "def g(): pass");
        // unclosed fence: whole completion
        assert_eq!(extract_program("```python\nx = 1"), "```python\nx = 1");
        // two blocks: the first wins
        assert_eq!(extract_program("```\na\n```\n```\nb\n```"), "a");
    }
}
