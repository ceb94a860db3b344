//! `--config FILE`: TOML with the same settings as the flags.
//!
//! A file is turned into the flags it stands for and parsed by the same clap
//! definitions, so every unit, range and error message is shared, and a new
//! flag is a new config key for free. File settings come first and command
//! line flags after them; clap's "last one wins" makes flags override the
//! file. Unknown keys are errors: a typo never goes unnoticed.
//!
//! ```toml
//! role = "exit"                 # required for `run` and `check`
//! listen = "0.0.0.0:9000"
//! upstream = "127.0.0.1:80"
//! key_file = "/etc/shardproxy/psk"
//! idle_timeout = "5m"
//! dual_stack = true
//! ```

use clap::CommandFactory;

use crate::cli::Cli;

/// Why a config file was rejected. One line each.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FileError {
    /// `--config` is followed by another flag, not a path.
    #[error("--config needs a file path, but `{next}` follows it (write --config=PATH for a path that starts with -)")]
    NoPath {
        /// What followed `--config`.
        next: String,
    },
    /// `--config` was given more than once.
    #[error("--config given twice ({first} and {second}): one file per process; flags on the command line override its keys")]
    Twice {
        /// The first path.
        first: String,
        /// The second path.
        second: String,
    },
    /// Not readable.
    #[error("cannot read config {path}: {reason}")]
    Unreadable {
        /// The path.
        path: String,
        /// The OS error.
        reason: String,
    },
    /// Not UTF-8 text.
    #[error("config {path} is not UTF-8 text ({what}); save it as UTF-8")]
    NotText {
        /// The path.
        path: String,
        /// What it looks like instead.
        what: &'static str,
    },
    /// Not valid TOML.
    #[error("config {path} is not valid TOML: {reason}")]
    Syntax {
        /// The path.
        path: String,
        /// The first line of the parser's message.
        reason: String,
    },
    /// A key that is no flag of this role.
    #[error("config {path}: unknown key `{key}` for role {role}{hint}")]
    UnknownKey {
        /// The path.
        path: String,
        /// The key.
        key: String,
        /// The role.
        role: String,
        /// ` (did you mean ...?)` or empty.
        hint: String,
    },
    /// A value of the wrong TOML type.
    #[error("config {path}: key `{key}` must be {want}")]
    BadValue {
        /// The path.
        path: String,
        /// The key.
        key: String,
        /// What it must be.
        want: &'static str,
    },
    /// `role` is not a role.
    #[error("config {path}: `role` must be one of \"entry\", \"exit\", \"forward\"")]
    BadRole {
        /// The path.
        path: String,
    },
    /// No `role`, and the command (`run`, `check`) names none either.
    #[error("config {path} has no `role` key: add role = \"entry\", \"exit\" or \"forward\" (or start the role's command with --config)")]
    NoRole {
        /// The path.
        path: String,
    },
    /// The file's role differs from the command's.
    #[error("config {path} is for role {file} but the command is {command}")]
    RoleMismatch {
        /// The path.
        path: String,
        /// Role in the file.
        file: String,
        /// Role on the command line.
        command: String,
    },
}

/// What a config file supplied to a command line.
#[derive(Debug, PartialEq, Eq)]
pub struct Supplied {
    /// The file's path.
    pub path: String,
    /// Long flags (without `--`) whose value came from the file.
    pub flags: Vec<String>,
}

impl Supplied {
    /// The config key for `flag` (`--buffer-size` → `buffer_size`) if the
    /// file supplied it.
    pub fn key_for(&self, flag: &str) -> Option<String> {
        let bare = flag.trim_start_matches("--");
        self.flags
            .iter()
            .any(|f| f == bare)
            .then(|| bare.replace('-', "_"))
    }
}

/// The flags a config file stands for, and the role it names (if any).
#[derive(Debug, PartialEq, Eq)]
pub struct FileArgs {
    /// `role = ...`, if present.
    pub role: Option<String>,
    /// The flags, e.g. `["--listen", "0.0.0.0:9000", "--dual-stack"]`.
    pub args: Vec<String>,
}

const ROLES: [&str; 3] = ["entry", "exit", "forward"];

