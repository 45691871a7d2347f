"""The RayService's worker groups, run by Ray's own autoscaler as fake nodes on this machine.

No Kubernetes here, so the chain KubeRay relies on is shown one level down, where it happens: Ray's autoscaler
(v2, the one `enableInTreeAutoscaling` runs beside the head) is started over the fake multi-node provider with
node types built from k8s/base/rayservice.yaml's worker groups (Ray resources, min/max replicas, idle timeout),
the RayService's own serveConfigV2 is deployed with the tiny model swapped in, and a burst must drive:
queue depth -> more encoder replicas -> pending GPU demand -> a new (fake) GPU node -> replicas placed ->
every request answered -> load ends -> replicas scale down -> the idle node removed.
KubeRay's part (turning the autoscaler's node requests into pods) is the only piece not exercised.

What the simulation changes, and why (everything else comes from the manifest):
- sizes: every Ray CPU figure (node types and replicas alike) times CPU_SCALE, so the GPU group's 7 CPUs become
  2 and the shapes stay the same; GPU nodes still advertise GPU: 1, and the encoder keeps num_gpus: 1 but runs
  `device: cpu` in fp32 (no GPU here); group maxima capped at MAX_NODES_PER_GROUP;
- time: the idle timeout times TIME_SCALE, the encoder's autoscaling reacts in seconds (no upscale delay, 5 s
  downscale delay, 2 s look-back), so that the whole cycle fits in about two minutes;
- load: the encoder waits SIM_BATCH_WAIT_S to fill each batch, standing in for a GPU pass, so that its queue is
  the one that grows; the burst is small beside production's batches of 128, so the queue-depth policy's
  `target_fill` is SIM_TARGET_FILL (a replica per 1/20 of a batch waiting) instead of 1. Serve's own request
  count for the encoder pool stays at or below 1 here (`encoder_requests` in the samples): a request-count
  policy would not scale at all;
- one machine, one HTTP port: proxy_location HeadOnly, the preprocessor and ingress pools at one replica each,
  and private port ranges for HAProxy and direct ingress (`serve_app.ray_env.node_ports`);
- Ray token auth on, as `authOptions` turns it on for the pods.

Ray's wheel lacks the fake_multinode example config (`AutoscalingCluster` fails), so this starts
`ray start --head --autoscaling-config` with the provider given as an external module (PERF-NOTES.md), in a
session of its own with a private --temp-dir and free ports, and kills that session at the end.
"""

import copy
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from serve_app.processes import session_members as _session_members
from serve_app.processes import signal_session
from serve_app.ray_env import ONE_MACHINE_ENV, free_port, haproxy_env, node_ports, serve_env

ROOT = Path(__file__).resolve().parents[2]
RAYSERVICE = ROOT / "k8s" / "base" / "rayservice.yaml"

GPU_GROUP_SIM_CPUS = 2.0  # the GPU group's Ray CPUs on this machine; CPU_SCALE follows from the manifest
TIME_SCALE = 1 / 20  # the manifest's 300 s idle timeout -> 15 s
MAX_NODES_PER_GROUP = 2
SERVED_NAME = "k8s-sim-clip"  # not the session app's name: a request that reached another Ray instance fails
ENCODER = f"ClipEncoder-{SERVED_NAME}"
CLIENTS = 8
IMAGES_PER_REQUEST = 2
# The encoder waits this long to fill each batch: it stands in for a GPU pass, which makes the encoder the
# bottleneck (its queue is what grows) without burning this machine's two cores (a tiny model encodes in ~1 ms).
SIM_BATCH_WAIT_S = 0.25
SIM_TARGET_FILL = 0.05
LOAD_LIMIT_S = 100  # the burst stops after this even if the cluster never scaled (then the test fails)
SCALE_DOWN_LIMIT_S = 90


