//! A small evaluator for the CEL rules of `x-kubernetes-validations`: enough of the language
//! for field tests, comparisons, string predicates, size() and the list macros. Anything else
//! is reported as unsupported so the caller can skip the rule instead of rejecting an object.

use serde_json::{Number, Value};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CelError {
    /// The rule uses something this evaluator does not implement: skip it.
    #[error("unsupported CEL: {0}")]
    Unsupported(String),
    /// Evaluation failed the way real CEL fails (a missing key, a type mismatch): the real
    /// server reports these as validation errors.
    #[error("{0}")]
    Runtime(String),
}

type R<T> = Result<T, CelError>;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Int(i64),
    Float(f64),
    Str(String),
    Ident(String),
    Op(&'static str),
}

fn lex(src: &str) -> R<Vec<Tok>> {
    let c: Vec<char> = src.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    const OPS: [&str; 22] = [
        "==", "!=", "<=", ">=", "&&", "||", "<", ">", "!", "+", "-", "*", "/", "%", "(", ")", "[",
        "]", ".", ",", "?", ":",
    ];
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch.is_ascii_digit() {
            let s = i;
            while i < c.len() && (c[i].is_ascii_digit() || c[i] == '.') {
                // A dot followed by a letter is member access, not a fraction.
                if c[i] == '.' && !c.get(i + 1).is_some_and(char::is_ascii_digit) {
                    break;
                }
                i += 1;
            }
            let text: String = c[s..i].iter().collect();
            if i < c.len() && c[i] == 'u' {
                i += 1;
            }
            if text.contains('.') {
                out.push(Tok::Float(text.parse().map_err(|_| unsup("number"))?));
            } else {
                out.push(Tok::Int(text.parse().map_err(|_| unsup("number"))?));
            }
        } else if ch == '\'' || ch == '"' {
            let q = ch;
            i += 1;
            let mut s = String::new();
            while i < c.len() && c[i] != q {
                if c[i] == '\\' && i + 1 < c.len() {
                    i += 1;
                    s.push(match c[i] {
                        'n' => '\n',
                        't' => '\t',
                        other => other,
                    });
                } else {
                    s.push(c[i]);
                }
                i += 1;
            }
            if i >= c.len() {
                return Err(unsup("unterminated string"));
            }
            i += 1;
            out.push(Tok::Str(s));
        } else if ch.is_alphabetic() || ch == '_' {
            let s = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(c[s..i].iter().collect()));
        } else {
            let two: String = c[i..(i + 2).min(c.len())].iter().collect();
            if let Some(op) = OPS.iter().find(|o| o.len() == 2 && **o == two) {
                out.push(Tok::Op(op));
                i += 2;
            } else if let Some(op) = OPS.iter().find(|o| o.len() == 1 && o.starts_with(ch)) {
                out.push(Tok::Op(op));
                i += 1;
            } else {
                return Err(unsup(&format!("character {ch:?}")));
            }
        }
    }
    Ok(out)
}

fn unsup(what: &str) -> CelError {
    CelError::Unsupported(what.to_owned())
}

fn rt(what: impl Into<String>) -> CelError {
    CelError::Runtime(what.into())
}

