"""A real multi-node run on shared object storage, on one machine: `make cluster-demo`.

What a cluster deployment needs, each part real and started here on 127.0.0.1:
- an S3-compatible object store (moto's standalone server) holding the shard `storage` and Tune's
  `results_path` as s3:// URIs, reached through AWS_ENDPOINT_URL as any S3 endpoint would be;
- `mlflow server` as the tracking URI, with proxied artifacts kept in the same bucket, so trials on any node
  log through HTTP and never need the store's credentials for MLflow;
- a Ray head and a second Ray node joined with `ray start --address`, both with token authentication, one CPU
  each, so the smoke sweep's trials (one CPU each) run on both;
- the smoke sweep submitted with `ray job submit --working-dir .`, as on a real cluster.

Then it checks where everything went (`inspect`): the shards and manifest in the bucket, the node each trial
ran on (from Tune's results in the bucket), every child run and its artifacts in the MLflow server, and no file
written under the checkout. tests/test_cluster.py runs the same and asserts each fact.

Each Ray node has its own temp dir, which keeps them apart from each other and from any other Ray on the machine:
the demo stops only the processes of its own nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.ray_token import ensure_token, ray_cli

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BUCKET = "sae-frontier-demo"
SPEC = "smoke"
# moto accepts any credentials; these only have to be present for the S3 clients (pyarrow, boto3)
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1"}
# what a checkout's snapshot leaves out: the venv, git's own files, and what Python and pytest cache themselves
SNAPSHOT_SKIP = {".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports: all bound at once, so no two are the same; released together on return."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def processes_under(temp_root: Path) -> list:
    """The processes whose command line names temp_root (a Ray node started with --temp-dir under it)."""
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if str(temp_root) in " ".join(p.info["cmdline"] or [])]


def stop_ray_under(temp_root: Path, grace: float = 20.0) -> None:
    """Stop this demo's Ray nodes only: `ray stop` would stop every Ray on the machine, a test's or a user's too."""
    import psutil

    ours = processes_under(temp_root)
    for p in ours:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(ours, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


def wait_http(url: str, what: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            if time.time() > deadline:
                raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f} s") from None
            time.sleep(0.5)


@dataclass
class Cluster:
    """The endpoints of a running demo cluster, and the environment a client of it needs."""

    work: Path
    s3_endpoint: str
    tracking_uri: str
    gcs_address: str
    dashboard: str
    ray_temp: Path  # every node's temp dir is under it: how the demo finds (and stops) its own Ray processes
    env: dict[str, str] = field(repr=False)

    @property
    def storage(self) -> str:
        return f"s3://{BUCKET}/shards"

    @property
    def results_path(self) -> str:
        return f"s3://{BUCKET}/ray_results"

    @property
    def artifacts(self) -> str:
        return f"s3://{BUCKET}/mlflow-artifacts"


def _spawn(stack: ExitStack, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = log.open("w")
    proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    stack.callback(out.close)
    stack.callback(stop_process, proc)
    return proc


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a server we started, and kill it if it has not exited within 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _ray(args: list[str], env: dict[str, str], timeout: float = 180) -> str:
    done = subprocess.run([ray_cli(), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"`ray {' '.join(args)}` failed (exit {done.returncode}):\n"
                           f"{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def _node_ports() -> list[str]:
    """The ports a Ray node binds that default to fixed numbers: a second node on one machine needs its own."""
    names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port", "node-manager-port", "object-manager-port")
    return [f"--{name}={port}" for name, port in zip(names, free_ports(len(names)), strict=True)]


@contextmanager
def cluster(work: Path, log=print) -> Iterator[Cluster]:
    """Start the object store, the MLflow server and a two-node Ray cluster; stop them all on exit."""
    log(ensure_token())
    s3_port, mlflow_port, gcs_port, dash_port, client_port = free_ports(5)
    s3 = f"http://127.0.0.1:{s3_port}"
    env = {**os.environ, **S3_CREDENTIALS, "AWS_ENDPOINT_URL": s3, "MLFLOW_S3_ENDPOINT_URL": s3,
           "RAY_AUTH_MODE": "token", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    # short: Ray's socket paths under it must fit 107 bytes; resolved: the processes name it by its real path
    nodes = Path(tempfile.mkdtemp(prefix="sfc-")).resolve()
    demo = Cluster(work=work, s3_endpoint=s3, tracking_uri=f"http://127.0.0.1:{mlflow_port}",
                   gcs_address=f"127.0.0.1:{gcs_port}", dashboard=f"http://127.0.0.1:{dash_port}",
                   ray_temp=nodes, env=env)
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, nodes, True)
        log(f"[demo] S3-compatible store (moto) on {s3}, bucket {BUCKET}")
        _spawn(stack, [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], env, work / "moto.log")
        wait_http(s3, "the moto S3 server")
        import boto3

        boto3.client("s3", endpoint_url=s3, region_name=env["AWS_DEFAULT_REGION"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=BUCKET)

        log(f"[demo] mlflow server on {demo.tracking_uri}, artifacts proxied to {demo.artifacts}")
        _spawn(stack, [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{work}/mlflow.db",
                       "--artifacts-destination", demo.artifacts, "--host", "127.0.0.1", "--port", str(mlflow_port),
                       "--workers", "1"], env, work / "mlflow.log")
        wait_http(f"{demo.tracking_uri}/health", "the MLflow server")

        stack.callback(stop_ray_under, nodes)
        log(f"[demo] Ray head on {demo.gcs_address} (dashboard {demo.dashboard}), then a second node joins it")
        # each node its own temp dir: nodes sharing one would unpack the job's working dir over each other's
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
        _ray(["start", "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
              f"--ray-client-server-port={client_port}",
              f"--temp-dir={nodes / 'head'}", *common, *_node_ports()], env)
        _ray(["start", f"--address={demo.gcs_address}", f"--temp-dir={nodes / 'node2'}", *common, *_node_ports()], env)
        yield demo


def ray_nodes(demo: Cluster) -> list[dict[str, Any]]:
    """The cluster's alive nodes, from Ray's state API: node_id and is_head_node of each."""
    out = _ray(["list", "nodes", "--address", demo.gcs_address, "--format", "json", "--filter", "state=ALIVE"],
               demo.env)
    return json.loads(out)


def submit(demo: Cluster, spec: str = SPEC, log=print, echo=print) -> tuple[str, str]:
    """`ray job submit --working-dir .` of a sweep whose storage, results and tracking are the demo's; returns
    the job id and its log. Raises RuntimeError with the log's tail when the job fails."""
    runtime_env = yaml.safe_load((ROOT / "sweeps" / "runtime_env.yaml").read_text())
    # a real cluster gives its nodes credentials and the endpoint; here the job carries them to every worker
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}),
                               **{k: demo.env[k] for k in (*S3_CREDENTIALS, "AWS_ENDPOINT_URL")}}
    env_file = demo.work / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))
    args = [ray_cli(), "job", "submit", "--address", demo.dashboard, "--working-dir", ".",
            "--runtime-env", str(env_file), "--", "python", "sweeps/frontier.py", "--spec", spec,
            "--storage", demo.storage, "--results-path", demo.results_path, "--tracking-uri", demo.tracking_uri]
    log(f"[demo] {' '.join(args[1:])}")
    lines = []
    with subprocess.Popen(args, cwd=ROOT, env=demo.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc, (demo.work / "job.log").open("w") as out:
        for line in proc.stdout:  # the job's log as it runs: to the log file, and to `echo` (the terminal)
            out.write(line)
            lines.append(line)
            if echo is not None:
                echo(line.rstrip("\n"))
    said = "".join(lines)
    if proc.returncode != 0:
        raise RuntimeError(f"the job failed (exit {proc.returncode}); its log ends:\n{said[-4000:]}")
    job = re.search(r"raysubmit_\w+", said)
    if job is None:
        raise RuntimeError(f"no job id in the output of `ray job submit`:\n{said[-4000:]}")
    return job.group(0), said


def snapshot(root: Path = ROOT) -> dict[str, tuple[int, int]]:
    """Every file under the checkout (less SNAPSHOT_SKIP) with its size and mtime: what a run must not touch."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SNAPSHOT_SKIP]
        for name in filenames:
            path = Path(dirpath) / name
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def bucket_keys(demo: Cluster, prefix: str) -> tuple[list[str], Any]:
    """The object keys under s3://BUCKET/prefix (less the bucket), and the filesystem that reads them."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=demo.s3_endpoint, scheme="http", region=demo.env["AWS_DEFAULT_REGION"],
                           access_key=demo.env["AWS_ACCESS_KEY_ID"], secret_key=demo.env["AWS_SECRET_ACCESS_KEY"])
    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return sorted(i.path.removeprefix(f"{BUCKET}/") for i in infos if i.type == pafs.FileType.File), fs


