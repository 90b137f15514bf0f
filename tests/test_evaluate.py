"""`submit stage=evaluate`: torch-fidelity metrics on shard datasets (classifier and Inception
features), CAS, classifier-based rejection, cached reference features, the report."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import EVAL_ARGS, copy_stages, run_group, spoil_last_sample, submit, val_images
from pipeline.data import shards
from pipeline.data.shard_images import ShardImages, write_image_shard
from pipeline.evaluation import fidelity
from pipeline.evaluation.classifier import accuracy, confidences
from pipeline.evaluation.reconstruction import reconstruct
from pipeline.evaluation.report import sample_sets_table
from pipeline.evaluation.rejection import accepted, class_matched, extremes
from pipeline.models import load_exported

NAMES = ["recon/mse", "recon/psnr", "recon/fid", "fid", "isc", "kid", "precision", "recall", "cas/top1",
         "cas/top5", "real/top1", "real/top5", "accept_1.0/fid", "accept_0.5/fid", "accept_0.1/fid",
         "accept_0.5/precision", "accept_0.5/recall", "accept_0.5/isc", "recon/usage_top", "recon/usage_bottom",
         "real_train/fid", "fid/vs_real_train", "cas/vs_real", "accept_0.1/real_train_fid", "accept_0.5/fid_vs_real_train",
         "kid/std", "isc/std"]


def _kind(cache_name: str) -> str:
    """Which image set an evaluate feature cache name is of: val, recon, samples or train."""
    return cache_name.split("-")[0] if cache_name.startswith(("recon-", "samples-")) else cache_name.split("-")[1]


def test_evaluate_logs_every_metric_and_the_report_and_reuses_cached_work(evaluated, tmp_path):
    root = evaluated["root"]
    out = root / "digits" / "evaluate"
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(NAMES) <= set(results)
    assert all(math.isfinite(v) for v in results.values())
    assert results["real/top1"] > 0.8  # the real-data classifier works on real digits
    assert 0 <= results["cas/top1"] <= 1 and results["recon/psnr"] > 10
    assert 0 < results["recon/usage_top"] <= 1 and 0 < results["recon/usage_bottom"] <= 1
    # 100 real train digits are closer to real val than 100 samples of briefly trained priors
    assert results["real_train/fid"] < results["fid"]
    assert results["fid/vs_real_train"] == pytest.approx(results["fid"] / results["real_train/fid"])
    assert results["cas/vs_real"] == pytest.approx(results["cas/top1"] / results["real/top1"])
    assert results["accept_0.5/kept"] == 50 and results["accept_0.1/kept"] == 10
    assert results["accept_0.5/confidence"] > results["accept_1.0/confidence"]
    # each rate's real baseline uses as many real images as it kept: fewer images, larger FID
    assert results["accept_1.0/real_train_fid"] == results["real_train/fid"]
    assert results["accept_0.1/real_train_fid"] > results["accept_0.5/real_train_fid"] > results["real_train/fid"]
    assert results["accept_0.1/fid_vs_real_train"] == pytest.approx(
        results["accept_0.1/fid"] / results["accept_0.1/real_train_fid"])
    report = (out / "report.md").read_text()
    assert "| CAS top-1 (trained on samples, tested on real val) |" in report and "0.5483" in report
    assert "different dataset" in report
    assert results["kid/std"] > 0 and results["isc/std"] > 0  # each shown with its spread
    assert (f"| KID (± std over subsets: near 0, a negative mean is within noise) | {results['kid']:.4g} ± "
            f"{results['kid/std']:.2g} |") in report, report
    assert "| accept_0.1/fid (classifier-based rejection, 10 samples) |" in report
    assert "| accept_0.1/fid_vs_real_train (classifier-based rejection, 10 samples) |" in report
    assert "![rejection.png](rejection.png)" in report and (out / "rejection.png").exists()
    assert '<img src="rejection.png"' in (out / "report.html").read_text()
    first = evaluated["stdout"] + evaluated["stderr"]
    # every image set's features are extracted once: real val, reconstructions, samples and one real
    # train set holding every baseline (before: each rate's kept samples and baseline were extracted anew)
    extracted = re.findall(r"features of (\S+): computing (\d+) images", first)
    kinds = {_kind(n): int(k) for n, k in extracted}
    real = json.loads((out / "results.json").read_text())["real"]
    assert len(extracted) == 4 and kinds == {"val": real, "recon": real, "samples": 100, "train": 100}, extracted
    assert evaluated["stdout"].rstrip().endswith(f"report:  {out / 'report.md'}") and "next:" not in evaluated["stdout"]
    # both classifier trainings say how the process was launched: inside the stage's process group,
    # whose exported RANK/WORLD_SIZE read as torchrun's, it said "(torchrun)"
    assert len(re.findall(r"training classifier: .* 1 rank\(s\) \(single\)", first)) == 2, first
    # every long pass over images shows a progress bar with its image count (on stderr, as tqdm does)
    bars = re.findall(r"(reconstruct|accuracy|confidences):\s+\d+%\|[^|]*\|\s*\d+/(\d+) ", evaluated["stderr"])
    assert {("reconstruct", str(real)), ("accuracy", str(real)), ("confidences", "100")} <= set(bars), set(bars)

    record = json.loads((out / "mlflow_run.json").read_text())
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    metrics = client.get_run(record["run_id"]).data.metrics
    assert set(NAMES) <= set(metrics)
    assert "classifier_real/loss" in metrics and "classifier_samples/val_top1" in metrics
    assert {"report.md", "report.html", "results.json", "rejection.png"} <= {
        a.path for a in client.list_artifacts(record["run_id"])}
    # the rejection grid: a row per class, the most confident sample first, the least confident last
    clf, _ = load_exported(out / "classifier_real" / "model.pt")
    samples = ShardImages(shards.shard_urls(root / "digits" / "sample" / "shards", "samples"), 32, "none")
    scores = confidences(clf, samples)
    grid = np.array(Image.open(out / "rejection.png").convert("RGB"))
    cell = 2 * 34  # 32² samples in a 1-pixel frame, shown twice as large
    assert grid.shape == (10 * cell, 11 * cell, 3)  # 10 classes; 5 best, a gap, 5 worst
    for c, col in ((0, 0), (0, 10), (9, 0)):
        idx = np.flatnonzero(samples.labels == c)
        want = idx[np.argmax(scores[idx])] if col == 0 else idx[np.argmin(scores[idx])]
        shown = grid[c * cell + 2:(c + 1) * cell - 2:2, col * cell + 2:(col + 1) * cell - 2:2]
        assert np.array_equal(shown, samples[want].permute(1, 2, 0).numpy()), (c, col)

    again = submit("stage=evaluate", f"run_root={root}", *EVAL_ARGS, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "reusing the cache" in log and "computing" not in log
    assert "classifier_real: reusing the trained classifier" in log
    assert "classifier_samples: reusing the trained classifier" in log
    assert "reconstructed" not in log and "reconstruct:" not in log  # the reconstruction shards are kept
    rerun = json.loads((out / "results.json").read_text())["results"]
    assert rerun["fid"] == pytest.approx(results["fid"]) and rerun["cas/top1"] == results["cas/top1"]


def test_metrics_from_features_are_torch_fidelitys_and_subsets_are_rows(evaluated, tmp_path, caplog):
    """The metrics computed from features extracted once equal torch-fidelity's calculate_metrics on
    the images, for a set and for a subset taken as rows of the set's features."""
    root = evaluated["root"]
    ext = fidelity.extractor(fidelity.CLASSIFIER, root / "digits" / "evaluate" / "classifier_real" / "model.pt")
    val = val_images(root)
    half = len(val) // 2
    a, b = val.subset(list(range(half))), val.subset(list(range(half, len(val))))
    fa, fb = (fidelity.features(x, ext, cache_name=n, cache_root=tmp_path / "cache", batch_size=37)
              for x, n in ((a, "a"), (b, "b")))
    assert not list((tmp_path / "cache").glob("*.part-*"))  # one process writes no parts
    sub = [i for i in range(half) if a.labels[i] % 3]  # two thirds of the classes, out of order below
    # the reference statistics, computed once, give the FID of computing them each time
    stats = fidelity.fid_statistics(fb, ext)
    for ours, images in ((fidelity.metrics(fa, fb, ext, kid_subset_size=50, seed=3, reference_stats=stats), a),
                         (fidelity.metrics(fidelity.rows(fa, sub[::-1]), fb, ext, kid_subset_size=50, seed=3),
                          a.subset(sub[::-1]))):
        theirs = torch_fidelity.calculate_metrics(
            input1=images, input2=b, cuda=False, feature_extractor=ext.name, verbose=False,
            feature_extractor_weights_path=str(ext.weights), isc=True, fid=True, kid=True, prc=True,
            isc_splits=fidelity.isc_splits(len(images)), kid_subset_size=50, prc_neighborhood=3, rng_seed=3,
            save_cpu_ram=True)
        assert ours == pytest.approx({"fid": theirs["frechet_inception_distance"],
                                      "isc": theirs["inception_score_mean"], "isc_std": theirs["inception_score_std"],
                                      "kid": theirs["kernel_inception_distance_mean"],
                                      "kid_std": theirs["kernel_inception_distance_std"],
                                      "precision": theirs["precision"], "recall": theirs["recall"]}, rel=1e-4)
    assert ours["fid"] != pytest.approx(fidelity.metrics(fa, fb, ext)["fid"], rel=1e-3)  # a subset differs
    assert fidelity.fid(fa, fb, ext, stats) == fidelity.fid(fa, fb, ext)
    assert fidelity.fid(fa, fb, ext, fidelity.fid_statistics(fa, ext)) < 1e-6  # the statistics are used
    # a cached name is loaded, not extracted; a cache whose row count does not match is extracted anew
    caplog.clear()  # what the extractions above logged, where something made INFO records captured
    with caplog.at_level(logging.INFO, logger="pipeline.evaluation.fidelity"):
        assert torch.equal(fidelity.features(a, ext, cache_name="a", cache_root=tmp_path / "cache")["logits"],
                           fa["logits"])
        assert "features of a: reusing the cache" in caplog.text and "computing" not in caplog.text
        shorter = fidelity.features(a.subset(list(range(half - 1))), ext, cache_name="a", cache_root=tmp_path / "cache")
    assert "holds %d rows for %d images; extracting again" % (half, half - 1) in caplog.text
    assert torch.allclose(shorter["logits"], fa["logits"][:half - 1], atol=1e-5)
    assert len(torch.load(fidelity.cache_files(ext, "a", tmp_path / "cache")[1])) == half - 1


