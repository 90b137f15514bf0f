"""The evaluation report: this run's numbers beside the VQ-VAE-2 paper's (ImageNet 256², a different
dataset and scale: the comparison shows where the method stands, not a like-for-like score)."""

from __future__ import annotations

import html
from typing import Any

# Razavi et al. 2019, "Generating Diverse High-Fidelity Images with VQ-VAE-2", ImageNet 256x256.
PAPER: dict[str, str] = {
    "cas/top1": "0.5483", "cas/top5": "0.7759", "real/top1": "0.7309", "real/top5": "0.9147", "cas/vs_real": "0.75",
}
ROWS: list[tuple[str, str]] = [
    ("recon/mse", "VQ-VAE val MSE (pixels in [-1, 1])"),
    ("recon/psnr", "VQ-VAE val PSNR (dB)"),
    ("recon/usage_top", "codebook usage, top (share of codes used on val)"),
    ("recon/usage_bottom", "codebook usage, bottom"),
    ("recon/fid", "reconstruction FID (recon vs real val)"),
    ("fid", "FID (samples vs real val)"),
    ("real_train/fid", "FID (real train images, same count per class, vs real val)"),
    ("fid/vs_real_train", "FID ratio: samples / real train"),
    ("isc", "Inception Score (of the extractor's logits)"),
    ("kid", "KID"),
    ("precision", "precision (k-NN manifolds)"),
    ("recall", "recall (k-NN manifolds)"),
    ("cas/top1", "CAS top-1 (trained on samples, tested on real val)"),
    ("cas/top5", "CAS top-5"),
    ("cas/vs_real", "CAS ratio: CAS top-1 / real-data top-1"),
    ("real/top1", "real-data classifier top-1 (same recipe)"),
    ("real/top5", "real-data classifier top-5"),
]
NOTE = ("Paper column: VQ-VAE-2 on ImageNet 256x256 (CAS with a ResNet-50). This run uses {data} at "
        "{resolution}x{resolution}, {features} features and far smaller models: a different dataset and "
        "scale, shown for orientation only. The paper gives FID, IS, precision and recall as curves over "
        "rejection rates rather than single values, so those cells are left empty.")


def rows(results: dict[str, float], accept: list[str]) -> list[tuple[str, str, str]]:
    out = [(label, f"{results[key]:.4g}", PAPER.get(key, "")) for key, label in ROWS if key in results]
    for name in accept:
        # FID and IS move with the number of images: the count is part of the row, not a footnote
        kept = f", {int(results[f'{name}/kept'])} samples" if f"{name}/kept" in results else ""
        for m in ("fid", "real_train_fid", "fid_vs_real_train", "isc", "precision", "recall"):
            if f"{name}/{m}" in results:
                out.append((f"{name}/{m} (classifier-based rejection{kept})", f"{results[f'{name}/{m}']:.4g}", ""))
    return out


def markdown(results: dict[str, float], accept: list[str], facts: dict[str, Any]) -> str:
    lines = ["| metric | this run | VQ-VAE-2 paper (ImageNet 256²) |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows(results, accept)]
    return "\n".join(lines) + "\n\n" + NOTE.format(**facts) + "\n"


def html_table(results: dict[str, float], accept: list[str], facts: dict[str, Any]) -> str:
    body = "".join(f"<tr><td>{html.escape(a)}</td><td>{b}</td><td>{c}</td></tr>" for a, b, c in rows(results, accept))
    return ("<html><body><table border=1 cellpadding=4><tr><th>metric</th><th>this run</th>"
            f"<th>VQ-VAE-2 paper (ImageNet 256&sup2;)</th></tr>{body}</table><p>{html.escape(NOTE.format(**facts))}"
            "</p></body></html>\n")
