//! restic's include/exclude patterns (`internal/filter`), matched the way restic matches them,
//! so stream mode leaves out and restores exactly what direct mode's restic would.
//!
//! A path is given as restic sees it in a snapshot of the volume: rooted at the volume,
//! `/data/a.db`. A pattern with a leading `/` is anchored there; one without matches any run
//! of consecutive components at any depth (`bar` matches `/foo/bar/baz`); `**` matches any
//! number of intermediate directories; `*`, `?`, `[...]` and `\` are Go's `filepath.Match`;
//! a leading `!` cancels earlier matches of the list. Patterns are cleaned as Go's
//! `filepath.Clean` does (`./data` is `data`, `/foo//bar/` is `/foo/bar`).

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A pattern that cannot be parsed, or that can never match an entry of a volume.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("failed to parse pattern {pattern:?}: bad glob syntax")]
    Syntax { pattern: String },
    #[error("failed to use pattern {pattern:?}: it can match nothing ({reason})")]
    MatchesNothing {
        pattern: String,
        reason: &'static str,
    },
    #[error("failed to anchor patterns beneath {root:?}: the path is not UTF-8")]
    RootNotUtf8 { root: String },
}

impl PatternError {
    pub fn category(&self) -> &'static str {
        "bad-pattern"
    }

    /// Bad input does not get better by retrying.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// One component of a pattern. `**` is stored as the empty string (restic's trick: no
/// component of a split, cleaned pattern is otherwise empty, except after a lone `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Part {
    text: String,
    simple: bool,
}

impl Part {
    fn new(text: &str) -> Part {
        Part {
            simple: !text.contains(['\\', '[', ']', '*', '?']),
            text: if text == "**" {
                String::new()
            } else {
                text.to_owned()
            },
        }
    }

    fn is_double_star(&self) -> bool {
        self.text.is_empty()
    }