def test_real_halves_beat_noise_and_dropped_classes_lower_recall_only(evaluated, tmp_path):
    root = evaluated["root"]
    ext = fidelity.extractor(fidelity.CLASSIFIER, root / "digits" / "evaluate" / "classifier_real" / "model.pt")
    val = val_images(root)
    half = len(val) // 2
    a, b = val.subset(list(range(half))), val.subset(list(range(half, len(val))))
    rng = np.random.default_rng(0)
    noise = ShardImages([str(write_image_shard(tmp_path / "noise.tar", rng.integers(0, 256, (half, 32, 32, 3),
                                                                                       dtype=np.uint8),
                                               [0] * half))], 32, "none")
    def metrics(images, name):
        f = fidelity.features(images, ext, cache_name=name, cache_root=tmp_path / "cache")
        return fidelity.metrics(f, fidelity.features(b, ext, cache_name="val-b", cache_root=tmp_path / "cache"), ext)
    real = metrics(a, "val-a")
    fake = metrics(noise, "noise")
    assert real["fid"] < fake["fid"] / 3
    assert real["precision"] > 0.6 and real["recall"] > 0.6
    # noise covers none of the real digits; its features form one tight clump, which lands inside the
    # k-NN ball of a few outlying real digits or of none, depending on the classifier's weights (and so
    # on the CPU's float kernels): 0.18 on one machine, under 0.1 on others. Well under real's either way
    assert fake["recall"] < 0.1 and fake["precision"] < real["precision"] / 2
    # half the classes (mode dropping): what is drawn is as precise as real data, but covers about half
    low = val.subset([int(i) for i in np.flatnonzero(val.labels[:half] < 5)])
    dropped = metrics(low, "val-a-low")
    assert dropped["precision"] > 0.8 and dropped["recall"] < real["recall"] * 0.7
    assert real["fid"] < dropped["fid"] < fake["fid"]
    # 60 images of 10 classes form one IS split: the score is not capped by tiny splits (6 images each
    # in 10 splits would bound it by 6)
    assert fidelity.isc_splits(60) == 1 and fidelity.isc_splits(500) == 10 and fidelity.isc_splits(10) == 1
    assert metrics(val.subset(list(range(60))), "val-60")["isc"] > 6.5