#[derive(Debug, Clone)]
enum Expr {
    Lit(Value),
    Ident(String),
    List(Vec<Expr>),
    Member(Box<Expr>, String),
    Index(Box<Expr>, Box<Expr>),
    Call(Option<Box<Expr>>, String, Vec<Expr>),
    Unary(&'static str, Box<Expr>),
    Binary(&'static str, Box<Expr>, Box<Expr>),
    Cond(Box<Expr>, Box<Expr>, Box<Expr>),
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn eat(&mut self, op: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Op(o)) if *o == op) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, op: &str) -> R<()> {
        if self.eat(op) {
            Ok(())
        } else {
            Err(unsup(&format!("expected {op}")))
        }
    }
    fn expr(&mut self) -> R<Expr> {
        let c = self.or()?;
        if self.eat("?") {
            let a = self.expr()?;
            self.expect(":")?;
            let b = self.expr()?;
            return Ok(Expr::Cond(Box::new(c), Box::new(a), Box::new(b)));
        }
        Ok(c)
    }
    fn binary_level(&mut self, ops: &[&'static str], next: fn(&mut Self) -> R<Expr>) -> R<Expr> {
        let mut l = next(self)?;
        loop {
            let op = match self.peek() {
                Some(Tok::Op(o)) if ops.contains(o) => *o,
                Some(Tok::Ident(i)) if i == "in" && ops.contains(&"in") => "in",
                _ => return Ok(l),
            };
            self.pos += 1;
            let r = next(self)?;
            l = Expr::Binary(op, Box::new(l), Box::new(r));
        }
    }
    fn or(&mut self) -> R<Expr> {
        self.binary_level(&["||"], Self::and)
    }
    fn and(&mut self) -> R<Expr> {
        self.binary_level(&["&&"], Self::rel)
    }
    fn rel(&mut self) -> R<Expr> {
        self.binary_level(&["==", "!=", "<", "<=", ">", ">=", "in"], Self::add)
    }
    fn add(&mut self) -> R<Expr> {
        self.binary_level(&["+", "-"], Self::mul)
    }
    fn mul(&mut self) -> R<Expr> {
        self.binary_level(&["*", "/", "%"], Self::unary)
    }
    fn unary(&mut self) -> R<Expr> {
        if self.eat("!") {
            return Ok(Expr::Unary("!", Box::new(self.unary()?)));
        }
        if self.eat("-") {
            return Ok(Expr::Unary("-", Box::new(self.unary()?)));
        }
        self.postfix()
    }
    fn args(&mut self) -> R<Vec<Expr>> {
        let mut args = Vec::new();
        if self.eat(")") {
            return Ok(args);
        }
        loop {
            args.push(self.expr()?);
            if self.eat(")") {
                return Ok(args);
            }
            self.expect(",")?;
        }
    }
    fn postfix(&mut self) -> R<Expr> {
        let mut e = self.primary()?;
        loop {
            if self.eat(".") {
                let Some(Tok::Ident(name)) = self.peek().cloned() else {
                    return Err(unsup("member name"));
                };
                self.pos += 1;
                if self.eat("(") {
                    let args = self.args()?;
                    e = Expr::Call(Some(Box::new(e)), name, args);
                } else {
                    e = Expr::Member(Box::new(e), name);
                }
            } else if self.eat("[") {
                let i = self.expr()?;
                self.expect("]")?;
                e = Expr::Index(Box::new(e), Box::new(i));
            } else {
                return Ok(e);
            }
        }
    }
    fn primary(&mut self) -> R<Expr> {
        let t = self.peek().cloned().ok_or_else(|| unsup("end of rule"))?;
        self.pos += 1;
        Ok(match t {
            Tok::Int(i) => Expr::Lit(Value::from(i)),
            Tok::Float(f) => Expr::Lit(Number::from_f64(f).map_or(Value::Null, Value::Number)),
            Tok::Str(s) => Expr::Lit(Value::String(s)),
            Tok::Ident(id) => match id.as_str() {
                "true" => Expr::Lit(Value::Bool(true)),
                "false" => Expr::Lit(Value::Bool(false)),
                "null" => Expr::Lit(Value::Null),
                _ if self.eat("(") => Expr::Call(None, id, self.args()?),
                _ => Expr::Ident(id),
            },
            Tok::Op("(") => {
                let e = self.expr()?;
                self.expect(")")?;
                e
            }
            Tok::Op("[") => {
                let mut items = Vec::new();
                if !self.eat("]") {
                    loop {
                        items.push(self.expr()?);
                        if self.eat("]") {
                            break;
                        }
                        self.expect(",")?;
                    }
                }
                Expr::List(items)
            }
            other => return Err(unsup(&format!("token {other:?}"))),
        })
    }
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Program {
    expr: Expr,
    pub uses_old_self: bool,
}

pub fn compile(src: &str) -> R<Program> {
    let mut p = Parser {
        toks: lex(src)?,
        pos: 0,
    };
    let expr = p.expr()?;
    if p.pos != p.toks.len() {
        return Err(unsup("trailing input"));
    }
    Ok(Program {
        expr,
        uses_old_self: p
            .toks
            .iter()
            .any(|t| matches!(t, Tok::Ident(i) if i == "oldSelf")),
    })
}

impl Program {
    /// Evaluates to a boolean; `old` binds `oldSelf` for transition rules.
    pub fn eval_bool(&self, this: &Value, old: Option<&Value>) -> R<bool> {
        let mut env = HashMap::new();
        env.insert("self".to_owned(), this.clone());
        if let Some(o) = old {
            env.insert("oldSelf".to_owned(), o.clone());
        }
        match eval(&self.expr, &mut env)? {
            Value::Bool(b) => Ok(b),
            other => Err(rt(format!("rule evaluated to {other}, not a boolean"))),
        }
    }
}

fn as_bool(v: &Value) -> R<bool> {
    v.as_bool()
        .ok_or_else(|| rt(format!("no such overload: expected bool, got {v}")))
}

fn num_cmp(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if let (Some(x), Some(y)) = (x.as_i64(), y.as_i64()) {
                Some(x.cmp(&y))
            } else {
                x.as_f64()?.partial_cmp(&y.as_f64()?)
            }
        }
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

fn cel_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(_), Value::Number(_)) => num_cmp(a, b) == Some(std::cmp::Ordering::Equal),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| cel_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| cel_eq(v, w)))
        }
        _ => a == b,
    }
}

