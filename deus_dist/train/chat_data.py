"""Instruction data: conversations in three formats, a chat template, assistant-only targets, packing.

Records are normalized to ``[{role, content}]`` (system?, then user/assistant alternating; a
trailing user turn is removed); a malformed record (non-alternating turns, empty or non-string
content, an unknown role, no assistant turn) is dropped and counted, never fatal. Each
conversation is rendered with the chat template and tokenized once; the targets are the tokens of
every assistant turn, its end-of-turn marker included (or every token, ``--train_on_prompt``). The
assistant spans are found by rendering the conversation turn by turn: the text the template adds
for assistant turn k is ``render(turns[:k+1])`` minus ``render(turns[:k], add_generation_prompt)``,
so any template that renders a conversation as the concatenation of its turns works.

A conversation longer than ``seq_len`` is cut after its last whole assistant turn that fits, or
dropped. With packing, conversations are laid end to end into ``seq_len`` rows, each with position
ids from 0 (transformers then builds a block-diagonal causal mask, or uses FlashAttention's varlen
path, given a micro-batch as one row: ``train.model.model_inputs``), and a conversation's first
token is never a target, so nothing is learned across conversations. Without packing each row
holds one conversation, padded; padding is never a target.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from deus_dist.data_sources import Source, open_dataset, source_identity
from deus_dist.errors import UserError
from deus_dist.hf_logging import quiet_transformers
from deus_dist.train.pipeline import (
    EVAL,
    EVAL_FRACTION,
    IGNORE,
    SEQ_LEN,
    TOKENIZER,
    TRAIN,
    CacheKey,
    KeyPart,
    PackedData,
    Spec,
    Split,
    build_cache,
    map_sources,
    read_meta,
    sources_of,
    tokenizer_identity,
)

FORMAT = 1
EMBEDDED_CHAT = "embedded:sharegpt"
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The built-in --chat_template chatml. Where the tokenizer lacks <|im_start|>/<|im_end|> as tokens
they are tokenized as text (the model still learns to end its turns with them)."""
ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}
"""ShareGPT's ``from`` values (and the chat roles) mapped to chat roles; anything else is unknown."""
PROBE = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]
# -- records -> conversations -----------------------------------------------------------------------


FORMAT_FIELDS = {
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
}
"""The fields each --format reads, in the order auto-detection tries them."""


def _fields(fmt: str) -> str:
    return " + ".join(f"'{f}'" for f in FORMAT_FIELDS[fmt])


def detect_format(columns: list[str], label: str) -> str:
    for fmt, fields in FORMAT_FIELDS.items():
        if all(f in columns for f in fields):
            return fmt
    raise UserError(
        f"--data: {label} is in no format sft.py reads (fields found: {', '.join(columns) or 'none'}); it needs "
        "'conversations' (ShareGPT: [{from, value}]), 'messages' ([{role, content}]) or 'instruction' + 'output' "
        "(Alpaca); rename the fields or pass --format"
    )


def resolve_format(fmt: str, columns: list[str], label: str) -> str:
    """``--format``, detected when auto; an explicit one must find its fields in the data."""
    if fmt == "auto":
        return detect_format(columns, label)
    if all(f in columns for f in FORMAT_FIELDS[fmt]):
        return fmt
    found = next((f for f, fields in FORMAT_FIELDS.items() if all(c in columns for c in fields)), None)
    hint = f"pass --format {found} (or --format auto)" if found else "rename the fields"
    raise UserError(
        f"--format {fmt}: {label} has no {_fields(fmt)} field(s) (fields found: {', '.join(columns) or 'none'}); "
        + hint
    )


def to_conversation(record: dict, fmt: str) -> tuple[list[dict] | None, str]:
    """(messages, status): status "ok", "trimmed" (a trailing user turn removed), or why the record
    is dropped."""
    if fmt == "alpaca":
        instruction, extra, output = record.get("instruction"), record.get("input"), record.get("output")
        if extra is None:
            extra = ""
        if not all(isinstance(x, str) for x in (instruction, extra, output)):
            return None, "empty or non-string content"
        prompt = instruction.strip() + (f"\n\n{extra.strip()}" if extra.strip() else "")
        turns = [("user", prompt), ("assistant", output)]
    else:
        key, role_key, content_key = (
            ("conversations", "from", "value") if fmt == "sharegpt" else ("messages", "role", "content")
        )
        raw = record.get(key)
        if not isinstance(raw, list) or not raw:
            return None, "no turns"
        turns = []
        for turn in raw:
            if not isinstance(turn, dict):
                return None, "a turn that is not an object"
            role = ROLES.get(str(turn.get(role_key, "")).lower())
            if role is None:
                return None, "unknown role"
            turns.append((role, turn.get(content_key)))
    if any(not isinstance(c, str) or not c.strip() for _, c in turns):
        return None, "empty or non-string content"
    status = "ok"
    while turns and turns[-1][0] != "assistant":  # a question with no answer teaches nothing
        turns.pop()
        status = "trimmed"
    body = turns[1:] if turns and turns[0][0] == "system" else turns
    if not body:
        return None, "no assistant turn"
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if [r for r, _ in body] != expected[: len(body)]:
        return None, "non-alternating turns"
    return [{"role": r, "content": c} for r, c in turns], status