    /// Go's pattern errors are syntax errors only, rejected up front by [`Patterns::new`], so
    /// a match that still errors cannot happen; it counts as no match.
    fn matches(&self, name: &[u8]) -> bool {
        if self.simple {
            self.text.as_bytes() == name
        } else {
            glob_match(self.text.as_bytes(), name).unwrap_or(false)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    original: String,
    parts: Vec<Part>,
    negated: bool,
}

/// A parsed list of patterns, as restic's `ParsePatterns` makes it (empty ones dropped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patterns {
    list: Vec<Pattern>,
}

impl Patterns {
    /// Parses and validates every pattern, as restic does before a backup or restore starts
    /// (`ValidatePatterns`), and refuses one that can match nothing (a `..` or `.` left after
    /// cleaning: no entry has that name), which restic would silently accept.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Patterns, PatternError> {
        let mut list = Vec::new();
        for original in patterns.iter().map(AsRef::as_ref) {
            if original.is_empty() {
                continue;
            }
            let (negated, body) = match original.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, original),
            };
            let cleaned = clean(body);
            let parts: Vec<Part> = split_path(&cleaned).iter().map(|p| Part::new(p)).collect();
            for part in &parts {
                if glob_match(part.text.as_bytes(), part.text.as_bytes()).is_err() {
                    return Err(PatternError::Syntax {
                        pattern: original.to_owned(),
                    });
                }
                if part.text == ".." || part.text == "." {
                    return Err(PatternError::MatchesNothing {
                        pattern: original.to_owned(),
                        reason: "no entry is named '.' or '..'",
                    });
                }
            }
            list.push(Pattern {
                original: original.to_owned(),
                parts,
                negated,
            });
        }
        Ok(Patterns { list })
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The patterns as given (empty ones dropped).
    pub fn originals(&self) -> impl Iterator<Item = &str> {
        self.list.iter().map(|p| p.original.as_str())
    }

    /// Does the list match this path (restic's `List`)? The path is rooted at the volume:
    /// `/data/a.db`.
    pub fn matches(&self, path: &Path) -> bool {
        self.list_match(path, false).0
    }

    /// (matched, a child of this path may match): restic's `ListWithChild`, which decides
    /// whether an include list lets a directory be entered.
    pub fn matches_with_child(&self, path: &Path) -> (bool, bool) {
        self.list_match(path, true)
    }

    fn list_match(&self, path: &Path, check_child: bool) -> (bool, bool) {
        let bytes = path.as_os_str().as_bytes();
        if self.list.is_empty() || bytes.is_empty() {
            return (false, false);
        }
        let strs = split_bytes(bytes);
        let has_negated = self.list.iter().any(|p| p.negated);
        let (mut matched, mut child) = (false, false);
        for pat in &self.list {
            let m = match_parts(&pat.parts, &strs);
            let c = !check_child || child_match(&pat.parts, &strs);
            if pat.negated {
                matched = matched && !m;
                child = child && !m;
            } else {
                matched = matched || m;
                child = child || c;
                if matched && child && !has_negated {
                    // Without negated patterns the result cannot change any more.
                    break;
                }
            }
        }
        (matched, child)
    }

    /// The same patterns for a restic that sees the volume at its host path `root` (direct
    /// mode matches absolute host paths): an anchored pattern gets the (escaped) root in
    /// front, an unanchored one `root/**/` so that it still matches only inside the volume,
    /// never a component of the host path above it (`pods`, `volumes`). Both modes match
    /// these against the host path, so they leave out the same files by construction.
    pub fn beneath(&self, root: &Path) -> Result<Vec<String>, PatternError> {
        let root_str = root.to_str().ok_or_else(|| PatternError::RootNotUtf8 {
            root: root.display().to_string(),
        })?;
        let mut prefix = String::new();
        for c in root_str.trim_end_matches('/').chars() {
            if matches!(c, '\\' | '*' | '?' | '[' | ']') {
                prefix.push('\\');
            }
            prefix.push(c);
        }
        Ok(self
            .list
            .iter()
            .map(|p| {
                let body = p
                    .original
                    .strip_prefix('!')
                    .filter(|_| p.negated)
                    .unwrap_or(&p.original);
                let cleaned = clean(body);
                let bang = if p.negated { "!" } else { "" };
                if cleaned.starts_with('/') {
                    format!("{bang}{prefix}{cleaned}")
                } else {
                    format!("{bang}{prefix}/**/{cleaned}")
                }
            })
            .collect())
    }
}

/// Go's `filepath.Clean` on a slash-separated path.
fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if out.last().is_some_and(|l| *l != "..") {
                    out.pop();
                } else if !rooted {
                    out.push("..");
                }
            }
            p => out.push(p),
        }
    }
    let joined = out.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

/// restic's `splitPath`: components, the first `/` for an absolute path.
fn split_path(p: &str) -> Vec<&str> {
    let mut parts: Vec<&str> = p.split('/').collect();
    if parts.first() == Some(&"") {
        parts[0] = "/";
    }
    parts
}

fn split_bytes(p: &[u8]) -> Vec<&[u8]> {
    let mut parts: Vec<&[u8]> = p.split(|b| *b == b'/').collect();
    if parts.first().is_some_and(|f| f.is_empty()) {
        parts[0] = b"/";
    }
    parts
}

fn double_star(parts: &[Part]) -> Option<usize> {
    parts.iter().position(Part::is_double_star)
}

