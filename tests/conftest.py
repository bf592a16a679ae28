import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or long test (CI runs them)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped with the reason on machines without one "
                                       "(run them there with: python benchmarks/gpu_check.py --out DIR)")


NO_CUDA_REASON = ("needs a CUDA GPU and torch.cuda.is_available() is False here; on a GPU machine run "
                  "`python benchmarks/gpu_check.py --out DIR` (or `pytest -m cuda`)")


def pytest_collection_modifyitems(config, items):
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_items:
        return
    import pytest
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason=NO_CUDA_REASON)
        for item in cuda_items:
            item.add_marker(skip)
