//! Thin binary: load the command line into a validated config, run the
//! chosen command, map errors to exit codes.

use std::process::ExitCode;

use shardproxy::config::{Loaded, Tool};

fn main() -> ExitCode {
    // First, before any code that may use them: the CPU features this build
    // was compiled to assume. Without them the process would die of SIGILL.
    shardproxy::sys::require_cpu_features();
    let loaded = match shardproxy::config::load(std::env::args().collect()) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("error: {}", shardproxy::log::one_line(&e.to_string()));
            return ExitCode::from(2);
        }
    };
    let result = match loaded {
        Loaded::Help(e) => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Loaded::Proxy { config, warnings } => {
            for w in warnings {
                shardproxy::warn!("{w}");
            }
            shardproxy::app::run(*config)
        }
        Loaded::Tool(Tool::Keygen(args)) => shardproxy::app::keygen(&args),
        Loaded::Tool(Tool::Check(args)) => shardproxy::app::check(&args.config).map(|summary| {
            println!("{}", shardproxy::log::one_line(&summary));
        }),
        Loaded::Tool(Tool::Stats(args)) => {
            return match shardproxy::metrics::stats_cmd::run(&args.from, args.per_shard) {
                Ok(table) => {
                    print!("{table}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {}", shardproxy::log::one_line(&e.to_string()));
                    ExitCode::from(1)
                }
            };
        }
        Loaded::Tool(Tool::Demo(args)) => shardproxy::demo::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", shardproxy::log::one_line(&e.to_string()));
            ExitCode::from(e.exit_code())
        }
    }
}

