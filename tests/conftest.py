"""Test setup shared by every file.

Triton kernels run on a CPU-only machine under its interpreter, which must be switched on before
any kernel module is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))
