"""``tools/prepare_data.py``: tokenize and pack a corpus ahead of training, outside any job's clock."""

from __future__ import annotations

import sys
from pathlib import Path

from deus_dist.cli.args import tool_main
from deus_dist.configs import PrepareDataConfig
from deus_dist.extras import requires

DESCRIPTION = """\
Tokenize and pack a corpus into the cache launchers/cpt.py reads, with several tokenizer processes,
before any training job starts: a job that finds its cache ready starts training at once instead of
tokenizing while GPUs wait. The cache key is the same as the launcher's (source content, text
field, tokenizer, --seq_len, held-out split), so `cpt.py` with the same --data, --data_cache,
--seq_len, --text_field and held-out options reuses the result untouched.

examples:
  python tools/prepare_data.py --model upscaled/Llama-3.2-1B-opt-deus-24L --data corpus/ \\
      --data_cache /shared/cache --seq_len 2048 --num_proc 32
  python tools/prepare_data.py --data wiki.jsonl --seq_len 256 --data_cache runs/cpt/data_cache
"""

DEFAULT_SEQ_LEN = 2048
DEFAULT_CACHE = "runs/cpt/data_cache"  # cpt.py's default OUTPUT_DIR/data_cache


def run(cfg: PrepareDataConfig, log=print) -> Path:
    import dataclasses
    import time

    from deus_dist.checkpoint.hub import context_problems, model_context
    from deus_dist.embedded import model_or_default
    from deus_dist.errors import Problems
    from deus_dist.outputs import Input, output_problems
    from deus_dist.train.data import TextPipeline
    from deus_dist.train.pipeline import cache_folder

    problems = Problems()
    model_dir = problems.attempt(lambda: model_or_default(cfg.model, progress=not cfg.quiet))
    # the default never exceeds the model's context; a --seq_len that does is an error
    seq_len = cfg.seq_len or min(DEFAULT_SEQ_LEN, (model_dir and model_context(model_dir)) or DEFAULT_SEQ_LEN)
    cfg = dataclasses.replace(cfg, seq_len=seq_len)
    problems.items += cfg.problems()
    pipeline, spec = TextPipeline(), None
    if model_dir is not None:
        problems.items += context_problems(model_dir, seq_len)
        spec = problems.attempt(lambda: pipeline.spec(cfg, model_dir))
    root = Path(cfg.data_cache or DEFAULT_CACHE)
    inputs = [Input("--model", model_dir), Input("--data", cfg.data), Input("--eval_data", cfg.eval_data)]
    problems.items += output_problems(root, "--data_cache", "dir", inputs)
    problems.raise_if_any()
    existed = cache_folder(spec, root).exists()
    start = time.perf_counter()
    folder = pipeline.build(spec, model_dir, root, num_proc=cfg.num_proc, log=log, progress=not cfg.quiet)
    data = pipeline.open(folder, seed=0)
    if existed:
        log(
            f"already prepared: {folder} ({len(data.train):,} training and {len(data.eval):,} held-out blocks)"
        )
    else:
        log(f"wrote {folder} in {time.perf_counter() - start:.1f} s")
    data_flag = f" --data {cfg.data}" if cfg.data else ""
    log(
        f"train on it with: launchers/cpt.py{data_flag} --data_cache {root} --seq_len {seq_len} (same held-out options)"
    )
    return folder


@requires("train", "prepare_data.py")
def main(argv: list[str] | None = None) -> int:
    return tool_main("prepare_data.py", PrepareDataConfig, DESCRIPTION, run, argv)


if __name__ == "__main__":
    sys.exit(main())