/// Turns a file's bytes into text, or says what it is instead: every file
/// the proxy reads (config, key file) goes through this, so all accept the
/// same encodings. A UTF-8 byte-order mark is dropped; CRLF and trailing
/// blanks are left to the line parsers, which accept them.
pub fn decode_text(bytes: Vec<u8>) -> Result<String, (&'static str, Vec<u8>)> {
    if bytes.starts_with(&[0xff, 0xfe, 0, 0]) || bytes.starts_with(&[0, 0, 0xfe, 0xff]) {
        return Err(("it is UTF-32", bytes));
    }
    if bytes.starts_with(&[0xff, 0xfe]) || bytes.starts_with(&[0xfe, 0xff]) {
        return Err(("it is UTF-16", bytes));
    }
    if bytes.contains(&0) {
        return Err((
            "it contains NUL bytes: binary, or UTF-16 without a byte-order mark",
            bytes,
        ));
    }
    let mut text = String::from_utf8(bytes)
        .map_err(|e| ("it has bytes that are not UTF-8", e.into_bytes()))?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

/// Why a file could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The OS refused (missing, permission denied, a directory, ...).
    Io(std::io::Error),
    /// A FIFO, device or socket: reading it could block or never end.
    NotRegular,
    /// Larger than the cap, in bytes.
    TooLarge(u64),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "{e}"),
            ReadError::NotRegular => f.write_str("not a regular file (a FIFO, device or socket)"),
            ReadError::TooLarge(cap) => write!(f, "larger than {cap} bytes"),
        }
    }
}

/// Reads a regular file of at most `cap` bytes. The file is opened
/// non-blocking and checked on the open descriptor, so a FIFO, `/dev/zero`
/// or a file that grows while being read can neither block the caller nor
/// make it allocate without bound.
pub fn read_bounded(path: &str, cap: u64) -> Result<Vec<u8>, ReadError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(ReadError::Io)?;
    let meta = file.metadata().map_err(ReadError::Io)?;
    if meta.is_dir() {
        return Err(ReadError::Io(std::io::Error::from_raw_os_error(
            libc::EISDIR,
        )));
    }
    if !meta.is_file() {
        return Err(ReadError::NotRegular);
    }
    if meta.len() > cap {
        return Err(ReadError::TooLarge(cap));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > cap {
        return Err(ReadError::TooLarge(cap));
    }
    Ok(bytes)
}

/// Largest config file read, in bytes.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads and translates `path`. `command_role` is the role given on the
/// command line, if any; otherwise the file must name one.
pub fn read(path: &str, command_role: Option<&str>) -> Result<FileArgs, FileError> {
    let bytes = read_bounded(path, MAX_CONFIG_BYTES).map_err(|e| FileError::Unreadable {
        path: path.to_string(),
        reason: e.to_string(),
    })?;
    let text = decode_text(bytes).map_err(|(what, _)| FileError::NotText {
        path: path.to_string(),
        what,
    })?;
    translate(&text, path, command_role)
}