def trial_nodes(demo: Cluster) -> dict[str, str]:
    """Tune trial id -> the Ray node it ran on, from the trials' result.json files in the bucket."""
    keys, fs = bucket_keys(demo, "ray_results")
    nodes = {}
    for key in keys:
        parts = key.split("/")  # ray_results/<sweep>/<trial>/result.json; a point's own result.json lies deeper
        if len(parts) != 4 or parts[-1] != "result.json":
            continue
        with fs.open_input_stream(f"{BUCKET}/{key}") as f:
            for line in f.read().decode().splitlines():
                result = json.loads(line)
                if result.get("node_id"):
                    nodes[result["trial_id"]] = result["node_id"]
    return nodes


def child_runs(demo: Cluster, experiment: str) -> list[dict[str, Any]]:
    """The sweep's child runs in the MLflow server: status and top-level artifact paths of each."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import KIND_TAG

    client = MlflowClient(demo.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`{KIND_TAG}` = 'trial'", max_results=1000)
    return [{"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
             "artifacts": sorted(a.path for a in client.list_artifacts(r.info.run_id))} for r in runs]


def inspect(demo: Cluster, experiment: str, before: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Where the run went: the facts `make cluster-demo` prints and tests/test_cluster.py asserts."""
    nodes = ray_nodes(demo)
    head = {n["node_id"] for n in nodes if n["is_head_node"]}
    ran_on = trial_nodes(demo)
    after = snapshot()
    shard_keys, _ = bucket_keys(demo, "shards")
    artifact_keys, _ = bucket_keys(demo, "mlflow-artifacts")
    return {
        "nodes": len(nodes),
        "shard_files": [k for k in shard_keys if k.endswith(".parquet")],
        "manifests": [k for k in shard_keys if k.endswith("manifest.json")],
        "trials": len(ran_on),
        "trials_on_head": sum(n in head for n in ran_on.values()),
        "trials_on_second_node": sum(n not in head for n in ran_on.values()),
        "child_runs": child_runs(demo, experiment),
        "artifact_objects": artifact_keys,
        "checkout_changed": sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)),
    }


