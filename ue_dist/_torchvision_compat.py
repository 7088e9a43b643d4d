"""Make ``import torchvision`` work when its compiled extension does not match torch.

The registry ships a CUDA build of torchvision; with the CPU build of torch its ``_C``
extension cannot load, and torchvision's meta registrations then fail with
``operator torchvision::nms does not exist``. Defining the two op schemas it registers fakes
for lets the import succeed; models and transforms work, ``torchvision.ops``/``io`` do not.

This runs on ``import ue_dist`` in every process (Ray workers import the package before they
unpickle our functions), and only when the extension really fails to load.
"""
from __future__ import annotations

import glob
import importlib.util
import os

_fragment = None  # keeps the schema definitions alive for the life of the process


def _extension_loads(package_dir: str) -> bool:
    import torch

    candidates = glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(
        os.path.join(package_dir, "_C*.pyd"))
    if not candidates:
        return False
    try:
        torch.ops.load_library(candidates[0])
        return True
    except (OSError, RuntimeError):
        return False


def ensure_torchvision_importable() -> None:
    global _fragment
    if _fragment is not None:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    package_dir = list(spec.submodule_search_locations)[0]
    if _extension_loads(package_dir):
        return
    import torch

    try:
        torch.ops.torchvision.nms.default  # already defined by someone else
        return
    except (AttributeError, RuntimeError):
        pass
    _fragment = torch.library.Library("torchvision", "FRAGMENT")
    _fragment.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _fragment.define(
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