/// restic's `match`: each `**` is expanded into zero, one, two … `*` components (as many as
/// fit: restic stops where the pattern, its other `**` counted as one component each, would
/// be longer than the path), an anchored pattern matches a prefix of the path, an
/// unanchored one any run of consecutive components. Computed one part at a time over the
/// positions of the path, keeping for each the latest start of a run the parts so far
/// match ending there (a later start leaves more room for the rest), so a path of `n`
/// components costs `parts × n` steps. restic's expansion costs `n²` and more per path,
/// which a tenant's tree thousands of directories deep turns into hours of walking.
fn match_parts(parts: &[Part], strs: &[&[u8]]) -> bool {
    let Some(first) = parts.first() else {
        return strs.is_empty();
    };
    let n = strs.len();
    let anchored = first.text == "/";
    // An unanchored pattern never matches the root marker itself.
    let min_offset = usize::from(!anchored && strs.first() == Some(&&b"/"[..]));
    if parts.iter().all(Part::is_double_star) {
        // All expanded to nothing is the empty pattern, which only the empty path matches
        // (and restic gets there only with one `**`); otherwise one `*` is enough, once the
        // others fit.
        return if n == 0 {
            parts.len() == 1
        } else {
            n + 1 >= parts.len() && n > min_offset
        };
    }
    // start[p]: the latest start of a run of components ending just before `p` that the
    // parts so far match.
    let mut start: Vec<Option<usize>> = vec![None; n + 1];
    if anchored {
        start[0] = Some(0);
    } else {
        for (p, s) in start.iter_mut().enumerate().skip(min_offset) {
            *s = Some(p);
        }
    }
    for (i, part) in parts.iter().enumerate() {
        if part.is_double_star() {
            // Any number of `*` (each matches any component), as long as the pattern
            // expanded so far and the parts after it (a `**` as one) fit in the path.
            let Some(room) = n.checked_sub(parts.len() - i - 1) else {
                return false;
            };
            let mut latest = None;
            for (q, s) in start.iter_mut().enumerate() {
                latest = latest.max(*s);
                *s = latest.filter(|o| q - o <= room);
            }
        } else {
            for p in (0..n).rev() {
                start[p + 1] = start[p].filter(|_| part.matches(strs[p]));
            }
            start[0] = None;
        }
        if start.iter().all(Option::is_none) {
            return false;
        }
    }
    true
}

/// restic's `childMatch`: could something beneath this path match? Unanchored patterns always
/// may; an anchored one if the path matches its prefix (up to the first `**`).
fn child_match(parts: &[Part], strs: &[&[u8]]) -> bool {
    if parts.first().is_none_or(|p| p.text != "/") {
        return true;
    }
    let mut strs = strs;
    if let Some(pos) = double_star(parts)
        && strs.len() >= pos
    {
        strs = &strs[..pos];
    }
    let l = strs.len().min(parts.len());
    match_parts(&parts[..l], strs)
}

/// Go's `filepath.Match` on Unix, over bytes (a name need not be UTF-8; an invalid byte is
/// one character, as Go decodes it). `Err` is Go's `ErrBadPattern`, which Go reports for a
/// malformed pattern whatever the name.
fn glob_match(mut pattern: &[u8], mut name: &[u8]) -> Result<bool, ()> {
    'pattern: while !pattern.is_empty() {
        let (star, chunk, rest) = scan_chunk(pattern);
        pattern = rest;
        if star && chunk.is_empty() {
            // A trailing star matches the rest of the name if it has no separator.
            return Ok(!name.contains(&b'/'));
        }
        let (t, ok) = match_chunk(chunk, name)?;
        if ok && (t.is_empty() || !pattern.is_empty()) {
            name = t;
            continue;
        }
        if star {
            let mut i = 0;
            while i < name.len() && name[i] != b'/' {
                let (t, ok) = match_chunk(chunk, &name[i + 1..])?;
                if ok {
                    // The last chunk must take the whole rest of the name.
                    if pattern.is_empty() && !t.is_empty() {
                        i += 1;
                        continue;
                    }
                    name = t;
                    continue 'pattern;
                }
                i += 1;
            }
        }
        // No match; the rest of the pattern must still be well-formed.
        while !pattern.is_empty() {
            let (_, chunk, rest) = scan_chunk(pattern);
            pattern = rest;
            match_chunk(chunk, b"")?;
        }
        return Ok(false);
    }
    Ok(name.is_empty())
}

/// The next run of non-star pattern, and whether stars came before it.
fn scan_chunk(mut pattern: &[u8]) -> (bool, &[u8], &[u8]) {
    let mut star = false;
    while let [b'*', rest @ ..] = pattern {
        pattern = rest;
        star = true;
    }
    let mut in_range = false;
    let mut i = 0;
    while i < pattern.len() {
        match pattern[i] {
            b'\\' if i + 1 < pattern.len() => i += 1,
            b'[' => in_range = true,
            b']' => in_range = false,
            b'*' if !in_range => break,
            _ => {}
        }
        i += 1;
    }
    (star, &pattern[..i], &pattern[i..])
}

