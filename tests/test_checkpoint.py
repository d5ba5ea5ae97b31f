"""Checkpoints: bitwise exact resume, atomic layout, pruning, and clear errors on corruption."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from titans.checkpoint import (
    CheckpointError,
    atomic_write,
    checkpoint_root,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from titans.config import OptimConfig
from titans.optim import build_optimizer, build_scheduler

VOCAB = 11


class Tiny(nn.Module):
    """Embedding tied to the output layer, dropout, a norm and a buffer that counts calls."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.body = nn.Sequential(nn.Linear(width, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, width),
                                  nn.LayerNorm(width))
        self.head = nn.Linear(width, VOCAB, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, tokens):
        self.calls += 1
        return self.head(self.body(self.embed(tokens)))


CFG = OptimConfig(lr=1e-2, warmup_steps=3, weight_decay=0.1, min_lr_ratio=0.1, grad_clip=1.0)


def make_run(seed: int):
    torch.manual_seed(seed)
    model = Tiny()
    optimizer = build_optimizer(model, CFG)
    scheduler = build_scheduler(optimizer, CFG, total_steps=10)
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler) -> float:
    """One step whose batch draws on the Python, NumPy and torch generators (dropout too)."""
    tokens = torch.randint(0, VOCAB, (4, 6))
    tokens = (tokens + random.randrange(VOCAB) + int(np.random.randint(VOCAB))) % VOCAB
    logits = model(tokens[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CFG.grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.item()


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def assert_optimizer_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for pid in sa["state"]:
        for key, value in sa["state"][pid].items():
            assert torch.equal(value, sb["state"][pid][key]), (pid, key)


def assert_model_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def snapshot(directory) -> dict:
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(directory.rglob("*"))}


def test_resume_is_bitwise_identical(tmp_path):
    seed_all(0)
    model_a, opt_a, sched_a = make_run(0)
    seed_all(1)
    losses_a = [train_step(model_a, opt_a, sched_a) for _ in range(10)]

    seed_all(0)
    model_b, opt_b, sched_b = make_run(0)
    seed_all(1)
    losses_b = [train_step(model_b, opt_b, sched_b) for _ in range(5)]
    save_checkpoint(tmp_path, 5, model_b, opt_b, sched_b, extra={"losses": losses_b, "data": {"position": 5}})
    rng_after_save = (torch.rand(3).tolist(), random.random(), np.random.rand())
    model_at_5 = {k: v.clone() for k, v in model_b.state_dict().items()}
    del model_b, opt_b, sched_b

    seed_all(123)  # a fresh process: different generators and initial weights
    model_c, opt_c, sched_c = make_run(99)
    info = load_checkpoint(tmp_path, model_c, opt_c, sched_c)
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == rng_after_save
    assert load_checkpoint(tmp_path)["step"] == info["step"] == 5  # no objects given: restores the RNG only
    assert info["extra"] == {"losses": losses_b, "data": {"position": 5}}
    assert_model_equal_to_state(model_c, model_at_5)
    assert model_c.head.weight is model_c.embed.weight  # still tied
    assert sched_c.last_epoch == 5 and opt_c.param_groups[0]["lr"] == pytest.approx(sched_c.get_last_lr()[0])

    losses_c = info["extra"]["losses"] + [train_step(model_c, opt_c, sched_c) for _ in range(5)]
    assert losses_c == losses_a  # bitwise equal floats
    assert_model_equal(model_c, model_a)
    assert_optimizer_equal(opt_c, opt_a)
    assert sched_c.state_dict() == sched_a.state_dict()


def assert_model_equal_to_state(model: nn.Module, state: dict) -> None:
    current = model.state_dict()
    assert current.keys() == state.keys()
    for key in state:
        assert torch.equal(current[key], state[key]), key


def test_rng_states_restored_exactly(tmp_path):
    model, opt, sched = make_run(0)
    seed_all(5)
    save_checkpoint(tmp_path, 0, model, opt, sched)
    expected = (torch.rand(4).tolist(), [random.random() for _ in range(3)], np.random.rand(3).tolist())
    seed_all(6)
    load_checkpoint(tmp_path)
    assert (torch.rand(4).tolist(), [random.random() for _ in range(3)], np.random.rand(3).tolist()) == expected
    seed_all(6)
    load_checkpoint(tmp_path, restore_rng=False)
    assert torch.rand(4).tolist() != expected[0]


def test_layout_latest_pointer_and_pruning(tmp_path):
    model, opt, sched = make_run(0)
    assert latest_checkpoint(tmp_path) is None
    for step in range(1, 6):
        path = save_checkpoint(tmp_path, step, model, opt, sched, keep_last=2)
        assert path == checkpoint_root(tmp_path) / f"ckpt-{step:06d}"
    root = checkpoint_root(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["ckpt-000004", "ckpt-000005", "latest"]
    assert (root / "latest").read_text() == "ckpt-000005\n"
    assert sorted(p.name for p in (root / "ckpt-000005").iterdir()) == [
        "checkpoint.json", "model.safetensors", "state.safetensors"]
    assert latest_checkpoint(tmp_path) == root / "ckpt-000005"
    assert list_checkpoints(tmp_path) == [root / "ckpt-000004", root / "ckpt-000005"]
    assert resolve_checkpoint(tmp_path) == root / "ckpt-000005"
    assert resolve_checkpoint(root / "ckpt-000004") == root / "ckpt-000004"
    assert load_checkpoint(root / "ckpt-000004")["step"] == 4


def test_pointer_absent_falls_back_to_highest_step_and_stale_temp_dirs_are_ignored(tmp_path):
    model, _, _ = make_run(0)
    save_checkpoint(tmp_path, 3, model)
    save_checkpoint(tmp_path, 12, model)
    root = checkpoint_root(tmp_path)
    (root / "latest").unlink()
    (root / ".tmp-ckpt-000020-abc").mkdir()  # a save killed half way
    assert latest_checkpoint(tmp_path) == root / "ckpt-000012"
    save_checkpoint(tmp_path, 13, model)
    assert not (root / ".tmp-ckpt-000020-abc").exists()


def test_saving_the_same_step_again_replaces_it(tmp_path):
    model, _, _ = make_run(0)
    save_checkpoint(tmp_path, 7, model)
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    save_checkpoint(tmp_path, 7, model)
    fresh, _, _ = make_run(1)
    load_checkpoint(tmp_path, fresh)
    assert_model_equal(fresh, model)
    assert [p.name for p in checkpoint_root(tmp_path).iterdir() if p.name.startswith(".")] == []


def test_extra_state_round_trip(tmp_path):
    model, _, _ = make_run(0)
    extra = {"config": {"name": "x", "betas": (0.9, 0.95)}, "position": {0: 17, 1: [2, 3]},
             "ids": np.arange(5, dtype=np.int64), "weights": torch.linspace(0, 1, 4), "nested": [None, True, 1.5],
             "__odd": "key"}
    save_checkpoint(tmp_path, 1, model, extra=extra)
    out = load_checkpoint(tmp_path)["extra"]
    assert out["config"] == {"name": "x", "betas": (0.9, 0.95)}
    assert out["position"] == {0: 17, 1: [2, 3]}
    assert isinstance(out["ids"], np.ndarray) and out["ids"].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(out["weights"], torch.linspace(0, 1, 4))
    assert out["nested"] == [None, True, 1.5] and out["__odd"] == "key"
    with pytest.raises(TypeError, match="cannot store object at 'extra/bad'"):
        save_checkpoint(tmp_path, 2, model, extra={"bad": object()})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000001"]
    assert not any(p.name.startswith(".tmp") for p in checkpoint_root(tmp_path).iterdir())


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model, opt, sched = make_run(0)
    train_step(model, opt, sched)
    save_checkpoint(tmp_path, 1, model, opt, sched)

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling during checkpoint load")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    fresh, fresh_opt, fresh_sched = make_run(1)
    load_checkpoint(tmp_path, fresh, fresh_opt, fresh_sched)
    assert_model_equal(fresh, model)


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def _bad_header_with_matching_hash(ckpt):
    """A file whose recorded size and hash are right but whose safetensors header is garbage."""
    import hashlib

    bad = (64).to_bytes(8, "little") + b"{not json" + b" " * 55
    (ckpt / "model.safetensors").write_bytes(bad)
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    meta["files"]["model.safetensors"] = {"bytes": len(bad), "sha256": hashlib.sha256(bad).hexdigest()}
    _write_meta_with_its_hash(ckpt, meta)


def _write_meta_with_its_hash(ckpt, meta):
    """Rewrite checkpoint.json as a careful forger would: with its own hash recomputed."""
    from titans.checkpoint import _meta_digest

    meta["meta_sha256"] = _meta_digest(meta)
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))