# -- conversation -> tokens and targets ------------------------------------------------------------


class TemplateError(Exception):
    pass


def resolve_template(tokenizer, option: str | None, model: str) -> str:
    """The template text --chat_template names: the tokenizer's, the built-in chatml, or a file."""
    if option is None:
        if not tokenizer.chat_template:
            raise UserError(
                f"--chat_template: the model {model} has no chat template; pass --chat_template chatml or a "
                "Jinja template file"
            )
        template = tokenizer.chat_template
        return (
            template if isinstance(template, str) else template.get("default", next(iter(template.values())))
        )
    if option == "chatml":
        return CHATML
    path = Path(option).expanduser()
    if not path.is_file():
        raise UserError(f"--chat_template: {option} is neither 'chatml' nor a Jinja template file")
    return path.read_text()


class ChatEncoder:
    """Renders a conversation with a chat template and finds its target tokens."""

    def __init__(self, tokenizer, template: str, *, seq_len: int, train_on_prompt: bool, truncation: str):
        self.tokenizer, self.template = tokenizer, template
        self.seq_len, self.train_on_prompt, self.truncation = seq_len, train_on_prompt, truncation

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """(text, spans): the rendered conversation and the character span of each assistant turn
        (what the template adds for it after the generation prompt, trailing whitespace excluded)."""
        text = self.render(messages)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = self.render(messages[:k], True), self.render(messages[: k + 1])
            if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
                raise TemplateError(
                    "the template does not render a conversation as the concatenation of its turns"
                )
            spans.append((len(before), max(len(through.rstrip()), len(before) + 1)))
        return text, spans

    def encode(self, messages: list[dict]) -> tuple[list[int], list[int], str]:
        """(ids, labels, status): status "ok", "cut" (after the last whole assistant turn that fits),
        or "too long" (dropped: nothing to learn fits)."""
        text, spans = self.assistant_spans(messages)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        labels = [IGNORE] * len(ids)
        turn_ends, j = [], 0
        for i, (start, _) in enumerate(offsets):
            while j < len(spans) and start >= spans[j][1]:
                j += 1
            if j < len(spans) and spans[j][0] <= start:
                labels[i] = ids[i]
                if not turn_ends or turn_ends[-1][0] != j:
                    turn_ends.append([j, i + 1])
                turn_ends[-1][1] = i + 1
        if self.train_on_prompt:
            labels = list(ids)
        if ids:
            labels[0] = IGNORE  # no context inside its conversation: never a target, packed or not
        status = "ok"
        if len(ids) > self.seq_len:
            fitting = [end for _, end in turn_ends if end <= self.seq_len]
            if self.truncation == "drop" or not fitting:
                return [], [], "too long"
            ids, labels, status = ids[: fitting[-1]], labels[: fitting[-1]], "cut"
        return ids, labels, status

    def check(self) -> None:
        """Refuse a template that cannot be trained on, on a probe conversation."""
        try:
            text, spans = self.assistant_spans(PROBE)
        except TemplateError as e:
            raise UserError(
                f"--chat_template: {e}; pass --chat_template chatml or another template"
            ) from None
        except Exception as e:  # jinja raises many types
            raise UserError(f"--chat_template: the template fails on a plain conversation: {e}") from None
        answers = [m["content"] for m in PROBE if m["role"] == "assistant"]
        if len(spans) != len(answers) or any(
            a not in text[s:e] for a, (s, e) in zip(answers, spans, strict=True)
        ):
            raise UserError(
                "--chat_template: the template renders no assistant turn (its output does not contain the "
                "assistant's words where they belong); pass --chat_template chatml or another template"
            )


# -- the pipeline ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatSpec(Spec):
    """What to encode: the sources, the template and the settings that make up the cache key."""

    format: str
    template: str
    """The template's text (the key holds a digest of it)."""
    train_on_prompt: bool
    packing: bool
    truncation: str
    KEY: ClassVar[CacheKey] = CacheKey(
        KeyPart("kind", None, lambda s: "chat"),
        TRAIN,
        KeyPart("format", "--format"),
        KeyPart(
            "template", "--chat_template", lambda s: hashlib.sha256(s.template.encode()).hexdigest()[:16]
        ),
        KeyPart("train_on_prompt", "--train_on_prompt"),
        KeyPart("packing", "--packing"),
        KeyPart("truncation", "--truncation"),
        EVAL,
        EVAL_FRACTION,
        SEQ_LEN,
        TOKENIZER,
        KeyPart("version", None, lambda s: FORMAT),
    )


