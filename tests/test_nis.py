"""NIS-ME baseline: the mask is DNIS's α set by hand, the final architecture fits its
budget, and the controller learns on 2 ranks (a controller that never updates does not)."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from torchx.components.component_test_base import ComponentTestCase

import launch.components as components
from launch_helpers import TINY, finish, torchrun
from pipeline.config import load_config
from pipeline.search.nis import NISController
from pipeline.search.nis_grid import BlockGrid, most_probable_within_budget
from plans.structured import WIDTH_MULTIPLE, StructuredPlan
from search_fixtures import CASES, K, NUM_BLOCKS, build_task, case_blocking, make_batch

DIM_BLOCKS = 4
TARGET_CR = 8


def grid_for(case: str) -> BlockGrid:
    return BlockGrid.build(case_blocking(case), CASES[case]["nums"], K, DIM_BLOCKS)


def test_mask_equals_alpha_ebc_with_that_alpha_set_by_hand():
    arch = torch.tensor([4, 1, 0])
    for case in CASES:
        masked, by_hand = build_task(case, torch.device("cpu")), build_task(case, torch.device("cpu"))
        with torch.no_grad():
            masked.model.embedding.alpha.copy_(grid_for(case).mask(arch))
            by_hand.model.embedding.alpha.zero_()
            for block, dims in enumerate(arch.tolist()):
                by_hand.model.embedding.alpha[block, : dims * K // DIM_BLOCKS] = 1.0
        batch = make_batch(case, seed=5)
        got = masked.model.embedding(batch.sparse)
        assert torch.equal(got, by_hand.model.embedding(batch.sparse)), case
        masked.eval(), by_hand.eval()
        assert torch.equal(masked(batch)[1]["logits"], by_hand(batch)[1]["logits"]), case
        if not CASES[case]["multi"]:  # a bag's columns past its block's width are exactly 0
            blocks = masked.model.embedding.lookup(batch.sparse).blocks
            widths = arch[blocks] * K // DIM_BLOCKS
            assert (got[torch.arange(K).view(1, 1, -1) >= widths.unsqueeze(-1)] == 0).all()


def test_final_architecture_is_the_most_probable_one_within_budget():
    grid = grid_for("single")
    probs = torch.tensor([[0.1, 0.1, 0.1, 0.1, 0.6], [0.1, 0.1, 0.2, 0.1, 0.5], [0.0, 0.1, 0.1, 0.1, 0.7]])
    log_probs = (probs + 1e-9).log()
    assert most_probable_within_budget(grid, log_probs, grid.bytes([4, 4, 4])).tolist() == [4, 4, 4]
    budget = grid.budget(TARGET_CR)
    arch = most_probable_within_budget(grid, log_probs, budget)
    assert grid.bytes(arch) <= budget < grid.bytes(probs.argmax(1).numpy())
    plan = grid.plan(arch)
    assert plan.embedding_bytes("learned") == grid.bytes(arch)
    assert all(g.width % WIDTH_MULTIPLE == 0 and g.width <= K and g.columns == tuple(range(g.width))
               for g in plan.groups)
    with pytest.raises(ValueError, match="no architecture fits"):
        most_probable_within_budget(grid, log_probs, budget=1)
    with pytest.raises(ValueError, match="multiple of 4"):
        BlockGrid.build(case_blocking("single"), CASES["single"]["nums"], K, dim_blocks=8)


def test_controller_state_round_trips_so_a_resume_samples_the_same():
    first = NISController(NUM_BLOCKS, DIM_BLOCKS, lr=0.1, baseline_decay=0.9, seed=1)
    for reward in (-1.0, -0.5, -2.0):
        first.update(first.sample(), reward)
    second = NISController(NUM_BLOCKS, DIM_BLOCKS, lr=0.1, baseline_decay=0.9, seed=7)
    second.load_state_dict(first.state_dict())
    for reward in (-0.3, -0.1):
        a, b = first.sample(), second.sample()
        assert torch.equal(a, b)
        first.update(a, reward), second.update(b, reward)
    assert torch.equal(first.logits, second.logits) and first.baseline == second.baseline


def learned(rewards: list[float]) -> bool:
    """The last quarter's mean reward beats the first quarter's by two standard errors."""
    n = len(rewards) // 4
    first, last = rewards[:n], rewards[-n:]
    stderr = (statistics.variance(first) / n + statistics.variance(last) / n) ** 0.5
    return statistics.mean(last) - statistics.mean(first) > 2 * stderr


def nis_run(dataset, run_dir, nproc: int, *extra: str) -> tuple[list[dict], dict]:
    finish(torchrun(
        "launch.nis", "--config", TINY, "--set", f"data.path={dataset}", "--set", f"run.dir={run_dir}",
        "--set", "train.epochs=2", "--set", "train.max_steps=75", "--set", "train.eval_every=50",
        "--set", "train.checkpoint_every=50", "--set", "train.patience=100", "--set", "nis.warmup_steps=20",
        "--cr", str(TARGET_CR), "--no-progress", *extra, nproc=nproc,
    ))
    episodes = [json.loads(line) for line in (run_dir / "nis.jsonl").read_text().splitlines()]
    return episodes, json.loads((run_dir / "nis.json").read_text())


@pytest.mark.multirank
def test_controller_learns_on_two_ranks_within_budget(dataset, tmp_path):
    episodes, summary = nis_run(dataset, tmp_path / "nis", 2)
    assert summary["ranks_agree"]  # logits and sampler state equal on both ranks
    assert len(episodes) == summary["episodes"] > 100
    assert [e["step"] for e in episodes] == list(range(21, 21 + len(episodes)))
    assert learned([e["reward"] for e in episodes])

    pruned = json.loads((tmp_path / "nis" / "prune.json").read_text())
    plan = StructuredPlan.from_json(pruned["plan"])
    assert pruned["projection"] == "learned" and pruned["method"] == "nis"
    assert plan.embedding_bytes("learned") <= plan.unpruned_bytes() / TARGET_CR
    assert pruned["compression_ratio"]["learned"] == pytest.approx(summary["compression_ratio"])
    assert all(g.width % WIDTH_MULTIPLE == 0 and g.width <= plan.embedding_dim for g in plan.groups)
    assert summary["architecture"] == pruned["architecture"]
    # The reward is the validation loss itself: never taken in bfloat16.
    assert load_config([tmp_path / "nis" / "config.yaml"]).search.alpha_grad_dtype == "float32"


@pytest.mark.multirank
def test_a_controller_that_never_updates_does_not_pass_for_learning(dataset, tmp_path):
    frozen, _ = nis_run(dataset, tmp_path / "frozen", 1, "--set", "nis.controller_lr=0")
    assert len(frozen) > 100 and not learned([e["reward"] for e in frozen])


class NISComponentTest(ComponentTestCase):
    def test_nis_component_runs_launch_nis_with_its_target(self) -> None:
        self.validate(components, "nis")
        command = components.nis("configs/tiny.yaml", cr=8.0, overrides=["nis.dim_blocks=2"], nproc=3).roles[0].args[-1]
        self.assertIn("--nproc_per_node 3", command)
        self.assertIn("-m launch.nis --config configs/tiny.yaml --set nis.dim_blocks=2 --set nis.target_cr=8.0", command)
