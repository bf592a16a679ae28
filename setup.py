"""pma-dist: PMA optimizers (AdamW-PMA, Lion-PMA) for distributed post-training with DeepSpeed and FSDP.

Install torch first (on a CPU-only machine: ``pip install torch==2.13.0``): an unpinned ``torch``
requirement can pull a multi-GB CUDA build. See the README.
"""
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# The opt-in PMA_DIST_AUTOLOAD=1 start-up hook (pma_dist/integrations/autoload.py): a .pth file must sit
# directly in site-packages, so it goes to the root of build_lib, which is the root of the wheel and,
# for `pip install -e .`, of the editable wheel too.
AUTOLOAD_PTH = Path("pma_dist", "integrations", "pma_dist_autoload.pth")


class BuildPyWithAutoload(build_py):
    def run(self):
        super().run()
        roots = [self.build_lib]
        if getattr(self, "editable_mode", False):
            # setuptools' editable wheel leaves build_lib out of the wheel; the wheel's root is install_lib
            roots.append(self.get_finalized_command("install").install_lib)
        for root in roots:
            target = Path(root, AUTOLOAD_PTH.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(AUTOLOAD_PTH, target)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [str(Path(self.build_lib, AUTOLOAD_PTH.name))]


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
        # the framework integrations of docs/integrations.md (tested: trl 1.16.0, peft 0.21.2)
        "integrations": ["trl>=1.16", "peft>=0.21"],
    },
    package_data={"pma_dist.integrations": [AUTOLOAD_PTH.name]},  # in the sdist, for build_py to copy
    cmdclass={"build_py": BuildPyWithAutoload},
    entry_points={"console_scripts": ["pma-dist=pma_dist.comm.cli:main"]},
)