/// Does `chunk` (no stars) match the start of `s`? Returns the rest of `s`. After a failure
/// the chunk is still parsed to the end, so a malformed pattern is always an error.
fn match_chunk<'a>(mut chunk: &[u8], mut s: &'a [u8]) -> Result<(&'a [u8], bool), ()> {
    let mut failed = false;
    while let Some(&c) = chunk.first() {
        if !failed && s.is_empty() {
            failed = true;
        }
        match c {
            b'[' => {
                let mut r = 0;
                if !failed {
                    let (rune, n) = decode_rune(s);
                    r = rune;
                    s = &s[n..];
                }
                chunk = &chunk[1..];
                let negated = chunk.first() == Some(&b'^');
                if negated {
                    chunk = &chunk[1..];
                }
                let mut matched = false;
                let mut ranges = 0;
                loop {
                    if chunk.first() == Some(&b']') && ranges > 0 {
                        chunk = &chunk[1..];
                        break;
                    }
                    let (lo, rest) = get_esc(chunk)?;
                    chunk = rest;
                    let mut hi = lo;
                    if chunk.first() == Some(&b'-') {
                        let (h, rest) = get_esc(&chunk[1..])?;
                        hi = h;
                        chunk = rest;
                    }
                    if lo <= r && r <= hi {
                        matched = true;
                    }
                    ranges += 1;
                }
                if matched == negated {
                    failed = true;
                }
            }
            b'?' => {
                if !failed {
                    if s[0] == b'/' {
                        failed = true;
                    }
                    let (_, n) = decode_rune(s);
                    s = &s[n..];
                }
                chunk = &chunk[1..];
            }
            _ => {
                if c == b'\\' {
                    chunk = &chunk[1..];
                    if chunk.is_empty() {
                        return Err(());
                    }
                }
                if !failed {
                    if chunk[0] != s[0] {
                        failed = true;
                    }
                    s = &s[1..];
                }
                chunk = &chunk[1..];
            }
        }
    }
    Ok(if failed { (&[], false) } else { (s, true) })
}

/// One character of a `[...]` class, possibly escaped.
fn get_esc(chunk: &[u8]) -> Result<(u32, &[u8]), ()> {
    let mut chunk = chunk;
    match chunk.first() {
        None | Some(b'-') | Some(b']') => return Err(()),
        Some(b'\\') => {
            chunk = &chunk[1..];
            if chunk.is_empty() {
                return Err(());
            }
        }
        _ => {}
    }
    let (r, n) = decode_rune(chunk);
    if r == REPLACEMENT && n == 1 {
        return Err(());
    }
    let rest = &chunk[n..];
    if rest.is_empty() {
        return Err(());
    }
    Ok((r, rest))
}

const REPLACEMENT: u32 = 0xFFFD;

