"""Vector quantizer of VQ-VAE(-2): nearest codeword, straight-through gradient, codebook health.

Two update rules (``mode``):
  ``ema``      codebook = EMA of assigned encoder outputs / Laplace-smoothed EMA cluster sizes
               (van den Oord et al. 2017, appendix); no codebook loss.
  ``learned``  codebook is a parameter trained by the codebook loss ||sg[z] - e||^2.
Both add the commitment loss beta * ||z - sg[e]||^2 for the encoder.

Health, returned by every forward: perplexity and the fraction of codes used in the batch, and
the fraction alive over an EMA window of assignment frequencies. Codes whose EMA frequency falls
under ``dead_threshold`` x uniform are restarted from current encoder outputs. With
``torch.distributed`` initialised, statistics are all-reduced and replacements/initialisation are
broadcast from rank 0, so every rank holds the same codebook.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

_CHUNK = 65536  # rows of the distance matrix computed at once (N x K, never N x K x D)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.broadcast(t, src=0)
    return t


class VectorQuantizer(nn.Module):
    """Quantize ``z`` (B, D, H, W) to the nearest of K codewords.

    Returns ``(z_q, codes, stats)``: ``z_q`` (B, D, H, W) with straight-through gradient to ``z``,
    ``codes`` (B, H, W) int64, ``stats`` a dict of scalar tensors (``commit``, ``codebook``,
    ``perplexity``, ``usage``, ``usage_window``, ``restarted``).
    """

    def __init__(self, codebook_size: int, code_dim: int, *, mode: str = "ema", beta: float = 0.25,
                 decay: float = 0.99, eps: float = 1e-5, dead_threshold: float = 0.01,
                 usage_decay: float = 0.99, data_init: bool = False):
        super().__init__()
        if mode not in ("ema", "learned"):
            raise ValueError(f"quantizer mode '{mode}': choose ema or learned")
        self.K, self.D, self.mode = codebook_size, code_dim, mode
        self.beta, self.decay, self.eps = beta, decay, eps
        self.dead_threshold, self.usage_decay, self.data_init = dead_threshold, usage_decay, data_init
        embed = torch.randn(codebook_size, code_dim)
        if mode == "ema":
            self.register_buffer("embed", embed)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_avg", embed.clone())
        else:
            self.embed = nn.Parameter(embed.uniform_(-1 / codebook_size, 1 / codebook_size))
        # EMA of each code's share of assignments (sums to 1); starts uniform.
        self.register_buffer("usage_ema", torch.full((codebook_size,), 1.0 / codebook_size))
        self.register_buffer("initialised", torch.tensor(not data_init))

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Keep the EMA statistics in fp32 even when the whole model is cast (e.g. DeepSpeed bf16).
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    # -- assignment -----------------------------------------------------------------------------
    @torch.no_grad()
    def assign(self, flat: torch.Tensor) -> torch.Tensor:
        """Nearest codeword index for each row of ``flat`` (N, D), by squared L2 distance."""
        embed = self.embed.detach().float()
        e_sq = embed.pow(2).sum(1)
        out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        for s in range(0, flat.shape[0], _CHUNK):
            rows = flat[s:s + _CHUNK].float()
            # ||z||^2 is constant per row and does not change the argmin
            dist_ = torch.addmm(e_sq, rows, embed.t(), beta=1.0, alpha=-2.0)
            out[s:s + _CHUNK] = dist_.argmin(1)
        return out

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, H, W) -> code vectors (B, D, H, W)."""
        return F.embedding(codes, self.embed).permute(0, 3, 1, 2).contiguous()  # codebook dtype

    # -- forward --------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        device_type, in_dtype = z.device.type, z.dtype
        with torch.autocast(device_type, enabled=False):  # distances and statistics in fp32
            z = z.float()
            b, d, h, w = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)
            if self.training and not bool(self.initialised):
                self._init_from(flat.detach())
            codes = self.assign(flat)
            counts = torch.bincount(codes, minlength=self.K).float()
            if self.training:  # the codebook update needs every rank's counts; an eval forward must
                counts = _all_reduce(counts)  # not be a collective (ranks encode different amounts)
            restarted = torch.zeros((), device=z.device)
            if self.training:
                if self.mode == "ema":
                    self._ema_update(flat.detach(), codes, counts)
                restarted = self._track_usage_and_restart(flat.detach(), counts)
            quant = F.embedding(codes, self.embed.float()).view(b, h, w, d).permute(0, 3, 1, 2)
            commit = self.beta * F.mse_loss(z, quant.detach())
            codebook = F.mse_loss(quant, z.detach()) if self.mode == "learned" else torch.zeros((), device=z.device)
            z_q = z + (quant - z).detach()  # straight-through: dz_q/dz = identity
            probs = counts / counts.sum().clamp(min=1)
            stats = {
                "commit": commit, "codebook": codebook,
                "perplexity": torch.exp(-(probs * torch.log(probs.clamp(min=1e-10))).sum()),
                "usage": (counts > 0).float().mean(),
                "usage_window": (self.usage_ema * self.K >= self.dead_threshold).float().mean(),
                "restarted": restarted,
            }
        return z_q.to(in_dtype), codes.view(b, h, w), stats

    # -- updates --------------------------------------------------------------------------------
    @torch.no_grad()
    def _sample_rows(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` encoder outputs picked on rank 0 and broadcast, so all ranks agree."""
        if n <= flat.shape[0]:
            idx = torch.randperm(flat.shape[0], device=flat.device)[:n]
        else:  # fewer outputs than codes: with replacement (plus noise keeps them apart)
            idx = torch.randint(0, flat.shape[0], (n,), device=flat.device)
        rows = flat[idx].clone()
        if n > flat.shape[0]:
            rows += 0.01 * rows.std() * torch.randn_like(rows)
        return _broadcast(rows.contiguous())

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor) -> None:
        self.embed.data.copy_(self._sample_rows(flat, self.K))
        if self.mode == "ema":
            self.embed_avg.copy_(self.embed)
            self.cluster_size.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        sums = _all_reduce(torch.zeros(self.K, self.D, device=flat.device).index_add_(0, codes, flat))
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.K * self.eps) * n  # Laplace smoothing
        self.embed.copy_(self.embed_avg / smoothed.unsqueeze(1))

    @torch.no_grad()
    def _track_usage_and_restart(self, flat: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        self.usage_ema.mul_(self.usage_decay).add_(counts / counts.sum().clamp(min=1), alpha=1 - self.usage_decay)
        dead = self.usage_ema * self.K < self.dead_threshold  # identical on every rank (reduced stats)
        n_dead = int(dead.sum())
        if n_dead:
            fresh = self._sample_rows(flat, n_dead)
            self.embed.data[dead] = fresh.to(self.embed.dtype)
            if self.mode == "ema":
                self.embed_avg[dead] = fresh
                self.cluster_size[dead] = 1.0
            self.usage_ema[dead] = 1.0 / self.K  # a fresh code gets a full window to be used
        return torch.tensor(float(n_dead), device=flat.device)
