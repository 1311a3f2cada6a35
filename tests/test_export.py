"""`python -m sae.export` and `python -m orchestrator.export`: a trial bundle, a bare checkpoint or an MLflow run
exported for SAELens and sparsify. The files are checked against each format's field list (SAELens v6's loader;
sparsify's SparseCoder.load_from_disk), and raw activations run through the exported tensors (each format's
forward, re-implemented here in a few lines) give our SAE's reconstruction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from spec_helpers import smoke_dict
from test_saelens import (
    SAELENS_METADATA,
    SAELENS_V6_FIELDS,
    D,
    K,
    N,
    _raw,
    _sae,
    read_saelens,
    saelens_forward,
)

from orchestrator import export as run_export
from orchestrator.spec import SweepSpec, make_point
from orchestrator.tracking import Tracker
from orchestrator.trial import _write_bundle
from sae.checkpoint import save_sae
from sae.evaluate import EvalReport
from sae.export import main, write_saelens
from sae.lm import EMBEDDED_MODELS

# sparsify's cfg.json: the SparseCoderConfig fields plus d_in (eai-sparsify 1.3.3 config.py, SparseCoder.save_to_disk)
SPARSIFY_FIELDS = {"activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
                   "skip_connection", "transcode", "d_in"}
# SparseCoder's state dict, loaded strictly: nn.Linear encoder [num_latents, d_in], W_dec, b_dec (no W_skip)
SPARSIFY_SHAPES = {"encoder.weight": (N, D), "encoder.bias": (N,), "W_dec": (N, D), "b_dec": (D,)}
HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
ACTIVATIONS = {"model": "smollm2-135m", "site": "resid_post.3", "context_length": 64, "corpus": "wiki-extracts"}


def _spec() -> SweepSpec:
    return SweepSpec.model_validate(smoke_dict(site=ACTIVATIONS["site"], context_length=ACTIVATIONS["context_length"]))


def _bundle(root: Path, sae, spec: SweepSpec | None = None) -> Path:
    """The bundle a trial leaves for this SAE (orchestrator.trial._write_bundle; an evaluation with no curves)."""
    spec = spec or _spec()
    c = sae.cfg
    point = make_point(c.n_latents, c.k, c.architecture, list(c.partition) if c.partition else None, 0)
    out = root / "points" / point.trial_key
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_bundle(out, sae, point, spec, EvalReport(), {"fvu": 0.25}, {"device": "cpu", "compute_dtype": "float32"})
    return out


def read_sparsify(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = json.loads((path / "cfg.json").read_text())
    with safe_open(str(path / "sae.safetensors"), framework="pt") as f:
        return cfg, {k: f.get_tensor(k) for k in f.keys()}


def sparsify_forward(cfg: dict, w: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsify's SparseCoder.encode (x - b_dec, then fused_encoder: relu(linear), topk) and decode (sum of the
    chosen W_dec rows weighted by their activations, + b_dec), dense."""
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    vals, idx = pre.topk(cfg["k"], dim=-1, sorted=False)
    z = torch.zeros_like(pre).scatter_(-1, idx, vals)
    return z, z @ w["W_dec"] + w["b_dec"]


