"""ddfast: diversity-driven generative dataset distillation with self-adaptive memory.

The short API (names load on first use, so ``import ddfast`` stays light)::

    import ddfast

    cfg = ddfast.make_config("digits", {"run.out": "runs/api", "optim.steps": 200})
    summary = ddfast.run(cfg)                    # fine-tune, sample, evaluate, report
    x, y, names = ddfast.load_folder_set(summary["distilled"], ipc=10)
    result = ddfast.evaluate(x, y, test_x, test_y, networks=["convnet3"], repeats=3,
                             epochs=0, protocol="dc", device="auto", seed=0)

    bank = ddfast.MemoryBank(num_classes=10, dim=4 * 32 * 32)   # the method's memories
    terms = bank.loss(x0_hat, labels)            # before the optimiser step
    bank.update(z0, x0_hat, labels)              # after it

``make_config`` resolves a preset with ``section.field`` overrides (``python -m ddfast.train
--help`` lists them); ``run`` is the whole job of ``python -m ddfast.train`` and returns its
summary; ``write_distilled`` samples a distilled set from any DiT; ``minimax_terms`` computes the
memory terms from raw tensors; ``load_dit`` (a diffusers folder) and ``load_original`` (an
original-layout ``.pt``) give a DiT with the original DiT's numerics, ``save_original`` writes one
back in that layout.
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

# public name -> (module, attribute); no name equals a submodule's (ddfast.config, ddfast.sample)
_API = {
    "Config": ("ddfast.config", "Config"),
    "make_config": ("ddfast.config", "resolve"),
    "run": ("ddfast.train", "run"),
    "write_distilled": ("ddfast.sample", "write_distilled"),
    "MemoryBank": ("ddfast.memory", "MemoryBank"),
    "ClassMemory": ("ddfast.memory", "ClassMemory"),
    "minimax_terms": ("ddfast.memory", "minimax_terms"),
    "evaluate": ("ddfast.eval", "evaluate"),
    "load_folder_set": ("ddfast.eval", "load_folder_set"),
    "load_dit": ("ddfast.models", "load_dit"),
    "load_original": ("ddfast.dit_original", "load_original"),
    "save_original": ("ddfast.dit_original", "save_original"),
    "DdfastError": ("ddfast.errors", "DdfastError"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'ddfast' has no attribute {name!r}; the API is "
                             f"{', '.join(sorted(_API))}")
    module, attr = _API[name]
    value = getattr(import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
