//! The `vision-worker` binary.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(version, about = "Osprey vision worker: CLIP ConvNeXt features and region tokens")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Serve `osprey.worker.v1.Vision` over gRPC.
    Serve(vision_worker::service::ServeArgs),
    /// Run the vision side on one image and its masks and write every output tensor to a
    /// safetensors file (pixel_values, res2..res5, mask_tokens, pos_tokens), for parity checks.
    Dump {
        /// Checkpoint directory: config.json plus model.safetensors[.index.json] or
        /// pytorch_model.bin[.index.json] (and the Open-CLIP file named by mm_vision_tower when the
        /// checkpoint lacks the vision trunk), or a Hugging Face repo id.
        #[arg(long)]
        weights: PathBuf,
        /// Image file (PNG, JPEG or WebP).
        #[arg(long)]
        image: PathBuf,
        /// Safetensors file with `masks` [N, H, W] (u8 or f32, 0/1) at the image resolution.
        #[arg(long)]
        masks: PathBuf,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    osprey_common::memory::keep_freed_memory();
    let args = Args::parse();
    match args.command {
        Command::Serve(mut args) => {
            // A repo id (`sunshine-lwt/Osprey-7b`) is fetched into the Hugging Face cache first.
            args.weights = osprey_checkpoint::hub::resolve_dir(&args.weights)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(vision_worker::service::main(args))?
        }
        Command::Dump { weights, image, masks, out } => {
            let weights = osprey_checkpoint::hub::resolve_dir(&weights)?;
            vision_worker::dump::run(&weights, &image, &masks, &out)?
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
