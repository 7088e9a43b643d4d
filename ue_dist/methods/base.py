"""The one interface every protection method implements, its registry, and fitted state I/O.

A method is a small class (like an attack in torchattacks):

* ``declared``: every setting once (``core.settings.Setting``: kind, bounds, help); validation,
  radii (``8/255``), ``--set key=value`` parsing and the seed field come from it.
  ``presets``: ``{"paper": {...}, "quick": {...}}`` flat values of exactly those settings;
  ``eps`` always present (L-inf radius on the [0, 1] scale, or L2 where ``norm`` says so;
  an ``l0`` method also declares ``pixels``, the changed pixel locations allowed per image).
* ``kind``, ``year``, ``needs_labels``: what ``ue-dist methods`` lists (the family of the
  method, its paper's year, whether ``perturb`` needs each image's label).
* ``fit(train, ctx) -> state``: whatever must be learned first; ``state`` is a plain dict of
  tensors / numbers / strings that ``save_state`` writes to any fsspec URL and ``load_state``
  reads back with ``torch.load(weights_only=True)``.
* ``load(state, device)``: materialise the state (build modules) once per process / Ray actor.
* ``perturb(loaded, images, labels) -> delta``: images float ``B x C x H x W`` in [0, 1], labels
  ``B``; returns ``delta`` of the same shape within the method's bound (``bound()``: ``eps`` in
  its ``norm``) and ``images + delta`` in [0, 1]. Any batch of a shard can be perturbed on its own, so Ray Data streams shards
  through actors; for some methods the result depends on how samples are grouped into batches
  (EM/REM/TAP seed their PGD from the batch's content, Bayes ascends a batch-wise objective),
  which is why the pipeline (``ue_dist.pipeline``) fixes the batch size and order: the same
  inputs, settings and seed give the same bytes.

The epsilon contract (``ue_dist.core.quantize.apply_perturbation``) is applied by whoever writes
the protected images, never by the method, with the method's ``bound()``.
"""
from __future__ import annotations

import io
from typing import Any, ClassVar, Mapping, Sequence

import torch

from ue_dist.core.config import SettingsError, resolve_settings, validate_radii
from ue_dist.core.context import FitContext
from ue_dist.core.settings import (Setting, bind_fitted, check_declared, given_values,
                                   resolve_declared, same_value, seed_key)
from ue_dist.data import storage
from ue_dist.data.imageset import ImageSet
from ue_dist.errors import UserError

STATE_VERSION = 1


class StateError(UserError, ValueError):
    """A fitted-state file that cannot be used with this method, data or settings."""


