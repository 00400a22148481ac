"""Evaluation of distilled sets: fresh classifiers trained on them, tested on real data.

``protocol`` holds the recipe (method.md section 5) and the results tables; ``networks`` the
ConvNet / ResNet classifiers; ``augment`` the device-side augmentation and CutMix.
``python -m ddfast.eval`` runs it from the command line.
"""

from ddfast.eval.protocol import (
    PROTOCOL_PRESETS,
    PROTOCOLS,
    Protocol,
    check_classes,
    epochs_for_ipc,
    evaluate,
    first_per_class,
    get_protocol,
    load_folder_set,
    load_source_set,
    mean_std,
    merge_tables,
    resolve_device,
    summarize_curve,
    write_results,
)

__all__ = [
    "PROTOCOLS",
    "PROTOCOL_PRESETS",
    "Protocol",
    "check_classes",
    "epochs_for_ipc",
    "evaluate",
    "first_per_class",
    "get_protocol",
    "load_folder_set",
    "load_source_set",
    "mean_std",
    "merge_tables",
    "resolve_device",
    "summarize_curve",
    "write_results",
]
