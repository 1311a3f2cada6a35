"""The sweep spec: one YAML file, validated completely before Ray starts.

A bad spec stops with one message that names the field (and, for grid points, their coordinates); nothing is
written until it passes. The grid is expanded here, so every trial Tune sees is already a valid SAE config.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic_core
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sae.config import Architecture, ComputeDType, SAEConfig, TrainConfig, TrainSettings
from sae.corpus import default_label_column
from sae.evaluate import PRIMARY_RULE, EvalOptions, EvalSettings
from sae.lm import site_from_name
from sae.matryoshka import partition_label, resolve_partition
from sae.messages import name_list
from sae.source import ActivationSource
from sae.train import resolve_compute_dtype

REPO_ROOT = Path(__file__).resolve().parent.parent
SPEC_DIR = REPO_ROOT / "sweeps" / "specs"
DEFAULT_TRACKING_URI = "sqlite:///mlflow/mlflow.db"


class SpecError(ValueError):
    """A spec that cannot run; the message names the field and the fix."""


class _Strict(BaseModel):
    """Unknown fields, booleans or strings where numbers belong, and inf/NaN are refused with the field named."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class HarvestResources(_Strict):
    """The harvest's Ray Data actors: each loads the LM once and runs it over its share of the contexts."""

    num_actors: int = Field(1, ge=1, le=4096, description="actors running the LM at once")
    num_cpus_per_actor: float = Field(1.0, gt=0, le=1024, description="CPUs Ray reserves for each actor")
    num_gpus_per_actor: float = Field(0.0, ge=0, le=64, description="GPUs per actor (1 on a GPU cluster)")
    batch_size: int = Field(16, ge=1, le=65536, description="contexts per LM forward")


class TrialResources(_Strict):
    """What each Tune trial reserves, and how many run at once."""

    cpus: float = Field(2.0, gt=0, le=1024, description="CPUs per trial (its torch threads)")
    gpus: float = Field(0.0, ge=0, le=64, description="GPUs per trial; > 0 trains and evaluates on CUDA")
    max_concurrent: int = Field(1, ge=1, le=100_000, description="trials at once")
    pack: Literal["auto"] | int = Field(
        1, description="grid points per Tune trial: they train from one pass over the shards (up to `cpus` at once, "
                       "one thread each) and share one LM load for evaluation; points of one seed only. auto: as many "
                       "as the memory estimate fits in memory_gb (orchestrator/packing.py)")
    memory_gb: float | None = Field(None, gt=0, le=100_000, description="memory one trial may use, for pack: auto; null: this "
                                                            "machine's available memory / max_concurrent")

    @field_validator("pack", mode="before")
    @classmethod
    def _pack(cls, v: Any) -> Any:
        if v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"pack must be a positive number of grid points or 'auto', got {v!r}")
        return v


class GridSpec(_Strict):
    """The axes of the grid; every combination is one trial (one child run)."""

    n_latents: list[Annotated[int, Field(ge=1, le=1 << 24)]] = Field(min_length=1, description="dictionary sizes")
    k: list[Annotated[int, Field(ge=1, le=1 << 16)]] = Field(min_length=1, description="active latents per token")
    architecture: list[Literal["topk", "batchtopk"]] = Field(default_factory=lambda: ["topk"], min_length=1,
                                                             description="topk or batchtopk")
    partition: list[Any] = Field(default_factory=lambda: [None], min_length=1,
                                 description="null (vanilla), 'doubling:G', 'uniform:G', 'fractions:NAME', "
                                             "'b1,b2,...', a list of boundaries, or a mapping with 'scheme'")
    seed: list[int] = Field(default_factory=lambda: [0], min_length=1, description="seeds: initialisation and "
                                                                                   "batch order")

    @field_validator("partition")
    @classmethod
    def _partition_types(cls, v: list[Any]) -> list[Any]:
        for i, p in enumerate(v):
            ok = p is None or isinstance(p, str | dict) or (
                isinstance(p, list) and all(isinstance(b, int) and not isinstance(b, bool) for b in p))
            if not ok:
                raise ValueError(f"element {i} ({p!r}) must be null, a scheme string such as 'doubling:4', a list "
                                 "of integer boundaries, or a mapping with 'scheme'")
        return v


