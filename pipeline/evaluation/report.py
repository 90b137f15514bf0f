"""The evaluation report: this run's numbers beside the VQ-VAE-2 paper's (ImageNet 256², a different
dataset and scale: the comparison shows where the method stands, not a like-for-like score)."""

from __future__ import annotations

import html
import json
from pathlib import Path
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
    ("isc", "Inception Score (of the extractor's logits; ± std over splits)"),
    ("kid", "KID (± std over subsets: near 0, a negative mean is within noise)"),
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
SAMPLES = "Samples evaluated: {sampled}."
GRID = "rejection.png"  # written by evaluate beside the report
REJECTION = ("Classifier-based rejection, one row per class: the samples the real-data classifier is most "
             "sure of (most first), then those it is least sure of (least last).")


def describe_samples(name: str, sampling: dict[str, Any]) -> str:
    """Which samples a report is about: the sample directory and the settings that drew them."""
    k, p = int(sampling.get("top_k", 0)), float(sampling.get("top_p", 1.0))
    return (f"{name}/ (temperature {sampling.get('temperature')}, top-k {k or 'off'}, top-p "
            f"{p if p < 1 else 'off'}, seed {sampling.get('seed')})")


def _value(results: dict[str, float], key: str) -> str:
    spread = results.get(f"{key}/std")  # results written before the spreads were kept have none
    return f"{results[key]:.4g}" + (f" ± {spread:.2g}" if spread is not None else "")


def rows(results: dict[str, float], accept: list[str]) -> list[tuple[str, str, str]]:
    out = [(label, _value(results, key), PAPER.get(key, "")) for key, label in ROWS if key in results]
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
    return ("\n".join(lines) + "\n\n" + SAMPLES.format(**facts) + "\n\n" + NOTE.format(**facts) + "\n\n"
            + f"{REJECTION}\n\n![{GRID}]({GRID})\n")


def html_table(results: dict[str, float], accept: list[str], facts: dict[str, Any]) -> str:
    body = "".join(f"<tr><td>{html.escape(a)}</td><td>{b}</td><td>{c}</td></tr>" for a, b, c in rows(results, accept))
    return ("<html><body><table border=1 cellpadding=4><tr><th>metric</th><th>this run</th>"
            f"<th>VQ-VAE-2 paper (ImageNet 256&sup2;)</th></tr>{body}</table><p>{html.escape(SAMPLES.format(**facts))}</p>"
            f"<p>{html.escape(NOTE.format(**facts))}</p><p>{html.escape(REJECTION)}</p>"
            f'<img src="{GRID}" alt="{GRID}"></body></html>\n')


def _drawn_with(evaluate_dir: Path) -> dict[str, Any]:
    """The sampling settings in the manifest of the samples an evaluate dir read (reports written
    before results.json recorded them)."""
    from pipeline.data.shards import MANIFEST

    manifest = evaluate_dir.parent / evaluate_dir.name.replace("evaluate", "sample", 1) / "shards" / MANIFEST
    return json.loads(manifest.read_text()).get("sampling", {}) if manifest.exists() else {}


def sample_sets_table(exp_dir: Path) -> str:
    """One row per evaluated set of samples of an experiment (``evaluate/`` and every
    ``evaluate-<sample_set>/``): how they were drawn beside what came out, so sampling settings can
    be compared on the same priors. '' when nothing has been evaluated."""
    head = ["sample_set", "temperature", "top_k", "top_p", "seed", "samples", "FID", "vs real", "precision",
            "recall", "CAS", "vs real"]
    rows, unreadable = [head], []
    for path in sorted(Path(exp_dir).glob("evaluate*/results.json")):
        name = path.parent.name.partition("-")[2] or "(default)"
        try:
            done = json.loads(path.read_text())
            r, how = done["results"], done.get("sampling") or _drawn_with(path.parent)
            rows.append([name, *(str(how.get(k, "?")) for k in ("temperature", "top_k", "top_p", "seed")),
                         str(done["samples"]), f"{r['fid']:.3g}", f"{r['fid/vs_real_train']:.2f}x",
                         f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['cas/top1']:.3f}", f"{r['cas/vs_real']:.2f}x"])
        except (OSError, ValueError, KeyError) as e:
            unreadable.append(f"{name}: unreadable {path} ({type(e).__name__}: {e})")
    if len(rows) == 1 and not unreadable:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join(["  ".join(f"{c:<{w}}" for c, w in zip(row, widths)).rstrip() for row in rows] + unreadable)