/// Translates config text (pure; testable and fuzzable).
pub fn translate(
    text: &str,
    path: &str,
    command_role: Option<&str>,
) -> Result<FileArgs, FileError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let first = e.message().lines().next().unwrap_or("syntax error");
        // Name the line: "duplicate key" alone does not say which.
        // 1-based: the newlines before the span, plus one (`lines()` would
        // miss the line a span opens at column 0).
        let line = e.span().map(|span| {
            text.as_bytes()[..span.start.min(text.len())]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1
        });
        // The toml crate parses integers wider than TOML's 64 bits and
        // then names its own internal type; say what the limit is instead.
        let first = if first.starts_with("invalid type: integer") && first.contains("i128") {
            "integer out of range: TOML integers are 64-bit (-2^63 to 2^63-1)"
        } else {
            first
        };
        // And quote what the error points at, when that is a short piece of
        // one line: the key that was given twice, say.
        let quoted = e
            .span()
            .and_then(|span| text.get(span))
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= 64 && !t.contains('\n'))
            .map(|t| format!(" (`{}`)", crate::log::one_line(t)))
            .unwrap_or_default();
        FileError::Syntax {
            path: path.to_string(),
            reason: match line {
                Some(n) => format!("line {n}: {first}{quoted}"),
                None => format!("{first}{quoted}"),
            },
        }
    })?;
    let file_role = match table.get("role") {
        None => None,
        Some(toml::Value::String(r)) if ROLES.contains(&r.as_str()) => Some(r.clone()),
        Some(_) => {
            return Err(FileError::BadRole {
                path: path.to_string(),
            })
        }
    };
    let role = match (file_role.as_deref(), command_role) {
        (Some(f), Some(c)) if f != c => {
            return Err(FileError::RoleMismatch {
                path: path.to_string(),
                file: f.to_string(),
                command: c.to_string(),
            })
        }
        (_, Some(c)) => c.to_string(),
        (Some(f), None) => f.to_string(),
        (None, None) => {
            return Err(FileError::NoRole {
                path: path.to_string(),
            })
        }
    };
    let command = Cli::command();
    let sub = command
        .find_subcommand(&role)
        .ok_or_else(|| FileError::BadRole {
            path: path.to_string(),
        })?;
    // (flag, takes a value, the kind of value a TOML integer may stand for)
    let flags: Vec<(&str, bool, Numeric)> = sub
        .get_arguments()
        .filter_map(|a| {
            // A switch: no value (`--accept-proxy`), or an optional one
            // (`--dual-stack[=false]`).
            let switch = !a.get_action().takes_values() || optional_value(a);
            let numeric = match a.get_value_names().unwrap_or_default() {
                _ if switch => Numeric::Switch,
                [n] if n.as_str() == "N" => Numeric::Count,
                [n] if n.as_str() == "SIZE" => Numeric::Size,
                [n] if n.as_str() == "DURATION" => Numeric::Duration,
                _ => Numeric::No,
            };
            a.get_long()
                .map(|l| (l, a.get_action().takes_values(), numeric))
        })
        .filter(|(l, _, _)| !matches!(*l, "config" | "help" | "version"))
        .collect();
    let mut args = Vec::new();
    for (key, value) in &table {
        if key == "role" {
            continue;
        }
        let flag = key.replace('_', "-");
        // Keys are written with `_`; `dual-stack` is not silently accepted.
        let known = (!key.contains('-'))
            .then(|| flags.iter().find(|(l, _, _)| *l == flag))
            .flatten();
        let Some(&(_, takes_value, numeric)) = known else {
            let hint = flags
                .iter()
                .map(|(l, _, _)| l.replace('-', "_"))
                .find(|k| edit_distance(k, &key.replace('-', "_")) <= 2)
                .map(|k| format!(" (did you mean `{k}`?)"))
                .or_else(|| {
                    matches!(
                        key.as_str(),
                        "key_file" | "handshake_timeout" | "max_clock_skew"
                    )
                    .then(|| " (it applies only to roles entry and exit)".to_string())
                })
                .unwrap_or_default();
            return Err(FileError::UnknownKey {
                path: path.to_string(),
                key: key.clone(),
                role,
                hint,
            });
        };
        let bad = |want| FileError::BadValue {
            path: path.to_string(),
            key: key.clone(),
            want,
        };
        // `upstream` may be a list of `"HOST:PORT"` strings and
        // `{ address = "HOST:PORT", weight = N }` tables: one flag each.
        if key == "upstream" {
            if let toml::Value::Array(items) = value {
                if items.is_empty() {
                    return Err(bad("a non-empty list"));
                }
                for item in items {
                    args.push(format!(
                        "--{flag}={}",
                        upstream_item(item).ok_or_else(|| bad(UPSTREAM_ITEM))?
                    ));
                }
                continue;
            }
            if let toml::Value::Table(_) = value {
                args.push(format!(
                    "--{flag}={}",
                    upstream_item(value).ok_or_else(|| bad(UPSTREAM_ITEM))?
                ));
                continue;
            }
        }
        // A list flag written as a TOML array of strings.
        if key == "proxy_trusted_cidrs" {
            if let toml::Value::Array(items) = value {
                let list: Option<Vec<&str>> = items.iter().map(toml::Value::as_str).collect();
                let list = list.ok_or_else(|| bad("a string or a list of strings"))?;
                args.push(format!("--{flag}={}", list.join(",")));
                continue;
            }
        }
        match (value, takes_value) {
            // A switch with an optional value (`--dual-stack[=false]`).
            (toml::Value::Boolean(on), true) if numeric == Numeric::Switch => {
                args.push(format!("--{flag}={on}"))
            }
            (toml::Value::Boolean(on), false) => {
                if *on {
                    args.push(format!("--{flag}"));
                }
            }
            // Only a TOML boolean for a switch (not `1` or `"yes"`), and a
            // boolean for nothing else: `access_log = false` made a file
            // named `false`, `control_socket = true` a socket named `true`.
            (_, _) if numeric == Numeric::Switch => return Err(bad("true or false")),
            (_, false) => return Err(bad("true or false")),
            // `--flag=value`, so a value such as `-1` is read as a value
            // (and rejected with the key's own message), never as a flag.
            (toml::Value::String(s), true) => args.push(format!("--{flag}={s}")),
            // An integer only where a number is meant: `access_log = -1`
            // must not become a file named `-1`, nor `cpu_list = 3` pass
            // for a list.
            (toml::Value::Integer(i), true) => match numeric {
                Numeric::Count | Numeric::Size => args.push(format!("--{flag}={i}")),
                Numeric::Duration => return Err(bad(DURATION_VALUE)),
                Numeric::No | Numeric::Switch => return Err(bad("a string")),
            },
            (_, true) => {
                return Err(bad(match numeric {
                    Numeric::Count => "an integer",
                    Numeric::Size => "an integer (bytes) or a string such as \"16KiB\"",
                    Numeric::Duration => DURATION_VALUE,
                    Numeric::No | Numeric::Switch => "a string",
                }))
            }
        }
    }
    Ok(FileArgs {
        role: file_role,
        args,
    })
}

