//! A list or watch request's options, parsed: label and field selectors as the API server
//! reads them, `limit` and the `continue` token, and `resourceVersion`. Pure, tested below.

use std::collections::BTreeMap;

use base64::Engine;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as k8s;

use super::object::IndexedSnapshot;

/// A label selector (`a=b,c!=d,e in (f,g),h,!i`), the forms `kubectl -l` sends, parsed into
/// the API's own selector (`a=b` is `a in (b)`, `a!=b` is `a notin (b)`, as apimachinery reads
/// them) and matched by the operator's one label matcher.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(k8s::LabelSelector);

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn set_values(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(
        inner
            .split(',')
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect(),
    )
}

fn requirement(
    key: &str,
    operator: &str,
    values: Option<Vec<String>>,
) -> k8s::LabelSelectorRequirement {
    k8s::LabelSelectorRequirement {
        key: key.trim().to_owned(),
        operator: operator.to_owned(),
        values,
    }
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let bad = || format!("unable to parse requirement: {part:?}");
            let one = |v: &str| Some(vec![v.trim().to_owned()]);
            let req = if let Some((k, v)) = part.split_once("!=") {
                requirement(k, "NotIn", one(v))
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                requirement(k, "In", one(v))
            } else if let Some((k, v)) = part.split_once(" notin ") {
                requirement(k, "NotIn", Some(set_values(v).ok_or_else(bad)?))
            } else if let Some((k, v)) = part.split_once(" in ") {
                requirement(k, "In", Some(set_values(v).ok_or_else(bad)?))
            } else if let Some(k) = part.strip_prefix('!') {
                requirement(k, "DoesNotExist", None)
            } else if part.contains(char::is_whitespace) || part.contains('(') {
                return Err(bad());
            } else {
                requirement(part, "Exists", None)
            };
            reqs.push(req);
        }
        Ok(LabelSelector(k8s::LabelSelector {
            match_expressions: Some(reqs),
            match_labels: None,
        }))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        crate::target::selector_matches(&self.0, labels)
    }
}

/// A field selector over `metadata.name` and `metadata.namespace` (what kubectl sends for
/// `get snapshot <name> -w`); other fields are refused, as the API server refuses fields a
/// resource does not index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, eq, value) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!("invalid selector: {part:?}"));
            };
            let field = field.trim();
            if !matches!(field, "metadata.name" | "metadata.namespace") {
                return Err(format!("field label not supported: {field}"));
            }
            out.push((field.to_owned(), eq, value.trim().to_owned()));
        }
        Ok(FieldSelector(out))
    }

    pub fn matches(&self, s: &IndexedSnapshot) -> bool {
        let name = s.name();
        self.0.iter().all(|(field, eq, value)| {
            let actual = if field == "metadata.name" {
                &name
            } else {
                &s.namespace
            };
            (actual == value) == *eq
        })
    }
}

/// Where a paginated list goes on: after the item with this key (`namespace/name`).
pub fn encode_continue(after_key: &str, resource_version: u64) -> String {
    let v = serde_json::json!({"rv": resource_version, "start": after_key});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

pub fn decode_continue(token: &str) -> Result<String, String> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| "invalid continue token".to_owned())?;
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| "invalid continue token".to_owned())?;
    v.get("start")
        .and_then(|s| s.as_str())
        .map(str::to_owned)
        .ok_or_else(|| "invalid continue token".to_owned())
}

/// The options of a list or watch request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListOptions {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: Option<usize>,
    pub after: Option<String>,
    /// `resourceVersion`; empty or `0` means "the latest" for a list and "start with every
    /// object as ADDED" for a watch.
    pub resource_version: Option<u64>,
    pub watch: bool,
    pub allow_bookmarks: bool,
    pub send_initial_events: bool,
    pub timeout_seconds: Option<u64>,
    pub include_object: Option<String>,
}

