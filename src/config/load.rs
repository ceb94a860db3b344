//! The one path from a command line (and the config file it may name) to a
//! validated [`Config`], after pingora's `load_yaml_with_opt_override`: read
//! the file, merge the flags over it, validate, in one function. `main`, `run`
//! and `check` all go through [`load`].

use clap::Parser;

use super::file::{self, FileError};
use super::{Config, ConfigError};
use crate::cli::{Cli, Command, ConfigArgs, DemoArgs, KeygenArgs, StatsArgs};
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
    Check(ConfigArgs),
    /// `demo`.
    Demo(DemoArgs),
}

/// Parses `argv` (program name first), expanding `--config FILE`, and
/// validates a proxy role's settings.
///
/// Errors are one line each. A clap error in a command line that names a
/// config file is reported against the file, since that is where most
/// settings come from.
pub fn load(argv: Vec<String>) -> Result<Loaded, ConfigError> {
    let (argv, file_path) = file::expand_argv(argv)?;
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => return Ok(Loaded::Help(e)),
        Err(e) => {
            // clap's report spans several lines (tips, usage); the contract
            // is one line, so keep its first line.
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ")
                .to_string();
            return Err(match file_path {
                Some(path) => ConfigError::FileValue {
                    path,
                    message: first,
                },
                None => ConfigError::Args(format!("{first} (see --help)")),
            });
        }
    };
    let cores = allowed_cores();
    let (config, warning) = match cli.command {
        Command::Forward(args) => (Config::forward(&args, &cores)?, None),
        Command::Entry(args) => Config::tunnel_role(false, &args, &cores)?,
        Command::Exit(args) => Config::tunnel_role(true, &args, &cores)?,
        // `run --config FILE` was rewritten to the file's role above, or
        // rejected there if the file names none.
        Command::Run(args) => return Err(FileError::BadRole { path: args.config }.into()),
        Command::Keygen(args) => return Ok(Loaded::Tool(Tool::Keygen(args))),
        Command::Stats(args) => return Ok(Loaded::Tool(Tool::Stats(args))),
        Command::Check(args) => return Ok(Loaded::Tool(Tool::Check(args))),
        Command::Demo(args) => return Ok(Loaded::Tool(Tool::Demo(args))),
    };
    Ok(Loaded::Proxy {
        config: Box::new(config),
        warnings: warning.into_iter().collect(),
    })
}

/// Loads and validates the role a config file names (`shardproxy check`):
/// exactly what `shardproxy run --config FILE` would start.
pub fn load_file(path: &str) -> Result<(Config, Vec<String>), ConfigError> {
    let argv = ["shardproxy", "run", "--config", path].map(String::from);
    match load(argv.to_vec())? {
        Loaded::Proxy { config, warnings } => Ok((*config, warnings)),
        _ => Err(FileError::BadRole {
            path: path.to_string(),
        }
        .into()),
    }
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

/// Reads and parses a key file ([`KeySet::parse`] has the format). Returns
/// the set and, if the file is readable by group or others, a warning to log.
pub fn load_key_file(path: &str) -> Result<(KeySet, Option<String>), KeyFileError> {
    use std::os::unix::fs::PermissionsExt;
    use zeroize::Zeroize;
    let unreadable = |e: std::io::Error| KeyFileError::Unreadable {
        path: path.to_string(),
        reason: e.to_string(),
    };
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    // A key file is a few lines; refuse anything absurd before reading it.
    if meta.len() > 64 * 1024 {
        return Err(KeyFileError::TooMany {
            path: path.to_string(),
        });
    }
    let mut text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(unreadable)?);
    let set = KeySet::parse(&text, path);
    text.zeroize();
    let mode = meta.permissions().mode();
    let warning = (mode & 0o077 != 0).then(|| {
        format!(
            "key file {path} is readable by group or others (mode {:o}); run chmod 600 {path}",
            mode & 0o777
        )
    });
    Ok((set?, warning))
}
