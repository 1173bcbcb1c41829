//! Numerical parity of the projector, splice and LLaMA decoder with transformers (f32, CPU), on
//! the tiny fixtures written by tools/make_llm_fixtures.py, plus the serving paths (batched
//! decoding, shared prefixes) against the same references and the full-size weight manifest.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, IndexOp, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use llm_worker::LlmError;
use llm_worker::checkpoint::{load_checkpoint, load_config};
use llm_worker::models::osprey_llama::{Config, LogitsMode, OspreyLlama, PrefixKv, SeqCache, SeqStep};
use llm_worker::prompt::PromptError;
use llm_worker::sampling::{SamplingParams, argmax};
use osprey_test_support::fixture;

const TOL: f32 = 1e-4;

fn load_model(name: &str) -> OspreyLlama {
    let dir = fixture("llm").join(name);
    let cfg = load_config(&dir).expect("config");
    OspreyLlama::load(load_checkpoint(&dir, DType::F32, &Device::Cpu).expect("weights"), &cfg).expect("model")
}

fn expected(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("llm").join(name), &Device::Cpu).expect("expected tensors")
}

/// [`osprey_test_support::rel_l2`] of two tensors of the same shape.
fn rel_l2(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "shapes differ");
    let values =
        |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    osprey_test_support::rel_l2(&values(got), &values(want)) as f32
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    let e = rel_l2(got, want);
    println!("{what}: relative L2 error {e:.3e}");
    assert!(e <= TOL, "{what}: relative L2 error {e} > {TOL}");
}

fn ids(t: &Tensor) -> Vec<i64> {
    t.to_vec1::<i64>().unwrap()
}

fn u32s(t: &Tensor) -> Vec<u32> {
    ids(t).into_iter().map(|i| i as u32).collect()
}

/// The spliced prompt of fixture prompt `suffix` ("" or "_b").
fn spliced(model: &OspreyLlama, e: &HashMap<String, Tensor>, suffix: &str) -> Tensor {
    let image = model.project_image(&e[&format!("image_features{suffix}")]).unwrap();
    model
        .splice(
            &ids(&e[&format!("input_ids{suffix}")]),
            Some(&image),
            &e[&format!("mask_tokens{suffix}")],
            &e[&format!("pos_tokens{suffix}")],
        )
        .unwrap()
}

fn greedy_no_eos(k: usize) -> SamplingParams {
    SamplingParams { stop_at_eos: false, ..SamplingParams::greedy(k) }
}

fn check_single_model(model_dir: &str, expected_file: &str) {
    let model = load_model(model_dir);
    let e = expected(expected_file);
    let plain = model.embed_ids(&u32s(&e["plain_input_ids"])).unwrap();
    assert_close(
        &format!("{model_dir} plain_logits"),
        &model.prompt_logits(&plain).unwrap(),
        &e["plain_logits"],
    );
    for suffix in ["", "_b"] {
        let key = |k: &str| format!("{k}{suffix}");
        let projected = model.project_image(&e[&key("image_features")]).unwrap();
        assert_close(
            &format!("{model_dir} {}", key("projected_image_features")),
            &projected,
            &e[&key("projected_image_features")],
        );
        let embeds = spliced(&model, &e, suffix);
        assert_close(&format!("{model_dir} {}", key("spliced_embeds")), &embeds, &e[&key("spliced_embeds")]);
        let logits = model.prompt_logits(&embeds).unwrap();
        assert_close(&format!("{model_dir} {}", key("spliced_logits")), &logits, &e[&key("spliced_logits")]);
        let mut cache = SeqCache::new(PrefixKv::default());
        let g = model.generate(&mut cache, &embeds, &greedy_no_eos(8), true).unwrap();
        assert_eq!(g.tokens, u32s(&e[&key("greedy_ids")]), "{model_dir} {}", key("greedy_ids"));
        assert_close(
            &format!("{model_dir} {}", key("greedy_logits")),
            g.logits.as_ref().unwrap(),
            &e[&key("greedy_logits")],
        );
    }
}

#[test]
fn tiny_matches_transformers() {
    check_single_model("tiny", "expected.safetensors");
}

