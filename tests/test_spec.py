"""Sweep specs: the shipped ones validate, and every invalid one fails before Ray starts, naming its field."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from spec_helpers import smoke_dict

from orchestrator.spec import SPEC_DIR, SpecError, load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parent.parent




@pytest.mark.parametrize("name", ["default", "smoke", "paper"])
def test_shipped_specs_validate(name):
    spec = load_spec(name)
    points = spec.trial_points()
    assert len(points) == len({p.trial_key for p in points})
    gs = spec.granularities()
    assert gs == sorted(gs) and max(spec.grid.n_latents) in gs
    for p in points:  # every Matryoshka boundary is an evaluated G, so prefix curves line up with pruned ones
        assert set(p.boundaries or []) <= set(gs)


def test_paper_spec_is_the_papers_grid():
    spec = load_spec("paper")
    assert spec.grid.n_latents == [2**14, 2**15, 2**16] and spec.grid.k == [64, 128, 256, 512]
    assert {p.partition for p in spec.trial_points()} == {"none", "doubling:3"}


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"grid": {"n_latents": [128], "k": [128]}}, "k=128"),
        ({"grid": {"k": [0]}}, "grid.k.0: Input should be greater than or equal to 1"),
        ({"grid": {"n_latents": [128, 256], "partition": [[32, 64, 128]]}}, "n_latents=256"),
        ({"grid": {"partition": ["zigzag:3"]}}, "partition"),
        ({"grid": {"architecture": ["jumprelu"]}}, "grid.architecture"),
        ({"site": "resid_middle.3"}, "site"),
        ({"train_tokens": 0}, "train_tokens"),
        ({"eval": {"granularities": [1, 64]}}, "eval.granularities"),
        ({"optuna": {"objective_granularity": 100}}, "optuna.objective_granularity"),
        ({"colour": "blue"}, "colour"),
        ({"train": {"lr": -1.0}}, "train.lr: Input should be greater than 0"),
        ({"train": {"decay_fraction": 2.0}}, "decay_fraction"),
        ({"device": "cuda"}, "resources.gpus"),
        ({"grid": {"partition": ["uniform:1"]}}, "single group is a vanilla SAE"),
        ({"eval": {"granularities": [16, 32]}}, "optuna.objective_granularity"),
        ({"eval": {"rules": ["reselect"], "splice_rules": ["reselect"]}}, "eval.rules must include 'masked'"),
        ({"eval": {"splice_rules": ["reselect"], "rules": ["masked"]}}, "eval: splice_rules"),
        # a Matryoshka SAE has no prefix at a G inside one of its groups, so Optuna could not score it there
        ({"grid": {"n_latents": [128, 256], "k": [8], "partition": [None, "uniform:4"]},
          "optuna": {"objective_granularity": 96}, "eval": {"granularities": [96, 128]}}, "not a group boundary"),
        ({"grid": {"n_latents": [256], "k": [8], "partition": [None, "doubling:3"]},
          "eval": {"granularities": [32, 256]}, "optuna": {"objective_granularity": 256}}, "inner group boundaries"),
    ],
)
def test_invalid_spec_names_the_field(override, needle):
    with pytest.raises(SpecError, match=needle.replace("[", r"\[")):
        spec_from_dict(smoke_dict(**override))


def test_partition_for_other_n_names_coordinates():
    with pytest.raises(SpecError) as err:
        spec_from_dict(smoke_dict(grid={"n_latents": [128, 256], "partition": [[32, 64, 128]]}))
    assert "n_latents=256" in str(err.value) and "partition=32,64,128" in str(err.value)


@pytest.mark.slow
def test_cli_rejects_bad_spec_before_ray_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(smoke_dict(grid={"n_latents": [64], "k": [64]}, storage=str(tmp_path / "shards"),
                                       results_path=str(tmp_path / "results"))))
    db = tmp_path / "mlflow.db"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "sweeps" / "frontier.py"), "--spec", str(bad), "--tracking-uri", f"sqlite:///{db}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "k must satisfy" in proc.stderr and "n_latents=64" in proc.stderr
    assert "ray" not in proc.stdout.lower()  # Ray never started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing written


def test_sweep_names_are_unique_and_latest_never_points_away_from_a_running_sweep(tmp_path):
    import pyarrow.fs as pafs

    from orchestrator.lease import acquire
    from orchestrator.sweep import _point_latest_at, _sweep_name

    spec = load_spec("smoke", {"results_path": str(tmp_path)})
    first, second = _sweep_name(spec, "grid", False), _sweep_name(spec, "grid", False)
    assert first != second and first.startswith("smoke-grid-")  # same second, still two names
    fs = pafs.LocalFileSystem()
    _point_latest_at(fs, str(tmp_path), spec, "grid", first, print)
    assert _sweep_name(spec, "grid", True) == first
    said: list[str] = []
    with acquire(fs, f"{tmp_path}/{first}.lock", label="test"):  # `first` is running
        _point_latest_at(fs, str(tmp_path), spec, "grid", second, said.append)
        assert _sweep_name(spec, "grid", True) == first and f"--resume {second}" in said[0]
    _point_latest_at(fs, str(tmp_path), spec, "grid", second, said.append)  # `first` has ended: the pointer moves on
    assert _sweep_name(spec, "grid", True) == second and _sweep_name(spec, "grid", first) == first
    with pytest.raises(ValueError, match=r"--resume '\.\./x' is not a grid sweep of spec 'smoke'"):
        _sweep_name(spec, "grid", "../x")
    (tmp_path / "smoke.grid.latest").write_text("../../etc")
    with pytest.raises(ValueError, match=r"smoke\.grid\.latest names '\.\./\.\./etc', not a grid sweep"):
        _sweep_name(spec, "grid", True)


@pytest.mark.parametrize("override, field", [
    ({"train_tokens": True}, "train_tokens"), ({"train_tokens": "6144"}, "train_tokens"),
    ({"eval_fraction": float("inf")}, "eval_fraction"), ({"train": {"lr": float("nan")}}, "train.lr"),
    ({"resources": {"cpus": True}}, "resources.cpus"), ({"eval": {"splice_contexts": 2.5}}, "eval.splice_contexts"),
    ({"storage": ""}, "storage"), ({"results_path": "  "}, "results_path"),
    ({"train_tokens": 10**12}, "train_tokens"), ({"grid": {"n_latents": [1 << 25], "k": [8]}}, "grid.n_latents.0"),
    ({"eval": {"rsa_tokens": 10**6}}, "eval.rsa_tokens"), ({"resources": {"cpus": 1e6}}, "resources.cpus"),
])
def test_numbers_are_strict(override, field):
    with pytest.raises(SpecError, match=rf"{re.escape(field)}: "):
        load_spec("smoke", override)


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text((SPEC_DIR / "smoke.yaml").read_text() + "train_tokens: 1\n")
    with pytest.raises(SpecError, match="duplicate key 'train_tokens'"):
        load_spec(path)


# Computed from main's code (commit 8c036af, before text_unit / corpus_field existed) and hard-coded: a changed
# key would make every user re-harvest the default activations, a changed hash would refuse their --resume.
DEFAULT_TRAIN_KEY = "smollm2-135m.resid_post.15.train.29fedfb62b9fd3a05c7e"
DEFAULT_EVAL_KEY = "smollm2-135m.resid_post.15.eval.9b2a0c923577e260563d"
# The hash before eval.splice_dtype existed; the default spec now splices with `auto` (bf16 where native), a
# different measurement, and packs two points per trial, so its hash moved on purpose and an older sweep is not
# resumed under it unnoticed.
FLOAT32_SPLICE_SPEC_HASH = "89c8bd66c166076a"
DEFAULT_SPEC_HASH = "a4c93a94a8eb201c"


def test_default_store_keys_and_spec_hash_are_unchanged():
    from orchestrator.sweep import harvest_config

    spec = load_spec("default")
    assert harvest_config(spec, "train").key() == DEFAULT_TRAIN_KEY
    assert harvest_config(spec, "eval").key() == DEFAULT_EVAL_KEY
    assert spec.spec_hash() == DEFAULT_SPEC_HASH
    float32 = load_spec("default", {"eval": {**spec.eval.model_dump(), "splice_dtype": "float32"},
                                    "resources": {**spec.resources.model_dump(), "pack": 1}})
    assert float32.spec_hash() == FLOAT32_SPLICE_SPEC_HASH
    # a spec on wiki-extracts that leaves label_column out gets its topic, so its keys are the same too
    raw = yaml.safe_load((SPEC_DIR / "default.yaml").read_text())
    del raw["label_column"]
    implicit = spec_from_dict(raw)
    assert implicit.label_column == "topic" and harvest_config(implicit, "train").key() == DEFAULT_TRAIN_KEY


def test_corpus_options_reach_the_harvest_config(tmp_path):
    from orchestrator.sweep import harvest_config
    from sae.corpus import CorpusOptions

    spec = spec_from_dict(smoke_dict(corpus=str(tmp_path / "c.json"), label_column=None, text_unit="paragraph",
                                     corpus_field="data.items"))
    assert spec.corpus_options() == CorpusOptions(text_unit="paragraph", corpus_field="data.items")
    cfg = harvest_config(spec, "train")
    assert (cfg.text_unit, cfg.corpus_field) == ("paragraph", "data.items")
    assert {"text_unit": "paragraph", "corpus_field": "data.items"}.items() <= cfg.content_fields().items()
    plain = harvest_config(spec_from_dict(smoke_dict(corpus=str(tmp_path / "c.json"), label_column=None)), "train")
    assert "text_unit" not in plain.content_fields() and plain.key() != cfg.key()
    assert spec.spec_hash() != load_spec("smoke").spec_hash()
    raw = smoke_dict(corpus=str(tmp_path / "books"))
    del raw["label_column"]
    assert spec_from_dict(raw).label_column is None  # null unless the corpus has one


@pytest.mark.parametrize("override, needle", [
    ({"text_unit": "chapter"}, "text_unit: Input should be 'line', 'paragraph' or 'document'"),
    ({"text_unit": None}, "text_unit: "),
    ({"corpus_field": "data..items"}, "corpus_field: a dotted path of keys"),
    ({"corpus_field": ""}, "corpus_field: a dotted path of keys"),
    ({"corpus_field": 5}, "corpus_field: Input should be a valid string"),
])
def test_bad_corpus_options_name_the_field(override, needle):
    with pytest.raises(SpecError, match=re.escape(needle)):
        spec_from_dict(smoke_dict(**override))


def test_missing_spec_lists_at_most_20_names(tmp_path, monkeypatch):
    import orchestrator.spec as spec_module

    for i in range(25):
        (tmp_path / f"s{i:02d}.yaml").write_text("")
    monkeypatch.setattr(spec_module, "SPEC_DIR", tmp_path)
    with pytest.raises(SpecError, match=r"available: \['s00', .*'s19', … and 5 more\]$"):
        load_spec("nope")


def test_aux_tokens_reaches_the_train_config_and_keeps_old_hashes():
    from sae.config import TrainConfig

    default = load_spec("smoke")
    assert default.train.aux_tokens == TrainConfig().aux_tokens  # one default, the library's
    point = default.trial_points()[0]
    assert default.train_config(point, "cpu").aux_tokens == TrainConfig().aux_tokens
    whole = spec_from_dict(smoke_dict(train={"aux_tokens": None}))
    assert whole.train_config(point, "cpu").aux_tokens is None
    # smoke's batch (512) is inside the default window, so AuxK sees the whole batch either way: the same spec as
    # before the field existed, the same hash; a window smaller than the batch is a different spec
    assert whole.spec_hash() == default.spec_hash()
    window = spec_from_dict(smoke_dict(train={"aux_tokens": 128}))
    assert window.spec_hash() != default.spec_hash()
    big = {"batch_size": 4096}  # paper.yaml's batch: the default window now changes AuxK, so the old hash needs null
    assert spec_from_dict(smoke_dict(train={**big, "aux_tokens": None})).spec_hash() != \
        spec_from_dict(smoke_dict(train=big)).spec_hash()
    with pytest.raises(SpecError, match="train.aux_tokens"):
        spec_from_dict(smoke_dict(train={"aux_tokens": 0}))


def test_the_train_section_is_the_librarys_settings():
    """One config tree: every training setting of the library is a `train:` field of the spec with the library's
    default, constraint and description, and reaches the trial's TrainConfig as written."""
    from orchestrator.spec import TrainSpec
    from sae.config import TrainConfig, TrainSettings

    for name, field in TrainSettings.model_fields.items():
        assert TrainSpec.model_fields[name].default == field.default, name
        assert field.description, f"TrainSettings.{name} has no description"
    assert all(f.description for f in TrainSpec.model_fields.values())
    spec = spec_from_dict(smoke_dict(train={"eps": 1e-8, "betas": [0.9, 0.95], "threshold_momentum": 0.9,
                                            "lr_end": 0.1}))
    run = spec.train_config(spec.trial_points()[0], "cpu")
    assert isinstance(run, TrainConfig)
    assert (run.eps, run.betas, run.threshold_momentum, run.lr_end) == (1e-8, (0.9, 0.95), 0.9, 0.1)
    assert run.total_tokens == spec.train_tokens * spec.train.epochs and run.seed == spec.trial_points()[0].seed
    with pytest.raises(SpecError, match="train.eps: Input should be greater than 0"):
        spec_from_dict(smoke_dict(train={"eps": 0.0}))
    with pytest.raises(SpecError, match="train.warmup_steps: Input should be a valid integer"):
        spec_from_dict(smoke_dict(train={"warmup_steps": "10"}))  # the spec stays strict: no string for a number


