//! Shell-style globs over function names: `*`, `?`, `[abc]`, `[a-z]`, `[!abc]`, and `\` to
//! escape. Unlike path globs, `*` matches any character, `:` and `/` included, so
//! `demo::*` and `*Command` both work on qualified names.

/// Longest pattern [`Glob::new`] accepts, in bytes. Matching costs up to pattern length ×
/// name length per name, and filters from gRPC are matched against every live span.
pub const MAX_GLOB_LEN: usize = 1024;

/// A parsed glob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    source: String,
    tokens: Vec<Token>,
    /// The literal characters the pattern starts and ends with (the whole pattern when it has
    /// no wildcard): a name without them is rejected without running the matcher. Resolving
    /// tries every pattern on every function name of every mapped library, hundreds of
    /// thousands of names for a server like PostgreSQL.
    prefix: String,
    suffix: String,
    literal: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Literal(char),
    Any,
    Star,
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

/// Why a glob could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    #[error("unclosed '[' character class")]
    UnclosedClass,
    #[error("trailing '\\' escapes nothing")]
    TrailingEscape,
    #[error("empty pattern")]
    Empty,
    #[error("pattern longer than {MAX_GLOB_LEN} bytes")]
    TooLong,
}

impl Glob {
    pub fn new(pattern: &str) -> Result<Self, GlobError> {
        if pattern.is_empty() {
            return Err(GlobError::Empty);
        }
        // Here rather than in each caller: the query and watch filters of the gRPC API once
        // reached this without a limit (found by the `glob` fuzz target).
        if pattern.len() > MAX_GLOB_LEN {
            return Err(GlobError::TooLong);
        }
        let mut tokens = Vec::new();
        let mut chars = pattern.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '*' => {
                    if tokens.last() != Some(&Token::Star) {
                        tokens.push(Token::Star);
                    }
                }
                '?' => tokens.push(Token::Any),
                '\\' => tokens.push(Token::Literal(
                    chars.next().ok_or(GlobError::TrailingEscape)?,
                )),
                '[' => {
                    let negated = matches!(chars.peek(), Some('!' | '^'));
                    if negated {
                        chars.next();
                    }
                    let mut ranges = Vec::new();
                    let mut first = true;
                    loop {
                        let c = chars.next().ok_or(GlobError::UnclosedClass)?;
                        if c == ']' && !first {
                            break;
                        }
                        first = false;
                        let low = if c == '\\' {
                            chars.next().ok_or(GlobError::TrailingEscape)?
                        } else {
                            c
                        };
                        let mut lookahead = chars.clone();
                        if lookahead.next() == Some('-')
                            && lookahead.peek().is_some_and(|&n| n != ']')
                        {
                            chars.next();
                            let high = chars.next().ok_or(GlobError::UnclosedClass)?;
                            ranges.push((low, high));
                        } else {
                            ranges.push((low, low));
                        }
                    }
                    tokens.push(Token::Class { negated, ranges });
                }
                c => tokens.push(Token::Literal(c)),
            }
        }
        let literal_chars = |tokens: &mut dyn Iterator<Item = &Token>| -> String {
            tokens
                .map_while(|t| match t {
                    Token::Literal(c) => Some(*c),
                    _ => None,
                })
                .collect()
        };
        let prefix = literal_chars(&mut tokens.iter());
        let literal = prefix.chars().count() == tokens.len();
        let suffix = if literal {
            String::new()
        } else {
            let reversed = literal_chars(&mut tokens.iter().rev());
            reversed.chars().rev().collect()
        };
        Ok(Glob {
            source: pattern.to_owned(),
            tokens,
            prefix,
            suffix,
            literal,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn matches(&self, text: &str) -> bool {
        if self.literal {
            return text == self.prefix;
        }
        if !text.starts_with(&self.prefix) || !text.ends_with(&self.suffix) {
            return false;
        }
        let text: Vec<char> = text.chars().collect();
        // Iterative matcher with single-star backtracking: linear for patterns with one
        // star, O(n·m) worst case, never exponential.
        let (mut t, mut p) = (0usize, 0usize);
        let mut backtrack: Option<(usize, usize)> = None;
        while t < text.len() {
            match self.tokens.get(p) {
                Some(Token::Star) => {
                    backtrack = Some((p, t));
                    p += 1;
                    continue;
                }
                Some(token) if token.matches_char(text[t]) => {
                    t += 1;
                    p += 1;
                    continue;
                }
                _ => {}
            }
            match backtrack {
                Some((star_p, star_t)) => {
                    p = star_p + 1;
                    t = star_t + 1;
                    backtrack = Some((star_p, star_t + 1));
                }
                None => return false,
            }
        }
        self.tokens[p..].iter().all(|t| *t == Token::Star)
    }
}

impl Token {
    fn matches_char(&self, c: char) -> bool {
        match self {
            Token::Literal(l) => *l == c,
            Token::Any => true,
            Token::Star => true,
            Token::Class { negated, ranges } => {
                ranges.iter().any(|&(low, high)| low <= c && c <= high) != *negated
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, text: &str) -> bool {
        Glob::new(pattern).expect("valid glob").matches(text)
    }

    #[test]
    fn literal_prefix_and_suffix_shortcuts_agree_with_the_matcher() {
        assert!(m("PortalRun", "PortalRun"));
        assert!(!m("PortalRun", "PortalRunFetch"));
        assert!(!m("PortalRun", "PortalRu"));
        assert!(m("*Command", "processCommand"));
        assert!(!m("*Command", "processCommands"));
        assert!(m("demo::*", "demo::fib"));
        assert!(!m("demo::*", "xdemo::fib"));
        assert!(m("ab*ba", "abba"));
        assert!(!m("ab*ba", "aba"), "prefix and suffix may not overlap");
        assert!(m("a\\*b", "a*b"), "an escaped star is a literal");
        assert!(!m("a\\*b", "axb"));
        assert!(m("é*ü", "éxü"));
    }

    #[test]
    fn literals_and_wildcards() {
        assert!(m("processCommand", "processCommand"));
        assert!(!m("processCommand", "processCommands"));
        assert!(m("process*", "processCommand"));
        assert!(m("*Command", "processCommand"));
        assert!(m("*ess*Com*", "processCommand"));
        assert!(m("fib?", "fib2"));
        assert!(!m("fib?", "fib"));
        assert!(m("demo::*", "demo::inner::helper"));
        assert!(m("*", ""));
        assert!(!m("a*b", "acbd"));
        assert!(m("a*b*c", "aXbYbZc"));
    }

    #[test]
    fn classes_and_escapes() {
        assert!(m("f[io]b", "fib"));
        assert!(m("f[a-j]b", "fib"));
        assert!(!m("f[!a-j]b", "fib"));
        assert!(m("f[!a-j]b", "fzb"));
        assert!(m("[]]x", "]x"));
        assert!(m(r"a\*b", "a*b"));
        assert!(!m(r"a\*b", "aXb"));
        assert!(m("x[-a]", "x-"));
    }

    #[test]
    fn bad_patterns() {
        assert_eq!(Glob::new("f[ab"), Err(GlobError::UnclosedClass));
        assert_eq!(Glob::new("f\\"), Err(GlobError::TrailingEscape));
        assert_eq!(Glob::new(""), Err(GlobError::Empty));
    }

    #[test]
    fn long_patterns_are_refused() {
        // Every caller gets the limit, not only `attach`'s pattern parser: the query and
        // watch filters come straight from gRPC.
        let longest = "*".repeat(MAX_GLOB_LEN);
        assert!(Glob::new(&longest).is_ok());
        assert_eq!(Glob::new(&format!("{longest}x")), Err(GlobError::TooLong));
        // Bytes, not characters.
        assert_eq!(
            Glob::new(&"\u{e9}".repeat(MAX_GLOB_LEN / 2 + 1)),
            Err(GlobError::TooLong)
        );
    }

    #[test]
    fn many_stars_stay_fast() {
        let glob = Glob::new("*a*a*a*a*a*a*a*a*b").expect("valid glob");
        let text = "a".repeat(5000);
        assert!(!glob.matches(&text));
    }
}
