//! `sam-worker`: the SAM stage of Osprey: `serve` (gRPC) and the `dump` debugging command.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use sam_worker::dump::{DumpArgs, run_dump};

#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Serve `osprey.worker.v1.Sam` over gRPC.
    Serve(sam_worker::service::ServeArgs),
    /// Embed one image, run a list of prompts and write every output to a safetensors file.
    Dump {
        /// Checkpoint with the official key names: `.pth` (torch.save of the state dict) or safetensors.
        #[arg(long)]
        weights: PathBuf,
        /// JSON model config (fields of `SamConfig`); by default read off the checkpoint's shapes.
        #[arg(long)]
        config: Option<PathBuf>,
        /// PNG, JPEG or WebP image.
        #[arg(long)]
        image: PathBuf,
        /// JSON list of prompts (see `sam_worker::dump`).
        #[arg(long)]
        prompts: PathBuf,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// Run on the first CUDA device (needs a build with `--features cuda`).
        #[arg(long, env = "OSPREY_CUDA")]
        cuda: bool,
    },
}

fn main() -> anyhow::Result<()> {
    osprey_common::memory::keep_freed_memory();
    let args = Args::parse();
    match args.command {
        Command::Serve(mut args) => {
            // A repo id (`ybelkada/segment-anything:checkpoints/sam_vit_b_01ec64.pth`) is fetched
            // into the Hugging Face cache first.
            args.weights = osprey_checkpoint::hub::resolve_file(&args.weights)?;
            args.config = args.config.as_deref().map(osprey_checkpoint::hub::resolve_file).transpose()?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(sam_worker::service::main(args))?
        }
        Command::Dump { weights, config, image, prompts, out, cuda } => {
            let weights = osprey_checkpoint::hub::resolve_file(&weights)?;
            let config = config.as_deref().map(osprey_checkpoint::hub::resolve_file).transpose()?;
            let device = sam_worker::select_device(cuda)?;
            run_dump(&DumpArgs { weights, config, image, prompts, out }, &device)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// Every flag read from the environment reads `OSPREY_<FLAG>` (or OpenTelemetry's names).
    #[test]
    fn flags_read_their_osprey_variables() {
        osprey_test_support::assert_env_names(&<super::Args as clap::CommandFactory>::command());
    }
}
