#!/usr/bin/env python3
"""Build parity fixtures for the Osprey LLM side: a tiny LLaMA (HF key layout) + the mlp2x_gelu projector.

Spec: docs/MODEL.md, sections "Projector", "LLaMA decoder", "Splicing", "Generation and post-processing" and
"Checkpoints and weight names".  Everything is computed in float32 on the CPU with one thread, eager attention
and fixed seeds, so two runs give byte-identical files (check with sha256sum).

Setup (outside the repository; exact pins in tools/requirements-llm.txt):
    python3 -m venv .venv-llm && .venv-llm/bin/pip install -r tools/requirements-llm.txt
    .venv-llm/bin/python tools/make_llm_fixtures.py

Writes tests/fixtures/llm/:
    tiny/config.json, tiny/model.safetensors         f32, MHA (4 heads, 4 kv heads) + model.mm_projector.{0,2}
    tiny_gqa/config.json, tiny_gqa/model.safetensors f32, GQA (4 heads, 2 kv heads)
    tiny_bin/config.json, pytorch_model-0000{1,2}-of-00002.bin, pytorch_model.bin.index.json
                                                     same weights as tiny/ in bf16 (torch.save, 2 shards) plus fake
                                                     model.layers.{i}.self_attn.rotary_emb.inv_freq (bf16) to ignore
    expected.safetensors       outputs of tiny/ (f32 weights)
    expected_bf16.safetensors  outputs of tiny_bin/ (bf16-rounded weights, computed in f32)
    expected_gqa.safetensors   outputs of tiny_gqa/
    manifest_full.json         every [key, shape] of Osprey-7b's LLaMA (Vicuna-7B v1.5) + projector

Tiny model: vocab 40 (bos 1, eos 2, pad 0; 38 = <mask>, 39 = <pos> placeholders, like 32000/32001 in the real
vocabulary), hidden 32, intermediate 64, 2 layers, 4 heads (head_dim 8), rms_norm_eps 1e-5, rope theta 10000,
max_position_embeddings 256, untied lm_head; projector Linear(24->32), GELU (exact erf), Linear(32->32).
Every parameter is re-initialised from the seed: linear weights ~N(0, 0.25^2) (lm_head and embeddings N(0, 0.5^2),
mm_projector.0 N(0, 0.3^2), projector biases N(0, 0.1^2)), RMSNorm weights ~U(0.8, 1.2).  The seed is chosen so
that every greedy step has a top-1 margin >= 0.02 (asserted) and no continuation contains EOS; continuations may
contain 0, 1, 38 or 39, which are ordinary rows of the tiny vocabulary.

Tensors in each expected*.safetensors (all f32 unless noted; L = len(input_ids), T = 6 image tokens):
    plain_input_ids      i64 [12]         starts with BOS
    plain_logits         f32 [12, 40]     logits at every position (input_ids path, no splicing)
    input_ids            i64 [L=17]       prompt with one -200 sentinel and two (38, 39) <mask><pos> pairs
    image_features       f32 [6, 24]      res4-like tokens BEFORE the projector
    projected_image_features f32 [6, 32]  mm_projector(image_features)
    mask_tokens          f32 [2, 32]      region i's <mask> embedding (does not go through the projector)
    pos_tokens           f32 [2, 32]      region i's <pos> embedding
    spliced_embeds       f32 [L-1+T, 32]  inputs_embeds after the section 4.3 splice
    spliced_logits       f32 [L-1+T, 40]  logits at every position for inputs_embeds=spliced_embeds
    greedy_ids           i64 [8]          HF generate(inputs_embeds, do_sample=False, 8 new tokens, no EOS stop)
    greedy_logits        f32 [8, 40]      logits that chose each greedy token (step k's next-token logits)
    input_ids_b, image_features_b [6,24], mask_tokens_b [1,32], pos_tokens_b [1,32], spliced_embeds_b,
    spliced_logits_b, greedy_ids_b [8], greedy_logits_b [8,40]: a second prompt (other image, one region), for
    batched-decoding tests: run both prompts together and compare with these single-prompt results.
"""

