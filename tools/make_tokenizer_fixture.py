#!/usr/bin/env python3
"""Rebuild the LLaMA-2 / Vicuna v1.5 SentencePiece tokenizer and write tokenizer parity fixtures.

Spec: docs/MODEL.md#tokenizer (tokens, `tokenizer_image_token`) and docs/MODEL.md#prompt-template-and-tasks (prompts).

Why: the Osprey checkpoints ship only a SentencePiece `tokenizer.model` (no `tokenizer.json`), and no package ships
that file.  llama.cpp, however, vendors the LLaMA-2 vocabulary (32000 pieces with scores and token types) as
`models/ggml-vocab-llama-spm.gguf`, together with reference tokenisations (`.inp` / `.out`).  This script turns the
gguf back into a SentencePiece `ModelProto` and checks the result against those references.  With the normaliser and
trainer settings below the rebuilt file is byte-identical to Meta's LLaMA-2 `tokenizer.model` (499,723 bytes,
sha256 9e556afd...d347, md5 eeec4125...3025; the script asserts this).

Reference environment = Osprey's own pins (its pyproject.toml): transformers 4.31.0, tokenizers 0.13.3,
sentencepiece 0.1.99.  transformers 5 no longer has the sentencepiece-based ("slow") LlamaTokenizer, and Osprey runs
the fast tokenizer converted by 4.31's `LlamaConverter`, so 4.31 is the reference for both.  Exact pins: the "#tok: "
lines of tools/requirements-llm.txt.

Getting the llama.cpp files (either source works; sha256 of the three files is checked):
    npm pack node-llama-cpp@3.22.1 && tar xzf node-llama-cpp-3.22.1.tgz package/llama/gitRelease.bundle
    git clone -q package/llama/gitRelease.bundle llama.cpp          # -> llama.cpp/models/ggml-vocab-llama-spm.*
  or the PyPI sdist of llama-cpp-python==0.3.36 (vendor/llama.cpp/models/), e.g.
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36   (needs scikit-build-core + cmake to
    prepare metadata; or fetch the .tar.gz by hand)

Run (outside the repository for the venv):
    python3 -m venv .venv-tok
    sed -n 's/^#tok: //p' tools/requirements-llm.txt > /tmp/req-tok.txt
    .venv-tok/bin/pip install -r /tmp/req-tok.txt
    .venv-tok/bin/python tools/make_tokenizer_fixture.py --llama-cpp-models /path/to/llama.cpp/models
Check an existing fixture with any other transformers (informational, e.g. transformers 5):
    .venv-llm/bin/python tools/make_tokenizer_fixture.py --check-only

Writes tests/fixtures/llm/tokenizer/:
    tokenizer.model            rebuilt SentencePiece ModelProto (BPE, 32000 pieces)
    added_tokens.json          {"<mask>": 32000, "<pos>": 32001}
    special_tokens_map.json    bos <s>, eos </s>, unk <unk>, pad <unk> (Osprey sets pad = unk)
    tokenizer_config.json      LlamaTokenizer, add_bos_token true, add_eos_token false, legacy true, ...
    llamacpp_refs.json         [{"text", "ids"}] the 46 llama.cpp reference pairs (ids WITHOUT BOS); sentencepiece,
                               the slow and the fast tokenizer all reproduce 46/46 (asserted)
    corpus.json                header fields + "entries": [{"text", "ids", ...}] (see CORPUS_DOC below)
Output is deterministic (fixed seeds, sorted keys, no timestamps); run twice and compare sha256.
"""

import argparse
import hashlib
import json
import os
import random
import sys
import unicodedata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(REPO, "tests", "fixtures", "llm", "tokenizer")

GGUF_NAME = "ggml-vocab-llama-spm.gguf"
# Same bytes in node-llama-cpp 3.22.1 (llama/gitRelease.bundle) and llama-cpp-python 0.3.36 (vendor/llama.cpp).
LLAMACPP_SHA256 = {
    GGUF_NAME: "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69",
    GGUF_NAME + ".inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    GGUF_NAME + ".out": "ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29",
}
N_CORPUS = 3000
# Meta's LLaMA-2 tokenizer.model (the same file is republished by Vicuna v1.5 / Osprey).
META_TOKENIZER_SIZE = 499723
META_TOKENIZER_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"

MASK, POS, IMAGE = "<mask>", "<pos>", "<image>"
MASK_ID, POS_ID = 32000, 32001
IMAGE_TOKEN_INDEX = -200
BOS_ID = 1
SEED = 20240611

# osprey/conversation.py conv_templates['osprey_v1']
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
SYSTEM_TRAIN = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")

