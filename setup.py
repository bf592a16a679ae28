"""pma-dist: PMA optimizers (AdamW-PMA, Lion-PMA) for distributed post-training with DeepSpeed and FSDP.

Install torch first (on a CPU-only machine: ``pip install torch==2.13.0``): an unpinned ``torch``
requirement can pull a multi-GB CUDA build. See the README.
"""
from setuptools import find_packages, setup

setup(
    name="pma-dist",
    version="0.1.0",
    description="Periodical moving average (PMA) optimizers for DeepSpeed ZeRO and PyTorch FSDP",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pma_dist", "pma_dist.*"]),
    python_requires=">=3.10",
    # Floors are what the code uses: torch.distributed.fsdp.fully_shard is public from torch 2.6;
    # deepspeed.runtime.tensor_parallel.init_utils.load_ds_config from DeepSpeed 0.18.6 (the engine hooks
    # are tested on 0.19.8 only, see TESTED_DEEPSPEED_VERSIONS); from_pretrained(dtype=...) needs
    # transformers 4.56. The exact versions tested: launch/constraints.txt.
    install_requires=[
        "torch>=2.6",
        "deepspeed>=0.18.6",
        "transformers>=4.56",
        "datasets>=3.0",
        "accelerate>=1.0",
        "numpy",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        "mpi": ["mpi4py>=4.0"],  # 4.x wheels need no MPI compiler; launch/setup_env.sh adds an MPI if none
        "test": ["pytest>=8", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["pma-dist=pma_dist.comm.cli:main"]},
)
