"""Declared settings: each method (and the victim) states every setting once, typed, with its
bounds; validation, ``--set key=value`` parsing, radii (``8/255``) and the seed field all come
from the declaration.

A declaration is a mapping ``name -> Setting`` (plain dataclasses; the values themselves stay a
flat dict, the form states, job specs and Tune trials already carry). ``check_declared`` is the
whole generic validation: unknown or missing keys, types, choices, bounds, radii through
``core.config.check_radius``. A method's own ``validate_settings`` keeps only what involves
several settings at once (REM's ``rho_a < eps`` warning, GUE-AT's follower loss).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping

from ue_dist.core.config import SettingsError, check_radius, parse_radius

KINDS = ("int", "float", "bool", "str", "radius", "seed", "list", "any")


@dataclass(frozen=True)
class Setting:
    """One setting: its kind, what it means, and the values it may take.

    ``kind``: ``int``, ``float``, ``bool``, ``str``, ``radius`` (a float from ``8/255`` or a
    number, checked by ``check_radius``), ``seed`` (a non-negative integer; a method's seed is
    the setting of this kind), ``list`` or ``any``. ``low`` / ``high`` are inclusive bounds,
    ``above`` / ``below`` exclusive ones; ``choices`` the allowed strings; ``optional`` allows
    None (``none`` on the command line). ``protect_time``: the setting only steers how
    ``perturb`` computes the noise from the fitted state (PGD steps of the final noise, the
    precision of its forwards), so ``protect`` may change it; every other setting is fixed by
    the fit, and ``protect`` refuses a value that differs from the state's (``bind_fitted``).
    ``legacy``: for a setting added after states were written, ``(value,)`` -- what such a
    state was fitted with in effect (the behaviour before the setting existed); a state lacking
    the setting then takes it instead of being refused.
    """

    kind: str
    help: str = ""
    choices: tuple[str, ...] = ()
    low: float | None = None
    above: float | None = None
    high: float | None = None
    below: float | None = None
    optional: bool = False
    protect_time: bool = False
    legacy: tuple = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown setting kind {self.kind!r}; valid: {', '.join(KINDS)}")


def positive_int(help: str = "", protect_time: bool = False) -> Setting:
    return Setting("int", help, low=1, protect_time=protect_time)


def count(help: str = "", protect_time: bool = False) -> Setting:
    return Setting("int", help, low=0, protect_time=protect_time)


def positive(help: str = "", protect_time: bool = False) -> Setting:
    return Setting("float", help, above=0, protect_time=protect_time)


def non_negative(help: str = "") -> Setting:
    return Setting("float", help, low=0)


def fraction(help: str = "", above: float | None = 0.0) -> Setting:
    return Setting("float", help, above=above, high=1.0) if above is not None else \
        Setting("float", help, low=0.0, high=1.0)


def choice(*choices: str, help: str = "", protect_time: bool = False,
           legacy: tuple = ()) -> Setting:
    return Setting("str", help, choices=tuple(choices), protect_time=protect_time, legacy=legacy)


def seed_key(declared: Mapping[str, Setting]) -> str | None:
    """The name of the declared seed (``seed``, ``noise_seed``, ...), or None."""
    keys = [k for k, s in declared.items() if s.kind == "seed"]
    return keys[0] if keys else None


# parsing text (``--set key=value``) -----------------------------------------------------------
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_text(key: str, raw: str, setting: Setting) -> Any:
    """``--set key=value`` text as the declared kind (checked later by ``check_declared``)."""
    text = raw.strip()
    if setting.optional and text.lower() in ("none", "null", ""):
        return None
    kind = setting.kind
    try:
        if kind == "bool":
            if text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        if kind in ("int", "seed"):
            return int(text)
        if kind in ("radius", "float"):
            # a number or a fraction; its range (finite, >= 0, <= 1 ...) is check_value's to
            # judge, so the message names the setting's valid range
            return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise SettingsError(f"--set {key}: expected {_describe(setting)}, got {raw!r}") from None
    if kind == "list":
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = [v for v in text.split(",") if v]
        return value
    if kind == "any":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


# checking values ------------------------------------------------------------------------------
def _describe(setting: Setting) -> str:
    if setting.choices:
        return "one of " + ", ".join(setting.choices)
    return {"int": "an integer", "seed": "an integer >= 0", "float": "a number",
            "radius": "a number or a fraction like 8/255", "bool": "true or false",
            "list": "a list", "str": "a string", "any": "a value"}[setting.kind]


def _bounds(setting: Setting) -> str:
    parts = []
    if setting.low is not None:
        parts.append(f">= {setting.low:g}")
    if setting.above is not None:
        parts.append(f"> {setting.above:g}")
    if setting.high is not None:
        parts.append(f"<= {setting.high:g}")
    if setting.below is not None:
        parts.append(f"< {setting.below:g}")
    return " and ".join(parts)


def check_value(key: str, value: Any, setting: Setting, settings: Mapping[str, Any],
                what: str) -> Any:
    """``value`` as the declared kind, or a ``SettingsError`` naming ``key`` and ``what``."""
    if value is None and (setting.optional or setting.kind == "any"):
        return None
    if setting.kind == "radius":
        return check_radius(key, value, settings, what)
    bad = SettingsError(f"{key} for {what} must be {_describe(setting)}"
                        + (f" {_bounds(setting)}" if _bounds(setting) else "") + f", got {value!r}")
    # numbers are kept as given (an int stays an int): the settings are part of the state's bytes
    kind = setting.kind
    if kind in ("int", "seed"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or int(value) != value or (kind == "seed" and value < 0):
            raise bad
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        if isinstance(value, str):
            try:
                value = parse_radius(value, key) if "/" in value else float(value)
            except ValueError:
                raise bad from None
        if not math.isfinite(value):
            raise bad
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad
    elif kind == "str":
        if not isinstance(value, str) or (setting.choices and value not in setting.choices):
            raise bad
    elif kind == "list":
        if not isinstance(value, (list, tuple)):
            raise bad
        value = list(value)
    if kind in ("int", "float"):
        if (setting.low is not None and value < setting.low) or \
                (setting.above is not None and not value > setting.above) or \
                (setting.high is not None and value > setting.high) or \
                (setting.below is not None and not value < setting.below):
            raise bad
    return value


def check_declared(declared: Mapping[str, Setting], settings: Mapping[str, Any],
                   what: str) -> dict[str, Any]:
    """``settings`` checked against ``declared``: every key declared and present, every value
    of its kind and in its bounds (ints stay ints, radii become floats)."""
    unknown = sorted(set(settings) - set(declared))
    if unknown:
        raise SettingsError(f"unknown setting(s) {', '.join(map(repr, unknown))} for {what}; "
                            f"valid: {', '.join(sorted(declared))}")
    missing = sorted(set(declared) - set(settings))
    if missing:
        raise SettingsError(f"settings for {what} lack {', '.join(missing)} (start from a preset)")
    return {key: check_value(key, settings[key], declared[key], settings, what)
            for key in settings}


def given_values(declared: Mapping[str, Setting], overrides: Any, what: str) -> dict[str, Any]:
    """Overrides as values: ``["key=value", ...]`` text parsed by the declared kind, or a mapping
    of typed values (job specs, Tune trials); an undeclared key is refused. Not yet checked."""
    from ue_dist.core.config import parse_overrides

    text = not isinstance(overrides, Mapping)
    given = parse_overrides(overrides) if text else dict(overrides)
    for key in given:
        if key not in declared:
            raise SettingsError(f"unknown setting {key!r} for {what}; "
                                f"valid: {', '.join(sorted(declared))}")
    return {key: parse_text(key, value, declared[key]) if text else value
            for key, value in given.items()}


def resolve_declared(declared: Mapping[str, Setting], presets: Mapping[str, Mapping[str, Any]],
                     preset: str, overrides: Any, what: str) -> dict[str, Any]:
    """``presets[preset]`` plus overrides (``["key=value", ...]`` text parsed by the declared
    kind, or a mapping of typed values from job specs and Tune trials), checked."""
    if preset not in presets:
        raise SettingsError(f"unknown preset {preset!r} for {what}; "
                            f"valid: {', '.join(sorted(presets))}")
    settings = dict(presets[preset])
    settings.update(given_values(declared, overrides, what))
    return check_declared(declared, settings, what)


# binding settings to a fitted state ------------------------------------------------------------
def protect_time_keys(declared: Mapping[str, Setting]) -> list[str]:
    """The settings ``protect`` may change (declared ``protect_time``), sorted."""
    return sorted(k for k, s in declared.items() if s.protect_time)


def same_value(a: Any, b: Any) -> bool:
    """Equal as settings: numbers up to float rounding (8/255 typed or stored), else ``==``."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    if numbers:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def show_value(value: Any, setting: Setting) -> str:
    """A value as an error message shows it: radii on the 1/255 grid as ``8/255``."""
    if isinstance(value, float) and setting.kind in ("radius", "float"):
        steps = value * 255
        if setting.kind == "radius" and value > 0 and abs(steps - round(steps)) < 1e-6:
            return f"{round(steps)}/255"
        return f"{value:g}"
    return repr(value)


