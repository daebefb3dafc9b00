"""Presets (`rlcx_jax.presets`): every value names a real field of the right type, every preset builds a
valid config and hyperparameters, every classic-control and MinAtar environment has a PPO preset, and the
module stays importable without jax. No training here: benchmarks/presets.py measures whether they learn."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any

import gymnax
import pytest

from rlcx_jax import nets, presets, rl

ALL = presets.available()


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _split(preset: presets.Preset) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    spec = rl.get(preset.algorithm)
    return presets.split(
        preset.values, _field_names(spec.config_cls), _field_names(nets.NetConfig), _field_names(spec.hparams_cls)
    )


def _build(preset: presets.Preset) -> tuple[Any, Any]:
    spec = rl.get(preset.algorithm)
    config_kw, net_kw, hparams_kw = _split(preset)
    config = spec.config_cls(env=preset.env, net=nets.NetConfig(**net_kw), **config_kw)
    return config, spec.hparams_cls(**hparams_kw)


def _compatible(value: Any, default: Any) -> bool:
    """Does `value` have the type of the field whose default is `default` (ints pass for floats)?"""
    if default is None or isinstance(default, str):
        return default is None or isinstance(value, str)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, tuple):
        return isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return True


def test_import_does_not_load_jax() -> None:
    code = (
        "import sys, rlcx_jax.presets as p; p.available(); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'gymnax', 'optax')); "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("algorithm", "env"), ALL, ids=[f"{a}/{e}" for a, e in ALL])
def test_values_are_fields_of_the_right_type(algorithm: str, env: str) -> None:
    preset = presets.get(algorithm, env)
    assert preset is not None and (preset.algorithm, preset.env) == (algorithm, env)
    spec = rl.get(algorithm)
    config_kw, net_kw, hparams_kw = _split(preset)  # raises on a name that is no field
    assert len(config_kw) + len(net_kw) + len(hparams_kw) == len(preset.values)
    assert not set(config_kw) & {"env", "env_kwargs", "net", "extensions"}, "fields the CLI sets itself"
    assert isinstance(preset.total_steps, int) and preset.total_steps > 0
    defaults = [(config_kw, spec.config_cls()), (net_kw, nets.NetConfig()), (hparams_kw, spec.hparams_cls())]
    for kwargs, default in defaults:
        for name, value in kwargs.items():
            assert _compatible(value, getattr(default, name)), f"{name}={value!r} ({type(default).__name__})"
    assert preset.source.strip(), "every preset says where it comes from"


@pytest.mark.parametrize(("algorithm", "env"), ALL, ids=[f"{a}/{e}" for a, e in ALL])
def test_builds_a_valid_config_and_hparams(algorithm: str, env: str) -> None:
    preset = presets.get(algorithm, env)
    assert preset is not None
    config, hparams = _build(preset)
    config.validate()
    hparams.validate(config.extensions)
    assert config.total_timesteps == preset.total_steps
    assert config.num_updates * config.steps_per_update == preset.total_steps, "no steps lost to rounding"


def test_every_classic_control_and_minatar_env_has_a_ppo_preset() -> None:
    registered = set(gymnax.registered_envs)
    assert set(presets.CLASSIC_CONTROL) <= registered
    assert set(presets.MINATAR) == {e for e in registered if e.endswith("-MinAtar")}
    missing = [env for env in presets.CLASSIC_CONTROL + presets.MINATAR if presets.get("ppo", env) is None]
    assert not missing, missing


def test_dqn_presets_cover_discrete_classic_control_only() -> None:
    dqn_envs = {env for algorithm, env in ALL if algorithm == "dqn"}
    assert "CartPole-v1" in dqn_envs
    assert dqn_envs <= {"CartPole-v1", "Acrobot-v1", "MountainCar-v0"}


def test_minatar_presets_use_the_conv_torso() -> None:
    for env in presets.MINATAR:
        preset = presets.get("ppo", env)
        assert preset is not None and preset.values["net_torso"] == "cnn"


def test_lookup() -> None:
    assert presets.get("ppo", "NoSuchEnv-v0") is None
    assert presets.get("reinforce", "CartPole-v1") is None
    assert ALL == sorted(presets.PRESETS) and len(ALL) == len(set(ALL))


def test_presets_are_hashable_and_read_only() -> None:
    preset = presets.get("ppo", "Pendulum-v1")
    assert preset is not None
    assert hash(preset) == hash(dataclasses.replace(preset))
    with pytest.raises(TypeError):
        preset.values["lr"] = 1.0  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.env = "CartPole-v1"  # type: ignore[misc]
    same = presets.Preset("ppo", "Pendulum-v1", dict(preset.values), preset.source, preset.measured)
    assert same == preset and hash(same) == hash(preset)


def test_values_reject_a_name_twice() -> None:
    with pytest.raises(ValueError, match="twice"):
        presets.FrozenValues([("lr", 1e-3), ("lr", 3e-4)])


def test_split_rejects_unknown_names() -> None:
    preset = presets.get("ppo", "CartPole-v1")
    assert preset is not None
    spec = rl.get("ppo")
    fields = (_field_names(spec.config_cls), _field_names(nets.NetConfig), _field_names(spec.hparams_cls))
    with pytest.raises(ValueError, match="learning_rate"):
        presets.split({**preset.values, "learning_rate": 1e-3}, *fields)
    with pytest.raises(ValueError, match="net_width"):
        presets.split({"net_width": 64}, *fields)
    with pytest.raises(ValueError, match="buffer_size"):  # a DQN field is no PPO field
        presets.split({"buffer_size": 1000}, *fields)
    config, net, hparams = presets.split({"total_steps": 10, "net_hidden": (8,), "lr": 1e-3, "num_envs": 2}, *fields)
    assert (config, net, hparams) == ({"total_timesteps": 10, "num_envs": 2}, {"hidden": (8,)}, {"lr": 1e-3})
