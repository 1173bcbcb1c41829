//! `osprey-eval <protocol> --endpoint URL --data FILE --images DIR --out answers.jsonl`: runs one of
//! the paper's evaluation protocols through a running gateway, logs every raw answer (resumable),
//! and prints the metrics as JSON.

use std::path::PathBuf;

use clap::Parser;
use osprey_eval::protocols::{self, Protocol, RunOptions};
use osprey_proto::v1::GenerationParameters;

#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// The protocol to run.
    #[arg(value_enum)]
    protocol: Protocol,
    /// The gateway's public API.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    endpoint: String,
    /// Sent as `authorization: Bearer KEY` when the gateway requires a key.
    #[arg(long, env = "OSPREY_API_KEY")]
    api_key: Option<String>,
    /// The dataset file (the reference scripts' format for the protocol).
    #[arg(long)]
    data: PathBuf,
    /// The directory the dataset's image file names are relative to.
    #[arg(long)]
    images: PathBuf,
    /// Panoptic PNG directory (cityscapes, ade20k).
    #[arg(long)]
    masks: Option<PathBuf>,
    /// Class synonyms, one `index:name,name` line per category (Osprey's
    /// `*_with_prompt_eng.txt`); default: the dataset's category names split at commas.
    #[arg(long)]
    class_names: Option<PathBuf>,
    /// The raw-answer log (JSON lines); a rerun skips the items already in it.
    #[arg(long)]
    out: PathBuf,
    /// The all-MiniLM-L6-v2 directory (tools/fetch_minilm.sh).
    #[arg(long, env = "OSPREY_EMBEDDER", default_value = ".cache/weights/all-MiniLM-L6-v2")]
    embedder: PathBuf,
    /// Sampling temperature; the reference scripts sample at 0.2. 0 means greedy.
    #[arg(long, default_value_t = 0.2)]
    temperature: f32,
    /// Nucleus sampling threshold (server default when unset).
    #[arg(long)]
    top_p: Option<f32>,
    /// Top-k sampling (server default when unset).
    #[arg(long)]
    top_k: Option<u32>,
    /// Sampler seed, for reproducible sampled runs.
    #[arg(long)]
    seed: Option<u64>,
    /// New-token limit per answer (the reference scripts allow 1024).
    #[arg(long, default_value_t = 1024)]
    max_new_tokens: u32,
    /// Questions in flight at once (pope, cityscapes, ade20k, refcocog); the gateway batches them.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Most regions per Describe call (lvis, paco); keep it under the gateway's --max-regions.
    #[arg(long, default_value_t = 64)]
    regions_per_call: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(cli.temperature >= 0.0, "--temperature must be >= 0, got {}", cli.temperature);
    anyhow::ensure!(cli.concurrency >= 1, "--concurrency must be at least 1");
    anyhow::ensure!(cli.regions_per_call >= 1, "--regions-per-call must be at least 1");
    if let Some(p) = cli.top_p {
        anyhow::ensure!(p > 0.0 && p <= 1.0, "--top-p must be in (0, 1], got {p}");
    }
    let options = RunOptions {
        endpoint: cli.endpoint,
        api_key: cli.api_key,
        data: cli.data,
        images: cli.images,
        masks: cli.masks,
        class_names: cli.class_names,
        out: cli.out,
        embedder: cli.embedder,
        parameters: GenerationParameters {
            max_new_tokens: Some(cli.max_new_tokens),
            temperature: Some(cli.temperature),
            top_p: cli.top_p,
            top_k: cli.top_k,
            seed: cli.seed,
        },
        concurrency: cli.concurrency,
        regions_per_call: cli.regions_per_call,
    };
    let metrics = protocols::run(cli.protocol, &options).await?;
    // An error, not a panic, when stdout is closed early (`| head`).
    use std::io::Write;
    writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&metrics)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    /// Every flag read from the environment reads `OSPREY_<FLAG>` (or OpenTelemetry's names).
    #[test]
    fn flags_read_their_osprey_variables() {
        osprey_test_support::assert_env_names(&<super::Cli as clap::CommandFactory>::command());
    }
}