#[test]
fn tiny_gqa_matches_transformers() {
    check_single_model("tiny_gqa", "expected_gqa.safetensors");
}

/// The GPU serving dtypes, run on the CPU: the same code path as `--dtype bf16|f16` (weights cast
/// at load, activations in the low dtype, attention softmax in f32) stays within the rounding of
/// a 8- or 11-bit mantissa of the f32 reference.
#[test]
fn half_precision_stays_close_to_transformers_f32() {
    let dir = fixture("llm/tiny");
    let cfg = load_config(&dir).unwrap();
    let e = expected("expected.safetensors");
    for (dtype, tol) in [(DType::BF16, 3e-2), (DType::F16, 5e-3)] {
        let model = OspreyLlama::load(load_checkpoint(&dir, dtype, &Device::Cpu).unwrap(), &cfg).unwrap();
        assert_eq!(model.dtype(), dtype);
        let logits = model.prompt_logits(&spliced(&model, &e, "")).unwrap().to_dtype(DType::F32).unwrap();
        let err = rel_l2(&logits, &e["spliced_logits"]);
        println!("{dtype:?} spliced_logits: relative L2 error {err:.3e}");
        assert!(err <= tol, "{dtype:?}: relative L2 error {err} > {tol}");
        assert!(err > 1e-6, "{dtype:?}: suspiciously exact, was the model really run in {dtype:?}?");
    }
}

/// Both fixture prompts (lengths 22 and 16) prefilled in one forward, then decoded together:
/// each must give its single-prompt reference tokens and logits.
fn check_batched(model_dir: &str, expected_file: &str) {
    let model = load_model(model_dir);
    let e = expected(expected_file);
    let prompts = [spliced(&model, &e, ""), spliced(&model, &e, "_b")];
    let mut caches = [SeqCache::new(PrefixKv::default()), SeqCache::new(PrefixKv::default())];
    let mut inputs = prompts.clone();
    let mut tokens: [Vec<u32>; 2] = Default::default();
    let mut logits: [Vec<Tensor>; 2] = Default::default();
    for _ in 0..8 {
        let [c0, c1] = &mut caches;
        let mut steps = [
            SeqStep { cache: c0, embeds: inputs[0].clone(), logits: LogitsMode::Last },
            SeqStep { cache: c1, embeds: inputs[1].clone(), logits: LogitsMode::Last },
        ];
        let out = model.forward(&mut steps).unwrap();
        for (i, l) in out.into_iter().enumerate() {
            let row = l.unwrap().squeeze(0).unwrap();
            let t = argmax(&row.to_vec1::<f32>().unwrap());
            tokens[i].push(t);
            logits[i].push(row);
            inputs[i] = model.embed_ids(&[t]).unwrap();
        }
    }
    for (i, suffix) in ["", "_b"].into_iter().enumerate() {
        assert_eq!(
            tokens[i],
            u32s(&e[&format!("greedy_ids{suffix}")]),
            "{model_dir} batched greedy_ids{suffix}"
        );
        let got = Tensor::stack(&logits[i], 0).unwrap();
        assert_close(
            &format!("{model_dir} batched greedy_logits{suffix}"),
            &got,
            &e[&format!("greedy_logits{suffix}")],
        );
        // And against our own single-sequence run: batching must not change the numbers.
        let mut cache = SeqCache::new(PrefixKv::default());
        let alone = model.generate(&mut cache, &prompts[i], &greedy_no_eos(8), true).unwrap();
        let e2 = rel_l2(&got, alone.logits.as_ref().unwrap());
        println!("{model_dir} batched vs alone{suffix}: relative L2 {e2:.3e}");
        assert!(e2 < 1e-5);
    }
}

#[test]
fn batched_decoding_matches_single() {
    check_batched("tiny", "expected.safetensors");
    check_batched("tiny_gqa", "expected_gqa.safetensors");
}