def test_a_setting_added_since_the_hash_was_fixed_leaves_old_hashes_alone():
    """betas, eps, threshold_momentum, geometric_median_samples and lr_end reached the spec after its hash was fixed
    (HASH_LAYOUT lacks them): at their defaults they leave the default spec's hash as it was, set to anything
    else they change it."""
    spec = load_spec("default")
    assert spec.spec_hash() == DEFAULT_SPEC_HASH
    train = spec.train.model_dump()
    assert load_spec("default", {"train": {**train, "eps": train["eps"]}}).spec_hash() == DEFAULT_SPEC_HASH
    for name, value in (("eps", 1e-8), ("threshold_momentum", 0.9), ("geometric_median_samples", 1024),
                        ("lr_end", 0.1)):
        assert load_spec("default", {"train": {**train, name: value}}).spec_hash() != DEFAULT_SPEC_HASH, name


def test_the_eval_section_is_the_librarys_settings():
    """The spec's eval: section composes sae.evaluate.EvalSettings: the same defaults and descriptions, and the
    trial's EvalOptions carry what the spec says plus the G."""
    from orchestrator.spec import EvalSpec
    from sae.evaluate import EvalOptions, EvalSettings

    for name, field in EvalSettings.model_fields.items():
        assert EvalSpec.model_fields[name].default == field.default, name
        assert field.description, f"EvalSettings.{name} has no description"
    assert all(f.description for f in EvalSpec.model_fields.values())
    spec = spec_from_dict(smoke_dict(eval={"rules": ["masked"], "random_draws": 7, "random_seed": 3}))
    opts = spec.eval.options(spec.granularities())
    assert isinstance(opts, EvalOptions) and opts.granularities == tuple(spec.granularities())
    assert (opts.rules, opts.random_draws, opts.random_seed) == (("masked",), 7, 3)
    with pytest.raises(SpecError, match="eval.random_draws: Input should be greater than or equal to 1"):
        spec_from_dict(smoke_dict(eval={"random_draws": 0}))


