"""``dnis plan``: TorchRec's planner for a target cluster, run on this CPU (no devices).

The invariants are computed from table shapes written here, not from the module's own
byte count: the weights on all ranks sum to every table once plus the extra copies of
data-parallel tables, and row-wise Adagrad's state to one float per row likewise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from data_fixtures import VOCAB, write_dataset
from launch import plan as dnis_plan
from pipeline.config import load_config, save_config
from pipeline.data import preprocess
from pipeline.data.schema import NUM_DENSE, NUM_SPARSE
from plans.structured import Group, GroupPlan, StructuredPlan
from sharding.repack import SHARDED_KINDS
from sharding.target_plan import GIB, TargetCluster

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
CRITEO_1TB = str(ROOT / "configs" / "criteo_1tb.yaml")
K_TINY = 16  # configs/tiny.yaml
FLOAT = 4


def run_plan(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "plan.json"
    report = dnis_plan.main([*args, "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    return report


def expected_bytes(plan: dict, shapes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """Weights and row-wise Adagrad state over all ranks, from ``shapes`` (rows, cols)."""
    world = plan["cluster"]["world_size"]
    weights = optimizer = 0
    for table in plan["tables"]:
        rows, cols = shapes[table["table"]]
        copies = world if table["sharding_type"] == "data_parallel" else 1
        weights += copies * rows * cols * FLOAT
        optimizer += copies * rows * FLOAT
    return weights, optimizer


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "data"
    write_dataset(path)
    return path


def tiny_shapes(cols: int = K_TINY) -> dict[str, tuple[int, int]]:
    """Tables of the fixture under ``dense_mode=embedding``: I1..I13 one row, C1..C26 VOCAB rows."""
    shapes = {f"t_I{i}": (1, cols) for i in range(1, NUM_DENSE + 1)}
    shapes.update({f"t_C{i}": (VOCAB, cols) for i in range(1, NUM_SPARSE + 1)})
    return shapes


def test_per_rank_bytes_sum_to_the_tables_of_unpruned_and_search(data, tmp_path):
    report = run_plan(
        tmp_path, "--config", TINY, "--set", f"data.path={data}", "--world-size", "2", "--hbm-gb", "1",
    )
    assert list(report["models"]) == ["unpruned", "search"]
    for name, plan in report["models"].items():
        assert {t["table"] for t in plan["tables"]} == set(tiny_shapes())
        assert len(plan["ranks"]) == 2
        assert all(t["ranks"] and set(t["ranks"]) <= {0, 1} for t in plan["tables"])
        weights, optimizer = expected_bytes(plan, tiny_shapes())
        assert plan["totals"]["weights"] == weights, name
        assert plan["totals"]["optimizer"] == optimizer, name
        # The planner's own estimates hold at least the weights and optimizer state.
        assert plan["totals"]["planner_hbm"] + plan["totals"]["planner_ddr"] >= weights + optimizer
    # The search step's KJT carries the train rows and the validation rows.
    cfg = load_config([TINY])
    assert report["models"]["unpruned"]["batch_size"] == cfg.data.batch_size
    assert report["models"]["search"]["batch_size"] == cfg.data.batch_size + cfg.search.val_batch_size


def test_min_world_size_shrinks_with_more_hbm_and_refuses_when_nothing_fits(tmp_path, capsys):
    # Four 1M-row tables of K=16 (61 MiB each) and no host memory to spill to.
    common = [
        "--config", TINY, "--set", f"data.path={tmp_path / 'absent'}", "--set", "data.dense_mode=mlp",
        "--set", "data.table_sizes=[1000000, 1000000, 1000000, 1000000]",
        "--models", "unpruned", "--ddr-gb", "0", "--min-world-size", "--max-world-size", "64",
    ]
    small = run_plan(tmp_path, *common, "--world-size", "8", "--hbm-gb", "0.1")["models"]["unpruned"]
    large = run_plan(tmp_path, *common, "--world-size", "8", "--hbm-gb", "2")["models"]["unpruned"]
    assert small["capacity_ddr"] == 0 and large["capacity_ddr"] == 0
    assert large["smallest_world_size"] == 1
    assert small["smallest_world_size"] > large["smallest_world_size"]
    assert "smallest world size that fits: 1" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        dnis_plan.main([*common[:-2], "--max-world-size", "2", "--world-size", "2", "--hbm-gb", "0.01"])
    message = str(refused.value)
    assert "\n" not in message and "no plan on any world size up to 2" in message


def test_a_zero_capacity_stays_zero_and_none_takes_torchrecs_default():
    # TorchRec 1.6's Topology turned hbm_cap=0 / ddr_cap=0 into its defaults.
    zero = TargetCluster(3, hbm_gib=0, ddr_gib=0).topology()
    assert [(d.storage.hbm, d.storage.ddr) for d in zero.devices] == [(0, 0)] * 3
    given = TargetCluster(2, hbm_gib=1.5, ddr_gib=2).topology()
    assert [(d.storage.hbm, d.storage.ddr) for d in given.devices] == [(int(1.5 * GIB), 2 * GIB)] * 2
    default = TargetCluster(2).topology()
    assert all(d.storage.hbm > 0 and d.storage.ddr > 0 for d in default.devices)
    cpu = TargetCluster(2, hbm_gib=4, ddr_gib=0, compute_device="cpu").topology()
    assert [(d.storage.hbm, d.storage.ddr) for d in cpu.devices] == [(0, 0)] * 2


def test_repacked_model_plans_from_a_hand_written_prune_plan(data, tmp_path):
    run_dir = tmp_path / "retrain"
    run_dir.mkdir()
    save_config(load_config([TINY], [f"data.path={data}"]), run_dir / "config.yaml")
    plan = StructuredPlan((
        GroupPlan(Group("C1", 0, 0, 10), (0, 1, 2, 3, 4, 5, 6, 7)),
        GroupPlan(Group("C1", 1, 10, 20), (0, 1, 2, 3)),
        GroupPlan(Group("C1", 2, 20, VOCAB), ()),  # dropped: no rows stored
        GroupPlan(Group("C2", 0, 0, VOCAB), tuple(range(8))),
        GroupPlan(Group("I1", 0, 0, 1), (3, 4, 5, 6)),
    ), embedding_dim=K_TINY, tau=0.1)
    (run_dir / "prune.json").write_text(json.dumps({"plan": plan.to_json(), "projection": "selection"}))
    report = run_plan(tmp_path, "--run-dir", str(run_dir), "--world-size", "2", "--hbm-gb", "1")
    assert list(report["models"]) == ["unpruned", "search", "repacked"]
    repacked = report["models"]["repacked"]
    # Column slabs: C1's first 4 columns for ids 0-19, its next 4 for ids 0-9.
    shapes = {"t_C1:0-4": (20, 4), "t_C1:4-8": (10, 4), "t_C2:0-8": (VOCAB, 8), "t_I1:0-4": (1, 4)}
    assert {t["table"]: t["sharding_type"] in SHARDED_KINDS for t in repacked["tables"]} == dict.fromkeys(shapes, True)
    weights, optimizer = expected_bytes(repacked, shapes)
    assert repacked["totals"]["weights"] == weights == sum(r * c * FLOAT for r, c in shapes.values())
    assert repacked["totals"]["optimizer"] == optimizer


def test_criteo_1tb_config_is_mlperf_dcnv2_and_plans_on_8_and_64_gpus_without_data(tmp_path):
    cfg = load_config([CRITEO_1TB])
    assert (cfg.model.name, cfg.model.embedding_dim, cfg.model.cross_layers, cfg.model.cross_rank) == ("dcnv2", 128, 3, 512)
    assert cfg.model.bottom_mlp_dims == (512, 256) and cfg.model.mlp_dims == (1024, 1024, 512, 256)
    assert len(cfg.data.table_sizes) == 26 and max(cfg.data.table_sizes) == 40_000_000
    shapes = {f"t_C{i + 1}": (n, 128) for i, n in enumerate(cfg.data.table_sizes)}
    absent = ["--config", CRITEO_1TB, "--set", f"data.path={tmp_path / 'absent'}", "--models", "unpruned", "--hbm-gb", "80"]
    eight = run_plan(tmp_path, *absent, "--world-size", "8")["models"]["unpruned"]
    assert {t["sharding_type"] for t in eight["tables"]} == {"table_wise"}
    sixty_four = run_plan(tmp_path, *absent, "--world-size", "64", "--set", "data.batch_size=1024")["models"]["unpruned"]
    for plan in (eight, sixty_four):
        assert len(plan["tables"]) == 26
        assert plan["totals"]["weights"] == expected_bytes(plan, shapes)[0]
        assert max(r["planner_hbm"] for r in plan["ranks"]) <= 80 * GIB
    capped = [t for t in sixty_four["tables"] if shapes[t["table"]][0] == 40_000_000]
    assert len(capped) == 5 and all(len(t["ranks"]) > 1 for t in capped)


def test_missing_data_without_table_sizes_is_one_clear_line(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit) as error:
        dnis_plan.main(["--config", TINY, "--set", f"data.path={missing}", "--world-size", "2"])
    message = str(error.value)
    assert "\n" not in message and str(missing) in message and "data.table_sizes" in message


@pytest.mark.parametrize("config", ["criteo_kaggle.yaml", "criteo_1tb.yaml"])
def test_preprocess_command_in_config_comment_parses(config):
    text = (ROOT / "configs" / config).read_text()
    (command,) = re.findall(r"dnis-preprocess (--dataset .+)", text)
    argv = [a for a in command.split() if a != "..."]
    options = preprocess.parse_args(argv, default_workers=1)
    assert options.output.startswith("data/") and options.inputs