fn size(v: &Value) -> R<Value> {
    Ok(Value::from(match v {
        Value::String(s) => s.chars().count(),
        Value::Array(a) => a.len(),
        Value::Object(m) => m.len(),
        other => return Err(rt(format!("no such overload: size({other})"))),
    }))
}

fn arith(op: &str, a: &Value, b: &Value) -> R<Value> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if let (Some(x), Some(y)) = (x.as_i64(), y.as_i64()) {
                let r = match op {
                    "+" => x.checked_add(y),
                    "-" => x.checked_sub(y),
                    "*" => x.checked_mul(y),
                    "/" => x.checked_div(y),
                    _ => x.checked_rem(y),
                };
                return r
                    .map(Value::from)
                    .ok_or_else(|| rt("integer overflow or division by zero"));
            }
            let (x, y) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
            let r = match op {
                "+" => x + y,
                "-" => x - y,
                "*" => x * y,
                "/" => x / y,
                _ => return Err(rt("no such overload: double % double")),
            };
            Ok(Number::from_f64(r).map_or(Value::Null, Value::Number))
        }
        (Value::String(x), Value::String(y)) if op == "+" => Ok(Value::String(format!("{x}{y}"))),
        (Value::Array(x), Value::Array(y)) if op == "+" => {
            Ok(Value::Array(x.iter().chain(y).cloned().collect()))
        }
        _ => Err(rt(format!("no such overload: {a} {op} {b}"))),
    }
}

fn eval(e: &Expr, env: &mut HashMap<String, Value>) -> R<Value> {
    match e {
        Expr::Lit(v) => Ok(v.clone()),
        Expr::Ident(i) => env
            .get(i)
            .cloned()
            .ok_or_else(|| unsup(&format!("identifier {i}"))),
        Expr::List(items) => Ok(Value::Array(
            items.iter().map(|i| eval(i, env)).collect::<R<_>>()?,
        )),
        Expr::Member(t, f) => match eval(t, env)? {
            Value::Object(m) => m
                .get(f)
                .cloned()
                .ok_or_else(|| rt(format!("no such key: {f}"))),
            other => Err(rt(format!(
                "no such key: {f} (on {})",
                crate::status::json_type(&other)
            ))),
        },
        Expr::Index(t, i) => {
            let t = eval(t, env)?;
            let i = eval(i, env)?;
            match (&t, &i) {
                (Value::Array(a), Value::Number(n)) => n
                    .as_u64()
                    .and_then(|n| a.get(n as usize))
                    .cloned()
                    .ok_or_else(|| rt(format!("index out of bounds: {n}"))),
                (Value::Object(m), Value::String(k)) => m
                    .get(k)
                    .cloned()
                    .ok_or_else(|| rt(format!("no such key: {k}"))),
                _ => Err(rt("no such overload: index")),
            }
        }
        Expr::Unary(op, x) => {
            let v = eval(x, env)?;
            if *op == "!" {
                Ok(Value::Bool(!as_bool(&v)?))
            } else {
                arith("-", &Value::from(0), &v)
            }
        }
        Expr::Cond(c, a, b) => {
            if as_bool(&eval(c, env)?)? {
                eval(a, env)
            } else {
                eval(b, env)
            }
        }
        Expr::Binary(op, a, b) => binary(op, a, b, env),
        Expr::Call(target, name, args) => call(target.as_deref(), name, args, env),
    }
}