def _change_step(ckpt):
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    meta["step"] = 5
    (ckpt / "checkpoint.json").write_text(json.dumps(meta, indent=1))


@pytest.mark.parametrize(
    ("corrupt", "file", "message"),
    [
        (lambda c: _flip_byte(c / "model.safetensors"), "model.safetensors", "sha256 mismatch"),
        (lambda c: _truncate(c / "state.safetensors"), "state.safetensors", "truncated or wrong size"),
        (lambda c: (c / "model.safetensors").unlink(), "model.safetensors", "missing file"),
        (lambda c: (c / "checkpoint.json").unlink(), "checkpoint.json", "missing file"),
        (lambda c: _truncate(c / "checkpoint.json"), "checkpoint.json", "corrupt or truncated JSON"),
        (_bad_header_with_matching_hash, "model.safetensors", "not a valid safetensors file"),
        (_change_step, "checkpoint.json", "sha256 mismatch"),
    ],
)
def test_corrupt_checkpoint_raises_and_touches_nothing(tmp_path, corrupt, file, message):
    model, opt, sched = make_run(0)
    train_step(model, opt, sched)
    ckpt = save_checkpoint(tmp_path, 1, model, opt, sched)
    corrupt(ckpt)
    before = snapshot(tmp_path)

    fresh, fresh_opt, fresh_sched = make_run(1)
    train_step(fresh, fresh_opt, fresh_sched)
    model_before = {k: v.clone() for k, v in fresh.state_dict().items()}
    opt_before = make_run(2)[1]
    opt_before.load_state_dict(fresh_opt.state_dict())
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path, fresh, fresh_opt, fresh_sched)
    assert file in str(err.value) and message in str(err.value)
    assert snapshot(tmp_path) == before
    assert_model_equal_to_state(fresh, model_before)
    assert_optimizer_equal(fresh_opt, opt_before)