def main() -> int:
    from orchestrator.spec import load_spec

    experiment = load_spec(SPEC).experiment_name
    before = snapshot()
    work = Path(tempfile.mkdtemp(prefix="sae-frontier-cluster-"))
    try:
        with cluster(work) as demo:
            job, _ = submit(demo)
            facts = inspect(demo, experiment, before)
    except RuntimeError as err:  # the servers' and the job's logs stay for a look
        print(f"error: {err}\nlogs: {work}", file=sys.stderr)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    runs = facts["child_runs"]
    print(f"\n=== cluster demo: job {job} ===")
    print(f"Ray nodes: {facts['nodes']}; trials on the head: {facts['trials_on_head']}, "
          f"on the second node: {facts['trials_on_second_node']}")
    print(f"bucket: {len(facts['shard_files'])} shard files and {len(facts['manifests'])} manifests under "
          f"s3://{BUCKET}/shards, {len(facts['artifact_objects'])} MLflow artifact objects")
    print(f"MLflow server: {len(runs)} child runs, "
          f"{sum(r['status'] == 'FINISHED' for r in runs)} FINISHED, artifacts {runs[0]['artifacts'] if runs else []}")
    print(f"files written under the checkout: {len(facts['checkout_changed'])} {facts['checkout_changed'][:10]}")
    ok = (facts["trials_on_second_node"] > 0 and facts["manifests"] and runs
          and all(r["status"] == "FINISHED" for r in runs) and not facts["checkout_changed"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