import argparse
import hashlib
import json
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import transformers
from transformers import LlamaConfig, LlamaForCausalLM

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
torch.use_deterministic_algorithms(True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(REPO, "tests", "fixtures", "llm")

SEED = 20240618  # chosen so that no greedy continuation contains EOS and every top-1 margin is >= 0.02
VOCAB, HIDDEN, INTER, LAYERS, HEADS = 40, 32, 64, 2, 4
MM_HIDDEN = 24
BOS, EOS, PAD = 1, 2, 0
MASK_ID, POS_ID = 38, 39
IMAGE_TOKEN_INDEX = -200
ROPE_THETA = 10000.0
N_IMG = 6
N_NEW = 8
SHARD_NAMES = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]

# Prompts: ordinary ids are drawn from 3..37 (never BOS/EOS/PAD or the placeholders).
PLAIN_IDS = [BOS, 7, 21, 3, 33, 14, 9, 27, 18, 5, 36, 12]
PROMPT_A = [BOS, 11, 4, 23, IMAGE_TOKEN_INDEX, 17, 8, MASK_ID, POS_ID, 30, 6, MASK_ID, POS_ID, 25, 13, 19, 10]
PROMPT_B = [BOS, 29, IMAGE_TOKEN_INDEX, 15, 22, 31, MASK_ID, POS_ID, 16, 3, 26]


# ------------------------------------------------------------------------------------------------------------------
# model construction
# ------------------------------------------------------------------------------------------------------------------
def llama_config(kv_heads, hidden=HIDDEN, inter=INTER, layers=LAYERS, heads=HEADS, vocab=VOCAB, max_pos=256):
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_act="silu", rms_norm_eps=1e-5,
        max_position_embeddings=max_pos, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        attention_bias=False, mlp_bias=False)


def make_projector(mm_hidden=MM_HIDDEN, hidden=HIDDEN):
    """osprey/model/multimodal_projector/builder.py, mlp2x_gelu: Linear, GELU (exact), Linear."""
    return nn.Sequential(nn.Linear(mm_hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))


def reinit_(named_params, gen):
    """Re-initialise every parameter from `gen` (sorted by name, so the order is fixed)."""
    for name, p in sorted(named_params, key=lambda kv: kv[0]):
        with torch.no_grad():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) * 0.4 + 0.8)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif name.endswith(".weight"):
                std = {"lm_head.weight": 0.5, "model.mm_projector.0.weight": 0.3}.get(name, 0.25)
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:
                raise SystemExit(f"unexpected parameter {name}")


def build_tiny(kv_heads, seed):
    gen = torch.Generator().manual_seed(seed)
    cfg = llama_config(kv_heads)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).float().eval()
    proj = make_projector().float().eval()
    named = list(model.named_parameters()) + [("model.mm_projector." + k, v) for k, v in proj.named_parameters()]
    reinit_(named, gen)
    return model, proj


def state_dict(model, proj):
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if any("rotary_emb" in k for k in sd):
        raise SystemExit("transformers put rotary buffers in the state dict; update the fixture script")
    for k, v in proj.state_dict().items():
        sd["model.mm_projector." + k] = v.detach().clone()
    return sd


def load_into(model, proj, sd):
    model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("model.mm_projector.")}, strict=True)
    proj.load_state_dict({k[len("model.mm_projector."):]: v for k, v in sd.items()
                          if k.startswith("model.mm_projector.")}, strict=True)


def config_json(kv_heads, dtype):
    d = json.loads(llama_config(kv_heads).to_json_string())  # what save_pretrained writes (diff vs defaults)
    d.update({
        "architectures": ["OspreyLlamaForCausalLM"],
        "model_type": "osprey",
        "rope_theta": ROPE_THETA,          # transformers 5 writes it only under rope_parameters
        "rope_scaling": None,
        "torch_dtype": dtype,
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": MM_HIDDEN,       # absent from the real Osprey config (code default 768)
        "mm_vision_tower": "open_clip_pytorch_model.bin",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        "use_mm_proj": True,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "mask_token_id": MASK_ID,          # placeholder ids of the tiny vocabulary (32000 / 32001 in the real one)
        "pos_token_id": POS_ID,
    })
    d["transformers_version"] = transformers.__version__
    return d


