"""Settings: presets (``paper`` / ``quick``) plus ``key=value`` overrides, typed by the default.

Every command that fits or trains resolves its settings here and prints what it used.
"""
from __future__ import annotations

import json
import math
from fractions import Fraction
from typing import Any, Mapping, Sequence

from ue_dist.errors import UserError

# every method has paper and quick; imagenet (REM's ImageNet-subset settings) only where a
# method defines it: the method's resolve names its own valid presets
PRESETS = ("paper", "quick", "imagenet")


class SettingsError(UserError, ValueError):
    """A preset, key or value that cannot be used; the message names it."""


def check_keys(got: Any, valid: Any, where: str, error: type[Exception] = SettingsError) -> None:
    """A spec section must be a mapping whose keys are all valid; a typo names the valid keys."""
    if not isinstance(got, Mapping):
        raise error(f"{where} must be a mapping with keys: {', '.join(sorted(valid))}")
    unknown = sorted(set(got) - set(valid))
    if unknown:
        raise error(f"unknown key(s) {', '.join(map(repr, unknown))} in {where}; "
                    f"valid keys: {', '.join(sorted(valid))}")


def parse_radius(value: Any, name: str = "eps") -> float:
    """Parse ``8/255``, ``0.03`` or a number into a float radius: finite and >= 0 (NaN and inf are
    always refused). Bounds that depend on the setting are ``check_radius``'s."""
    if isinstance(value, bool):
        raise SettingsError(f"{name}: expected a number or a fraction like 8/255, got {value!r}")
    if isinstance(value, (int, float)):
        out = float(value)
    else:
        text = str(value).strip()
        try:
            out = float(Fraction(text)) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError, OverflowError):
            raise SettingsError(
                f"{name}: expected a number or a fraction like 8/255, got {value!r}") from None
    if not math.isfinite(out) or out < 0:
        raise SettingsError(f"{name}: must be a finite number >= 0, got {value!r}")
    return out


def is_radius(key: str) -> bool:
    """Settings that are radii: ``eps``, ``*_eps`` (adv_eps, at_eps, eval_eps), ``rho*``."""
    return key == "eps" or key.endswith("_eps") or key.startswith("rho")


_VICTIM_L2 = ("adv_eps", "eval_eps", "adv_step_size")  # radii in the victim's adv_norm ball


def check_radius(key: str, value: Any, settings: Mapping[str, Any] | None = None,
                 what: str = "settings") -> float | None:
    """The one place radii are validated (``resolve_settings`` and ``Method`` call it).

    * ``eps`` (the protection's radius): an L-inf radius on the [0, 1] pixel scale, so in
      (0, 1]; with ``norm: l2`` (bayes) an L2 radius, which may exceed 1: finite and > 0.
    * ``*_eps`` / ``rho*`` (adversarial-training radii of source models and victims, evaluation
      radii): L-inf, in [0, 1]; 0 turns the adversary off; None where the default allows it.
      A victim with ``adv_norm: l2`` (REM App. E) has L2 radii (``adv_eps``, ``eval_eps``,
      ``adv_step_size``): finite and >= 0, e.g. 100/255.

    NaN and inf are always refused; the message names the setting and the valid range.
    """
    if value is None and key != "eps":
        return None
    where = f"{key} for {what}"
    if value is None or isinstance(value, bool):
        raise SettingsError(f"{where} must be a number or a fraction like 8/255, got {value!r}")
    radius = parse_radius(value, key) if not isinstance(value, (int, float)) else float(value)
    settings = settings or {}
    l2 = str(settings.get("norm", "linf")).lower() == "l2" if key == "eps" else \
        key in _VICTIM_L2 and str(settings.get("adv_norm", "linf")).lower() == "l2"
    if key == "eps" and l2:
        ok, valid = math.isfinite(radius) and radius > 0, "a finite number > 0 (an L2 radius)"
    elif l2:
        ok, valid = math.isfinite(radius) and radius >= 0, \
            "a finite number >= 0 (an L2 radius, adv_norm l2; 0 = off)"
    elif key == "eps":
        ok, valid = math.isfinite(radius) and 0 < radius <= 1, \
            "a finite number in (0, 1] (an L-inf radius on the [0, 1] pixel scale, e.g. 8/255)"
    else:
        ok, valid = math.isfinite(radius) and 0 <= radius <= 1, \
            "a finite number in [0, 1] (an L-inf radius on the [0, 1] pixel scale; 0 = off)"
    if not ok:
        why = " (a radius is non-negative)" if radius < 0 else ""
        raise SettingsError(f"{where} must be {valid}, got {value!r}{why}")
    return radius


def validate_radii(settings: Mapping[str, Any], what: str = "settings") -> dict[str, Any]:
    """``settings`` with every radius parsed and checked by ``check_radius``."""
    out = dict(settings)
    for key in out:
        if is_radius(key):
            out[key] = check_radius(key, out[key], out, what)
    return out


def _coerce(key: str, raw: str, default: Any) -> Any:
    text = raw.strip()
    if default is None:
        if text.lower() in ("none", "null", ""):
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"--set {key}: expected true/false, got {raw!r}")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise SettingsError(f"--set {key}: expected an integer, got {raw!r}") from None
    if isinstance(default, float):
        return parse_radius(text, f"--set {key}") if "/" in text else _float(key, text)
    if isinstance(default, (list, tuple)):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = [v for v in text.split(",") if v]
        if not isinstance(value, list):
            raise SettingsError(f"--set {key}: expected a list, got {raw!r}")
        return value
    return text


def _float(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SettingsError(f"--set {key}: expected a number, got {text!r}") from None


def parse_overrides(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise SettingsError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = value
    return out


def resolve_settings(presets: Mapping[str, Mapping[str, Any]], preset: str = "paper",
                     overrides: Sequence[str] | Mapping[str, Any] = (),
                     what: str = "settings") -> dict[str, Any]:
    """Start from ``presets[preset]`` and apply overrides; unknown keys are an error.

    ``overrides`` is either ``["key=value", ...]`` (strings, typed by the default) or a mapping
    of already-typed values (job specs, Tune trials).
    """
    if preset not in presets:
        raise SettingsError(
            f"unknown preset {preset!r} for {what}; valid: {', '.join(sorted(presets))}")
    settings = dict(presets[preset])
    if isinstance(overrides, Mapping):
        typed = dict(overrides)
        raw: dict[str, str] = {}
    else:
        typed = {}
        raw = parse_overrides(overrides)
    for key in list(raw) + list(typed):
        if key not in settings:
            raise SettingsError(
                f"unknown setting {key!r} for {what}; valid: {', '.join(sorted(settings))}")
    for key, value in raw.items():
        settings[key] = _coerce(key, value, settings[key])
    settings.update(typed)
    return validate_radii(settings, what)