def quantity(value: str | int | float) -> float:
    """A Kubernetes CPU quantity ("7", "500m") in CPUs."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@dataclass(frozen=True)
class Group:
    name: str
    min_replicas: int
    max_replicas: int
    cpus: float
    gpus: int


def read_rayservice(path: Path = RAYSERVICE) -> tuple[dict, list[Group], int]:
    """(serveConfigV2, worker groups, autoscaler idle timeout in s) of the RayService."""
    rayservice = yaml.safe_load(path.read_text())
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = []
    for spec in cluster["workerGroupSpecs"]:
        limits = spec["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpus = quantity(spec.get("rayStartParams", {}).get("num-cpus", limits["cpu"]))
        groups.append(Group(spec["groupName"], spec["minReplicas"], spec["maxReplicas"], cpus,
                            int(limits.get("nvidia.com/gpu", 0))))
    idle_s = cluster["autoscalerOptions"]["idleTimeoutSeconds"]
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"]), groups, idle_s


def autoscaler_config(groups: list[Group], cpu_scale: float, idle_s: float, gcs_address: str) -> dict:
    """A Ray cluster config whose node types are the RayService's worker groups, on fake nodes."""
    node_types = {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
    }
    for group in groups:
        # Ray's cluster config takes whole CPUs
        resources = {"CPU": max(1, round(group.cpus * cpu_scale)), "object_store_memory": 150 * 1024**2}
        if group.gpus:
            resources["GPU"] = group.gpus
        node_types[group.name] = {
            "resources": resources, "node_config": {},
            "min_workers": group.min_replicas, "max_workers": min(group.max_replicas, MAX_NODES_PER_GROUP),
        }
    return {
        "cluster_name": "clip-k8s-sim",
        "max_workers": sum(t.get("max_workers", 0) for t in node_types.values()),
        "idle_timeout_minutes": idle_s / 60,
        "upscaling_speed": 1.0,
        "provider": {
            "type": "external",
            "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
            "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True,
            "launch_multiple": True, "head_node_id": "fake_head_node_id", "gcs_address": gcs_address,
        },
        "auth": {"ssh_user": "ray"},
        "docker": {},
        "head_node_type": "ray.head.default",
        "available_node_types": node_types,
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def simulated_serve_config(serve_config: dict, model_dir: Path, cpu_scale: float, port: int, max_encoders: int) -> dict:
    """The RayService's serveConfigV2 with the tiny model and this machine's sizes (module docstring)."""
    config = copy.deepcopy(serve_config)
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (application,) = config["applications"]
    args = application["args"]
    args.update(model=f"local-dir:{model_dir}", served_model_name=SERVED_NAME, device="cpu", precision="fp32",
                torch_threads=1, batch_wait_timeout_s=SIM_BATCH_WAIT_S)
    for pool in ("encoder", "preprocessor", "ingress"):
        args[pool]["num_cpus"] = round(args[pool]["num_cpus"] * cpu_scale, 3)
    encoder = args["encoder"]
    assert encoder["num_gpus"] == 1 and encoder["autoscaling_config"]["min_replicas"] == 1
    encoder["autoscaling_config"].update(
        max_replicas=min(encoder["autoscaling_config"]["max_replicas"], max_encoders),
        upscale_delay_s=0, downscale_delay_s=5, metrics_interval_s=0.5,
        policy={"policy_kwargs": {"target_fill": SIM_TARGET_FILL}},
        look_back_period_s=2,
    )
    for pool in ("preprocessor", "ingress"):
        args[pool].pop("autoscaling_config", None)
        args[pool]["num_replicas"] = 1
    return config


def sample(gcs_address: str, t0: float) -> dict:
    """One look at the cluster: the autoscaler's nodes and pending demand, Serve's encoder queue and replicas."""
    import ray
    from ray import serve
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(gcs_address)
    nodes = status.active_nodes + status.idle_nodes
    gpu_demand = sum(
        b.count for d in status.resource_demands.ray_task_actor_demand for b in d.bundles_by_count
        if b.bundle.get("GPU")
    )
    from ray.serve._private.common import DeploymentID
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    # What Serve's autoscaling acts on: requests queued for and running in the encoder pool
    queued = ray.get(controller._get_total_num_requests_for_deployment_for_testing.remote(
        DeploymentID(name=ENCODER, app_name="clip")
    ))
    deployment = serve.status().applications["clip"].deployments[ENCODER]
    states = {str(k).rsplit(".", 1)[-1]: v for k, v in deployment.replica_states.items()}
    return {"t": round(time.time() - t0, 1), "gpu_nodes": sum(n.ray_node_type_name == "gpu-group" for n in nodes),
            "gpu_demand": gpu_demand, "pending_launches": sum(p.count for p in status.pending_launches),
            "encoder_requests": round(queued, 1), "running": states.get("RUNNING", 0), "replicas": sum(states.values()),
            "deployment": str(deployment.status).rsplit(".", 1)[-1], "states": states,
            "nodes": sorted(f"{n.ray_node_type_name}:{n.node_status}" for n in nodes)}


def driver(gcs_address: str, config_path: str) -> None:
    """The Ray driver, in a process of its own (Ray reads its auth settings once per process): deploys the
    Serve config, then prints one JSON sample a line every half second until killed."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = json.loads(Path(config_path).read_text())
    ray.init(address=gcs_address, log_to_driver=False, configure_logging=False)
    serve.start(proxy_location="HeadOnly", http_options=config["http_options"])
    # Not blocking: the first GPU node (minReplicas 1) may still be on its way.
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)
    t0 = float(os.environ["SIM_T0"])
    while True:
        try:
            line = sample(gcs_address, t0)
        except Exception as exc:  # a status call can fail while nodes come and go, or before the app exists
            line = {"t": round(time.time() - t0, 1), "error": repr(exc)[:160]}
        print(json.dumps(line), flush=True)
        time.sleep(0.5)


class Watcher(threading.Thread):
    """Reads the driver's samples and records when each step of the chain was first seen."""

    def __init__(self, stream, t0: float) -> None:
        super().__init__(daemon=True)
        self.stream, self.t0 = stream, t0
        self.events: dict[str, float] = {}
        self.samples: list[dict] = []

    def mark(self, name: str) -> None:
        self.events.setdefault(name, round(time.time() - self.t0, 1))

    def latest(self) -> dict:
        return next((s for s in reversed(self.samples) if "error" not in s), {})

    def run(self) -> None:
        for raw in self.stream:
            try:
                s = json.loads(raw)
            except ValueError:
                continue
            self.samples.append(s)
            if "load_start" not in self.events:
                continue
            if s.get("replicas", 0) >= 2:
                self.mark("encoder_replicas_2")
            if s.get("gpu_demand", 0) >= 1:
                self.mark("pending_gpu_demand")
            if s.get("gpu_nodes", 0) >= 2:
                self.mark("gpu_node_added")
            if s.get("running", 0) >= 2:
                self.mark("replicas_placed")
            if "load_end" in self.events:
                if s.get("replicas", 99) == 1 and s.get("running") == 1:
                    self.mark("replicas_scaled_down")
                if s.get("gpu_nodes", 99) == 1:
                    self.mark("idle_gpu_node_removed")


@pytest.fixture
def simulated_cluster(tmp_path: Path):
    """`ray start --head` with the RayService's groups as fake node types, in a session of its own.

    Yields (gcs_address, env, serve_config, groups, cpu_scale, idle_s); `env` is what the cluster runs with.
    """
    import ray._private.services as services

    serve_config, groups, idle_s = read_rayservice()
    gpu_group = next(g for g in groups if g.gpus)
    cpu_scale = GPU_GROUP_SIM_CPUS / gpu_group.cpus
    gcs_port = free_port()
    gcs_address = f"{services.get_node_ip_address()}:{gcs_port}"
    config_path = tmp_path / "autoscaler.json"
    config_path.write_text(json.dumps(autoscaler_config(groups, cpu_scale, idle_s * TIME_SCALE, gcs_address)))
    temp_dir = Path("/tmp") / f"ray-k8s-sim-{os.getpid()}"  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update({**serve_env(), **haproxy_env()})  # deploy/ray-serve.env and clip-haproxy, as every pod gets them
    env.update({
        **ONE_MACHINE_ENV, **node_ports(),
        # Token auth, as `authOptions: {mode: token}` gives every pod (never ~/.ray/auth_token's token).
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_FAKE_CLUSTER": "1", "RAY_enable_autoscaler_v2": "1",
        "RAY_CLOUD_INSTANCE_ID": "fake_head_node_id", "RAY_OVERRIDE_NODE_ID_FOR_TESTING": "fake_head_node_id",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1", "HF_HUB_OFFLINE": "1",
    })
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--num-cpus=0", "--num-gpus=0",
        f"--port={gcs_port}", f"--temp-dir={temp_dir}", f"--autoscaling-config={config_path}",
        "--include-dashboard=false", f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", "--object-store-memory=200000000", "--disable-usage-stats",
    ]
    log_path = tmp_path / "ray-start.log"
    with open(log_path, "wb") as log:
        starter = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    sid = starter.pid  # the head's daemons, the autoscaler's fake nodes and HAProxy all stay in this session
    try:
        assert starter.wait(timeout=120) == 0, log_path.read_text()[-3000:]
        yield gcs_address, env, serve_config, groups, cpu_scale, idle_s * TIME_SCALE
    finally:
        signal_session(sid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while _session_members(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def test_rayservice_worker_groups_autoscale_under_a_burst(simulated_cluster, tiny_model_dir: Path, tmp_path: Path):
    gcs_address, env, serve_config, groups, cpu_scale, idle_s = simulated_cluster
    t0 = time.time()
    port = free_port()
    config_path = tmp_path / "serve.json"
    config_path.write_text(json.dumps(
        simulated_serve_config(serve_config, tiny_model_dir, cpu_scale, port, MAX_NODES_PER_GROUP)
    ))
    process = subprocess.Popen(
        [sys.executable, __file__, gcs_address, str(config_path)], env={**env, "SIM_T0": str(t0)},
        stdout=subprocess.PIPE, stderr=open(tmp_path / "driver.log", "wb"), text=True, start_new_session=True,
    )
    try:
        watcher = Watcher(process.stdout, t0)
        watcher.start()
        run_burst(watcher, f"http://127.0.0.1:{port}", groups, cpu_scale, idle_s, t0, tmp_path)
    finally:
        signal_session(process.pid, signal.SIGKILL)
        process.wait()


def run_burst(watcher: Watcher, url: str, groups: list[Group], cpu_scale: float, idle_s: float, t0: float,
              tmp_path: Path) -> None:
    deadline = time.monotonic() + 150
    while True:
        try:
            if requests.get(url + "/health", timeout=10).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, (
            f"the app never became healthy; driver: {(tmp_path / 'driver.log').read_text()[-2000:]} "
            f"samples: {watcher.samples[-3:]}"
        )
        time.sleep(1)
    app_ready_s = round(time.time() - t0, 1)
    # minReplicas: one GPU node with one encoder
    deadline = time.monotonic() + 30
    while not (watcher.latest().get("replicas") == 1 and watcher.latest().get("gpu_nodes") == 1):
        assert time.monotonic() < deadline, json.dumps(watcher.samples[-3:])
        time.sleep(0.2)

    from tests.conftest import data_uri, encode, random_image  # not at the top: this file also runs as the driver

    images = [data_uri(encode(random_image(64, 64, seed=k))) for k in range(CLIENTS * IMAGES_PER_REQUEST)]
    payloads = [{"input": images[i * IMAGES_PER_REQUEST:(i + 1) * IMAGES_PER_REQUEST], "modality": "image",
                 "model": SERVED_NAME} for i in range(CLIENTS)]
    stop_load = threading.Event()
    statuses: list[int | str] = []
    livez_s: list[float] = []
    failed: list[tuple] = []  # the first few failures, for the report

    def client(i: int) -> None:
        with requests.Session() as session:
            while not stop_load.is_set():
                try:
                    r = session.post(url + "/v1/embeddings", json=payloads[i], timeout=30)
                    ok = r.status_code == 200 and len(r.json()["data"]) == IMAGES_PER_REQUEST
                    statuses.append(200 if ok else r.status_code)
                    if not ok and len(failed) < 5:
                        failed.append((round(time.time() - t0, 1), r.status_code, r.text[:300]))
                except requests.RequestException as exc:
                    statuses.append(type(exc).__name__)

    livez_answers: list[object] = []
    # one request through every pool first, as production's first traffic after readiness: the liveness check
    # below measures the burst, not the simulated cluster's start-up on this machine's few cores
    warm = requests.post(url + "/v1/embeddings", json=payloads[0], timeout=120)
    assert warm.status_code == 200, warm.text
    watcher.mark("load_start")
    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(client, i) for i in range(CLIENTS)]
        try:
            load_deadline = time.monotonic() + LOAD_LIMIT_S
            while time.monotonic() < load_deadline and "replicas_placed" not in watcher.events:
                time.sleep(0.5)
                if len(livez_s) < 20:  # liveness while the encoders are busy: the ingress answers by itself
                    t = time.perf_counter()
                    try:
                        livez_answers.append(requests.get(url + "/livez", timeout=10).json())
                    except (requests.RequestException, ValueError) as exc:
                        livez_answers.append(type(exc).__name__)
                    livez_s.append(time.perf_counter() - t)
            time.sleep(5)  # a few seconds with both encoders serving
        finally:  # the clients stop whatever happened above, or the pool would wait for them forever
            stop_load.set()
        for future in futures:
            future.result()
    watcher.mark("load_end")
    assert all(answer == {"status": "ok"} for answer in livez_answers), livez_answers

    deadline = time.monotonic() + SCALE_DOWN_LIMIT_S
    while time.monotonic() < deadline and "idle_gpu_node_removed" not in watcher.events:
        time.sleep(0.5)
    events = watcher.events
    failures = [s for s in statuses if s != 200]
    report = {"app_ready_s": app_ready_s, "events_s": events, "requests": len(statuses), "failures": len(failures),
              "livez_max_s": round(max(livez_s, default=0), 3), "total_s": round(time.time() - t0, 1),
              "groups": [g.__dict__ for g in groups], "cpu_scale": round(cpu_scale, 3), "idle_timeout_s": idle_s}
    print("\nsimulated cluster:", json.dumps(report))
    print("samples:", json.dumps([s for s in watcher.samples if "error" not in s][::4]))

    chain = ["load_start", "encoder_replicas_2", "pending_gpu_demand", "gpu_node_added", "replicas_placed",
             "load_end", "replicas_scaled_down", "idle_gpu_node_removed"]
    missing = [step for step in chain if step not in events]
    assert statuses and not failures, f"{len(failures)} of {len(statuses)} failed: {set(map(str, failures))}, {failed}"
    assert not missing, f"steps never seen: {missing}; {report}"
    assert [events[s] for s in chain] == sorted(events[s] for s in chain), f"out of order: {events}"
    assert max(livez_s) < 2.0, livez_s


if __name__ == "__main__":  # the driver process of the test above
    driver(sys.argv[1], sys.argv[2])
