"""Fine-tuning on CPU with a tiny converted model: the loss falls, resume continues exactly, and two processes
(torchrun, gloo) follow the single-process loss curve."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_model
from edge_mla.convert import Plan, convert, load, save
from edge_mla.finetune import TrainConfig, batch_rows, finetune, lr_at
from test_cli import word_tokenizer


@pytest.fixture
def mla_dir(tmp_path):
    model = tiny_model("llama-gqa")
    convert(model, Plan(selection="partition", rope_pairs=2, latent=16, weighting="weights"))
    return save(model, word_tokenizer(), tmp_path / "mla")


@pytest.fixture
def text_file(tmp_path):
    # a learnable text: a few fixed phrases in a pseudo-random order
    phrases = [" ".join(f"w{3 + (i * 7 + j) % 90}" for j in range(12)) for i in range(6)]
    g = torch.Generator().manual_seed(0)
    order = torch.randint(0, len(phrases), (400,), generator=g).tolist()
    path = tmp_path / "train.txt"
    path.write_text(" ".join(phrases[i] for i in order))
    return path


def test_loss_falls(tmp_path, mla_dir, text_file):
    cfg = TrainConfig(tokens=40 * 4 * 32, seq_len=32, micro_batch=4, lr=3e-3, warmup=0.1)
    summary = finetune(mla_dir, tmp_path / "ft", cfg, data=[str(text_file)])
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], losses
    reloaded, _ = load(tmp_path / "ft")  # the result is a converted-model folder again
    assert reloaded.config.mla["finetune"]["steps"] == 40
    assert not (tmp_path / "ft.checkpoints").exists()


def test_resume_continues_where_it_stopped(tmp_path, mla_dir, text_file):
    cfg = TrainConfig(tokens=6 * 4 * 32, seq_len=32, micro_batch=4, lr=3e-3)
    straight = finetune(mla_dir, tmp_path / "a", cfg, data=[str(text_file)])
    partial = finetune(mla_dir, tmp_path / "b", cfg, data=[str(text_file)], stop_after=3)
    assert partial["stopped"] and not (tmp_path / "b").exists()
    assert (tmp_path / "b.checkpoints" / "latest" / "trainer.pt").exists()
    resumed = finetune(mla_dir, tmp_path / "b", cfg, data=[str(text_file)], resume=True)
    a = [h["loss"] for h in straight["history"]]
    b = [h["loss"] for h in resumed["history"]]
    assert len(b) == 6 and b[:3] == partial_losses(partial)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    wa, _ = load(tmp_path / "a")
    wb, _ = load(tmp_path / "b")
    for (name, pa), pb in zip(wa.named_parameters(), wb.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), name


def partial_losses(summary):
    return [h["loss"] for h in summary["history"]]


def test_two_processes_match_one(tmp_path, mla_dir, text_file):
    common = [str(mla_dir), "--data", str(text_file), "--tokens", str(5 * 4 * 32), "--seq-len", "32",
              "--lr", "3e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    one = subprocess.run([sys.executable, "-m", "edge_mla.cli", "finetune", *common, "--micro-batch", "4",
                          "--out", str(tmp_path / "one")], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", "-m", "edge_mla.cli", "finetune", *common,
                          "--micro-batch", "2", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    log1 = json.loads((tmp_path / "one" / "finetune_log.json").read_text())
    log2 = json.loads((tmp_path / "two" / "finetune_log.json").read_text())
    assert log2["world_size"] == 2 and log1["world_size"] == 1
    l1 = [h["loss"] for h in log1["history"]]
    l2 = [h["loss"] for h in log2["history"]]
    assert len(l1) == len(l2) == 5
    assert max(abs(x - y) for x, y in zip(l1, l2)) < 1e-4, (l1, l2)


def test_schedule_and_batches():
    cfg = TrainConfig(tokens=1, lr=1.0, warmup=0.1, decay=0.2)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[50] == 1.0
    assert lrs[-1] == pytest.approx(0.0) and all(a >= b for a, b in zip(lrs[80:], lrs[81:]))
    seen = torch.cat([batch_rows(s, 4, 10, 0) for s in range(5)])  # 2 epochs of 10 rows
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
