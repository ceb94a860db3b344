//! The one path from a command line (and the config file it may name) to a
//! validated [`Config`], after pingora's `load_yaml_with_opt_override`: read
//! the file, merge the flags over it, validate, in one function. `main`, `run`
//! and `check` all go through [`load`].

use clap::Parser;

use super::file::{self, FileError};
use super::{Config, ConfigError};
use crate::cli::{CheckArgs, Cli, Command, DemoArgs, KeygenArgs, StatsArgs};
use crate::proto::{KeyFileError, KeySet};

/// What a command line asks for.
#[derive(Debug)]
pub enum Loaded {
    /// A proxy role, validated, with warnings to log at start-up.
    Proxy {
        /// The configuration.
        config: Box<Config>,
        /// One-line warnings (e.g. a key file readable by others).
        warnings: Vec<String>,
    },
    /// A tool subcommand.
    Tool(Tool),
    /// `--help` or `--version`: print it and exit 0.
    Help(clap::Error),
}

/// The subcommands that run no proxy.
#[derive(Debug)]
pub enum Tool {
    /// `keygen`.
    Keygen(KeygenArgs),
    /// `stats`.
    Stats(StatsArgs),
    /// `check`.
    Check(CheckArgs),
    /// `demo`.
    Demo(DemoArgs),
}

/// Parses `argv` (program name first), expanding `--config FILE`, and
/// validates a proxy role's settings.
///
/// The commands, as `--help` lists them.
fn command_names() -> Vec<String> {
    use clap::CommandFactory;
    Cli::command()
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| c.get_name().to_string())
        .collect()
}

