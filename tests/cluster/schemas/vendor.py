"""How the schemas beside this file were made (re-run it to update them).

- ``kubernetes-v1.33.json``: the definitions that Secret, Service, PersistentVolumeClaim and
  PodTemplateSpec need (their transitive ``$ref`` closure), from the strict schemas of
  Kubernetes v1.33.0 as the ``kubernetes-validate`` 1.37.0 package ships them
  (``kubernetes_validate/kubernetes-json-schema/v1.33.0-local-strict/_definitions.json``,
  generated from Kubernetes' OpenAPI; "strict" = unknown fields are refused).
- ``kuberay-v1.7.0.json``: the ``openAPIV3Schema`` of the ``ray.io/v1`` RayCluster and RayJob
  CRDs of KubeRay v1.7.0 (``helm-chart/kuberay-operator/crds/ray.io_{rayclusters,rayjobs}.yaml``
  in github.com/ray-project/kuberay at tag v1.7.0).

Both are trimmed: ``description`` texts are dropped; nothing that validates is changed.

    python tests/cluster/schemas/vendor.py DEFINITIONS_JSON KUBERAY_CHECKOUT
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
K8S_ROOTS = (
    "io.k8s.api.core.v1.Secret",
    "io.k8s.api.core.v1.Service",
    "io.k8s.api.core.v1.PersistentVolumeClaim",
    "io.k8s.api.core.v1.PodTemplateSpec",
)
KUBERAY_TAG = "v1.7.0"


def strip(node):
    if isinstance(node, dict):
        return {
            k: strip(v)
            for k, v in node.items()
            if not (k == "description" and isinstance(v, str))
        }
    if isinstance(node, list):
        return [strip(v) for v in node]
    if isinstance(node, str) and node.startswith("/api/_definitions.json#/$defs/"):
        return node.replace("/api/_definitions.json#", "#")
    return node


def refs(node) -> set[str]:
    if isinstance(node, dict):
        out = {node["$ref"].rsplit("/", 1)[-1]} if isinstance(node.get("$ref"), str) else set()
        for v in node.values():
            out |= refs(v)
        return out
    if isinstance(node, list):
        return set().union(*(refs(v) for v in node)) if node else set()
    return set()


def kubernetes(definitions_path: str) -> dict:
    with open(definitions_path) as f:
        defs = json.load(f)["$defs"]
    keep: dict = {}
    todo = list(K8S_ROOTS)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep[name] = strip(defs[name])
        todo += sorted(refs(keep[name]) - set(keep))
    return {
        "source": "kubernetes-validate 1.37.0, v1.33.0-local-strict/_definitions.json "
        "(Kubernetes v1.33.0 OpenAPI), descriptions removed",
        "$defs": dict(sorted(keep.items())),
    }


def kuberay(checkout: str) -> dict:
    out: dict = {
        "source": f"github.com/ray-project/kuberay {KUBERAY_TAG}, "
        "helm-chart/kuberay-operator/crds, openAPIV3Schema of ray.io/v1, descriptions removed",
    }
    for plural, kind in (("rayclusters", "RayCluster"), ("rayjobs", "RayJob")):
        path = f"helm-chart/kuberay-operator/crds/ray.io_{plural}.yaml"
        text = subprocess.run(
            ["git", "-C", checkout, "show", f"{KUBERAY_TAG}:{path}"],
            capture_output=True, text=True, check=True,
        ).stdout
        crd = yaml.safe_load(text)
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[kind] = strip(version["schema"]["openAPIV3Schema"])
    return out


def main() -> None:
    definitions, checkout = sys.argv[1:3]
    for name, data in (
        ("kubernetes-v1.33.json", kubernetes(definitions)),
        ("kuberay-v1.7.0.json", kuberay(checkout)),
    ):
        with open(os.path.join(HERE, name), "w") as f:
            json.dump(data, f, separators=(",", ":"), sort_keys=True)
            f.write("\n")


if __name__ == "__main__":
    main()
