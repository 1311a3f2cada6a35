"""Everything that can refuse a sweep, checked before the sweep writes anything (no `.latest` file, no MLflow
experiment, no shard, no Ray start on a one-machine run).

Each failure is one `SpecError` line that names the spec field (or the input) at fault and how to fix it;
`sweeps/frontier.py` prints it and exits 2. The checks, in order:
- the model loads (config only) and has the site's layer; the corpus loads, has its columns and is not empty;
- `storage` and `results_path` are writable folders (not under a file) with room for the planned shards;
- the tracking store answers within `TRACKING_TIMEOUT_S`, with no retries (MLflow's own client would retry
  for minutes against a closed port);
- each trial's and each harvest actor's CPUs and GPUs fit the largest node (else Tune would wait forever);
- every trial's memory estimate (`orchestrator.packing.trial_memory`: SAEs, Adam state, step temporaries,
  shard buffer, the LM and its cached clean log-probs) fits the largest node; the worst one is printed.
Remote storage (s3://, gs://, ...) is not probed here: that would mean writing to it (docs/reliability.md).
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from orchestrator.packing import MB, MemoryEstimate, plan_packs, trial_device, trial_memory
from orchestrator.spec import SpecError, SweepSpec, is_tracking_server, resolve_path, sqlite_path
from sae.lm import ModelInfo

GB = 1 << 30
TRACKING_TIMEOUT_S = 10.0
DEFAULT_SHARD_ROWS = 16384  # orchestrator.harvest.HarvestConfig.shard_rows: the shard buffer of a trial
_CORPUS_FIELDS = {"corpus", "text_column", "label_column", "text_unit", "corpus_field"}
STORE_OVERHEAD = 1.1  # token ids, labels, manifest and Arrow framing on top of the activations


@dataclass(frozen=True)
class NodeCapacity:
    """The largest node a trial or harvest actor can land on (one machine: this one)."""

    cpus: float
    gpus: float
    memory: int
    where: str


def preflight(spec: SweepSpec, log=print) -> None:
    """Run every check (module docstring); raise SpecError on the first failure."""
    info = check_model_and_corpus(spec)
    check_writable("storage", spec.storage, need=planned_store_bytes(spec, info.d_model))
    check_writable("results_path", spec.results_path, need=0)
    check_tracking(spec.resolved_tracking_uri())
    node = node_capacity()
    check_resources(spec, node)
    worst = check_memory(spec, info, node)
    log(f"[preflight] ok: largest node {node.where} ({node.cpus:g} CPUs, {node.gpus:g} GPUs, "
        f"{node.memory / GB:.1f} GB); estimated peak memory per trial <= {worst.peak / MB:.0f} MB "
        f"(training {worst.train / MB:.0f} MB, evaluation {worst.eval / MB:.0f} MB)")


def check_model_and_corpus(spec: SweepSpec) -> ModelInfo:
    """An unknown model, a layer out of range, a missing text or label column, a corpus_field that is not in the
    file, or an empty corpus, with the field named (the corpus is read with the spec's text_unit and corpus_field,
    as the harvest will read it)."""
    from sae.corpus import load_corpus
    from sae.lm import describe_model

    try:
        info = describe_model(spec.model, revision=spec.revision)
    except (OSError, ValueError) as err:
        raise SpecError(f"model: cannot load {spec.model!r}: {err}") from None
    if not 0 <= spec.layer < info.n_layers:
        raise SpecError(f"site: layer {spec.layer} is out of range for {spec.model} ({info.n_layers} layers, "
                        f"0..{info.n_layers - 1})")
    try:
        corpus = load_corpus(spec.corpus, split=spec.corpus_split, text_column=spec.text_column,
                             label_column=spec.label_column, options=spec.corpus_options())
    except (OSError, ValueError) as err:
        msg = str(err)  # sae.corpus names the field at fault when it is not `corpus` itself
        raise SpecError(msg if msg.split(":", 1)[0] in _CORPUS_FIELDS else f"corpus: {msg}") from None
    if len(corpus) == 0:
        raise SpecError(f"corpus: {spec.corpus!r} (split {spec.corpus_split!r}) is empty")
    return info


def planned_store_bytes(spec: SweepSpec, d: int) -> int:
    """Bytes the train and eval shards will take (0 when both stores already exist: nothing to harvest)."""
    from orchestrator.shards import MANIFEST, ShardStore
    from orchestrator.sweep import harvest_config

    act_bytes = 4 if spec.activation_dtype == "float32" else 2
    need = int((spec.train_tokens + spec.eval_tokens) * d * act_bytes * STORE_OVERHEAD)
    root = Path(resolve_path(spec.storage))
    if "://" in spec.storage or not root.is_dir():
        return need
    done = all(ShardStore.at(str(root), harvest_config(spec, split).key()).has(MANIFEST) for split in ("train", "eval"))
    return 0 if done else need


def check_writable(field: str, path: str, *, need: int) -> None:
    """A local `path` must be (or be creatable as) a writable folder with `need` bytes free; nothing is created."""
    if not path.strip():
        raise SpecError(f"{field}: an empty path; give a folder (or a URI such as s3://bucket/prefix)")
    resolved = resolve_path(path)
    if "://" in resolved and not resolved.startswith("file://"):
        return  # a remote store: checking it would mean writing to it
    target = Path(resolved.removeprefix("file://"))
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SpecError(f"{field}: {path} lies under {existing}, which is a file, not a folder; choose another "
                        f"{field} (or move the file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SpecError(f"{field}: {existing} is not writable, so {path} cannot be created or written; choose a "
                        f"writable {field} or fix the folder's permissions")
    free = shutil.disk_usage(existing).free
    if need > free:
        raise SpecError(f"{field}: the planned shards need about {need / GB:.1f} GB but {existing} has "
                        f"{free / GB:.1f} GB free; free some space, choose another {field}, or lower "
                        f"train_tokens / eval_tokens")


def check_tracking(uri: str, timeout: float = TRACKING_TIMEOUT_S) -> None:
    """The tracking store answers: a local SQLite file or folder must be writable, a server must reply (any HTTP
    status counts: an authenticating server that says 401 is up) within `timeout` seconds, one attempt."""
    if (db := sqlite_path(uri)) is not None:
        check_writable("tracking_uri", str(db.parent), need=0)
    elif is_tracking_server(uri):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
                pass
        except urllib.error.HTTPError:
            pass  # it answered
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise SpecError(f"tracking_uri: {uri} does not answer within {timeout:g} s ({reason}); start the "
                            f"tracking server, or set tracking_uri (or MLFLOW_TRACKING_URI) to a reachable "
                            f"store such as sqlite:///mlflow/mlflow.db") from None
    elif "://" not in uri or uri.startswith("file://"):
        check_writable("tracking_uri", uri.removeprefix("file://"), need=0)


def node_capacity() -> NodeCapacity:
    """The largest node of the Ray cluster this runs on (RAY_ADDRESS, joined here), else this machine."""
    if os.environ.get("RAY_ADDRESS"):
        import ray

        from orchestrator.sweep import init_ray

        init_ray()
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        return NodeCapacity(cpus=max(n.get("CPU", 0.0) for n in nodes), gpus=max(n.get("GPU", 0.0) for n in nodes),
                            memory=int(max(n.get("memory", 0.0) for n in nodes)),
                            where=f"of the cluster at {os.environ['RAY_ADDRESS']}")
    from orchestrator.packing import physical_memory

    return NodeCapacity(cpus=float(len(os.sched_getaffinity(0))), gpus=float(_local_gpus()),
                        memory=physical_memory(), where="(this machine)")


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_resources(spec: SweepSpec, node: NodeCapacity) -> None:
    """A request larger than every node would leave Tune (or the harvest) waiting forever."""
    r, h = spec.resources, spec.harvest
    asks = [("resources.cpus", "a trial", r.cpus, node.cpus, "CPUs"), ("resources.gpus", "a trial", r.gpus, node.gpus,
            "GPUs"), ("harvest.num_cpus_per_actor", "a harvest actor", h.num_cpus_per_actor, node.cpus, "CPUs"),
            ("harvest.num_gpus_per_actor", "a harvest actor", h.num_gpus_per_actor, node.gpus, "GPUs")]
    for field, who, want, have, unit in asks:
        if want > have:
            raise SpecError(f"{field}: {who} asks for {want:g} {unit} but the largest node {node.where} has "
                            f"{have:g}; lower {field} (or run on a cluster with bigger nodes)")


def check_memory(spec: SweepSpec, info: ModelInfo, node: NodeCapacity) -> MemoryEstimate:
    """Every planned trial's memory estimate must fit the node; returns the largest. GPU trials are checked
    against `resources.memory_gb` when set (the host cannot see a remote GPU's memory)."""
    device = trial_device(spec)
    rows = min(DEFAULT_SHARD_ROWS, spec.train_tokens)
    limit = int(spec.resources.memory_gb * GB) if spec.resources.memory_gb is not None else node.memory
    packs = plan_packs(spec, d=info.d_model, lm=info, shard_rows=rows, device=device, budget=limit)
    worst: MemoryEstimate | None = None
    for pack in packs:
        est = trial_memory(spec, pack, d=info.d_model, lm=info, shard_rows=rows, device=device)
        if device == "cpu" or spec.resources.memory_gb is not None:
            if est.peak > limit:
                names = ", ".join(f"n_latents={p.n_latents} k={p.k}" for p in pack)
                where = "resources.memory_gb" if spec.resources.memory_gb is not None else f"the largest node {node.where}"
                raise SpecError(f"grid: a trial of {len(pack)} point(s) ({names}) needs about {est.peak / GB:.1f} GB "
                                f"(training {est.train / GB:.1f} GB, evaluation {est.eval / GB:.1f} GB) but "
                                f"{where} has {limit / GB:.1f} GB; lower grid.n_latents, train.batch_size or "
                                f"eval.splice_contexts, or set resources.pack to 1")
        if worst is None or est.peak > worst.peak:
            worst = est
    assert worst is not None
    return worst