/// A prefix (everything up to the first region token) computed once and shared by two
/// sequences, a decode with an own tail, and a truncated prefix extended again: all must equal
/// the cold single-sequence run.
#[test]
fn prefix_cache_hits_match_cold_runs() {
    for (model_dir, file) in [("tiny", "expected.safetensors"), ("tiny_gqa", "expected_gqa.safetensors")] {
        let model = load_model(model_dir);
        let e = expected(file);
        let embeds = spliced(&model, &e, "");
        let cold = &e["spliced_logits"];
        let total = embeds.dim(0).unwrap();
        // Prompt A: [1, 11, 4, 23, -200, 17, 8, <mask>, ...]: 4 text + 6 image + 2 text positions.
        let k = 12;
        let prefix = model.prefill_prefix(PrefixKv::default(), &embeds.narrow(0, 0, k).unwrap()).unwrap();
        assert_eq!(prefix.len(), k);
        let rest = embeds.narrow(0, k, total - k).unwrap();
        let mut seqs = [SeqCache::new(prefix.clone()), SeqCache::new(prefix.clone())];
        let [s0, s1] = &mut seqs;
        let out = model
            .forward(&mut [
                SeqStep { cache: s0, embeds: rest.clone(), logits: LogitsMode::All },
                SeqStep { cache: s1, embeds: rest.clone(), logits: LogitsMode::Last },
            ])
            .unwrap();
        let all = out[0].as_ref().unwrap();
        assert_close(
            &format!("{model_dir} prefix-hit suffix logits"),
            all,
            &cold.narrow(0, k, total - k).unwrap(),
        );
        let last = out[1].as_ref().unwrap().squeeze(0).unwrap();
        assert_close(&format!("{model_dir} second sharer last logits"), &last, &cold.i(total - 1).unwrap());
        // Greedy from the shared prefix.
        let mut cache = SeqCache::new(prefix.clone());
        let g = model.generate(&mut cache, &rest, &greedy_no_eos(8), true).unwrap();
        assert_eq!(g.tokens, u32s(&e["greedy_ids"]), "{model_dir} greedy from prefix");
        assert_close(
            &format!("{model_dir} greedy logits from prefix"),
            g.logits.as_ref().unwrap(),
            &e["greedy_logits"],
        );
        // A prefix truncated inside its block (views) and extended with a second block.
        let short = prefix.truncate(7).unwrap();
        assert_eq!(short.len(), 7);
        let longer = model.prefill_prefix(short, &embeds.narrow(0, 7, 8).unwrap()).unwrap();
        assert_eq!(longer.len(), 15);
        let mut cache = SeqCache::new(longer);
        let out = model
            .forward(&mut [SeqStep {
                cache: &mut cache,
                embeds: embeds.narrow(0, 15, total - 15).unwrap(),
                logits: LogitsMode::All,
            }])
            .unwrap();
        assert_close(
            &format!("{model_dir} truncated+extended prefix"),
            out[0].as_ref().unwrap(),
            &cold.narrow(0, 15, total - 15).unwrap(),
        );
        // A frozen sequence (prefix + own tail) is itself a prefix.
        let frozen = cache.into_prefix().unwrap();
        assert_eq!(frozen.len(), total);
    }
}

#[test]
fn splice_rejects_mismatched_regions() {
    let model = load_model("tiny");
    let e = expected("expected.safetensors");
    let image = model.project_image(&e["image_features"]).unwrap();
    let one = e["mask_tokens"].narrow(0, 0, 1).unwrap();
    let err = model.splice(&ids(&e["input_ids"]), Some(&image), &one, &one).unwrap_err();
    assert!(matches!(err, LlmError::Prompt(PromptError::RegionCount { pairs: 2, regions: 1 })), "{err}");
    assert!(err.is_invalid_argument());
    let err = model.splice(&ids(&e["input_ids"]), None, &e["mask_tokens"], &e["pos_tokens"]).unwrap_err();
    assert!(matches!(err, LlmError::Prompt(PromptError::ImageCount { found: 1, expected: 0 })), "{err}");
    let err = model.project_image(&e["mask_tokens"]).unwrap_err();
    assert!(err.is_invalid_argument(), "{err}");
}

/// A VarBuilder backend that records every requested name and shape and hands out zero-stride
/// broadcast tensors, so a full-size model can be "loaded" without allocating it.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<NamedShape>>>);