def _chat_source(value: str | None, option: str, split: str) -> Source:
    if value is None:
        return Source(f"the embedded ShareGPT V3 subset ({split})", {"source": EMBEDDED_CHAT, "split": split})
    return source_identity(value, option, split)


def _open_chat(src: Source, option: str, scratch: Path):
    if src.key.get("source") == EMBEDDED_CHAT:
        import datasets

        from deus_dist.embedded import sharegpt_split

        return datasets.Dataset.from_list(sharegpt_split(src.key["split"]))
    return open_dataset(src, None, option, scratch)


class RowWriter:
    """Lays encoded conversations into ``seq_len`` rows (packed end to end, or one per row) and
    writes them: ids, labels, positions, plus per-row lengths and target counts."""

    def __init__(self, folder: Path, name: str, seq_len: int, pad: int, packing: bool):
        self.files = {k: open(folder / f"{name}_{k}.bin", "wb") for k in ("ids", "labels", "pos")}
        self.seq_len, self.pad, self.packing = seq_len, pad, packing
        self.lengths: list[int] = []
        self.counts: list[int] = []
        self.current: list[tuple[list[int], list[int]]] = []
        self.used = self.conversations = self.tokens = 0

    def add(self, ids: list[int], labels: list[int]) -> None:
        self.conversations += 1
        self.tokens += len(ids)
        if self.current and (not self.packing or self.used + len(ids) > self.seq_len):
            self.flush()
        self.current.append((ids, labels))
        self.used += len(ids)

    def flush(self) -> None:
        if not self.current:
            return
        ids = [t for c, _ in self.current for t in c]
        labels = [t for _, c in self.current for t in c]
        pos = [p for c, _ in self.current for p in range(len(c))]
        fill = self.seq_len - len(ids)
        self.lengths.append(len(ids))
        self.counts.append(sum(1 for t in labels[1:] if t != IGNORE))
        arrays = {
            "ids": ids + [self.pad] * fill,
            "labels": labels + [IGNORE] * fill,
            "pos": pos + list(range(fill)),  # padding is a sequence of its own
        }
        for k, values in arrays.items():
            self.files[k].write(np.asarray(values, dtype=np.int32).tobytes())
        self.current, self.used = [], 0

    def close(self) -> int:
        self.flush()
        for f in self.files.values():
            f.close()
        return len(self.lengths)