/// The query string as key → value, decoded as `application/x-www-form-urlencoded` (the
/// last of repeated keys wins).
pub fn query_pairs(query: &str) -> BTreeMap<String, String> {
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

impl ListOptions {
    pub fn parse(query: &str) -> Result<Self, String> {
        let q = query_pairs(query);
        let flag = |k: &str| q.get(k).is_some_and(|v| v == "true" || v == "1");
        let number = |k: &str| -> Result<Option<u64>, String> {
            match q.get(k).map(String::as_str) {
                None | Some("") => Ok(None),
                Some(v) => v
                    .parse()
                    .map(Some)
                    .map_err(|_| format!("invalid {k}: {v:?}")),
            }
        };
        let resource_version = match q.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => None,
            Some(v) => Some(
                v.parse()
                    .map_err(|_| format!("invalid resource version: {v:?}"))?,
            ),
        };
        Ok(ListOptions {
            labels: LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))?,
            fields: FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))?,
            limit: number("limit")?.filter(|n| *n > 0).map(|n| n as usize),
            after: match q.get("continue").filter(|c| !c.is_empty()) {
                Some(c) => Some(decode_continue(c)?),
                None => None,
            },
            resource_version,
            watch: flag("watch"),
            allow_bookmarks: flag("allowWatchBookmarks"),
            send_initial_events: flag("sendInitialEvents"),
            timeout_seconds: number("timeoutSeconds")?,
            include_object: q.get("includeObject").cloned(),
        })
    }

    pub fn matches(&self, s: &IndexedSnapshot) -> bool {
        self.labels.matches(&s.labels()) && self.fields.matches(s)
    }
}

/// One page of `items` (already in key order) after `after`, at most `limit` long, and the
/// continue token when more follow.
pub fn page<'a>(
    items: Vec<&'a IndexedSnapshot>,
    opts: &ListOptions,
    resource_version: u64,
) -> (Vec<&'a IndexedSnapshot>, Option<String>) {
    let start = match &opts.after {
        Some(after) => items.partition_point(|s| s.key() <= after.as_str()),
        None => 0,
    };
    let rest = &items[start.min(items.len())..];
    match opts.limit {
        Some(limit) if rest.len() > limit => {
            let page = rest[..limit].to_vec();
            let token = page
                .last()
                .map(|s| encode_continue(s.key(), resource_version));
            (page, token)
        }
        _ => (rest.to_vec(), None),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn label_selectors_match_as_the_api_servers() {
        let l = labels(&[("repository", "r1"), ("hostname", "host-1")]);
        for (sel, want) in [
            ("repository=r1", true),
            ("repository==r1,hostname=host-1", true),
            ("repository=r2", false),
            ("hostname!=host-1", false),
            ("hostname in (host-0,host-1)", true),
            ("hostname notin (host-0, host-1)", false),
            ("repository", true),
            ("!team", true),
            ("team", false),
            ("", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&l),
                want,
                "{sel}"
            );
        }
        assert!(LabelSelector::parse("a in b").is_err());
    }

    #[test]
    fn options_parse_from_the_query() {
        let o = ListOptions::parse(
            "labelSelector=repository%3Dr1&limit=2&resourceVersion=5&watch=true&allowWatchBookmarks=true&fieldSelector=metadata.name%3Dr1-0123abcd&timeoutSeconds=30",
        )
        .unwrap();
        assert_eq!(o.limit, Some(2));
        assert_eq!(o.resource_version, Some(5));
        assert!(o.watch && o.allow_bookmarks && !o.send_initial_events);
        assert_eq!(o.timeout_seconds, Some(30));
        assert_eq!(o.labels, LabelSelector::parse("repository=r1").unwrap());
        assert_eq!(
            ListOptions::parse("resourceVersion=0")
                .unwrap()
                .resource_version,
            None
        );
        assert!(ListOptions::parse("resourceVersion=x").is_err());
        assert!(ListOptions::parse("fieldSelector=status.hostname%3Dh").is_err());
        assert!(ListOptions::parse("continue=%%%").is_err());
    }

    #[test]
    fn pages_continue_where_the_last_ended() {
        let a = super::super::object::tests::snap("a", &"1".repeat(64), "h");
        let b = super::super::object::tests::snap("b", &"2".repeat(64), "h");
        let c = super::super::object::tests::snap("c", &"3".repeat(64), "h");
        let all = vec![&a, &b, &c];
        let mut opts = ListOptions {
            limit: Some(2),
            ..Default::default()
        };
        let (first, token) = page(all.clone(), &opts, 9);
        assert_eq!(
            first
                .iter()
                .map(|s| s.repository.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        opts.after = Some(decode_continue(&token.unwrap()).unwrap());
        let (second, token) = page(all, &opts, 9);
        assert_eq!(
            second
                .iter()
                .map(|s| s.repository.as_str())
                .collect::<Vec<_>>(),
            ["c"]
        );
        assert!(token.is_none());
    }

    #[test]
    fn field_selectors_pick_by_name() {
        let a = super::super::object::tests::snap("a", &"1".repeat(64), "h");
        assert!(
            FieldSelector::parse("metadata.name=a-11111111")
                .unwrap()
                .matches(&a)
        );
        assert!(
            !FieldSelector::parse("metadata.name!=a-11111111")
                .unwrap()
                .matches(&a)
        );
        assert!(
            FieldSelector::parse("metadata.namespace=demo")
                .unwrap()
                .matches(&a)
        );
    }
}