# ------------------------------------------------------------------------------------------------------------------
# splice + reference computations
# ------------------------------------------------------------------------------------------------------------------
def splice(model, proj, input_ids, image_features, mask_tokens, pos_tokens, mask_id=MASK_ID, pos_id=POS_ID):
    """docs/MODEL.md#splicing (prepare_inputs_labels_for_multimodal, mm_use_im_start_end=False)."""
    embed = model.get_input_embeddings()
    ids = torch.tensor(input_ids, dtype=torch.long)
    (where,) = (ids == IMAGE_TOKEN_INDEX).nonzero(as_tuple=True)
    assert where.numel() == 1
    pos = int(where[0])
    parts = [embed(ids[:pos]), proj(image_features)]
    rest = ids[pos + 1:]
    k = 0
    last = 0
    for j in (rest == mask_id).nonzero(as_tuple=True)[0].tolist():
        assert int(rest[j + 1]) == pos_id, "<mask> must be followed by <pos>"
        parts += [embed(rest[last:j]), mask_tokens[k:k + 1], pos_tokens[k:k + 1]]
        k += 1
        last = j + 2
    parts.append(embed(rest[last:]))
    assert k == mask_tokens.shape[0], "mask num not equal to mask feats"
    return torch.cat(parts, dim=0)


@torch.no_grad()
def greedy_reference(model, embeds, n_new):
    """Plain greedy loop with full recomputation (no cache): cross-check of HF generate."""
    seq = embeds.clone()
    ids, logits = [], []
    for _ in range(n_new):
        out = model(inputs_embeds=seq[None]).logits[0, -1]
        t = int(out.argmax())
        ids.append(t)
        logits.append(out.clone())
        seq = torch.cat([seq, model.get_input_embeddings()(torch.tensor([t]))], dim=0)
    return ids, torch.stack(logits)


@torch.no_grad()
def hf_generate(model, embeds, n_new):
    out = model.generate(
        inputs_embeds=embeds[None], attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
        max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, num_beams=1, use_cache=True,
        eos_token_id=None, pad_token_id=PAD, output_scores=True, output_logits=True, return_dict_in_generate=True)
    ids = out.sequences[0].tolist()
    assert len(ids) == n_new, ids
    return ids, torch.stack([l[0] for l in out.logits])


def margins(logits):
    top = logits.topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1])


@torch.no_grad()
def expected_outputs(model, proj, inputs):
    e = {}
    plain = torch.tensor(PLAIN_IDS, dtype=torch.long)
    e["plain_input_ids"] = plain
    e["plain_logits"] = model(input_ids=plain[None]).logits[0]
    min_margin = float("inf")
    for suffix, prompt in (("", PROMPT_A), ("_b", PROMPT_B)):
        feats = inputs["image_features" + suffix]
        mt, pt = inputs["mask_tokens" + suffix], inputs["pos_tokens" + suffix]
        emb = splice(model, proj, prompt, feats, mt, pt)
        assert emb.shape == (len(prompt) - 1 + N_IMG, HIDDEN)
        e["input_ids" + suffix] = torch.tensor(prompt, dtype=torch.long)
        e["image_features" + suffix] = feats
        e["projected_image_features" + suffix] = proj(feats)
        e["mask_tokens" + suffix] = mt
        e["pos_tokens" + suffix] = pt
        e["spliced_embeds" + suffix] = emb
        e["spliced_logits" + suffix] = model(inputs_embeds=emb[None]).logits[0]
        ids, logits = hf_generate(model, emb, N_NEW)
        ref_ids, ref_logits = greedy_reference(model, emb, N_NEW)
        assert ids == ref_ids, (ids, ref_ids)
        assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-5), float((logits - ref_logits).abs().max())
        # no EOS in the continuation, so a loop that stops at EOS gives the same 8 tokens.  Ids 0, 1, 38, 39 may
        # occur: in the tiny vocabulary they are ordinary rows (the real LM cannot emit 32000/32001).
        assert EOS not in ids, ids
        e["greedy_ids" + suffix] = torch.tensor(ids, dtype=torch.long)
        e["greedy_logits" + suffix] = logits
        min_margin = min(min_margin, float(margins(logits).min()))
    assert min_margin >= 0.02, f"greedy top-1 margin {min_margin} too small for a stable test; change SEED"
    return {k: v.contiguous() for k, v in e.items()}, min_margin


