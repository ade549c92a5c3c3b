//! What an assignment asks for, checked before any work starts: every field is either turned
//! into what the engine does, or refused with a reason the user can act on.

use std::path::{Component, Path, PathBuf};

use stash_api::assignment::AssignedVolume;
use stash_api::common::IoBudget as BudgetSpec;

use crate::budget::{Limits, parse_rate};
use crate::engine::ReadMode;
use crate::error::AgentError;

/// How the value of an allowed restic flag is checked.
#[derive(Clone, Copy, Debug)]
enum Value {
    /// `--flag` alone.
    None,
    /// restic's size syntax: digits and an optional `b k m g t` unit.
    Size,
    /// A file name (`--exclude-if-present=.nobackup[:header]`).
    Name,
    OneOf(&'static [&'static str]),
    /// A whole number in a range.
    Number(u64, u64),
}

/// The `restic backup` flags an assignment may pass in direct mode: they change what restic
/// reads or how it stores it, and nothing else. Flags that name the repository, a password
/// command, the host, tags, parents or input files would let a spec override what the agent
/// decides, or run a command as root on the node, and are refused.
const DIRECT_ARGS: &[(&str, Value)] = &[
    ("--exclude-larger-than", Value::Size),
    ("--exclude-caches", Value::None),
    ("--exclude-if-present", Value::Name),
    ("--one-file-system", Value::None),
    ("--ignore-ctime", Value::None),
    ("--ignore-inode", Value::None),
    ("--no-scan", Value::None),
    ("--with-atime", Value::None),
    (
        "--compression",
        Value::OneOf(&["auto", "off", "max", "fastest", "better"]),
    ),
    ("--pack-size", Value::Number(4, 128)),
];

fn refuse(reason: String) -> AgentError {
    AgentError::invalid("assignment", reason)
}

/// Checks `args` for `mode`; what passes is given to restic exactly as written.
pub fn restic_args(args: &[String], mode: ReadMode) -> Result<Vec<String>, AgentError> {
    if args.is_empty() {
        return Ok(vec![]);
    }
    if mode == ReadMode::Stream {
        return Err(refuse(format!(
            "args {args:?} apply to direct mode only, where restic reads the files; in stream \
             mode the agent reads them (use exclude for patterns, or readMode: direct)"
        )));
    }
    for arg in args {
        let (flag, value) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v)),
            None => (arg.as_str(), None),
        };
        let Some((_, kind)) = DIRECT_ARGS.iter().find(|(f, _)| *f == flag) else {
            let allowed: Vec<&str> = DIRECT_ARGS.iter().map(|(f, _)| *f).collect();
            return Err(refuse(format!(
                "args: {arg:?} is not a restic flag the agent passes on (allowed: {})",
                allowed.join(", ")
            )));
        };
        let valid = match (kind, value) {
            (Value::None, None) => true,
            (Value::None, Some(_)) | (_, None) => false,
            (Value::Size, Some(v)) => {
                let digits = v.trim_end_matches(['b', 'B', 'k', 'K', 'm', 'M', 'g', 'G', 't', 'T']);
                !digits.is_empty()
                    && v.len() - digits.len() <= 1
                    && digits.bytes().all(|b| b.is_ascii_digit())
            }
            (Value::Name, Some(v)) => !v.is_empty() && !v.contains(['/', '\0']),
            (Value::OneOf(options), Some(v)) => options.contains(&v),
            (Value::Number(lo, hi), Some(v)) => {
                v.parse::<u64>().is_ok_and(|n| (*lo..=*hi).contains(&n))
            }
        };
        if !valid {
            let form = match kind {
                Value::None => format!("{flag}, without a value"),
                Value::Size => format!("{flag}=<size such as 1G>"),
                Value::Name => format!("{flag}=<file name>"),
                Value::OneOf(o) => format!("{flag}=<{}>", o.join("|")),
                Value::Number(lo, hi) => format!("{flag}=<{lo}..{hi}>"),
            };
            return Err(refuse(format!("args: {arg:?} must be written {form}")));
        }
    }
    Ok(args.to_vec())
}

/// An assignment's own IO budget. It paces the agent's reader in stream mode and restic's
/// reads in direct mode (through restic's cgroup, or the agent's reader where the volume's
/// disk cannot be limited: see `cgroup`), and a stream snapshot's extraction in a restore.
pub fn limits(budget: Option<&BudgetSpec>) -> Result<Limits, AgentError> {
    let Some(b) = budget else {
        return Ok(Limits::default());
    };
    if b.bytes_per_second.is_none() && b.iops.is_none() {
        return Ok(Limits::default());
    }
    let bytes_per_second = b
        .bytes_per_second
        .as_ref()
        .map(|q| parse_rate(&q.0))
        .transpose()
        .map_err(|e| refuse(format!("ioBudget.bytesPerSecond: {e}")))?;
    let iops = b
        .iops
        .map(|n| u64::try_from(n).ok().filter(|n| *n > 0))
        .map(|n| n.ok_or_else(|| refuse("ioBudget.iops must be at least 1".into())))
        .transpose()?;
    Ok(Limits {
        bytes_per_second,
        iops,
    })
}

/// The sub-directories of a backup volume, each relative and inside the volume.
pub fn paths(v: &AssignedVolume) -> Result<Vec<PathBuf>, AgentError> {
    v.paths
        .iter()
        .flatten()
        .map(|p| {
            let path = Path::new(p);
            let inside = !p.is_empty()
                && path
                    .components()
                    .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
            if inside {
                Ok(path.to_path_buf())
            } else {
                Err(refuse(format!(
                    "volume {}: path {p:?} must be a sub-directory of the volume, relative, \
                     without `..`",
                    v.volume_name
                )))
            }
        })
        .collect()
}