def test_every_spec_field_says_what_it_is():
    """One line per field for `python -m orchestrator.spec` and the docs, sections expanded."""
    from orchestrator.spec import describe_fields

    rows = describe_fields()
    missing = [dotted for dotted, _, description in rows if not description]
    assert not missing, f"fields without a description: {missing}"
    by_name = {dotted: default for dotted, default, _ in rows}
    assert by_name["train.warmup_steps"] == "100" and by_name["grid.n_latents"] == "required"
    assert {"eval.splice_dtype", "train.lr_end", "harvest.num_actors", "optuna.seed"} <= set(by_name)


def test_trial_points_are_typed_and_keep_their_keys():
    """A grid point is a frozen TrialPoint; its key is the one runs and bundles were matched by before (pinned),
    and the plain dict a Tune config or result.json carries reads back to the same point."""
    from orchestrator.spec import TrialPoint

    points = load_spec("default").trial_points()
    assert [p.trial_key for p in points] == ["4d6ea2fe3504", "366447748e9e", "e61ee3d3c8e4", "62e6c4d1f97f"]
    mat = points[1]
    assert mat.name == "n1024-k32-topk-doubling:smallest=64-s0" and mat.boundaries == (64, 128, 256, 512, 1024)
    assert mat.sae_config(576).partition == (64, 128, 256, 512, 1024)
    config = mat.as_config()
    assert config["boundaries"] == [64, 128, 256, 512, 1024] and config["trial_key"] == mat.trial_key
    assert TrialPoint.from_config(config) == mat
    with pytest.raises(ValueError, match="does not match its coordinates"):
        TrialPoint.from_config({**config, "seed": 1})
    with pytest.raises(Exception, match="frozen"):
        mat.seed = 1
