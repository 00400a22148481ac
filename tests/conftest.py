"""Test setup shared by every file.

Triton kernels run on a CPU-only machine under its interpreter, which must be switched on before
any kernel module is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """One torch thread for the duration of a test.

    Tiny models gain nothing from threads, and on a loaded 2-core machine OpenMP's spinning
    threads slow each small op by orders of magnitude; the setting is restored afterwards.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