/// A tensor name and its shape.
type NamedShape = (String, Vec<usize>);

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.lock().unwrap().push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: the recorder needs shapes")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[test]
fn full_size_weights_match_the_manifest() {
    let text = std::fs::read_to_string(fixture("llm/manifest_full.json")).unwrap();
    let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    let c = &manifest["config"];
    let cfg = Config::osprey_7b();
    let field = |k: &str| c[k].as_u64().unwrap() as usize;
    assert_eq!(
        (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers),
        (field("vocab_size"), field("hidden_size"), field("intermediate_size"), field("num_hidden_layers"))
    );
    assert_eq!(
        (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.max_position_embeddings),
        (
            field("num_attention_heads"),
            field("num_key_value_heads"),
            field("head_dim"),
            field("max_position_embeddings")
        )
    );
    assert_eq!((cfg.mm_hidden_size, cfg.tie_word_embeddings), (Some(field("mm_hidden_size")), false));
    assert_eq!(
        (cfg.rms_norm_eps, cfg.rope_theta),
        (c["rms_norm_eps"].as_f64().unwrap(), c["rope_theta"].as_f64().unwrap())
    );

    let recorder = Recorder::default();
    let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
    let model = OspreyLlama::load(vb, &cfg).unwrap();
    assert_eq!(model.config().mm_hidden_size, Some(768));
    let got: Vec<NamedShape> = recorder.0.lock().unwrap().clone();
    let got_set: BTreeSet<NamedShape> = got.iter().cloned().collect();
    assert_eq!(got.len(), got_set.len(), "a weight was requested twice");
    let want: BTreeSet<NamedShape> = manifest["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let shape = t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            (t["key"].as_str().unwrap().to_string(), shape)
        })
        .collect();
    assert_eq!(want.len(), 295);
    let missing: Vec<_> = want.difference(&got_set).collect();
    let extra: Vec<_> = got_set.difference(&want).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}, extra {extra:?}");
    // The tolerated keys (4.31's rotary inv_freq buffers) are never requested.
    for t in manifest["tolerated_keys"].as_array().unwrap() {
        assert!(!got_set.iter().any(|(k, _)| k == t["key"].as_str().unwrap()));
    }
}

/// The Osprey-7B layout: bf16 torch.save shards + `pytorch_model.bin.index.json`, with the
/// `rotary_emb.inv_freq` buffers of transformers 4.31 (left unread). The reference ran the
/// bf16-rounded weights in f32, so its greedy ids may differ from `tiny`'s.
#[test]
fn tiny_bin_matches_transformers() {
    check_single_model("tiny_bin", "expected_bf16.safetensors");
}

/// A model asking for a tensor the checkpoint lacks, or with another shape, fails naming the key
/// and the file.
#[test]
fn tiny_bin_load_errors_name_key_and_file() {
    let dir: &Path = &fixture("llm/tiny_bin");
    let cfg = load_config(dir).unwrap();
    let load = |cfg: &Config| {
        let vb = load_checkpoint(dir, DType::F32, &Device::Cpu).unwrap();
        match OspreyLlama::load(vb, cfg) {
            Ok(_) => panic!("the load must fail"),
            Err(e) => e.to_string(),
        }
    };
    let err = load(&Config { num_hidden_layers: 3, ..cfg.clone() });
    assert!(
        err.contains("model.layers.2.self_attn.q_proj.weight") && err.contains("pytorch_model-00001"),
        "{err}"
    );
    let err = load(&Config { intermediate_size: 48, ..cfg });
    assert!(
        err.contains("model.layers.0.mlp.gate_proj.weight")
            && err.contains("pytorch_model-00001-of-00002.bin")
            && err.contains("[48, 32]"),
        "{err}"
    );
    let err = load_checkpoint(&fixture("llm/tokenizer"), DType::F32, &Device::Cpu).err().unwrap();
    assert!(
        matches!(err, LlmError::Checkpoint { .. }) && err.to_string().contains("pytorch_model.bin"),
        "{err}"
    );
}

