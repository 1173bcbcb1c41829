"""Write tests/fixtures/llm/tiny/{tokenizer.json, added_tokens.json}: a 40-id tokenizer that fits the
tiny random LLaMA of make_llm_fixtures.py (vocab 40; <mask>=38, <pos>=39), so the llm-worker's
gRPC service can be tested end to end with real prompts. Capital letters, a few digits and
punctuation marks have their own ids; everything else becomes <unk>, and runs of it fuse into one
<unk>, so the Osprey prompts fit the tiny model's 256 positions. Needs only the standard library:
    python3 tools/make_tiny_tokenizer.py
"""

import json
import os

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "llm", "tiny")


def special(token_id, content):
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": True}


def main():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ012345.?:"):
        vocab[c] = 3 + i
    merges = []
    assert len(vocab) == 38
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>"),
                         special(38, "<mask>"), special(39, "<pos>")],
        # The LLaMA layout (transformers 4.31 fast tokenizer): dummy prefix, spaces as U+2581.
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }
    with open(os.path.join(OUT, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False, indent=1)
    with open(os.path.join(OUT, "added_tokens.json"), "w", encoding="utf-8") as f:
        json.dump({"<mask>": 38, "<pos>": 39}, f)


if __name__ == "__main__":
    main()
