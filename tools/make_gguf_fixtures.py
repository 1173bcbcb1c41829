#!/usr/bin/env python3
"""Reference values for the quantized (GGUF) LLM tests, computed with llama.cpp's own Python
quantizers (PyPI `gguf`, module `gguf.quants`) from the tiny LLM fixtures.

For each fixture model (tests/fixtures/llm/tiny, tiny_gqa) it writes to tests/fixtures/llm/gguf/:

- `<model>_q8_0_bytes.safetensors`: for every linear weight of the decoder (q/k/v/o, gate/up/down,
  lm_head), the q8_0 bytes `gguf.quants.quantize` gives, as uint8 `[rows, row_bytes]`, under
  llama.cpp's tensor name. Q and K rows are first permuted the way llama.cpp's converter does
  (`convert_hf_to_gguf.py`, `LlamaModel.permute`), so the bytes are those a llama.cpp GGUF holds.
- `<model>_q8_0_dequant.safetensors`: the checkpoint in transformers' names with those weights
  dequantized by `gguf.quants.dequantize` (rows put back in checkpoint order), the embeddings and
  projector weights rounded to f16 (how `llm-worker quantize` stores them) and the norms and
  biases unchanged. Loaded with the plain f32 model, it gives the logits a GGUF with dequantized
  weights must reproduce.

Needs only numpy, safetensors and gguf (no torch):

    python3 -m venv .venv-gguf && .venv-gguf/bin/pip install gguf==0.19.0 numpy safetensors
    .venv-gguf/bin/python tools/make_gguf_fixtures.py
"""

import json
import pathlib

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants
from safetensors.numpy import load_file, save_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "llm"
OUT = FIXTURES / "gguf"

LAYER_PARTS = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's row order for Q/K: rotate adjacent pairs instead of halves."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def inverse_permute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def linear_names(cfg: dict) -> dict:
    """Checkpoint name -> (llama.cpp name, heads to permute or None) for every decoder linear."""
    out = {}
    for layer in range(cfg["num_hidden_layers"]):
        for part, gname in LAYER_PARTS.items():
            heads = None
            if part.startswith("self_attn.q_proj"):
                heads = cfg["num_attention_heads"]
            elif part.startswith("self_attn.k_proj"):
                heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
            out[f"model.layers.{layer}.{part}"] = (f"blk.{layer}.{gname}", heads)
    if not cfg.get("tie_word_embeddings", False):
        out["lm_head.weight"] = ("output.weight", None)
    return out


def make(model: str) -> None:
    cfg = json.loads((FIXTURES / model / "config.json").read_text())
    weights = load_file(str(FIXTURES / model / "model.safetensors"))
    linears = linear_names(cfg)
    q8 = GGMLQuantizationType.Q8_0
    raw, dequant = {}, {}
    for name, w in weights.items():
        w = w.astype(np.float32)
        if name in linears:
            gname, heads = linears[name]
            stored = llama_cpp_permute(w, heads) if heads else w
            q = quants.quantize(stored, q8)
            raw[gname] = np.ascontiguousarray(q.astype(np.uint8))
            back = quants.dequantize(q, q8).reshape(w.shape).astype(np.float32)
            dequant[name] = inverse_permute(back, heads) if heads else back
        elif w.ndim == 2 and (name == "model.embed_tokens.weight" or name.startswith("model.mm_projector.")):
            dequant[name] = w.astype(np.float16).astype(np.float32)
        elif name.endswith("rotary_emb.inv_freq"):
            continue
        else:
            dequant[name] = w
    missing = set(linears) - set(weights)
    assert not missing, f"{model}: missing {sorted(missing)}"
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(raw, str(OUT / f"{model}_q8_0_bytes.safetensors"))
    save_file({k: np.ascontiguousarray(v) for k, v in dequant.items()}, str(OUT / f"{model}_q8_0_dequant.safetensors"))
    print(f"{model}: {len(raw)} q8_0 tensors, {len(dequant)} dequantized tensors")


def main() -> None:
    # Self-check of the permutation against its inverse before anything is written.
    w = np.arange(8 * 4, dtype=np.float32).reshape(8, 4)
    assert np.array_equal(inverse_permute(llama_cpp_permute(w, 2), 2), w)
    for model in ("tiny", "tiny_gqa"):
        make(model)


if __name__ == "__main__":
    main()
