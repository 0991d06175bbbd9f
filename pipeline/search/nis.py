"""Neural Input Search, NIS-ME variant (Joglekar et al., KDD'20): a REINFORCE controller
over the embedding-block grid (``nis_grid.py``), trained against a weight-sharing supernet.

The supernet is the DNIS task (``dnis.DNISTask``) on an α-EBC whose α is never learned:
``NISSearch`` (a loop step hook) sets it to the 0/1 mask of the architecture sampled for
the current episode, so the mask multiplies the pooled rows exactly as DNIS's α does.
The loader adds validation rows every ``steps_per_episode`` steps (DNIS's α steps); the
task's validation loss on them, at the episode's mask, is the episode's reward signal
(its α gradient is not used). The first ``warmup_steps`` train with every block on.

Every rank holds the same controller: the same seed, and rewards averaged over ranks
before the update, so all ranks sample the same architectures and take the same steps.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from pipeline.config import NISConfig
from pipeline.search.nis_grid import BlockGrid


class NISController:
    """One independent softmax over ``0..S`` dim blocks per α row; REINFORCE with an
    exponential-moving-average baseline and Adam.

    Example:
        >>> c = NISController(num_rows=2, dim_blocks=4, lr=0.1, baseline_decay=0.9, seed=0)
        >>> arch = c.sample()
        >>> arch.shape, bool(((arch >= 0) & (arch <= 4)).all())
        (torch.Size([2]), True)
        >>> c.update(arch, reward=-0.5)  # the first reward sets the baseline: advantage 0
        0.0
    """

    def __init__(self, num_rows: int, dim_blocks: int, lr: float, baseline_decay: float, seed: int) -> None:
        self.logits = torch.zeros(num_rows, dim_blocks + 1, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.logits], lr=lr)
        self.baseline_decay = baseline_decay
        self.baseline: Optional[float] = None
        # Its own generator: the sampled architectures do not depend on the model's RNG use.
        self.generator = torch.Generator().manual_seed(seed)

    def log_probs(self) -> torch.Tensor:
        return torch.log_softmax(self.logits.detach(), dim=1)

    def sample(self) -> torch.Tensor:
        """``[rows]`` dim blocks per α row, drawn from the controller's softmaxes."""
        return torch.multinomial(self.log_probs().exp(), 1, generator=self.generator).squeeze(1)

    def update(self, arch: torch.Tensor, reward: float) -> float:
        """One REINFORCE step for ``arch``; returns the advantage ``reward - baseline``."""
        if self.baseline is None:
            self.baseline = reward
        advantage = reward - self.baseline
        log_prob = torch.log_softmax(self.logits, dim=1).gather(1, arch.view(-1, 1)).sum()
        self.optimizer.zero_grad()
        (-advantage * log_prob).backward()
        self.optimizer.step()
        self.baseline = self.baseline_decay * self.baseline + (1 - self.baseline_decay) * reward
        return advantage

    def state_dict(self) -> dict:
        """A copy: Adam's own ``state_dict`` hands out its live moment tensors."""
        return {
            "logits": self.logits.detach().clone(), "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "baseline": self.baseline, "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.logits.copy_(state["logits"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline = state["baseline"]
        self.generator.set_state(state["generator"])


class EpisodeLog:
    """``nis.jsonl``: one JSON line per episode (the reward curve); ``None`` path writes
    nothing (ranks other than 0)."""

    def __init__(self, path: Optional[Path]) -> None:
        self.path = path

    def append(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def keep_until(self, step: int) -> None:
        """Drop episodes after ``step`` (a resumed run replays them)."""
        if self.path is None or not self.path.is_file():
            return
        lines = [l for l in self.path.read_text().splitlines() if json.loads(l)["step"] <= step]
        self.path.write_text("".join(l + "\n" for l in lines))


class NISSearch:
    """Loop hook: warm-up, then per episode sample an architecture, set α to its mask,
    and after the episode's validation rows reward it and update the controller.

    reward = −(validation logloss under the architecture) − λ·max(0, bytes/budget − 1).

    Args:
        controller: the policy (identical on every rank).
        grid: the search space (bytes of an architecture).
        alpha: the supernet α-EBC's α (``requires_grad=False``); overwritten with masks.
        cfg: warm-up, cost weight λ, target CR.
        all_reduce_mean: averages a tensor over ranks (identity on one process).
        log: where episodes go.
    """

    def __init__(
        self,
        controller: NISController,
        grid: BlockGrid,
        alpha: nn.Parameter,
        cfg: NISConfig,
        all_reduce_mean: Callable[[torch.Tensor], torch.Tensor],
        log: EpisodeLog,
    ) -> None:
        self.controller = controller
        self.grid = grid
        self.alpha = alpha
        self.cfg = cfg
        self.budget = grid.budget(cfg.target_cr)
        self.all_reduce_mean = all_reduce_mean
        self.log = log
        self.steps = 0
        self.episodes = 0
        self.arch: Optional[torch.Tensor] = None  # None during warm-up
        self.last_reward: Optional[float] = None

    def reward(self, val_loss: float, arch) -> tuple[float, int]:
        """The reward of ``arch`` and its bytes."""
        size = self.grid.bytes(arch)
        return -val_loss - self.cfg.cost_weight * max(0.0, size / self.budget - 1.0), size

    def after_step(self, outputs: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        if "val_loss" not in outputs:
            return
        if self.arch is not None:
            val_loss = float(self.all_reduce_mean(outputs["val_loss"].detach().clone().reshape(1)))
            reward, size = self.reward(val_loss, self.arch.numpy())
            baseline = self.controller.baseline
            self.controller.update(self.arch, reward)
            self.episodes += 1
            self.last_reward = reward
            self.log.append({
                "episode": self.episodes, "step": self.steps, "arch": self.arch.tolist(),
                "val_loss": val_loss, "bytes": size, "reward": reward,
                "baseline": reward if baseline is None else baseline,
            })
        if self.steps >= self.cfg.warmup_steps:
            self.arch = self.controller.sample()
            with torch.no_grad():
                self.alpha.copy_(self.grid.mask(self.arch))

    def metrics(self) -> dict:
        """Episodes so far, the last reward and the controller's baseline."""
        return {"nis_episodes": self.episodes, "nis_reward": self.last_reward, "nis_baseline": self.controller.baseline}

    def state_dict(self) -> dict:
        return {
            "controller": self.controller.state_dict(), "steps": self.steps, "episodes": self.episodes,
            "arch": self.arch, "last_reward": self.last_reward,
        }

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])
        self.steps, self.episodes = state["steps"], state["episodes"]
        self.arch, self.last_reward = state["arch"], state["last_reward"]
        self.log.keep_until(self.steps)