CORPUS_DOC = {
    "description": "Tokenizer parity corpus for the Osprey / Vicuna v1.5 (LLaMA-2) tokenizer in this directory.",
    "load_call": ("tok = AutoTokenizer.from_pretrained(DIR, use_fast=USE_FAST, model_max_length=2048, "
                  "padding_side='right'); tok.pad_token = tok.unk_token; "
                  "tok.add_tokens(['<mask>', '<pos>'], special_tokens=True)   # exactly as Osprey's demo/eval"),
    "ids": "tok(text).input_ids with the SLOW tokenizer (use_fast=False, LlamaTokenizer, legacy=True): BOS added",
    "ids_fast": ("present only where the FAST tokenizer (use_fast=True, LlamaTokenizerFast converted from "
                 "tokenizer.model by transformers 4.31 LlamaConverter) gives different ids. Osprey inference uses "
                 "the fast one, so the ids Osprey really feeds the model are ids_fast if present, else ids."),
    "image_token_ids": ("only on some entries containing '<image>': osprey.mm_utils.tokenizer_image_token(text, "
                        "tok) with the slow tokenizer: split on '<image>', tok(chunk).input_ids per chunk, keep "
                        "BOS only on chunk 0, drop the first id of every later chunk, join with -200"),
    "image_token_ids_fast": "same with the fast tokenizer, present only where it differs from image_token_ids",
    "decoded": ("only on some entries: tok.decode(ids, skip_special_tokens=True) with the slow tokenizer (ids = "
                "this entry's slow ids)"),
    "decoded_fast": ("fast tokenizer's decode of the same ids (the slow ids), present only where it differs "
                     "from decoded"),
    "random_decode": ("top-level list of {ids, decoded, decoded_fast?}: decode(ids, skip_special_tokens=True) of "
                      "random id lists (byte pieces, special ids, <mask>/<pos> ids mixed in)"),
    "slow_fast_note": ("transformers <= 4.33 slow tokenizers strip whitespace on both sides of added tokens that "
                       "are not AddedToken objects (<mask>, <pos>); the fast tokenizer keeps it (a space before "
                       "<mask> becomes a lone '\u2581' 29871, one after <pos> makes the next chunk start with "
                       "'\u2581\u2581'). Also slow decode keeps <mask>/<pos> (they are not in all_special_ids) "
                       "while fast decode drops them. tokenizers' ByteFallback decoder turns every byte piece of "
                       "an invalid UTF-8 run into U+FFFD, where sentencepiece keeps the valid bytes."),
    "transformers5_note": ("transformers 5 (no slow class; LlamaTokenizer = tokenizers Metaspace(prepend_scheme="
                           "always, split=False), no normalizer) does NOT reproduce 4.31 on this directory: it "
                           "drops leading spaces (' Hello' -> '\u2581Hello' instead of '\u2581', '\u2581Hello') "
                           "and text after <pos> (' and' -> '\u2581and' instead of '\u2581', '\u2581and'). Use "
                           "ids_fast/ids, never a transformers 5 tokenizer, as the reference."),
}


