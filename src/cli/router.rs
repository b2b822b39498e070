//! `wattgate router train|score|eval|guard`: routers and the guard head from labeled data.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use super::{ConfigArg, RouterDirArg};

#[derive(Subcommand)]
pub enum RouterCommand {
    /// Train a router from labeled files (shared schema); prints validation by held-out source.
    Train {
        /// Labeled JSONL files; each row's `source` is a unit of leave-one-source-out validation.
        #[arg(long, required_unless_present = "from_ledger", num_args = 1..)]
        data: Vec<PathBuf>,
        /// The local model whose success is predicted. Repeat to give equivalent names in order
        /// of preference; `8b-class` means the mean of the 7-9B models a row labels.
        #[arg(long, required_unless_present = "from_ledger")]
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
        /// Fix the dense structure measures the head reads, comma-separated: names from
        /// ln_chars, ln_words, newline_rate, digit_share, operator_share, code, choice_lines,
        /// ln_questions, latex, non_ascii_share, ln_user_turns, ln_system_chars, list_lines;
        /// or `all`, or `none`. Default: validation chooses between
        /// ln_chars,digit_share,operator_share and none, on inner folds.
        #[arg(long, value_delimiter = ',')]
        structure_features: Option<Vec<String>>,
        /// Fit the head to the labels as they are. By default validation chooses, on inner
        /// folds, between that and labels centred by source (each source's mean replaced by
        /// the overall mean, so the head learns what makes a query hard among its kind).
        #[arg(long)]
        keep_source_levels: bool,
        /// L2 penalties validation chooses among, comma-separated. Default: 1e-5 alone.
        #[arg(long, value_delimiter = ',')]
        l2: Vec<f64>,
        /// A source whose scores are judge grades / 10 (the chat files: arena-bench-v1,
        /// mt-bench); repeatable. Each grade becomes success (1) at --pass-grade or above, else 0.
        #[arg(long)]
        graded_source: Vec<String>,
        /// The grade (out of 10) a graded answer needs to count as a success.
        #[arg(long, default_value_t = 8.0)]
        pass_grade: f64,
        /// Measure the value of own-traffic labels: this many rows of each outer held-out source
        /// join its training and only the rest is scored (scripts/router/own_rows_study.sh).
        #[arg(long, default_value_t = 0)]
        own_rows: usize,
        /// Also learn from this gateway's own traffic: ledger rows that --local-backend answered,
        /// labeled by their shadow checks and feedback (feedback wins where both exist). Rows
        /// need their text, kept only under `[ledger] store_prompts = true`. They form the source
        /// `own-traffic`, validated like any other.
        #[arg(long, requires = "local_backend")]
        from_ledger: bool,
        /// The ledger file. Default: the config's `ledger.path`. While the daemon holds it, the
        /// rows are read from the daemon instead (GET /v1/ledger/graded).
        #[arg(long, requires = "from_ledger")]
        ledger: Option<PathBuf>,
        /// The local backend (its configured name) whose answers the ledger's labels grade.
        #[arg(long, requires = "from_ledger")]
        local_backend: Option<String>,
        /// How much each own-traffic row counts in the fit against one row of the files
        /// (--from-ledger rows, and the --own-rows study's rows).
        #[arg(long, default_value_t = wattgate::router::own::DEFAULT_WEIGHT)]
        own_weight: f64,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Re-read the running daemon's router files and swap them in without dropping a request
    /// (POST /v1/router/reload; SIGHUP does the same). A router that fails to load is refused
    /// with the reason and the running routers keep serving.
    Reload {
        #[command(flatten)]
        config: ConfigArg,
        /// The daemon's address. Default: the config's `server.listen`.
        #[arg(long)]
        url: Option<String>,
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

impl RouterCommand {
    /// Runs the subcommand.
    pub fn run(self) -> ExitCode {
        let command = self;
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
                l2,
                graded_source,
                pass_grade,
                own_rows,
                from_ledger,
                ledger,
                local_backend,
                own_weight,
                config,
            } => (|| {
                let own = match (from_ledger, local_backend) {
                    (true, Some(backend)) => {
                        Some((own_rows_of(&config, ledger, &backend, own_weight)?, backend))
                    }
                    _ => None,
                };
                commands::train(&commands::TrainArgs {
                    files: &data,
                    local: &local_model,
                    cloud: &cloud_model,
                    out: &out,
                    name: name.as_deref(),
                    structure: structure_features.as_deref(),
                    keep_source_levels,
                    l2: &l2,
                    graded_sources: &graded_source,
                    pass_grade: pass_grade / 10.0,
                    own_rows,
                    own_weight,
                    own,
                })
            })(),
            RouterCommand::Reload { config, url } => reload(&config, url.as_deref()),
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
}

/// The own-traffic rows of `backend` in the ledger (read from the daemon while it holds the
/// file), with what was found said on stderr; an error when none is usable, saying why.
fn own_rows_of(
    config: &ConfigArg,
    ledger: Option<PathBuf>,
    backend: &str,
    weight: f64,
) -> Result<Vec<wattgate::router::data::Example>, String> {
    use wattgate::ledger::{Graded, Ledger, LedgerError};
    if !(weight.is_finite() && weight > 0.0) {
        return Err(format!("--own-weight {weight} must be a finite number > 0"));
    }
    let (config, _) = config.load().map_err(|e| e.to_string())?;
    let path = super::report::existing_ledger(&config, ledger).map_err(|e| e.to_string())?;
    let graded: Vec<Graded> = match Ledger::open(&path) {
        Ok(ledger) => ledger.graded().map_err(|e| e.to_string())?,
        Err(LedgerError::Busy(_)) => {
            let (url, body) = super::report::ask_daemon(&config, &path, "/v1/ledger/graded")
                .map_err(|e| e.to_string())?;
            let data = body
                .get("data")
                .cloned()
                .ok_or_else(|| format!("{url} answered without `data`"))?;
            serde_json::from_value(data).map_err(|e| format!("{url}: {e}"))?
        }
        Err(e) => return Err(e.to_string()),
    };
    let (rows, n) = wattgate::router::own::examples(&graded, backend, weight);
    eprintln!(
        "ledger {}: {} graded rows; {} answered locally by {backend}, {} of them without text; \
         {} used ({} by feedback, {} by shadow checks), weight {weight} each",
        path.display(),
        n.graded,
        n.of_backend,
        n.without_prompt,
        n.used,
        n.by_feedback,
        n.by_shadow
    );
    if rows.is_empty() {
        let why = if n.graded == 0 {
            "no row has a shadow verdict or feedback yet (turn on [shadow] sample_rate, or POST /v1/feedback)".to_owned()
        } else if n.of_backend == 0 {
            let mut seen: Vec<&str> = graded
                .iter()
                .filter(|g| g.row.route == "local")
                .map(|g| g.row.backend.as_str())
                .collect();
            seen.sort_unstable();
            seen.dedup();
            format!(
                "no graded row was answered locally by `{backend}` (local backends with graded rows: {})",
                if seen.is_empty() { "none".to_owned() } else { seen.join(", ") }
            )
        } else {
            "the graded rows carry no text: set [ledger] store_prompts = true and let traffic be graded again".to_owned()
        };
        return Err(format!("--from-ledger: nothing to learn from: {why}"));
    }
    Ok(rows)
}

/// `router reload`: asks the daemon to reload its routers and prints what it loaded.
fn reload(config: &ConfigArg, url: Option<&str>) -> Result<(), String> {
    let (config, _) = config.load().map_err(|e| e.to_string())?;
    let base = url.map_or_else(
        || format!("http://{}", config.server.listen),
        |u| u.trim_end_matches('/').to_owned(),
    );
    let url = format!("{base}/v1/router/reload");
    let body =
        super::report::daemon_json(reqwest::Method::POST, &url).map_err(|e| e.to_string())?;
    let routers = body.get("routers").and_then(serde_json::Value::as_array);
    for r in routers.into_iter().flatten() {
        println!(
            "{}: {} ({}), threshold {}",
            r["backend"].as_str().unwrap_or("?"),
            r["name"].as_str().unwrap_or("?"),
            r["path"].as_str().unwrap_or("?"),
            r["threshold"]
        );
    }
    println!(
        "reloaded {} router(s) at {url}",
        routers.map_or(0, Vec::len)
    );
    Ok(())
}