/// Refuses the restore-only fields of a volume in a backup, and `paths` in a restore: each
/// would otherwise be silently ignored.
pub fn volume_fields(v: &AssignedVolume, backup: bool) -> Result<(), AgentError> {
    let set = |name: &'static str, present: bool| present.then_some(name);
    let misplaced: Vec<&str> = if backup {
        [
            set("snapshot", v.snapshot.is_some()),
            set("include", v.include.as_ref().is_some_and(|i| !i.is_empty())),
            set("exclude", v.exclude.as_ref().is_some_and(|i| !i.is_empty())),
            set("deleteExtraneous", v.delete_extraneous.is_some()),
        ]
        .into_iter()
        .flatten()
        .collect()
    } else {
        [set(
            "paths",
            v.paths.as_ref().is_some_and(|p| !p.is_empty()),
        )]
        .into_iter()
        .flatten()
        .collect()
    };
    if misplaced.is_empty() {
        return Ok(());
    }
    let what = if backup { "restore" } else { "backup" };
    Err(refuse(format!(
        "volume {}: {} only apply to a {what}",
        v.volume_name,
        misplaced.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn allowed_args_pass_exactly_and_others_are_refused() {
        let ok = strings(&[
            "--exclude-larger-than=1G",
            "--exclude-caches",
            "--exclude-if-present=.nobackup",
            "--compression=max",
            "--pack-size=64",
        ]);
        assert_eq!(restic_args(&ok, ReadMode::Direct).ok(), Some(ok.clone()));
        for (bad, reason) in [
            ("--password-command=sh -c id", "not a restic flag"),
            ("--repo=/elsewhere", "not a restic flag"),
            ("--host=other", "not a restic flag"),
            ("-o", "not a restic flag"),
            ("/etc", "not a restic flag"),
            (
                "--exclude-larger-than",
                "must be written --exclude-larger-than=<size",
            ),
            ("--exclude-larger-than=1GB", "must be written"),
            ("--exclude-caches=true", "without a value"),
            ("--compression=ultra", "auto|off|max"),
            ("--pack-size=1000", "4..128"),
            ("--exclude-if-present=../x", "file name"),
        ] {
            let err = restic_args(&strings(&[bad]), ReadMode::Direct)
                .expect_err(bad)
                .to_string();
            assert!(err.contains(reason), "{bad}: {err}");
            assert!(
                err.starts_with("failed to accept the assignment: args"),
                "{err}"
            );
        }
        let err =
            restic_args(&strings(&["--exclude-caches"]), ReadMode::Stream).expect_err("stream");
        assert!(err.to_string().contains("direct mode only"), "{err}");
        assert_eq!(restic_args(&[], ReadMode::Stream).ok(), Some(vec![]));
    }

    #[test]
    fn an_assignment_budget_is_a_quantity_for_backups_in_both_modes_and_restores() {
        let budget = |q: &str| BudgetSpec {
            bytes_per_second: Some(Quantity(q.into())),
            iops: None,
        };
        assert_eq!(
            limits(Some(&budget("1.5Gi"))).ok(),
            Some(Limits {
                bytes_per_second: Some(3 << 29),
                iops: None
            })
        );
        let err = limits(Some(&budget("fast"))).expect_err("fast");
        assert!(err.to_string().contains("ioBudget.bytesPerSecond"), "{err}");
        let err = limits(Some(&budget("0"))).expect_err("0");
        assert!(err.to_string().contains("zero"), "{err}");
        // Direct mode is paced too (restic's reads, in its cgroup).
        assert_eq!(
            limits(Some(&budget("10Mi"))).ok(),
            Some(Limits {
                bytes_per_second: Some(10 << 20),
                iops: None
            })
        );
        // A restore is paced too (its stream snapshots' extraction).
        assert_eq!(
            limits(Some(&budget("10Mi"))).ok(),
            Some(Limits {
                bytes_per_second: Some(10 << 20),
                iops: None
            })
        );
        assert_eq!(limits(None).ok(), Some(Limits::default()));
        let zero_iops = BudgetSpec {
            bytes_per_second: None,
            iops: Some(0),
        };
        assert!(limits(Some(&zero_iops)).is_err());
    }

    #[test]
    fn paths_stay_inside_the_volume_and_fields_belong_to_their_kind() {
        let v = |paths: &[&str]| AssignedVolume {
            volume_name: "data".into(),
            paths: Some(strings(paths)),
            ..AssignedVolume::default()
        };
        assert_eq!(
            paths(&v(&["db", "./logs/app"])).ok(),
            Some(vec![PathBuf::from("db"), PathBuf::from("./logs/app")])
        );
        for bad in ["/etc", "../other", "db/../../x", ""] {
            assert!(paths(&v(&[bad])).is_err(), "{bad}");
        }
        assert!(volume_fields(&v(&["db"]), true).is_ok());
        assert!(volume_fields(&v(&["db"]), false).is_err());
        let restore_only = AssignedVolume {
            snapshot: Some("latest".into()),
            ..AssignedVolume::default()
        };
        let err = volume_fields(&restore_only, true).expect_err("snapshot in a backup");
        assert!(
            err.to_string().contains("snapshot only apply to a restore"),
            "{err}"
        );
    }
}
