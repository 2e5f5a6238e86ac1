import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_cfg(tmp_path: Path, config_name: str = "train", overrides: list[str] = ()):
    """Compose the real configs as a user's command line would, writing into tmp_path."""
    import dq.config  # noqa: F401  (stores the typed schemas every yaml starts from)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name, overrides=[f"paths.output_dir={tmp_path}",
                                               f"paths.cache_dir={tmp_path / 'cache'}", "logger=none",
                                               *overrides])


@pytest.fixture
def cfg_factory(tmp_path):
    return lambda *overrides, config_name="train": make_cfg(tmp_path, config_name, list(overrides))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _torch_one_thread():
    """Tests run on one torch thread: their ops are tiny, thread start-up costs more than the work, and two
    threads on a shared 2-core box thrash (a tiny UNet forward: 0.04 s on one thread, 2.7 s on two under
    load; the tiny method jobs of test_methods.py: 15 s instead of 95 s). Subprocesses get OMP_NUM_THREADS=1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
