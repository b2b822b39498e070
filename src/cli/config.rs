//! `wattgate config check`: validate a config file and summarise what it sets up.

use std::process::ExitCode;

use clap::Subcommand;

use super::{ConfigArg, Source};

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Validate the config file and summarise what it sets up.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
}

impl ConfigCommand {
    /// Runs the subcommand.
    pub fn run(self) -> ExitCode {
        match self {
            ConfigCommand::Check { config } => check(&config),
        }
    }
}

fn check(arg: &ConfigArg) -> ExitCode {
    match arg.load() {
        Ok((config, source)) => {
            match source {
                Source::File(p) => println!("{}: valid", p.display()),
                Source::Defaults => println!("no config file: built-in defaults are valid"),
            }
            let (routing, why) = config.routing.resolved(&config.backends);
            println!(
                "listen {}  alias {:?}  policy {}{}",
                config.server.listen,
                config.routing.alias,
                routing.policy,
                why.map_or_else(String::new, |w| format!(" ({w})"))
            );
            for b in &config.backends {
                let url = b.base_url.as_ref().map_or_else(
                    || {
                        format!(
                            "embedded ({})",
                            b.gguf
                                .as_ref()
                                .map_or_else(|| "catalog".to_owned(), |p| p.display().to_string())
                        )
                    },
                    ToString::to_string,
                );
                let key = match &b.api_key_env {
                    None => "no key".to_owned(),
                    Some(var) if std::env::var_os(var).is_some() => format!("key from {var}"),
                    Some(var) => format!("key from {var} (NOT SET)"),
                };
                println!(
                    "  {:<6} {:<24} {} model={} ({key})",
                    b.role.as_str(),
                    b.name,
                    url,
                    b.model
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
