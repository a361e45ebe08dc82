#![no_main]
//! Function globs as a gRPC client sends them (`scoped/src/glob.rs`: the `--func` patterns of
//! attach and the function filters of queries and watches), compiled and matched against a
//! name. Input: the pattern, a NUL byte, the text.
//!
//! Differential: every answer is checked against a reference written here from the syntax the
//! module documents (`*`, `?`, `[abc]`, `[a-z]`, `[!abc]`, `\` escapes) — a dynamic-programming
//! matcher, slow and obviously right — so a wrong match is a finding, not only a panic or a
//! hang.

use libfuzzer_sys::fuzz_target;
use scope_fuzz::glob::{Glob, GlobError};

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        // gRPC strings are UTF-8; prost rejects anything else before scoped sees it.
        return;
    };
    let (pattern, text) = input.split_once('\0').unwrap_or((input, ""));
    let glob = Glob::new(pattern);
    let reference = reference::parse(pattern);
    match (&glob, &reference) {
        (Ok(glob), Ok(tokens)) => {
            assert_eq!(glob.as_str(), pattern);
            assert_eq!(
                glob.matches(text),
                reference::matches(tokens, text),
                "{pattern:?} on {text:?}"
            );
        }
        (Err(error), Err(expected)) => assert_eq!(error, expected, "{pattern:?}"),
        _ => panic!("{pattern:?}: glob says {glob:?}, the reference {reference:?}"),
    }
});

mod reference {
    use super::GlobError;

    /// Longest pattern accepted, in bytes, as `GlobError::TooLong` documents it.
    const MAX_LEN: usize = 1024;

    #[derive(Debug)]
    pub enum Token {
        Char(char),
        Any,
        Star,
        Class(bool, Vec<(char, char)>),
    }

    pub fn parse(pattern: &str) -> Result<Vec<Token>, GlobError> {
        if pattern.is_empty() {
            return Err(GlobError::Empty);
        }
        if pattern.len() > MAX_LEN {
            return Err(GlobError::TooLong);
        }
        let chars: Vec<char> = pattern.chars().collect();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            match chars[i] {
                '*' => tokens.push(Token::Star),
                '?' => tokens.push(Token::Any),
                '\\' => {
                    i += 1;
                    tokens.push(Token::Char(*chars.get(i).ok_or(GlobError::TrailingEscape)?));
                }
                '[' => {
                    i += 1;
                    let negated = matches!(chars.get(i), Some('!' | '^'));
                    if negated {
                        i += 1;
                    }
                    let mut ranges = Vec::new();
                    // `]` right after `[` or `[!` is a member, not the end.
                    let mut first = true;
                    loop {
                        let c = *chars.get(i).ok_or(GlobError::UnclosedClass)?;
                        if c == ']' && !first {
                            break;
                        }
                        first = false;
                        let low = if c == '\\' {
                            i += 1;
                            *chars.get(i).ok_or(GlobError::TrailingEscape)?
                        } else {
                            c
                        };
                        // `a-z`; a `-` before the closing `]` is a member.
                        if chars.get(i + 1) == Some(&'-')
                            && chars.get(i + 2).is_some_and(|&c| c != ']')
                        {
                            ranges.push((low, chars[i + 2]));
                            i += 3;
                        } else {
                            ranges.push((low, low));
                            i += 1;
                        }
                    }
                    tokens.push(Token::Class(negated, ranges));
                }
                c => tokens.push(Token::Char(c)),
            }
            i += 1;
        }
        Ok(tokens)
    }

    /// `matched[t]`: the tokens so far can match the first `t` characters of the text.
    pub fn matches(tokens: &[Token], text: &str) -> bool {
        let text: Vec<char> = text.chars().collect();
        let mut matched = vec![false; text.len() + 1];
        matched[0] = true;
        for token in tokens {
            let mut next = vec![false; text.len() + 1];
            // For a star: some prefix up to here matched.
            let mut any_before = false;
            for t in 0..=text.len() {
                any_before |= matched[t];
                match token {
                    Token::Star => next[t] = any_before,
                    _ if t == 0 => {}
                    Token::Any => next[t] = matched[t - 1],
                    Token::Char(c) => next[t] = matched[t - 1] && text[t - 1] == *c,
                    Token::Class(negated, ranges) => {
                        let c = text[t - 1];
                        let member = ranges.iter().any(|&(low, high)| low <= c && c <= high);
                        next[t] = matched[t - 1] && member != *negated;
                    }
                }
            }
            matched = next;
        }
        matched[text.len()]
    }
}