/// Whether `arg` takes its value optionally (`--dual-stack[=false]`): the
/// switches that can also be turned off.
pub(super) fn optional_value(arg: &clap::Arg) -> bool {
    arg.get_num_args().is_some_and(|n| n.min_values() == 0)
}

/// What a TOML integer (or boolean) may stand for in a key's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Numeric {
    /// A switch: only a boolean.
    Switch,
    /// A count (`N`): an integer.
    Count,
    /// A size (`SIZE`): an integer number of bytes, or a string with a unit.
    Size,
    /// A duration (`DURATION`): only a string with a unit.
    Duration,
    /// Anything else (paths, addresses, names): only a string.
    No,
}

const DURATION_VALUE: &str = "a string with a unit, such as \"30s\" or \"500ms\"";

const UPSTREAM_ITEM: &str = "\"HOST:PORT\", \"HOST:PORT weight=N\", a table with exactly the keys address = \"HOST:PORT\" and (optionally) weight = N, or a list of them";

/// One `upstream` entry as its flag value (`HOST:PORT weight=N`).
fn upstream_item(item: &toml::Value) -> Option<String> {
    match item {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Table(t) => {
            if t.keys().any(|k| k != "address" && k != "weight") {
                return None;
            }
            let address = t.get("address")?.as_str()?;
            // The weight goes in its own key, not in the address.
            if address.split_whitespace().count() != 1 {
                return None;
            }
            match t.get("weight") {
                None => Some(address.to_string()),
                Some(w) => Some(format!("{address} weight={}", w.as_integer()?)),
            }
        }
        _ => None,
    }
}