def test_extremes_are_each_class_best_and_worst_never_twice():
    labels = np.array([1, 0, 1, 0, 0, 2, 0])
    scores = np.array([0.9, 0.2, 0.1, 0.8, 0.5, 0.7, 0.5])
    assert extremes(labels, scores, 2, 10) == [([3, 4], [6, 1]), ([0, 2], []), ([5], [])]
    assert extremes(labels, scores, 1, 2) == [([3], [1]), ([0], [2])]  # the first classes only


def test_rejection_keeps_half_of_each_class_and_raises_confidence(evaluated):
    root = evaluated["root"]
    clf, _ = load_exported(root / "digits" / "evaluate" / "classifier_real" / "model.pt")
    samples = ShardImages(shards.shard_urls(root / "digits" / "sample" / "shards", "samples"), 32, "none")
    scores = confidences(clf, samples)
    keep = accepted(samples.labels, scores, 0.5)
    kept_per_class = np.bincount(samples.labels[keep], minlength=10)
    assert kept_per_class.tolist() == [5] * 10  # 10 samples per class were drawn
    assert scores[keep].mean() > scores.mean()
    dropped = np.setdiff1d(np.arange(len(samples)), keep)
    for c in range(10):  # within a class, every kept sample scores at least as high as every dropped one
        k, d = [i for i in keep if samples.labels[i] == c], [i for i in dropped if samples.labels[i] == c]
        assert scores[k].min() >= scores[d].max()