# ------------------------------------------------------------------------------------------------------------------
# gguf -> SentencePiece ModelProto
# ------------------------------------------------------------------------------------------------------------------
def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_gguf_vocab(path):
    """Return (pieces, scores, types, meta) from a llama.cpp vocab-only gguf."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = reader.fields
    model = fields["tokenizer.ggml.model"].contents()
    if model != "llama":
        raise SystemExit(f"{path}: tokenizer.ggml.model is {model!r}, expected 'llama' (SentencePiece)")
    pieces = list(fields["tokenizer.ggml.tokens"].contents())
    scores = [float(s) for s in fields["tokenizer.ggml.scores"].contents()]
    types = [int(t) for t in fields["tokenizer.ggml.token_type"].contents()]
    meta = {k: fields[k].contents() for k in (
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token") if k in fields}
    if not (len(pieces) == len(scores) == len(types) == 32000):
        raise SystemExit(f"unexpected vocabulary size {len(pieces)}")
    return pieces, scores, types, meta


def build_model_proto(pieces, scores, types, pb2):
    """SentencePiece ModelProto of the LLaMA-2 tokenizer.

    Token types: llama.cpp's gguf token_type enum is SentencePiece's (1 NORMAL, 2 UNKNOWN, 3 CONTROL,
    4 USER_DEFINED, 5 UNUSED, 6 BYTE).  Like spm_train, `type` is only written for non-NORMAL pieces and `score`
    always.

    Settings that change encoding (all verified behaviourally against llama.cpp's references, and as a whole by the
    sha256 of Meta's file):
      model_type BPE; byte_fallback true (unknown characters -> <0xXX> byte pieces, no <unk>);
      normalizer "identity" with no precompiled charsmap (no NFKC: text is not normalised at all);
      add_dummy_prefix true (a '\u2581' is prepended to every encoded string);
      remove_extra_whitespaces false (whitespace runs, leading and trailing spaces are kept as '\u2581' pieces);
      escape_whitespaces left at its default true (' ' -> '\u2581'); treat_whitespace_as_suffix false;
      split_digits true and allow_whitespace_only_pieces true (training options; they explain why numbers are
      single digits and why '\u2581\u2581'-style pieces exist, with score -1e9 so they merge last);
      unk/bos/eos/pad ids 0/1/2/-1, unk_surface ' \u2047 ' (what decode prints for <unk>).
    The remaining trainer fields are the recorded training options of Meta's file; they do not affect encoding but
    make the file byte-identical.  No denormalizer_spec (absent in Meta's file).
    """
    m = pb2.ModelProto()
    type_names = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}
    for piece, score, ttype in zip(pieces, scores, types):
        if ttype not in type_names:
            raise SystemExit(f"unknown token type {ttype} for {piece!r}")
        if getattr(pb2.ModelProto.SentencePiece, type_names[ttype]) != ttype:
            raise SystemExit("gguf and SentencePiece token type enums disagree")
        p = m.pieces.add()
        p.piece = piece
        p.score = score
        if ttype != 1:
            p.type = ttype

    ts = m.trainer_spec
    ts.input.append("/large_experiments/theorem/datasets/MERGED/all.test1.merged")
    ts.model_prefix = "spm_model_32k_200M_charcov099995_allowWSO__v2"
    ts.model_type = pb2.TrainerSpec.BPE
    ts.vocab_size = 32000
    ts.self_test_sample_size = 0
    ts.input_format = "text"
    ts.character_coverage = 0.99995
    ts.input_sentence_size = 200000000
    ts.seed_sentencepiece_size = 1000000
    ts.shrinking_factor = 0.75
    ts.num_threads = 80
    ts.num_sub_iterations = 2
    ts.max_sentence_length = 4192
    ts.shuffle_input_sentence = True
    ts.max_sentencepiece_length = 16
    ts.split_by_unicode_script = True
    ts.split_by_whitespace = True
    ts.split_by_number = True
    ts.treat_whitespace_as_suffix = False
    ts.split_digits = True
    ts.allow_whitespace_only_pieces = True
    ts.vocabulary_output_piece_score = True
    ts.hard_vocab_limit = True
    ts.use_all_vocab = False
    ts.byte_fallback = True
    ts.required_chars = ""
    ts.unk_id = 0
    ts.bos_id = 1
    ts.eos_id = 2
    ts.pad_id = -1
    ts.unk_surface = " \u2047 "
    ts.unk_piece = "<unk>"
    ts.bos_piece = "<s>"
    ts.eos_piece = "</s>"
    ts.pad_piece = "<pad>"
    ts.train_extremely_large_corpus = False
    ts.enable_differential_privacy = False
    ts.differential_privacy_noise_level = 0.0
    ts.differential_privacy_clipping_threshold = 0

    ns = m.normalizer_spec
    ns.name = "identity"
    ns.precompiled_charsmap = b""
    ns.add_dummy_prefix = True
    ns.remove_extra_whitespaces = False
    ns.normalization_rule_tsv = ""
    return m


def read_llamacpp_refs(models_dir):
    """Parse llama.cpp's `.inp` (texts, each followed by '\\n__ggml_vocab_test__\\n') and `.out` (one line of
    space-separated ids per text, produced by HF AutoTokenizer(meta-llama/Llama-2-7b-hf).encode(text,
    add_special_tokens=False), i.e. without BOS)."""
    sep = "\n__ggml_vocab_test__\n"
    with open(os.path.join(models_dir, GGUF_NAME + ".inp"), encoding="utf-8", newline="") as f:
        raw = f.read()
    texts = []
    pos = 0
    while pos < len(raw):  # same loop as llama.cpp tests/test-tokenizer-0.cpp
        nxt = raw.find(sep, pos)
        if nxt < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(sep)
    with open(os.path.join(models_dir, GGUF_NAME + ".out"), encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != len(texts):
        raise SystemExit(f"llama.cpp refs: {len(texts)} inputs but {len(lines)} outputs")
    return [{"text": t, "ids": [int(x) for x in line.split()]} for t, line in zip(texts, lines)]


# ------------------------------------------------------------------------------------------------------------------
# Tokenizer config files (as in the Vicuna v1.5 / Osprey release, transformers 4.31 save format)
# ------------------------------------------------------------------------------------------------------------------
def added_token(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def config_files():
    special_tokens_map = {
        "bos_token": {k: v for k, v in added_token("<s>").items() if k != "__type"},
        "eos_token": {k: v for k, v in added_token("</s>").items() if k != "__type"},
        "pad_token": "<unk>",
        "unk_token": {k: v for k, v in added_token("<unk>").items() if k != "__type"},
    }
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added_token("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": added_token("</s>"),
        "legacy": True,
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": added_token("<unk>"),
    }
    return {
        "added_tokens.json": {MASK: MASK_ID, POS: POS_ID},
        "special_tokens_map.json": special_tokens_map,
        "tokenizer_config.json": tokenizer_config,
    }


def _compact_list(items):
    if not items:
        return "[]"
    return "[\n" + ",\n".join(" " + json.dumps(e, ensure_ascii=False, sort_keys=True) for e in items) + "\n]"


def write_json(path, obj, compact_lists=False):
    """Write JSON deterministically (UTF-8, sorted keys).  compact_lists: one list element per line (smaller and
    diff-friendly); top-level dict keys keep their insertion order then."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        if not compact_lists:
            json.dump(obj, f, ensure_ascii=False, indent=2, sort_keys=True)
        elif isinstance(obj, list):
            f.write(_compact_list(obj))
        else:
            body = []
            for k, v in obj.items():
                val = _compact_list(v) if isinstance(v, list) else json.dumps(v, ensure_ascii=False, sort_keys=True)
                body.append(json.dumps(k, ensure_ascii=False) + ": " + val)
            f.write("{\n" + ",\n".join(body) + "\n}")
        f.write("\n")


# ------------------------------------------------------------------------------------------------------------------
# Corpus
# ------------------------------------------------------------------------------------------------------------------
def osprey_prompt(qs, system=SYSTEM):
    return f"{system} USER: {qs} ASSISTANT:"


def handwritten_strings():
    demo_prefix = "<image>\n\nThis provides an overview of the picture.\n"
    train_prefix = "<image>\nThis provides an overview of the picture.\n"
    eval_prefix = "<image>\n.\nThis provides an overview of the picture.\n"
    questions = [
        "Please give me a short description of <mask><pos>. Using a short phrase.",
        "Can you give me a detailed description of <mask><pos>?",
        "What is in <mask><pos>? Using a short phrase.",
        "What is the category of <mask><pos>? Using only one word or phrase.",
        "Please give me a short description of <mask><pos>.",
        "What is the relationship between region1<mask><pos> and region2<mask><pos>?",
    ]
    s = []
    for q in questions:
        for prefix in (demo_prefix, train_prefix, eval_prefix):
            s.append(osprey_prompt(prefix + q))
        s.append(prefix + q)
        s.append(q)
    s += [
        osprey_prompt(train_prefix + "Ther are 2 part regions in the picture: region1<mask><pos>,"
                      "region2<mask><pos>. What is region1 doing?", SYSTEM_TRAIN),
        osprey_prompt(train_prefix + "Ther are 1 part region in the picture: region1<mask><pos>. "
                      "Describe it.", SYSTEM_TRAIN),
        osprey_prompt(demo_prefix + "What is <mask><pos>?") + " It is a dog.</s>USER: And <mask><pos>? ASSISTANT:",
        osprey_prompt("<image>\nIs there a person in the image?"),
        osprey_prompt("<image>\nIs there a dog in the image? Answer yes or no."),
        SYSTEM, SYSTEM_TRAIN, osprey_prompt(""), " ASSISTANT:", "USER:", "ASSISTANT: a man riding a horse.</s>",
        "<mask><pos>", "<mask>", "<pos>", "<pos><mask>", "<mask><pos><mask><pos>", " <mask><pos> ", "a<mask>b<pos>c",
        "a <mask> b <pos> c", "a  <mask>  <pos>  c", "\n<mask><pos>\n", "<mask>\n<pos>", "<mask><pos>.", "<mask><pos>?",
        "region1<mask><pos>,region2<mask><pos>,region3<mask><pos>", "<Mask><POS>", "<mask", "mask>", "<<mask>>",
        "<mask><mask><pos><pos>", "<mask> <pos>", "\t<mask>\t<pos>\t",
        "<image>", "<image><image>", "<image>\n", "\n<image>", "<image> <image>", "a<image>b", "<image>.\n",
        "text before <image> and after", "<image><mask><pos>", "<image>\n\n<mask><pos>", "<IMAGE>", "<image",
        "<s>", "</s>", "<unk>", "<s>Hello", "Hello</s>", "Hello </s> world", "<s> <s>", "</s></s>", "<s><mask></s>",
        "<pad>", "<0x0A>", "<0xFF>", "\u2581", "\u2581\u2581hello", "hello\u2581world", " \u2581 ", "\u2047",
        "", " ", "  ", "   ", "    ", " " * 17, "\t", "\t\t", " \t ", "\n", "\n\n", "\n\n\n", " \n", "\n ", "\r\n",
        "\r", "\x0b", "\x0c", "\u00a0", "\u3000", "\u2003", "\u200b", "\u200d", "\ufeff", "\u2028", "\u2029",
        "Hello", " Hello", "Hello ", " Hello ", "  Hello  ", "Hello\n", "\nHello", "Hello\n\n", "Hello\tworld",
        "Hello  world", "Hello   world", "Hello \n world", "line1\nline2\n\nline4", "trailing spaces   ",
        "0", "1", "12", "123", "1234", "12345678901234567890", "3.14159", "1,000,000", "-42", "+7", "1e-5",
        "2023-12-17", "0x1F", "v1.5", "7B", "Osprey-7b", "1024x1024", "100%", "$99.99", "\u00bd", "\u2460",
        "\uff11\uff12\uff13", "\u0661\u0662\u0663", "\u096a\u096b",
        "caf\u00e9", "cafe\u0301", "na\u00efve", "\u00c5ngstr\u00f6m", "A\u030a", "\u00df", "\u1e9e", "\ufb01",
        "\u0130stanbul", "\u01c4", "\u2126", "\u212b",
        "\u4f60\u597d\uff0c\u4e16\u754c\uff01", "\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e",
        "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8", "\u30ab\u30bf\u30ab\u30ca",
        "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
        "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645", "\u05e9\u05dc\u05d5\u05dd",
        "\u043f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440", "\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5",
        "\u0928\u092e\u0938\u094d\u0924\u0947", "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",
        "\u1780\u17b6\u1793\u17cb\u178f\u17c2", "\u10d2\u10d0\u10db\u10d0\u10e0\u10ef\u10dd\u10d1\u10d0",
        "\U00020000\U0002a6d6", "\U0001d400\U0001d41b", "\U0001f600", "\U0001f999", "\U0001f680 rocket",
        "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466", "\U0001f3f3\ufe0f\u200d\U0001f308",
        "\U0001f44d\U0001f3fd", "\U0001f1ef\U0001f1f5", "\U0001f636\u200d\U0001f32b\ufe0f", "\u2705", "\u2764\ufe0f",
        "\U0001f9d1\u200d\U0001f4bb", "#\ufe0f\u20e3", "\U0001f600\U0001f600\U0001f600",
        "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) { a[i] = b[i]; }",
        "fn main() {\n\tprintln!(\"hi {}\", 1);\n}", "SELECT * FROM t WHERE a = 'b';", "<div class=\"x\">&amp;</div>",
        "{\"key\": [1, 2, 3], \"null\": null}", "$ ls -la | grep '\\.py$'", "x = y ** 2 // 3 % 4",
        "https://example.com/path?q=1&r=2#frag", "user@example.com", "C:\\Windows\\System32",
        "!!!!!!", "???", "...", "\u2026", "--", "\u2014", "''", "\"\"", "'s", "don't", "I'm", "(", ")", "[]",
        "{}", "<>", "@#$%^&*", "~`|\\", "\u00ab\u00bb", "\u201cquoted\u201d", "\u2018single\u2019",
        "a" * 300, "ab" * 150, "Pneumonoultramicroscopicsilicovolcanoconiosis" * 6, "x" * 1000,
        "9" * 200, "\u00e9" * 100, "\U0001f600" * 50, "\u4e00" * 120, "_" * 64, "-" * 80, "=" * 33, "." * 40,
        " " * 100, "\n" * 20, "\t" * 10, "a b " * 60,
        "\x00", "\x01\x02\x03", "\x07bell", "\x1b[31mred\x1b[0m", "\x7f", "\x80", "\x9f", "null\x00byte",
        "\ud7ff", "\ue000", "\uf8ff", "\ufffd", "\ufffe", "\uffff", "\U0010ffff", "\U000e0041",
        "The quick brown fox jumps over the lazy dog.", "THE QUICK BROWN FOX", "tHe QuIcK",
        "Hello, y'all! How are you?",
    ]
    return s


WORDS = ("the a an of to in is on with for at by from and or but not this that it its be are was were has have "
         "person man woman dog cat car tree sky building road table chair window cup bottle shirt hat region "
         "picture image photo describe short phrase detailed category left right top bottom middle red green "
         "blue white black small large wooden metal standing sitting holding wearing riding near behind "
         "Osprey LLaMA Vicuna SAM ConvNeXt tokenizer").split()
PUNCT = list(".,;:!?'\"()[]{}<>-_/\\|@#$%^&*+=~`")
WS = [" ", " ", " ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\r\n", "\u00a0", "\u3000"]
SPECIAL_FRAGS = [MASK, POS, MASK + POS, IMAGE, "</s>", "<s>", "<unk>"]
UNICODE_RANGES = [
    (0x00C0, 0x017F), (0x0370, 0x03FF), (0x0400, 0x04FF), (0x0590, 0x05FF), (0x0600, 0x06FF), (0x0900, 0x097F),
    (0x0E00, 0x0E7F), (0x1100, 0x11FF), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x2000, 0x206F),
    (0x2190, 0x21FF), (0x2200, 0x22FF), (0x2500, 0x257F), (0xFF00, 0xFFEF), (0x1F300, 0x1F5FF), (0x1F600, 0x1F64F),
    (0x1F900, 0x1F9FF), (0x20000, 0x2A6DF), (0x0300, 0x036F), (0x0000, 0x001F),
]