def test_checkpoint_of_another_model_is_rejected_before_loading(tmp_path):
    save_checkpoint(tmp_path, 1, Tiny(width=8))
    other = Tiny(width=4)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"model\.safetensors: does not match the model .*embed\.weight"):
        load_checkpoint(tmp_path, other)
    assert_model_equal_to_state(other, state)


def test_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a run directory"):
        load_checkpoint(tmp_path)
    checkpoint_root(tmp_path).mkdir()
    with pytest.raises(CheckpointError, match="run directory has no checkpoint"):
        load_checkpoint(tmp_path)
    (checkpoint_root(tmp_path) / "latest").write_text("ckpt-000009\n")
    with pytest.raises(CheckpointError, match="points to 'ckpt-000009'"):
        latest_checkpoint(tmp_path)


def test_atomic_write_replaces_or_leaves_original(tmp_path):
    path = tmp_path / "file.txt"
    atomic_write(path, b"first")
    atomic_write(path, b"second")
    assert path.read_bytes() == b"second"
    with pytest.raises(TypeError):
        atomic_write(path, "not bytes")
    assert path.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_pruning_killed_midway_never_leaves_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    import titans.checkpoint as checkpoint_module

    model, opt, sched = make_run(0)
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, opt, sched, keep_last=2)
    real_rmtree = checkpoint_module.shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        (path / "model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 3, model, opt, sched, keep_last=2)
    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", real_rmtree)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000002", "ckpt-000003"]
    for path in list_checkpoints(tmp_path):
        load_checkpoint(path, make_run(1)[0])  # every checkpoint under its real name is complete
    save_checkpoint(tmp_path, 4, model, opt, sched, keep_last=2)
    assert sorted(p.name for p in checkpoint_root(tmp_path).iterdir()) == ["ckpt-000003", "ckpt-000004", "latest"]