def test_two_ranks_train_the_classifiers_to_identical_replicas(evaluated, tmp_path):
    # each rank's batch norm sees its own batches: its running statistics are averaged every step
    root = copy_stages(evaluated["root"], tmp_path / "runs", "prepare", "train_vqvae", "sample")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(29000 + os.getpid() % 1000), "-m", "pipeline.cli", "stage=evaluate", f"run_root={root}", *EVAL_ARGS,
           "train.max_steps=40", "train.eval_every=40", "train.ckpt_every=40", "data.num_workers=0"]
    proc = run_group(cmd, cwd=tmp_path, timeout=900,
                     env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # each rank's own log file: the ranks' lines interleave mid-line on the shared stdout
    logs = sorted((root / "digits" / "evaluate" / "logs").glob("*.log"))
    assert sorted(f.name.endswith("-rank1.log") for f in logs) == [False, True], logs
    log = "\n".join(f.read_text() for f in logs)
    digests = re.findall(r"identical on all 2 rank\(s\): sha256 ([0-9a-f]{16})", log)
    assert len(re.findall(r"training classifier: .* 2 rank\(s\) \(torchrun\)", log)) == 4, log  # 2 per rank
    assert len(digests) == 4 and len(set(digests)) == 2, digests  # two classifiers, each logged by both ranks
    results = json.loads((root / "digits" / "evaluate" / "results.json").read_text())["results"]
    # the classifier passes are split over the ranks too and sum to one process's numbers
    real, _ = load_exported(root / "digits" / "evaluate" / "classifier_real" / "model.pt")
    assert results["real/top1"] == pytest.approx(accuracy(real, val_images(root))[0], abs=1e-12)
    # every image set's features: half the rows on each rank, each set extracted once
    val = val_images(root)
    halves = re.findall(r"features of (\S+): computing (\d+) images.*\(rows (\d+)\.\.(\d+) of (\d+): rank (\d) of 2\)",
                        log)
    for kind in ("val", "recon", "samples", "train"):
        mine = sorted((int(r), int(lo), int(hi), int(n)) for s, _, lo, hi, n, r in halves if _kind(s) == kind)
        count = 100 if kind in ("samples", "train") else len(val)
        assert mine == [(0, 0, count // 2, count), (1, count // 2, count, count)], (kind, halves)
    # rank 0 joined the halves in order: the cached val features are those of one process over all rows
    ext = fidelity.extractor(fidelity.CLASSIFIER, root / "digits" / "evaluate" / "classifier_real" / "model.pt")
    cache = root / "fidelity_cache"
    (joined,) = [p for p in cache.glob(f"*-val-*-{ext.digest}-{ext.name}-features-penultimate.pt")
                 if not p.name.startswith("recon-")]
    single = fidelity.features(val, ext, cache_name="one-process", cache_root=tmp_path / "cache")
    assert torch.allclose(torch.load(joined), single["penultimate"], atol=1e-5)
    assert not list(cache.glob("*.part-*"))  # the ranks' parts are removed once joined
    # each image set's metrics on one rank, and every number is the one a single process computes
    # from the same features
    computed = re.findall(r"metrics of (\S+): on rank (\d) of 2", log)
    assert sorted(computed) == [("accept_0.1", "1"), ("accept_0.5", "0"), ("recon", "1"), ("samples", "0")]

    def cached(prefix: str) -> fidelity.Features:
        files = {f: list(cache.glob(f"{prefix}*-{ext.digest}-{ext.name}-features-{f}.pt"))
                 for f in fidelity.FEATURES[ext.name]}
        assert all(len(v) == 1 for v in files.values()), files
        return {f: torch.load(v[0]) for f, v in files.items()}
    val_f, samples_f, recon_f = cached("digits-val-"), cached("samples-"), cached("recon-")
    single = fidelity.metrics(samples_f, val_f, ext, kid_subset_size=1000, prc_neighborhood=3, seed=0)
    assert {m: results[m.replace("_std", "/std")] for m in single} == pytest.approx(single, rel=1e-6)  # BLAS: KID 1e-8
    assert results["recon/fid"] == pytest.approx(fidelity.fid(recon_f, val_f, ext), rel=1e-6)
    assert results["accept_1.0/precision"] == results["precision"]  # every sample kept: not computed again
    assert results["accept_0.1/fid"] != pytest.approx(results["fid"], rel=1e-3)
    # the reconstruction shards are split over the ranks too: each written once
    recon = re.findall(r"reconstructed (\S+):", log)
    val_tars = {Path(u).name for u in shards.shard_urls(root / "digits" / "prepare" / "shards", "val")}
    assert sorted(recon) == sorted(val_tars)

    # a sample image only rank 1 reads is unreadable: its error is the cause, and status shows it
    # first, whichever rank recorded first; rank 0 stopped on the ranks' agreement, an echo of it
    last, png = spoil_last_sample(root)
    for p in cache.glob("samples-*"):  # extracted again
        p.unlink()
    proc = run_group(cmd, cwd=tmp_path, timeout=900, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert proc.returncode != 0
    status = submit("status", f"run_root={root}", cwd=tmp_path)
    why = status.stdout.split("\nfailures:\n")[1].splitlines()
    assert re.fullmatch(rf"  evaluate: ValueError: {re.escape(last)}: {png} is not a readable image "
                        r"\(UnidentifiedImageError: .*\(rank 1, [\d: -]+\)", why[0]), status.stdout
    assert why[1].startswith("    log:  ") and why[1].endswith("-rank1.log"), why
    assert re.fullmatch(r"    then: OtherRankFailed: features of samples-\S+: another rank failed .*\(rank 0, [\d: -]+\)",
                        why[2]), why


def test_sample_sets_table_reads_each_report_and_names_an_unreadable_one(evaluated, tmp_path):
    assert sample_sets_table(tmp_path) == ""  # nothing evaluated yet: no table
    done = evaluated["root"] / "digits" / "evaluate" / "results.json"
    results = json.loads(done.read_text())["results"]
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "results.json").write_text(done.read_text())
    (tmp_path / "evaluate-cut").mkdir()
    (tmp_path / "evaluate-cut" / "results.json").write_text('{"results": {')  # e.g. a disk that filled up
    head, default, broken = sample_sets_table(tmp_path).splitlines()
    assert head.split()[:6] == ["sample_set", "temperature", "top_k", "top_p", "seed", "samples"]
    assert default.split()[:9] == ["(default)", "0.7", "0", "1.0", "0", "100", f"{results['fid']:.3g}",
                                   f"{results['fid/vs_real_train']:.2f}x", f"{results['precision']:.3f}"]
    assert broken.startswith(f"cut: unreadable {tmp_path / 'evaluate-cut' / 'results.json'} (JSONDecodeError")

    # a report written before results.json recorded the settings: read from its samples' manifest
    older = json.loads(done.read_text())
    del older["sampling"]
    (tmp_path / "evaluate-old").mkdir()
    (tmp_path / "evaluate-old" / "results.json").write_text(json.dumps(older))
    assert sample_sets_table(tmp_path).splitlines()[2].split()[:5] == ["old", "?", "?", "?", "?"]  # no samples there
    manifest = json.loads((evaluated["root"] / "digits" / "sample" / "shards" / "dataset.json").read_text())
    (tmp_path / "sample-old" / "shards").mkdir(parents=True)
    (tmp_path / "sample-old" / "shards" / "dataset.json").write_text(json.dumps({**manifest, "sampling": {
        **manifest["sampling"], "temperature": 0.6}}))
    assert sample_sets_table(tmp_path).splitlines()[2].split()[:5] == ["old", "0.6", "0", "1.0", "0"]


def test_real_baseline_matches_the_class_counts_and_reports_a_short_class():
    pool = np.array([0, 1, 0, 2, 1, 0, 2])
    idx, short = class_matched(pool, np.array([2, 0, 0, 1, 0, 0, 3]))
    assert idx == [0, 1, 2, 3, 5]  # the first of each class in pool order: 0s at 0, 2, 5; a 1; a 2
    assert np.bincount(pool[idx]).tolist() == [3, 1, 1]
    assert short == {0: 1, 3: 1}  # four 0s asked for, three in the pool; no 3 at all


def test_reconstructions_are_reused_only_for_the_same_images_and_vqvae(evaluated, tmp_path, caplog):
    root = evaluated["root"]
    vqvae, _ = load_exported(root / "digits" / "train_vqvae" / "model.pt")
    log = logging.getLogger("test.recon")

    def run(images, model_id, out="recon", elsewhere=()):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="test.recon"):
            metrics, urls = reconstruct(vqvae, images, tmp_path / out, 8, log, model_id=model_id, elsewhere=elsewhere)
        return metrics, sum("reconstructed" in r.getMessage() for r in caplog.records), urls

    first, written, urls = run(val_images(root, limit=20), "a")
    assert written >= 1 and first["psnr"] > 10
    again, written, _ = run(val_images(root, limit=20), "a")
    assert written == 0 and again == first
    # another sample set's evaluate: the finished shards are read where they are, nothing is written
    shared, written, shared_urls = run(val_images(root, limit=20), "a", "other", elsewhere=(tmp_path / "recon",))
    assert written == 0 and shared == first and shared_urls == urls and not (tmp_path / "other").exists()
    assert run(val_images(root, limit=20), "b")[1] >= 1  # another VQ-VAE
    assert run(val_images(root, limit=30), "b")[1] >= 1  # other images from the same shards
    # ... and not when they are of other images or another VQ-VAE (recon/ now holds b's of 30 images):
    # written here, the other dir untouched
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "recon").iterdir()}
    assert run(val_images(root, limit=20), "a", "other", elsewhere=(tmp_path / "recon",))[1] >= 1
    assert (tmp_path / "other").is_dir() and {p.name: p.stat().st_mtime_ns for p in (tmp_path / "recon").iterdir()} == before


