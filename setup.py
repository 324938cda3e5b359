from setuptools import find_packages, setup

setup(
    name="deus-dist",
    version="0.1.0",
    description="Depth up-scaling of pretrained LMs (OpT-DeUS and baselines) and ZeRO-3 training of the new layers",
    python_requires=">=3.10",
    packages=find_packages(include=["deus_dist", "deus_dist.*"]),
    package_data={"deus_dist": ["architectures/*.json"]},
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
        # training: the measured stack (DESIGN.md section 5); the checkpoint layout is DeepSpeed's
        "deepspeed>=0.19.8,<0.20",
        "datasets>=3.0",
        # checkpoints that ship only tokenizer.model (Llama 2, Mistral v0.1, Gemma): transformers
        # converts them to fast tokenizers with these two
        "sentencepiece>=0.2",
        "protobuf>=4",
        # tools/eval_tasks.py: lm-eval's task definitions and scoring (pinned: scores must not move)
        "lm-eval==0.4.13",
        "matplotlib>=3.7",  # tools/study.py's plots
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.6"],
        "tensorboard": ["tensorboard>=2.15"],  # optional: metrics also go to RUN_DIR/tensorboard
        # mergekit is an external reference for tools/bench_fuse.py only (LGPL: never imported
        # by deus_dist).
        "bench": ["mergekit==0.1.5"],
    },
)
