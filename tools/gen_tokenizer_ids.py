#!/usr/bin/env python3
"""Generate the expected token ids for easel-diffusion's tokenizer tests.

The Rust tokenizers (`crates/easel-diffusion/src/tokenizer.rs`) must give the
ids that transformers gives when diffusers loads a pipeline's tokenizers, that
is `getattr(transformers, <class in model_index.json>).from_pretrained(dir)`
(`CLIPTokenizer`, `T5Tokenizer`), called as the pipelines call it:

    tokenizer(prompt, padding="max_length", max_length=L, truncation=True)

This script writes:

* `tests/fixtures/generated/tokenizer_ids.json`: for every tokenizer folder in
  `tests/fixtures/models/*/tokenizer*` and `tests/fixtures/tokenizers/*`, each
  in the layouts it can be loaded from (`tokenizer.json` alone, or
  `vocab.json` + `merges.txt` alone, each with `tokenizer_config.json`), the
  padded ids of every prompt, the untruncated length
  (`len(tokenizer(prompt).input_ids)`) and the text diffusers reports as cut
  off (`batch_decode(untruncated_ids[:, L - 1 : -1])`);
* `tests/fixtures/generated/t5-spiece/`: a T5 tokenizer with a real vocabulary
  (the 600-piece SentencePiece model `tests/fixtures/tokenizers/t5-tiny/spiece.model`,
  with its `nmt_nfkc` precompiled normalizer), saved as `tokenizer.json` the
  way transformers 4.x's `T5Converter` wrote them (the layout of the published
  FLUX `tokenizer_2`). The fixture T5 tokenizers of the tiny FLUX models only
  know four pieces, so this one is what exercises the Unigram segmentation
  and the normalizer.

The prompt list is built in (ASCII, punctuation, numbers, unicode and emoji,
odd whitespace, case, special-token text, over-long prompts, the empty string)
plus every `prompt` / `negative_prompt` in `tests/fixtures/references/*.json`.

Rerun (from the repository root) after changing the prompt list or the
fixtures, with the reference Python stack (transformers 5.23, tokenizers 0.23):

    /tmp/refenv/bin/python tools/gen_tokenizer_ids.py

then `cargo test -p easel-diffusion --test tokenizer`.
"""

import glob
import json
import os
import shutil
import struct
import tempfile

import tokenizers
import transformers
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
OUT_DIR = os.path.join(FIXTURES, "generated")
OUT_JSON = os.path.join(OUT_DIR, "tokenizer_ids.json")
T5_SPIECE_DIR = os.path.join(OUT_DIR, "t5-spiece")

LONG = (
    "A breathtaking ultra-detailed matte painting of a sprawling cyberpunk city at dusk, "
    "neon signs reflecting in rain-soaked streets, flying cars, towering skyscrapers with "
    "holographic advertisements, crowds of people with umbrellas, steam rising from vents, "
    "volumetric lighting, cinematic composition, dramatic clouds, golden hour, 8k resolution, "
    "trending on artstation, by Greg Rutkowski and Syd Mead, octane render, unreal engine 5, "
    "highly detailed, sharp focus, intricate, elegant, award-winning photograph"
)

BUILTIN_PROMPTS = [
    "a photo of a cat",
    "A photo of a cat",
    "A PHOTO OF A CAT",
    "",
    " ",
    "   a   photo\tof\n\na  cat   ",
    "Hello, world! How's it going? I'm fine; you'll see: it's great.",
    "hello!!! world?! (masterpiece:1.2), [best quality], {detailed} <lora:foo:0.8>",
    "a!b ! !! !!! end!",
    "3 cats and 42 dogs, 1024x768, 3.14159, 2024-01-01, $100, 50%",
    "café naïve résumé Ünïcödé ÀÉÎÕÜ straße",
    "一只猫的照片，日本語のテキスト、한국어 텍스트",
    "emoji 🐱🐶🚀✨ 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "full\u3000width\u00a0nbsp\u2009thin space\u200bzero-width",
    "e\u0301 vs \u00e9, ﬁ ligature, ①②③, ＡＢＣ fullwidth",
    "<|startoftext|>a photo<|endoftext|> of a cat",
    "<|ENDOFTEXT|> upper-case special text <|endoftext|",
    "don't won't can't we've they're I'd she'll",
    "a photo of a cat, " * 12,
    LONG,
    LONG + " " + LONG,
    "x" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "<pad></s><unk> special text",
    "def main(self, config): return image.block(name='x')",
]