fn binary(op: &str, a: &Expr, b: &Expr, env: &mut HashMap<String, Value>) -> R<Value> {
    // CEL's logical operators are commutative over errors: an error on one side is absorbed
    // when the other side decides the result.
    if op == "&&" || op == "||" {
        let short = op == "||";
        let l = eval(a, env).and_then(|v| as_bool(&v));
        if l == Ok(short) {
            return Ok(Value::Bool(short));
        }
        let r = eval(b, env).and_then(|v| as_bool(&v));
        if r == Ok(short) {
            return Ok(Value::Bool(short));
        }
        l?;
        r?;
        return Ok(Value::Bool(!short));
    }
    let l = eval(a, env)?;
    let r = eval(b, env)?;
    use std::cmp::Ordering::*;
    let cmp = || num_cmp(&l, &r).ok_or_else(|| rt(format!("no such overload: {l} {op} {r}")));
    Ok(match op {
        "==" => Value::Bool(cel_eq(&l, &r)),
        "!=" => Value::Bool(!cel_eq(&l, &r)),
        "<" => Value::Bool(cmp()? == Less),
        "<=" => Value::Bool(cmp()? != Greater),
        ">" => Value::Bool(cmp()? == Greater),
        ">=" => Value::Bool(cmp()? != Less),
        "in" => match &r {
            Value::Array(a) => Value::Bool(a.iter().any(|x| cel_eq(x, &l))),
            Value::Object(m) => Value::Bool(l.as_str().is_some_and(|k| m.contains_key(k))),
            _ => return Err(rt("no such overload: in")),
        },
        _ => arith(op, &l, &r)?,
    })
}

fn str_arg(args: &[Expr], env: &mut HashMap<String, Value>) -> R<String> {
    match args.first().map(|a| eval(a, env)).transpose()? {
        Some(Value::String(s)) => Ok(s),
        _ => Err(rt("no such overload: expected a string argument")),
    }
}

fn call(
    target: Option<&Expr>,
    name: &str,
    args: &[Expr],
    env: &mut HashMap<String, Value>,
) -> R<Value> {
    // has(a.b): presence test without evaluating the field itself.
    if target.is_none() && name == "has" {
        let Some(Expr::Member(t, f)) = args.first() else {
            return Err(unsup("has() without a field selection"));
        };
        return match eval(t, env)? {
            Value::Object(m) => Ok(Value::Bool(m.contains_key(f))),
            _ => Err(rt("no such overload: has() on a non-object")),
        };
    }
    if let Some(t) = target
        && matches!(name, "all" | "exists" | "exists_one" | "filter" | "map")
    {
        return comprehension(t, name, args, env);
    }
    let recv = match target {
        Some(t) => Some(eval(t, env)?),
        None => None,
    };
    let first = |env: &mut HashMap<String, Value>| -> R<Value> {
        match &recv {
            Some(v) => Ok(v.clone()),
            None => args
                .first()
                .map(|a| eval(a, env))
                .transpose()?
                .ok_or_else(|| rt("missing argument")),
        }
    };
    match name {
        "size" => size(&first(env)?),
        "startsWith" | "endsWith" | "contains" => {
            let Some(Value::String(s)) = &recv else {
                return Err(rt(format!("no such overload: {name}")));
            };
            let p = str_arg(args, env)?;
            Ok(Value::Bool(match name {
                "startsWith" => s.starts_with(&p),
                "endsWith" => s.ends_with(&p),
                _ => s.contains(&p),
            }))
        }
        "lowerAscii" | "upperAscii" => match &recv {
            Some(Value::String(s)) => Ok(Value::String(if name == "lowerAscii" {
                s.to_ascii_lowercase()
            } else {
                s.to_ascii_uppercase()
            })),
            _ => Err(rt(format!("no such overload: {name}"))),
        },
        "string" => Ok(Value::String(match first(env)? {
            Value::String(s) => s,
            other => other.to_string(),
        })),
        "int" => match first(env)? {
            Value::Number(n) => Ok(Value::from(n.as_f64().unwrap_or(0.0) as i64)),
            Value::String(s) => s
                .parse::<i64>()
                .map(Value::from)
                .map_err(|_| rt("cannot convert string to int")),
            _ => Err(rt("no such overload: int")),
        },
        "double" => match first(env)? {
            Value::Number(n) => {
                Ok(Number::from_f64(n.as_f64().unwrap_or(0.0)).map_or(Value::Null, Value::Number))
            }
            _ => Err(rt("no such overload: double")),
        },
        other => Err(unsup(&format!("function {other}"))),
    }
}

