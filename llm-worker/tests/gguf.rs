//! Quantized weights (GGUF): `llm-worker quantize` on the tiny fixtures checked against
//! llama.cpp's reference quantizer (PyPI `gguf`'s `gguf.quants`, values written by
//! tools/make_gguf_fixtures.py), the model loaded from the file (dequantized and with the
//! quantized kernels), the k-quant fallback, and the refusals of bad files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use llm_worker::checkpoint::{load_checkpoint, load_config, load_model_with, load_tokenizer};
use llm_worker::gguf::GgufOptions;
use llm_worker::models::osprey_llama::{OspreyLlama, PrefixKv, SeqCache};
use llm_worker::quantize::{QuantType, QuantizeOptions, QuantizeReport};
use llm_worker::sampling::{SamplingParams, argmax};
use llm_worker::tokenizer::OspreyTokenizer;
use osprey_test_support::fixture;

/// A fresh directory for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("gguf-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn quantize(model: &str, quant: QuantType, out: &Path) -> QuantizeReport {
    llm_worker::quantize::run(&fixture("llm").join(model), out, quant).expect("quantize")
}

fn load_gguf(path: &Path, dequantize: bool) -> OspreyLlama {
    load_model_with(path, DType::F32, &Device::Cpu, GgufOptions { dequantize }).expect("GGUF model")
}

fn load_dir(model: &str) -> OspreyLlama {
    let dir = fixture("llm").join(model);
    let cfg = load_config(&dir).unwrap();
    OspreyLlama::load(load_checkpoint(&dir, DType::F32, &Device::Cpu).unwrap(), &cfg).unwrap()
}

/// The tiny model with `gguf.quants`' q8_0-dequantized weights (tools/make_gguf_fixtures.py).
fn load_reference(model: &str) -> OspreyLlama {
    let cfg = load_config(&fixture("llm").join(model)).unwrap();
    let file = fixture("llm").join(format!("gguf/{model}_q8_0_dequant.safetensors"));
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[file], DType::F32, &Device::Cpu) }.unwrap();
    OspreyLlama::load(vb, &cfg).unwrap()
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("llm/expected.safetensors"), &Device::Cpu).unwrap()
}

/// The fixture's spliced prompt (text, image and two regions).
fn spliced(model: &OspreyLlama) -> Tensor {
    let e = expected();
    let ids: Vec<i64> = e["input_ids"].to_vec1().unwrap();
    let image = model.project_image(&e["image_features"]).unwrap();
    model.splice(&ids, Some(&image), &e["mask_tokens"], &e["pos_tokens"]).unwrap()
}

/// [`osprey_test_support::rel_l2`] of two tensors of the same shape.
fn rel_l2(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "shapes differ");
    let values =
        |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    osprey_test_support::rel_l2(&values(got), &values(want)) as f32
}

fn greedy(model: &OspreyLlama, embeds: &Tensor) -> Vec<u32> {
    let params = SamplingParams { stop_at_eos: false, ..SamplingParams::greedy(8) };
    let mut cache = SeqCache::new(PrefixKv::default());
    model.generate(&mut cache, embeds, &params, false).unwrap().tokens
}

/// Top-1 of every row.
fn top1(logits: &Tensor) -> Vec<u32> {
    logits.to_vec2::<f32>().unwrap().iter().map(|row| argmax(row)).collect()
}

fn read_gguf(path: &Path) -> (gguf_file::Content, std::fs::File) {
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    (content, file)
}

