"""The fine-tune's loss (finetune.py): the next-token loss over the model's head in chunks, with KL(teacher ||
student) distillation, computed in one pass without holding [tokens x vocab] logits (HeadLoss), and the frozen
teacher's hidden states (Teacher), cached after the first epoch when asked."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def head_chunk(logits, teacher_logits, targets, distill: float, scale: float):
    """One chunk of tokens: the summed loss (1 - w) x cross-entropy + w x KL(teacher || student) (w = distill) and
    its gradient with respect to the student's logits times `scale`, softmax(student) - target (the one-hot next
    token, the teacher's distribution), in the logits' dtype. Plain tensor code: torch.compile fuses it into a few
    passes over the [tokens x vocab] logits, so no float32 copy of them is ever written."""
    logp = logits.float().log_softmax(-1)
    rows = torch.arange(targets.numel(), device=targets.device)
    ce = -logp[rows, targets].sum()
    grad = logp.exp()
    if teacher_logits is None:
        loss = ce
        grad[rows, targets] -= 1
    else:
        t_logp = teacher_logits.float().log_softmax(-1)
        t_p = t_logp.exp()
        loss = (1 - distill) * ce + distill * (t_p * (t_logp - logp)).sum()
        grad = grad - distill * t_p
        grad[rows, targets] -= 1 - distill
    return loss, (grad * scale).to(logits.dtype)


class HeadLoss(torch.autograd.Function):
    """Output head and loss in one pass over chunks of tokens (head_chunk on each; the teacher's logits from its
    last hidden states and head, computed once per chunk). The gradient of the loss with respect to the logits is
    known in closed form, so it is formed in the same pass and turned into the hidden and head gradients at once:
    no logits are kept for the backward pass and none are recomputed; only one chunk's logits are ever held."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher_hidden, teacher_weight, distill: float, chunk: int,
                chunk_fn=head_chunk):
        n = targets.numel()
        w = weight.to(hidden.dtype)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, n, chunk):
            h = hidden[i:i + chunk]
            t_logits = None
            if teacher_hidden is not None:
                t_h = teacher_hidden[i:i + chunk]
                t_logits = t_h @ teacher_weight.to(t_h.dtype).T
            loss, grad = chunk_fn(h @ w.T, t_logits, targets[i:i + chunk], distill, 1.0 / n)
            total += loss
            grad = grad.to(h.dtype)
            grad_h[i:i + chunk] = grad @ w
            grad_w += (grad.T @ h).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None, None, None, None


class LossModel(nn.Module):
    """Wraps the causal LM so that DDP sees one forward that returns the loss; the output head and loss run in
    chunks (HeadLoss), so neither student nor teacher logits are ever held whole."""

    def __init__(self, model, chunk: int, distill: float, compile: bool = False, per_layer: bool = False):
        super().__init__()
        self.model, self.chunk, self.distill = model, chunk, distill
        self.decoder = torch.compile(model.model) if compile and not per_layer else model.model
        if compile and per_layer:  # FSDP: each layer's forward compiled, its sharding hooks left outside the graph
            import torch._dynamo as dynamo
            limits = dynamo.config  # one compiled graph per layer at worst: never a silent eager fallback
            name = "recompile_limit" if hasattr(limits, "recompile_limit") else "cache_size_limit"
            setattr(limits, name, max(getattr(limits, name), len(model.model.layers) + 8))
            for layer in model.model.layers:
                layer.forward = torch.compile(layer.forward)
        self.chunk_fn = torch.compile(head_chunk, dynamic=False) if compile else head_chunk

    def forward(self, inputs, targets, teacher_hidden=None, teacher_weight=None):
        hidden = self.decoder(inputs, use_cache=False).last_hidden_state.flatten(0, 1)
        teacher_hidden = teacher_hidden.flatten(0, 1) if teacher_hidden is not None else None
        return HeadLoss.apply(hidden, self.model.lm_head.weight, targets.flatten(), teacher_hidden, teacher_weight,
                              self.distill, self.chunk, self.chunk_fn)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (batch indices) on the device without making the host wait for the GPU (pinned copy)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


class Teacher:
    """The original model's last hidden states for a batch (no grad) and its output head, for distillation.
    With `cache_rows` (the number of packed rows), each row's hidden states are kept on the device after its first
    batch, in bf16 on GPU (what the head's bf16 matmul rounds them to anyway): the teacher is frozen, so a row's
    hidden states never change, and every later epoch skips the teacher's forward pass. With several processes each
    computes its own rows and all of them keep every row of the global batch (one all-gather per batch of the first
    epoch): a process's rows change from epoch to epoch, so a cache of only its own rows would rarely hold a whole
    later batch and the teacher would keep running."""

    def __init__(self, model, compile: bool = False, cache_rows: int = 0, seq_len: int = 0, world: int = 1):
        self.model, self.world = model, world
        self.passes = 0  # forward passes run (the cache's test and benchmarks read it)
        self.weight = model.lm_head.weight
        self.decoder = torch.compile(model.model) if compile else model.model
        self.cache = self.filled = None
        if cache_rows:
            device = self.weight.device
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            need = cache_rows * seq_len * model.config.hidden_size * dtype.itemsize
            if device.type == "cuda" and need > 0.5 * torch.cuda.mem_get_info(device)[0]:
                raise ValueError(f"the teacher cache needs {need / 2**30:.1f} GiB, more than half of the GPU's free "
                                 f"memory ({torch.cuda.mem_get_info(device)[0] / 2**30:.1f} GiB); train without "
                                 "--cache-teacher or on less text")
            self.cache = torch.empty(cache_rows, seq_len, model.config.hidden_size, dtype=dtype, device=device)
            self.filled = torch.zeros(cache_rows, dtype=torch.bool)  # on the CPU: checking it never waits for the GPU

    @torch.no_grad()
    def hidden(self, inputs, rows=None, global_rows=None):
        """[B, T, E] hidden states of `inputs`, the packed rows `rows` (CPU indices) when the cache is on;
        `global_rows`: the whole global batch (process r's rows are global_rows[r::world]; default: rows)."""
        if self.cache is None or rows is None:
            self.passes += 1
            return self.decoder(inputs, use_cache=False).last_hidden_state
        global_rows = rows if global_rows is None else global_rows
        if not self.filled[global_rows].all():  # the same answer in every process: they keep the same rows
            self.passes += 1
            states = self.decoder(inputs, use_cache=False).last_hidden_state.to(self.cache.dtype)
            order = global_rows
            if self.world > 1:
                parts = [torch.empty_like(states) for _ in range(self.world)]
                dist.all_gather(parts, states.contiguous())
                states = torch.cat(parts)
                order = torch.cat([global_rows[r::self.world] for r in range(self.world)])
            self.cache[to_device(order, self.cache.device)] = states
            self.filled[global_rows] = True
        return self.cache[to_device(rows, self.cache.device)]