/// Errors are one line each. A clap error in a command line that names a
/// config file is reported against the file, since that is where most
/// settings come from.
pub fn load(argv: Vec<String>) -> Result<Loaded, ConfigError> {
    let (argv, supplied) = file::expand_argv(join_negative_values(argv))?;
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => return Ok(Loaded::Help(e)),
        // No command at all: clap's answer would be the whole help, and its
        // first line the program's description, not an error.
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            return Err(ConfigError::Args(format!(
                "a command is required: {} (see --help)",
                command_names().join(", ")
            )));
        }
        Err(e) => {
            let mut message = one_line(&e.to_string());
            if let Some(hint) = unexpected_value_hint(&argv, &e) {
                message.push_str(&hint);
            }
            if let Some(hint) = config_without_flag_hint(&argv, &e) {
                message.push_str(&hint);
            }
            let flag = match e.get(clap::error::ContextKind::InvalidArg) {
                // `--idle-timeout <DURATION>`, `--dual-stack[=<DUAL_STACK>]`:
                // the flag is the name before the value's placeholder.
                Some(clap::error::ContextValue::String(arg)) => Some(flag_name(arg).to_string()),
                _ => None,
            };
            // A value that did not even parse (`1e5`, a count beyond ±2^63,
            // a duration too large for its type) still learns the range.
            if e.kind() == clap::error::ErrorKind::ValueValidation {
                let range = match flag.as_deref() {
                    Some("--cores") => Some(format!(
                        "must be between 1 and {} (the cores this process may use)",
                        allowed_cores().len()
                    )),
                    Some(f) => super::ranges::range_of(f),
                    None => None,
                };
                if let Some(range) = range {
                    message.push_str(&format!("; {range}"));
                }
            }
            // A required setting that neither the file nor the command
            // line gave: name the file's key, not only the flag.
            if e.kind() == clap::error::ErrorKind::MissingRequiredArgument {
                if let (Some(s), Some(clap::error::ContextValue::Strings(missing))) =
                    (&supplied, e.get(clap::error::ContextKind::InvalidArg))
                {
                    let keys: Vec<String> = missing
                        .iter()
                        .filter_map(|m| m.strip_prefix("--"))
                        .map(|m| {
                            let flag = flag_name(m);
                            format!("`{}` (--{flag})", flag.replace('-', "_"))
                        })
                        .collect();
                    if !keys.is_empty() {
                        return Err(ConfigError::Args(format!(
                            "config {} lacks {}, and the command line does not give {}",
                            s.path,
                            keys.join(", "),
                            if keys.len() == 1 { "it" } else { "them" }
                        )));
                    }
                }
            }
            // Blame the file only for a value it supplied.
            let from_file = supplied
                .as_ref()
                .zip(flag)
                .and_then(|(s, flag)| Some((s.path.clone(), s.key_for(&flag)?)));
            return Err(match from_file {
                Some((path, key)) => ConfigError::InFile { path, key, message },
                None => ConfigError::Args(format!("{message} (see --help)")),
            });
        }
    };
    let in_file = |e: ConfigError| match (&supplied, e.flag()) {
        (Some(s), Some(flag)) => match s
            .key_for(flag)
            .or_else(|| e.asked_by().and_then(|f| s.key_for(f)))
        {
            Some(key) => ConfigError::InFile {
                path: s.path.clone(),
                key,
                message: e.to_string(),
            },
            None => e,
        },
        _ => e,
    };
    let cores = allowed_cores();
    let (mut config, warning) = match cli.command {
        Command::Forward(args) => (Config::forward(&args, &cores).map_err(in_file)?, None),
        Command::Entry(args) => Config::tunnel_role(false, &args, &cores).map_err(in_file)?,
        Command::Exit(args) => Config::tunnel_role(true, &args, &cores).map_err(in_file)?,
        // `run --config FILE` was rewritten to the file's role above, or
        // rejected there if the file names none.
        Command::Run(args) => return Err(FileError::BadRole { path: args.config }.into()),
        Command::Keygen(args) => return Ok(Loaded::Tool(Tool::Keygen(args))),
        Command::Stats(args) => return Ok(Loaded::Tool(Tool::Stats(args))),
        Command::Check(args) => return Ok(Loaded::Tool(Tool::Check(args))),
        Command::Demo(args) => return Ok(Loaded::Tool(Tool::Demo(args))),
    };
    // The access log appends a line per connection: never to a file the
    // process reads its settings from (a key file with a log line in it
    // fails the next SIGHUP and the next start), nor to the control socket's
    // path (a regular file there blocks every later start). The list goes
    // with the log, whose writers check it again before every reopen.
    let control = config
        .lifecycle
        .control_socket
        .as_ref()
        .map(|c| c.to_string_lossy().into_owned());
    let key_file = config.tunnel().map(|t| t.key_file.clone());
    let config_file = supplied.as_ref().map(|s| s.path.clone());
    if let Some(log) = &mut config.access_log {
        let own = [
            ("the control socket's path", control),
            ("the key file", key_file),
            ("the config file", config_file),
        ];
        log.protected = own
            .into_iter()
            .filter_map(|(what, path)| Some((what, path?)))
            .collect();
        if let Some(what) = crate::access_log::clash(&log.path, &log.protected) {
            return Err(in_file(ConfigError::BadAccessLog(
                one_line(&log.path),
                crate::access_log::clash_reason(what),
            )));
        }
    }
    let mut warnings: Vec<String> = warning.into_iter().collect();
    warnings.extend(config.warnings());
    Ok(Loaded::Proxy {
        config: Box::new(config),
        warnings,
    })
}

/// Folds clap's multi-line report into one line, keeping all of it but the
/// usage block and the `--help` hint: the missing argument's name, the
/// "similar subcommand" tip, and so on.
pub fn one_line(report: &str) -> String {
    let mut out = String::new();
    for line in report.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        let line = line.trim_start_matches("error: ");
        if line.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push_str(if out.ends_with(':') { " " } else { "; " });
        }
        out.push_str(line);
    }
    if out.is_empty() {
        out.push_str("invalid arguments");
    }
    out
}

/// Loads and validates the role a config file names (`shardproxy check`):
/// exactly what `shardproxy run --config FILE OVERRIDES...` would start.
pub fn load_file(path: &str, overrides: &[String]) -> Result<(Config, Vec<String>), ConfigError> {
    let mut argv = ["shardproxy", "run", "--config", path]
        .map(String::from)
        .to_vec();
    argv.extend_from_slice(overrides);
    match load(argv)? {
        Loaded::Proxy { config, warnings } => Ok((*config, warnings)),
        _ => Err(FileError::BadRole {
            path: path.to_string(),
        }
        .into()),
    }
}

