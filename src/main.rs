//! Thin binary: parse the CLI, run the chosen command, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use shardproxy::cli::{Cli, Command};
use shardproxy::config::Role;

fn main() -> ExitCode {
    // `--config FILE` becomes the flags it stands for, ahead of the real ones.
    let argv = match shardproxy::config_file::expand_argv(std::env::args().collect()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's report spans several lines (tips, usage); the contract is
            // one line, so keep its first line and point at --help.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("error: invalid arguments");
            eprintln!("{first} (see --help)");
            return ExitCode::from(2);
        }
    };
    let result = match &cli.command {
        Command::Forward(args) => shardproxy::app::run_forward(args),
        Command::Entry(args) => shardproxy::app::run_tunnel(Role::Entry, args),
        Command::Exit(args) => shardproxy::app::run_tunnel(Role::Exit, args),
        Command::Keygen(args) => shardproxy::app::keygen(args),
        Command::Check(args) => match shardproxy::app::check(&args.config) {
            Ok(summary) => {
                println!("{summary}");
                Ok(())
            }
            Err(e) => Err(e),
        },
        // `run --config FILE` was rewritten to the file's role above; this
        // is only reached when the file could not supply one.
        Command::Run(args) => Err(shardproxy::config_file::FileError::BadRole {
            path: args.config.clone(),
        }
        .into()),
        Command::Stats(args) => {
            return match shardproxy::metrics::stats_cmd::run(&args.from, args.per_shard) {
                Ok(table) => {
                    print!("{table}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            };
        }
        Command::Demo(args) => shardproxy::demo::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
