"""k8s/ is valid and cannot drift from deploy/: schemas, the Serve configs, the Ray environment, the overlays.

Offline, no Ray. Every object of each variant validates: the RayService against KubeRay v1.7.0's CRD schema
(tests/data/kuberay-crds/), core kinds against Kubernetes' own schemas (kubernetes-validate). Each variant is
built with `kubectl kustomize` where kubectl is installed; otherwise the base and the overlay's components are
read and the CPU overlay's JSON patch is applied in Python, so the same checks run either way. Both variants
include k8s/tenancy (Redis and PostgreSQL in the cluster); EXTERNAL is the gpu overlay as a host with servers of
its own edits it (k8s/tenancy-external instead).
"""

import atexit
import copy
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from serve_app.auth import bearer_token, key_matches, resolve_api_keys
from serve_app.ray_env import serve_env

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRDS = ROOT / "tests" / "data" / "kuberay-crds"
VARIANTS = {"gpu": ROOT / "deploy" / "cluster-gpu.yaml", "cpu": ROOT / "deploy" / "cluster-cpu.yaml"}
K8S_VERSION = "1.32.0"  # validated against this Kubernetes API's schemas
SMALL_CPU_ENV = ROOT / "deploy" / "ray-small-cpu.env"  # small-CPU tuning: never for the pods
# serveConfigV2 differs from its deploy/ file in nothing (no documented overrides today); a key listed here
# would be allowed to differ.
SERVE_CONFIG_OVERRIDES: dict[str, set[str]] = {"gpu": set(), "cpu": set()}
EXTERNAL = "gpu-external"  # k8s/gpu with ../tenancy-external in place of ../tenancy (built in a temporary directory)


def _apply_json_patch(document: dict, operations: list[dict]) -> dict:
    """The subset of RFC 6902 the overlays use: add, replace, remove."""
    document = copy.deepcopy(document)
    for op in operations:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        target = document
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        key = int(last) if isinstance(target, list) and last != "-" else last
        if op["op"] == "remove":
            del target[key]
        elif op["op"] == "replace":
            target[key] = op["value"]
        elif op["op"] == "add":
            target.append(op["value"]) if key == "-" else (
                target.insert(key, op["value"]) if isinstance(target, list) else target.__setitem__(key, op["value"])
            )
        else:
            raise ValueError(f"unsupported patch op {op['op']}")
    return document


def _generated_configmaps(directory: Path, generators: list[dict]) -> list[dict]:
    """What a configMapGenerator makes (names without hash suffixes)."""
    made = []
    for generator in generators:
        data = {}
        for env_file in generator.get("envs", []):
            data.update(serve_env(directory / env_file))
        for literal in generator.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        for file in generator.get("files", []):
            data[file] = (directory / file).read_text()
        metadata = {"name": generator["name"]}
        if generator.get("options", {}).get("labels"):
            metadata["labels"] = generator["options"]["labels"]
        made.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    return made


def _resources(directory: Path, kustomization: dict) -> list[dict]:
    return [d for f in kustomization.get("resources", []) if (directory / f).is_file()
            for d in yaml.safe_load_all((directory / f).read_text()) if d]


@cache
def overlay_dir(variant: str) -> Path:
    """The overlay's directory; for EXTERNAL a copy of k8s/gpu that names ../tenancy-external instead of
    ../tenancy, as a host would (kustomize takes relative paths only, and directories outside are allowed)."""
    if variant != EXTERNAL:
        return K8S / variant
    directory = Path(tempfile.mkdtemp(prefix="clip-k8s-external-"))
    atexit.register(shutil.rmtree, directory, True)
    text = (K8S / "gpu" / "kustomization.yaml").read_text()
    assert "  - ../tenancy\n" in text
    text = text.replace("  - ../base\n", f"  - {os.path.relpath(K8S / 'base', directory)}\n")
    text = text.replace("  - ../tenancy\n", f"  - {os.path.relpath(K8S / 'tenancy-external', directory)}\n")
    (directory / "kustomization.yaml").write_text(text)
    shutil.copy(K8S / "gpu" / "namespace.yaml", directory)
    return directory


def _python_build(variant: str) -> list[dict]:
    """What kustomize would produce, for the checks below (names without hash suffixes)."""
    base = K8S / "base"
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    docs = _resources(base, kustomization) + _generated_configmaps(base, kustomization["configMapGenerator"])
    grafana = yaml.safe_load((K8S / "grafana" / "kustomization.yaml").read_text())
    docs += _generated_configmaps(K8S / "grafana", grafana["configMapGenerator"])
    directory = overlay_dir(variant)
    overlay = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs.append(yaml.safe_load((directory / "namespace.yaml").read_text()))
    for component in overlay.get("components", []):
        component_dir = (directory / component).resolve()
        kustomization = yaml.safe_load((component_dir / "kustomization.yaml").read_text())
        assert kustomization["kind"] == "Component" and not kustomization.get("patches"), component
        docs += _resources(component_dir, kustomization)
        docs += _generated_configmaps(component_dir, kustomization.get("configMapGenerator", []))
    if variant == "cpu":
        for patch in overlay["patches"]:
            text = (K8S / "cpu" / patch["path"]).read_text() if "path" in patch else patch["patch"]
            operations = yaml.safe_load(text)
            docs = [_apply_json_patch(d, operations) if (d["kind"], d["metadata"]["name"]) ==
                    (patch["target"]["kind"], patch["target"]["name"]) else d for d in docs]
        for generator in overlay["configMapGenerator"]:
            for d in docs:
                if d["kind"] == "ConfigMap" and d["metadata"]["name"] == generator["name"]:
                    d["data"] = dict(literal.partition("=")[::2] for literal in generator["literals"])
    return docs


@cache
def build(variant: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(overlay_dir(variant))], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        return tuple(d for d in yaml.safe_load_all(out.stdout) if d)
    return tuple(_python_build(variant))


def one(docs, kind: str, name_prefix: str = "") -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name_prefix)]
    assert len(found) == 1, (kind, name_prefix, [d["metadata"]["name"] for d in found])
    return found[0]


def named(docs, kind: str, name: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def ray_pod_specs(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    specs.update({g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]})
    return specs


@cache
def crd_schema(kind: str) -> dict:
    crd = yaml.safe_load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Keys a structural schema does not know: the API server would drop them silently (a typo'd field)."""
    if isinstance(value, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        found = [f"{path}.{k}" for k in value if k not in schema["properties"]]
        for key, item in value.items():
            if key in schema["properties"]:
                found += unknown_fields(item, schema["properties"][key], f"{path}.{key}")
        return found
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return [f for k, v in value.items() for f in unknown_fields(v, schema["additionalProperties"], f"{path}.{k}")]
    if isinstance(value, list) and "items" in schema:
        return [f for i, v in enumerate(value) for f in unknown_fields(v, schema["items"], f"{path}[{i}]")]
    return []


def serve_config(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


# ------------------------------------------------------------------ schemas


@pytest.mark.parametrize("variant", VARIANTS)
def test_rayservice_validates_against_kuberay_crd(variant: str):
    rayservice = one(build(variant), "RayService")
    jsonschema.validate(rayservice, crd_schema("RayService"))
    # the RayCluster KubeRay makes from it validates against the RayCluster CRD too
    raycluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "clip-x"},
                  "spec": rayservice["spec"]["rayClusterConfig"]}
    jsonschema.validate(raycluster, crd_schema("RayCluster"))
    assert unknown_fields(rayservice["spec"], crd_schema("RayService")["properties"]["spec"], "spec") == []


def test_crd_schema_rejects_what_kuberay_would():
    """The schema check has teeth: unknown auth modes and upgrade types fail."""
    rayservice = copy.deepcopy(one(build("gpu"), "RayService"))
    rayservice["spec"]["rayClusterConfig"]["authOptions"]["mode"] = "password"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rayservice, crd_schema("RayService"))
    rayservice = copy.deepcopy(one(build("gpu"), "RayService"))
    rayservice["spec"]["rayClusterConfig"]["autoscalerOptions"]["idleTimeoutSecond"] = 60
    assert unknown_fields(rayservice["spec"], crd_schema("RayService")["properties"]["spec"], "spec") == [
        "spec.rayClusterConfig.autoscalerOptions.idleTimeoutSecond"
    ]
    rayservice = copy.deepcopy(one(build("gpu"), "RayService"))
    del rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rayservice, crd_schema("RayService"))


