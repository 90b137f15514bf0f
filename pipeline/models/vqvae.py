"""Hierarchical VQ-VAE-2 (Razavi, van den Oord, Vinyals 2019), two levels.

At 256x256 the bottom encoder downsamples x4 (64x64 codes) and the top encoder x2 more (32x32).
The top codes are decoded to the bottom grid and concatenated with the bottom encoder features
before the bottom quantizer, so the bottom code is conditioned on the top code. The decoder takes
the upsampled top code vectors with the bottom code vectors. A third level (the paper's FFHQ-1024)
would repeat the (encoder, quantizer, decoder-to-lower-grid) step on top; nothing here assumes two
beyond the attribute names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.quantizer import VectorQuantizer


class ResBlock(nn.Module):
    def __init__(self, channels: int, res_channels: int):
        super().__init__()
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, res_channels, 3, padding=1),
                                   nn.ReLU(), nn.Conv2d(res_channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _encoder(in_ch: int, ch: int, res_ch: int, blocks: int, stride: int) -> nn.Sequential:
    """Strided 4x4 convolutions (x2 each), a 3x3, residual blocks."""
    layers: list[nn.Module] = []
    if stride == 4:
        layers += [nn.Conv2d(in_ch, ch // 2, 4, 2, 1), nn.ReLU(), nn.Conv2d(ch // 2, ch, 4, 2, 1), nn.ReLU(),
                   nn.Conv2d(ch, ch, 3, padding=1)]
    elif stride == 2:
        layers += [nn.Conv2d(in_ch, ch // 2, 4, 2, 1), nn.ReLU(), nn.Conv2d(ch // 2, ch, 3, padding=1)]
    else:
        raise ValueError(f"encoder stride {stride}: 2 or 4")
    layers += [ResBlock(ch, res_ch) for _ in range(blocks)] + [nn.ReLU()]
    return nn.Sequential(*layers)


def _decoder(in_ch: int, out_ch: int, ch: int, res_ch: int, blocks: int, stride: int) -> nn.Sequential:
    """A 3x3, residual blocks, strided 4x4 transposed convolutions (x2 each)."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, ch, 3, padding=1)]
    layers += [ResBlock(ch, res_ch) for _ in range(blocks)] + [nn.ReLU()]
    if stride == 4:
        layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(ch // 2, out_ch, 4, 2, 1)]
    elif stride == 2:
        layers += [nn.ConvTranspose2d(ch, out_ch, 4, 2, 1)]
    else:
        raise ValueError(f"decoder stride {stride}: 2 or 4")
    return nn.Sequential(*layers)


class VQVAE2(nn.Module):
    """Two-level VQ-VAE-2.

    Shapes for input x (B, 3, S, S) with S divisible by 8: bottom codes (B, S/4, S/4), top codes
    (B, S/8, S/8), reconstruction (B, 3, S, S) in the input's range (the pipeline uses [-1, 1]).
    """

    def __init__(self, *, in_channels: int = 3, hidden_channels: int = 128, res_channels: int = 64,
                 res_blocks: int = 2, codebook_size_top: int = 512, codebook_size_bottom: int = 512,
                 code_dim_top: int = 64, code_dim_bottom: int = 64, quantizer: str = "ema",
                 beta: float = 0.25, decay: float = 0.99, eps: float = 1e-5, dead_threshold: float = 0.01,
                 usage_decay: float = 0.99, data_init: bool = True):
        super().__init__()
        ch, rc, nb = hidden_channels, res_channels, res_blocks
        q = dict(mode=quantizer, beta=beta, decay=decay, eps=eps, dead_threshold=dead_threshold,
                 usage_decay=usage_decay, data_init=data_init)
        self.enc_b = _encoder(in_channels, ch, rc, nb, stride=4)
        self.enc_t = _encoder(ch, ch, rc, nb, stride=2)
        self.pre_quant_t = nn.Conv2d(ch, code_dim_top, 1)
        self.quant_t = VectorQuantizer(codebook_size_top, code_dim_top, **q)
        self.dec_t = _decoder(code_dim_top, code_dim_top, ch, rc, nb, stride=2)
        self.pre_quant_b = nn.Conv2d(code_dim_top + ch, code_dim_bottom, 1)
        self.quant_b = VectorQuantizer(codebook_size_bottom, code_dim_bottom, **q)
        self.upsample_t = nn.ConvTranspose2d(code_dim_top, code_dim_top, 4, 2, 1)
        self.dec = _decoder(code_dim_top + code_dim_bottom, in_channels, ch, rc, nb, stride=4)

    def _quantize(self, x: torch.Tensor):
        h_b = self.enc_b(x)
        h_t = self.enc_t(h_b)
        q_t, codes_t, stats_t = self.quant_t(self.pre_quant_t(h_t))
        # the bottom code sees the (decoded) top code: it only has to add detail
        q_b, codes_b, stats_b = self.quant_b(self.pre_quant_b(torch.cat([self.dec_t(q_t), h_b], 1)))
        return q_t, q_b, codes_t, codes_b, stats_t, stats_b

    def _decode(self, q_t: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.cat([self.upsample_t(q_t), q_b], 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x (B, 3, S, S) -> (reconstruction, terms): ``loss`` = ``recon`` (MSE) + ``commit`` +
        ``codebook``, plus per-level ``perplexity_*``, ``usage_*``, ``usage_window_*``, ``restarted_*``."""
        q_t, q_b, _, _, st, sb = self._quantize(x)
        recon = self._decode(q_t, q_b)
        terms = {"recon": F.mse_loss(recon.float(), x.float()),
                 "commit": st["commit"] + sb["commit"], "codebook": st["codebook"] + sb["codebook"]}
        terms["loss"] = terms["recon"] + terms["commit"] + terms["codebook"]
        for level, stats in (("top", st), ("bottom", sb)):
            for k in ("perplexity", "usage", "usage_window", "restarted"):
                terms[f"{k}_{level}"] = stats[k]
        return recon, terms

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, S, S) -> (top codes (B, S/8, S/8), bottom codes (B, S/4, S/4)), int64.
        Never updates the codebooks, whatever the module's mode."""
        was_training = self.training
        self.eval()
        try:
            _, _, codes_t, codes_b, _, _ = self._quantize(x)
        finally:
            self.train(was_training)
        return codes_t, codes_b

    def decode_codes(self, top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        """(top codes, bottom codes) -> image (B, 3, S, S)."""
        return self._decode(self.quant_t.lookup(top), self.quant_b.lookup(bottom))
