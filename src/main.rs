//! Thin binary: load the command line into a validated config, run the
//! chosen command, map errors to exit codes.

use std::process::ExitCode;

use shardproxy::config::{Loaded, Tool};

fn main() -> ExitCode {
    // First, before any code that may use them: the CPU features this build
    // was compiled to assume. Without them the process would die of SIGILL.
    shardproxy::sys::require_cpu_features();
    // Then the signals a proxy handles wait, pending, for their handlers
    // (`control::held_at_start`): before any thread starts, so that every
    // thread inherits the mask. A tool gets its old mask back.
    let held = shardproxy::sys::block_signals(&shardproxy::control::held_at_start());
    // Then the log writer: from here on no line, not even a start-up
    // error, can hang the process on a stderr that does not move; every
    // way out of `run` ends with a bounded flush.
    // Without a thread for it (`ulimit -u`), lines are written in place; a
    // proxy says so once it serves (`log::writer_failure`), tools never.
    let _ = shardproxy::log::start_writer();
    let code = run(held);
    shardproxy::log::flush();
    code
}

fn run(held: shardproxy::sys::SignalMask) -> ExitCode {
    // `--log-format json` on the command line applies to start-up errors
    // too (a log pipeline that expects one JSON object per line). A format
    // set only in a config file applies once that file has been read.
    // Every argument must be UTF-8 (flags, addresses and paths alike):
    // `std::env::args()` would panic on one that is not.
    let mut args = Vec::new();
    for (i, arg) in std::env::args_os().enumerate() {
        match arg.into_string() {
            Ok(a) => args.push(a),
            // The program's own path is never used as a value: a binary in a
            // directory whose name is not UTF-8 still runs.
            Err(raw) if i == 0 => args.push(raw.to_string_lossy().into_owned()),
            Err(raw) => {
                report_error(&format!(
                    "argument {i} (`{}`) is not valid UTF-8; shardproxy takes UTF-8 arguments and paths only",
                    raw.to_string_lossy()
                ));
                return ExitCode::from(2);
            }
        }
    }
    // Only for the commands that take the flag: `keygen --log-format=json`
    // is a usage error, reported as text like any other.
    let takes_it = matches!(
        args.get(1).map(String::as_str),
        Some("forward" | "entry" | "exit" | "run")
    );
    let json = takes_it
        && (args
            .windows(2)
            .any(|w| w[0] == "--log-format" && w[1] == "json")
            || args.iter().any(|a| a == "--log-format=json"));
    if json {
        shardproxy::log::set_format(shardproxy::log::Format::Json);
    }
    // For a proxy, the signal disposition: before the config is read,
    // names resolved or ports bound, so that a SIGHUP from a quick `systemctl
    // reload` or a SIGTERM during start-up never meets the default action.
    // Tools (check, keygen, stats, demo) keep the default dispositions.
    let signals = match args.get(1).map(String::as_str) {
        Some("forward" | "entry" | "exit" | "run") => {
            match shardproxy::control::SignalPlane::install() {
                Ok(s) => {
                    // Handlers in place: what came meanwhile is delivered
                    // now, and a mask inherited from the parent is undone.
                    let _ = shardproxy::sys::unblock_signals(&shardproxy::control::held_at_start());
                    Some(s)
                }
                Err(e) => {
                    report_error(&e);
                    return ExitCode::from(2);
                }
            }
        }
        _ => {
            held.restore();
            None
        }
    };
    let loaded = match shardproxy::config::load(args) {
        Ok(loaded) => loaded,
        Err(e) => {
            report_error(&e);
            return ExitCode::from(2);
        }
    };
    let result = match loaded {
        Loaded::Help(e) => {
            // --help and --version: text nobody received is a failure
            // (`--help > /dev/full`), as for GNU tools.
            let written = e.print().and_then(|()| {
                use std::io::Write;
                std::io::stdout().flush()
            });
            return match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    report_error(&format!("cannot write to stdout: {e}"));
                    ExitCode::from(1)
                }
            };
        }
        Loaded::Proxy { config, warnings } => {
            // A limit no shard can start under: the one error, before
            // advice on connection limits that cannot apply.
            if let Err(e) = shardproxy::app::check_fd_floor(config.cores.len()) {
                report_error(&e);
                shardproxy::handover::report_failure(&e.to_string());
                return ExitCode::from(e.exit_code());
            }
            for w in warnings {
                shardproxy::warn!("{w}");
            }
            match signals {
                Some(signals) => shardproxy::app::run(*config, signals),
                // Not reached: load() returns a proxy only for these commands.
                None => shardproxy::control::SignalPlane::install()
                    .and_then(|signals| shardproxy::app::run(*config, signals)),
            }
        }
        Loaded::Tool(Tool::Keygen(args)) => shardproxy::app::keygen(&args),
        Loaded::Tool(Tool::Check(args)) => {
            match shardproxy::app::check(&args.config, &args.overrides) {
                // A verdict nobody received is not a pass.
                Ok(summary) => {
                    let line = format!("{}\n", shardproxy::log::one_line(&summary));
                    return match shardproxy::app::print_stdout(&line) {
                        Ok(()) => ExitCode::SUCCESS,
                        Err(e) => {
                            report_error(&format!("cannot write to stdout: {e}"));
                            ExitCode::from(1)
                        }
                    };
                }
                Err(e) => Err(e),
            }
        }
        Loaded::Tool(Tool::Stats(args)) => {
            return match shardproxy::metrics::stats_cmd::run(&args.from, args.per_shard) {
                Ok(table) => match shardproxy::app::print_stdout(&table) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        report_error(&format!("cannot write to stdout: {e}"));
                        ExitCode::from(1)
                    }
                },
                Err(e) => {
                    report_error(&e);
                    // A malformed --from is bad input (2, as every other
                    // argument error); a scrape that failed is 1.
                    let usage = matches!(e, shardproxy::metrics::stats_cmd::StatsError::BadUrl(_));
                    ExitCode::from(if usage { 2 } else { 1 })
                }
            };
        }
        Loaded::Tool(Tool::Demo(args)) => shardproxy::demo::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report_error(&e);
            // A successor that fails before it is ready says why to its
            // predecessor too (nothing is sent otherwise).
            shardproxy::handover::report_failure(&e.to_string());
            ExitCode::from(e.exit_code())
        }
    }
}

/// Writes `error: MESSAGE` (one line, control characters escaped) to
/// stderr, or under `--log-format json` a JSON line with level `error`:
/// through the log writer, so never panicking on a closed or full stderr
/// and never blocking on one that does not move (`main` flushes it, with a
/// bound, before the process exits).
/// The longest error line, in bytes: a message that quotes its input (a
/// 1 MB `--listen` value) is cut, not repeated whole.
const ERROR_MAX: usize = 1024;

fn report_error(message: &dyn std::fmt::Display) {
    // Escaped first, then cut: the line stays within the cap.
    let message = shardproxy::log::capped(
        shardproxy::log::one_line(&message.to_string()).into_owned(),
        ERROR_MAX,
    );
    if shardproxy::log::is_json() {
        shardproxy::log::write_line(shardproxy::log::Level::Error, &message);
    } else {
        shardproxy::log::write_raw(format!("error: {}\n", shardproxy::log::one_line(&message)));
    }
}
