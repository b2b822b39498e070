//! The `wattgate` command: parses the command line and hands it to its module in [`cli`].

mod cli;

use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command};

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => args.run(),
        Command::Config { command } => command.run(),
        Command::Models { command } => command.run(),
        Command::Router { command } => command.run(),
        Command::Report(args) => args.run(),
        Command::Keys { command } => command.run(),
        Command::Experiments { command } => command.run(),
        Command::Profile(args) => args.run(),
        Command::Simulate(args) => args.run(),
    }
}