def bind_fitted(declared: Mapping[str, Setting], fitted: Mapping[str, Any],
                given: Mapping[str, tuple[Any, str]], what: str,
                source: str = "the state") -> dict[str, Any]:
    """The settings a fitted state is used with: ``fitted`` (those it was fitted with) plus the
    ``given`` changes, ``key -> (value, origin)`` (origin, e.g. ``--set``, names the flag in
    errors). A protect-time setting takes the given value; any other must equal the fitted one,
    else a ``SettingsError`` names the setting, the fitted value and what protect may change."""
    context = {**fitted, **{k: v for k, (v, _) in given.items()}}  # e.g. eps is read with norm
    settings, conflicts = dict(fitted), []
    for key, (value, origin) in given.items():
        setting = declared[key]
        value = check_value(key, value, setting, context, what)
        if setting.protect_time:
            settings[key] = value
        elif key not in fitted or not same_value(value, fitted[key]):
            conflicts.append((key, origin, show_value(value, setting),
                              show_value(fitted.get(key), setting)))
    if conflicts:  # all of them at once: a preset can differ from the fit in several
        origins = list(dict.fromkeys(origin for _, origin, _, _ in conflicts))
        asked = "; ".join(origin + " " + ", ".join(f"{k}={v}" for k, o, v, _ in conflicts
                                                   if o == origin) for origin in origins)
        was = ", ".join(f"{key}={old}" for key, _, _, old in conflicts)
        changeable = ", ".join(protect_time_keys(declared)) or "none"
        hint = "; without --preset protect starts from the state's settings" \
            if any(o.startswith("--preset") for o in origins) else ""
        raise SettingsError(
            f"{asked} conflict{'s' if len(origins) == 1 else ''} with {source}, fitted with "
            f"{was}: {'this setting is' if len(conflicts) == 1 else 'these settings are'} fixed "
            f"by the fit of {what} (refit to change; protect may change only: {changeable}"
            f"{hint})")
    return check_declared(declared, settings, what)