def make_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    return {
        "image_features": torch.randn(N_IMG, MM_HIDDEN, generator=gen),
        "mask_tokens": torch.randn(2, HIDDEN, generator=gen) * 0.5,
        "pos_tokens": torch.randn(2, HIDDEN, generator=gen) * 0.5,
        "image_features_b": torch.randn(N_IMG, MM_HIDDEN, generator=gen),
        "mask_tokens_b": torch.randn(1, HIDDEN, generator=gen) * 0.5,
        "pos_tokens_b": torch.randn(1, HIDDEN, generator=gen) * 0.5,
    }


# ------------------------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------------------------
def save_st(path, tensors):
    tensors = {k: v.contiguous() for k, v in sorted(tensors.items())}
    save_file(tensors, path, metadata={"format": "pt"})  # one metadata key: deterministic bytes


def write_json(path, obj, indent=2, sort_keys=True):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, indent=indent, sort_keys=sort_keys)
        f.write("\n")


def write_bin_checkpoint(d, sd, kv_heads):
    """Osprey-7b-like layout: 2 torch.save shards in bf16 + pytorch_model.bin.index.json, with the
    model.layers.{i}.self_attn.rotary_emb.inv_freq buffers that transformers 4.31 saved (loaders must ignore them)."""
    os.makedirs(d, exist_ok=True)
    write_json(os.path.join(d, "config.json"), config_json(kv_heads, "bfloat16"))
    head_dim = HIDDEN // HEADS
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ordered = {}
    for k, v in sd.items():  # module order of the 4.31 model: embed, layers (with inv_freq), norm, lm_head, projector
        ordered[k] = v.to(torch.bfloat16).clone()
        if k.endswith("post_attention_layernorm.weight"):
            layer = k.split(".")[2]
            ordered[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq.to(torch.bfloat16).clone()
    keys = list(ordered)
    cut = keys.index("model.layers.1.self_attn.q_proj.weight")
    shards = [{k: ordered[k] for k in keys[:cut]}, {k: ordered[k] for k in keys[cut:]}]
    weight_map = {}
    for name, shard in zip(SHARD_NAMES, shards):
        torch.save(shard, os.path.join(d, name))
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in ordered.values())
    write_json(os.path.join(d, "pytorch_model.bin.index.json"),
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    loaded = {}
    for name in SHARD_NAMES:
        loaded.update(torch.load(os.path.join(d, name), weights_only=True))
    for k, v in sd.items():
        assert loaded[k].dtype == torch.bfloat16 and torch.equal(loaded[k], v.to(torch.bfloat16))
    return {k: v.to(torch.bfloat16).float() for k, v in sd.items()}


@torch.no_grad()
def hf_load_check(d, exp):
    """The checkpoint directory loads with stock transformers (LLaMA part; projector / inv_freq keys are left over)
    and reproduces plain_logits."""
    model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    got = model(input_ids=exp["plain_input_ids"][None]).logits[0]
    err = float((got - exp["plain_logits"]).abs().max())
    assert err < 1e-5, f"{d}: from_pretrained logits differ by {err}"


def full_manifest():
    """Every tensor of Osprey-7b's LLaMA + projector, from LlamaConfig on the meta device (nothing allocated)."""
    cfg = llama_config(32, hidden=4096, inter=11008, layers=32, heads=32, vocab=32000, max_pos=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
        proj = make_projector(768, 4096)
    tensors = []
    for k, v in model.state_dict().items():
        tensors.append({"key": k, "shape": list(v.shape), "group": "llm", "used": True})
    for k, v in proj.state_dict().items():
        tensors.append({"key": "model.mm_projector." + k, "shape": list(v.shape), "group": "mm_projector",
                        "used": True})
    tolerated = [{"key": f"model.layers.{i}.self_attn.rotary_emb.inv_freq", "shape": [64]} for i in range(32)]
    counts = {"llm": sum(t["group"] == "llm" for t in tensors),
              "mm_projector": sum(t["group"] == "mm_projector" for t in tensors), "tolerated": len(tolerated)}
    n_params = sum(int(torch.Size(t["shape"]).numel()) for t in tensors)
    return {
        "description": ("Osprey-7b LLM side (Vicuna-7B v1.5 LLaMA-2 + mlp2x_gelu projector): every tensor name and "
                        "shape (PyTorch [out, in] order). Official shards store them as bf16. Built from "
                        f"transformers {transformers.__version__} LlamaConfig on the meta device."),
        "config": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "rms_norm_eps": 1e-5,
                   "rope_theta": ROPE_THETA, "max_position_embeddings": 4096, "tie_word_embeddings": False,
                   "mm_hidden_size": 768},
        "tolerated_keys_note": ("model.layers.{i}.self_attn.rotary_emb.inv_freq ([64]) are written by transformers "
                                "4.31 (persistent buffers) but are not in the transformers 5 state dict: accept and "
                                "ignore them, recompute RoPE from rope_theta. Their presence in Osprey's shards is "
                                "inferred: the 695-line index of Osprey-7b-stage2 = 7 JSON lines + 291 LLaMA + 32 "
                                "inv_freq + 4 projector + 16 mask_extractor + 345 vision keys"),
        "ignored_other_keys": ["model.vision_tower.*", "mask_extractor.*", "*.rotary_emb.inv_freq"],
        "counts": counts,
        "num_parameters": n_params,
        "tensors": tensors,
        "tolerated_keys": tolerated,
    }


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=OUT_DIR)
    args = ap.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)

    inputs = make_inputs(SEED + 100)
    report = {}

    # ---- tiny (MHA, f32) and tiny_gqa ----
    for name, kv_heads, seed, exp_name in (("tiny", HEADS, SEED, "expected.safetensors"),
                                           ("tiny_gqa", 2, SEED + 1, "expected_gqa.safetensors")):
        model, proj = build_tiny(kv_heads, seed)
        sd = state_dict(model, proj)
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        write_json(os.path.join(d, "config.json"), config_json(kv_heads, "float32"))
        save_st(os.path.join(d, "model.safetensors"), sd)
        # reload what was written and compute from it
        load_into(model, proj, load_file(os.path.join(d, "model.safetensors")))
        exp, margin = expected_outputs(model, proj, inputs)
        save_st(os.path.join(out, exp_name), exp)
        hf_load_check(d, exp)
        report[name] = (exp, margin)

        if name == "tiny":
            # ---- tiny_bin: same weights in bf16 shards; expected from the bf16-rounded weights in f32 ----
            sd_bf16 = write_bin_checkpoint(os.path.join(out, "tiny_bin"), sd, kv_heads)
            model16, proj16 = build_tiny(kv_heads, seed)
            load_into(model16, proj16, sd_bf16)
            exp16, margin16 = expected_outputs(model16, proj16, inputs)
            save_st(os.path.join(out, "expected_bf16.safetensors"), exp16)
            hf_load_check(os.path.join(out, "tiny_bin"), exp16)
            report["tiny_bin"] = (exp16, margin16)
            diff = {k: float((exp[k] - exp16[k]).abs().max()) for k in ("plain_logits", "spliced_logits")}
            print("max |f32 - bf16-rounded| logits:", diff)

    write_json(os.path.join(out, "manifest_full.json"), full_manifest(), indent=1, sort_keys=False)

    for name, (exp, margin) in report.items():
        print(f"{name}: greedy_ids={exp['greedy_ids'].tolist()} greedy_ids_b={exp['greedy_ids_b'].tolist()} "
              f"min top-1 margin={margin:.4f}")
    exp = report["tiny"][0]
    for k, t in exp.items():
        print(f"  {k:26s} {str(t.dtype):14s} {list(t.shape)}")
    for root, _, files in sorted(os.walk(out)):
        if os.path.basename(root) == "tokenizer":
            continue
        for f in sorted(files):
            p = os.path.join(root, f)
            print(f"{os.path.relpath(p, out):50s} {os.path.getsize(p):8d} {sha(p)}")


if __name__ == "__main__":
    main()
