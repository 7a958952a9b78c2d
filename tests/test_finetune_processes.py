"""Fine-tuning in two processes (torchrun, gloo on CPU): DDP and FSDP follow the single-process loss curve, and
the teacher's cached states give the same training."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from edge_mla.mla_folder import load
from edge_mla.finetune import TrainConfig, finetune


def one_and_two_processes(tmp_path, mla_dir, phrases_file, steps: int, port: int, *two_only: str,
                          both: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """The same fine-tune (steps of 4 x 32 tokens, plus `both` flags) in one process and in two gloo processes
    (torchrun, micro-batch 2 each, plus `two_only` flags); returns both finetune_log.json records (outputs in
    tmp_path/one and /two)."""
    common = [str(mla_dir), "--data", str(phrases_file), "--tokens", str(steps * 4 * 32), "--seq-len", "32",
              "--lr", "3e-3", *both]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    one = subprocess.run([sys.executable, "-m", "edge_mla.cli", "finetune", *common, "--micro-batch", "4",
                          "--out", str(tmp_path / "one")], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(port), "-m", "edge_mla.cli", "finetune", *common, *two_only,
                          "--micro-batch", "2", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    return tuple(json.loads((tmp_path / run / "finetune_log.json").read_text()) for run in ("one", "two"))


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, mla_dir, phrases_file):
    log1, log2 = one_and_two_processes(tmp_path, mla_dir, phrases_file, 5, 29533)
    assert log2["world_size"] == 2 and log1["world_size"] == 1
    l1 = [h["loss"] for h in log1["history"]]
    l2 = [h["loss"] for h in log2["history"]]
    assert len(l1) == len(l2) == 5
    assert max(abs(x - y) for x, y in zip(l1, l2)) < 1e-4, (l1, l2)


def test_cached_teacher_gives_the_same_training(tmp_path, original_and_mla):
    """--cache-teacher: the teacher runs once per row (its first epoch), and training is the same as without."""
    from edge_mla import finetune as ft

    orig, mla = original_and_mla
    text = tmp_path / "short.txt"
    text.write_text(" ".join(f"w{3 + (i * 13) % 90}" for i in range(10 * 33)))  # 10 rows of 33 tokens
    logs = {}
    calls = []
    real = ft.Teacher.__init__

    def counting(self, *args, **kwargs):  # count the teacher's forward passes
        real(self, *args, **kwargs)
        decoder = self.decoder
        self.decoder = lambda *a, **k: calls.append(a[0].shape[0]) or decoder(*a, **k)

    ft.Teacher.__init__ = counting
    try:
        for cached in (False, True):
            calls.clear()
            cfg = TrainConfig(tokens=6 * 4 * 32, seq_len=32, micro_batch=4, lr=3e-3, distill=0.5, cache_teacher=cached)
            logs[cached] = [h["loss"] for h in finetune(mla, tmp_path / f"ft{cached}", cfg, data=[str(text)],
                                                        teacher=str(orig))["history"]]
            if cached:  # 6 steps x 4 rows = 24 rows from 10: the teacher ran only while unseen rows came in
                assert 3 <= len(calls) < 6, calls
            else:
                assert len(calls) == 6
    finally:
        ft.Teacher.__init__ = real
    assert len(logs[True]) == 6 and max(abs(a - b) for a, b in zip(logs[False], logs[True])) < 1e-6


@pytest.mark.slow
def test_fsdp_two_processes_match_one(tmp_path, mla_dir, phrases_file):
    """--fsdp (torch's fully_shard, two gloo processes) follows the single-process loss curve and saves the same
    model."""
    log1, log2 = one_and_two_processes(tmp_path, mla_dir, phrases_file, 4, 29547, "--fsdp")
    assert log2["world_size"] == 2 and log2["config"]["fsdp"]
    l1 = [h["loss"] for h in log1["history"]]
    l2 = [h["loss"] for h in log2["history"]]
    assert len(l1) == len(l2) == 4
    assert max(abs(x - y) for x, y in zip(l1, l2)) < 1e-4, (l1, l2)
    m1, _ = load(tmp_path / "one")
    m2, _ = load(tmp_path / "two")
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.allclose(p1, p2, atol=1e-4), name


def test_fsdp_needs_several_processes(tmp_path, mla_dir, phrases_file):
    with pytest.raises(ValueError, match="torchrun"):
        finetune(mla_dir, tmp_path / "x", TrainConfig(tokens=128, seq_len=32, fsdp=True), data=[str(phrases_file)])


@pytest.mark.slow
def test_cached_teacher_two_processes(tmp_path, original_and_mla):
    """--cache-teacher in two processes: each keeps every row of the global batch (all-gathered), so the teacher
    runs only during the first epoch, as in one process (a cache of a process's own rows would miss whenever the
    next epoch hands it rows of the other), and the losses are one process's."""
    orig, mla = original_and_mla
    text = tmp_path / "short.txt"
    text.write_text(" ".join(f"w{3 + (i * 13) % 90}" for i in range(10 * 33)))  # 10 rows of 33 tokens
    log1, log2 = one_and_two_processes(tmp_path, mla, text, 6, 29561,
                                       both=("--distill", "0.5", "--cache-teacher", "--teacher", str(orig)))
    # 10 rows, 4 a step: steps 1-3 hold unseen rows (the third: the last 2 of epoch 1), steps 4-6 none
    assert log1["teacher_passes"] == log2["teacher_passes"] == 3
    l1 = [h["loss"] for h in log1["history"]]
    l2 = [h["loss"] for h in log2["history"]]
    assert len(l1) == len(l2) == 6
    assert max(abs(x - y) for x, y in zip(l1, l2)) < 1e-4, (l1, l2)
