"""The prompt-contrastive M2IB objective, the presence score and the text term's gradient share."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vlm_fixtures as vf  # noqa: E402
from mwm.errors import DataError  # noqa: E402
from mwm.localize import m2ib, m2ib_contrast  # noqa: E402
from mwm.localize.m2ib import (M2IBConfig, contrast_embeddings, contrast_lists,  # noqa: E402
                               image_seed, information_maps, kl_per_element, presence_scores,
                               saliency_maps, text_gradient_share)

# a small beta: the text term must matter for the contrast to show in the map
FAST = dict(layer=1, steps=3, samples=2, beta=0.01)
CONTRASTIVE = dict(FAST, objective="contrastive")
PROMPTS = ["brain tumor", ["lesion", "mass"], "liver"]
PER_IMAGE = [["normal brain"], ["cyst", "liver", "normal brain"], ["mass", "lung nodule"]]


@pytest.fixture(scope="module")
def adapter():
    return vf.build_tiny_open_clip(trunk="timm", depth=4, width=64)


@pytest.fixture(scope="module")
def images():
    return vf.bright_square_images()


def _inputs(adapter, images, prompts):
    """Prepared pixels (B, 3, S, S), text (B, D) and fresh per-image generators."""
    pixels = torch.stack([adapter.prepare(im)[0] for im in images])
    gens = [torch.Generator().manual_seed(image_seed(0, k)) for k in range(len(images))]
    return pixels, adapter.embed_prompts(prompts), gens


# --------------------------------------------------------------------------- batching

def test_contrastive_batch_equals_one_at_a_time(adapter, images):
    cfg = M2IBConfig(**CONTRASTIVE, batch_size=8)
    batched = saliency_maps(adapter, images, PROMPTS, cfg, contrast=PER_IMAGE)
    singles = [saliency_maps(adapter, [im], [p], cfg, keys=[i], contrast=[c])[0]
               for i, (im, p, c) in enumerate(zip(images, PROMPTS, PER_IMAGE))]
    for b, s in zip(batched, singles):
        assert b.shape == s.shape and b.max() == 1.0
        np.testing.assert_allclose(b, s, atol=1e-4)
    in_pairs = saliency_maps(adapter, images, PROMPTS, M2IBConfig(**CONTRASTIVE, batch_size=2),
                             contrast=PER_IMAGE)
    for b, s in zip(batched, in_pairs):
        np.testing.assert_allclose(b, s, atol=1e-4)


def test_contrastive_with_shifts_and_two_layers_batch_equals_one_at_a_time(adapter, images):
    cfg = M2IBConfig(**{**CONTRASTIVE, "layer": (1, 2), "steps": 2, "shifts": 2, "smooth": 0.3})
    batched = saliency_maps(adapter, images[:2], PROMPTS[:2], cfg, contrast=PER_IMAGE[:2])
    singles = [saliency_maps(adapter, [im], [p], cfg, keys=[i], contrast=[c])[0]
               for i, (im, p, c) in enumerate(zip(images[:2], PROMPTS[:2], PER_IMAGE[:2]))]
    for b, s in zip(batched, singles):
        np.testing.assert_allclose(b, s, atol=1e-4)


def test_padded_contrasts_weigh_nothing(adapter, images):
    pixels, text, _ = _inputs(adapter, images[:1], ["brain tumor"])
    real = adapter.embed_prompts(["normal brain", "cyst"])[None]             # (1, 2, D)
    garbage = F.normalize(torch.randn(1, 3, real.shape[-1],
                                      generator=torch.Generator().manual_seed(1)), dim=-1)
    padded = torch.cat([real, garbage], dim=1)
    mask = torch.tensor([[True, True, False, False, False]])
    cfg = M2IBConfig(**CONTRASTIVE)
    gens = lambda: [torch.Generator().manual_seed(3)]  # noqa: E731
    plain = information_maps(adapter, pixels, text, gens(), cfg, real)
    masked = information_maps(adapter, pixels, text, gens(), cfg, padded, mask)
    torch.testing.assert_close(plain, masked, atol=1e-5, rtol=1e-5)
    unmasked = information_maps(adapter, pixels, text, gens(), cfg, padded)
    assert (unmasked - plain).abs().max() > 1e-4   # the same rows unmasked do count


# --------------------------------------------------------------------------- the contrast matters

def test_contrastive_map_changes_with_the_contrast_set(adapter, images):
    cfg = M2IBConfig(**CONTRASTIVE)
    one = saliency_maps(adapter, images[:1], "brain tumor", cfg, contrast=["normal brain"])[0]
    other = saliency_maps(adapter, images[:1], "brain tumor", cfg,
                          contrast=["liver", "lung nodule", "cyst"])[0]
    assert np.abs(one - other).max() > 1e-2
    published = saliency_maps(adapter, images[:1], "brain tumor", M2IBConfig(**FAST))[0]
    assert np.abs(one - published).max() > 1e-2
    warmer = saliency_maps(adapter, images[:1], "brain tumor",
                           M2IBConfig(**CONTRASTIVE, temperature=1.0), contrast=["normal brain"])[0]
    assert np.abs(one - warmer).max() > 1e-3


def test_own_prompt_and_duplicates_are_dropped_from_the_contrasts(adapter, images):
    lists = contrast_lists(["tumor", "normal", "mass", "normal"], ["tumor", ["mass", "tumor"]],
                           ["a", "b"])
    assert lists == [["normal", "mass"], ["normal"]]
    # one list of all findings serves every image: its own prompt is not its contrast
    cfg = M2IBConfig(**CONTRASTIVE)
    with_own = saliency_maps(adapter, images[:1], "brain tumor", cfg,
                             contrast=["brain tumor", "normal brain", "normal brain"])[0]
    without = saliency_maps(adapter, images[:1], "brain tumor", cfg, contrast=["normal brain"])[0]
    np.testing.assert_array_equal(with_own, without)
    emb, mask = contrast_embeddings(adapter, [["a"], ["b", "c", "a"]])
    assert emb.shape[:2] == (2, 3) and mask.tolist() == [[True, False, False], [True] * 3]
    assert (emb[0, 1:] == 0).all()
    torch.testing.assert_close(emb[1, 2], emb[0, 0])


# --------------------------------------------------------------------------- published unchanged

def _published_reference(adapter, pixels, text, generators, cfg):
    """The published objective's information map written out from docs/m2ib.md steps 1-6
    (the computation before the contrastive objective existed)."""
    r = adapter.run_blocks(adapter.embed(pixels), 0, cfg.layer + 1).float()
    b, t, c = r.shape
    patches = r[:, adapter.num_prefix_tokens:]
    mu = patches.mean(dim=1, keepdim=True)
    sd = patches.std(dim=1, keepdim=True).clamp_min(m2ib.STD_EPS)
    rs = (r - mu) / sd
    sigma, s = cfg.noise_scale, cfg.samples
    alpha = torch.full_like(r, cfg.alpha_init).requires_grad_(True)
    optimizer = torch.optim.Adam([alpha], lr=cfg.lr)
    for _ in range(cfg.steps):
        optimizer.zero_grad(set_to_none=True)
        noise = torch.stack([torch.randn((s, t, c), generator=g) for g in generators])
        lam, keep = torch.sigmoid(alpha)[:, None], torch.sigmoid(-alpha)[:, None]
        z = (lam * rs[:, None] + keep * sigma * noise) * sd[:, None] + mu[:, None]
        emb = adapter.pool(adapter.run_blocks(z.reshape(b * s, t, c), cfg.layer + 1,
                                              adapter.depth))
        cos = (emb.float().reshape(b, s, -1) * text[:, None]).sum(-1)
        loss = cfg.beta * kl_per_element(alpha, rs, sigma).mean(dim=(1, 2)) - cos.mean(dim=1)
        loss.sum().backward()
        optimizer.step()
    with torch.no_grad():
        info = kl_per_element(alpha, rs, sigma)[:, adapter.num_prefix_tokens:].sum(-1)
    return info.reshape(b, *adapter.grid)


def test_published_objective_is_bit_for_bit_the_published_formula(adapter, images):
    cfg = M2IBConfig(layer=2, steps=3, samples=2, beta=0.1, noise_scale=0.7, standardize=True)
    pixels, text, gens = _inputs(adapter, images, PROMPTS)
    ours = information_maps(adapter, pixels, text, gens, cfg)
    _, _, gens = _inputs(adapter, images, PROMPTS)
    reference = _published_reference(adapter, pixels, text, gens, cfg)
    assert torch.equal(ours, reference)
    # the default objective is the published one, and its settings dict is unchanged
    explicit = saliency_maps(adapter, images, PROMPTS, M2IBConfig(**FAST, objective="published",
                                                                temperature=0.5))
    for a, b in zip(saliency_maps(adapter, images, PROMPTS, M2IBConfig(**FAST)), explicit):
        np.testing.assert_array_equal(a, b)
    assert "objective" not in M2IBConfig().to_dict() and "temperature" not in M2IBConfig().to_dict()


# --------------------------------------------------------------------------- errors and config

def test_contrast_with_the_published_objective_is_an_error(adapter, images):
    with pytest.raises(DataError, match="objective is 'published'.*contrastive"):
        saliency_maps(adapter, images[:1], "tumor", M2IBConfig(**FAST), contrast=["normal"])
    pixels, text, gens = _inputs(adapter, images[:1], ["tumor"])
    with pytest.raises(DataError, match="does not use them"):
        information_maps(adapter, pixels, text, gens, M2IBConfig(**FAST),
                         adapter.embed_prompts(["normal"])[None])


def test_contrastive_without_contrast_prompts_is_an_error(adapter, images):
    with pytest.raises(DataError, match="needs contrast prompts.*normal"):
        saliency_maps(adapter, images[:1], "tumor", M2IBConfig(**CONTRASTIVE))
    with pytest.raises(DataError, match="needs contrast prompts"):
        saliency_maps(adapter, [], [], M2IBConfig(**CONTRASTIVE))
    pixels, text, gens = _inputs(adapter, images[:1], ["tumor"])
    with pytest.raises(DataError, match="needs contrast prompts"):
        information_maps(adapter, pixels, text, gens, M2IBConfig(**CONTRASTIVE))
    with pytest.raises(DataError, match="needs contrast prompts"):
        presence_scores(adapter, images[:1], "tumor", None)


@pytest.mark.parametrize("contrast, match", [
    ([], "has no contrast prompts"), (["tumor"], "no contrast prompt other than"),
    ([["normal"], ["cyst"]], "3 images but 2 contrast lists"),
    (["normal", ["cyst"]], "not a mix"), ("normal", "must be a list"),
    ([["normal"], [""], ["cyst"]], "non-empty string")])
def test_bad_contrast_prompts(adapter, images, contrast, match):
    with pytest.raises(DataError, match=match):
        saliency_maps(adapter, images, "tumor", M2IBConfig(**CONTRASTIVE), contrast=contrast)


def test_bad_contrast_tensors(adapter, images):
    pixels, text, gens = _inputs(adapter, images[:2], ["tumor", "mass"])
    cfg = M2IBConfig(**CONTRASTIVE)
    c = adapter.embed_prompts(["normal", "cyst"])
    with pytest.raises(DataError, match=r"contrast must be \(B, K, D\)"):
        information_maps(adapter, pixels, text, gens, cfg, c)
    with pytest.raises(DataError, match="contrast_mask must be"):
        information_maps(adapter, pixels, text, gens, cfg, c[None].repeat(2, 1, 1),
                         torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(DataError, match="at least one contrast"):
        information_maps(adapter, pixels, text, gens, cfg, c[None].repeat(2, 1, 1),
                         torch.tensor([[True, False], [False, False]]))


def test_objective_and_temperature_settings():
    with pytest.raises(DataError, match="--objective 'contrastive' \\(published: 'published'\\)"):
        M2IBConfig(objective="contrastive").published()
    assert M2IBConfig().published().objective == "published"
    for bad in ({"objective": "clip"}, {"temperature": 0.0}, {"temperature": float("nan")},
                {"temperature": True}):
        with pytest.raises(DataError):
            M2IBConfig(**bad).validate()
    cfg = M2IBConfig(objective="contrastive", temperature=0.05)
    assert cfg.to_dict()["objective"] == "contrastive" and cfg.to_dict()["temperature"] == 0.05
    assert M2IBConfig.from_dict(cfg.to_dict()) == cfg
    assert M2IBConfig.from_dict(M2IBConfig(layer=2).to_dict()) == M2IBConfig(layer=2)


# --------------------------------------------------------------------------- presence score

def test_presence_score_is_higher_for_the_prompt_nearer_the_image(adapter, images, monkeypatch):
    with torch.no_grad():
        emb = adapter.encode_image(torch.stack([adapter.prepare(im)[0] for im in images]))
    # constructed prompts: "near" is the image's own embedding tilted a little, "far" its
    # opposite; "other" a random direction. Set in the adapter's text cache.
    g = torch.Generator().manual_seed(0)
    other = F.normalize(torch.randn(emb.shape[1], generator=g), dim=0)
    for i, e in enumerate(emb):
        adapter._text_cache[f"near {i}"] = F.normalize(e + 0.3 * other, dim=0)
        adapter._text_cache[f"far {i}"] = -e
    adapter._text_cache["other"] = other
    n = len(images)
    near = presence_scores(adapter, images, [f"near {i}" for i in range(n)],
                           [[f"far {i}", "other"] for i in range(n)], temperature=0.1)
    far = presence_scores(adapter, images, [f"far {i}" for i in range(n)],
                          [[f"near {i}", "other"] for i in range(n)], temperature=0.1)
    assert near.shape == (n,) and near.dtype == np.float64
    assert (near > far).all() and (near <= 0).all() and (near > np.log(1 / 3)).all()
    # the log-softmax by hand, for image 0
    cos = torch.stack([adapter._text_cache[k] for k in ("near 0", "far 0", "other")]) @ emb[0]
    assert near[0] == pytest.approx(float(torch.log_softmax(cos / 0.1, 0)[0]), abs=1e-5)
    # a prompt that the image cannot tell from its only contrast scores log(1/2)
    adapter._text_cache["twin"] = other
    tie = presence_scores(adapter, images[:1], "other", ["twin"], temperature=0.1)
    assert tie[0] == pytest.approx(np.log(0.5), abs=1e-6)
    # batched equals one at a time, whatever the chunk size
    monkeypatch.setattr(m2ib_contrast, "PRESENCE_BATCH", 2)
    singles = [presence_scores(adapter, [im], [f"near {i}"], [[f"far {i}", "other"]],
                               temperature=0.1)[0] for i, im in enumerate(images)]
    np.testing.assert_allclose(near, singles, atol=1e-6)


# --------------------------------------------------------------------------- text gradient share

def test_text_gradient_share_in_unit_interval_and_grows_as_beta_shrinks(adapter, images):
    pixels, text, _ = _inputs(adapter, images, ["brain tumor"] * 3)
    c, mask = contrast_embeddings(adapter, [["normal brain", "cyst"]] * 3)
    for objective, contrast in (("published", {}), ("contrastive", {"contrast": c,
                                                                    "contrast_mask": mask})):
        shares = []
        for beta in (1.0, 0.1, 0.01):
            _, _, gens = _inputs(adapter, images, ["brain tumor"] * 3)
            cfg = M2IBConfig(layer=1, samples=4, beta=beta, objective=objective)
            shares.append(text_gradient_share(adapter, pixels, text, gens, cfg, **contrast))
        assert all(0.0 < s < 1.0 for s in shares), (objective, shares)
        assert shares[0] < shares[1] < shares[2], (objective, shares)
        _, _, gens = _inputs(adapter, images, ["brain tumor"] * 3)
        alone = text_gradient_share(adapter, pixels, text, gens,
                                    M2IBConfig(layer=1, samples=4, beta=0.0, objective=objective),
                                    **contrast)
        assert alone == 1.0


def test_text_term_rewards_the_prompt_over_the_contrasts():
    g = torch.Generator().manual_seed(0)
    t, c1, c2 = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    text, contrast = t[None], torch.stack([c1, c2])[None]                  # (1, D), (1, 2, D)
    mask = torch.ones(1, 2, dtype=torch.bool)
    emb = torch.stack([t, c1, F.normalize(t + c1, dim=0)])[None]          # (1, S=3, D)
    cfg = M2IBConfig(objective="contrastive", temperature=0.2)
    gain = m2ib.text_term(emb, text, cfg, contrast, mask)[0]
    assert gain[0] > gain[2] > gain[1] and (gain <= 0).all()
    logits = torch.stack([emb[0] @ t, emb[0] @ c1, emb[0] @ c2], dim=-1) / 0.2
    torch.testing.assert_close(gain, 0.2 * torch.log_softmax(logits, -1)[:, 0])
    published = m2ib.text_term(emb, text, M2IBConfig(), None, None)[0]
    torch.testing.assert_close(published, emb[0] @ t)