def random_char(rng):
    lo, hi = rng.choice(UNICODE_RANGES)
    while True:
        c = chr(rng.randint(lo, hi))
        if unicodedata.category(c) != "Cs":
            return c


def random_fragment(rng):
    r = rng.random()
    if r < 0.40:
        w = rng.choice(WORDS)
        if rng.random() < 0.15:
            w = w.capitalize() if rng.random() < 0.7 else w.upper()
        return w
    if r < 0.52:
        return rng.choice(WS)
    if r < 0.62:
        return rng.choice(PUNCT) * rng.choice([1, 1, 1, 2, 3])
    if r < 0.72:
        return str(rng.randint(0, 10 ** rng.randint(1, 14)))
    if r < 0.86:
        return "".join(random_char(rng) for _ in range(rng.randint(1, 6)))
    if r < 0.94:
        return rng.choice(SPECIAL_FRAGS)
    if r < 0.97:
        return rng.choice(["\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f44d\U0001f3ff", "\u2764\ufe0f",
                           "\U0001f1fa\U0001f1f8", "e\u0301", "\u200d", "\ufe0f", "\u00a0"])
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(10, 60)))


def random_strings(rng, n):
    out = []
    for _ in range(n):
        k = rng.choice([1, 1, 2, 3, 4, 6, 8, 12, 20, 30])
        parts = []
        for _ in range(k):
            parts.append(random_fragment(rng))
            if rng.random() < 0.55:
                parts.append(" ")
        s = "".join(parts)
        if rng.random() < 0.1:
            s = " " + s
        if rng.random() < 0.1:
            s = s + rng.choice([" ", "\n", "  ", "\t"])
        out.append(s)
    return out


