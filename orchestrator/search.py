"""How trials are proposed: the full grid, or a multi-objective Optuna study over the same axes.

The Optuna study searches the spec's grid axes as categorical choices (so every proposal is a combination the
spec already validated), minimising FVU at the objective granularity and the dictionary size (or L0). It lives
in an RDB storage (SQLite beside the MLflow store by default), so `optuna.load_study` and optuna-dashboard open
it and a later run with the same study name continues it.
"""

from __future__ import annotations

import warnings
from typing import Any

import optuna
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from orchestrator.spec import SweepSpec, absolute_tracking_uri, sqlite_path, sqlite_uri
from sae.matryoshka import partition_label

OBJECTIVES = ["objective_fvu", "objective_size"]  # both minimised


def grid_space(packs: list[dict[str, Any]]) -> dict[str, Any]:
    """One Tune trial per pack ({"points": [...], "estimated_memory_mb": ...}, orchestrator.packing)."""
    return {"pack": tune.grid_search(packs)}


def optuna_space(spec: SweepSpec) -> dict[str, Any]:
    g = spec.grid
    return {
        "n_latents": tune.choice(g.n_latents),
        "k": tune.choice(g.k),
        "architecture": tune.choice(g.architecture),
        "partition_index": tune.choice(list(range(len(g.partition)))),
        "seed": tune.choice(g.seed),
    }


def optuna_storage_url(spec: SweepSpec) -> str:
    """The spec's storage URL, else a SQLite file beside a SQLite MLflow store (mlflow/optuna.db)."""
    if spec.optuna.storage:
        return absolute_tracking_uri(spec.optuna.storage)
    db = sqlite_path(spec.resolved_tracking_uri())
    return sqlite_uri(db.parent / "optuna.db") if db is not None else absolute_tracking_uri(sqlite_uri("mlflow/optuna.db"))


def study_name(spec: SweepSpec) -> str:
    return spec.optuna.study_name or f"sae-frontier-{spec.name}"


def open_study(spec: SweepSpec) -> optuna.Study:
    """The sweep's study in its storage, created on first use with both objectives minimised and named after
    OBJECTIVES (so optuna-dashboard and optuna's plots label them), else loaded as it is."""
    url = optuna_storage_url(spec)
    if (db := sqlite_path(url)) is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=url, study_name=study_name(spec), directions=["minimize"] * len(OBJECTIVES),
                                load_if_exists=True)
    if study.metric_names != OBJECTIVES:
        with warnings.catch_warnings():  # set_metric_names is marked experimental since optuna 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(OBJECTIVES)
    return study


def optuna_searcher(spec: SweepSpec) -> OptunaSearch:
    open_study(spec)  # OptunaSearch loads it (load_if_exists), names and all
    return OptunaSearch(
        metric=OBJECTIVES, mode=["min"] * len(OBJECTIVES), storage=optuna.storages.RDBStorage(optuna_storage_url(spec)),
        study_name=study_name(spec), sampler=optuna.samplers.NSGAIISampler(seed=spec.optuna.seed),
    )


def pareto_trials(spec: SweepSpec) -> list[dict[str, Any]]:
    """The study's Pareto-optimal trials (optuna's best_trials), as plain dicts."""
    study = optuna.load_study(study_name=study_name(spec), storage=optuna_storage_url(spec))
    return [{"number": t.number, **t.params, "partition": partition_label(spec.grid.partition[t.params["partition_index"]]),
             "objective_fvu": t.values[0], "objective_size": t.values[1]} for t in study.best_trials]
