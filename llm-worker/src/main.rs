//! The `llm-worker` binary.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(version, about = "Osprey LLM worker: projector + Vicuna-7B with region tokens")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Serve `osprey.worker.v1.Llm` over gRPC.
    Serve(llm_worker::service::ServeArgs),
    /// Run one spliced prompt from a safetensors file and write every position's logits and a
    /// greedy continuation (no EOS stop), for parity checks. CPU, f32.
    Dump {
        /// Checkpoint directory: config.json plus model.safetensors[.index.json], a Hugging
        /// Face repo id, or a GGUF file written by `quantize`.
        #[arg(long)]
        weights: PathBuf,
        /// Safetensors input: input_ids i64 [L] (one -200, <mask><pos> id pairs), image_features
        /// f32 [T, mm_hidden], mask_tokens and pos_tokens f32 [N, hidden].
        #[arg(long)]
        inputs: PathBuf,
        /// Safetensors output: logits f32 [L-1+T, vocab], greedy_ids i64 [K].
        #[arg(long)]
        out: PathBuf,
        /// K, the number of greedy tokens.
        #[arg(long, default_value_t = 8)]
        max_new_tokens: usize,
    },
    /// Write the language model of a checkpoint as one GGUF file: the decoder's linear layers
    /// quantized (llama.cpp's tensor names and `llama.*` metadata), embeddings and the projector
    /// in f16, norms in f32, the tokenizer included. Serve it with `serve --weights FILE.gguf`.
    Quantize {
        /// Checkpoint directory (safetensors or torch `.bin` shards) or a Hugging Face repo id.
        #[arg(long)]
        weights: PathBuf,
        /// Output file, written as `<out>.partial` and renamed when complete.
        #[arg(long)]
        out: PathBuf,
        /// Quantization of the decoder's linear layers.
        #[arg(long = "type", value_enum)]
        quant: llm_worker::quantize::QuantType,
        /// Leave out the projector: a text-only file that llama.cpp loads (its loader refuses
        /// tensors it does not use); `serve` needs the projector, so it takes the full file.
        #[arg(long)]
        text_only: bool,
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
                .block_on(llm_worker::service::main(args))?
        }
        Command::Dump { weights, inputs, out, max_new_tokens } => {
            let weights = osprey_checkpoint::hub::resolve_dir(&weights)?;
            llm_worker::dump::run(&weights, &inputs, &out, max_new_tokens)?
        }
        Command::Quantize { weights, out, quant, text_only } => {
            let weights = osprey_checkpoint::hub::resolve_dir(&weights)?;
            let options = llm_worker::quantize::QuantizeOptions { text_only };
            llm_worker::quantize::run_with(&weights, &out, quant, options)?;
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