/// Go's `utf8.DecodeRune`: an invalid or empty sequence is U+FFFD of width 1 (0 if empty).
fn decode_rune(s: &[u8]) -> (u32, usize) {
    let Some(&first) = s.first() else {
        return (REPLACEMENT, 0);
    };
    let width = match first {
        0x00..=0x7F => 1,
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => return (REPLACEMENT, 1),
    };
    match s.get(..width).and_then(|b| std::str::from_utf8(b).ok()) {
        Some(text) => (text.chars().next().map_or(REPLACEMENT, u32::from), width),
        None => (REPLACEMENT, 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn star() -> Part {
        Part {
            text: "*".into(),
            simple: false,
        }
    }

    /// restic's `match` as restic computes it (the reference for [`match_parts`]): `**` is tried as zero, one, two … `*` components; an anchored pattern
    /// matches a prefix of the path, an unanchored one any run of consecutive components.
    fn expanded_match(parts: &[Part], strs: &[&[u8]]) -> bool {
        if let Some(pos) = double_star(parts) {
            // Go's loop runs while stars <= len(strs) - len(parts) + 1.
            let tries = (strs.len() + 1).checked_sub(parts.len());
            for stars in tries.map_or(0..0, |t| 0..t + 1) {
                let mut expanded: Vec<Part> = parts[..pos].to_vec();
                expanded.extend((0..stars).map(|_| star()));
                expanded.extend_from_slice(&parts[pos + 1..]);
                if expanded_match(&expanded, strs) {
                    return true;
                }
            }
            return false;
        }
        if parts.is_empty() {
            return strs.is_empty();
        }
        if parts.len() > strs.len() {
            return false;
        }
        let mut min_offset = 0;
        let mut max_offset = strs.len() - parts.len();
        if parts[0].text == "/" {
            max_offset = 0;
        } else if strs[0] == b"/" {
            // An unanchored pattern never matches the root marker itself.
            min_offset = 1;
        }
        (min_offset..=max_offset).rev().any(|offset| {
            (0..parts.len())
                .rev()
                .all(|i| parts[i].matches(strs[offset + i]))
        })
    }

    /// Every pattern of up to four parts from a small alphabet (`/`, literals, `*`, `?`,
    /// `**`) against every path of up to five components: the same answer as restic's
    /// expansion.
    #[test]
    fn matching_agrees_with_restics_expansion() {
        let alphabet = ["a", "b", "*", "?", "**", "a*"];
        let names = ["a", "b", "ab"];
        let mut patterns: Vec<Vec<Part>> = vec![vec![]];
        for len in 1..=4 {
            let mut next = Vec::new();
            for p in patterns.iter().filter(|p| p.len() == len - 1) {
                for a in alphabet {
                    let mut q = p.clone();
                    q.push(Part::new(a));
                    next.push(q);
                }
            }
            patterns.extend(next);
        }
        let anchored: Vec<Vec<Part>> = patterns
            .iter()
            .map(|p| [vec![Part::new("/")], p.clone()].concat())
            .collect();
        patterns.extend(anchored);
        let mut paths: Vec<Vec<&[u8]>> = vec![vec![]];
        for len in 1..=5 {
            let mut next = Vec::new();
            for p in paths.iter().filter(|p| p.len() == len - 1) {
                for n in names {
                    let mut q = p.clone();
                    q.push(n.as_bytes());
                    next.push(q);
                }
            }
            paths.extend(next);
        }
        let rooted: Vec<Vec<&[u8]>> = paths
            .iter()
            .map(|p| [vec![&b"/"[..]], p.clone()].concat())
            .collect();
        paths.extend(rooted);
        let mut checked = 0;
        for pattern in &patterns {
            for path in &paths {
                assert_eq!(
                    match_parts(pattern, path),
                    expanded_match(pattern, path),
                    "{pattern:?} against {path:?}"
                );
                checked += 1;
            }
        }
        assert!(checked > 1_000_000, "{checked}");
    }

    /// A path thousands of components deep (a tenant's chain of directories) is matched
    /// in time linear in its depth, where restic's expansion is quadratic or worse.
    #[test]
    fn deep_paths_match_without_expanding_double_stars() {
        let p = Patterns::new(&["/vol/**/x/*.log", "/vol/data/**/y"]).unwrap();
        let deep = format!("/vol/{}z.log", "d/".repeat(50_000));
        assert!(!p.matches(Path::new(&deep)));
        let deep = format!("/vol/{}x/z.log", "d/".repeat(50_000));
        assert!(p.matches(Path::new(&deep)));
    }

    fn one(pattern: &str, path: &str) -> bool {
        if pattern.is_empty() {
            // restic's Match: the empty pattern matches everything.
            return true;
        }
        Patterns::new(&[pattern]).unwrap().matches(Path::new(path))
    }

    fn child(pattern: &str, path: &str) -> bool {
        if pattern.is_empty() {
            return true;
        }
        let p = Patterns::new(&[pattern]).unwrap();
        let strs = split_bytes(path.as_bytes());
        child_match(&p.list[0].parts, &strs)
    }

    /// restic's `matchTests` (internal/filter/filter_test.go), the Unix cases with a
    /// non-empty path.
    #[test]
    fn match_table() {
        let table: &[(&str, &str, bool)] = &[
            ("", "foo", true),
            ("", "/x/y/z/foo", true),
            ("*.go", "/foo/bar/test.go", true),
            ("*.c", "/foo/bar/test.go", false),
            ("*", "/foo/bar/test.go", true),
            ("**", "/foo/bar/test.go", true),
            ("foo*", "/foo/bar/test.go", true),
            ("bar*", "/foo/bar/test.go", true),
            ("/bar*", "/foo/bar/test.go", false),
            ("bar/*", "/foo/bar/test.go", true),
            ("baz/*", "/foo/bar/test.go", false),
            ("bar/test.go", "/foo/bar/test.go", true),
            ("bar/*.go", "/foo/bar/test.go", true),
            ("ba*/*.go", "/foo/bar/test.go", true),
            ("bb*/*.go", "/foo/bar/test.go", false),
            ("test.*", "/foo/bar/test.go", true),
            ("tesT.*", "/foo/bar/test.go", false),
            ("bar/*", "/foo/bar/baz", true),
            ("bar", "/foo/bar", true),
            ("/foo/bar", "/foo/bar", true),
            ("/foo/bar/", "/foo/bar", true),
            ("/foo/bar", "/foo/baz", false),
            ("/foo/bar", "/foo/baz/", false),
            ("/foo///bar", "/foo/bar", true),
            ("/foo/../bar", "/foo/bar", false),
            ("/foo/../bar", "/bar", true),
            ("/foo", "/foo/baz", true),
            ("/foo/", "/foo/baz", true),
            ("/foo/*", "/foo", false),
            ("/foo/*", "/foo/baz", true),
            ("bar", "/foo/bar/baz", true),
            ("bar", "/foo/bar/test.go", true),
            ("/foo/*test.*", "/foo/bar/test.go", false),
            ("/foo/*/test.*", "/foo/bar/test.go", true),
            ("/foo/*/bar/test.*", "/foo/bar/test.go", false),
            ("/*/*/bar/test.*", "/foo/bar/test.go", false),
            ("/*/*/bar/test.*", "/foo/bar/baz/test.go", false),
            ("/*/*/baz/test.*", "/foo/bar/baz/test.go", true),
            ("/*/foo/bar/test.*", "/foo/bar/baz/test.go", false),
            ("/foo/bar/test.*", "bar/baz/test.go", false),
            ("/x/y/bar/baz/test.*", "bar/baz/test.go", false),
            ("/x/y/bar/baz/test.c", "bar/baz/test.go", false),
            ("baz/test.*", "bar/baz/test.go", true),
            ("baz/tesT.*", "bar/baz/test.go", false),
            ("test.go", "bar/baz/test.go", true),
            ("*.go", "bar/baz/test.go", true),
            ("*.c", "bar/baz/test.go", false),
            ("sdk", "/foo/bar/sdk", true),
            ("sdk", "/foo/bar/sdk/test/sdk_foo.go", true),
            (
                "sdk/*/cpp/*/*vars*.html",
                "/usr/share/doc/libreoffice/sdk/docs/cpp/ref/a00517.html",
                false,
            ),
            (
                "foo/**/bar/*.go",
                "/home/user/foo/work/special/project/bar/test.go",
                true,
            ),
            ("foo/**/bar/*.go", "/home/user/foo/bar/test.go", true),
            ("foo/**/bar/*.go", "x/foo/bar/test.go", true),
            ("foo/**/bar/*.go", "foo/bar/test.go", true),
            ("foo/**/bar/*.go", "foo/bar/baz/bar/test.go", true),
            ("foo/**/bar/*.go", "/home/user/foo/test.c", false),
            ("foo/**/bar/*.go", "bar/foo/main.go", false),
            ("foo/**/bar/*.go", "/foo/bar/main.go", true),
            ("foo/**/bar/*.go", "bar/main.go", false),
            ("foo/**/bar", "/home/user/foo/x/y/bar", true),
            ("foo/**/bar", "/home/user/foo/x/y/bar/main.go", true),
            ("foo/**/bar/**/x", "/home/user/foo/bar/x", true),
            (
                "foo/**/bar/**/x",
                "/home/user/foo/blaaa/blaz/bar/shared/work/x",
                true,
            ),
            ("user/**/important*", "/home/user/work/x/y/hidden/x", false),
            (
                "user/**/hidden*/**/c",
                "/home/user/work/x/y/hidden/z/a/b/c",
                true,
            ),
            ("/home/[uU]ser/?.go", "/home/user/F.go", true),
            ("/home/[^a-t]ser/*", "/home/user/F.go", true),
            ("/home/[^u]ser/*", "/home/user/F.go", false),
            ("a\\*b", "/x/a*b", true),
            ("a\\*b", "/x/axb", false),
            ("?", "/x/é", true),
            ("./data", "/data/a.db", true),
            ("data/*.db", "/data/a.db", true),
            ("**/a.db", "/data/a.db", true),
            ("/data", "/x/data", false),
        ];
        for (pattern, path, want) in table {
            assert_eq!(one(pattern, path), *want, "Match({pattern:?}, {path:?})");
        }
    }

    /// restic's `childMatchTests`.
    #[test]
    fn child_match_table() {
        let table: &[(&str, &str, bool)] = &[
            ("", "/foo", true),
            ("foo/bar", "/foo", true),
            ("baz/bar", "/foo", true),
            ("foo", "/foo/bar", true),
            ("bar", "/foo", true),
            ("baz", "/foo/bar", true),
            ("*", "/foo", true),
            ("*", "/foo/bar", true),
            ("/foo/bar", "/foo", true),
            ("/foo/bar/baz", "/foo", true),
            ("/foo/bar/baz", "/foo/bar", true),
            ("/foo/bar/baz", "/foo/baz", false),
            ("/foo/**/baz", "/foo/bar/baz", true),
            ("/foo/**/baz", "/foo/bar/baz/blah", true),
            ("/foo/**/qux", "/foo/bar/baz/qux", true),
            ("/foo/**/qux", "/foo/bar/baz", true),
            ("/foo/**/qux", "/foo/bar/baz/boo", true),
            ("/foo/**", "/foo/bar/baz", true),
            ("/foo/**", "/foo/bar", true),
            ("foo/**/bar/**/x", "/home/user/foo", true),
            ("foo/**/bar/**/x", "/home/user/foo/bar", true),
            (
                "foo/**/bar/**/x",
                "/home/user/foo/blaaa/blaz/bar/shared/work/x",
                true,
            ),
            ("/foo/*/qux", "/foo/bar", true),
            ("/foo/*/qux", "/foo/bar/boo", false),
            ("/foo/*/qux", "/foo/bar/boo/xx", false),
            ("/baz/bar", "/foo", false),
            ("/foo", "/foo/bar", true),
            ("/*", "/foo", true),
            ("/*", "/foo/bar", true),
            ("/**", "/foo", true),
            ("/*/**", "/foo", true),
            ("/*/**", "/foo/bar", true),
            ("/*/bar", "/foo", true),
            ("/bar/*", "/foo", false),
            ("/foo/*/baz", "/foo/bar", true),
            ("/foo/*/baz", "/foo/baz", true),
            ("/foo/*/baz", "/bar/baz", false),
            ("/**/*", "/foo", true),
            ("/**/bar", "/foo/bar", true),
        ];
        for (pattern, path, want) in table {
            assert_eq!(
                child(pattern, path),
                *want,
                "ChildMatch({pattern:?}, {path:?})"
            );
        }
    }

    /// restic's `filterListTests`, and the negated cases of its later version.
    #[test]
    fn list_table() {
        let table: &[(&[&str], &str, bool, bool)] = &[
            (&[], "/foo/bar/test.go", false, false),
            (&["*.go"], "/foo/bar/test.go", true, true),
            (&["*.go"], "/foo/bar", false, true),
            (&["*.c"], "/foo/bar/test.go", false, true),
            (&["*.go", "*.c"], "/foo/bar/test.go", true, true),
            (&["*"], "/foo/bar/test.go", true, true),
            (&["x"], "/foo/bar/test.go", false, true),
            (&["?"], "/foo/bar/test.go", false, true),
            (&["?", "x"], "/foo/bar/x", true, true),
            (&["/*/*/bar/test.*"], "/foo/bar/test.go", false, false),
            (&["/*/*/bar/test.*"], "/foo/bar/bar", false, true),
            (&["/*/*/bar/test.*", "*.go"], "/foo/bar/test.go", true, true),
            (&["", "*.c"], "/foo/bar/test.go", false, true),
            (&["/foo/bar/*"], "/foo", false, true),
            (&["/foo/**/test.c"], "/foo/bar/foo/bar/test.c", true, true),
            (&["/foo/*/test.c"], "/foo/bar/foo/bar/test.c", false, false),
            (&["*", "!*.c"], "/foo/bar/test.c", false, false),
            (&["*", "!*.c"], "/foo/bar/test.go", true, true),
            (&["!*.c", "*"], "/foo/bar/test.c", true, true),
            (&["/foo/**", "!/foo/keep"], "/foo/keep", false, false),
            (&["/foo/**", "!/foo/keep"], "/foo/keep/x", false, false),
            (&["/foo/**", "!/foo/keep"], "/foo/other", true, true),
        ];
        for (patterns, path, want, want_child) in table {
            let p = Patterns::new(patterns).unwrap();
            assert_eq!(
                p.matches(Path::new(path)),
                *want,
                "List({patterns:?}, {path:?})"
            );
            assert_eq!(
                p.matches_with_child(Path::new(path)),
                (*want, *want_child),
                "ListWithChild({patterns:?}, {path:?})"
            );
        }
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["test/[", "test/**/[", "a[", "[]a]x", "x\\", "[a-]"] {
            assert!(
                matches!(Patterns::new(&[bad]), Err(PatternError::Syntax { .. })),
                "{bad:?} accepted"
            );
        }
        for nothing in ["..", "../x", ".", "!../y"] {
            assert!(
                matches!(
                    Patterns::new(&[nothing]),
                    Err(PatternError::MatchesNothing { .. })
                ),
                "{nothing:?} accepted"
            );
        }
        assert!(Patterns::new(&["", ""]).unwrap().is_empty());
    }

    #[test]
    fn non_utf8_names_match_byte_for_byte() {
        use std::ffi::OsStr;
        let p = Patterns::new(&["/d/?.bin", "x*"]).unwrap();
        assert!(p.matches(Path::new(OsStr::from_bytes(b"/d/\xff.bin"))));
        assert!(p.matches(Path::new(OsStr::from_bytes(b"/e/x\xfe"))));
        assert!(!p.matches(Path::new(OsStr::from_bytes(b"/d/\xff\xfe.bin"))));
    }

    /// In direct mode restic matches host paths: the rewritten patterns match a host path
    /// exactly when the originals match the volume-rooted one, and never a component of the
    /// host path above the volume. (With a `**` of their own they may differ at the edges, as
    /// restic bounds `**` expansion by the number of parts; stream mode therefore matches the
    /// rewritten patterns against the host path too.)
    #[test]
    fn beneath_matches_as_the_volume_rooted_originals() {
        let root = Path::new("/var/lib/kubelet/pods/u[1]*/volumes/vol");
        let originals = [
            "pods",
            "volumes",
            "/data",
            "*.log",
            "!keep.log",
            "cache",
            "a/*/c",
            "/x/**/y",
        ];
        let volume = Patterns::new(&originals).unwrap();
        let host = Patterns::new(&volume.beneath(root).unwrap()).unwrap();
        for rel in [
            "/pods",
            "/data",
            "/data/x",
            "/sub/data",
            "/a.log",
            "/d/keep.log",
            "/cache",
            "/cache/z",
            "/q/a/b/c",
            "/a/c",
            "/x/y",
            "/x/1/2/y/3",
            "/volumes/vol",
            "/plain",
        ] {
            let host_path = format!("{}{rel}", root.display());
            assert_eq!(
                volume.matches(Path::new(rel)),
                host.matches(Path::new(&host_path)),
                "{rel}"
            );
        }
    }
}