/// The flag in how clap spells an argument, the name before its value's
/// placeholder: `--idle-timeout` in `--idle-timeout <DURATION>` and in
/// `--dual-stack[=<DUAL_STACK>]`.
fn flag_name(spelt: &str) -> &str {
    spelt.split([' ', '[', '=']).next().unwrap_or(spelt)
}

/// `check FILE` or `run FILE`: the file given without `--config`.
fn config_without_flag_hint(argv: &[String], e: &clap::Error) -> Option<String> {
    use clap::error::ErrorKind;
    let sub = argv.get(1)?.as_str();
    let file = argv.get(2)?;
    let missing = matches!(
        e.kind(),
        ErrorKind::MissingRequiredArgument | ErrorKind::UnknownArgument
    );
    (missing && matches!(sub, "check" | "run") && !file.starts_with('-'))
        .then(|| format!(" (write `shardproxy {sub} --config {file}`)"))
}

/// For clap's "unexpected argument 'X'" where X follows one of our long
/// flags: the likely slip, naming that flag. `--dual-stack false` (a switch
/// takes its value only after `=`) and `--max-fails -x` (clap reads a value
/// that starts with `-` as flags).
fn unexpected_value_hint(argv: &[String], e: &clap::Error) -> Option<String> {
    use clap::CommandFactory;
    if e.kind() != clap::error::ErrorKind::UnknownArgument {
        return None;
    }
    let Some(clap::error::ContextValue::String(value)) =
        e.get(clap::error::ContextKind::InvalidArg)
    else {
        return None;
    };
    let at = argv.iter().position(|a| a == value)?;
    let flag = argv.get(at.checked_sub(1)?)?.strip_prefix("--")?;
    let sub = argv.iter().skip(1).find(|a| !a.starts_with('-'))?;
    let command = Cli::command();
    let arg = command
        .find_subcommand(sub)?
        .get_arguments()
        .find(|a| a.get_long() == Some(flag))?;
    if arg.get_action().takes_values() && file::optional_value(arg) {
        Some(if matches!(value.as_str(), "true" | "false") {
            format!(" (--{flag} takes a value only after `=`: --{flag}={value})")
        } else {
            format!(" (--{flag} is a switch: write --{flag}, or --{flag}=false to turn it off)")
        })
    } else if arg.get_action().takes_values() && value.starts_with('-') {
        Some(format!(
            " (a value of --{flag} that starts with `-` is written --{flag}={value})"
        ))
    } else {
        None
    }
}

/// `--flag -1s` becomes `--flag=-1s`: a value that starts with `-` and a
/// digit (a negative duration, size or count) reaches the flag's own parser
/// and its range error, where clap would read `-1s` as short flags and
/// report "unexpected argument '-1'". No flag of ours has a digit for a
/// short name, so nothing else is joined; a missing value (`--idle-timeout
/// --cores 1`) still gets clap's "a value is required".
fn join_negative_values(argv: Vec<String>) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len());
    let mut args = argv.into_iter().peekable();
    while let Some(arg) = args.next() {
        if arg == "--" {
            out.push(arg);
            out.extend(args);
            break;
        }
        let negative = |v: &String| {
            let b = v.as_bytes();
            b.len() >= 2 && b[0] == b'-' && b[1].is_ascii_digit()
        };
        if arg.starts_with("--") && !arg.contains('=') && args.peek().is_some_and(negative) {
            let value = args.next().unwrap_or_default();
            out.push(format!("{arg}={value}"));
        } else {
            out.push(arg);
        }
    }
    out
}

/// The cores this process may run on (respects taskset and cpusets).
pub fn allowed_cores() -> Vec<usize> {
    let mut ids: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    ids.sort_unstable();
    ids
}

