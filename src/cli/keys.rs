//! `wattgate keys new|hash`: client keys for `[auth]`, stored only as SHA-256 digests.

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Generates a random key; prints the key (give it to the client, once) and the `[auth]`
    /// entry holding only its SHA-256.
    New {
        /// The key holder's name (rate-limit bucket and log label).
        #[arg(long, default_value = "client")]
        name: String,
    },
    /// Reads a key from standard input (not the command line, which shells keep in history)
    /// and prints its SHA-256 for `[auth]`.
    Hash,
}

impl KeysCommand {
    /// Runs the subcommand.
    pub fn run(self) -> ExitCode {
        let command = self;
        let hex = |key: &str| -> String {
            wattgate::server::key_digest(key)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        match command {
            KeysCommand::New { name } => {
                let bytes: [u8; 24] = rand::random();
                let key: String = std::iter::once("wg-".to_owned())
                    .chain(bytes.iter().map(|b| format!("{b:02x}")))
                    .collect();
                println!("key (give to the client; it is not stored anywhere): {key}");
                println!();
                println!("[[auth.keys]]");
                println!("name = \"{name}\"");
                println!("sha256 = \"{}\"", hex(&key));
                ExitCode::SUCCESS
            }
            KeysCommand::Hash => {
                let mut key = String::new();
                if let Err(e) = std::io::stdin().read_line(&mut key) {
                    eprintln!("error: cannot read the key from standard input: {e}");
                    return ExitCode::FAILURE;
                }
                let key = key.trim();
                if key.is_empty() {
                    eprintln!(
                    "error: no key on standard input (try: echo -n \"$KEY\" | wattgate keys hash)"
                );
                    return ExitCode::FAILURE;
                }
                println!("{}", hex(key));
                ExitCode::SUCCESS
            }
        }
    }
}
