//! `wattgate simulate`: replay labeled routing data through the savings accounting.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{ConfigArg, ReportFormat, RouterDirArg};

/// Arguments of `wattgate simulate`.
#[derive(clap::Args)]
pub struct SimulateArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Labeled JSONL files (shared routing schema).
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// The local model's label (repeatable, first present wins; `8b-class` allowed).
    #[arg(long, required = true)]
    pub local_model: Vec<String>,
    /// The cloud model's label (repeatable). Default: each source's strongest model.
    #[arg(long)]
    pub cloud_model: Vec<String>,
    /// A router (name under --router-dir, or a directory) to simulate.
    #[arg(long)]
    pub router: Option<String>,
    #[command(flatten)]
    pub dir: RouterDirArg,
    /// The router's threshold. Default: the config's routing settings, else 0.5.
    #[arg(long)]
    pub threshold: Option<f64>,
    /// Accuracy p of simulated routers that agree with the oracle p of the time.
    #[arg(long, default_values_t = [0.8])]
    pub accuracy: Vec<f64>,
    /// Output tokens per answer (an assumption: the data has no answer lengths).
    #[arg(long, default_value_t = wattgate::simulate::DEFAULT_OUTPUT_TOKENS)]
    pub output_tokens: u64,
    /// Local joules per generated token. Default: the embedded model's measured-speed CPU
    /// estimate (0.45 J/token at 268 M parameters), scaled by the labeled model's parameters.
    #[arg(long)]
    pub local_joules_per_token: Option<f64>,
    /// Local joules per prompt token. Default: the same estimate from the measured prefill
    /// speed (0.0175 J/token at 268 M parameters), scaled the same way.
    #[arg(long)]
    pub local_joules_per_input_token: Option<f64>,
    /// Active parameters of the model whose labels are replayed as "local" (e.g. 8e9).
    /// Default: read from the label's name (`...-7b-...`, `8x7b`, `8b-class`); required when
    /// the name carries no size.
    #[arg(long)]
    pub local_parameters: Option<f64>,
    /// `table` or `json`.
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
}

impl SimulateArgs {
    /// Runs the replay and prints each policy's savings.
    pub fn run(self) -> ExitCode {
        let SimulateArgs {
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
            local_joules_per_input_token,
            local_parameters,
            format,
        } = self;
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
        if local_joules_per_token
            .into_iter()
            .chain(local_joules_per_input_token)
            .any(|j| !(j.is_finite() && j >= 0.0))
        {
            eprintln!(
                "error: --local-joules-per-token and --local-joules-per-input-token must be >= 0"
            );
            return ExitCode::from(2);
        }
        if local_parameters.is_some_and(|p| !(p.is_finite() && p > 0.0)) {
            eprintln!("error: --local-parameters must be > 0");
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
            local_joules_per_input_token,
            local_parameters,
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
}
