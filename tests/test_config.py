"""Typed config loading (titans.typed_yaml on the run sections of titans.config): validation errors, nested sections,
overrides and YAML round trips."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import pytest

from titans.config import OptimConfig, RunConfig, TrainConfig
from titans.fileio import save_yaml
from titans.model import TitansConfig
from titans.typed_yaml import ConfigError, apply_overrides, from_dict, load_yaml, to_dict


@dataclasses.dataclass
class StandInModel:
    """Stands in for titans.model.TitansConfig."""

    dim: int = 64
    heads: int = 4
    variant: Literal["mac", "mag", "mal"] = "mac"
    dropout: float = 0.0
    window: Optional[int] = None  # noqa: UP045 -- typing.Optional on purpose (X | None is tested too)
    chunk_sizes: tuple[int, ...] = (8, 16)


@dataclasses.dataclass
class StandInRun(RunConfig):
    """The run sections around a stand-in model: the engine's types (Optional, tuples, floats) in one place."""

    model: StandInModel


def test_defaults_and_nested_sections():
    cfg = from_dict(StandInRun, {"model": {"heads": 8}, "optim": {"lr": 1e-3}, "name": "x"})
    assert cfg.model == StandInModel(heads=8)
    assert cfg.optim == OptimConfig(lr=1e-3)
    assert cfg.train == TrainConfig()
    assert cfg.name == "x"


def test_unknown_key_names_full_path_and_nearest():
    with pytest.raises(ConfigError, match=r"unknown key 'model\.hedas' \(did you mean 'model\.heads'\?\)"):
        from_dict(StandInRun, {"model": {"hedas": 8}})
    with pytest.raises(ConfigError, match=r"unknown key 'trian' \(did you mean 'train'\?\)"):
        from_dict(StandInRun, {"model": {}, "trian": {}})
    with pytest.raises(ConfigError, match=r"unknown key 'train\.zzz' \(valid keys: steps, batch_size"):
        from_dict(StandInRun, {"model": {}, "train": {"zzz": 1}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": {"steps": "10"}}, r"'train\.steps': expected int, got str '10'"),
        ({"train": {"steps": 1.5}}, r"'train\.steps': expected int, got float 1\.5"),
        ({"train": {"compile": 1}}, r"'train\.compile': expected bool, got int 1"),
        ({"optim": {"lr": True}}, r"'optim\.lr': expected float, got bool True"),
        ({"optim": {"betas": [0.9]}}, r"'optim\.betas': expected 2 items, got 1"),
        ({"optim": {"betas": [0.9, "a"]}}, r"'optim\.betas\[1\]': expected float, got str 'a'"),
        ({"train": {"precision": "fp8"}}, r"'train\.precision': expected one of 'fp32', 'bf16', 'fp16', got 'fp8'"),
        ({"model": {"window": "big"}}, r"'model\.window': expected int, got str 'big'"),
        ({"data": {"kwargs": [1]}}, r"'data\.kwargs': expected dict"),
        ({"train": 5}, r"'train': expected TrainConfig, got int 5"),
    ],
)
def test_wrong_types_name_key_expected_and_got(data, message):
    data = {"model": {}, **data}
    with pytest.raises(ConfigError, match=message):
        from_dict(StandInRun, data)


def test_value_conversions():
    cfg = from_dict(StandInRun, {"model": {"dropout": 0, "window": 128, "chunk_sizes": [4, 8, 32]},
                                "optim": {"betas": [0, 0.5]}, "train": {"tbptt_horizon": None}})
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)
    assert cfg.model.window == 128
    assert cfg.model.chunk_sizes == (4, 8, 32)
    assert cfg.optim.betas == (0.0, 0.5) and all(isinstance(b, float) for b in cfg.optim.betas)


def test_range_checks_name_the_dotted_key():
    with pytest.raises(ConfigError, match=r"'optim\.lr' must be > 0, got -1\.0"):
        from_dict(StandInRun, {"model": {}, "optim": {"lr": -1}})
    with pytest.raises(ConfigError, match=r"'train\.seq_len' must be divisible by tbptt_segments=3"):
        from_dict(StandInRun, {"model": {}, "train": {"seq_len": 256, "tbptt_segments": 3}})


def test_missing_required_model_section():
    with pytest.raises(ConfigError, match="missing required key 'model'"):
        from_dict(StandInRun, {})


def test_the_model_section_is_titans_config():
    assert from_dict(RunConfig, {"model": {"dim": 64, "memory_conv": False}}).model == TitansConfig(
        dim=64, memory_conv=False)
    with pytest.raises(ConfigError, match=r"unknown key 'model\.use_conv' \(did you mean 'model\.memory_conv'\?\)"):
        from_dict(RunConfig, {"model": {"use_conv": False}})