/// Largest key file read, in bytes: 16 keys of 44 characters leave ample
/// room for comments.
pub const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// Reads and parses a key file ([`KeySet::parse`] has the format). Returns
/// the set and, if the file is readable or writable by others, writable by
/// its group, or lists a key twice, a warning to log. Group-readable is the documented layout
/// (`0640 root:shardproxy`, deploy/README.md), so it is not warned about.
pub fn load_key_file(path: &str) -> Result<(KeySet, Option<String>), KeyFileError> {
    use std::os::unix::fs::PermissionsExt;
    use zeroize::Zeroize;
    let unreadable = |e: std::io::Error| KeyFileError::Unreadable {
        path: path.to_string(),
        reason: e.to_string(),
    };
    // A key file is a few lines; refuse anything larger before reading it.
    let bytes = file::read_bounded(path, MAX_KEY_FILE_BYTES).map_err(|e| match e {
        file::ReadError::TooLarge(cap) => KeyFileError::TooLarge {
            path: path.to_string(),
            cap,
        },
        file::ReadError::Io(e) if e.kind() == std::io::ErrorKind::NotFound => {
            KeyFileError::Unreadable {
                path: path.to_string(),
                reason: format!("{e}; make one with `shardproxy keygen --out {path}`"),
            }
        }
        e => KeyFileError::Unreadable {
            path: path.to_string(),
            reason: e.to_string(),
        },
    })?;
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    let text = file::decode_text(bytes).map_err(|(what, mut bytes)| {
        bytes.zeroize();
        KeyFileError::NotText {
            path: path.to_string(),
            what,
        }
    })?;
    let mut text = zeroize::Zeroizing::new(text);
    let set = KeySet::parse(&text, path);
    text.zeroize();
    let mode = meta.permissions().mode();
    // Others may neither read nor write it; its group may not write it.
    let mut warnings = Vec::new();
    if mode & 0o026 != 0 {
        warnings.push(format!(
            "key file {path} has mode {:o}: readable or writable by others, or writable by \
             its group; run chmod 640 {path} (or 600)",
            mode & 0o777
        ));
    }
    let set = set?;
    let fps = set.fingerprints();
    if let Some((i, fp)) = fps
        .iter()
        .enumerate()
        .find(|(i, fp)| fps[..*i].contains(fp))
    {
        warnings.push(format!(
            "key file {path}: key {} repeats an earlier key (fingerprint {fp})",
            i + 1
        ));
    }
    let warning = (!warnings.is_empty()).then(|| warnings.join("; "));
    Ok((set, warning))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(args: &[&str]) -> String {
        let argv = args.iter().map(|s| s.to_string()).collect();
        load(argv).unwrap_err().to_string()
    }

    #[test]
    fn clap_reports_stay_whole_on_one_line() {
        let e = err(&["shardproxy", "forward", "--listen", "127.0.0.1:0"]);
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("--upstream <HOST:PORT>"), "{e}");
        let e = err(&["shardproxy", "forwrd"]);
        assert!(e.contains("'forward'"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn file_errors_name_the_file_and_key() {
        let dir = std::env::temp_dir().join(format!("sp-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        let write = |body: &str| {
            std::fs::write(
                &path,
                format!("role = \"forward\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n{body}"),
            )
            .unwrap();
            path.to_str().unwrap().to_string()
        };
        let p = write("cores = -1\n");
        let e = load_file(&p, &[]).unwrap_err().to_string();
        assert!(e.starts_with(&format!("config {p}: key `cores`: ")), "{e}");
        assert!(e.contains("-1"), "{e}");
        let p = write("buffer_size = \"64GiB\"\n");
        let e = load_file(&p, &[]).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("config {p}: key `buffer_size`: --buffer-size 64GiB is out of range: must be between 1KiB and 16MiB")
        );
        // The same value on the command line is the flag's error.
        let e = err(&[
            "shardproxy",
            "forward",
            "--config",
            &p,
            "--buffer-size",
            "64GiB",
        ]);
        assert!(e.starts_with("--buffer-size 64GiB is out of range"), "{e}");
        let p = write("upstream_x = 1\n");
        assert!(load_file(&p, &[])
            .unwrap_err()
            .to_string()
            .contains("unknown key"));
    }
}
