//! Watch streams: newline-delimited JSON events from a resourceVersion (or from the current
//! state), selector-aware ADDED/MODIFIED/DELETED translation, bookmarks, timeouts and
//! `410 Gone` when the requested history is gone.

use crate::handlers::{Ctx, selection};
use crate::server::Body;
use crate::status::{ApiError, ApiResult};
use crate::store::{Event, EventType, WatchFrom, WatchMsg};
use crate::table;
use crate::util::{name_of, namespace_of};
use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::sync::mpsc;

/// The default watch lifetime when the client sets none (the real server picks 30–60 min).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

pub async fn serve(cx: &Ctx, name: Option<&str>) -> ApiResult<Response<Body>> {
    let sel = selection(cx)?;
    let only_name = name
        .map(str::to_owned)
        .or_else(|| sel.fields.exact_name().map(str::to_owned));
    let bookmarks = cx.query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let initial = cx.query.get("sendInitialEvents").map(String::as_str) == Some("true");
    let rv_param = cx.query.get("resourceVersion").cloned().unwrap_or_default();
    let from =
        if initial {
            if !bookmarks {
                return Err(ApiError::invalid(
                    "",
                    "ListOptions",
                    "",
                    vec![crate::status::Cause::forbidden(
                        "allowWatchBookmarks",
                        "sendInitialEvents requires setting allowWatchBookmarks=true",
                    )],
                ));
            }
            WatchFrom::Initial { end_bookmark: true }
        } else {
            match rv_param.as_str() {
                "" | "0" => WatchFrom::Initial {
                    end_bookmark: false,
                },
                rv => WatchFrom::After(rv.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid resource version: {rv}"))
                })?),
            }
        };
    let timeout = cx
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT);

    let (tx, mut rx) = mpsc::unbounded_channel();
    let registered = cx.core.lock().watch(&cx.def.gr(), from, tx.clone());
    let (out_tx, out_rx) = mpsc::channel::<Bytes>(1024);
    if let Err(floor) = registered {
        let line = error_line(&rv_param, floor);
        let _ = out_tx.try_send(line);
        drop(out_tx);
    } else {
        let core = cx.core.clone();
        let def = cx.def.clone();
        let ns = (!cx.all_namespaces && def.namespaced).then(|| cx.ns.clone());
        let want_table = table::wants_table(&cx.accept);
        let want_meta = table::wants_metadata(&cx.accept);
        let include = cx.query.get("includeObject").cloned().unwrap_or_default();
        let mut shutdown = core.shutdown.clone();
        let interval = core.opts.bookmark_interval;
        tokio::spawn(async move {
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                let msg = tokio::select! {
                    m = rx.recv() => match m { Some(m) => m, None => break },
                    _ = tick.tick(), if bookmarks => {
                        if !core.lock().bookmark(&tx) { break; }
                        continue;
                    }
                    _ = &mut deadline => break,
                    _ = shutdown.changed() => break,
                    _ = out_tx.closed() => break,
                };
                let line = match msg {
                    WatchMsg::Event(ev) => {
                        let Some((typ, obj)) =
                            visible(&ev, ns.as_deref(), only_name.as_deref(), &sel)
                        else {
                            continue;
                        };
                        let obj = present(&def.api_version(), obj);
                        let obj = if want_table {
                            let mut t = table::table(
                                &def,
                                &[std::sync::Arc::new(obj)],
                                json!({"resourceVersion": ev.rv.to_string()}),
                                &include,
                            );
                            t["metadata"] = json!({"resourceVersion": ev.rv.to_string()});
                            t
                        } else if want_meta {
                            table::partial_metadata(&obj)
                        } else {
                            obj
                        };
                        event_line(typ, &obj)
                    }
                    WatchMsg::Bookmark(rv) => {
                        if !bookmarks {
                            continue;
                        }
                        bookmark_line(&def.kind, &def.api_version(), rv, false)
                    }
                    WatchMsg::InitialEnd(rv) => {
                        bookmark_line(&def.kind, &def.api_version(), rv, true)
                    }
                    WatchMsg::Expired(rv) => {
                        let _ = out_tx.send(error_line(&rv_param, rv)).await;
                        break;
                    }
                };
                if out_tx.send(line).await.is_err() {
                    break;
                }
            }
        });
    }
    let stream = futures_util::stream::unfold(out_rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, crate::server::BodyError>(Frame::data(b)), rx))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

fn present(api_version: &str, obj: &Value) -> Value {
    if let Some(converted) = crate::events::present(obj, api_version) {
        return converted;
    }
    let mut o = obj.clone();
    if o.get("apiVersion").and_then(Value::as_str) != Some(api_version)
        && let Some(m) = o.as_object_mut()
    {
        m.insert("apiVersion".into(), json!(api_version));
    }
    o
}

/// What this watcher sees of an event: selector changes turn into ADDED or DELETED, as the
/// real watch cache reports objects entering and leaving the selection.
fn visible<'a>(
    ev: &'a Event,
    ns: Option<&str>,
    name: Option<&str>,
    sel: &crate::handlers::Selection,
) -> Option<(&'static str, &'a Value)> {
    let in_scope = |o: &Value| {
        ns.is_none_or(|n| namespace_of(o) == n)
            && name.is_none_or(|n| name_of(o) == n)
            && sel.matches(o)
    };
    let now = in_scope(&ev.obj);
    let before = ev.old.as_deref().map(in_scope).unwrap_or(false);
    match ev.typ {
        EventType::Added => now.then_some(("ADDED", &*ev.obj)),
        EventType::Modified => match (before, now) {
            (true, true) => Some(("MODIFIED", &*ev.obj)),
            (false, true) => Some(("ADDED", &*ev.obj)),
            (true, false) => Some(("DELETED", &*ev.obj)),
            (false, false) => None,
        },
        EventType::Deleted => (before || now).then_some(("DELETED", &*ev.obj)),
    }
}

fn event_line(typ: &str, obj: &Value) -> Bytes {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(typ.as_bytes());
    out.extend_from_slice(b"\",\"object\":");
    if serde_json::to_writer(&mut out, obj).is_err() {
        out.extend_from_slice(b"null");
    }
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

fn bookmark_line(kind: &str, api_version: &str, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": kind, "apiVersion": api_version, "metadata": meta}),
    )
}

fn error_line(requested: &str, current: u64) -> Bytes {
    let e = ApiError::gone(format!("too old resource version: {requested} ({current})"));
    event_line("ERROR", &e.to_status())
}
