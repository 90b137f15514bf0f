"""VQ-VAE-2 and the priors: causality, conditioning, consistency, and that they can learn."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.config import config_dir
from pipeline.models import BottomPrior, TopPrior, build, load_exported, load_exported_digest, parameter_count
from pipeline.models.sampling import filter_logits, sample_bottom, sample_top

TINY = OmegaConf.load(config_dir() / "model" / "tiny_digits.yaml")


def _small_top(**kw):
    args = dict(num_codes=7, num_classes=3, hidden=16, res_channels=24, layers=4, kernel_size=5,
                attn_layers=2, attn_heads=2, out_stack=1, dropout=0.1)
    return TopPrior(**{**args, **kw})


def _small_bottom(**kw):
    args = dict(num_codes=9, num_top_codes=7, num_classes=3, hidden=16, res_channels=24, layers=3,
                kernel_size=5, cond_blocks=2, out_stack=1, dropout=0.1)
    return BottomPrior(**{**args, **kw})


def _input_grads(prior, run, h, w):
    """For every position p: the gradient of logits at p w.r.t. the embedded input codes."""
    captured = {}

    def hook(_m, _i, out):
        out.retain_grad()
        captured["e"] = out

    handle = prior.stack.embedding.register_forward_hook(hook)
    try:
        for p in range(h * w):
            prior.zero_grad()
            logits = run()
            logits[:, :, p // w, p % w].sum().backward()
            yield p, captured["e"].grad.abs().sum(dim=(0, 3)).flatten()  # per raster position
    finally:
        handle.remove()


@pytest.mark.parametrize("size", [(4, 4), (5, 7)])
@pytest.mark.parametrize("kind", ["top", "top_no_attention", "bottom"])
def test_logits_never_see_the_current_or_later_positions(kind, size):
    torch.manual_seed(0)
    h, w = size
    codes = torch.randint(0, 7, (2, h, w))
    classes = torch.tensor([0, 2])
    if kind == "bottom":
        prior = _small_bottom().eval()
        top = torch.randint(0, 7, (2, max(1, h // 2), max(1, w // 2)))
        run = lambda: prior(codes, top, classes)  # noqa: E731
    else:
        prior = _small_top(attn_layers=0 if kind == "top_no_attention" else 2).eval()
        run = lambda: prior(codes, classes)  # noqa: E731
    for p, grad in _input_grads(prior, run, h, w):
        assert grad[p:].abs().max() == 0, f"position {p} sees positions {torch.nonzero(grad[p:]).flatten() + p}"
        if p > 0:
            assert grad[p - 1] > 0  # the left neighbour is visible
        if p >= w:
            assert grad[p - w] > 0 and grad[p - w + min(2, w - 1 - p % w)] > 0  # above and above-right: no blind spot
        if kind == "top":
            assert grad[:p].gt(0).all()  # attention sees the whole past


def test_conditioning_changes_the_logits():
    torch.manual_seed(0)
    top, bottom = _small_top().eval(), _small_bottom().eval()
    codes_t, codes_b = torch.randint(0, 7, (2, 4, 4)), torch.randint(0, 9, (2, 8, 8))
    a, b = torch.tensor([0, 0]), torch.tensor([1, 3])  # 3 = "no class"
    assert not torch.allclose(top(codes_t, a), top(codes_t, b))
    assert not torch.allclose(bottom(codes_b, codes_t, a), bottom(codes_b, codes_t, b))
    other_top = (codes_t + 1) % 7
    assert not torch.allclose(bottom(codes_b, codes_t, a), bottom(codes_b, other_top, a))
    with pytest.raises(ValueError, match="class ids"):
        top(codes_t, torch.tensor([0, 4]))


def test_vqvae_shapes_and_encode_decode_consistency():
    torch.manual_seed(0)
    model = build("vqvae", TINY)
    for s in (32, 64, 256):
        x = torch.randn(1, 3, s, s)
        recon, terms = model.train()(x)
        assert recon.shape == x.shape and terms["loss"].ndim == 0
        top, bottom = model.encode(x)
        assert top.shape == (1, s // 8, s // 8) and bottom.shape == (1, s // 4, s // 4)
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        recon, _ = model(x)
        again = model.decode_codes(*model.encode(x))
    assert torch.allclose(recon, again, atol=1e-5)


def _digits(n: int) -> torch.Tensor:
    d = load_digits()
    imgs = [np.asarray(Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BICUBIC))
            for i in range(n)]
    x = torch.tensor(np.stack(imgs), dtype=torch.float32) / 127.5 - 1
    return x[:, None].repeat(1, 3, 1, 1)


def test_vqvae_overfits_a_small_batch():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = build("vqvae", TINY).train()
    x = _digits(16)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(300):
        _, terms = model(x)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(float(terms["recon"].detach()))
    assert np.mean(losses[-10:]) < np.mean(losses[:3]) / 10, (losses[:3], losses[-10:])


def _overfit(prior, inputs, targets, steps=150):
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = F.cross_entropy(prior(*inputs), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_priors_overfit_a_few_code_maps():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    codes_t, classes = torch.randint(0, 7, (4, 4, 4)), torch.tensor([0, 1, 2, 0])
    nll = _overfit(_small_top(dropout=0.0), (codes_t, classes), codes_t)
    assert nll < 0.25 * math.log(7), nll
    codes_b = torch.randint(0, 9, (4, 8, 8))
    nll = _overfit(_small_bottom(dropout=0.0), (codes_b, codes_t, classes), codes_b, steps=200)
    assert nll < 0.25 * math.log(9), nll


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = _small_top(dropout=0.0).train()
    ckpt = _small_top(dropout=0.0, checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    codes, classes = torch.randint(0, 7, (2, 4, 4)), torch.tensor([0, 1])
    for m in (plain, ckpt):
        F.cross_entropy(m(codes, classes), codes).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_sampling_is_seeded_and_filters_work():
    torch.manual_seed(0)
    top, bottom = _small_top().eval(), _small_bottom().eval()
    classes = torch.tensor([0, 1, 2])

    def draw(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        t = sample_top(top, classes, (3, 3), generator=g, **kw)
        return t, sample_bottom(bottom, t, classes, (6, 6), generator=g, **kw)

    t1, b1 = draw(5)
    t2, b2 = draw(5)
    assert torch.equal(t1, t2) and torch.equal(b1, b2)
    assert t1.shape == (3, 3, 3) and b1.shape == (3, 6, 6) and b1.max() < 9
    greedy_t, _ = draw(1, top_k=1)
    assert torch.equal(greedy_t, draw(2, top_k=1)[0])  # top-k=1 is deterministic
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    p = filter_logits(logits, top_p=0.7)  # softmax: 0.64, 0.24, ... -> keep two
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()


def test_presets_build_with_their_parameter_counts():
    paper = OmegaConf.load(config_dir() / "model" / "paper_imagenet256.yaml")
    with torch.device("meta"):
        counts = {w: parameter_count(build(w, paper, num_classes=1000))
                  for w in ("vqvae", "top_prior", "bottom_prior")}
    assert 1e6 < counts["vqvae"] < 5e6 and counts["top_prior"] > 1e8
    tiny = parameter_count(build("top_prior", TINY, num_classes=10))
    assert tiny < 3e6


def test_an_exported_model_loads_with_the_digest_of_the_file_it_came_from(tmp_path):
    model = build("top_prior", TINY, num_classes=10)
    path = tmp_path / "model.pt"
    torch.save({"kind": "top_prior", "state_dict": model.state_dict(), "num_classes": 10,
                "model_config": OmegaConf.to_container(TINY, resolve=True)}, path)
    loaded, meta, sha = load_exported_digest(path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() and meta["num_classes"] == 10
    plain, _ = load_exported(path)
    for (name, a), b in zip(loaded.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, model.state_dict()[name]), name
    path.write_bytes(path.read_bytes() + b"x")  # another file: another digest
    assert load_exported_digest(path)[2] != sha


def test_classifier_batch_norm_matches_torch_in_fp32_and_runs_with_bf16_weights():
    from pipeline.models.classifier import Classifier

    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(32)
    ours = Classifier(num_classes=3).body[1]  # the stem's batch norm, swapped at construction
    assert type(ours).__name__ == "Fp32BatchNorm2d" and ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(16, 32, 5, 5) * 3 + 1
    for mode in ("train", "eval"):
        getattr(ref, mode)(), getattr(ours, mode)()
        assert torch.allclose(ours(x), ref(x), atol=1e-6), mode
    assert torch.allclose(ours.running_mean, ref.running_mean) and torch.allclose(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == 1
    # as DeepSpeed's bf16 leaves a module: parameters bf16, buffers fp32 (torch's batch norm refuses that)
    model = Classifier(num_classes=3, arch="resnet50")
    for p in model.parameters():
        p.data = p.data.bfloat16()
    logits = model(torch.randn(2, 3, 64, 64).bfloat16())
    logits.float().sum().backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    bn = model.body.bn1
    assert bn.running_mean.dtype == torch.float32 and bn.weight.grad.dtype == torch.bfloat16