def test_max_real_takes_every_class_evenly_from_class_sorted_shards(tmp_path):
    # val written class by class (ImageNet's val folders): the first n would be the first classes only
    labels = [0] * 6 + [1] * 6 + [2] * 6
    images = np.stack([np.full((8, 8, 3), 10 * i, np.uint8) for i in range(len(labels))])
    shard = write_image_shard(tmp_path / "val-000000.tar", images, labels)
    val = ShardImages([str(shard)], 8, "none", limit=7)
    assert sorted(val.labels.tolist()) == [0, 0, 0, 1, 1, 2, 2]
    assert [int(val[i][0, 0, 0]) for i in range(len(val))] == [0, 10, 20, 60, 70, 120, 130]  # the first of each
    assert len(ShardImages([str(shard)], 8, "none", limit=100)) == 18


def test_inception_weights_from_a_local_file(evaluated, tmp_path, monkeypatch):
    """torch-fidelity's inception-v3-compat reads its weights from the configured file (here random
    weights written by the test, re-initialised so the features do not collapse)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with monkeypatch.context() as m:  # build the architecture without weights to get its state dict
        m.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    torch.manual_seed(0)
    for mod in net.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
        elif isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)

    ext = fidelity.extractor(fidelity.INCEPTION, weights)
    val = val_images(evaluated["root"], limit=12)
    a, b = (fidelity.features(val.subset(list(r)), ext, cache_name=n, cache_root=tmp_path / "cache")
            for r, n in ((range(6), "test-a"), (range(6, 12), "test-inception")))
    m = fidelity.metrics(a, b, ext)
    assert all(math.isfinite(v) for v in m.values()) and m["fid"] > 0
    cached = torch.load(fidelity.cache_files(ext, "test-inception", tmp_path / "cache")[0])
    assert cached.shape == (6, 2048) and cached.std(dim=0).mean() > 1e-3  # distinct images, distinct features