fn comprehension(
    target: &Expr,
    name: &str,
    args: &[Expr],
    env: &mut HashMap<String, Value>,
) -> R<Value> {
    let items: Vec<Value> = match eval(target, env)? {
        Value::Array(a) => a,
        Value::Object(m) => m.keys().map(|k| Value::String(k.clone())).collect(),
        _ => return Err(rt(format!("no such overload: {name} on a non-list"))),
    };
    let (var, body, transform) = match args {
        [Expr::Ident(v), body] => (v, body, None),
        [Expr::Ident(v), filter, body] if name == "map" => (v, body, Some(filter)),
        _ => return Err(unsup("macro arguments")),
    };
    let saved = env.get(var).cloned();
    let run = |env: &mut HashMap<String, Value>| -> R<Value> {
        let mut out = Vec::new();
        let mut count = 0usize;
        for it in &items {
            env.insert(var.clone(), it.clone());
            match name {
                "map" => {
                    if let Some(f) = transform
                        && !as_bool(&eval(f, env)?)?
                    {
                        continue;
                    }
                    out.push(eval(body, env)?);
                }
                _ => {
                    let b = as_bool(&eval(body, env)?)?;
                    match (name, b) {
                        ("all", false) => return Ok(Value::Bool(false)),
                        ("exists", true) => return Ok(Value::Bool(true)),
                        ("filter", true) => out.push(it.clone()),
                        (_, true) => count += 1,
                        _ => {}
                    }
                }
            }
        }
        Ok(match name {
            "all" => Value::Bool(true),
            "exists" => Value::Bool(false),
            "exists_one" => Value::Bool(count == 1),
            _ => Value::Array(out),
        })
    };
    let r = run(env);
    match saved {
        Some(v) => {
            env.insert(var.clone(), v);
        }
        None => {
            env.remove(var);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(rule: &str, this: Value) -> R<bool> {
        compile(rule)?.eval_bool(&this, None)
    }

    #[test]
    fn the_chart_rules_evaluate() {
        let backend = json!({"s3": {"bucket": "b"}, "storageSecretName": "s"});
        let one = "[has(self.local), has(self.s3), has(self.gcs), has(self.azure), has(self.swift), has(self.b2), has(self.rest)].exists_one(x, x)";
        assert_eq!(check(one, backend.clone()), Ok(true));
        assert_eq!(check(one, json!({"s3": {}, "gcs": {}})), Ok(false));
        assert_eq!(
            check(
                "has(self.backend.storageSecretName) && self.backend.storageSecretName != ''",
                json!({"backend": backend})
            ),
            Ok(true)
        );
        let mp = "self.mountPath != '/stash' && !self.mountPath.startsWith('/stash/')";
        assert_eq!(check(mp, json!({"mountPath": "/data"})), Ok(true));
        assert_eq!(check(mp, json!({"mountPath": "/stash/x"})), Ok(false));
        let f = "self.filter(r, !has(r.targetHosts) || size(r.targetHosts) == 0).size() <= 1";
        assert_eq!(
            check(f, json!([{"paths": ["/a"]}, {"targetHosts": ["h"]}])),
            Ok(true)
        );
        assert_eq!(check(f, json!([{}, {"targetHosts": []}])), Ok(false));
        let ex = "!(has(self.snapshots) && size(self.snapshots) > 0 && has(self.paths) && size(self.paths) > 0)";
        assert_eq!(
            check(ex, json!({"snapshots": ["a"], "paths": ["/p"]})),
            Ok(false)
        );
        assert_eq!(check(ex, json!({"snapshots": ["a"]})), Ok(true));
        let wipe = "!(has(self.wipeOut) && self.wipeOut && (has(self.backend.local) || has(self.backend.b2)))";
        assert_eq!(
            check(wipe, json!({"wipeOut": true, "backend": {"local": {}}})),
            Ok(false)
        );
        let p = compile("self == oldSelf").unwrap();
        assert!(p.uses_old_self);
        assert_eq!(
            p.eval_bool(&json!({"a": 1}), Some(&json!({"a": 1.0}))),
            Ok(true)
        );
    }

    #[test]
    fn missing_keys_are_runtime_errors_and_unknown_functions_unsupported() {
        assert!(matches!(
            check("self.a == 1", json!({})),
            Err(CelError::Runtime(_))
        ));
        assert!(matches!(
            check("self.a.matches('^x')", json!({"a": "x"})),
            Err(CelError::Unsupported(_))
        ));
        assert_eq!(
            check("self.a > 2 ? true : false", json!({"a": 3})),
            Ok(true)
        );
        assert_eq!(
            check(
                "'b' in self.l && self.l.all(x, x.size() == 1)",
                json!({"l": ["a", "b"]})
            ),
            Ok(true)
        );
    }
}