class ChatPipeline:
    """sft.py's data: conversations -> chat template -> targets on assistant turns -> rows."""

    key_options = ChatSpec.KEY.options

    def check_sources(self, cfg) -> None:
        sources_of(cfg, _chat_source)

    def spec(self, cfg, model_dir: Path) -> ChatSpec:
        from deus_dist.checkpoint.hub import load_tokenizer

        train, held = sources_of(cfg, _chat_source)
        tokenizer = load_tokenizer(model_dir)
        template = resolve_template(tokenizer, cfg.chat_template, str(model_dir))
        ChatEncoder(
            tokenizer, template, seq_len=cfg.seq_len, train_on_prompt=False, truncation="turn"
        ).check()
        return ChatSpec(
            train=train,
            eval=held,
            eval_fraction=cfg.eval_fraction,
            seq_len=cfg.seq_len,
            tokenizer=tokenizer_identity(model_dir),
            format=cfg.format,
            template=template,
            train_on_prompt=cfg.train_on_prompt,
            packing=cfg.packing,
            truncation=cfg.truncation,
        )

    def build(
        self, spec: ChatSpec, model_dir: Path, root: Path, *, num_proc=None, log=print, progress=False
    ) -> Path:
        def fill(tmp: Path, scratch: Path) -> dict:
            from datasets import Sequence, Value
            from tqdm import tqdm

            from deus_dist.checkpoint.hub import load_tokenizer

            start = time.perf_counter()
            log(
                f"encoding {spec.train.label} with the chat template into {spec.seq_len}-token rows (once) into {root}"
            )
            tokenizer = load_tokenizer(model_dir)
            pad = (
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
            )
            encoder = ChatEncoder(
                tokenizer,
                spec.template,
                seq_len=spec.seq_len,
                train_on_prompt=spec.train_on_prompt,
                truncation=spec.truncation,
            )
            writers = {n: RowWriter(tmp, n, spec.seq_len, pad, spec.packing) for n in ("train", "eval")}
            stats: Counter = Counter()
            mapped = map_sources(
                spec,
                _open_chat,
                lambda ds, src: _record_encoder(
                    encoder, resolve_format(spec.format, ds.column_names, src.label)
                ),
                scratch=scratch,
                features={
                    "ids": Sequence(Value("int32")),
                    "labels": Sequence(Value("int32")),
                    "held": Value("bool"),
                    "status": Value("string"),
                },
                desc="encoding conversations",
                num_proc=num_proc,
                progress=progress,
            )
            try:
                with quiet_transformers(True):  # the tokenizer warns about texts above model_max_length
                    for _, _, encoded in mapped:
                        with tqdm(
                            total=len(encoded),
                            desc="laying out rows",
                            unit="conv",
                            disable=not progress,
                            file=sys.stderr,
                        ) as bar:
                            for row in encoded:
                                stats[row["status"]] += 1
                                if row["ids"]:
                                    writers["eval" if row["held"] else "train"].add(row["ids"], row["labels"])
                                bar.update(1)
            finally:
                rows = {n: w.close() for n, w in writers.items()}
            for n, w in writers.items():
                np.save(tmp / f"{n}_lengths.npy", np.asarray(w.lengths, dtype=np.int32))
                np.save(tmp / f"{n}_counts.npy", np.asarray(w.counts, dtype=np.int64))
            kept = writers["train"].conversations + writers["eval"].conversations
            dropped = {k: v for k, v in stats.items() if k not in ("ok", "cut", "trimmed")}
            if writers["train"].conversations == 0:
                reasons = ", ".join(f"{v} {k}" for k, v in dropped.items()) or "no records"
                raise UserError(f"--data: no usable conversation in {spec.train.label} ({reasons})")
            if rows["eval"] == 0:
                raise UserError(
                    "--eval_data/--eval_fraction: no held-out conversation is left; raise --eval_fraction or pass "
                    "a larger --eval_data"
                )
            seconds = time.perf_counter() - start
            meta = {
                "rows": rows,
                "conversations": {n: w.conversations for n, w in writers.items()},
                "tokens": {n: w.tokens for n, w in writers.items()},
                "targets": {n: int(sum(w.counts)) for n, w in writers.items()},
                "statuses": dict(stats),
                "seconds": round(seconds, 3),
            }
            fill_share = sum(writers["train"].lengths) / max(1, rows["train"] * spec.seq_len)
            drops = "; ".join(f"{v} {k}" for k, v in sorted(dropped.items())) or "none"
            log(
                f"kept {kept:,} of {sum(stats.values()):,} conversations ({stats['cut']:,} cut after their last whole "
                f"assistant turn that fits, {stats['trimmed']:,} without their unanswered last question); dropped: "
                f"{drops}"
            )
            log(
                f"{rows['train']:,} training rows ({writers['train'].conversations:,} conversations, "
                f"{meta['targets']['train']:,} target tokens, {100 * fill_share:.0f}% of the rows filled) and "
                f"{rows['eval']:,} held-out rows, in {seconds:.1f} s"
            )
            return meta

        return build_cache(spec, root, fill)

    def export_files(self, spec: ChatSpec) -> dict[str, str]:
        """The exported model carries the template it was trained with."""
        return {"chat_template.jinja": spec.template}

    def open(self, folder: Path, seed: int) -> PackedData:
        folder = Path(folder)
        meta = read_meta(folder)
        seq_len = meta["seq_len"]

        def split(name: str) -> Split:
            rows = meta["rows"][name]

            def mapped(kind: str) -> np.ndarray:
                return np.memmap(
                    folder / f"{name}_{kind}.bin", dtype=np.int32, mode="r", shape=(rows, seq_len)
                )

            return Split(
                ids=mapped("ids"),
                labels=mapped("labels"),
                positions=mapped("pos") if meta["packing"] else None,
                lengths=None if meta["packing"] else np.load(folder / f"{name}_lengths.npy"),
                counts=np.load(folder / f"{name}_counts.npy"),
            )

        return PackedData(split("train"), split("eval"), seed, ChatSpec.KEY.saved(meta))


def _record_encoder(encoder: ChatEncoder, fmt: str):
    """``fn(record, held)`` for ``map_sources``: a record's ids, labels and status (why it is
    dropped, cut or trimmed; a dropped record keeps its row, with no ids, to be counted)."""

    def encode(record, held):
        messages, status = to_conversation(record, fmt)
        ids, labels = [], []
        if messages is not None:
            try:
                ids, labels, cut = encoder.encode(messages)
            except TemplateError:
                ids, labels, cut = [], [], "not rendered incrementally by the template"
            if cut != "ok":
                status = cut
        return {"ids": ids, "labels": labels, "held": bool(held), "status": status}

    return encode