/// Levenshtein distance, for "did you mean" hints on short keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Rewrites a command line so a `--config FILE` given to a role subcommand
/// is replaced by the file's flags, placed before the command line's own
/// flags (which therefore win). `run --config FILE` becomes the file's role.
/// Returns the new command line and, if a file was named, what it supplied.
pub fn expand_argv(argv: Vec<String>) -> Result<(Vec<String>, Option<Supplied>), FileError> {
    let Some(sub_at) = argv
        .iter()
        .skip(1)
        .position(|a| !a.starts_with('-'))
        .map(|i| i + 1)
    else {
        return Ok((argv, None));
    };
    let sub = argv[sub_at].as_str();
    if !ROLES.contains(&sub) && sub != "run" {
        return Ok((argv, None));
    }
    let rest = &argv[sub_at + 1..];
    let mut path = None;
    let mut kept = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        // After `--` nothing is a flag, `--config` included (clap then
        // rejects what follows, as it does for every other command).
        if rest[i] == "--" {
            kept.extend_from_slice(&rest[i..]);
            break;
        }
        let (given, step) = if rest[i] == "--config" && i + 1 < rest.len() {
            // `run --config --listen ...`: the path was left out.
            if rest[i + 1].starts_with('-') && rest[i + 1] != "-" {
                return Err(FileError::NoPath {
                    next: rest[i + 1].clone(),
                });
            }
            (Some(rest[i + 1].clone()), 2)
        } else if let Some(p) = rest[i].strip_prefix("--config=") {
            (Some(p.to_string()), 1)
        } else {
            (None, 1)
        };
        if let Some(given) = given {
            if let Some(first) = path.replace(given.clone()) {
                return Err(FileError::Twice {
                    first,
                    second: given,
                });
            }
            i += step;
        } else {
            kept.push(rest[i].clone());
            i += 1;
        }
    }
    let Some(path) = path else {
        return Ok((argv, None));
    };
    let command_role = ROLES.contains(&sub).then_some(sub);
    let file = read(&path, command_role)?;
    let role = command_role
        .map(str::to_string)
        .or(file.role)
        .ok_or_else(|| FileError::NoRole { path: path.clone() })?;
    let mut out = argv[..sub_at].to_vec();
    out.push(role);
    // A flag on the command line also overrides the file's settings it
    // excludes: `--cpu-list` replaces a file's `cores`, and the reverse.
    const EXCLUDES: [(&str, &str); 2] = [("cores", "cpu-list"), ("cpu-list", "cores")];
    let given = |flag: &str| {
        kept.iter()
            .any(|k| k == &format!("--{flag}") || k.starts_with(&format!("--{flag}=")))
    };
    // A flag on the command line replaces the file's setting as a whole
    // (a list such as `upstream` too, not added to). The file's copy is
    // dropped here rather than overridden by clap, so that a flag the
    // command line itself repeats stays an error.
    let file_args: Vec<String> = file
        .args
        .iter()
        .filter(|a| {
            let flag = a.trim_start_matches("--").split('=').next().unwrap_or("");
            let excluded = EXCLUDES.iter().any(|(f, other)| *f == flag && given(other));
            !excluded && !given(flag)
        })
        .cloned()
        .collect();
    out.extend(file_args.iter().cloned());
    let flags = file_args
        .iter()
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_string())
        .collect();
    out.extend(kept);
    Ok((out, Some(Supplied { path, flags })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translates_keys_to_flags() {
        let f = translate(
            "role = \"exit\"\nlisten = \"0.0.0.0:9000\"\nbacklog = 128\ndual_stack = true\nkey_file = \"/k\"\n",
            "f",
            None,
        )
        .unwrap();
        assert_eq!(f.role.as_deref(), Some("exit"));
        // Keys come out in sorted order; each flag appears once.
        assert_eq!(
            f.args,
            [
                "--backlog=128",
                "--dual-stack=true",
                "--key-file=/k",
                "--listen=0.0.0.0:9000"
            ]
        );
    }

    #[test]
    fn syntax_errors_name_the_right_line() {
        let err = |text: &str| translate(text, "f", None).unwrap_err().to_string();
        let e = err("role = \"forward\"\nlisten = \"x\"\nlisten = \"y\"\n");
        assert!(e.contains("line 3: duplicate key"), "{e}");
        let e = err("role = \"forward\"\n  listen = \"x\"\n  listen = \"y\"\n");
        assert!(e.contains("line 3: duplicate key"), "{e}");
        assert!(e.contains("`listen`"), "the key is not named: {e}");
        let e = err("role = \"forward\"\nbacklog = 99999999999999999999\n");
        assert!(
            e.contains("line 2: integer out of range: TOML integers are 64-bit")
                && !e.contains("i128"),
            "{e}"
        );
        let e = err("listen = = 1\n");
        assert!(e.contains("line 1:"), "{e}");
    }

    #[test]
    fn rejects_typos_types_and_roles() {
        let e = translate("role = \"exit\"\nidle_timout = \"5m\"\n", "f", None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config f: unknown key `idle_timout` for role exit (did you mean `idle_timeout`?)"
        );
        // A tunnel-only key is unknown to forward.
        assert!(matches!(
            translate("key_file = \"k\"", "f", Some("forward")),
            Err(FileError::UnknownKey { .. })
        ));
        assert!(matches!(
            translate("dual_stack = 1.5", "f", Some("forward")),
            Err(FileError::BadValue { .. })
        ));
        assert!(matches!(
            translate("listen = [1]", "f", Some("forward")),
            Err(FileError::BadValue { .. })
        ));
        // Integers only where a number is meant.
        for (text, want) in [
            ("access_log = -1", "a string"),
            ("cpu_list = 3", "a string"),
            ("idle_timeout = 30", DURATION_VALUE),
            ("max_fails = 2.5", "an integer"),
            ("access_log = false", "a string"),
            ("control_socket = true", "a string"),
            ("dual_stack = 1", "true or false"),
            ("dual_stack = \"true\"", "true or false"),
            ("accept_proxy = \"yes\"", "true or false"),
        ] {
            match translate(text, "f", Some("forward")) {
                Err(FileError::BadValue { want: w, .. }) => assert_eq!(w, want, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        let f = translate("max_fails = 3\nbuffer_size = 16384", "f", Some("forward")).unwrap();
        assert_eq!(f.args, ["--buffer-size=16384", "--max-fails=3"]);
        assert_eq!(
            translate("listen = \"x\"", "f", None)
                .unwrap_err()
                .to_string(),
            "config f has no `role` key: add role = \"entry\", \"exit\" or \"forward\" (or start the role's command with --config)"
        );
        assert!(matches!(
            translate("role = \"proxy\"", "f", None),
            Err(FileError::BadRole { .. })
        ));
        assert!(matches!(
            translate("role = \"exit\"", "f", Some("entry")),
            Err(FileError::RoleMismatch { .. })
        ));
        assert!(matches!(
            translate("listen = ", "f", Some("exit")),
            Err(FileError::Syntax { .. })
        ));
        let e = translate("[x\n", "f", None).unwrap_err();
        assert_eq!(e.to_string().lines().count(), 1);
        // Keys use `_`; the dashed form is an unknown key with a hint.
        let e = translate("dual-stack = true", "f", Some("forward")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config f: unknown key `dual-stack` for role forward (did you mean `dual_stack`?)"
        );
    }

    #[test]
    fn flags_after_the_file_win() {
        let dir = std::env::temp_dir().join(format!("sp-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.toml");
        std::fs::write(
            &path,
            "role = \"forward\"\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:2\"\n",
        )
        .unwrap();
        let p = path.to_str().unwrap().to_string();
        let argv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (out, named) = expand_argv(argv(&[
            "sp",
            "run",
            "--config",
            &p,
            "--listen",
            "127.0.0.1:3",
        ]))
        .unwrap();
        let named = named.unwrap();
        assert_eq!(named.path, p);
        // --listen was overridden on the command line; --upstream is the file's.
        assert_eq!(named.key_for("--upstream").as_deref(), Some("upstream"));
        assert_eq!(named.key_for("--listen"), None);
        assert_eq!(
            out,
            argv(&[
                "sp",
                "forward",
                "--upstream=127.0.0.1:2",
                "--listen",
                "127.0.0.1:3"
            ])
        );
        let cli = <Cli as clap::Parser>::try_parse_from(&out).unwrap();
        let crate::cli::Command::Forward(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.listen, "127.0.0.1:3");
        assert_eq!(a.upstream, ["127.0.0.1:2"]);
        // Untouched when there is no --config.
        assert_eq!(
            expand_argv(argv(&["sp", "keygen"])).unwrap(),
            (argv(&["sp", "keygen"]), None)
        );
    }

    /// The fuzz seeds (the shipped examples) translate cleanly.
    #[test]
    fn fuzz_seeds_translate() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz/corpus/config_file");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let f = translate(&text, "seed", None)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(f.role.is_some() && !f.args.is_empty());
            n += 1;
        }
        assert!(n >= 3);
    }
}
