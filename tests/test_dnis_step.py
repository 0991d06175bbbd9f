"""DNIS by hand: eq. 4 (α scaling), eq. 8 (normalisation), one first-order step."""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import binary_cross_entropy_with_logits as bce
from torchrec.sparse.jagged_tensor import KeyedTensor

from pipeline.search.dnis import AlphaUpdater, autocast_for, normalize_rows
from search_fixtures import CASES, TRAIN_ROWS, build_task, case_blocking, make_batch


def hand_alpha_embeddings(task, batch, alpha):
    """Σ_i e_i ⊙ α[block(i)] per (row, field), with Python loops over the raw ids."""
    embedding = task.model.embedding
    blocking = case_blocking_for(task)
    tables = {c.feature_names[0].split("@")[0]: embedding.ebc.embedding_bags[c.name].weight
              for c in embedding.ebc.embedding_bag_configs()}
    per_key = batch.sparse.to_dict()
    rows = batch.size
    out = torch.zeros(rows, len(embedding.keys), embedding.embedding_dim)
    for f, key in enumerate(embedding.keys):
        parts = [k for k in per_key if k == key or k.startswith(key + "@")]
        for part in parts:
            jt = per_key[part]
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), jt.lengths().cumsum(0)])
            weights = jt.weights_or_none()
            for r in range(rows):
                for j in range(int(offsets[r]), int(offsets[r + 1])):
                    i = int(jt.values()[j])
                    w = 1.0 if weights is None else float(weights[j])
                    block = int(blocking.block_of(key, [i])[0])
                    out[r, f] += w * tables[key][i] * alpha[block]
    return out


def case_blocking_for(task):
    keys = tuple(task.model.embedding.keys)
    return next(case_blocking(c) for c in CASES if tuple(CASES[c]["nums"]) == keys)


def test_alpha_ebc_output_is_eq4_for_every_case():
    for case in CASES:
        task = build_task(case, torch.device("cpu"))
        alpha = task.model.embedding.alpha
        alpha.data = torch.rand_like(alpha)
        batch = make_batch(case, seed=3)
        got = task.model.embedding(batch.sparse)
        want = hand_alpha_embeddings(task, batch, alpha)
        assert torch.allclose(got, want, atol=1e-6), case


def test_blocks_follow_frequency_ranks():
    blocking = case_blocking("single")
    # ids are frequency ranks: blocks never decrease with the id, and cover 0..L-1.
    for key, n in CASES["single"]["nums"].items():
        blocks = blocking.block_of(key, list(range(n)))
        assert (blocks[1:] >= blocks[:-1]).all()
    assert sum(blocking.block_features) == sum(CASES["single"]["nums"].values())


def test_normalisation_is_eq8():
    g = torch.randn(6, 16)
    eps = 1e-7
    want = torch.empty_like(g)
    for l in range(g.shape[0]):
        denom = sum(abs(float(g[l, k])) for k in range(g.shape[1])) / g.shape[1] + eps
        for k in range(g.shape[1]):
            want[l, k] = g[l, k] / denom
    assert torch.allclose(normalize_rows(g, eps), want, atol=1e-6)


def test_first_order_step_matches_finite_differences_and_adam_by_hand():
    torch.manual_seed(0)
    task = build_task("single", torch.device("cpu"), model_name="fm")
    task.train()
    batch = make_batch("single", seed=5, rows=TRAIN_ROWS + 8)
    embedding = task.model.embedding
    tables_before = {n: p.clone() for n, p in task.named_parameters() if "embedding_bags" in n}
    loss, out = task(batch)

    # Train loss: the model on α-scaled train rows (α = 1 at the start).
    logits = task.model.interact(batch.dense[:TRAIN_ROWS], embedding(batch.sparse)[:TRAIN_ROWS])
    assert torch.allclose(loss, bce(logits, batch.labels[:TRAIN_ROWS]), atol=1e-6)

    # ∂L_val/∂α by central differences on the validation rows, at the pre-update Θ.
    def val_loss(alpha):
        with torch.no_grad():
            emb = hand_alpha_embeddings(task, batch, alpha)[TRAIN_ROWS:]
            return bce(task.model.interact(batch.dense[TRAIN_ROWS:], emb), batch.labels[TRAIN_ROWS:])

    alpha0 = embedding.alpha.detach().clone().double()
    h = 1e-3
    numeric = torch.zeros_like(alpha0)
    for l in range(alpha0.shape[0]):
        for k in range(alpha0.shape[1]):
            up, down = alpha0.clone(), alpha0.clone()
            up[l, k] += h
            down[l, k] -= h
            numeric[l, k] = (val_loss(up.float()) - val_loss(down.float())) / (2 * h)
    assert torch.allclose(out["grad_alpha"].double(), numeric, atol=2e-4)
    assert abs(out["val_loss"].item() - val_loss(alpha0.float()).item()) < 1e-6

    # The α part of the step took no table gradient.
    for name, p in task.named_parameters():
        if "embedding_bags" in name:
            assert p.grad is None and torch.equal(p, tables_before[name])

    # α update by hand: eq. 8, then Adam's first step (m̂ = g, v̂ = g²), then clip to [0, 1].
    lr = 1e-2
    g = out["grad_alpha"]
    gn = g / (g.abs().mean(dim=1, keepdim=True) + 1e-7)
    want = (1.0 - lr * gn / (gn.abs() + 1e-8)).clamp(0, 1)
    AlphaUpdater(embedding.alpha, lr).step(g)
    assert torch.allclose(embedding.alpha, want, atol=1e-6)
    assert (embedding.alpha < 1).any() and (embedding.alpha <= 1).all()


