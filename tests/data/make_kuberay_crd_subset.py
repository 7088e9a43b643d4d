"""Write tests/data/kuberay-crd-subset.json: the part of KubeRay's CRD schemas that cluster/ uses.

    python tests/data/make_kuberay_crd_subset.py /path/to/kuberay-checkout v1.5.1

reads ``ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml`` at that git tag and keeps,
for each manifest in cluster/kuberay-*.yaml, only the schema along the field paths the manifest
uses (with their types, enums and formats). A path the CRD does not have stops the script: the
API server would silently prune such a field. Each object node whose CRD schema lists properties
gets ``additionalProperties: false``, so tests/test_cluster.py rejects any field added to the
manifests later until this script is rerun (and finds it in the CRD). Maps (resources.limits,
rayStartParams, labels, ...) keep their CRD schema whole.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CRDS = {"RayCluster": "ray-operator/config/crd/bases/ray.io_rayclusters.yaml",
        "RayJob": "ray-operator/config/crd/bases/ray.io_rayjobs.yaml"}
MANIFESTS = ["cluster/kuberay-raycluster.yaml", "cluster/kuberay-rayjob.yaml"]
KEEP = ("type", "enum", "format", "x-kubernetes-int-or-string", "anyOf", "pattern", "items")


def _leaf(schema: dict) -> dict:
    return {k: v for k, v in schema.items() if k in KEEP or k == "additionalProperties"}


def prune(schema: dict, value, where: str) -> dict:
    if isinstance(value, dict) and "properties" in schema:
        props = {}
        for key, sub in value.items():
            if key not in schema["properties"]:
                raise SystemExit(f"{where}.{key}: not a field of the CRD schema")
            props[key] = prune(schema["properties"][key], sub, f"{where}.{key}")
        out = {"type": "object", "properties": props, "additionalProperties": False}
        if schema.get("required"):
            out["required"] = [r for r in schema["required"]]
        return out
    if isinstance(value, list) and "items" in schema:
        merged: dict = {}
        for i, item in enumerate(value):
            merged = _merge(merged, prune(schema["items"], item, f"{where}[{i}]"))
        return {"type": "array", "items": merged}
    if isinstance(value, (dict, list)) and not ("additionalProperties" in schema
                                                or schema.get("x-kubernetes-preserve-unknown-fields")):
        raise SystemExit(f"{where}: the CRD gives no fields here")
    return _leaf(schema)


def _merge(a: dict, b: dict) -> dict:
    if not a:
        return b
    out = dict(a)
    if "properties" in b:
        props = dict(a.get("properties", {}))
        for k, v in b["properties"].items():
            props[k] = _merge(props.get(k, {}), v)
        out["properties"] = props
    return out


def main(checkout: str, tag: str) -> None:
    subset = {"kuberay_version": tag, "source": {}, "kinds": {}}
    for manifest in MANIFESTS:
        (doc,) = [d for d in yaml.safe_load_all((REPO / manifest).read_text()) if d]
        kind = doc["kind"]
        crd = yaml.safe_load(subprocess.check_output(
            ["git", "-C", checkout, "show", f"{tag}:{CRDS[kind]}"], text=True))
        (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == doc["apiVersion"].split("/")[1]]
        schema = ver["schema"]["openAPIV3Schema"]
        body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
        pruned = prune(schema, body, kind)
        pruned["properties"].update({k: _leaf(schema["properties"][k])
                                     for k in ("apiVersion", "kind", "metadata")})
        subset["kinds"][kind] = pruned
        subset["source"][kind] = (f"https://github.com/ray-project/kuberay/blob/{tag}/{CRDS[kind]}"
                                  f" (versions[name={ver['name']}].schema.openAPIV3Schema)")
    out = REPO / "tests" / "data" / "kuberay-crd-subset.json"
    out.write_text(json.dumps(subset, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
