"""The protection ledger: which input shards are done, one small JSON record per shard.

Layout (in the output prefix, beside the protected shards)::

    DST/shard-000000.tar                 the protected shard (same file name as in SRC)
    DST/_ledger/shard-000000.tar.json    its record, written LAST: the commit marker

A shard counts as done when its record exists and the output shard it names exists. The shard is
written first (atomically: temporary name then rename; on S3 the object appears only when the
upload completes) and the record after it, so a process killed at any point leaves either a
committed shard, or an uncommitted one that the next run redoes and overwrites with the same
bytes (protection is deterministic for a given seed). This is how img2dataset commits shards.

The record carries a hash of everything that decides the output bytes (method, settings, state
file, fraction, seed): an incremental run refuses to mix outputs made with different settings
in one prefix. It also carries the source shard's fingerprint (size and ETag on object stores,
size and modification time on local disks): a source replaced under the same name is redone, and
an output whose source is gone is reported (``--mode sync`` removes it).
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any, Mapping

from ue_dist.data import storage
from ue_dist.errors import UserError

LEDGER_DIR = "_ledger"
RECORD_VERSION = 1
TEMP_MARK = ".tmp-"


class LedgerError(UserError, RuntimeError):
    """A ledger that does not match this run (different settings) or cannot be read."""


def shard_name(url: str) -> str:
    return posixpath.basename(url.rstrip("/"))


def ledger_url(dst_url: str) -> str:
    return storage.join(dst_url, LEDGER_DIR)


def record_url(dst_url: str, name: str) -> str:
    return storage.join(dst_url, LEDGER_DIR, f"{name}.json")


def settings_hash(payload: Mapping[str, Any]) -> str:
    """Stable short hash of the settings that decide the output bytes."""
    text = json.dumps(dict(payload), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_record(dst_url: str, record: Mapping[str, Any],
                 storage_options: Mapping[str, Any] | None = None) -> str:
    url = record_url(dst_url, record["shard"])
    data = json.dumps({"version": RECORD_VERSION, **record}, sort_keys=True, indent=1).encode()
    storage.write_bytes(url, data, storage_options)
    return url


def read_record(dst_url: str, name: str,
                storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    url = record_url(dst_url, name)
    try:
        raw = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        return None
    try:
        record = json.loads(raw)
    except json.JSONDecodeError:
        return None  # cannot happen with atomic writes; treat as not committed and redo
    return record if isinstance(record, dict) else None


def _list_names(url: str, suffix: str, storage_options: Mapping[str, Any] | None) -> dict[str, str]:
    """``{file name: path}`` of the files directly under ``url`` ending in ``suffix``."""
    try:
        entries = storage.ls(url, storage_options)
    except FileNotFoundError:
        return {}
    out = {}
    for entry in entries:
        name = posixpath.basename(str(entry).rstrip("/"))
        if name.endswith(suffix) and not name.startswith("."):
            out[name] = str(entry)
    return out


def committed(dst_url: str, storage_options: Mapping[str, Any] | None = None,
              expect_hash: str | None = None,
              skip: set[str] | frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """Records of the committed shards of ``dst_url``: ``{shard name: record}``.

    A record whose output shard is missing is not committed (the shard is redone). With
    ``expect_hash``, a record made with other settings raises ``LedgerError``. Names in ``skip``
    (already known, e.g. by a watcher's earlier polls) are not read again.
    """
    records = _list_names(ledger_url(dst_url), ".json", storage_options)
    outputs = _list_names(dst_url, ".tar", storage_options)
    done: dict[str, dict[str, Any]] = {}
    for file_name in sorted(records):
        name = file_name[:-len(".json")]
        if name not in outputs or name in skip:
            continue
        record = read_record(dst_url, name, storage_options)
        if record is None:
            continue
        if expect_hash is not None and record.get("settings_hash") != expect_hash:
            raise LedgerError(
                f"{dst_url!r} already holds shard {name!r} protected with other settings "
                f"(settings hash {record.get('settings_hash')} != {expect_hash}: method, settings, "
                "state, fraction or seed differ); use --mode overwrite or another output prefix")
        done[name] = record
    return done


def source_fingerprints(src_url: str, storage_options: Mapping[str, Any] | None = None
                        ) -> dict[str, dict[str, Any]]:
    """``{shard name: fingerprint}`` of the shards directly under ``src_url``, from one listing.

    The fingerprint is what the store says changes with the content: the size, and the ETag
    where the store has one (S3, GCS), else the modification time (local disks).
    """
    out: dict[str, dict[str, Any]] = {}
    try:
        entries = storage.ls(src_url, storage_options, detail=True)
    except FileNotFoundError:
        return out
    for entry in entries:
        name = posixpath.basename(str(entry.get("name", "")).rstrip("/"))
        if not name.endswith(".tar") or name.startswith((".", "_")):
            continue
        tag = entry.get("ETag") or entry.get("etag")
        fingerprint: dict[str, Any] = {"size": entry.get("size")}
        if tag:
            fingerprint["etag"] = str(tag).strip('"')
        else:
            fingerprint["mtime"] = entry.get("mtime") if entry.get("mtime") is not None else \
                str(entry.get("LastModified") or entry.get("updated") or "")
        out[name] = fingerprint
    return out


def source_changed(record: Mapping[str, Any], fingerprint: Mapping[str, Any] | None) -> bool:
    """Whether a committed record was made from another version of its source shard.

    Records written before fingerprints existed (no ``source_fingerprint``) count as unchanged.
    """
    recorded = record.get("source_fingerprint")
    if not recorded or fingerprint is None:
        return False
    return dict(recorded) != dict(fingerprint)


def output_names(dst_url: str, storage_options: Mapping[str, Any] | None = None) -> set[str]:
    """Shard names DST holds an output shard or a ledger record for."""
    records = {n[:-len(".json")] for n in _list_names(ledger_url(dst_url), ".json", storage_options)}
    return records | set(_list_names(dst_url, ".tar", storage_options))


def remove_output(dst_url: str, name: str,
                  storage_options: Mapping[str, Any] | None = None) -> None:
    """Uncommit then delete one output shard: the record goes first, so a crash in between
    leaves an uncommitted shard (redone or removed again), never a record without its shard."""
    for url in (record_url(dst_url, name), storage.join(dst_url, name)):
        fs, path = storage.get_fs(url, storage_options)
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass


def remove_stale_temps(dst_url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Delete temporary files left by a killed run (``.NAME.tmp-<id>``), in DST and its ledger.

    Only the holder of DST's lease (``ue_dist.runtime.lease``) calls this: no other run is
    writing there, so every temporary file is a leftover.
    """
    removed = []
    for url in (dst_url, ledger_url(dst_url)):
        fs, path = storage.get_fs(url, storage_options)
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            continue
        for entry in entries:
            name = posixpath.basename(str(entry).rstrip("/"))
            if name.startswith(".") and TEMP_MARK in name:
                fs.rm(str(entry))
                removed.append(name)
    return removed


__all__ = ["LEDGER_DIR", "LedgerError", "committed", "ledger_url", "read_record", "record_url",
           "output_names", "remove_output", "remove_stale_temps", "settings_hash", "shard_name",
           "source_changed", "source_fingerprints", "write_record"]
