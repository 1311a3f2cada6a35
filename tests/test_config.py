"""Every invalid SAE/train config fails at construction with the offending field's name."""

import pytest
from pydantic import ValidationError

from sae.config import SAEConfig, TrainConfig
from sae.matryoshka import resolve_partition


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"k": 64}, "k"),  # k >= n_latents
        ({"k": 100}, "k"),
        ({"k": 0}, "k"),
        ({"k": -3}, "k"),
        ({"partition": (8, 8, 64)}, "partition"),  # not strictly increasing
        ({"partition": (32, 16, 64)}, "partition"),
        ({"partition": (8, 16, 32)}, "partition"),  # does not end at n_latents
        ({"partition": ()}, "partition"),
        ({"architecture": "jumprelu"}, "architecture"),
        ({"d_in": 0}, "d_in"),
        ({"input_scale": 0.0}, "input_scale"),
        ({"partition": (32, 64), "group_weights": (1.0,)}, "group_weights"),
        ({"group_weights": (1.0,)}, "group_weights"),
    ],
)
def test_invalid_sae_config_names_field(kwargs, field):
    base = {"d_in": 16, "n_latents": 64, "k": 4}
    with pytest.raises(ValidationError, match=field):
        SAEConfig(**{**base, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lr": -1.0}, "lr"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"decay_fraction": 1.5}, "decay_fraction"),
        ({"encoder_init_norm": 0.0}, "encoder_init_norm"),
        ({"aux_k": 0}, "aux_k"),
        ({"dead_tokens": 0}, "dead_tokens"),
        ({"threshold_momentum": 1.0}, "threshold_momentum"),
        ({"device": "tpu"}, "device"),
        ({"dtype": "bfloat16"}, "dtype"),
        ({"compute_dtype": "int8"}, "compute_dtype"),
    ],
)
def test_invalid_train_config_names_field(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("spec", [[8, 8, 64], [16, 8, 64], [8, 16, 32], "doubling:0", "nope:3", "fractions:foo",
                                  {"scheme": "fractions", "fractions": [0.5, 0.4]}, {"scheme": "mystery"}])
def test_invalid_partition_spec_names_field(spec):
    with pytest.raises(ValueError, match="partition"):
        resolve_partition(spec, 64)


def test_valid_configs_and_defaults():
    cfg = SAEConfig(d_in=16, n_latents=64, k=4, partition=(16, 32, 64), group_weights=(1, 1, 2))
    assert cfg.is_matryoshka and cfg.weights == (0.25, 0.25, 0.5)
    assert SAEConfig(d_in=16, n_latents=64, k=4).weights == (1.0,)
    tc = TrainConfig()
    assert tc.learning_rate(2**14) == pytest.approx(2e-4)
    assert tc.learning_rate(2**16) == pytest.approx(1e-4)
    assert tc.aux_k_for(576, 4608) == 288 and tc.aux_k_for(2304, 65536) == 512 and tc.aux_k_for(16, 4) == 4
