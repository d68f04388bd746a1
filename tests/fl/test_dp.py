"""Local DP on sparse uploads: clipping over the uploaded keys only, calibrated noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.fl.dp import dp_noise_std, privatize_upload


def _record(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k.replace("_", "."): Array(v) for k, v in arrays.items()})


def test_noise_std_is_the_gaussian_mechanism():
    assert dp_noise_std(1.0, 1.0, 1e-5) == pytest.approx(math.sqrt(2 * math.log(1.25e5)))
    assert dp_noise_std(2.0, 4.0, 1e-5) == pytest.approx(dp_noise_std(1.0, 1.0, 1e-5) / 2)


def test_clipping_acts_on_the_uploaded_keys_only():
    received = _record(dense=np.zeros(4, np.float32), expert_0=np.zeros(3, np.float32),
                       expert_1=np.ones(3, np.float32))
    # The client uploads dense and expert.0 (not expert.1): update norm = sqrt(4*9 + 3*16) = sqrt(84)
    uploaded = _record(dense=np.full(4, 3.0, np.float32), expert_0=np.full(3, 4.0, np.float32))
    out = privatize_upload(uploaded, received, clip=1.0, std=0.0)
    assert list(out.keys()) == ["dense", "expert.0"]
    values = np.concatenate([out["dense"].numpy(), out["expert.0"].numpy()])
    assert np.linalg.norm(values) == pytest.approx(1.0, rel=1e-5)  # clipped to the norm
    assert out["dense"].numpy()[0] == pytest.approx(3.0 / math.sqrt(84), rel=1e-5)
    assert out["dense"].numpy().dtype == np.float32


def test_noise_is_added_with_the_requested_spread():
    received = _record(w=np.zeros(200_000, np.float32))
    out = privatize_upload(_record(w=np.zeros(200_000, np.float32)), received, clip=1.0, std=0.5)
    assert out["w"].numpy().std() == pytest.approx(0.5, rel=0.02)


def test_dp_settings_are_validated():
    with pytest.raises(ConfigError, match="--dp-epsilon"):
        RunConfig(dp_epsilon=-1.0).validate()
    with pytest.raises(ConfigError, match="--dp-delta"):
        RunConfig(dp_epsilon=1.0, dp_delta=0.0).validate()
    RunConfig(dp_epsilon=2.0).validate()