def unfused_step(task, batch, n):
    """The search step as plain autograd ops (TorchRec's regroup, row slices, products):
    the formulation the fused ``scaled_fields`` path must reproduce bit for bit."""
    embedding = task.model.embedding
    pooled = KeyedTensor.regroup([embedding.ebc(batch.sparse)], [embedding._feature_names])[0]
    fields = pooled.view(batch.size, -1, embedding.embedding_dim)
    blocks = embedding.lookup(batch.sparse).blocks

    def scaled(rows, alpha):
        out = fields[rows] * alpha[blocks[rows]]
        if not embedding.multi_keys:
            return out
        num_single = len(embedding.single_keys)
        multi = out[:, num_single:].reshape(out.size(0), len(embedding.multi_keys), -1, out.size(-1))
        multi = multi.sum(2)
        return torch.cat([out[:, :num_single], multi], dim=1)[:, embedding._field_order]

    alpha = embedding.alpha
    train = slice(0, n)
    loss = bce(task.model.interact(batch.dense[:n], scaled(train, alpha)), batch.labels[:n])
    alpha_leaf = alpha.detach().requires_grad_(True)
    fields = fields.detach()
    val_logits = task.model.interact(batch.dense[n:], scaled(slice(n, None), alpha_leaf))
    val_loss = bce(val_logits, batch.labels[n:])
    return loss, val_loss, torch.autograd.grad(val_loss, alpha_leaf)[0]


def test_search_step_is_bitwise_the_unfused_autograd_step():
    for case in CASES:
        results = []
        for fused in (True, False):
            task = build_task(case, torch.device("cpu"))
            task.train()
            alpha = task.model.embedding.alpha
            alpha.data = torch.rand(alpha.shape, generator=torch.Generator().manual_seed(1))
            batch = make_batch(case, seed=7)
            if fused:
                loss, out = task(batch)
                val_loss, grad_alpha = out["val_loss"], out["grad_alpha"]
            else:
                loss, val_loss, grad_alpha = unfused_step(task, batch, TRAIN_ROWS)
            loss.backward()  # table gradients: what the fused optimizer would apply
            grads = [p.grad for p in task.parameters() if p.requires_grad]
            results.append((loss.detach(), val_loss, grad_alpha, *grads))
        for got, want in zip(*results):
            assert torch.equal(got, want), case


def test_alpha_gradient_in_bfloat16_points_where_float32_does():
    """The validation rows' pass under bfloat16 autocast (``search.alpha_grad_dtype``):
    same train loss, α gradient within bfloat16 rounding of float32's, so eq. 8 and Adam
    move α the same way; a wrong name is refused."""
    torch.manual_seed(0)
    task = build_task("single", torch.device("cpu"), model_name="deepfm")
    task.train()
    batch = make_batch("single", seed=5, rows=TRAIN_ROWS + 8)
    loss, out = task(batch)
    task.autocast_device, task.alpha_grad_dtype = autocast_for("bfloat16")
    task.steps_taken = 0
    half_loss, half = task(batch)
    assert torch.equal(loss, half_loss)
    g, h = out["grad_alpha"].flatten(), half["grad_alpha"].flatten()
    assert torch.nn.functional.cosine_similarity(g, h, dim=0) > 0.99
    assert torch.allclose(h, g, atol=0.02 * g.abs().max().item())
    with pytest.raises(ValueError, match="alpha_grad_dtype"):
        autocast_for("float16")
