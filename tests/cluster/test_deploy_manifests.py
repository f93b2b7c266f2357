"""The Kubernetes manifest against the Kubernetes v1.33 and KubeRay v1.7.0 schemas vendored in
``tests/cluster/schemas`` (see ``vendor.py`` there), with a JSON-schema validator, plus what
the schemas cannot say: every pod mounts the models and /dev/shm, takes the token and secret
from the Secret, runs the image built on Ray's; the head declares the service's ports; the
RayJob starts the service detached on that cluster."""

from __future__ import annotations

import json
import os
import re
import shlex

import jsonschema
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCHEMAS = os.path.join(ROOT, "tests", "cluster", "schemas")
MANIFEST = os.path.join(ROOT, "cluster", "deploy", "kuberay-raycluster.yaml")
K8S_KINDS = {
    ("v1", "Secret"): "io.k8s.api.core.v1.Secret",
    ("v1", "Service"): "io.k8s.api.core.v1.Service",
    ("v1", "PersistentVolumeClaim"): "io.k8s.api.core.v1.PersistentVolumeClaim",
}


def _load(name: str) -> dict:
    with open(os.path.join(SCHEMAS, name)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    with open(MANIFEST) as f:
        return [d for d in yaml.safe_load_all(f) if d]


@pytest.fixture(scope="module")
def k8s() -> dict:
    return _load("kubernetes-v1.33.json")


def validate_k8s(k8s: dict, definition: str, obj: object) -> None:
    schema = {"$ref": f"#/$defs/{definition}", "$defs": k8s["$defs"]}
    jsonschema.Draft7Validator(schema).validate(obj)


def pod_templates(doc: dict) -> list[dict]:
    spec = doc["spec"]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def test_every_document_validates(docs, k8s) -> None:
    kuberay = _load("kuberay-v1.7.0.json")
    kinds = []
    for doc in docs:
        kinds.append(doc["kind"])
        if doc["apiVersion"] == "ray.io/v1":
            jsonschema.Draft7Validator(kuberay[doc["kind"]]).validate(doc)
            if doc["kind"] == "RayCluster":
                for template in pod_templates(doc):  # the strict schema: no unknown field
                    validate_k8s(k8s, "io.k8s.api.core.v1.PodTemplateSpec", template)
        else:
            validate_k8s(k8s, K8S_KINDS[(doc["apiVersion"], doc["kind"])], doc)
    assert sorted(kinds) == ["PersistentVolumeClaim", "RayCluster", "RayJob", "Service"]


def test_the_validators_refuse_mistakes(docs, k8s) -> None:
    (cluster,) = by_kind(docs, "RayCluster")
    bad = json.loads(json.dumps(cluster))
    template = bad["spec"]["headGroupSpec"]["template"]
    template["spec"]["containers"][0]["volumeMount"] = []  # a typo of volumeMounts
    with pytest.raises(jsonschema.ValidationError, match="volumeMount"):
        validate_k8s(k8s, "io.k8s.api.core.v1.PodTemplateSpec", template)
    (job,) = by_kind(docs, "RayJob")
    bad_job = {**job, "spec": {**job["spec"], "shutdownAfterJobFinishes": "yes"}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(_load("kuberay-v1.7.0.json")["RayJob"]).validate(bad_job)


def test_pods_mount_models_and_shm_and_take_secrets_from_the_secret(docs) -> None:
    (cluster,) = by_kind(docs, "RayCluster")
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        dockerfile = f.read()
    ray_image = re.search(r"^ARG RAY_IMAGE=(\S+)", dockerfile, re.M)
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.M)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_IMAGE\}", dockerfile, re.M)
    assert ray_image and ray_version and ray_image.group(1).startswith(ray_version.group(1))
    assert cluster["spec"]["rayVersion"] == ray_version.group(1)
    for template in pod_templates(cluster):
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = spec["containers"]
        assert not container["image"].startswith("strata:")  # a local tag pulls from nowhere
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "persistentVolumeClaim" in volumes[mounts["/models"]]
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef", e.get("value"))
               for e in container["env"]}
        assert env["STRATA_TOKEN"]["name"] == env["STRATA_SECRET"]["name"] == "strata-secrets"
        assert env["RAY_worker_niceness"] == "0"  # the service at the usual priority
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265, 50051, 8000, 9090}


def test_the_rayjob_starts_the_service_detached_and_the_service_routes_to_it(docs) -> None:
    from cluster.cli import build_parser

    (job,) = by_kind(docs, "RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "strata"}
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "strata"
    args = build_parser().parse_args(argv[1:])  # the entrypoint parses as `strata up`
    assert args.command == "up" and args.detach and args.address == "auto"
    assert args.token is None and args.secret is None  # from STRATA_TOKEN / STRATA_SECRET
    assert args.model.startswith("/models/") and args.host == "0.0.0.0"
    (svc,) = by_kind(docs, "Service")
    assert svc["spec"]["selector"] == {"ray.io/cluster": "strata", "ray.io/node-type": "head"}
    ports = {p["port"] for p in svc["spec"]["ports"]}
    assert ports == {args.port, args.http_port, args.metrics_port}