CLIP_LENGTHS = None  # model_max_length (77)
T5_LENGTHS = [8, 64]
T5_LONG_LENGTHS = [8, 64, 512]


def reference_prompts():
    prompts = []
    for path in sorted(glob.glob(os.path.join(FIXTURES, "references", "*.json"))):
        with open(path, encoding="utf-8") as f:
            case = json.load(f)
        if not isinstance(case, dict):
            continue
        for key in ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2"):
            value = case.get(key)
            if isinstance(value, str):
                prompts.append(value)
            elif isinstance(value, list):
                prompts.extend(v for v in value if isinstance(v, str))
    return prompts


def all_prompts():
    seen, out = set(), []
    for p in BUILTIN_PROMPTS + reference_prompts():
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


# --- the T5 fixture with a real vocabulary -----------------------------------


def _varint(b, i):
    r = s = 0
    while True:
        c = b[i]
        i += 1
        r |= (c & 0x7F) << s
        s += 7
        if c < 0x80:
            return r, i


def _fields(b):
    """Minimal protobuf wire-format reader: yields (field, wire type, value)."""
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(b, i)
        elif wire == 1:
            v, i = b[i : i + 8], i + 8
        elif wire == 5:
            v, i = b[i : i + 4], i + 4
        elif wire == 2:
            n, i = _varint(b, i)
            v, i = b[i : i + n], i + n
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield field, wire, v


def read_spiece(path):
    """(pieces [(piece, score)], unk_id, precompiled_charsmap) of a sentencepiece ModelProto."""
    with open(path, "rb") as f:
        data = f.read()
    pieces, unk_id, charsmap = [], None, b""
    for field, _, value in _fields(data):
        if field == 1:  # SentencePiece
            piece = {k: v for k, _, v in _fields(value)}
            text = piece[1].decode("utf-8")
            score = struct.unpack("<f", piece.get(2, b"\0\0\0\0"))[0]
            kind = piece.get(3, 1)
            if kind == 2:
                unk_id = len(pieces)
            pieces.append((text, score))
        elif field == 3:  # NormalizerSpec
            for k, _, v in _fields(value):
                if k == 2:
                    charsmap = v
    return pieces, unk_id, charsmap


