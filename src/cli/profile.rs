//! `wattgate profile`: measure a model on a labeled workload (accuracy, energy, time).

use std::path::PathBuf;
use std::process::ExitCode;

use super::models::model_cache;
use super::{usage_error, ConfigArg, ReportFormat};

/// Arguments of `wattgate profile`.
#[derive(clap::Args)]
pub struct ProfileArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The configured backend to measure (embedded, local server or cloud), by name.
    #[arg(long)]
    pub model: String,
    /// Labeled JSONL (shared routing schema; `messages` may replace `prompt`; optional
    /// `answer`, a string or a list of accepted strings).
    #[arg(long)]
    pub data: PathBuf,
    /// Only the first N rows of the file.
    #[arg(long, conflicts_with = "sample")]
    pub limit: Option<usize>,
    /// N rows spread evenly over the file (for files sorted by subject).
    #[arg(long)]
    pub sample: Option<usize>,
    /// Queries in flight at once. 1 (the default) gives each query the meter to itself.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Output directory. Default: profiles/<model>-<data file name>.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// max_tokens per query. Default: the backend's own default.
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Unrecorded warm-up queries before measuring.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// A configured backend that judges answers without a reference key (win-or-tie
    /// against a reference answer, both orders).
    #[arg(long)]
    pub judge: Option<String>,
    /// A configured backend whose answer is the judge's reference when a row has none.
    #[arg(long)]
    pub reference_model: Option<String>,
    /// `table` for people, `json` for scripts (stdout).
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
}

impl ProfileArgs {
    /// Profiles the model and prints the summary.
    pub fn run(self) -> ExitCode {
        let ProfileArgs {
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
        } = self;
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
}

fn profile(
    arg: &ConfigArg,
    options: &wattgate::profile::Options,
    format: ReportFormat,
) -> ExitCode {
    use wattgate::profile::{self, AnswerKeySource};
    use wattgate::progress::{Progress, Unit};
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
    use wattgate::router::model::{self, RouterError};
    let router_name = config
        .backends
        .iter()
        .find(|b| b.name == options.model)
        .and_then(|b| b.router_name());
    // No router for this model is routine (its rows then carry no p_local); a router that is
    // there but does not load is a broken installation, and stops the run.
    let router_dir = match router_name.map(|n| model::resolve(&n, &config.routing.router_dir)) {
        None => None,
        Some(Ok(dir)) => Some(dir),
        Some(Err(e @ RouterError::NotFound { .. })) => {
            eprintln!("note: {e}; rows carry no p_local");
            None
        }
        Some(Err(e)) => return usage_error(e),
    };
    if let Some(dir) = router_dir {
        match model::RouterModel::load(&dir) {
            Ok(m) => options.router = Some(std::sync::Arc::new(m)),
            Err(e) => return usage_error(e),
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
    let runtime = match super::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = runtime.block_on(async {
        let metering = wattgate::metering::Metering::new(&config).map_err(anyhow::Error::msg)?;
        let backends = profile::build_backends(&config, options)?;
        // Shared by both callbacks, so messages print above the bar instead of through it.
        let bar: std::cell::RefCell<Option<Progress>> = std::cell::RefCell::new(None);
        profile::run(
            options,
            &backends,
            &metering,
            keys,
            &mut |p| {
                let mut bar = bar.borrow_mut();
                let bar = bar
                    .get_or_insert_with(|| Progress::new("profile", p.total as u64, Unit::Items));
                let graded = p.done - p.failed;
                let accuracy = if graded > 0 {
                    format!("{:.1}%", 100.0 * p.correct as f64 / graded as f64)
                } else {
                    "-".to_owned()
                };
                let status = format!("accuracy {accuracy}, failed {}", p.failed);
                bar.set(p.done as u64, &status);
                if p.done == p.total {
                    bar.finish(&status);
                }
            },
            &mut |text| match bar.borrow_mut().as_mut() {
                Some(bar) => bar.println(&text),
                None => eprintln!("{text}"),
            },
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