/// The fused CPU softmax (mask, scale and softmax in one pass) gives what the candle ops gave,
/// on a whole prompt, on a continuation of a cached prefix (masked tail after prefix columns) and
/// in greedy decoding.
#[test]
fn fused_softmax_matches_candle_ops() {
    for (model_dir, file) in [("tiny", "expected.safetensors"), ("tiny_gqa", "expected_gqa.safetensors")] {
        let fused = load_model(model_dir);
        let ops = fused.clone().with_candle_ops_softmax();
        let e = expected(file);
        let embeds = spliced(&fused, &e, "");
        let total = embeds.dim(0).unwrap();
        let whole = |m: &OspreyLlama| m.prompt_logits(&embeds).unwrap();
        let e_whole = rel_l2(&whole(&fused), &whole(&ops));
        let continued = |m: &OspreyLlama| {
            let prefix = m.prefill_prefix(PrefixKv::default(), &embeds.narrow(0, 0, 9).unwrap()).unwrap();
            let mut cache = SeqCache::new(prefix);
            let rest = embeds.narrow(0, 9, total - 9).unwrap();
            m.forward(&mut [SeqStep { cache: &mut cache, embeds: rest, logits: LogitsMode::All }]).unwrap()[0]
                .clone()
                .unwrap()
        };
        let e_continued = rel_l2(&continued(&fused), &continued(&ops));
        let greedy = |m: &OspreyLlama| {
            m.generate(&mut SeqCache::new(PrefixKv::default()), &embeds, &greedy_no_eos(8), true).unwrap()
        };
        let (g_fused, g_ops) = (greedy(&fused), greedy(&ops));
        assert_eq!(g_fused.tokens, g_ops.tokens, "{model_dir} greedy tokens");
        let e_greedy = rel_l2(g_fused.logits.as_ref().unwrap(), g_ops.logits.as_ref().unwrap());
        println!("{model_dir}: fused vs ops {e_whole:.1e} / {e_continued:.1e} / {e_greedy:.1e}");
        for e in [e_whole, e_continued, e_greedy] {
            assert!(e <= 1e-5, "{model_dir}: fused softmax differs from the candle ops by {e}");
        }
    }
}

/// Long causal prefills run their attention in blocks of query rows (each against the keys up to
/// its last row): the same logits as the candle-ops formulation, which computes the whole masked
/// score matrix, for a fresh prompt, after a shared prefix, and after positions already in the
/// sequence's own cache.
#[test]
fn blocked_prefill_matches_candle_ops() {
    for model_dir in ["tiny", "tiny_gqa"] {
        let fused = load_model(model_dir);
        let ops = fused.clone().with_candle_ops_softmax();
        let hidden = fused.config().hidden_size;
        let embeds = Tensor::randn(0_f32, 1.0, (250, hidden), &Device::Cpu).unwrap();
        let logits = |m: &OspreyLlama, prefix_len: usize, first_step: usize| {
            let prefix = match prefix_len {
                0 => PrefixKv::default(),
                n => m.prefill_prefix(PrefixKv::default(), &embeds.narrow(0, 0, n).unwrap()).unwrap(),
            };
            let mut cache = SeqCache::new(prefix);
            let mut out = Vec::new();
            let mut at = prefix_len;
            for len in [first_step, 250 - prefix_len - first_step].into_iter().filter(|&n| n > 0) {
                let step = SeqStep {
                    cache: &mut cache,
                    embeds: embeds.narrow(0, at, len).unwrap(),
                    logits: LogitsMode::All,
                };
                out.push(m.forward(&mut [step]).unwrap()[0].clone().unwrap());
                at += len;
            }
            Tensor::cat(&out, 0).unwrap()
        };
        // A fresh prompt; a step after a shared prefix; a long step after 20 own positions.
        for (prefix_len, first_step) in [(0, 250), (40, 210), (3, 20)] {
            let e = rel_l2(&logits(&fused, prefix_len, first_step), &logits(&ops, prefix_len, first_step));
            println!("{model_dir} prefix {prefix_len}, steps {first_step} + rest: blocked vs ops {e:.1e}");
            assert!(e <= 1e-5, "{model_dir}: blocked attention differs from the candle ops by {e}");
        }
    }
}
