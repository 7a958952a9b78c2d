"""MHA2MLA's recovery step: full-parameter fine-tuning of a converted model, optionally distilled from the original.

One code path for one process and for several: start it with `torchrun --nproc_per_node N` and it runs
DistributedDataParallel (NCCL on GPUs, gloo on CPUs); every rank takes its share of the same global batch, so the
loss curve does not depend on the number of processes. bf16 autocast on GPU (fp32 master weights), optional
gradient checkpointing, the paper's schedule (linear warm-up, constant, 1-sqrt decay to zero), checkpoints and
resume. Distillation adds KL(teacher || student) on the original model's logits (X-EcoMLA). Options that make the
recovery stick at deployment: `cache_bits=4` trains through llama.cpp's q4_0 round trip of the cached row
[c | k_rope] (straight-through), and `self_distill_tokens` adds text sampled from the original model itself
(edge_mla/selfdistill.py) to the training text, so the model is taught back rather than a domain. Speed: `compile`
compiles student, teacher and the head loss's chunk math; `cache_teacher` keeps the frozen teacher's hidden states of
every row after its first pass. `fsdp` shards the model over the processes (torch's fully_shard) instead of DDP.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from edge_mla import mla_folder
from edge_mla import q4_0
from edge_mla.distill import LossModel, Teacher, to_device
from edge_mla.mla import set_cache_quant


@dataclass
class TrainConfig:
    tokens: int  # training budget, counted in target tokens
    seq_len: int = 1024
    micro_batch: int = 8  # sequences per process per step
    lr: float = 1e-4
    warmup: float = 0.05  # share of steps with linear warm-up
    decay: float = 0.10  # share of steps at the end with 1-sqrt decay to zero
    weight_decay: float = 0.01
    clip: float = 1.0
    distill: float = 0.0  # weight of the KL term; 0 = plain next-token loss
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    seed: int = 0
    grad_checkpointing: bool = False
    compile: bool = False
    loss_chunk: int = 4096  # tokens per chunk of the output head: full logits of a 49k vocabulary are never held
    cache_bits: int = 16  # 4: train through llama.cpp's q4_0 cache row (straight-through); 16: float cache
    self_distill_tokens: int = 0  # tokens of text sampled from the original model, added to the training text
    cache_teacher: bool = False  # keep the teacher's hidden states of every row after its first batch (see Teacher)
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the processes (fully_shard)
    log_every: int = 10  # steps between reads of the loss (each read waits for the GPU)


def build_config(tokens: int, kv_bits: int, cuda: bool) -> TrainConfig:
    """`edge-mla build --finetune-tokens`'s fine-tune, with the settings measured best on an H200
    (docs/finetune.md): distillation 0.5, lr 2e-4, 32 x 1024 tokens a step, trained through the cache the build
    ships (llama.cpp's q4_0 round trip when it is 4-bit), and on a GPU the compiled step with the teacher's hidden
    states kept after their first epoch."""
    return TrainConfig(tokens=tokens, micro_batch=32, lr=2e-4, distill=0.5, cache_bits=4 if kv_bits == 4 else 16,
                       compile=cuda, cache_teacher=cuda)


# ----------------------------------------------------------------------------- data

def pack(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Tokenize, join documents with EOS, cut into rows of seq_len + 1 tokens (inputs and shifted targets)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False).input_ids)
        ids.append(eos)
    rows = len(ids) // (seq_len + 1)
    if rows == 0:
        raise ValueError(f"training text holds {len(ids)} tokens, fewer than one sequence of {seq_len + 1}; "
                         "give more text or a shorter --seq-len")
    return torch.tensor(ids[: rows * (seq_len + 1)]).view(rows, seq_len + 1)


BUILTIN_DATA = "builtin"  # --data name of the built-in corpus, to mix it with other text


def read_data(paths: list[str] | None) -> list[str]:
    """Plain text files, JSONL files (a "text" field per line), `datasets` folders (save_to_disk) or "builtin":
    the built-in corpus (Wikipedia calibration split + public-domain books), also what no paths means."""
    from edge_mla.data import training_texts

    if not paths:
        return training_texts()
    texts = []
    for name in paths:
        path = Path(name)
        if name == BUILTIN_DATA:
            texts.extend(training_texts())
        elif path.is_dir():
            import datasets
            ds = datasets.load_from_disk(str(path))
            ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
            texts.extend(ds["text"])
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                texts.extend(json.loads(line)["text"] for line in f if line.strip())
        elif path.is_file():
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
        else:
            raise FileNotFoundError(f"training data {path} does not exist")
    return texts


def batch_rows(step: int, global_batch: int, n_rows: int, seed: int) -> torch.Tensor:
    """Row indices of one global batch: a fresh permutation every epoch, a pure function of the step (resume)."""
    start = step * global_batch
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch))
        out.extend(perm[offset: offset + global_batch - len(out)].tolist())
    return torch.tensor(out)


def cache_quantizer(bits: int, latent_dim: int):
    """What training passes every cached row [c | k_rope] through: nothing (16: float cache) or llama.cpp's q4_0
    round trip in the forward pass and the identity in the backward pass (4: straight-through)."""
    if bits == 16:
        return None
    if bits == 4:
        return q4_0.straight_through(q4_0.mla_cache(latent_dim))
    raise ValueError(f"cache bits must be 16 (float cache) or 4 (llama.cpp's q4_0 cache), got {bits}")


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm, decay = max(1, int(cfg.warmup * total)), int(cfg.decay * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if step >= total - decay and decay > 0:
        return cfg.lr * (1 - math.sqrt((step - (total - decay) + 1) / decay))
    return cfg.lr


# ----------------------------------------------------------------------------- loop

def train_step(runner, teacher: Teacher | None, opt, inputs, targets, clip: float, autocast, rows=None,
               global_rows=None):
    """One optimizer step: the teacher's last hidden states (no grad), the student's loss, backward, clipping.
    Returns the loss and gradient norm as tensors (reading them waits for the GPU)."""
    with autocast:
        t_hidden = teacher.hidden(inputs, rows, global_rows) if teacher is not None else None
        loss = runner(inputs, targets, t_hidden, teacher.weight if teacher is not None else None)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
        grad_norm = grad_norm.full_tensor()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, grad_norm


def _dist_setup() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def generated_texts(teacher_model, tokenizer, cfg: TrainConfig, path: Path, corpus: list[str], rank: int,
                    world: int) -> list[str]:
    """Text sampled from the original model (rank 0 writes it once beside the checkpoints, so a resumed run
    trains on the same text; the other ranks read it)."""
    from edge_mla.selfdistill import generate_texts, write_jsonl

    if rank == 0 and not path.exists():
        write_jsonl(path, generate_texts(teacher_model, tokenizer, cfg.self_distill_tokens, corpus, seed=cfg.seed))
    if world > 1:
        dist.barrier()
    return read_data([str(path)])


def checkpoint_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.checkpoints"


def _check_request(out: Path, cfg: TrainConfig, world: int, resume: bool, overwrite: bool,
                   stop_after: int | None) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --force")
    if cfg.fsdp and world == 1:
        raise ValueError("--fsdp shards the model over several processes: start it with torchrun --nproc_per_node N "
                         "(N > 1), or leave --fsdp off")
    if cfg.fsdp and (resume or cfg.save_every or stop_after):
        raise ValueError("checkpoints (--save-every, --resume) are not implemented with --fsdp; train without them "
                         "or without --fsdp")


def _load_teacher(model, cfg: TrainConfig, teacher: str | None, device: torch.device):
    """The original model, frozen, where distillation or self-distillation text needs it; else None."""
    if cfg.distill <= 0 and cfg.self_distill_tokens <= 0:
        return None
    from edge_mla.source import load_source
    spec = teacher or model.config.mla.get("source")
    if not spec:
        raise ValueError("distillation and self-distillation text need the original model: pass --teacher "
                         "(a model folder, .gguf or name)")
    return load_source(spec).model.to(device).eval().requires_grad_(False)


def _wrap_for_processes(model, cfg: TrainConfig, world: int, device: torch.device):
    """The loss module, and what runs it: itself (one process), DDP over it, or it sharded (fsdp)."""
    model.to(device).train()
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_model = LossModel(model, cfg.loss_chunk, cfg.distill, compile=cfg.compile, per_layer=cfg.fsdp)
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(loss_model)  # the root: embeddings, final norm and output head
        return loss_model
    if world > 1:
        # gradient_as_bucket_view: the gradients live in the all-reduce buckets (no copy in and out of them)
        return nn.parallel.DistributedDataParallel(loss_model, device_ids=[device.index] if device.type == "cuda"
                                                   else None, gradient_as_bucket_view=True)
    return loss_model


def _optimizer(model, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
    fused = device.type == "cuda" and not cfg.fsdp  # fsdp: the default (foreach) kernels take sharded tensors
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=fused)


def _resume_state(opt, latest: Path, resume: bool, total_steps: int, device: torch.device) -> tuple[int, list]:
    """(step, history) of the checkpoint to resume from, the optimizer's state loaded; (0, []) for a fresh run."""
    if not (resume and (latest / "trainer.pt").exists()):
        return 0, []
    state = torch.load(latest / "trainer.pt", map_location=device, weights_only=False)
    opt.load_state_dict(state["optimizer"])
    if state["total_steps"] != total_steps:
        raise ValueError(f"the checkpoint was made for {state['total_steps']} steps, this run has {total_steps}; "
                         "resume with the same --tokens, --seq-len, --micro-batch and number of processes")
    return state["step"], state["history"]


class _LossLog:
    """The steps' losses, read from the GPU every log_every steps (each read waits for it), into `history`."""

    def __init__(self, history: list, bar, world: int):
        self.history, self.bar, self.world = history, bar, world
        self.pending: list[tuple] = []  # steps whose loss is still on the GPU
        self.t0, self.tokens_done = time.perf_counter(), 0

    def add(self, step: int, loss, grad_norm, lr: float, tokens: int) -> None:
        self.tokens_done += tokens
        self.pending.append((step, loss.detach(), grad_norm.detach(), lr))

    def read(self) -> None:
        if not self.pending:
            return
        values = torch.stack([torch.stack([loss, norm.float()]) for _, loss, norm, _ in self.pending])
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world  # the mean loss over processes; the gradient norm is the same on every one
        elapsed = time.perf_counter() - self.t0
        rate = self.tokens_done / elapsed
        for (n, _, _, lr), (loss, norm) in zip(self.pending, values.tolist()):
            self.history.append({"step": n, "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": rate,
                                 "elapsed_s": round(elapsed, 3)})
        self.bar.set_postfix(loss=f"{self.history[-1]['loss']:.3f}", tok_s=f"{rate:.0f}")
        self.bar.update(len(self.pending))
        self.pending.clear()


def _gpu_peaks(summary: dict, device: torch.device, world: int) -> None:
    summary["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    if device.type == "cuda" and world > 1:  # every GPU's peak, not only process 0's
        mine = torch.tensor([summary["peak_gpu_bytes"]], device=device)
        parts = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine)
        summary["peak_gpu_bytes_per_process"] = [int(p.item()) for p in parts]


def _save_result(model, tokenizer, summary: dict, cfg: TrainConfig, start_dir: Path, out: Path, ckpts: Path,
                 rank: int, world: int, overwrite: bool) -> None:
    set_cache_quant(model, None)
    if cfg.fsdp:  # every process gives its shards; process 0 puts them into a plain copy of the model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            model, _ = mla_folder.load(start_dir)
            model.load_state_dict(full)
    if rank == 0:
        model.to("cpu").float()
        model.config.mla["finetune"] = {k: v for k, v in summary.items() if k != "history"}
        mla_folder.save(model, tokenizer, out, overwrite=overwrite)
        (out / "finetune_log.json").write_text(json.dumps(summary, indent=1))
        shutil.rmtree(ckpts, ignore_errors=True)
    if world > 1:
        dist.barrier()


def finetune(model_dir: str | Path, out: str | Path, cfg: TrainConfig, data: list[str] | None = None,
             teacher: str | None = None, resume: bool = False, overwrite: bool = False,
             stop_after: int | None = None, texts: list[str] | None = None) -> dict:
    """Train the converted model in `model_dir`, write the result to `out` (a converted-model folder), on `texts`
    (the build's mixture of kinds) or else on what `data` names (read_data).
    `stop_after` ends this run after that many global steps with a checkpoint (for time-limited jobs); a later
    call with resume=True continues exactly where it stopped."""
    out = Path(out)
    rank, world, device = _dist_setup()
    _check_request(out, cfg, world, resume, overwrite, stop_after)
    ckpts = checkpoint_dir(out)
    latest = ckpts / "latest"
    start_dir = latest / "model" if resume and latest.exists() else Path(model_dir)
    if resume and not latest.exists() and rank == 0:
        print(f"no checkpoint in {ckpts}; starting from {model_dir}")
    model, tokenizer = mla_folder.load(start_dir)
    set_cache_quant(model, cache_quantizer(cfg.cache_bits, model.config.mla["latent_dim"]))
    teacher_model = _load_teacher(model, cfg, teacher, device)
    texts = list(texts) if texts else read_data(data)
    if cfg.self_distill_tokens > 0:
        texts += generated_texts(teacher_model, tokenizer, cfg, ckpts / "generated.jsonl", texts, rank, world)
    rows = pack(tokenizer, texts, cfg.seq_len).to(device)
    global_batch = cfg.micro_batch * world
    total_steps = max(1, cfg.tokens // (global_batch * cfg.seq_len))
    if cfg.distill == 0 and teacher_model is not None:  # it only wrote the text
        teacher_model = None
        if device.type == "cuda":
            torch.cuda.empty_cache()

    runner = _wrap_for_processes(model, cfg, world, device)
    distiller = None if teacher_model is None else Teacher(
        teacher_model, compile=cfg.compile, cache_rows=rows.shape[0] if cfg.cache_teacher else 0,
        seq_len=cfg.seq_len, world=world)
    opt = _optimizer(model, cfg, device)
    step, history = _resume_state(opt, latest, resume, total_steps, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    bar = tqdm(total=total_steps, initial=step, desc="fine-tuning", unit="step", disable=rank != 0)
    log = _LossLog(history, bar, world)
    while step < total_steps:
        global_idx = batch_rows(step, global_batch, rows.shape[0], cfg.seed)
        idx = global_idx[rank::world]
        batch = rows[to_device(idx, device)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total_steps, cfg)
        loss, grad_norm = train_step(runner, distiller, opt, batch[:, :-1], batch[:, 1:], cfg.clip, autocast,
                                     rows=idx, global_rows=global_idx)
        step += 1
        log.add(step, loss, grad_norm, opt.param_groups[0]["lr"], global_batch * cfg.seq_len)
        stopping = stop_after is not None and step >= stop_after
        if step % max(1, cfg.log_every) == 0 or step == total_steps or stopping or (
                cfg.save_every and step % cfg.save_every == 0):
            log.read()
        if stopping and step < total_steps:
            _save_checkpoint(model, tokenizer, opt, step, total_steps, history, ckpts, rank, world)
            bar.close()
            return {"config": asdict(cfg), "world_size": world, "steps": step, "history": history, "stopped": True}
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            _save_checkpoint(model, tokenizer, opt, step, total_steps, history, ckpts, rank, world)
    bar.close()
    summary = {"config": asdict(cfg), "world_size": world, "steps": total_steps, "history": history}
    _gpu_peaks(summary, device, world)
    if distiller is not None:
        summary["teacher_passes"] = distiller.passes
    _save_result(model, tokenizer, summary, cfg, start_dir, out, ckpts, rank, world, overwrite)
    return summary


def _save_checkpoint(model, tokenizer, opt, step, total_steps, history, ckpts: Path, rank: int, world: int) -> None:
    if rank == 0:
        staging = ckpts / f"step-{step}"
        if staging.exists():
            shutil.rmtree(staging)
        mla_folder.save(model, tokenizer, staging / "model")
        torch.save({"optimizer": opt.state_dict(), "step": step, "total_steps": total_steps, "history": history},
                   staging / "trainer.pt")
        # "latest" is switched by one rename, so an interrupted save never leaves a half checkpoint behind it
        link = ckpts / "latest.tmp"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(staging.name)
        old = (ckpts / "latest").resolve() if (ckpts / "latest").is_symlink() else None
        os.replace(link, ckpts / "latest")
        if old and old != staging.resolve():
            shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()
