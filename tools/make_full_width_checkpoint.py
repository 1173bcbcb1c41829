"""Writes an Osprey checkpoint with the released model's widths and random weights, for measuring
what crosses the wire at full size (tools/bench_bytes.py, docs/BENCHMARK_HISTORY.md "Bytes per request").

What travels between the gateway and its workers depends on the widths only: the ConvNeXt-L stage
widths at 512 px (feature blob, image tokens [1024, 768]) and the LLM width 4096 (region tokens).
Depth does not, so every ConvNeXt stage has one block and the decoder one layer; the vocabulary is
the 40-id test tokenizer's (tests/fixtures/llm/tiny), whose files are copied alongside. The
answers are noise; the shapes are the released ones (docs/MODEL.md).

    python3 tools/make_full_width_checkpoint.py .cache/full-width

Pure Python (no numpy): one seeded random block per tensor, repeated to fill it. About 1.1 GB;
write it under a git-ignored folder.
"""

import argparse
import array
import json
import math
import pathlib
import random
import shutil

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "llm" / "tiny"

DIMS = [192, 384, 768, 1536]  # ConvNeXt-L res2..res5
HIDDEN = 4096  # Vicuna-7B width
INTERMEDIATE = 11008
HEADS = 32
MASK_EMBED = 1024  # MaskExtractor(embed_dim=1024)
MASK_SHAPE = 112  # MaskExtractor(mask_shape=112)
VOCAB = 40  # the test tokenizer's ids; <mask> 38, <pos> 39
TRUNK = "model.vision_tower.vision_tower.visual.trunk."


def tensors():
    """(name, shape, kind) for every tensor the vision and LLM workers read."""
    out = []
    add = lambda name, shape, kind="weight": out.append((name, shape, kind))
    add(TRUNK + "stem.0.weight", [DIMS[0], 3, 4, 4])
    add(TRUNK + "stem.0.bias", [DIMS[0]], "zero")
    add(TRUNK + "stem.1.weight", [DIMS[0]], "one")
    add(TRUNK + "stem.1.bias", [DIMS[0]], "zero")
    for s, c in enumerate(DIMS):
        stage = f"{TRUNK}stages.{s}."
        if s > 0:
            prev = DIMS[s - 1]
            add(stage + "downsample.0.weight", [prev], "one")
            add(stage + "downsample.0.bias", [prev], "zero")
            add(stage + "downsample.1.weight", [c, prev, 2, 2])
            add(stage + "downsample.1.bias", [c], "zero")
        block = stage + "blocks.0."
        add(block + "conv_dw.weight", [c, 1, 7, 7])
        add(block + "conv_dw.bias", [c], "zero")
        add(block + "norm.weight", [c], "one")
        add(block + "norm.bias", [c], "zero")
        add(block + "mlp.fc1.weight", [4 * c, c])
        add(block + "mlp.fc1.bias", [4 * c], "zero")
        add(block + "mlp.fc2.weight", [c, 4 * c])
        add(block + "mlp.fc2.bias", [c], "zero")
        add(block + "gamma", [c], "small")
    for level, c in zip(["res2", "res3", "res4", "res5"], DIMS):
        add(f"mask_extractor.{level}.weight", [MASK_EMBED, c])
        add(f"mask_extractor.{level}.bias", [MASK_EMBED], "zero")
    add("mask_extractor.feat_linear.weight", [HIDDEN, MASK_EMBED])
    add("mask_extractor.feat_linear.bias", [HIDDEN], "zero")
    for i, (rows, cols) in enumerate([(MASK_EMBED, MASK_SHAPE**2), (MASK_EMBED, MASK_EMBED), (HIDDEN, MASK_EMBED)]):
        add(f"mask_extractor.mask_linear.layers.{i}.weight", [rows, cols])
        add(f"mask_extractor.mask_linear.layers.{i}.bias", [rows], "zero")
    add("model.mm_projector.0.weight", [HIDDEN, DIMS[2]])
    add("model.mm_projector.0.bias", [HIDDEN], "zero")
    add("model.mm_projector.2.weight", [HIDDEN, HIDDEN])
    add("model.mm_projector.2.bias", [HIDDEN], "zero")
    add("model.embed_tokens.weight", [VOCAB, HIDDEN])
    layer = "model.layers.0."
    for proj in "qkvo":
        add(f"{layer}self_attn.{proj}_proj.weight", [HIDDEN, HIDDEN])
    add(layer + "mlp.gate_proj.weight", [INTERMEDIATE, HIDDEN])
    add(layer + "mlp.up_proj.weight", [INTERMEDIATE, HIDDEN])
    add(layer + "mlp.down_proj.weight", [HIDDEN, INTERMEDIATE])
    add(layer + "input_layernorm.weight", [HIDDEN], "one")
    add(layer + "post_attention_layernorm.weight", [HIDDEN], "one")
    add("model.norm.weight", [HIDDEN], "one")
    add("lm_head.weight", [VOCAB, HIDDEN])
    return out


def values(shape, kind, rng):
    """Little-endian f32 bytes of one tensor."""
    count = math.prod(shape)
    constant = {"zero": 0.0, "one": 1.0, "small": 0.1}.get(kind)
    if constant is not None:
        return array.array("f", [constant]).tobytes() * count
    fan_in = math.prod(shape[1:]) or 1
    scale = 1.0 / math.sqrt(fan_in)
    block = array.array("f", [rng.uniform(-scale, scale) for _ in range(min(count, 4099))]).tobytes()
    whole, rest = divmod(count * 4, len(block))
    return block * whole + block[:rest]


def config():
    return {
        "architectures": ["OspreyLlamaForCausalLM"],
        "model_type": "osprey",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": 1,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "head_dim": HIDDEN // HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": VOCAB,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "mask_token_id": 38,
        "pos_token_id": 39,
        "tie_word_embeddings": False,
        "mm_hidden_size": DIMS[2],
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_tower": "open_clip_pytorch_model.bin",
        "vision_depths": [1, 1, 1, 1],
        "vision_dims": DIMS,
        "image_size": 512,
        "mask_embed_dim": MASK_EMBED,
        "mask_shape": MASK_SHAPE,
        "torch_dtype": "float32",
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=pathlib.Path, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)

    header, offset = {}, 0
    for name, shape, _ in tensors():
        size = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(args.out / "model.safetensors", "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for _, shape, kind in tensors():
            f.write(values(shape, kind, rng))
    (args.out / "config.json").write_text(json.dumps(config(), indent=2) + "\n")
    for name in ["tokenizer.json", "added_tokens.json"]:
        shutil.copy(TOKENIZER / name, args.out / name)
    print(f"{args.out}: {offset / 1e9:.2f} GB of f32 weights")


if __name__ == "__main__":
    main()
