"""Architecture descriptions: which tensor of a decoder block lives in which space.

Each family is one JSON file in this folder (see ``llama.json`` for the schema). A file may
``extend`` another: its ``block`` entries are added to the parent's, other keys replace the
parent's. Adding a family is adding a file; no code here knows any family by name.

Beyond the Llama block, a description can say:
- ``"rows": ["q_heads", "kv_heads", "kv_heads"]``: a fused tensor (Phi-3's ``qkv_proj``,
  GPT-2's ``c_attn``) whose rows are consecutive blocks, each in its own space; every unit of
  every block has the same number of rows (so a block holds units(space) x that many rows);
- ``"transposed": true``: the tensor is stored [in, out] (GPT-2's ``Conv1D``); ``rows`` and
  ``cols`` still name the spaces of its outputs and inputs;
- ``"layer_type": "linear_attention"`` with the family's ``layer_type_list``: the tensor exists
  only in layers of that type (a hybrid such as Bamba); ``layer_index_lists`` are config fields
  listing the indices of layers of one type (rewritten for the new layout);
- ``config_names``: this family's config.json name for a standard field (GPT-2's ``n_layer``).
- a block key holding ``{expert}`` (a mixture-of-experts block): one tensor per routed expert;
  ``expert_count`` names the config fields that may hold the number of experts, and
  :func:`architecture_for` expands the keys for the checkpoint's config (each expanded role knows
  its ``expert`` and ``template``); ``requires`` lists config values the description assumes (a
  checkpoint whose config says otherwise is refused, naming the field; ``requires_why`` says why).
- for the memory planner's activation terms: ``"fp32_norm_gains": true`` (the RMSNorms multiply
  their gain in fp32, as Gemma's and OLMo-2's do) and ``"pre_norm": false`` (a post-norm block,
  OLMo-2's: no norm reads the layer input).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources

from deus_dist.errors import UserError


@dataclass(frozen=True)
class TensorRole:
    """What one block tensor is: the space of its rows (and columns, for matrices)."""

    rows: str | tuple[str, ...]
    """The space of the rows (outputs), or of each block of rows of a fused tensor."""
    cols: str | None = None
    optional: bool = False
    output: bool = False
    """Writes into the residual stream: zero it and the block becomes an identity map."""
    norm: bool = False
    expert: int | None = None
    """The routed expert the tensor belongs to (set when a ``{expert}`` key is expanded)."""
    template: str | None = None
    """The block key it was expanded from (``mlp.experts.{expert}.up_proj.weight``)."""
    transposed: bool = False
    """Stored [in, out] (GPT-2's Conv1D) instead of [out, in]."""
    layer_type: str | None = None
    """Present only in layers of this type (the family's ``layer_type_list``); None: in every layer."""

    def __post_init__(self):
        if isinstance(self.rows, list):
            object.__setattr__(self, "rows", tuple(self.rows))

    @property
    def row_spaces(self) -> tuple[str, ...]:
        """The spaces of the row blocks (one for an unfused tensor)."""
        return self.rows if isinstance(self.rows, tuple) else (self.rows,)

    def spaces(self) -> set[str]:
        return {*self.row_spaces, *((self.cols,) if self.cols else ())}


EXPERT = "{expert}"


@dataclass(frozen=True)
class Architecture:
    family: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    layer_prefix: str
    block: dict[str, TensorRole]
    per_layer_lists: tuple[str, ...] = ()
    """Config fields holding one entry per layer (rewritten in the output's layer order)."""
    layer_prefix_counts: tuple[str, ...] = ()
    """Config fields counting a prefix of the layers (like Qwen2's ``max_window_layers``)."""
    embeddings: tuple[str, ...] = ("model.embed_tokens.weight", "lm_head.weight")
    """Parameter names of the token embeddings and the output head (frozen unless asked)."""
    expert_count: tuple[str, ...] = ()
    """Config fields that may hold the number of routed experts (the first present is used)."""
    requires: dict = field(default_factory=dict)
    """Config values the description assumes (absent fields take transformers' default)."""
    requires_why: dict = field(default_factory=dict)
    """Why, per ``requires`` field, for the refusal (default: every decoder layer of one kind)."""
    config_names: dict[str, str] = field(default_factory=dict)
    """This family's config.json key for a standard field (GPT-2: ``num_hidden_layers`` is
    ``n_layer``), as the config class's ``attribute_map`` says."""
    layer_type_list: str | None = None
    """Config attribute (as transformers resolves it) giving each layer's type, for families
    whose layers of different types hold different tensors (``TensorRole.layer_type``)."""
    layer_index_lists: tuple[str, ...] = ()
    """Config fields listing the indices of the layers of one type (Bamba's ``attn_layer_indices``)."""
    fp32_norm_gains: bool = False
    """Its RMSNorms multiply their gain in fp32 (the memory planner: a trainable norm keeps its
    normalised input in fp32, not in the compute dtype)."""
    pre_norm: bool = True
    """A layer's first norm reads the layer input (False for a post-norm block such as OLMo-2's)."""
    _layer_re: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        pattern = re.compile(re.escape(self.layer_prefix) + r"(\d+)\.(.+)$")
        object.__setattr__(self, "_layer_re", pattern)

    def split_name(self, name: str) -> tuple[int, str] | None:
        """``model.layers.3.mlp.up_proj.weight`` -> ``(3, "mlp.up_proj.weight")``; None if global."""
        m = self._layer_re.match(name)
        return (int(m.group(1)), m.group(2)) if m else None

    def layer_name(self, index: int, suffix: str) -> str:
        return f"{self.layer_prefix}{index}.{suffix}"

    def output_suffixes(self) -> set[str]:
        return {s for s, r in self.block.items() if r.output}

    def experts(self) -> dict[int, dict[str, str]]:
        """Expert -> {template: suffix} for every expert tensor of an expanded block."""
        out: dict[int, dict[str, str]] = {}
        for suffix, role in self.block.items():
            if role.expert is not None:
                out.setdefault(role.expert, {})[role.template] = suffix
        return dict(sorted(out.items()))

    def routed_share(self, config: dict) -> float:
        """The share of a routed expert's tensors one token uses: ``num_experts_per_tok`` of the
        layer's experts (1 without experts). FLOPs count a routed expert tensor by this share."""
        experts = len(self.experts())
        return config.get("num_experts_per_tok", experts) / experts if experts else 1.0

    def is_routed(self, suffix: str) -> bool:
        """Whether a layer tensor (its name after the layer prefix) belongs to a routed expert."""
        role = self.block.get(suffix)
        return role is not None and role.expert is not None

    def for_config(self, config: dict, option: str = "--model") -> Architecture:
        """The description with its ``{expert}`` keys expanded for ``config``; a UserError if the
        config contradicts ``requires`` or lacks the expert count."""
        problems = [
            f"{option}: config.json has {name}={config[name]!r}; the {self.family} description "
            f"supports only {name}={want!r} ({self.requires_why.get(name, 'every decoder layer of the same kind')})"
            for name, want in self.requires.items()
            if name in config and config[name] != want
        ]
        templates = [s for s in self.block if EXPERT in s]
        count = next((config[f] for f in self.expert_count if isinstance(config.get(f), int)), None)
        if templates and count is None:
            problems.append(f"{option}: config.json holds no expert count ({' or '.join(self.expert_count)})")
        if problems:
            raise UserError(problems)
        if not templates:
            return self
        block: dict[str, TensorRole] = {}
        for key, role in self.block.items():
            if EXPERT not in key:
                block[key] = role
                continue
            for e in range(count):
                block[key.replace(EXPERT, str(e))] = replace(role, expert=e, template=key)
        return replace(self, block=block)

    def config_key(self, name: str) -> str:
        """The config.json key of a standard field (``num_hidden_layers``) in this family."""
        return self.config_names.get(name, name)

    def config_value(self, config: dict, name: str, default=None):
        return config.get(self.config_key(name), default)

    def suffixes_of_type(self, layer_type: str | None) -> list[str]:
        """Block suffixes a layer of ``layer_type`` may hold (every suffix when the family has
        a single layer type)."""
        return [s for s, r in self.block.items() if r.layer_type is None or r.layer_type == layer_type]


def _load_raw(name: str) -> dict:
    path = resources.files(__package__).joinpath(f"{name}.json")
    raw = json.loads(path.read_text())
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    merged = _load_raw(parent)
    block = {**merged.get("block", {}), **raw.pop("block", {})}
    merged.update(raw)
    merged["block"] = block
    return merged


@cache
def all_architectures() -> tuple[Architecture, ...]:
    out = []
    for entry in sorted(resources.files(__package__).iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json"):
            continue
        raw = _load_raw(entry.name[: -len(".json")])
        raw.pop("_doc", None)
        out.append(
            Architecture(
                family=raw["family"],
                architectures=tuple(raw["architectures"]),
                model_types=tuple(raw["model_types"]),
                layer_prefix=raw["layer_prefix"],
                block={k: TensorRole(**v) for k, v in raw["block"].items()},
                per_layer_lists=tuple(raw.get("per_layer_lists", ())),
                layer_prefix_counts=tuple(raw.get("layer_prefix_counts", ())),
                expert_count=tuple(raw.get("expert_count", ())),
                requires=raw.get("requires", {}),
                requires_why=raw.get("requires_why", {}),
                config_names=dict(raw.get("config_names", {})),
                layer_type_list=raw.get("layer_type_list"),
                layer_index_lists=tuple(raw.get("layer_index_lists", ())),
                fp32_norm_gains=bool(raw.get("fp32_norm_gains", False)),
                pre_norm=bool(raw.get("pre_norm", True)),
                **({"embeddings": tuple(raw["embeddings"])} if "embeddings" in raw else {}),
            )
        )
    return tuple(out)


def supported_names() -> str:
    return ", ".join(f"{a.architectures[0]} ({a.model_types[0]})" for a in all_architectures())


def architecture_for(config: dict, option: str = "--model") -> Architecture:
    """The description matching an HF ``config.json`` dict (expanded for its experts, if any), or a
    UserError listing what is supported."""
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    for arch in all_architectures():
        if any(a in arch.architectures for a in archs):
            return arch.for_config(config, option)
    for arch in all_architectures():
        if not archs and model_type in arch.model_types:
            return arch.for_config(config, option)
    shown = archs[0] if archs else "?"
    raise UserError(
        f"{option}: unsupported architecture {shown} (model_type {model_type!r}); "
        f"supported: {supported_names()}. To add a family, describe its decoder block in "
        f"deus_dist/architectures/<family>.json (see llama.json for the schema)"
    )