def test_non_finite_weights_are_never_saved(tmp_path):
    model, opt, sched = make_run(0)
    save_checkpoint(tmp_path, 1, model, opt, sched)
    before = snapshot(tmp_path)
    with torch.no_grad():
        model.body[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values in body\.0\.weight"):
        save_checkpoint(tmp_path, 2, model, opt, sched)
    assert snapshot(tmp_path) == before


def _as_legacy(ckpt, *, version=1, keep_hash=False):
    """checkpoint.json as written before it carried its own hash (format 1, no meta_sha256)."""
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    meta["format_version"] = version
    if keep_hash:
        meta["meta_sha256"] = _meta_digest(meta)
    else:
        del meta["meta_sha256"]
    (ckpt / "checkpoint.json").write_text(json.dumps(meta, indent=1))
    return meta


def _meta_digest(meta):
    from titans.checkpoint import _meta_digest as digest

    return digest(meta)


def test_legacy_checkpoint_without_its_own_hash_still_loads_with_a_one_line_warning(tmp_path):
    from titans.checkpoint import CheckpointWarning

    model, opt, sched = make_run(0)
    train_step(model, opt, sched)
    ckpt = save_checkpoint(tmp_path, 1, model, opt, sched, extra={"position": 7})
    _as_legacy(ckpt)
    before = snapshot(tmp_path)
    fresh, fresh_opt, fresh_sched = make_run(1)
    with pytest.warns(CheckpointWarning) as caught:
        info = load_checkpoint(tmp_path, fresh, fresh_opt, fresh_sched)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "checkpoint.json" in message and "legacy" in message and "unprotected" in message and "\n" not in message
    assert info["step"] == 1 and info["extra"] == {"position": 7}
    assert_model_equal(fresh, model)
    assert_optimizer_equal(fresh_opt, opt)
    assert snapshot(tmp_path) == before  # loading writes nothing


def test_legacy_checkpoint_weights_are_still_verified(tmp_path, recwarn):
    model, opt, sched = make_run(0)
    ckpt = save_checkpoint(tmp_path, 1, model, opt, sched)
    _as_legacy(ckpt)
    _flip_byte(ckpt / "model.safetensors")
    fresh = make_run(1)[0]
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 mismatch"):
        load_checkpoint(tmp_path, fresh)
    assert_model_equal_to_state(fresh, state)
    assert not recwarn.list  # refused, not warned about


def test_current_format_without_its_hash_or_with_a_wrong_one_is_refused(tmp_path, recwarn):
    from titans.checkpoint import FORMAT_VERSION

    model = make_run(0)[0]
    ckpt = save_checkpoint(tmp_path, 1, model)
    assert json.loads((ckpt / "checkpoint.json").read_text())["format_version"] == FORMAT_VERSION > 1
    _as_legacy(ckpt, version=FORMAT_VERSION)  # a current file whose hash was stripped: tampered, not legacy
    with pytest.raises(CheckpointError, match=r"checkpoint\.json: missing fields \['meta_sha256'\]"):
        load_checkpoint(tmp_path, make_run(1)[0])

    # format 1 files written after meta_sha256 existed carry it: it is checked
    meta = _as_legacy(ckpt, version=1, keep_hash=True)
    load_checkpoint(tmp_path, make_run(1)[0])
    meta["step"] = 5
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"checkpoint\.json: sha256 mismatch"):
        load_checkpoint(tmp_path, make_run(1)[0])
    assert not recwarn.list