def write_t5_spiece_fixture():
    """Build tests/fixtures/generated/t5-spiece as transformers 4.x's T5Converter did."""
    src = os.path.join(FIXTURES, "tokenizers", "t5-tiny")
    pieces, unk_id, charsmap = read_spiece(os.path.join(src, "spiece.model"))
    assert unk_id == 2, unk_id
    tok = Tokenizer(Unigram(pieces, unk_id=unk_id, byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(charsmap),
            normalizers.Strip(left=False, right=True),
            normalizers.Replace(Regex(" {2,}"), "▁"),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    os.makedirs(T5_SPIECE_DIR, exist_ok=True)
    tok.save(os.path.join(T5_SPIECE_DIR, "tokenizer.json"))
    shutil.copy(os.path.join(src, "tokenizer_config.json"), T5_SPIECE_DIR)
    return tok


# --- cases -------------------------------------------------------------------

SD2_LEGACY_DIR = os.path.join(OUT_DIR, "clip-sd2-legacy")


def write_sd2_legacy_fixture():
    """The config files of stable-diffusion-2-1's `tokenizer/`, written by old transformers.

    `tokenizer_config.json` says `pad_token: "<|endoftext|>"` while the legacy
    `special_tokens_map.json` says `"!"`; transformers lets the latter win, which
    is why SD 2.x pads with `!`. The vocabulary comes from clip-vit-large-patch14.
    """
    added = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    config = {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", "content": "<|startoftext|>", **added},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", **added},
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": "<|endoftext|>",
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", "content": "<|endoftext|>", **added},
    }
    special = {
        "bos_token": {"content": "<|startoftext|>", **added},
        "eos_token": {"content": "<|endoftext|>", **added},
        "pad_token": "!",
        "unk_token": {"content": "<|endoftext|>", **added},
    }
    os.makedirs(SD2_LEGACY_DIR, exist_ok=True)
    for name, value in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(SD2_LEGACY_DIR, name), "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2)
            f.write("\n")


CLIP_SOURCE = os.path.join("tokenizers", "clip-vit-large-patch14")


def clip_vocab(rel_dir):
    """The CLIP vocabulary and merges of a folder, from whichever layout it has."""
    d = os.path.join(FIXTURES, rel_dir)
    if os.path.exists(os.path.join(d, "tokenizer.json")):
        with open(os.path.join(d, "tokenizer.json"), encoding="utf-8") as f:
            model = json.load(f)["model"]
        merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
        return model["vocab"], merges
    with open(os.path.join(d, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(d, "merges.txt"), encoding="utf-8") as f:
        merges = [l.rstrip("\n") for l in f if l.strip() and not l.startswith("#version")]
    return vocab, merges


def layouts(rel_dir, cls):
    """The file sets a tokenizer folder is tested in: [(layout, files or None)].

    `files` maps a file name in the folder to load to its source under
    tests/fixtures; None means "the folder itself, as it is". A CLIP folder
    that ships one layout is also tested in the other, borrowing the files of
    clip-vit-large-patch14 (after checking that the vocabulary is the same).
    """
    files = set(os.listdir(os.path.join(FIXTURES, rel_dir)))
    has_json = "tokenizer.json" in files
    has_bpe = {"vocab.json", "merges.txt"} <= files
    configs = {n: os.path.join(rel_dir, n) for n in files if n.endswith(".json") and n != "tokenizer.json" and n != "vocab.json"}

    def borrowed(*names):
        return {n: os.path.join(CLIP_SOURCE, n) for n in names}

    def own(*names):
        return {n: os.path.join(rel_dir, n) for n in names}

    if not cls.startswith("CLIP"):
        return [("tokenizer.json", None)]
    same_vocab = clip_vocab(CLIP_SOURCE) == clip_vocab(rel_dir) if (has_json or has_bpe) else True
    if has_json and has_bpe:
        return [
            ("tokenizer.json", {**own("tokenizer.json"), **configs}),
            ("vocab+merges", {**own("vocab.json", "merges.txt"), **configs}),
        ]
    out = []
    if has_json:
        out.append(("tokenizer.json", None))
        if same_vocab:
            out.append(("vocab+merges", {**borrowed("vocab.json", "merges.txt"), **configs}))
    elif has_bpe:
        out.append(("vocab+merges", None))
        if same_vocab:
            out.append(("tokenizer.json", {**borrowed("tokenizer.json"), **configs}))
    else:  # clip-sd2-legacy: configs only
        out.append(("vocab+merges", {**borrowed("vocab.json", "merges.txt"), **configs}))
    return out


def load(cls_name, rel_dir, files):
    """Load as diffusers does; with `files`, from a folder assembled from those files."""
    cls = getattr(transformers, cls_name)
    if files is None:
        return cls.from_pretrained(os.path.join(FIXTURES, rel_dir))
    tmp = tempfile.mkdtemp()
    for name, src in files.items():
        shutil.copy(os.path.join(FIXTURES, src), os.path.join(tmp, name))
    try:
        return cls.from_pretrained(tmp)
    finally:
        shutil.rmtree(tmp)


def encode_case(tok, prompts, max_length):
    results = []
    for prompt in prompts:
        ids = tok(prompt, padding="max_length", max_length=max_length, truncation=True).input_ids
        untruncated = tok(prompt, padding="longest").input_ids
        assert len(ids) == max_length, (prompt, len(ids))
        truncated = len(untruncated) > max_length
        removed = tok.batch_decode([untruncated[max_length - 1 : -1]])[0] if truncated else None
        results.append(
            {"ids": ids, "untruncated_len": len(untruncated), "truncated_text": removed}
        )
    return results


def main():
    print(f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}")
    prompts = all_prompts()
    raw_t5 = write_t5_spiece_fixture()
    write_sd2_legacy_fixture()

    tok_dirs = []
    for model_dir in sorted(glob.glob(os.path.join(FIXTURES, "models", "*"))):
        with open(os.path.join(model_dir, "model_index.json"), encoding="utf-8") as f:
            index = json.load(f)
        for name in sorted(index):
            value = index[name]
            if name.startswith("tokenizer") and isinstance(value, list) and value[1]:
                tok_dirs.append((os.path.relpath(os.path.join(model_dir, name), FIXTURES), value[1]))
    for d in sorted(glob.glob(os.path.join(FIXTURES, "tokenizers", "*"))):
        with open(os.path.join(d, "tokenizer_config.json"), encoding="utf-8") as f:
            cls = json.load(f)["tokenizer_class"]
        tok_dirs.append((os.path.relpath(d, FIXTURES), cls))
    tok_dirs.append((os.path.relpath(SD2_LEGACY_DIR, FIXTURES), "CLIPTokenizer"))
    tok_dirs.append((os.path.relpath(T5_SPIECE_DIR, FIXTURES), "T5Tokenizer"))

    cases = []
    for rel_dir, cls in tok_dirs:
        kind = "clip" if cls.startswith("CLIP") else "t5"
        per_layout = {}
        for layout, files in layouts(rel_dir, cls):
            tok = load(cls, rel_dir, files)
            if kind == "clip":
                lengths = [tok.model_max_length]
            else:
                lengths = T5_LONG_LENGTHS if "t5-spiece" in rel_dir else T5_LENGTHS
            for max_length in lengths:
                results = encode_case(tok, prompts, max_length)
                cases.append(
                    {
                        "dir": rel_dir,
                        "class": cls,
                        "kind": kind,
                        "layout": layout,
                        "files": files,
                        "max_length": max_length,
                        "pad_id": tok.pad_token_id,
                        "results": results,
                    }
                )
                per_layout.setdefault(max_length, []).append(results)
        for max_length, all_results in per_layout.items():
            if any(r != all_results[0] for r in all_results[1:]):
                raise SystemExit(f"{rel_dir}: layouts disagree at max_length {max_length}")
        print(f"{rel_dir} ({cls}): {', '.join(l for l, _ in layouts(rel_dir, cls))}")

    # How the transformers 5 rebuild of the T5 pipeline differs from the raw tokenizer.json.
    t5 = load("T5Tokenizer", os.path.relpath(T5_SPIECE_DIR, FIXTURES), None)
    differ = [p for p in prompts if raw_t5.encode(p).ids != t5(p).input_ids]
    print(f"t5-spiece: raw tokenizer.json differs from transformers on {len(differ)} prompts: {differ[:3]}")

    os.makedirs(OUT_DIR, exist_ok=True)
    out = {
        "_generated_by": "tools/gen_tokenizer_ids.py",
        "_versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "prompts": prompts,
        "cases": cases,
    }
    with open(OUT_JSON, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {os.path.relpath(OUT_JSON, ROOT)}: {len(prompts)} prompts, {len(cases)} cases")


if __name__ == "__main__":
    main()
