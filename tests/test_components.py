"""The TorchX components: valid for ``torchx run`` and running the right modules."""

from __future__ import annotations

from torchx.components.component_test_base import ComponentTestCase

import launch.components as components


class ComponentsTest(ComponentTestCase):
    def test_validate(self) -> None:
        for name in ("preprocess", "train", "search", "evaluate", "prune", "retrain"):
            self.validate(components, name)

    def test_search_runs_the_search_module_on_nproc_ranks(self) -> None:
        app = components.search("configs/tiny.yaml", overrides=["train.max_steps=5"], nproc=3)
        command = app.roles[0].args[-1]
        self.assertIn("--nproc_per_node 3", command)
        self.assertIn("-m launch.search --config configs/tiny.yaml --set train.max_steps=5", command)
        self.assertNotIn("--resume", command)
        self.assertIn("--resume", components.train("c.yaml", resume=True).roles[0].args[-1])

    def test_preprocess_passes_every_option(self) -> None:
        app = components.preprocess("out", ["a.txt", "b.txt"], dataset="criteo_1tb", min_count=3, strict=True,
                                    memory_mb=256, row_group_rows=200000)
        command = app.roles[0].args[-1]
        self.assertIn("-m launch.preprocess --output out --dataset criteo_1tb --min-count 3", command)
        self.assertIn("--memory-mb 256 --row-group-rows 200000", command)
        self.assertTrue(command.endswith("--strict a.txt b.txt"))