def test_typed_yaml_is_a_leaf():
    import ast
    from pathlib import Path

    import titans.typed_yaml

    tree = ast.parse(Path(titans.typed_yaml.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += ["." * n.level + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.startswith(".") or m.split(".")[0] == "titans"]


def test_overrides_set_nested_values_parsed_as_yaml():
    data = {"model": {"heads": 4}, "optim": {"lr": 0.1}}
    out = apply_overrides(data, ["model.heads=8", "optim.lr=1e-3", "optim.betas=[0.8, 0.9]",
                                 "train.precision=bf16", "model.window=null", "data.kwargs.n_keys=5"], StandInRun)
    assert data == {"model": {"heads": 4}, "optim": {"lr": 0.1}}  # input untouched
    cfg = from_dict(StandInRun, out)
    assert cfg.model.heads == 8
    assert cfg.optim.lr == 1e-3
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.train.precision == "bf16"
    assert cfg.model.window is None
    assert cfg.data.kwargs == {"n_keys": 5}


def test_override_errors():
    with pytest.raises(ConfigError, match=r"unknown key 'model\.hedas' \(did you mean 'model\.heads'\?\)"):
        apply_overrides({}, ["model.hedas=8"], StandInRun)
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lrr' \(did you mean 'optim\.lr'\?\)"):
        apply_overrides({}, ["optim.lrr=8"], StandInRun)
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        apply_overrides({}, ["model.heads"], StandInRun)
    with pytest.raises(ConfigError, match=r"'train\.steps' is not a section"):
        apply_overrides({}, ["train.steps.x=1"], StandInRun)


def test_yaml_round_trip_and_scientific_floats(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  heads: 2\noptim:\n  lr: 3e-4\n  weight_decay: 1E-2\ntrain:\n  steps: 7\n")
    cfg = load_yaml(path, StandInRun)
    assert cfg.optim.lr == 3e-4 and cfg.optim.weight_decay == 0.01
    assert cfg.train.steps == 7 and cfg.model.heads == 2
    out = tmp_path / "sub" / "resolved.yaml"
    save_yaml(cfg, out)
    assert load_yaml(out, StandInRun) == cfg
    assert [p.name for p in out.parent.iterdir()] == ["resolved.yaml"]  # no temp file left behind


def test_load_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hedas: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'model\.hedas'"):
        load_yaml(path, StandInRun)
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_yaml(path, StandInRun)


def test_to_dict_is_plain_data():
    cfg = from_dict(StandInRun, {"model": {}})
    data = to_dict(cfg)
    assert data["optim"]["betas"] == [0.9, 0.95]
    assert data["model"] == {"dim": 64, "heads": 4, "variant": "mac", "dropout": 0.0, "window": None,
                             "chunk_sizes": [8, 16]}
    assert from_dict(StandInRun, data) == cfg


# ------------------------------------------------------------------------------------------ hostile values
@pytest.mark.parametrize("key, value", [("optim.lr", ".inf"), ("optim.eps", ".inf"), ("optim.grad_clip", ".inf"),
                                        ("model.dropout", ".nan"), ("optim.weight_decay", "-.inf")])
def test_floats_must_be_finite(key, value):
    with pytest.raises(ConfigError, match=rf"'{key}' must be a finite number, got -?(inf|nan)"):
        from_dict(StandInRun, apply_overrides({"model": {}}, [f"{key}={value}"], StandInRun))


@pytest.mark.parametrize("text, message", [
    ("optim:\n  lr: 0.1\n  lr: 0.2\n", r"duplicate key 'optim\.lr' \(line 3\)"),
    ("optim:\n  lr: 0.1\noptim:\n  eps: 0.1\n", r"duplicate key 'optim' \(line 3\)"),
    ("a: &a [1, 1]\nb: &b [*a, *a]\nc: [*b, *b]\n", r"YAML aliases are not allowed \(\*a, line 2\)"),
])
def test_yaml_duplicate_keys_and_aliases_are_refused(tmp_path, text, message):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_yaml(path, StandInRun)
    assert "\n" not in str(err.value) and "hostile.yaml" in str(err.value)


def test_yaml_alias_bomb_is_refused(tmp_path):
    """Refused at the first alias, before any expansion (its time: benchmarks/bench_latency.py)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("model:\n  dim: 64\ndata:\n  kwargs:\n" + "".join(f"    {line}\n" for line in lines))
    with pytest.raises(ConfigError, match=r"YAML aliases are not allowed \(\*a0, line 6\)"):
        load_yaml(path, StandInRun)


def test_invalid_yaml_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  dim: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML") as err:
        load_yaml(path, StandInRun)
    assert "\n" not in str(err.value)
