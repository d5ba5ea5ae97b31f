"""torchrun helpers: single-process no-ops, and a real 2-process gloo run matching one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from titans.runtime import DistInfo, all_gather_cat, all_reduce_sum, barrier, cleanup, init_distributed

SRC = Path(__file__).resolve().parents[1] / "src"
GLOBAL_BATCH, STEPS = 8, 3

WORKER = f"""
import json, sys
import torch
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from titans.runtime import all_gather_cat, all_reduce_sum, barrier, cleanup, init_distributed

sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from test_distributed import make_model, make_data

info = init_distributed("cpu")
out = sys.argv[1]
with open(f"{{out}}/rank{{info.rank}}.json", "w") as f:
    json.dump({{"rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank,
               "device": str(info.device), "is_main": info.is_main,
               "initialized": torch.distributed.is_initialized()}}, f)
model = make_model()
ddp = DistributedDataParallel(model)
opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
x, y = make_data()
per_rank = x.shape[1] // info.world_size
shard = slice(info.rank * per_rank, (info.rank + 1) * per_rank)  # this rank's part of the global batch
losses = []
for step in range(x.shape[0]):
    loss = ((ddp(x[step, shard]) - y[step, shard]) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(all_reduce_sum(loss.detach()) / info.world_size)
rank_mean = all_reduce_sum(torch.tensor([float(info.rank), 10.0 * info.rank])) / info.world_size
ranks = all_gather_cat(torch.tensor([info.rank, 10 * info.rank]))
barrier()
if info.is_main:
    state = {{k: v.contiguous() for k, v in model.state_dict().items()}}
    save_file({{"losses": torch.stack(losses), "rank_mean": rank_mean, "ranks": ranks, **state}},
              f"{{out}}/result.safetensors")
del ddp  # a DDP reducer outliving its gloo group can abort the process at exit
cleanup()
"""


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, GLOBAL_BATCH, 6, generator=g), torch.randn(STEPS, GLOBAL_BATCH, 1, generator=g)


def single_process_reference() -> tuple[torch.Tensor, dict]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = make_data()
    losses = []
    for step in range(STEPS):
        loss = ((model(x[step]) - y[step]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), model.state_dict()


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_single_process_is_a_no_op(no_torchrun_env):
    info = init_distributed("auto")
    expected_device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, device=expected_device) and info.is_main
    assert not torch.distributed.is_initialized()
    t = torch.tensor([1.0, 3.0])
    assert all_reduce_sum(t) is t and all_gather_cat(t) is t
    barrier()
    cleanup()


def test_bad_settings(no_torchrun_env, monkeypatch):
    with pytest.raises(ValueError, match="device must be"):
        init_distributed("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            init_distributed("cuda")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK=2 is outside \[0, WORLD_SIZE=2\)"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="RANK='one' is not an integer"):
        init_distributed("cpu")


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks == [
        {"rank": r, "world_size": 2, "local_rank": r, "device": "cpu", "is_main": r == 0, "initialized": True}
        for r in range(2)
    ]
    result = load_file(tmp_path / "result.safetensors")
    assert torch.equal(result.pop("rank_mean"), torch.tensor([0.5, 5.0]))
    assert torch.equal(result.pop("ranks"), torch.tensor([0, 0, 1, 10]))  # all_gather_cat: rank order, first dim
    ref_losses, ref_state = single_process_reference()
    torch.testing.assert_close(result.pop("losses"), ref_losses, rtol=1e-5, atol=1e-6)
    assert result.keys() == ref_state.keys()
    for key, value in ref_state.items():
        torch.testing.assert_close(result[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(ref_state["0.weight"], make_model().state_dict()["0.weight"])  # training moved it