def image_prompts(rng, n):
    """Strings containing '<image>' for tokenizer_image_token checks."""
    out = []
    for _ in range(n):
        k = rng.randint(1, 5)
        parts = [random_fragment(rng) for _ in range(k)]
        at = rng.randint(0, len(parts))
        parts.insert(at, IMAGE)
        if rng.random() < 0.2:
            parts.insert(rng.randint(0, len(parts)), IMAGE)
        sep = rng.choice(["", " ", "\n"])
        out.append(sep.join(parts))
    return out


def tokenizer_image_token(text, tok):
    """osprey/mm_utils.py::tokenizer_image_token (re-implemented): chunks encoded independently, BOS kept only on
    the first chunk, first id (BOS) of every later chunk dropped, chunks joined with IMAGE_TOKEN_INDEX."""
    chunks = [tok(c).input_ids for c in text.split(IMAGE)]
    keep_bos = bool(chunks and chunks[0] and chunks[0][0] == tok.bos_token_id)
    offset = 1 if keep_bos else 0
    ids = [chunks[0][0]] if keep_bos else []
    for i, c in enumerate(chunks):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(c[offset:])
    return ids


# ------------------------------------------------------------------------------------------------------------------
# Loading tokenizers exactly like Osprey
# ------------------------------------------------------------------------------------------------------------------
def load_osprey_tokenizer(path, use_fast):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, use_fast=use_fast, model_max_length=2048, padding_side="right")
    tok.pad_token = tok.unk_token
    tok.add_tokens([MASK, POS], special_tokens=True)
    if tok.convert_tokens_to_ids(MASK) != MASK_ID or tok.convert_tokens_to_ids(POS) != POS_ID:
        raise SystemExit("<mask>/<pos> did not get ids 32000/32001")
    return tok