@pytest.mark.parametrize("variant", [*VARIANTS, EXTERNAL])
def test_core_objects_validate_against_kubernetes_schemas(variant: str):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    core = [d for d in build(variant) if "." not in d["apiVersion"].split("/")[0] or
            d["apiVersion"].startswith(("batch/", "networking.k8s.io/"))]
    assert {d["kind"] for d in core} >= {"ConfigMap", "PersistentVolumeClaim", "Job", "NetworkPolicy", "Namespace"}
    if variant in VARIANTS:  # k8s/tenancy: Redis's Deployment, PostgreSQL's StatefulSet, their Services
        assert {d["kind"] for d in core} >= {"Deployment", "StatefulSet", "Service"}
    for document in core:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    # the pod templates inside the RayService are Kubernetes PodSpecs: validate each as a Pod
    for name, spec in ray_pod_specs(one(build(variant), "RayService")).items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_podmonitor_scrapes_ports_the_pods_declare():
    docs = build("gpu")
    monitor = one(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    rayservice = one(docs, "RayService")
    selector = monitor["spec"]["selector"]["matchLabels"]
    declared = set()
    for spec in ray_pod_specs(rayservice).values():
        declared |= {p["name"] for p in spec["containers"][0].get("ports", [])}
    scraped = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    assert scraped == {"metrics", "as-metrics", "dash-metrics"} and scraped <= declared
    cluster = rayservice["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert selector.items() <= group["template"]["metadata"]["labels"].items()
        assert group["rayStartParams"]["metrics-export-port"] == "8080"


DASHBOARD = K8S / "grafana" / "clip-dashboard.json"
# Metrics of serve_app/metrics.py that no panel shows (yet), each with why; every other one must be on the dashboard.
NOT_ON_DASHBOARD = {
    "ray_clip_inputs_total": "items embedded: Requests/s and Batch size show the load",
    "ray_clip_label_cache_lookups_total": "zero-shot label cache: a tuning detail",
    "ray_clip_refill_wait_seconds_bucket": "the encoder gate's refill wait: a tuning detail",
    "ray_clip_event_loop_lag_seconds_bucket": "event loop lag: for diagnosis",
    "ray_clip_autoscaling_pending_batches": "what the policy acts on: Queue depth shows the items",
}
# The per-key metrics of serve_app/tenancy (row "Customers (per key)"): how each is shown.
CUSTOMER_PANELS = {
    "ray_clip_key_requests_total": ("by (key_id, status)", True),  # (grouping, topk(10))
    "ray_clip_key_tokens_total": ("by (key_id)", True),
    "ray_clip_key_images_total": ("by (key_id)", True),
    "ray_clip_key_refusals_total": ("by (key_id, reason)", True),
    "ray_clip_rate_limit_store_degraded": ("by (replica)", False),
    "ray_clip_usage_records_spooled": ("by (replica)", False),
    "ray_clip_usage_records_dropped": ("by (replica)", False),
}


def exported_metrics() -> set[str]:
    """The Prometheus name of every metric serve_app/metrics.py defines, as Ray exports it (`ray_` prefix;
    counters `_total`, histograms by their `_bucket` series, gauges as named)."""
    import ast

    from serve_app.metrics import PREFIX

    suffix = {"Counter": "_total", "Histogram": "_bucket", "Gauge": ""}
    names = set()
    for node in ast.walk(ast.parse((ROOT / "serve_app" / "metrics.py").read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in suffix:
            first = node.args[0]
            assert isinstance(first, ast.BinOp) and isinstance(first.right, ast.Constant), ast.dump(first)
            assert isinstance(first.left, ast.Name) and first.left.id == "PREFIX", ast.dump(first)
            names.add(f"ray_{PREFIX}{first.right.value}{suffix[node.func.attr]}")
    return names


def test_grafana_dashboard_covers_the_service():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for metric in ("ray_clip_requests_total", "ray_clip_request_seconds_bucket", "ray_clip_preprocess_seconds_bucket",
                   "ray_clip_queue_wait_seconds_bucket", "ray_clip_encode_seconds_bucket", "ray_clip_batch_size_bucket",
                   "ray_clip_batch_fill_bucket", "ray_clip_encoder_pending_items", "ray_clip_encoder_running_items",
                   "ray_clip_rejected_requests_total", "ray_clip_autoscaling_desired_replicas",
                   "ray_serve_deployment_replica_healthy", "ray_serve_autoscaling_target_replicas",
                   "ray_serve_deployment_queued_queries", "ray_node_cpu_utilization", "ray_node_gpus_utilization",
                   *CUSTOMER_PANELS):
        assert metric in exprs, metric
    # every metric of serve_app/metrics.py is in some panel's query, or named above as left off (and then is not)
    defined = exported_metrics()
    assert set(CUSTOMER_PANELS) <= defined and set(NOT_ON_DASHBOARD) <= defined
    shown = {m for m in defined if re.search(rf"\b{m}\b", exprs)}
    missing, stale = defined - shown - set(NOT_ON_DASHBOARD), shown & set(NOT_ON_DASHBOARD)
    assert not missing and not stale, (missing, stale)
    configmap = one(build("gpu"), "ConfigMap", "clip-grafana-dashboard")
    assert json.loads(configmap["data"]["clip-dashboard.json"]) == dashboard
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_grafana_dashboard_panels_follow_its_conventions():
    """Unique ids; every panel and query on the `datasource` variable, every series filtered by the `cluster`
    variable; rows full width, panels on the 24-column grid without overlap, in reading order; the per-key row
    shows each customer metric grouped by key id (the busiest 10) or by ingress replica."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "cluster"}
    assert len({p["id"] for p in panels}) == len(panels)
    variable = {"type": "prometheus", "uid": "${datasource}"}
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        taken = {(grid["x"] + i, grid["y"] + j) for i in range(grid["w"]) for j in range(grid["h"])}
        assert not taken & cells, panel["title"]
        cells |= taken
        if panel["type"] == "row":
            assert (grid["w"], grid["h"], grid["x"]) == (24, 1, 0) and panel["panels"] == [], panel["title"]
            continue
        assert panel["datasource"] == variable, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert target["datasource"] == variable and target["legendFormat"], panel["title"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            for metric in re.findall(r"\bray_(?:clip|serve|node)_\w+", expr):
                assert f'{metric}{{ray_io_cluster=~"$cluster"' in expr, (panel["title"], metric)
    assert [(p["gridPos"]["y"], p["gridPos"]["x"]) for p in panels] == \
        sorted((p["gridPos"]["y"], p["gridPos"]["x"]) for p in panels)

    (row,) = [i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == "Customers (per key)"]
    end = next((i for i, p in enumerate(panels) if i > row and p["type"] == "row"), len(panels))
    assert all(p["type"] == "timeseries" and p["description"] for p in panels[row + 1:end])
    customers = [t["expr"] for p in panels[row + 1:end] for t in p["targets"]]
    for metric, (grouping, top) in CUSTOMER_PANELS.items():
        (expr,) = [e for e in customers if metric in e]
        assert grouping in expr, expr
        assert expr.startswith("topk(10, ") == top, expr
        assert ("rate(" in expr) == metric.endswith("_total"), expr  # counters as rates, gauges as they are


# ------------------------------------------------------------------ no drift from deploy/


@pytest.mark.parametrize("variant", VARIANTS)
def test_serve_config_is_the_deploy_file(variant: str):
    embedded = serve_config(one(build(variant), "RayService"))
    deployed = yaml.safe_load(VARIANTS[variant].read_text())
    overrides = SERVE_CONFIG_OVERRIDES[variant]
    assert {k: v for k, v in embedded.items() if k not in overrides} == \
        {k: v for k, v in deployed.items() if k not in overrides}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_ray_container_gets_the_serving_env_and_nothing_else(variant: str):
    docs = build(variant)
    env_map = one(docs, "ConfigMap", "clip-ray-serve-env")
    assert env_map["data"] == serve_env()  # k8s/base/ray-serve.env is deploy/ray-serve.env
    small_cpu = set(serve_env(SMALL_CPU_ENV)) - set(serve_env()) if SMALL_CPU_ENV.exists() else set()
    for name, spec in ray_pod_specs(one(docs, "RayService")).items():
        container = spec["containers"][0]
        assert container["envFrom"] == [{"configMapRef": {"name": env_map["metadata"]["name"]}}], name
        own = {e["name"] for e in container.get("env", [])}
        assert not own & (set(serve_env()) | small_cpu), (name, own)
        assert not {k for k in own if k.startswith("RAY_")}, (name, own)


def test_model_of_weights_job_is_the_served_model():
    for variant in VARIANTS:
        docs = build(variant)
        args = serve_config(one(docs, "RayService"))["applications"][0]["args"]
        model = one(docs, "ConfigMap", "clip-model")["data"]
        assert model["CLIP_MODEL"] == args["model"] and (model["CLIP_PRETRAINED"] or None) == args.get("pretrained")
        job = one(docs, "Job", "clip-fetch-weights")
        assert "serve_app.modeling" in " ".join(job["spec"]["template"]["spec"]["containers"][0]["command"])


# ------------------------------------------------------------------ what the manifests promise


def test_gpu_rayservice_shape():
    rayservice = one(build("gpu"), "RayService")
    spec = rayservice["spec"]
    cluster = spec["rayClusterConfig"]
    assert spec["upgradeStrategy"]["type"] == "NewCluster" and spec["excludeHeadPodFromServeSvc"] is True
    assert cluster["rayVersion"].startswith("2.60.") and cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2" and cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert cluster["authOptions"] == {"mode": "token", "secretName": "clip-ray-token"}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu, cpu = groups["gpu-group"], groups["cpu-group"]
    for group in (gpu, cpu):
        assert group["minReplicas"] < group["maxReplicas"]
    resources = gpu["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1" and resources["requests"] == resources["limits"]
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    # the encoder pool and the Batch API's encoder actors fill the GPU group: one per GPU, the encoder pool
    # autoscaling up to the group's size less the batch job's GPUs (online work never waits for a batch's GPU)
    args = serve_config(rayservice)["applications"][0]["args"]
    assert args["device"] == "cuda" and args["precision"] == "bf16" and args.get("layout", "pools") == "pools"
    encoder = args["encoder"]
    assert encoder["num_gpus"] == 1 and encoder["autoscaling_config"]["min_replicas"] == gpu["minReplicas"]
    job = args["batch"]["job"]
    assert args["batch"]["enabled"] and job["num_gpus"] == 1 and job["niceness"] > 0
    assert encoder["autoscaling_config"]["max_replicas"] + job["concurrency"] == gpu["maxReplicas"]
    ray_cpus = float(resources["limits"]["cpu"])
    on_one_node = (encoder["num_cpus"] + args["preprocessor"]["num_cpus"] * args["preprocessor"]["autoscaling_config"][
        "min_replicas"] + args["ingress"]["num_cpus"] * args["ingress"]["autoscaling_config"]["min_replicas"])
    assert on_one_node <= ray_cpus, "the minimum pools must fit on the first GPU node"
    http = serve_config(rayservice)["http_options"]
    assert (http["host"], http["port"]) == ("0.0.0.0", 8000) and http["request_timeout_s"] > args["request_timeout_s"]


def test_cpu_overlay_drops_the_gpu_group():
    rayservice = one(build("cpu"), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["cpu-group"]
    args = serve_config(rayservice)["applications"][0]["args"]
    assert args["device"] == "cpu" and args["encoder"]["num_gpus"] == 0
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] >= 1 and group["maxReplicas"] == args["encoder"]["autoscaling_config"]["max_replicas"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    need = args["encoder"]["num_cpus"] + args["preprocessor"]["num_cpus"] + args["ingress"]["num_cpus"]
    assert need <= float(limits["cpu"])
    assert one(build("cpu"), "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_worker_pods_serve_offline_with_secrets_and_probes(variant: str, tmp_path: Path):
    for name, spec in ray_pod_specs(one(build(variant), "RayService")).items():
        container = spec["containers"][0]
        env = {e["name"]: e for e in container.get("env", [])}
        assert "CLIP_API_KEYS" not in env, name  # keys never travel in the environment (see below)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        if name == "head":
            assert "readinessProbe" not in container and "livenessProbe" not in container  # KubeRay's defaults
            continue
        assert env["HF_HUB_OFFLINE"]["value"] == "1" and env["HF_HOME"]["value"].startswith("/models")
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/models"]["readOnly"] and mounts["/etc/clip-api-keys"]["readOnly"]
        assert spec["initContainers"][0]["name"] == "wait-for-weights"
        readiness = " ".join(container["readinessProbe"]["exec"]["command"])
        liveness = " ".join(container["livenessProbe"]["exec"]["command"])
        assert "localhost:8000/health" in readiness and "local_raylet_healthz" in readiness
        # once keys are set /health needs one: the probe sends the first key of the keys file, as the ingress
        # reads it (comments, blank lines and spaces skipped); a probe without it would keep every pod unready
        keys_file = tmp_path / "api-keys"
        keys_file.write_text("# rotated 2025-01\n\n  first-key   # the new one\nsecond-key\n")
        read_key = re.search(r"(key=\$\(.*?\|\| true\))", readiness).group(1)
        header = re.search(r'--header "(Authorization: Bearer [^"]+)"', readiness).group(1)
        sent = subprocess.run(["bash", "-c", f'{read_key} && echo "{header}"'],
                              env={"CLIP_API_KEYS_FILE": str(keys_file), "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, check=True).stdout.strip()
        keys = resolve_api_keys(None, None, environ={"CLIP_API_KEYS_FILE": str(keys_file)})
        assert key_matches(bearer_token(sent.split(": ", 1)[1]), keys) and sent.endswith("Bearer first-key")
        assert container["readinessProbe"]["timeoutSeconds"] > 10  # HEALTH_TIMEOUT_S in serve_app/ingress.py
        # liveness never asks the encoders: only the raylet and the ingress's own /livez
        assert "/livez" in liveness and "/health" not in liveness


def test_hf_token_is_optional_and_no_secret_is_committed():
    docs = build("gpu")
    job = one(docs, "Job", "clip-fetch-weights")
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created by hand (k8s/README.md)"


def test_network_policy_opens_only_serving_and_metrics_ports():
    policy = named(build("gpu"), "NetworkPolicy", "clip-ray")
    opened_to_all = [r for r in policy["spec"]["ingress"] if "from" not in r]
    assert [p["port"] for r in opened_to_all for p in r["ports"]] == [8000]
    every_port = [r for r in policy["spec"]["ingress"] if "ports" not in r]
    assert all(f.get("podSelector") and not f.get("namespaceSelector") for r in every_port for f in r["from"])
    closed = {6379, 8265, 10001, 8404, 9101, 8500}
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if any("prometheus" in json.dumps(f) for f in rule.get("from", [])):
            assert ports == {8080, 44217, 44227}
        elif ports:
            assert not (ports & closed) or any("kuberay-operator" in json.dumps(f) for f in rule["from"])


# ------------------------------------------------------------------ hardening (issue 24, item 8)

METADATA = ipaddress.ip_address("169.254.169.254")  # the cloud metadata service (AWS, GCP, Azure, ...)


def pod_specs(docs) -> dict[str, dict]:
    """Every pod template of a variant: the Ray groups and the weights Job."""
    specs = ray_pod_specs(one(docs, "RayService"))
    specs["fetch-weights"] = one(docs, "Job", "clip-fetch-weights")["spec"]["template"]["spec"]
    return specs


def pod_labels(docs) -> dict[str, dict]:
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    labels = {"head": {**cluster["headGroupSpec"]["template"]["metadata"]["labels"], "ray.io/node-type": "head"}}
    labels.update({g["groupName"]: {**g["template"]["metadata"]["labels"], "ray.io/node-type": "worker"}
                   for g in cluster["workerGroupSpecs"]})  # ray.io/node-type: the label KubeRay sets
    labels["fetch-weights"] = one(docs, "Job", "clip-fetch-weights")["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(policy: dict, labels: dict) -> bool:
    return policy["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pod_runs_confined(variant: str):
    """RuntimeDefault seccomp and a non-root user on every pod; on every container (the autoscaler sidecar's
    too) no privilege escalation, no capabilities and a read-only root, with a writable emptyDir at /tmp where
    Ray and the tools write; no Kubernetes API token on any pod."""
    docs = build(variant)
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    for name, spec in pod_specs(docs).items():
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1000
        assert spec["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert context["capabilities"] == {"drop": ["ALL"]}, (name, container["name"])
            assert context["readOnlyRootFilesystem"] is True, (name, container["name"])
            (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert "emptyDir" in volumes[tmp["name"]] and not tmp.get("readOnly"), (name, container["name"])
    autoscaler = cluster["autoscalerOptions"]
    assert autoscaler["securityContext"] == cluster["headGroupSpec"]["template"]["spec"]["containers"][0][
        "securityContext"]
    assert "/tmp" in {m["mountPath"] for m in autoscaler["volumeMounts"]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_the_autoscaler_holds_a_kubernetes_api_token(variant: str):
    """The head pod mounts no token (automountServiceAccountToken: false) but projects one for the autoscaler
    sidecar alone, at the path the in-cluster client reads; the Ray containers see none."""
    docs = build(variant)
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    token_volumes = {v["name"] for v in head["volumes"]
                     if any("serviceAccountToken" in s for s in v.get("projected", {}).get("sources", []))}
    assert len(token_volumes) == 1
    (mount,) = [m for m in cluster["autoscalerOptions"]["volumeMounts"] if m["name"] in token_volumes]
    assert mount["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount" and mount["readOnly"] is True
    (volume,) = [v for v in head["volumes"] if v["name"] in token_volumes]
    paths = {s_["serviceAccountToken"]["path"] if "serviceAccountToken" in s_ else
             next(iter(s_.values()))["items"][0]["path"] for s_ in volume["projected"]["sources"]}
    assert paths == {"token", "ca.crt", "namespace"}
    for name, spec in pod_specs(docs).items():
        for container in spec["containers"] + spec.get("initContainers", []):
            assert not {m["name"] for m in container.get("volumeMounts", [])} & token_volumes, (name, container)


@pytest.mark.parametrize("variant", VARIANTS)
def test_api_keys_reach_only_the_pods_that_check_them(variant: str):
    """The keys Secret is a read-only file on the worker pods (where the ingress replicas run), named by
    CLIP_API_KEYS_FILE: in no environment variable, not on the head (no replicas: num-cpus 0), not in the Job."""
    docs = build(variant)
    rayservice = one(docs, "RayService")
    assert rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert "clip-api-keys" not in json.dumps(rayservice["spec"]["rayClusterConfig"]["autoscalerOptions"])
    for name, spec in pod_specs(docs).items():
        text = json.dumps(spec)
        assert "CLIP_API_KEYS\"" not in text, name  # no key in any environment
        if name in ("head", "fetch-weights"):
            assert "clip-api-keys" not in text, name
            continue
        (volume,) = [v for v in spec["volumes"] if v.get("secret", {}).get("secretName") == "clip-api-keys"]
        assert volume["secret"]["defaultMode"] == 0o440  # the pod's user and group (fsGroup) only
        container = spec["containers"][0]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["readOnly"] is True
        env = {e["name"]: e.get("value") for e in container["env"]}
        (item,) = volume["secret"]["items"]
        assert env["CLIP_API_KEYS_FILE"] == f"{mount['mountPath']}/{item['path']}"
        for init in spec.get("initContainers", []):  # wait-for-weights needs no keys
            assert "clip-api-keys" not in json.dumps(init) and "CLIP_API_KEYS" not in json.dumps(init)


@pytest.mark.parametrize("variant", [*VARIANTS, EXTERNAL])
def test_egress_is_dns_own_pods_object_storage_and_the_hub_for_the_weights_job_only(variant: str):
    docs = build(variant)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    labels = pod_labels(docs)
    # every pod is under some egress policy (no policy: everything open)
    for name, pod in labels.items():
        assert any(selects(p, pod) and "Egress" in p["spec"]["policyTypes"] for p in policies), name
    # no egress rule anywhere reaches the cloud metadata address, nor opens every port to a block of addresses
    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            for peer in rule.get("to", []):
                if "ipBlock" in peer:  # a block that holds the metadata address excepts it
                    if METADATA in ipaddress.ip_network(peer["ipBlock"]["cidr"]):
                        assert any(METADATA in ipaddress.ip_network(e) for e in peer["ipBlock"].get("except", [])), \
                            policy["metadata"]["name"]
                    assert rule.get("ports"), policy["metadata"]["name"]
            assert rule.get("to"), policy["metadata"]["name"]  # an empty `to` would allow every destination

    def egress_of(pod: dict) -> list[dict]:
        return [r for p in policies if selects(p, pod) and "Egress" in p["spec"]["policyTypes"]
                for r in p["spec"].get("egress", [])]

    def dns_only(rule: dict) -> bool:
        return ({(p["protocol"], p["port"]) for p in rule.get("ports", [])} == {("UDP", 53), ("TCP", 53)} and
                all(peer.get("podSelector", {}).get("matchLabels") == {"k8s-app": "kube-dns"} for peer in rule["to"]))

    own_pods = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "clip-embeddings"}}}
    for name, pod in labels.items():
        rules = egress_of(pod)
        assert any(dns_only(r) for r in rules), name
        others = [r for r in rules if not dns_only(r)]
        if name == "fetch-weights":
            # HTTPS to public addresses: not the metadata service, not the cluster's own (private) networks
            (rule,) = others
            assert rule["ports"] == [{"protocol": "TCP", "port": 443}]
            (peer,) = rule["to"]
            excepts = [ipaddress.ip_network(e) for e in peer["ipBlock"]["except"]]
            for private in ("10.0.0.1", "172.16.0.1", "192.168.0.1", "100.100.100.200"):
                assert any(ipaddress.ip_address(private) in e for e in excepts), private
            continue
        # Ray pods: their own pods on any port, and the head also the API server (for the autoscaler); the
        # workers (the ingress replicas) also Redis and PostgreSQL on their ports, in the cluster or outside
        assert [r for r in others if "ports" not in r] == [{"to": [own_pods]}], name
        tenancy = [r for r in others if r.get("ports") and {p["port"] for p in r["ports"]} <= {6379, 5432}]
        assert check_tenancy_egress(tenancy, external=variant == EXTERNAL) if name != "head" else tenancy == [], name
        api = [r for r in others if "ports" in r and r not in tenancy]
        if name == "head":
            (rule,) = api
            assert {p["port"] for p in rule["ports"]} == {443, 6443}
        else:  # the workers: the Batch API's object storage, HTTPS only, never the metadata address
            (rule,) = api
            assert rule["ports"] == [{"protocol": "TCP", "port": 443}], name
            (peer,) = rule["to"]
            assert any(METADATA in ipaddress.ip_network(e) for e in peer["ipBlock"]["except"]), name
    job_policy = named(docs, "NetworkPolicy", "clip-fetch-weights")
    assert job_policy["spec"]["ingress"] == [] and "Ingress" in job_policy["spec"]["policyTypes"]


def test_operator_rule_admits_the_operator_namespace_only():
    """The ingress rule for the KubeRay operator names its namespace, the one k8s/README.md installs it in,
    instead of any namespace (`namespaceSelector: {}`: any pod anywhere labelled kuberay-operator)."""
    policy = named(build("gpu"), "NetworkPolicy", "clip-ray")
    (rule,) = [r for r in policy["spec"]["ingress"] if "kuberay-operator" in json.dumps(r.get("from", []))]
    (peer,) = rule["from"]
    namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
    readme = (K8S / "README.md").read_text()
    install = re.search(r"helm install kuberay-operator [^`]*", readme).group(0)
    assert f"--namespace {namespace}" in install and "singleNamespaceInstall=true" in install
    assert "watchNamespace={clip}" in install


def test_the_image_installs_with_the_constraints():
    """`pip install -c constraints.txt`: the image gets the torch/torchvision the project is tested with."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = re.search(r"^COPY (.*) \./$", dockerfile, re.M).group(1).split()
    assert "constraints.txt" in copied and "pyproject.toml" in copied
    (install,) = re.findall(r"^RUN python -m pip install (.*?) \. ", dockerfile, re.M)
    assert "-c constraints.txt" in install
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore and "!constraints.txt" in ignore  # the build context carries the file


def test_python_build_matches_kustomize():
    """The fallback used where kubectl is missing builds the same objects (modulo hashed names)."""
    if not shutil.which("kubectl"):
        pytest.skip("kubectl not installed")

    def normal(docs):
        text = json.dumps(sorted(docs, key=lambda d: (d["kind"], d["metadata"]["name"])), sort_keys=True)
        for name in ("clip-ray-serve-env", "clip-model", "clip-postgres-init"):
            text = __import__("re").sub(name + r"-[a-z0-9]{10}", name, text)
        return json.loads(text)

    for variant in [*VARIANTS, EXTERNAL]:
        kustomized = [d for d in normal(list(build(variant))) if d["kind"] not in ("ConfigMap",)]
        python = [d for d in normal(_python_build(variant)) if d["kind"] not in ("ConfigMap",)]
        for doc in kustomized:  # kustomize adds the namespace and the common label; the Python build does not
            doc["metadata"].pop("namespace", None)
            doc["metadata"].get("labels", {}).pop("app.kubernetes.io/part-of", None)
            for d in python:
                d["metadata"].get("labels", {}).pop("app.kubernetes.io/part-of", None)
        assert [(d["kind"], d["metadata"]["name"]) for d in kustomized] == \
            [(d["kind"], d["metadata"]["name"]) for d in python]
        for k, p in zip(kustomized, python):
            if k["kind"] == "RayService":
                assert serve_config(k) == serve_config(p)
                assert k["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"] == \
                    p["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]


def test_the_image_starts_haproxy_through_the_wrapper():
    """Pods start Ray with `ray start`, not through serve_app.ray_env: the image names `clip-haproxy` itself,
    at a path it creates, and the project declares that command."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    env = dict(re.findall(r"^ENV (RAY_SERVE_HAPROXY_BINARY_PATH)=(\S+)$", dockerfile, re.M))
    path = env["RAY_SERVE_HAPROXY_BINARY_PATH"]
    assert f'ln -s "$(command -v clip-haproxy)" {path}' in dockerfile  # unless pip put it there already
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["clip-haproxy"] == "serve_app.haproxy:main"


# ------------------------------------------------------------------ Redis and PostgreSQL (k8s/tenancy)

TENANCY = K8S / "tenancy"
SERVERS = {"clip-redis": 6379, "clip-postgres": 5432}  # the server pods' app.kubernetes.io/name: their port
TENANCY_ENV = {"CLIP_REDIS_URL": "redis-url", "CLIP_DATABASE_URL": "database-url"}  # env: key of clip-tenancy
WRITABLE = {"clip-redis": {"/data", "/tmp"},  # where the official images write (Redis: nothing, as configured)
            "clip-postgres": {"/var/lib/postgresql/data", "/var/run/postgresql", "/tmp"}}


def check_tenancy_egress(rules: list[dict], external: bool) -> bool:
    """A worker pod's egress to the servers: one rule each, its port alone, to its pods (k8s/tenancy) or to an
    address block that keeps the metadata address out (k8s/tenancy-external)."""
    peers = {}
    for rule in rules:
        (port,) = rule["ports"]
        (peers[port["port"]],) = rule["to"]
        assert port["protocol"] == "TCP", rule
    assert sorted(peers) == sorted(SERVERS.values()), rules
    for name, port in SERVERS.items():
        if external:
            (block,) = peers[port].values()
            assert set(peers[port]) == {"ipBlock"} and METADATA not in ipaddress.ip_network(block["cidr"]), block
        else:
            assert peers[port] == {"podSelector": {"matchLabels": {"app.kubernetes.io/name": name}}}, peers[port]
    return True


def server_pods(docs) -> dict[str, dict]:
    """The pod templates of the servers' Deployment and StatefulSet, by workload name."""
    return {d["metadata"]["name"]: d["spec"]["template"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")}


def may_connect(policies: list[dict], source: dict, target: dict, port: int) -> bool:
    """Whether the NetworkPolicies let a pod labelled `source` open TCP `port` on a pod labelled `target`, both in
    the namespace (peers by namespace or address block do not count: neither is a pod of the namespace)."""

    def admits(direction: str, selected: dict, peer_labels: dict, peers_key: str) -> bool:
        chosen = [p for p in policies if selects(p, selected) and direction in p["spec"]["policyTypes"]]
        if not chosen:
            return True  # no policy selects the pod in this direction: open
        for rule in (r for p in chosen for r in p["spec"].get(direction.lower(), [])):
            if rule.get("ports") and port not in {p["port"] for p in rule["ports"]}:
                continue
            if peers_key not in rule or any(
                    set(peer) == {"podSelector"} and peer["podSelector"].get("matchLabels", {}).items() <=
                    peer_labels.items() for peer in rule[peers_key]):
                return True
        return False

    return admits("Egress", source, target, "to") and admits("Ingress", target, source, "from")


def secret_keys(value, secret: str) -> set[str]:
    """The keys of Secret `secret` that the objects read: secretKeyRefs and the items of secret volumes."""
    if isinstance(value, list):
        return set().union(*(secret_keys(v, secret) for v in value)) if value else set()
    if not isinstance(value, dict):
        return set()
    keys = set()
    if value.get("secretKeyRef", {}).get("name") == secret:
        keys.add(value["secretKeyRef"]["key"])
    if value.get("secret", {}).get("secretName") == secret:
        keys |= {item["key"] for item in value["secret"]["items"]}  # no items: every key (none here)
    return keys | set().union(*(secret_keys(v, secret) for v in value.values()))


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_the_ingress_pods_reach_redis_and_postgres(variant: str):
    """Redis and PostgreSQL admit the RayService's worker pods (the ingress replicas) on their port and nobody
    else: not the head, the weights Job, each other or any other pod; they connect nowhere themselves."""
    docs = build(variant)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    servers = server_pods(docs)
    assert set(servers) == set(SERVERS)
    sources = {**pod_labels(docs), **{n: t["metadata"]["labels"] for n, t in servers.items()},
               "any other pod": {"app.kubernetes.io/name": "something-else"}}
    workers = {n for n, labels in pod_labels(docs).items() if labels.get("ray.io/node-type") == "worker"}
    assert workers
    for name, port in SERVERS.items():
        labels = servers[name]["metadata"]["labels"]
        assert {n for n, source in sources.items() if may_connect(policies, source, labels, port)} == workers, name
        (policy,) = [p for p in policies if selects(p, labels)]
        # the server's own policy says so too, whatever the other pods' egress policies say
        assert {n for n, source in sources.items() if may_connect([policy], source, labels, port)} == workers, name
        for other in (22, 80, 443, 5432 if port == 6379 else 6379, 8000):
            assert not any(may_connect(policies, source, labels, other) for source in sources.values()), other
        assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"} and policy["spec"]["egress"] == []
        # the Service sends its port to the container's, and selects the server's pods
        service = named(docs, "Service", name)
        assert service["spec"]["selector"].items() <= labels.items()
        (service_port,) = service["spec"]["ports"]
        (container,) = servers[name]["spec"]["containers"]
        assert service_port["port"] == port and {"name": service_port["targetPort"], "containerPort": port} in \
            container["ports"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_redis_and_postgres_pods_run_confined(variant: str):
    """As the Ray pods: RuntimeDefault seccomp, a non-root user (the official images' own), no Kubernetes API
    token, no privilege escalation or capabilities, a read-only root; writable only where the image writes
    (emptyDirs, PostgreSQL's data volume); passwords as read-only files or from the Secret, never in the manifest."""
    docs = build(variant)
    for name, template in server_pods(docs).items():
        spec = template["spec"]
        context = spec["securityContext"]
        assert context["seccompProfile"] == {"type": "RuntimeDefault"} and context["runAsNonRoot"] is True, name
        assert context["runAsUser"] == context["runAsGroup"] == context["fsGroup"] == 999, name  # Debian images
        assert spec["automountServiceAccountToken"] is False and not spec.get("initContainers"), name
        (container,) = spec["containers"]
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                                "readOnlyRootFilesystem": True}, name
        assert container["resources"]["limits"]["memory"] and container["resources"]["limits"]["cpu"], name
        assert {"readinessProbe", "livenessProbe"} <= set(container), name
        volumes = {v["name"]: v for v in spec["volumes"]}
        workload = named(docs, "StatefulSet" if name == "clip-postgres" else "Deployment", name)
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        writable = {m["mountPath"]: m["name"] for m in container["volumeMounts"] if not m.get("readOnly")}
        assert set(writable) == WRITABLE[name], name
        assert all(v in claims or "emptyDir" in volumes[v] for v in writable.values()), name
        for mount in container["volumeMounts"]:  # everything else: read-only files of a ConfigMap or the Secret
            if mount.get("readOnly"):
                volume = volumes[mount["name"]]
                assert "configMap" in volume or volume["secret"]["defaultMode"] == 0o440, mount
        assert all("value" not in e or "PASSWORD" not in e["value"] for e in container.get("env", [])), name

    redis = server_pods(docs)["clip-redis"]["spec"]["containers"][0]
    assert redis["image"] == "redis:7"
    args = redis["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"  # no persistence
    assert args[args.index("--requirepass") + 1] == "$(REDISCLI_AUTH)"
    assert {"name": "REDISCLI_AUTH", "valueFrom": {"secretKeyRef": {"name": "clip-tenancy", "key": "redis-password"}}} \
        in redis["env"]

    postgres_spec = server_pods(docs)["clip-postgres"]["spec"]
    (postgres,) = postgres_spec["containers"]
    assert postgres["image"] == "postgres:16"
    env = {e["name"]: e["value"] for e in postgres["env"]}
    mounts = {m["name"]: m["mountPath"] for m in postgres["volumeMounts"]}
    assert env["PGDATA"].startswith(mounts["data"] + "/")  # a directory of its own on the volume (lost+found)
    volumes = {v["name"]: v for v in postgres_spec["volumes"]}
    files = {f"{mounts['passwords']}/{item['path']}": item["key"] for item in volumes["passwords"]["secret"]["items"]}
    assert files[env["POSTGRES_PASSWORD_FILE"]] == "postgres-password"
    assert files[env["CLIP_DATABASE_PASSWORD_FILE"]] == "database-password"
    # the init script the entrypoint sources on first start is the tested file (tests/integration/test_services.py)
    init = one(docs, "ConfigMap", "clip-postgres-init")
    assert volumes["init"]["configMap"]["name"] == init["metadata"]["name"]
    assert mounts["init"] == "/docker-entrypoint-initdb.d"
    assert init["data"] == {"postgres-init.sh": (TENANCY / "postgres-init.sh").read_text()}
    assert "$CLIP_DATABASE_PASSWORD_FILE" in init["data"]["postgres-init.sh"]


@pytest.mark.parametrize("variant", [*VARIANTS, EXTERNAL])
def test_tenancy_urls_come_only_from_the_secret(variant: str):
    """CLIP_REDIS_URL and CLIP_DATABASE_URL reach the worker containers (the ingress replicas) from the Secret
    clip-tenancy (required: a pod without it does not start) and from nowhere else: no URL in any value, ConfigMap
    or Serve config; nothing of the Secret on the head, its autoscaler, the Job or an init container."""
    docs = build(variant)
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    expected = [{"name": env, "valueFrom": {"secretKeyRef": {"name": "clip-tenancy", "key": key}}}
                for env, key in TENANCY_ENV.items()]
    for name, spec in pod_specs(docs).items():
        if name in ("head", "fetch-weights"):
            assert not any(word in json.dumps(spec) for word in ("clip-tenancy", *TENANCY_ENV)), name
            continue
        env = spec["containers"][0]["env"]
        assert [e for e in env if e["name"] in TENANCY_ENV] == expected, name
        for init in spec.get("initContainers", []):
            assert "clip-tenancy" not in json.dumps(init), name
    assert "clip-tenancy" not in json.dumps(cluster["autoscalerOptions"])
    assert not re.search(r"\b(rediss?|postgres(ql)?(\+\w+)?)://", json.dumps(docs))  # no URL in the manifests
    args = serve_config(one(docs, "RayService"))["applications"][0]["args"]
    assert not re.search(r"redis|database|postgres", json.dumps(args), re.I)


def test_no_secret_is_committed_and_the_template_fits_the_manifests():
    """The Secret clip-tenancy is made by hand: no build holds a Secret and no kustomization names the template,
    whose values are placeholders. Its keys are those the manifests read, and its URLs name the Services, with the
    passwords the servers are given."""
    from urllib.parse import urlsplit

    template_text = (TENANCY / "secret.example.yaml").read_text()
    template = yaml.safe_load(template_text)
    assert (template["kind"], template["metadata"]["name"]) == ("Secret", "clip-tenancy") and "data" not in template
    values = template["stringData"]
    assert all("CHANGE-ME" in value for value in values.values())
    for kustomization in K8S.rglob("kustomization.yaml"):  # no file list of any kustomization names it
        assert "secret.example" not in json.dumps(yaml.safe_load(kustomization.read_text())), kustomization
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate({**template, "metadata": {**template["metadata"], "namespace": "clip"}},
                                 K8S_VERSION, strict=True)
    for variant in [*VARIANTS, EXTERNAL]:
        docs = build(variant)
        assert not [d for d in docs if d["kind"] == "Secret"], variant
        read = secret_keys(list(docs), "clip-tenancy")
        assert read == (set(TENANCY_ENV.values()) if variant == EXTERNAL else set(values)), variant
    docs = build("gpu")
    redis, database = urlsplit(values["redis-url"]), urlsplit(values["database-url"])
    assert (redis.scheme, redis.hostname, redis.port, redis.path) == ("redis", "clip-redis", 6379, "/0")
    assert redis.password == values["redis-password"]
    assert (database.scheme, database.username, database.hostname, database.port, database.path) == \
        ("postgresql+asyncpg", "clip", "clip-postgres", 5432, "/clip")
    assert database.password == values["database-password"] != values["postgres-password"]
    for url in (redis, database):
        assert named(docs, "Service", url.hostname)["spec"]["ports"][0]["port"] == url.port
    script = (TENANCY / "postgres-init.sh").read_text()
    assert "CREATE ROLE clip LOGIN PASSWORD" in script and "CREATE DATABASE clip OWNER clip" in script


@pytest.mark.parametrize("readme_path", [TENANCY / "README.md", K8S / "README.md"], ids=["tenancy", "k8s"])
def test_documented_secret_command_makes_the_template_keys(tmp_path: Path, readme_path: Path):
    """k8s/tenancy/README.md's command (and its copy in k8s/README.md's install steps), run with kubectl and
    openssl stubbed: the template's keys, fresh passwords, and URLs that carry the passwords the servers get."""
    from urllib.parse import urlsplit

    readme = readme_path.read_text()
    (block,) = [b for b in re.findall(r"```sh\n(.*?)```", readme, re.S) if "--from-literal=redis-password" in b]
    stubs = ("kubectl() { printf '%s\\n' \"$@\"; }\n"  # prints its arguments, one a line
             "openssl() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \\n'; }\n")  # 48 hex digits
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", stubs + block], capture_output=True, text=True,
                         timeout=30, check=True).stdout.splitlines()
    made = dict(line.removeprefix("--from-literal=").split("=", 1) for line in out
                if line.startswith("--from-literal="))
    values = yaml.safe_load((TENANCY / "secret.example.yaml").read_text())["stringData"]
    assert set(made) == set(values) and "clip-tenancy" in out
    assert len({made["redis-password"], made["postgres-password"], made["database-password"]}) == 3
    assert all(re.fullmatch(r"[0-9a-f]{48}", made[k]) for k in ("redis-password", "postgres-password",
                                                                "database-password"))
    assert urlsplit(made["redis-url"]).password == made["redis-password"]
    assert urlsplit(made["database-url"]).password == made["database-password"]
    for key in ("redis-url", "database-url"):
        assert made[key].replace(urlsplit(made[key]).password, "X") == \
            values[key].replace(urlsplit(values[key]).password, "X")


# ------------------------------------------------------------------ customers' keys file (the Secret clip-keys)

KEYS_SECRET = "clip-keys"
KEYS_TEMPLATE = K8S / "base" / "clip-keys.example.yaml"
SECRET_TOKEN = re.compile(r"sk-[A-Za-z0-9_-]{16,}")  # what clip-keys hands out (`sk-clip-` + 43 characters)


def keys_mount(spec: dict) -> tuple[dict, dict, str]:
    """A worker pod's keys volume, its mount in the Ray container, and the file CLIP_KEYS_FILE names."""
    (volume,) = [v for v in spec["volumes"] if v.get("secret", {}).get("secretName") == KEYS_SECRET]
    container = spec["containers"][0]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    (env,) = [e for e in container["env"] if e["name"] == "CLIP_KEYS_FILE"]
    return volume, mount, env["value"]


@pytest.mark.parametrize("variant", [*VARIANTS, EXTERNAL])
def test_keys_file_reaches_only_the_ingress_pods_as_a_directory(variant: str):
    """The Secret clip-keys is a read-only directory (no subPath: a subPath mount never sees a Secret's update)
    on every pod that can run an ingress replica (the worker groups) and nowhere else (not the head, which runs
    none, its autoscaler, the Job or an init container); CLIP_KEYS_FILE names its file, at the volume's top,
    where the kubelet keeps the symlink into `..data` that it swaps on an update."""
    docs = build(variant)
    rayservice = one(docs, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    assert KEYS_SECRET not in json.dumps(cluster["autoscalerOptions"])
    ingress_cpus = serve_config(rayservice)["applications"][0]["args"]["ingress"]["num_cpus"]
    mounted = set()
    for name, spec in pod_specs(docs).items():
        text = json.dumps(spec)
        if name in ("head", "fetch-weights"):
            assert KEYS_SECRET not in text and "CLIP_KEYS_FILE" not in text, name
            continue
        container = spec["containers"][0]
        assert float(container["resources"]["limits"]["cpu"]) >= ingress_cpus, name  # an ingress fits here
        volume, mount, path = keys_mount(spec)
        assert volume["secret"]["defaultMode"] == 0o440, name  # the pod's user and group (fsGroup) only
        assert not volume["secret"].get("optional"), name  # no Secret: the pod waits, no ingress fails on start
        assert mount["readOnly"] is True and "subPath" not in mount and "subPathExpr" not in mount, name
        items = {i["key"]: i["path"] for i in volume["secret"].get("items", [])} or {"keys.yaml": "keys.yaml"}
        assert set(items) == {"keys.yaml"} and "/" not in items["keys.yaml"], name
        assert path == f"{mount['mountPath']}/{items['keys.yaml']}", name
        assert not [m for m in container["volumeMounts"] if m["mountPath"] != mount["mountPath"] and
                    (m["mountPath"] + "/").startswith(mount["mountPath"] + "/")], name  # nothing mounted over it
        for init in spec.get("initContainers", []):
            assert KEYS_SECRET not in json.dumps(init) and volume["name"] not in json.dumps(init), name
        mounted.add(name)
    workers = {n for n, labels in pod_labels(docs).items() if labels.get("ray.io/node-type") == "worker"}
    assert mounted == workers and workers
    # no Secret anywhere is mounted through subPath (every one of them would miss its updates)
    for name, spec in pod_specs(docs).items():
        secrets = {v["name"] for v in spec.get("volumes", []) if "secret" in v}
        for container in spec["containers"] + spec.get("initContainers", []):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] not in secrets or not ({"subPath", "subPathExpr"} & set(mount)), (name, mount)


def test_keys_template_holds_hashes_only():
    """k8s/base/clip-keys.example.yaml is the Secret's template, applied by nothing: its keys file loads, every
    secret in it is a `sha256:` hash (the loader would hash a plain one silently: the raw text is checked), and
    no file under k8s/ holds a secret clip-keys would hand out. No build holds a Secret."""
    from serve_app.tenancy.keys import HASH_PREFIX, parse_keys_file

    template = yaml.safe_load(KEYS_TEMPLATE.read_text())
    assert (template["kind"], template["metadata"]["name"]) == ("Secret", KEYS_SECRET) and "data" not in template
    assert set(template["stringData"]) == {"keys.yaml"}
    text = template["stringData"]["keys.yaml"]
    raw = yaml.safe_load(text)
    entries = raw.get("keys", []) + raw.get("admin_keys", [])
    assert raw.get("keys") and raw.get("admin_keys")  # an example of each
    for entry in entries:
        assert entry["secrets"] and all(re.fullmatch(HASH_PREFIX + "[0-9a-f]{64}", s) for s in entry["secrets"]), \
            entry["id"]
    ring = parse_keys_file(text, str(KEYS_TEMPLATE))
    assert set(ring.keys) == {e["id"] for e in entries}
    for path in K8S.rglob("*"):
        if path.is_file():
            assert not SECRET_TOKEN.search(path.read_text(errors="replace")), path
    for kustomization in K8S.rglob("kustomization.yaml"):  # no kustomization names a template
        assert ".example.yaml" not in json.dumps(yaml.safe_load(kustomization.read_text())), kustomization
    for variant in [*VARIANTS, EXTERNAL]:
        docs = build(variant)
        assert not [d for d in docs if d["kind"] == "Secret"], variant
        assert secret_keys(list(docs), KEYS_SECRET) == set(template["stringData"]), variant
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate({**template, "metadata": {**template["metadata"], "namespace": "clip"}},
                                 K8S_VERSION, strict=True)


def test_probe_key_stays_valid_beside_the_keys_file(tmp_path: Path):
    """The readiness probe's key (the first plain key of clip-api-keys) gets in beside the keys file, as the
    ingress builds its keys (serve_app/ingress.py: the plain keys, then the file): a derived id, no rate limit
    whatever the file's `defaults`, no credit limit (never 429 insufficient_quota), not an admin key (/health is
    an API route)."""
    import asyncio

    from serve_app.config import TenancySettings
    from serve_app.tenancy.gate import Tenancy
    from serve_app.tenancy.keys import KeyLimits, KeyRing

    api_keys = tmp_path / "api-keys"
    api_keys.write_text("# the probe's key first\nprobe-key\n")
    keys_file = tmp_path / "keys.yaml"
    text = yaml.safe_load(KEYS_TEMPLATE.read_text())["stringData"]["keys.yaml"]
    keys_file.write_text(text.replace("requests_per_minute: 3000", "requests_per_minute: 1"))  # tight defaults
    plain = resolve_api_keys(None, None, environ={"CLIP_API_KEYS_FILE": str(api_keys)})
    tenancy = Tenancy(TenancySettings(), KeyRing.from_secrets(plain), environ={
        "CLIP_KEYS_FILE": str(keys_file), "CLIP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'usage.db'}"})
    assert tenancy.enabled and {"key_example", "key_ops"} <= set(tenancy.ring.keys)
    tenant = tenancy.authenticate("Bearer probe-key", bearer_token("Bearer probe-key"), "/health", "req_probe")
    key = tenant.key
    assert re.fullmatch(r"key_[0-9a-f]{16}", key.id) and not key.admin
    assert key.limits == KeyLimits() and key.credit_nano_usd is None and tenancy.remaining_credit(key) is None

    async def probes() -> None:
        for _ in range(5):  # past any per-minute limit of 1: none applies to this key
            await tenancy.admit(tenancy.authenticate("Bearer probe-key", b"probe-key", "/health", "req_probe"))

    asyncio.run(probes())


def test_mounted_keys_file_reloads_on_a_secret_update(tmp_path: Path):
    """The kubelet's Secret volume (its atomic writer): each version in a `..<timestamp>` directory, `..data` a
    symlink to the current one, and the file a symlink into `..data`; an update writes a new directory and swaps
    `..data` in one rename. CLIP_KEYS_FILE, as the manifest names it, follows the swap (a new inode: reloaded,
    even at the same size); the file a subPath mount pins (the version resolved at the container's start) never
    changes."""
    from serve_app.tenancy.keys import KeysFile

    _, mount, path = keys_mount(ray_pod_specs(one(build("gpu"), "RayService"))["gpu-group"])
    name = os.path.relpath(path, mount["mountPath"])
    volume = tmp_path / "volume"
    volume.mkdir()
    text = yaml.safe_load(KEYS_TEMPLATE.read_text())["stringData"]["keys.yaml"]

    def write_version(stamp: str, content: str) -> Path:
        version = volume / f"..{stamp}"
        version.mkdir()
        (version / name).write_text(content)
        (volume / "..data_tmp").symlink_to(version.name)
        os.replace(volume / "..data_tmp", volume / "..data")
        return version / name

    first = write_version("2025_01_01_00_00_00.000000001", text)
    (volume / name).symlink_to(f"..data/{name}")
    watched, pinned = KeysFile(str(volume / name)), KeysFile(str(first))
    assert "key_example_billed" in watched.ring.keys and not watched.reload_if_changed()
    # the same length: a revoked id renamed, one secret replaced by another hash
    rotated = text.replace("key_example_billed", "key_example_renewd").replace(
        "sha256:56bd1a84941c2ba408acc3b7bc1f392b7a0014f05743f1f44c5409b7bf05ad51", "sha256:" + "0" * 64)
    assert len(rotated) == len(text)
    write_version("2025_01_01_00_01_00.000000001", rotated)
    assert watched.reload_if_changed() and set(watched.ring.keys) == {"key_example", "key_example_renewd", "key_ops"}
    assert not pinned.reload_if_changed() and "key_example_billed" in pinned.ring.keys


def test_documented_keys_commands_make_a_secret_of_hashes(tmp_path: Path):
    """k8s/README.md's clip-keys commands, run with kubectl and openssl stubbed and clip-keys as the module: the
    install makes a keys file of hashes whose secrets (on stderr, once) get in as their ids, and the Secret from
    it; the edit fetches the cluster's file, adds a key, hashes a rotated secret and applies the file back."""
    import sys

    from serve_app.tenancy.keys import parse_keys_file

    readme = (K8S / "README.md").read_text()
    install, edit = [b for b in re.findall(r"```sh\n(.*?)```", readme, re.S) if "clip-keys new" in b]
    stubs = (f"clip-keys() {{ {sys.executable} -m serve_app.tenancy.cli \"$@\"; }}\n"
             "openssl() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; }\n"
             "kubectl() { case \" $* \" in\n"
             "  *' get secret clip-keys '*) base64 -w0 < cluster-keys.yaml ;;\n"  # what the cluster holds
             "  *' apply -f - '*) cat > applied ;;\n"
             "  *) printf '%s\\n' \"$@\" > created ;;\n"
             "esac; }\n")

    def run(block: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-euo", "pipefail", "-c", stubs + block], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})

    out = run(install)
    text = (tmp_path / "keys.yaml").read_text()
    assert not SECRET_TOKEN.search(text) and set(re.findall(r"sha256:[0-9a-f]{64}", text))
    ring = parse_keys_file(text)
    shown = dict(re.findall(r"secret of (key_\w+) \(shown once\): (\S+)", out.stderr))
    assert set(shown) == set(ring.keys) == {"key_ops", "key_acme"}
    assert all(ring.find(secret.encode()).id == key_id for key_id, secret in shown.items())
    assert ring.keys["key_ops"].admin and ring.keys["key_acme"].credit_nano_usd == 5 * 10**9
    assert (tmp_path / "created").read_text().split() == [
        "-n", "clip", "create", "secret", "generic", "clip-keys", "--from-file=keys.yaml=keys.yaml"]

    (tmp_path / "keys.yaml").rename(tmp_path / "cluster-keys.yaml")
    out = run(edit)
    ring = parse_keys_file((tmp_path / "keys.yaml").read_text())
    assert set(ring.keys) == {"key_ops", "key_acme", "key_globex"}
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", out.stdout.strip())  # the rotated secret's line for the file
    created = (tmp_path / "created").read_text().split()
    assert created[:6] == ["-n", "clip", "create", "secret", "generic", "clip-keys"]
    assert {"--from-file=keys.yaml=keys.yaml", "--dry-run=client", "yaml"} <= set(created)


# ------------------------------------------------------------------ the dataset job (k8s/batch)

BATCH = K8S / "batch"


@cache
def batch_docs() -> tuple[dict, ...]:
    """k8s/batch as kustomize builds it, else its resources as written (the image left as `clip-serve`)."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(BATCH)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return tuple(d for d in yaml.safe_load_all(out.stdout) if d)
    return tuple(_resources(BATCH, yaml.safe_load((BATCH / "kustomization.yaml").read_text())))


def rayjob_pod_specs(rayjob: dict) -> dict[str, dict]:
    specs = ray_pod_specs({"spec": {"rayClusterConfig": rayjob["spec"]["rayClusterSpec"]}})
    specs["submitter"] = rayjob["spec"]["submitterPodTemplate"]["spec"]
    return specs


def rayjob_pod_labels(rayjob: dict) -> dict[str, dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    labels = {"head": cluster["headGroupSpec"]["template"]["metadata"]["labels"]}
    labels.update({g["groupName"]: g["template"]["metadata"]["labels"] for g in cluster["workerGroupSpecs"]})
    labels["submitter"] = rayjob["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    return labels


def entrypoint_args(rayjob: dict):
    import shlex

    from serve_app.batch.cli import build_parser

    command, *argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert command == "clip-embed"
    return build_parser().parse_args(argv)


def test_rayjob_validates_against_kuberay_crd():
    rayjob = one(batch_docs(), "RayJob")
    jsonschema.validate(rayjob, crd_schema("RayJob"))
    assert unknown_fields(rayjob["spec"], crd_schema("RayJob")["properties"]["spec"], "spec") == []
    # the RayCluster KubeRay makes from it validates against the RayCluster CRD too
    raycluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "clip-embed-x"},
                  "spec": rayjob["spec"]["rayClusterSpec"]}
    jsonschema.validate(raycluster, crd_schema("RayCluster"))
    broken = copy.deepcopy(rayjob)
    broken["spec"]["shutdownAfterJobFinish"] = True  # a typo the API server would drop silently
    assert unknown_fields(broken["spec"], crd_schema("RayJob")["properties"]["spec"], "spec") == [
        "spec.shutdownAfterJobFinish"]


def test_rayjob_core_objects_validate_against_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = batch_docs()
    assert {d["kind"] for d in docs} == {"RayJob", "NetworkPolicy"}
    kubernetes_validate.validate(one(docs, "NetworkPolicy"), K8S_VERSION, strict=True)
    for name, spec in rayjob_pod_specs(one(docs, "RayJob")).items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_rayjob_runs_clip_embed_with_the_service_model_on_a_cluster_of_its_own():
    """The entrypoint parses with clip-embed's own parser; the model, Ray version and token auth are the service's;
    the cluster goes after the job; the actors it asks for fit the pods (else the job would wait forever)."""
    rayjob = one(batch_docs(), "RayJob")
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] == "K8sJobMode" and spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] > 0
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["clip-embed"] == "serve_app.batch.cli:main"
    args = entrypoint_args(rayjob)
    assert args.source.startswith("s3://") and args.out.startswith("s3://") and not args.overwrite
    service = one(build("gpu"), "RayService")
    served = serve_config(service)["applications"][0]["args"]
    assert args.model == served["model"] and args.pretrained == served.get("pretrained")
    assert args.precision in ("auto", served["precision"]) and served["precision"] == "bf16"  # auto: bf16 on a GPU
    cluster, service_cluster = spec["rayClusterSpec"], service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == service_cluster["rayVersion"]
    assert cluster["authOptions"] == service_cluster["authOptions"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu-group"]
    assert gpu["replicas"] == gpu["minReplicas"] == gpu["maxReplicas"] == args.concurrency
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert float(limits["nvidia.com/gpu"]) == args.num_gpus == 1
    from serve_app.batch.dataset import TASK_CPUS

    worker_cpus = sum(float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) * g["replicas"]
                      for g in groups.values())
    assert args.concurrency * args.encoder_cpus + args.preprocess_concurrency + TASK_CPUS <= worker_cpus
    assert args.encoder_cpus <= float(limits["cpu"])
    # the same image as the service's pods, and every pod that loads the model reads the service's cache offline
    images = {c["image"] for s in rayjob_pod_specs(rayjob).values()
              for c in s["containers"] + s.get("initContainers", [])}
    service_images = {c["image"] for s in ray_pod_specs(service).values() for c in s["containers"]}
    assert images == service_images and len(images) == 1
    for name in groups:
        pod = rayjob_pod_specs(rayjob)[name]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HOME"].startswith("/models/")
        (cache_volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert cache_volume["persistentVolumeClaim"] == {"claimName": one(build("gpu"), "PersistentVolumeClaim")[
            "metadata"]["name"], "readOnly": True}
        assert args.model in pod["initContainers"][0]["command"][-1]


def test_rayjob_pods_run_confined_and_apart_from_the_service():
    """The service's hardening on every pod of the job (submitter included); no pod holds a Kubernetes API token;
    the job's pods are outside the service's NetworkPolicy (no Ray traffic between the two clusters) and inside
    the job's own, whose egress is DNS, its pods and HTTPS to public addresses (never the metadata address)."""
    rayjob = one(batch_docs(), "RayJob")
    service_security = ray_pod_specs(one(build("gpu"), "RayService"))["head"]["securityContext"]
    for name, spec in rayjob_pod_specs(rayjob).items():
        assert spec["securityContext"] == service_security, name
        assert spec["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                               "readOnlyRootFilesystem": True}, (name, container["name"])
            (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert "emptyDir" in volumes[tmp["name"]], (name, container["name"])
    service_policy = named(build("gpu"), "NetworkPolicy", "clip-ray")
    job_policy = one(batch_docs(), "NetworkPolicy")
    for name, labels in rayjob_pod_labels(rayjob).items():
        assert not selects(service_policy, labels), name
        assert selects(job_policy, labels), name
    assert job_policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    for rule in job_policy["spec"]["egress"]:
        for peer in rule["to"]:
            if "ipBlock" in peer:
                assert "169.254.0.0/16" in peer["ipBlock"]["except"] and "10.0.0.0/8" in peer["ipBlock"]["except"]
                assert [p["port"] for p in rule["ports"]] == [443]
            else:
                assert peer.get("podSelector", {}).get("matchLabels") in (
                    {"app.kubernetes.io/name": "clip-embed-job"}, {"k8s-app": "kube-dns"})