class Method:
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: every setting, declared once (``core.settings.Setting``): kinds, bounds, help
    declared: ClassVar[dict[str, Setting]] = {}
    #: False for methods whose ``fit`` learns nothing (the state carries settings only).
    needs_fit: ClassVar[bool] = True
    #: the family (one of ``KINDS``), the paper's year, and whether ``perturb`` uses each image's
    #: label (a class-wise lookup, a label-dependent objective); ``ue-dist methods`` lists them
    kind: ClassVar[str] = ""
    year: ClassVar[int] = 0
    needs_labels: ClassVar[bool] = True

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self.settings = dict(settings) if settings is not None else self.resolve("paper")
        self.eps = float(self.settings["eps"])
        self.validate_settings()

    # the bound the epsilon contract enforces ---------------------------------------------------
    @property
    def norm(self) -> str:
        """``linf`` (default), ``l2`` or ``l0``: the norm ``eps`` (and ``pixels``) bound."""
        return str(self.settings.get("norm", "linf")).lower()

    def bound(self) -> dict[str, Any]:
        """The keyword arguments of ``core.quantize.apply_perturbation`` for this method's
        output: ``eps``, ``norm`` and, for ``l0``, ``pixels``."""
        out: dict[str, Any] = {"eps": self.eps, "norm": self.norm}
        if self.norm == "l0":
            out["pixels"] = int(self.settings["pixels"])
        return out

    # settings --------------------------------------------------------------------------------
    @classmethod
    def resolve(cls, preset: str = "paper",
                overrides: Sequence[str] | Mapping[str, Any] = ()) -> dict[str, Any]:
        if cls.declared:
            return resolve_declared(cls.declared, cls.presets, preset, overrides,
                                    what=f"method {cls.name!r}")
        return resolve_settings(cls.presets, preset, overrides, what=f"method {cls.name!r}")

    @classmethod
    def for_state(cls, state: Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any] = (),
                  preset: str | None = None, source: str = "state") -> "Method":
        """The method with the settings ``state`` was fitted with (what ``protect`` uses).

        ``overrides`` and a ``preset``'s values (``--set`` wins) change the settings declared
        ``protect_time``; for any other setting they must equal the fitted value, else a
        ``SettingsError`` names it and the fitted value (``core.settings.bind_fitted``)."""
        if state.get("method") != cls.name:
            raise StateError(f"{source} was fitted by method {state.get('method')!r}, "
                             f"not {cls.name!r}")
        fitted = state.get("settings")
        if not isinstance(fitted, Mapping):
            raise StateError(f"{_named(source)} holds no settings; refit it with `ue-dist fit`")
        what = f"method {cls.name!r}"
        if preset is not None and preset not in cls.presets:
            raise SettingsError(f"unknown preset {preset!r} for {what}; "
                                f"valid: {', '.join(sorted(cls.presets))}")
        given = {k: (v, f"--preset {preset}") for k, v in cls.presets.get(preset, {}).items()}
        if not cls.declared:  # undeclared settings: none is protect-time
            typed = resolve_settings({"fitted": dict(fitted)}, "fitted", overrides, what)
            given.update({k: (typed[k], "--set") for k in typed if typed[k] != fitted[k]})
            for key, (value, origin) in given.items():
                if not same_value(value, fitted.get(key)):
                    raise SettingsError(f"{origin} {key}={value!r} conflicts with {source}, fitted "
                                        f"with {key}={fitted.get(key)!r}: refit to change it")
            return cls(dict(fitted))
        # a setting added since the state was written: the behaviour it had then
        fitted = {**{k: d.legacy[0] for k, d in cls.declared.items() if d.legacy}, **fitted}
        origin = "--set" if not isinstance(overrides, Mapping) else "override"
        given.update({k: (v, origin) for k, v in given_values(cls.declared, overrides,
                                                              what).items()})
        _check_fitted_keys(cls, fitted, given, source)
        return cls(bind_fitted(cls.declared, fitted, given, what, source=_named(source)))

    @classmethod
    def seed_key(cls) -> str | None:
        """The declared setting that seeds the method (``seed``, ``noise_seed``), if any."""
        return seed_key(cls.declared)

    def validate_settings(self) -> None:
        """Raise ``SettingsError`` naming the option. Declared settings are checked against the
        declaration (kinds, bounds, radii by ``core.config.check_radius``); subclasses add only
        checks that involve several settings. A method without a declaration gets its radii
        (eps, *_eps, rho*) checked by name."""
        what = f"method {self.name!r}"
        if self.declared:
            self.settings = check_declared(self.declared, self.settings, what)
        else:
            validate_radii(self.settings, what)

    # the two verbs ------------------------------------------------------------------------------
    def fit(self, train: ImageSet, ctx: FitContext) -> dict[str, Any]:
        raise NotImplementedError

    def load(self, state: Mapping[str, Any], device: torch.device | str = "cpu") -> Any:
        """Return whatever ``perturb`` needs (modules on ``device``); default: the state itself."""
        return state

    def perturb(self, loaded: Any, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # whether ``predict`` gives labels (protect --labels predict): a state holding a classifier
    predicts: ClassVar[bool] = False

    def predict(self, loaded: Any, images: torch.Tensor) -> torch.Tensor:
        """Class labels (int64 ``B``) of float ``B x C x H x W`` images of the fitted shape, by
        the state's own classifier: the labels of unlabelled photos (``protect --labels
        predict``). Only for methods with ``predicts = True``."""
        raise StateError(f"method {self.name!r} has no classifier to predict labels with; "
                         "fit it with --labels cluster instead")

    # state -------------------------------------------------------------------------------------
    def new_state(self, train: ImageSet, **payload: Any) -> dict[str, Any]:
        return {"method": self.name, "version": STATE_VERSION, "settings": dict(self.settings),
                "image_shape": list(train.image_shape), "num_classes": int(train.num_classes),
                **payload}

    def check_state(self, state: Mapping[str, Any], image_shape: Sequence[int] | None = None,
                    source: str = "state") -> None:
        if getattr(self, "_finite_state", None) is not state:  # once per state object
            validate_state(state, source)
            if "labeller" in state:  # fit --labels cluster
                from ue_dist.core.pseudolabels import labeller_problem
                problem = labeller_problem(state["labeller"])
                if problem:
                    raise StateError(f"{_named(source)}: {problem}")
            self._finite_state = state
        got = state.get("method")
        if got != self.name:
            raise StateError(f"{source} was fitted by method {got!r}, not {self.name!r}")
        if image_shape is not None and list(state.get("image_shape", [])) != list(image_shape):
            raise StateError(f"{source} was fitted on images of shape {state.get('image_shape')} "
                             f"(C,H,W), but the data have shape {list(image_shape)}")

    def check_loadable(self, state: Mapping[str, Any], source: str = "state") -> None:
        """Materialise ``state`` once on the CPU (``load``): a state that lacks a key the method
        needs, or holds a value of the wrong type or shape, fails here with a ``StateError``
        naming ``source``, not with a KeyError in a worker. The driver calls it before any worker
        starts."""
        named = _named(source)
        try:
            self.load(state, "cpu")
        except StateError as exc:
            if source in str(exc):
                raise
            raise StateError(f"{named}: {_first_line(exc)}") from None
        except UserError:
            raise
        except KeyError as exc:
            raise StateError(f"{named} cannot be used by method {self.name!r}: it lacks the key "
                             f"{exc.args[0]!r} (not a complete {self.name} state?)") from None
        except (TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
            raise StateError(f"{named} cannot be used by method {self.name!r}: "
                             f"{type(exc).__name__}: {_first_line(exc)}") from None


def _check_fitted_keys(cls: type[Method], fitted: Mapping[str, Any],
                       given: Mapping[str, Any], source: str) -> None:
    """A state whose settings are not this method's declaration (written by another version)
    is refused by name; a missing protect-time setting may come from ``given``."""
    declared = cls.declared
    lacking = sorted(k for k in set(declared) - set(fitted)
                     if not (declared[k].protect_time and k in given))
    unknown = sorted(set(fitted) - set(declared))
    if lacking or unknown:
        parts = ([f"lack {', '.join(lacking)}"] if lacking else []) + \
            ([f"hold undeclared {', '.join(unknown)}"] if unknown else [])
        raise StateError(f"{_named(source)}: its settings {' and '.join(parts)} for method "
                         f"{cls.name!r} (fitted by another version of ue_dist?); refit it")


# registry ------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Method]] = {}
#: the method families ``ue-dist methods`` names
KINDS = ("error-minimising", "error-maximising", "generator", "bayes-error", "model-free")


def register(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_methods() -> None:
    import importlib
    import pkgutil

    import ue_dist.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"ue_dist.methods.{info.name}")


def method_names() -> list[str]:
    _load_builtin_methods()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    _load_builtin_methods()
    if name not in _REGISTRY:
        raise SettingsError(f"unknown method {name!r}; valid: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_method(name: str, preset: str = "paper",
                 overrides: Sequence[str] | Mapping[str, Any] = ()) -> Method:
    cls = get_method(name)
    return cls(cls.resolve(preset, overrides))


# state I/O ------------------------------------------------------------------------------------
def _named(source: str) -> str:
    return "state" if source in ("", "state") else f"state file {source!r}"


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join((str(exc).strip().splitlines() or [""])[0].split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def validate_state(state: Mapping[str, Any], source: str = "state") -> None:
    """Every tensor in ``state`` (through dicts, lists and tuples) and every number outside its
    ``settings`` is finite: a NaN / inf state (a diverged fit, a corrupt file) is refused with a
    ``StateError`` naming ``source`` and the entry."""
    import math

    def walk(obj: Any, where: str) -> None:
        if isinstance(obj, torch.Tensor):
            if (obj.is_floating_point() or obj.is_complex()) and obj.numel():
                finite = torch.isfinite(obj)
                if not bool(finite.all()):
                    raise StateError(f"{_named(source)}: {where or 'the state'} holds "
                                     f"{int((~finite).sum())} NaN/inf value(s) of {obj.numel()} "
                                     "(a diverged fit or a corrupt file); refit it")
        elif isinstance(obj, Mapping):
            for key, value in obj.items():
                if not (where == "" and key == "settings"):  # settings are validated as settings
                    walk(value, f"{where}.{key}" if where else repr(key))
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(value, f"{where}[{i}]")
        elif isinstance(obj, float) and not math.isfinite(obj):
            raise StateError(f"{_named(source)}: {where or 'the state'} is {obj} (not finite)")

    walk(state, "")


def save_state(state: Mapping[str, Any], url: str,
               storage_options: Mapping[str, Any] | None = None) -> None:
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    storage.write_bytes(url, buffer.getvalue(), storage_options)


def load_state(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read, parse and validate the state file at ``url``."""
    state = state_from_bytes(read_state_bytes(url, storage_options), url)
    validate_state(state, url)
    return state


def read_state_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    try:
        return storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise StateError(f"state file {url!r} does not exist") from None


def state_from_bytes(raw: bytes, url: str) -> dict[str, Any]:
    """Parse the bytes of a state file (``weights_only``) without validating the values:
    ``load_state`` validates, ``Method.check_state`` does so once per state object."""
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, pickled code ...
        # torch's own text advises weights_only=False, i.e. running the file's code: not repeated.
        text = str(exc)
        if "weights only" in text.lower() or "weights_only" in text or "GLOBAL" in text:
            import re

            wants = re.search(r"GLOBAL ([\w.]+)", text)
            raise StateError(
                f"state file {url!r} was refused: it holds objects a ue_dist state never holds "
                f"(pickled code or classes{', e.g. ' + wants.group(1) if wants else ''}), so it "
                "was not loaded; use a state written by `ue-dist fit`") from None
        raise StateError(f"state file {url!r} cannot be read ({type(exc).__name__}: "
                         f"{_first_line(exc, 160)}); is it truncated or not a ue_dist state?") from None
    if not isinstance(state, dict) or "method" not in state:
        raise StateError(f"state file {url!r} is not a ue_dist fitted state")
    return state