def _close(x_hat: torch.Tensor, want: torch.Tensor) -> None:
    """Equal within 1e-5 of the reconstruction's scale (float32 weights, folded in float64)."""
    torch.testing.assert_close(x_hat, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("kind", ["topk", "matryoshka_topk", "batchtopk"])
def test_bundle_exports_to_both_formats_and_round_trips(tmp_path, kind, capsys):
    sae = _sae(kind)
    bundle = _bundle(tmp_path, sae)
    x = _raw(rows=256)
    want = sae(x).detach()

    assert main([str(bundle), "--to", "saelens", str(tmp_path / "lens")]) == 0
    cfg, w = read_saelens(tmp_path / "lens")
    arch = "topk" if sae.cfg.architecture == "topk" else "jumprelu"
    assert set(cfg) == SAELENS_V6_FIELDS[arch] and SAELENS_METADATA <= set(cfg["metadata"])
    assert cfg["metadata"]["model_name"] == HUB and cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert _files(tmp_path / "lens") == _files(bundle / "sae_lens")  # what the trial wrote, byte for byte
    z, x_hat = saelens_forward(cfg, w, x)
    assert torch.equal(z != 0, sae.encode_dense(x) != 0)
    _close(x_hat, want)

    out = tmp_path / "sparsify"
    if kind == "batchtopk":  # a threshold sparsify cannot express: refused before anything is written
        assert main([str(bundle), "--to", "sparsify", str(out)]) == 2
        assert "'batchtopk'" in capsys.readouterr().err and not out.exists()
        return
    assert main([str(bundle), "--to", "sparsify", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae.safetensors"]
    cfg, w = read_sparsify(out)
    assert set(cfg) == SPARSIFY_FIELDS
    assert cfg["d_in"] == D and cfg["num_latents"] == N and cfg["k"] == K and cfg["activation"] == "topk"
    assert not (cfg["transcode"] or cfg["skip_connection"] or cfg["multi_topk"] or cfg["normalize_decoder"])
    assert {k: tuple(t.shape) for k, t in w.items()} == SPARSIFY_SHAPES
    assert all(t.dtype == torch.float32 for t in w.values())
    z, x_hat = sparsify_forward(cfg, w, x)
    assert torch.equal(z != 0, sae.encode_dense(x) != 0)  # a Matryoshka SAE runs as the plain TopK SAE it is
    _close(z, sae.encode_dense(x))
    _close(x_hat, want)


@pytest.mark.parametrize("kind", ["topk", "matryoshka_topk"])
def test_sparsify_loads_the_export(tmp_path, kind):
    sparse_coder = pytest.importorskip("sparsify.sparse_coder")  # eai-sparsify (not the unrelated `sparsify`)
    sae = _sae(kind)
    assert main([str(save_sae(sae, tmp_path / "sae")), "--to", "sparsify", str(tmp_path / "sp")]) == 0
    coder = sparse_coder.SparseCoder.load_from_disk(tmp_path / "sp")  # strict: no missing or extra tensors
    assert coder.num_latents == N and coder.d_in == D and coder.cfg.k == K
    x = _raw()
    with torch.no_grad():
        enc = coder.encode(x)
        z = torch.zeros(x.shape[0], N).scatter_(-1, enc.top_indices, enc.top_acts)
        _close(z, sae.encode_dense(x))
        _close(coder(x).sae_out, sae(x))


def test_trial_records_the_activations_and_names_the_hub_model(tmp_path):
    bundle = _bundle(tmp_path, _sae("topk"))
    resolved = json.loads((bundle / "result.json").read_text())["resolved"]
    assert {k: resolved[k] for k in ACTIVATIONS} == ACTIVATIONS
    meta = read_saelens(bundle / "sae_lens")[0]["metadata"]
    assert meta["model_name"] == HUB == EMBEDDED_MODELS["smollm2-135m"].hub_name  # not our alias
    assert meta["model_alias"] == "smollm2-135m"
    assert meta["hook_name"] == "blocks.3.hook_resid_post" and meta["context_size"] == 64
    assert meta["dataset_path"] == "wiki-extracts"
    # a model that is no alias of ours (a hub name, a local path) is written as the spec gives it
    other = read_saelens(write_saelens(_sae("topk"), tmp_path / "other", model="EleutherAI/pythia-70m",
                                       site="resid_post.3", context_size=64))[0]["metadata"]
    assert other["model_name"] == "EleutherAI/pythia-70m" and "model_alias" not in other


def test_bare_checkpoint_takes_the_metadata_from_options(tmp_path, capsys):
    sae = _sae("topk")
    ckpt = save_sae(sae, tmp_path / "sae")
    out = tmp_path / "lens"
    assert main([str(ckpt), "--to", "saelens", str(out)]) == 2
    err = capsys.readouterr().err
    assert "give --model, --site, --context-size" in err and "bare checkpoint" in err and not out.exists()
    assert main([str(ckpt), "--to", "saelens", str(out), "--model", "smollm2-135m"]) == 2
    assert "give --site, --context-size" in capsys.readouterr().err
    assert main([str(ckpt), "--to", "saelens", str(out), "--model", "smollm2-135m", "--site", "mlp_out.1",
                 "--context-size", "256", "--dataset", "my-corpus"]) == 0
    meta = read_saelens(out)[0]["metadata"]
    assert (meta["model_name"], meta["hook_name"], meta["context_size"], meta["dataset_path"]) == (
        HUB, "blocks.1.hook_mlp_out", 256, "my-corpus")
    assert main([str(ckpt), "--to", "sparsify", str(tmp_path / "sp")]) == 0  # sparsify's cfg names no model
    _close(sparsify_forward(*read_sparsify(tmp_path / "sp"), _raw())[1], sae(_raw()).detach())
    # options override what a bundle records
    bundle = _bundle(tmp_path, sae)
    assert main([str(bundle), "--to", "saelens", str(out), "--context-size", "16"]) == 0
    meta = read_saelens(out)[0]["metadata"]
    assert meta["context_size"] == 16 and meta["hook_name"] == "blocks.3.hook_resid_post"


def test_bad_input_is_refused_before_any_work(tmp_path, capsys):
    sae = _sae("topk")
    bundle = _bundle(tmp_path, sae)
    run_id = "0123456789abcdef0123456789abcdef"
    assert main([run_id, "--to", "saelens", str(tmp_path / "a")]) == 2
    assert f"python -m orchestrator.export {run_id}" in capsys.readouterr().err
    assert main([str(tmp_path / "nope"), "--to", "saelens", str(tmp_path / "a")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(tmp_path), "--to", "sparsify", str(tmp_path / "a")]) == 2
    assert "neither a trial bundle" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert main([str(bundle), "--to", "sparsify", str(busy)]) == 2  # an export replaces OUT whole: refused
    assert "not an earlier sparsify export" in capsys.readouterr().err and (busy / "notes.txt").exists()
    before = _files(bundle / "sae")
    assert main([str(bundle), "--to", "sparsify", str(bundle / "sae")]) == 2  # same file names as a sparsify export
    assert "is or holds the source" in capsys.readouterr().err and _files(bundle / "sae") == before
    assert main([str(bundle / "sae"), "--to", "saelens", str(tmp_path / "a"), "--model", "m", "--site", "resid_mid.3",
                 "--context-size", "8"]) == 2
    assert "site 'resid_mid.3' is not a site name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(bundle), "--to", "saelens", str(tmp_path / "a"), "--context-size", "0"])
    assert "--context-size: must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main([str(bundle), "--to", "sparsify", str(tmp_path / "sp")]) == 0  # an earlier export is replaced
    assert main([str(bundle), "--to", "sparsify", str(tmp_path / "sp"), "--dtype", "bfloat16"]) == 0
    assert read_sparsify(tmp_path / "sp")[1]["W_dec"].dtype == torch.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "points", "sp"]  # no temporary folders left


def test_run_id_exports_what_the_local_bundle_exports(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "exp")
    spec = _spec()
    parent = tracker.parent_run("sweep", name="sweep", spec_hash="h", spec_yaml=spec.to_yaml(), params={})
    sae = _sae("matryoshka_topk")
    bundle = _bundle(tmp_path / "new", sae, spec)
    # a bundle from a sweep before result.json recorded the activations (like those already in .cache)
    old = _bundle(tmp_path / "old", _sae("topk", seed=4), spec)
    result = json.loads((old / "result.json").read_text())
    result["resolved"] = {k: v for k, v in result["resolved"].items() if k not in ACTIVATIONS}
    (old / "result.json").write_text(json.dumps(result))
    runs = {}
    for name, folder in (("new", bundle), ("old", old)):
        runs[name] = tracker.child_run(parent, name, tune_trial=name, name=name, params={})
        tracker.log_trial_bundle(runs[name], folder)
        tracker.finish(runs[name])

    for to in ("saelens", "sparsify"):
        local, remote = tmp_path / f"local-{to}", tmp_path / f"remote-{to}"
        assert main([str(bundle), "--to", to, str(local)]) == 0
        assert run_export.main([runs["new"], "--to", to, str(remote), "--tracking-uri", uri]) == 0
        assert _files(remote) == _files(local)
    # the old run: its sweep's spec (the parent run's spec.yaml) supplies what its result.json lacks
    assert main([str(old), "--to", "saelens", str(tmp_path / "old-local")]) == 2
    assert "give --model, --site, --context-size" in capsys.readouterr().err
    assert run_export.main([runs["old"], "--to", "saelens", str(tmp_path / "old-remote"), "--tracking-uri", uri]) == 0
    assert main([str(old), "--to", "saelens", str(tmp_path / "old-local"), "--model", "smollm2-135m", "--site",
                 "resid_post.3", "--context-size", "64", "--dataset", "wiki-extracts"]) == 0
    assert _files(tmp_path / "old-remote") == _files(tmp_path / "old-local")
    # a local path goes through orchestrator.export as through sae.export
    assert run_export.main([str(bundle), "--to", "sparsify", str(tmp_path / "via-path")]) == 0
    assert _files(tmp_path / "via-path") == _files(tmp_path / "local-sparsify")

    capsys.readouterr()
    assert run_export.main([parent, "--to", "saelens", str(tmp_path / "x"), "--tracking-uri", uri]) == 2
    assert "parent run of sweep" in capsys.readouterr().err
    missing = "f" * 32
    assert run_export.main([missing, "--to", "saelens", str(tmp_path / "x"), "--tracking-uri", uri]) == 2
    assert f"run {missing} is not in" in capsys.readouterr().err
    nowhere = f"sqlite:///{tmp_path}/elsewhere/mlflow.db"
    assert run_export.main([runs["new"], "--to", "saelens", str(tmp_path / "x"), "--tracking-uri", nowhere]) == 2
    assert "--tracking-uri: no MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "x").exists()  # no store created, nothing written
