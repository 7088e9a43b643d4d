"""ue_dist: unlearnable examples for image datasets, at bucket scale, on Ray."""
from ue_dist._torchvision_compat import ensure_torchvision_importable as _ensure_tv

_ensure_tv()

__version__ = "0.1.0"
