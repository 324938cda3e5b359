"""Which parameters train: the manifest's new layers, everything, or a regular expression."""

from __future__ import annotations

import re
from collections.abc import Iterable

from deus_dist.architectures import Architecture
from deus_dist.errors import UserError


def trainable_names(
    names: Iterable[str],
    spec: str,
    arch: Architecture,
    manifest: dict | None,
    train_embeddings: bool,
    model_option: str = "--model",
) -> list[str]:
    """Names of the parameters that train, in model order; never empty.

    ``new``: every parameter of the layers listed in the manifest's ``new_layers`` (nothing is
    inferred from names or strides); ``all``: every parameter; anything else: a regular
    expression searched in each name. Embeddings and the output head only with ``all``,
    ``train_embeddings``, or a regex that names them.
    """
    names = list(names)
    if spec == "new":
        if manifest is None:
            raise UserError(
                f"{model_option} has no deus_manifest.json, so its new layers are unknown: pass "
                "--trainable all or --trainable REGEX, or up-scale it with tools/fuse_layers.py"
            )
        new = set(manifest["new_layers"])
        chosen = [n for n in names if (s := arch.split_name(n)) is not None and s[0] in new]
    elif spec == "all":
        chosen = names
    else:
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise UserError(f"--trainable: {spec!r} is not a valid regular expression ({e})") from None
        chosen = [n for n in names if pattern.search(n)]
    if train_embeddings:
        chosen = [n for n in names if n in set(chosen) or n in arch.embeddings]
    if not chosen:
        raise UserError(f"--trainable {spec!r} matches no parameter (names look like {names[:2]})")
    return chosen