class TrainSpec(TrainSettings):
    """The library's TrainSettings (each default and constraint lives there) plus how a trial feeds it."""

    model_config = _Strict.model_config
    batch_size: int = Field(4096, ge=1, le=1 << 20, description="tokens per step")
    epochs: int = Field(1, ge=1, le=10_000, description="passes over the harvested training tokens")
    report_every_steps: int = Field(10, ge=1, le=10**9, description="steps between training metrics sent to Tune")
    checkpoint_every_steps: int = Field(50, ge=1, le=10**9, description="steps between resumable checkpoints (at "
                                                                       "most one per checkpoint_min_seconds)")
    checkpoint_min_seconds: float = Field(
        120.0, ge=0, le=10**7, description="at most one checkpoint per this many seconds of training: a checkpoint "
                                           "copies every SAE's weights and Adam moments into Tune's storage, which "
                                           "on a GPU takes longer than the steps between two")


class EvalSpec(EvalSettings):
    """The library's EvalSettings (each default and constraint lives there) plus where a trial gets its G, its
    ranking sample and its splice contexts."""

    model_config = _Strict.model_config
    granularities: list[int] | None = Field(None, description="the G of every curve; null: powers of two above the "
                                                              "largest k, every partition boundary and every n")
    importance_tokens: int = Field(32768, ge=256, le=10**8, description="train tokens that rank latents (never eval tokens)")
    splice_contexts: int = Field(64, ge=1, le=10**6, description="eval contexts spliced for the CE/KL scores")
    splice_length: int | None = Field(None, ge=2, description="tokens per spliced context (BOS included); "
                                                              "null: the whole context")
    splice_dtype: ComputeDType = Field(
        "auto", description="the LM's dtype in the CE/KL splice, its clean pass included (the harvest keeps "
                            "lm_dtype); auto: bfloat16 where the device runs it natively (sae.train.native_bf16), "
                            "else float32. docs/science.md gives what bf16 changes")

    @model_validator(mode="after")
    def _primary_rule_is_scored(self) -> EvalSpec:
        if PRIMARY_RULE not in self.rules:
            raise ValueError(f"eval.rules must include {PRIMARY_RULE!r}, the primary rule the frontier, the undertrained "
                             f"gate and the report read; got {list(self.rules)}")
        return self

    def splice_dtype_on(self, device: str) -> str:
        """The dtype the splice's LM runs in on `device`, "auto" decided (the trial loads it so, the memory
        estimate counts it so). A GPU this process cannot see, as when the driver plans a cluster's trials, is
        taken to run bf16."""
        if self.splice_dtype == "auto" and device == "cuda" and not torch.cuda.is_available():
            return "bfloat16"
        return resolve_compute_dtype(self.splice_dtype, device)

    def options(self, granularities: list[int]) -> EvalOptions:
        """The library's EvalOptions for these settings at these G."""
        return EvalOptions.for_run(self, granularities)


class OptunaSpec(_Strict):
    """The Optuna study that `--search optuna` runs instead of the grid (two objectives: FVU and size)."""

    study_name: str | None = Field(None, description="null: the sweep's name")
    storage: str | None = Field(None, description="an SQLAlchemy URL; default: a SQLite file beside the MLflow store")
    trials: int = Field(8, ge=1, le=100_000, description="trials the study runs")
    objective_granularity: int | None = Field(None, description="the G whose FVU is minimised; null: the smallest "
                                                                "n_latents")
    size_objective: Literal["n_latents", "l0"] = Field("n_latents", description="the second objective")
    seed: int = Field(0, description="the sampler's seed")


