"""The short Python API: every name is the documented object, and the README's example runs."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddfast
from ddfast.config import Config, resolve
from ddfast.dit_original import load_original, save_original
from ddfast.eval import evaluate, load_folder_set
from ddfast.memory import MemoryBank, minimax_terms
from ddfast.models import load_dit
from ddfast.sample import write_distilled
from ddfast.train import run


def test_names_are_the_documented_objects():
    assert ddfast.make_config is resolve and ddfast.run is run and ddfast.Config is Config
    assert ddfast.MemoryBank is MemoryBank and ddfast.minimax_terms is minimax_terms
    assert ddfast.evaluate is evaluate and ddfast.load_folder_set is load_folder_set
    assert ddfast.write_distilled is write_distilled
    assert ddfast.load_dit is load_dit and ddfast.load_original is load_original
    assert ddfast.save_original is save_original
    assert set(ddfast.__all__) <= set(dir(ddfast))
    with pytest.raises(AttributeError, match="the API is"):
        ddfast.no_such_thing  # noqa: B018


def test_import_stays_light():
    code = "import sys, ddfast; print('diffusers' in sys.modules, 'ddfast.train' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]


def test_the_readme_example_runs(tmp_path):
    cfg = ddfast.make_config("smoke", {"run.out": str(tmp_path / "api"), "run.progress": "off"})
    summary = ddfast.run(cfg)
    x, y, names = ddfast.load_folder_set(summary["distilled"], ipc=2)
    assert x.shape[0] == 20 and len(names) == 10
    gen = torch.Generator().manual_seed(0)
    test_x = torch.randint(0, 256, (30, 1, 8, 8), generator=gen, dtype=torch.uint8)
    result = ddfast.evaluate(x, y, test_x, torch.arange(30) % 10, networks=["convnet3"],
                             repeats=1, epochs=1, protocol="dc", device="cpu", seed=0)
    assert 0.0 <= result["networks"]["convnet3"]["best_mean"] <= 100.0
    bank = ddfast.MemoryBank(num_classes=10, dim=64)
    x0_hat = torch.randn(4, 64, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 2])
    bank.update(torch.randn(4, 64), x0_hat, labels)
    terms = bank.loss(x0_hat, labels)
    terms.total.backward()
    assert float(terms.total) > 0 and x0_hat.grad.abs().sum() > 0


def test_kernels_import_only_as_ddfast_kernels(tmp_path):
    """With the checkout's root on sys.path (an editable install puts it there, as does Python
    started in the checkout) the top-level name `kernels`, which another distribution owns,
    stays free; the Triton kernels import as ddfast.kernels."""
    root = str(Path(__file__).resolve().parents[1])  # the checkout
    probe = ("import sys; sys.path.insert(0, sys.argv[1])\n"
             "import ddfast.kernels\n"
             "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n"
             "    print('free', e.name)\nelse:\n    print('taken', kernels.__file__)\n")
    out = subprocess.run([sys.executable, "-c", probe, root], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["free", "kernels"]
