from setuptools import find_packages, setup

# Dependencies by use: a user who only up-scales installs none of these.
TRAIN = [
    # launchers/cpt.py, launchers/sft.py, tools/prepare_data.py, tools/export_hf.py. The measured
    # stack is 0.19.8; 0.19.3 is the first release without ZeRO-3's crash on frozen parameters
    # under non-reentrant activation checkpointing (what training the new layers only does). The
    # checkpoint layout is DeepSpeed's, so the minor version stays pinned.
    "deepspeed>=0.19.3,<0.20",
    "datasets>=3.0",
]
EVAL = [
    # tools/eval_tasks.py: lm-eval's task definitions and scoring (pinned: scores must not move);
    # tools/eval_ppl.py reads its text with datasets
    "lm-eval==0.4.13",
    "datasets>=3.0",
]
STUDY = TRAIN + EVAL + ["matplotlib>=3.7"]  # tools/study.py runs every tool, then plots
ALL = sorted(set(STUDY))

setup(
    name="deus-dist",
    version="0.1.0",
    description="Depth up-scaling of pretrained LMs (OpT-DeUS and baselines) and ZeRO-3 training of the new layers",
    python_requires=">=3.10",
    packages=find_packages(include=["deus_dist", "deus_dist.*"]),
    # data read at run time wherever the package is installed (deus_dist/resources.py); the
    # repository's ds_configs/, studies/ and launchers/slurm/ are links to these folders
    package_data={
        "deus_dist": ["architectures/*.json", "ds_configs/*.json", "studies/*.yaml", "slurm/*.sbatch"]
    },
    # what up-scaling needs; training, evaluation and the study are extras (below)
    install_requires=[
        # torch is installed first by tools/install.sh (CPU build 2.13.0 here; keep your CUDA
        # build on a cluster). A bare "torch" would pull a multi-GB CUDA build onto a CPU machine.
        "torch>=2.4",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "huggingface_hub",
        "accelerate>=1.6",
        "gguf>=0.10",  # converts the embedded SmolLM2 GGUF into an HF checkpoint once
        "pyyaml>=6",
        "tqdm>=4.60",
        "psutil>=5.9",
        "numpy",
        "scipy>=1.10",  # exact assignment (linear_sum_assignment)
        "pot==0.9.7.post1",  # emd and the reference variant's Sinkhorn
        # checkpoints that ship only tokenizer.model (Llama 2, Mistral v0.1, Gemma): transformers
        # converts them to fast tokenizers with these two
        "sentencepiece>=0.2",
        "protobuf>=4",
    ],
    extras_require={
        # deus_dist/extras.py names the extra an entry point needs when one is missing (one line);
        # tests/test_package.py keeps its module list in step with these.
        "train": TRAIN,
        "eval": EVAL,
        "study": STUDY,
        "all": ALL,
        "dev": ["pytest>=8", "ruff>=0.6"],
        "tensorboard": ["tensorboard>=2.15"],  # optional: metrics also go to RUN_DIR/tensorboard
        # mergekit is an external reference for tools/bench_fuse.py only (LGPL: never imported
        # by deus_dist).
        "bench": ["mergekit==0.1.5"],
    },
    entry_points={
        "console_scripts": [
            "deus-fuse=deus_dist.cli.fuse:main",
            "deus-cpt=deus_dist.cli.train:main",
            "deus-sft=deus_dist.cli.sft:main",
            "deus-prepare-data=deus_dist.cli.prepare_data:main",
            "deus-export=deus_dist.cli.export:main",
            "deus-eval-ppl=deus_dist.cli.eval_ppl:main",
            "deus-eval-tasks=deus_dist.cli.eval_tasks:main",
            "deus-study=deus_dist.cli.study:main",
            "deus-plan-memory=deus_dist.cli.plan_memory:main",
        ]
    },
)