#[test]
fn q8_0_bytes_equal_gguf_quants() {
    let dir = scratch("bytes");
    for model in ["tiny", "tiny_gqa"] {
        let out = dir.join(format!("{model}.gguf"));
        let report = quantize(model, QuantType::Q8_0, &out);
        assert_eq!(report.fallbacks, 0, "every tiny row length is a multiple of 32");
        assert!(!dir.join(format!("{model}.gguf.partial")).exists(), "the partial file was renamed");
        let reference = candle_core::safetensors::load(
            fixture("llm").join(format!("gguf/{model}_q8_0_bytes.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let (content, mut file) = read_gguf(&out);
        assert_eq!(reference.len(), 15, "7 linears x 2 layers + output");
        for (name, want) in &reference {
            let info = &content.tensor_infos[name];
            assert_eq!(info.ggml_dtype, GgmlDType::Q8_0, "{model} {name}");
            let got = content.tensor(&mut file, name, &Device::Cpu).unwrap();
            let want: Vec<u8> = want.flatten_all().unwrap().to_vec1().unwrap();
            assert!(got.data().unwrap().as_ref() == want.as_slice(), "{model} {name}: q8_0 bytes differ");
        }
        let md = &content.metadata;
        assert_eq!(md["general.architecture"].to_string().unwrap(), "llama");
        assert_eq!(md["llama.block_count"].to_u32().unwrap(), 2);
        assert_eq!(md["llama.embedding_length"].to_u32().unwrap(), 32);
        if model == "tiny" {
            // tiny_gqa has no tokenizer files, so its GGUF has no tokenizer keys.
            assert_eq!(md["tokenizer.ggml.tokens"].to_vec().unwrap().len(), 40);
        }
        assert_eq!(content.tensor_infos["token_embd.weight"].ggml_dtype, GgmlDType::F16);
        assert_eq!(content.tensor_infos["blk.0.attn_norm.weight"].ggml_dtype, GgmlDType::F32);
        assert_eq!(content.tensor_infos["model.mm_projector.0.weight"].ggml_dtype, GgmlDType::F16);
    }
}

#[test]
fn dequantized_logits_match_gguf_quants() {
    let dir = scratch("dequant");
    for model in ["tiny", "tiny_gqa"] {
        let out = dir.join(format!("{model}.gguf"));
        quantize(model, QuantType::Q8_0, &out);
        let gguf = load_gguf(&out, true);
        let reference = load_reference(model);
        assert_eq!(gguf.config().mm_hidden_size, reference.config().mm_hidden_size);
        let embeds = spliced(&reference);
        let e =
            rel_l2(&gguf.prompt_logits(&spliced(&gguf)).unwrap(), &reference.prompt_logits(&embeds).unwrap());
        println!("{model}: q8_0 dequantized logits vs gguf.quants-dequantized weights: relative L2 {e:.3e}");
        assert!(e <= 1e-4, "{model}: relative L2 {e}");
        assert_eq!(greedy(&gguf, &spliced(&gguf)), greedy(&reference, &embeds), "{model}: greedy tokens");
    }
}

#[test]
fn quantized_kernels_stay_close_to_f32() {
    let dir = scratch("kernels");
    for (quant, bound) in [(QuantType::Q8_0, 0.05), (QuantType::Q4K, 0.25)] {
        let out = dir.join(format!("tiny-{quant:?}.gguf"));
        quantize("tiny", quant, &out);
        let q = load_gguf(&out, false);
        let f32_model = load_dir("tiny");
        let (lq, lf) =
            (q.prompt_logits(&spliced(&q)).unwrap(), f32_model.prompt_logits(&spliced(&f32_model)).unwrap());
        let gap = rel_l2(&lq, &lf);
        let (tq, tf) = (top1(&lq), top1(&lf));
        let agree = tq.iter().zip(&tf).filter(|(a, b)| a == b).count();
        let (gq, gf) = (greedy(&q, &spliced(&q)), greedy(&f32_model, &spliced(&f32_model)));
        println!(
            "tiny {quant:?} kernels: relative L2 gap to f32 {gap:.3e}, top-1 agreement {agree}/{}, greedy {gq:?} (f32 {gf:?})",
            tq.len()
        );
        assert!(gap <= bound, "{quant:?}: gap {gap} > {bound}");
    }
}

#[test]
fn k_quants_fall_back_on_short_rows() {
    let dir = scratch("fallback");
    // Tiny rows are 32 or 64 long: no k-quant (256-value blocks) fits, so all 15 linears fall
    // back: q4_k to q5_0 where the row holds two 32-blocks (the two down_proj, rows of 64), else
    // q8_0 (the LM head's q6_k goes to q8_0 too); the other 10 tensors are f16/f32 anyway.
    let report = quantize("tiny", QuantType::Q4K, &dir.join("q4k.gguf"));
    assert_eq!(report.fallbacks, 15);
    assert_eq!(report.tensors, 25);
    let counts = |r: &QuantizeReport| {
        [GgmlDType::Q5_0, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::F16, GgmlDType::F32]
            .map(|t| count_of(r, t))
    };
    assert_eq!(counts(&report), [2, 13, 0, 3, 7]);
    let report = quantize("tiny", QuantType::Q6K, &dir.join("q6k.gguf"));
    assert_eq!((report.fallbacks, counts(&report)), (15, [0, 15, 0, 3, 7]));
    let q8 = quantize("tiny", QuantType::Q8_0, &dir.join("q8.gguf"));
    assert_eq!(q8.fallbacks, 0);
    use llm_worker::quantize::type_for_row;
    assert_eq!(type_for_row(GgmlDType::Q4K, 4096), GgmlDType::Q4K);
    assert_eq!(type_for_row(GgmlDType::Q4K, 11008), GgmlDType::Q4K, "11008 = 43 x 256");
    assert_eq!(type_for_row(GgmlDType::Q4K, 320), GgmlDType::Q5_0);
    assert_eq!(type_for_row(GgmlDType::Q5K, 96), GgmlDType::Q8_0);
    assert_eq!(type_for_row(GgmlDType::Q8_0, 48), GgmlDType::F16);
}

fn count_of(report: &QuantizeReport, t: GgmlDType) -> usize {
    report.types.iter().find(|(x, _)| *x == t).map_or(0, |(_, n)| *n)
}

#[test]
fn tokenizer_and_dump_from_gguf() {
    let dir = scratch("tokenizer");
    let out = dir.join("tiny.gguf");
    quantize("tiny", QuantType::Q8_0, &out);
    let from_gguf = load_tokenizer(&out).unwrap();
    let from_dir = OspreyTokenizer::from_dir(&fixture("llm/tiny")).unwrap();
    let text = "<image>\nwhat is <mask><pos> doing?";
    assert_eq!(from_gguf.tokenizer_image_token(text).unwrap(), from_dir.tokenizer_image_token(text).unwrap());
    assert_eq!((from_gguf.mask_id(), from_gguf.pos_id()), (38, 39));
    // A GGUF without the extension is recognised by its magic.
    let renamed = dir.join("tiny-model");
    std::fs::copy(&out, &renamed).unwrap();
    assert!(llm_worker::gguf::is_gguf(&renamed));
    let inputs = dir.join("inputs.safetensors");
    let e = expected();
    let keep: HashMap<String, Tensor> = ["input_ids", "image_features", "mask_tokens", "pos_tokens"]
        .iter()
        .map(|k| (k.to_string(), e[*k].clone()))
        .collect();
    candle_core::safetensors::save(&keep, &inputs).unwrap();
    let dumped = dir.join("dump.safetensors");
    llm_worker::dump::run(&renamed, &inputs, &dumped, 4).unwrap();
    let d = candle_core::safetensors::load(&dumped, &Device::Cpu).unwrap();
    assert_eq!(d["logits"].dims(), &[22, 40]);
}

/// Rewrites `src` with `edit` applied to its tensors and metadata.
fn rewrite(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Vec<(String, QTensor)>, &mut Vec<(String, gguf_file::Value)>),
) {
    let (content, mut file) = read_gguf(src);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> =
        names.iter().map(|n| ((*n).clone(), content.tensor(&mut file, n, &Device::Cpu).unwrap())).collect();
    let mut metadata: Vec<(String, gguf_file::Value)> =
        content.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    edit(&mut tensors, &mut metadata);
    let md: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::fs::File::create(dst).unwrap();
    gguf_file::write(&mut out, &md, &ts).unwrap();
}

/// `--text-only` leaves out exactly the projector (llama.cpp refuses tensors it does not use);
/// every LLaMA tensor has the same type and bytes as in the full file, and `serve`'s loader
/// refuses the text-only file naming the projector.
#[test]
fn text_only_file_is_the_full_file_less_the_projector() {
    let dir = scratch("text-only");
    let (full, text) = (dir.join("full.gguf"), dir.join("text.gguf"));
    quantize("tiny", QuantType::Q8_0, &full);
    let options = QuantizeOptions { text_only: true };
    let report =
        llm_worker::quantize::run_with(&fixture("llm/tiny"), &text, QuantType::Q8_0, options).unwrap();
    let (full_content, mut full_file) = read_gguf(&full);
    let (text_content, mut text_file) = read_gguf(&text);
    let projector: Vec<&String> =
        full_content.tensor_infos.keys().filter(|n| n.starts_with("model.mm_projector.")).collect();
    assert_eq!(projector.len(), 4, "two weights, two biases");
    assert_eq!(report.tensors, full_content.tensor_infos.len() - 4);
    assert_eq!(text_content.tensor_infos.len(), full_content.tensor_infos.len() - 4);
    for (name, info) in &text_content.tensor_infos {
        assert!(!name.starts_with("model.mm_projector."), "{name} in the text-only file");
        let want = &full_content.tensor_infos[name];
        assert_eq!((info.ggml_dtype, info.shape.dims()), (want.ggml_dtype, want.shape.dims()), "{name}");
        let got = text_content.tensor(&mut text_file, name, &Device::Cpu).unwrap();
        let want = full_content.tensor(&mut full_file, name, &Device::Cpu).unwrap();
        assert!(got.data().unwrap() == want.data().unwrap(), "{name}: bytes differ");
    }
    assert_eq!(text_content.metadata["general.architecture"].to_string().unwrap(), "llama");
    assert_eq!(text_content.metadata["tokenizer.ggml.tokens"].to_vec().unwrap().len(), 40);
    let msg = load_error(&text);
    assert!(msg.contains("model.mm_projector.0.weight"), "{msg}");
}

fn load_error(path: &Path) -> String {
    let err = load_model_with(path, DType::F32, &Device::Cpu, GgufOptions::default()).expect_err("refused");
    err.to_string()
}

#[test]
fn bad_files_are_refused_naming_the_problem() {
    let dir = scratch("errors");
    let good = dir.join("tiny.gguf");
    quantize("tiny", QuantType::Q8_0, &good);

    let other = dir.join("gpt2.gguf");
    rewrite(&good, &other, |_, md| {
        md.retain(|(k, _)| k != "general.architecture");
        md.push(("general.architecture".into(), gguf_file::Value::String("gpt2".into())));
    });
    let msg = load_error(&other);
    assert!(msg.contains("general.architecture") && msg.contains("gpt2"), "{msg}");

    let missing = dir.join("missing.gguf");
    rewrite(&good, &missing, |ts, _| ts.retain(|(n, _)| n != "blk.1.ffn_up.weight"));
    let msg = load_error(&missing);
    assert!(msg.contains("missing tensor blk.1.ffn_up.weight"), "{msg}");

    let shape = dir.join("shape.gguf");
    rewrite(&good, &shape, |ts, _| {
        let wrong = Tensor::zeros((32, 64), DType::F32, &Device::Cpu).unwrap();
        ts.retain(|(n, _)| n != "blk.0.attn_q.weight");
        ts.push(("blk.0.attn_q.weight".into(), QTensor::quantize(&wrong, GgmlDType::Q8_0).unwrap()));
    });
    let msg = load_error(&shape);
    assert!(msg.contains("blk.0.attn_q.weight") && msg.contains("[32, 64]"), "{msg}");

    // An unknown quantization type: the tensor info's type field (after the name, the rank and
    // the two dims) set to 99.
    let mut bytes = std::fs::read(&good).unwrap();
    let name = b"blk.0.attn_v.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 16;
    assert_eq!(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()), 8, "q8_0 is type 8");
    bytes[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    let unknown = dir.join("unknown.gguf");
    std::fs::write(&unknown, &bytes).unwrap();
    let msg = load_error(&unknown);
    assert!(msg.contains("unknown dtype") && msg.contains("99"), "{msg}");

    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).unwrap();
    let msg = load_error(&truncated);
    assert!(msg.contains("remaining in file") && msg.contains("tensor "), "{msg}");

    let not_gguf = dir.join("empty.gguf");
    std::fs::write(&not_gguf, b"not a gguf file at all").unwrap();
    let msg = load_error(&not_gguf);
    assert!(msg.contains("not a readable GGUF file"), "{msg}");
}

/// `serve --weights FILE.gguf` loads model and tokenizer from the file; a GGUF without a
/// tokenizer is refused naming the missing key.
#[tokio::test]
async fn serve_loads_a_gguf() {
    let dir = scratch("serve");
    let args = |path: &Path| -> llm_worker::service::ServeArgs {
        osprey_test_support::parse_args(["llm-worker", "--weights", path.to_str().unwrap()])
    };
    let tiny = dir.join("tiny.gguf");
    quantize("tiny", QuantType::Q8_0, &tiny);
    llm_worker::service::LlmService::load(&args(&tiny)).expect("serves the GGUF");
    let no_tokenizer = dir.join("tiny_gqa.gguf");
    quantize("tiny_gqa", QuantType::Q8_0, &no_tokenizer);
    let err = llm_worker::service::LlmService::load(&args(&no_tokenizer)).err().unwrap();
    assert!(err.to_string().contains("osprey.tokenizer_json"), "{err}");
}