class SweepSpec(ActivationSource):
    """A sweep: which activations (sae.source.ActivationSource: model, site, corpus, contexts, LM dtype), how many,
    where they and the results go, and the grid, training, evaluation and search over them."""

    model_config = _Strict.model_config
    name: str = Field(description="the sweep's name: letters, digits, '_', '.', '-'")
    experiment: str | None = Field(None, description="the MLflow experiment; null: sae-frontier-<name>")
    train_tokens: int = Field(ge=1, le=10**11, description="harvested training tokens (10^11 at most: far beyond any SAE run)")
    eval_tokens: int = Field(ge=1, le=10**10, description="harvested held-out tokens")
    activation_dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="the stored "
                                                                                              "activations' dtype")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where trials train and evaluate; auto: "
                                                                      "cuda where a trial has a GPU")
    storage: str = Field(".cache/shards", description="shard store: a folder or URI every node reaches")
    tracking_uri: str | None = Field(None, description="MLflow: a sqlite:/// file or an http(s) server; null: "
                                                      f"{DEFAULT_TRACKING_URI} (or $MLFLOW_TRACKING_URI)")
    results_path: str = Field(".cache/ray_results", description="Ray Tune's results and checkpoints")
    harvest: HarvestResources = Field(HarvestResources(), description="the harvest's resources")
    resources: TrialResources = Field(TrialResources(), description="each trial's resources and how they are packed")
    grid: GridSpec = Field(description="the grid's axes: every combination is one grid point")
    train: TrainSpec = Field(TrainSpec(), description="how every SAE trains")
    eval: EvalSpec = Field(EvalSpec(), description="how every SAE is evaluated")
    optuna: OptunaSpec = Field(OptunaSpec(), description="the Optuna study (--search optuna)")

    @model_validator(mode="before")
    @classmethod
    def _default_label_column(cls, raw: Any) -> Any:
        """A spec that leaves label_column out gets its corpus's own (sae.corpus.default_label_column), so the
        value the spec stores, hashes and keys its stores by is the one the harvest uses."""
        if isinstance(raw, dict) and "label_column" not in raw:
            corpus = raw.get("corpus", cls.model_fields["corpus"].default)
            if isinstance(corpus, str):
                return {**raw, "label_column": default_label_column(corpus)}
        return raw

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError(f"name must use letters, digits, '_', '.', '-' only, got {v!r}")
        return v

    @field_validator("storage", "results_path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.strip():  # an empty path would resolve to the repo root
            raise ValueError("an empty path; give a folder (relative paths are under the repo) or a URI such as "
                             "s3://bucket/prefix")
        return v

    @model_validator(mode="after")
    def _check_grid(self) -> SweepSpec:
        self.trial_points()  # raises with the coordinates of the first invalid combination
        if self.eval.granularities is not None:
            bad = [g for g in self.eval.granularities if g < 2 or g > max(self.grid.n_latents)]
            if bad:
                raise ValueError(f"eval.granularities must lie in 2..max(grid.n_latents), got {name_list(bad)}")
        g0 = self.objective_granularity()
        if g0 not in self.granularities():
            raise ValueError(f"optuna.objective_granularity ({g0}, default: the smallest n_latents) must be one of "
                             f"the evaluated G {name_list(self.granularities())}; set it, or add it to eval.granularities")
        if g0 > min(self.grid.n_latents):
            raise ValueError(f"optuna.objective_granularity must be <= the smallest n_latents ({min(self.grid.n_latents)}), got {g0}")
        gs = set(self.granularities())
        for p in self.trial_points():  # a Matryoshka SAE is scored only at its trained boundaries
            inner = [b for b in p.boundaries or () if b < p.n_latents]
            if inner and not gs.intersection(inner):
                source = "eval.granularities" if self.eval.granularities is not None else \
                    f"the default G (eval.granularities: null keeps G above the largest grid.k, {max(self.grid.k)})"
                raise ValueError(f"{source} {name_list(sorted(gs))} hold none of the inner group boundaries "
                                 f"{name_list(inner)} of partition {p.partition} at n_latents={p.n_latents}, so "
                                 "its prefixes would never be scored; add some of those boundaries to "
                                 "eval.granularities (or lower grid.k)")
            if p.boundaries and p.n_latents > g0 and g0 not in p.boundaries:
                raise ValueError(f"optuna.objective_granularity ({g0}) is not a group boundary of partition "
                                 f"{p.partition} at n_latents={p.n_latents} (boundaries "
                                 f"{name_list(p.boundaries)}), so that SAE has no prefix there to score; set "
                                 "optuna.objective_granularity to a shared boundary")
        if self.resources.pack == "auto" and self.resources.gpus > 0 and self.resources.memory_gb is None:
            raise ValueError("resources.pack: 'auto' on GPUs needs resources.memory_gb (the GPU memory a trial may "
                             "use); the driver cannot see the workers' GPUs")
        if self.device == "cuda" and self.resources.gpus <= 0:
            raise ValueError("device: 'cuda' needs resources.gpus > 0 (a GPU per trial), got resources.gpus = 0")
        try:  # the training settings, as every trial will build them
            self.train_config(self.trial_points()[0], "cpu")
        except ValidationError as err:
            raise ValueError(f"train: {_first_message(err)}") from None
        return self

    # ---- derived values -------------------------------------------------------------------------------------
    @property
    def experiment_name(self) -> str:
        return self.experiment or f"sae-frontier-{self.name}"

    @property
    def layer(self) -> int:
        return site_from_name(self.site).layer

    def resolved_tracking_uri(self) -> str:
        return default_tracking_uri(self.tracking_uri)

    def to_yaml(self) -> str:
        """The validated spec with every default filled in: what the sweep's parent run stores as spec.yaml."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def spec_hash(self) -> str:
        """What --resume checks. Fields added after sweeps had been run are left out while their value means what
        the spec meant before they existed (HASH_LAYOUT, ADDED_FIELDS), so an older sweep still matches its spec."""
        dump = self.model_dump(mode="json")
        for dotted, as_before in ADDED_FIELDS.items():
            if as_before(self):
                *parents, name = dotted.split(".")
                where = dump
                for parent in parents:
                    where = where[parent]
                del where[name]
        return hashlib.sha256(pydantic_core.to_json(_in_hash_layout(self, dump))).hexdigest()[:16]

    def trial_points(self) -> list[TrialPoint]:
        """Every grid combination, validated, in grid order."""
        g = self.grid
        return [make_point(n, k, a, p, s) for n, k, a, p, s in
                itertools.product(g.n_latents, g.k, g.architecture, g.partition, g.seed)]

    def objective_granularity(self) -> int:
        """The G at which an Optuna study minimises FVU: the spec's, else the smallest n (every run has it)."""
        return self.optuna.objective_granularity or min(self.grid.n_latents)

    def granularities(self) -> list[int]:
        """The G values every run is evaluated at (the same list for all runs, so curves overlay).

        Default: powers of two from above the largest k up to the largest n, every partition boundary, and every n.
        """
        if self.eval.granularities is not None:
            return sorted(set(self.eval.granularities))
        n_max, k_max = max(self.grid.n_latents), max(self.grid.k)
        gs = {2**j for j in range(1, 40) if k_max < 2**j <= n_max}
        gs |= set(self.grid.n_latents)
        for p in self.trial_points():
            gs |= set(p.boundaries or ())
        return sorted(g for g in gs if g > k_max or g in self.grid.n_latents)

    def train_config(self, point: TrialPoint, device: str) -> TrainConfig:
        return TrainConfig.for_run(self.train, total_tokens=self.train_tokens * self.train.epochs,
                                   seed=point.seed, device=device)


# The spec's fields when the hash was fixed, in order (section "" is the top level). The hash lists them in this
# order; a field added since comes after them, and not at all while it holds its default, so a new setting (in a
# library model the spec composes, say) leaves every older sweep's hash alone without being listed anywhere.
HASH_LAYOUT: dict[str, tuple[str, ...]] = {
    "": ("name", "experiment", "model", "revision", "site", "corpus", "corpus_split", "text_column", "label_column",
         "text_unit", "corpus_field", "context_length", "train_tokens", "eval_tokens", "eval_fraction",
         "activation_dtype", "device", "lm_dtype", "storage", "tracking_uri", "results_path", "harvest", "resources",
         "grid", "train", "eval", "optuna"),
    "harvest": ("num_actors", "num_cpus_per_actor", "num_gpus_per_actor", "batch_size"),
    "resources": ("cpus", "gpus", "max_concurrent", "pack", "memory_gb"),
    "grid": ("n_latents", "k", "architecture", "partition", "seed"),
    "train": ("batch_size", "epochs", "lr", "warmup_steps", "decay_fraction", "aux_k", "aux_coef", "aux_loss",
              "aux_tokens", "encoder_init_norm", "dead_tokens", "compute_dtype", "report_every_steps",
              "checkpoint_every_steps"),
    "eval": ("granularities", "rules", "importance_tokens", "random_draws", "splice_contexts", "report_methods",
             "splice_length", "splice_rules", "splice_dtype", "rsa_tokens", "probe_features", "probe_candidates",
             "concentration_top", "random_seed"),
    "optuna": ("study_name", "storage", "trials", "objective_granularity", "size_objective", "seed"),
}


def _in_hash_layout(model: BaseModel, dump: dict[str, Any], section: str = "") -> dict[str, Any]:
    """`dump` (of `model`) with its keys in HASH_LAYOUT order, a field the layout lacks after them unless it holds
    its default; sections alike."""
    layout = HASH_LAYOUT.get(section, ())
    fields = type(model).model_fields
    later = [name for name in dump if name not in layout
             and getattr(model, name) != fields[name].get_default(call_default_factory=True)]
    out = {}
    for name in [*(n for n in layout if n in dump), *later]:
        value = getattr(model, name)
        out[name] = _in_hash_layout(value, dump[name], name) if isinstance(value, BaseModel) and not section \
            else dump[name]
    return out


# Fields added after sweeps had been run (SweepSpec.spec_hash), each with when its value means what the spec meant
# before it existed: a corpus read as before, AuxK on the whole batch (the window covers it, or there is none), and
# a float32 splice (auto may splice in bf16, so an older sweep's spec is not resumed under it unnoticed); how often
# a trial checkpoints never changes what it computes, so it stays out of the hash and may change on a resume.
ADDED_FIELDS: dict[str, Callable[[SweepSpec], bool]] = {
    "text_unit": lambda s: s.text_unit == SweepSpec.model_fields["text_unit"].default,
    "corpus_field": lambda s: s.corpus_field == SweepSpec.model_fields["corpus_field"].default,
    "train.aux_tokens": lambda s: s.train.aux_tokens is None or s.train.aux_tokens >= s.train.batch_size,
    "eval.splice_dtype": lambda s: s.eval.splice_dtype == "float32",
    "train.checkpoint_min_seconds": lambda s: True,
}


class TrialPoint(BaseModel):
    """One grid point, validated (make_point): the SAE's coordinates. Its key (a stable id: the MLflow run's tag,
    the bundle's folder) and its readable name (the run's and the Tune trial's name, the log label) derive from
    them. Tune configs and result.json carry it as `as_config()`, a plain dict with the key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_latents: int
    k: int
    architecture: Architecture
    partition: str  # the partition's label (sae.matryoshka.partition_label): "none", "doubling:smallest=64", ...
    boundaries: tuple[int, ...] | None  # the Matryoshka group boundaries at this n, None for a vanilla SAE
    seed: int

    @property
    def trial_key(self) -> str:
        fields = {"n_latents": self.n_latents, "k": self.k, "architecture": self.architecture,
                  "partition": self.partition, "seed": self.seed}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        """e.g. n256-k8-topk-doubling:2-s0."""
        return f"n{self.n_latents}-k{self.k}-{self.architecture}-{self.partition}-s{self.seed}"

    def sae_config(self, d_in: int) -> SAEConfig:
        return SAEConfig(d_in=d_in, n_latents=self.n_latents, k=self.k, architecture=self.architecture,
                         partition=self.boundaries)

    def as_config(self) -> dict[str, Any]:
        """A plain dict (boundaries as a list) with the key: what a Tune config and result.json hold."""
        return {**self.model_dump(mode="json"), "trial_key": self.trial_key}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TrialPoint:
        """The point `as_config()` wrote; a key that does not match its coordinates is refused."""
        point = cls.model_validate({k: v for k, v in config.items() if k != "trial_key"})
        if config.get("trial_key", point.trial_key) != point.trial_key:
            raise ValueError(f"grid point {point.name}: its trial_key {config['trial_key']!r} does not match its "
                             f"coordinates ({point.trial_key})")
        return point


def make_point(n: int, k: int, architecture: str, partition: Any, seed: int) -> TrialPoint:
    """One validated grid point; errors name the grid coordinates."""
    where = (f"grid point (n_latents={n}, k={k}, architecture={architecture}, "
             f"partition={partition_label(partition)}, seed={seed})")
    try:
        boundaries = resolve_partition(partition, n)
        if boundaries is not None and len(boundaries) == 1:
            raise ValueError("partition: a single group is a vanilla SAE; write null for it")
        point = TrialPoint(n_latents=n, k=k, architecture=architecture, partition=partition_label(partition),
                           boundaries=tuple(boundaries) if boundaries else None, seed=seed)
        point.sae_config(d_in=1)
    except ValidationError as err:
        raise ValueError(f"{where}: {_first_message(err)}") from None
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return point


def points_from_config(config: dict[str, Any], spec: SweepSpec) -> list[TrialPoint]:
    """A trial's grid points from its Tune config: a grid trial carries its pack whole (orchestrator.packing); an
    Optuna trial carries the axes of its one point."""
    if "pack" in config:
        return [TrialPoint.from_config(p) for p in config["pack"]["points"]]
    return [make_point(config["n_latents"], config["k"], config["architecture"],
                       spec.grid.partition[config["partition_index"]], config["seed"])]


def home() -> Path:
    """What relative paths in a spec are relative to: $SAE_FRONTIER_HOME, else the repo root.

    `ray job submit` unpacks the working dir into a temporary folder; `make submit` sets SAE_FRONTIER_HOME to
    the checkout so the job reuses its shards, results and MLflow store instead of writing into that folder.
    A job submitted without it keeps them in ~/sae-frontier on the head node (said in the job's log).
    """
    if os.environ.get("SAE_FRONTIER_HOME"):
        return Path(os.environ["SAE_FRONTIER_HOME"])
    if os.environ.get("RAY_JOB_ID"):  # a job's working dir is a temporary copy: keep results where they last
        return Path.home() / "sae-frontier"
    return REPO_ROOT


SQLITE = "sqlite:///"  # the one spelling of a SQLite store's URI prefix (MLflow's and Optuna's)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (relative to the working directory if relative), else None."""
    return Path(uri.removeprefix(SQLITE)) if uri.startswith(SQLITE) else None


def sqlite_uri(path: str | os.PathLike) -> str:
    return SQLITE + str(path)


def is_tracking_server(tracking_uri: str) -> bool:
    """An `mlflow server` (which serves its UI too), rather than a store on disk that `make ui` must serve."""
    return tracking_uri.startswith(("http://", "https://"))


def absolute_tracking_uri(uri: str) -> str:
    """Make a relative sqlite URI absolute, so every Ray worker and job writes one store."""
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():
        return sqlite_uri((home() / db).resolve())
    return uri


def default_tracking_uri(uri: str | None = None) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else the project's store (DEFAULT_TRACKING_URI), made absolute."""
    return absolute_tracking_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)


def resolve_path(path: str) -> str:
    """Relative local paths are taken from home(); URIs (s3://, gs://, ...) pass through."""
    if "://" in path or os.path.isabs(path):
        return path
    return str((home() / path).resolve())


def _first_message(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_spec(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read and validate a spec. Names without a path are looked up in sweeps/specs/."""
    p = Path(path)
    if not p.exists() and not p.suffix and (SPEC_DIR / f"{p}.yaml").exists():
        p = SPEC_DIR / f"{p}.yaml"
    if not p.exists():
        raise SpecError(f"spec file {str(path)!r} does not exist; available: "
                        f"{name_list(sorted(x.stem for x in SPEC_DIR.glob('*.yaml')))}")
    try:
        raw = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise SpecError(f"spec {p}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"spec {p}: expected a mapping of fields at the top level")
    return spec_from_dict({**raw, **(overrides or {})}, source=str(p))


def spec_from_dict(raw: dict[str, Any], source: str = "<spec>") -> SweepSpec:
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(x) for x in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
        raise SpecError(f"spec {source} is invalid:\n" + "\n".join(lines)) from None


def describe_fields(model: type[BaseModel] | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted field, default, description) of every spec field, sections expanded: what `python -m
    orchestrator.spec` prints and the docs can quote."""
    model = model or SweepSpec
    rows = []
    for name, field in model.model_fields.items():
        section = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) \
            else None
        if section is not None:
            rows.extend(describe_fields(section, f"{prefix}{name}."))
            continue
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        rows.append((prefix + name, default, field.description or ""))
    return rows


if __name__ == "__main__":
    import sys

    wanted = sys.argv[1] if len(sys.argv) > 1 else ""
    for dotted, default, description in describe_fields():
        if dotted.startswith(wanted):
            print(f"{dotted} = {default}\n    {description}")
