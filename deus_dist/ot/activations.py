"""Activation features of a layer's units on calibration text, one layer in memory at a time.

The base model is built with empty (meta) parameters; its embeddings and the layers needed are
filled from the checkpoint as the calibration hidden states advance through the stack, and each
layer goes back to meta after use. So memory is two layers plus the calibration hidden states,
whatever the model size. Both layers of a pair are run on the same input, the hidden states
entering the gap (the input the new block will see), so a permuted copy of a layer has exactly
permuted activations.
"""

from __future__ import annotations

import torch

from deus_dist.architectures import Architecture
from deus_dist.checkpoint import CheckpointReader
from deus_dist.checkpoint.blocks import read_block
from deus_dist.errors import UserError

SPACES = ("mlp", "q_heads", "kv_heads")


class _Capture(torch.nn.Module):
    """Stands in for a decoder layer: records the arguments the model passes it, changes nothing."""

    def __init__(self, store: list, as_tuple: bool = False):
        super().__init__()
        self.store = store
        self.as_tuple = as_tuple
        """Return (hidden_states, None), for models that unpack what a layer returns (Bamba)."""

    def forward(self, hidden_states, *args, **kwargs):
        self.store.append((hidden_states, args, kwargs))
        return (hidden_states, None) if self.as_tuple else hidden_states


def calibration_tokens(model_dir, data: str | None, tokens: int, seq_len: int = 256) -> torch.Tensor:
    """[batch, seq_len] token ids: documents tokenized, EOS appended, concatenated, cut."""
    from transformers import AutoTokenizer

    from deus_dist.data_sources import iter_documents
    from deus_dist.hf_logging import quiet_transformers

    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise UserError(
            f"--ot_cost activations: --model {model_dir} has no usable tokenizer ({str(e).splitlines()[0]})"
        ) from None
    seq_len = min(seq_len, tokens)
    ids: list[int] = []
    for doc in iter_documents(data, option="--calib_data", split="train"):
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if len(ids) >= tokens:
            break
    n = len(ids) // seq_len
    if n == 0:
        raise UserError(f"--calib_data: fewer than {seq_len} tokens of calibration text")
    return torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)


class ActivationRunner:
    def __init__(
        self, reader: CheckpointReader, arch: Architecture, input_ids: torch.Tensor, device: torch.device
    ):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from deus_dist.hf_logging import quiet_transformers

        self.reader, self.arch, self.device = reader, arch, device
        with quiet_transformers():
            config = AutoConfig.from_pretrained(reader.path)
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # The decoder is the module holding the layer list: "model" for "model.layers.",
        # "transformer" for GPT-2's "transformer.h."
        decoder_name, _, layers_attr = arch.layer_prefix.rstrip(".").rpartition(".")
        decoder = model.get_submodule(decoder_name)
        prefix = decoder_name + "."
        for name, _ in list(decoder.named_parameters()):
            if name.startswith(layers_attr + "."):
                continue
            module_name, _, pname = name.rpartition(".")
            module = decoder.get_submodule(module_name)
            value = reader.read(prefix + name).to(device, torch.float32)
            setattr(module, pname, torch.nn.Parameter(value, requires_grad=False))
        self.layers = list(getattr(decoder, layers_attr))
        # One pass with stand-in layers: the hidden states entering layer 0 and the arguments
        # (position embeddings, masks per layer type, ...) the model gives each layer.
        store: list = []
        for as_tuple in (False, True):
            store.clear()
            stand_ins = torch.nn.ModuleList(_Capture(store, as_tuple) for _ in self.layers)
            setattr(decoder, layers_attr, stand_ins)
            decoder.to(device)
            try:
                with torch.no_grad():
                    decoder(input_ids=input_ids.to(device), use_cache=False)
                break
            except (ValueError, TypeError):  # the model unpacks a layer's output: stand in with a tuple
                if as_tuple:
                    raise
        self.hidden = store[0][0]
        self.layer_args = [(args, kwargs) for _, args, kwargs in store]
        self.next_layer = 0

    def _run(
        self,
        index: int,
        block: dict[str, torch.Tensor],
        x: torch.Tensor,
        args_of: int,
        hooks: dict[str, dict] | None = None,
    ) -> torch.Tensor:
        layer = self.layers[index]
        layer.to_empty(device=self.device)
        layer.load_state_dict(block, strict=True)
        handles = []
        if hooks is not None:
            for suffix, role in self.arch.block.items():
                if not suffix.endswith(".weight") or suffix not in block:
                    continue
                moves_rows = any(sp in SPACES for sp in role.row_spaces)
                if moves_rows or role.cols in SPACES:
                    module = layer.get_submodule(suffix[: -len(".weight")])

                    def hook(mod, inp, out, suffix=suffix, moves_rows=moves_rows):
                        if moves_rows:
                            hooks[suffix] = out.reshape(-1, out.shape[-1]).T.contiguous()
                        else:
                            hooks[suffix] = inp[0].reshape(-1, inp[0].shape[-1])

                    handles.append(module.register_forward_hook(hook))
        args, kwargs = self.layer_args[args_of]
        try:
            with torch.no_grad():
                out = layer(x, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()
            layer.to("meta")
        return out[0] if isinstance(out, tuple) else out

    def features(self, lower: int, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
        """Activation features of layers ``lower`` (weights ``a``) and ``lower + 1`` (``b``), both
        on the hidden states entering layer ``lower + 1``."""
        if self.next_layer > lower + 1:
            raise RuntimeError("activation features must be requested in layer order")
        while self.next_layer <= lower:
            self.hidden = self._run(
                self.next_layer,
                read_block(self.reader, self.arch, self.next_layer, self.device),
                self.hidden,
                self.next_layer,
            )
            self.next_layer += 1
        fa: dict[str, torch.Tensor] = {}
        fb: dict[str, torch.Tensor] = {}
        self._run(lower, a, self.hidden, lower + 1, fa)
        self._run(lower + 1, b, self.hidden, lower + 1, fb)
        return fa, fb