def compare_refs(refs, encoders):
    """encoders: name -> callable(text) -> ids without BOS.  Returns {name: [indices that mismatch]}"""
    res = {}
    for name, enc in encoders.items():
        res[name] = [i for i, r in enumerate(refs) if list(enc(r["text"])) != r["ids"]]
    return res


def build_corpus(slow, fast):
    rng = random.Random(SEED)
    texts = handwritten_strings()
    image_texts = [t for t in texts if IMAGE in t]
    extra_image = image_prompts(rng, max(0, 60 - len(image_texts)))
    texts += extra_image
    seen = set()
    uniq = []
    for t in texts:
        if t not in seen:
            seen.add(t)
            uniq.append(t)
    while len(uniq) < N_CORPUS:
        for t in random_strings(rng, N_CORPUS - len(uniq)):
            if t not in seen:
                seen.add(t)
                uniq.append(t)
    texts = uniq

    entries = []
    n_image = 0
    n_decoded = 0
    decode_every = max(1, len(texts) // 200)
    for i, t in enumerate(texts):
        e = {"text": t, "ids": slow(t).input_ids}
        fids = fast(t).input_ids
        if fids != e["ids"]:
            e["ids_fast"] = fids
        if IMAGE in t and n_image < 60:
            e["image_token_ids"] = tokenizer_image_token(t, slow)
            fimg = tokenizer_image_token(t, fast)
            if fimg != e["image_token_ids"]:
                e["image_token_ids_fast"] = fimg
            n_image += 1
        if i % decode_every == 0 and n_decoded < 200:
            e["decoded"] = slow.decode(e["ids"], skip_special_tokens=True)
            fdec = fast.decode(e["ids"], skip_special_tokens=True)
            if fdec != e["decoded"]:
                e["decoded_fast"] = fdec
            n_decoded += 1
        entries.append(e)

    random_decode = []
    pool = list(range(3, 259)) * 1 + [0, 1, 2, MASK_ID, POS_ID, 29871, 13, 259, 1678]
    for _ in range(60):
        k = rng.randint(1, 12)
        ids = [rng.choice(pool) if rng.random() < 0.5 else rng.randint(259, 31999) for _ in range(k)]
        d = {"ids": ids, "decoded": slow.decode(ids, skip_special_tokens=True)}
        fd = fast.decode(ids, skip_special_tokens=True)
        if fd != d["decoded"]:
            d["decoded_fast"] = fd
        random_decode.append(d)
    return entries, random_decode


def summarize_disagreements(entries):
    diff = [e for e in entries if "ids_fast" in e]
    with_special = sum(1 for e in diff if MASK in e["text"] or POS in e["text"])
    img = [e for e in entries if "image_token_ids_fast" in e]
    dec = [e for e in entries if "decoded_fast" in e]
    return {"entries": len(entries), "ids_differ": len(diff), "ids_differ_with_mask_or_pos": with_special,
            "ids_differ_without_mask_or_pos": [e["text"] for e in diff if MASK not in e["text"]
                                               and POS not in e["text"]][:20],
            "image_token_ids_differ": len(img), "decoded_differ": len(dec)}


def check_only(out_dir):
    """Load the fixture with the installed transformers (fast and, if available, slow) and compare."""
    import transformers

    with open(os.path.join(out_dir, "corpus.json"), encoding="utf-8") as f:
        corpus = json.load(f)
    with open(os.path.join(out_dir, "llamacpp_refs.json"), encoding="utf-8") as f:
        refs = json.load(f)
    print(f"transformers {transformers.__version__}")
    for use_fast in (True, False):
        try:
            tok = load_osprey_tokenizer(out_dir, use_fast)
        except Exception as exc:  # transformers 5 has no slow LlamaTokenizer
            print(f"use_fast={use_fast}: cannot load ({type(exc).__name__}: {exc})")
            continue
        print(f"use_fast={use_fast}: {type(tok).__name__}")
        bad_refs = [r["text"] for r in refs if tok.encode(r["text"], add_special_tokens=False) != r["ids"]]
        print(f"  llama.cpp refs matching: {len(refs) - len(bad_refs)}/{len(refs)}  mismatches: {bad_refs[:5]!r}")
        entries = corpus["entries"]
        vs_slow = vs_fast = 0
        examples = []
        for e in entries:
            ids = tok(e["text"]).input_ids
            vs_slow += ids == e["ids"]
            ok_fast = ids == e.get("ids_fast", e["ids"])
            vs_fast += ok_fast
            if not ok_fast and len(examples) < 5:
                examples.append(e["text"])
        print(f"  corpus ids == slow(4.31): {vs_slow}/{len(entries)};  == fast(4.31): {vs_fast}/{len(entries)}")
        print(f"  first fast(4.31) mismatches: {examples!r}")
        img = [e for e in entries if "image_token_ids" in e]
        ok = sum(tokenizer_image_token(e["text"], tok) == e.get("image_token_ids_fast", e["image_token_ids"])
                 for e in img)
        print(f"  image_token_ids == fast(4.31): {ok}/{len(img)}")
        dec = [e for e in entries if "decoded" in e]
        ok = sum(tok.decode(e["ids"], skip_special_tokens=True) == e.get("decoded_fast", e["decoded"]) for e in dec)
        print(f"  decoded == fast(4.31): {ok}/{len(dec)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp-models", default=".cache-llm/llama.cpp/models",
                    help="folder holding ggml-vocab-llama-spm.gguf(.inp/.out)")
    ap.add_argument("--out", default=OUT_DIR)
    ap.add_argument("--check-only", action="store_true", help="only check an existing fixture directory")
    args = ap.parse_args()
    if args.check_only:
        check_only(args.out)
        return

    import sentencepiece as spm
    import tokenizers
    import transformers
    from transformers.convert_slow_tokenizer import import_protobuf

    if transformers.__version__ != "4.31.0":
        print(f"warning: reference is transformers 4.31.0 (Osprey's pin), found {transformers.__version__}",
              file=sys.stderr)

    for name, want in LLAMACPP_SHA256.items():
        got = sha256_file(os.path.join(args.llama_cpp_models, name))
        if got != want:
            raise SystemExit(f"{name}: sha256 {got} != {want}")
    gguf_path = os.path.join(args.llama_cpp_models, GGUF_NAME)
    pieces, scores, types, meta = read_gguf_vocab(gguf_path)
    if (meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id"),
            meta.get("tokenizer.ggml.unknown_token_id")) != (1, 2, 0):
        raise SystemExit(f"unexpected special ids in gguf: {meta}")

    pb2 = import_protobuf()
    proto = build_model_proto(pieces, scores, types, pb2)
    blob = proto.SerializeToString(deterministic=True)
    blob_sha = hashlib.sha256(blob).hexdigest()
    identical = len(blob) == META_TOKENIZER_SIZE and blob_sha == META_TOKENIZER_SHA256
    print(f"tokenizer.model: {len(blob)} bytes sha256 {blob_sha} "
          f"({'byte-identical to' if identical else 'DIFFERENT from'} Meta's LLaMA-2 tokenizer.model)")
    if not identical:
        raise SystemExit("rebuilt tokenizer.model is not Meta's file; refusing to write fixtures")

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tokenizer.model"), "wb") as f:
        f.write(blob)
    for name, obj in config_files().items():
        write_json(os.path.join(args.out, name), obj)

    # ---- checks against llama.cpp's references ----
    refs = read_llamacpp_refs(args.llama_cpp_models)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(args.out, "tokenizer.model"))
    slow = load_osprey_tokenizer(args.out, use_fast=False)
    fast = load_osprey_tokenizer(args.out, use_fast=True)
    print(f"slow: {type(slow).__name__} legacy={getattr(slow, 'legacy', None)}; fast: {type(fast).__name__}; "
          f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, "
          f"sentencepiece {spm.__version__}")
    mism = compare_refs(refs, {
        "sentencepiece": lambda t: sp.encode(t),
        "slow": lambda t: slow.encode(t, add_special_tokens=False),
        "fast": lambda t: fast.encode(t, add_special_tokens=False),
    })
    for name, bad in mism.items():
        print(f"llama.cpp refs: {name}: {len(refs) - len(bad)}/{len(refs)} match"
              + (f"; mismatches: {[refs[i]['text'] for i in bad]!r}" if bad else ""))
    # a known LLaMA-2 tokenisation (transformers LlamaTokenizer docstring)
    assert slow("Hello this is a test").input_ids == [1, 15043, 445, 338, 263, 1243]
    if any(mism.values()):
        raise SystemExit("a tokenizer does not reproduce llama.cpp's references")
    # plain list, as llama.cpp wrote it: HF AutoTokenizer(meta-llama/Llama-2-7b-hf).encode(text,
    # add_special_tokens=False), i.e. ids WITHOUT BOS
    write_json(os.path.join(args.out, "llamacpp_refs.json"), refs, compact_lists=True)

    # ---- corpus ----
    entries, random_decode = build_corpus(slow, fast)
    summary = summarize_disagreements(entries)
    print("slow/fast disagreements:", json.dumps(summary, ensure_ascii=False))
    header = dict(CORPUS_DOC)
    header["versions"] = {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                          "sentencepiece": spm.__version__}
    header["seed"] = SEED
    header["counts"] = {"entries": len(entries), "ids_fast": summary["ids_differ"],
                        "image_token_ids": sum("image_token_ids" in e for e in entries),
                        "image_token_ids_fast": summary["image_token_ids_differ"],
                        "decoded": sum("decoded" in e for e in entries),
                        "decoded_fast": summary["decoded_differ"], "random_decode": len(random_decode)}
    header["random_decode"] = random_decode
    header["entries"] = entries
    write_json(os.path.join(args.out, "corpus.json"), header, compact_lists=True)

    for name in sorted(os.listdir(args.out)):
        p = os.path.join(args.out, name)
        print(f"{name:28s} {os.path.getsize(p):9d}  {sha256_file(p)}")


if __name__ == "__main__":
    main()
