"""The ``preprocess`` TorchX component on 2 local ranks writes what one process writes."""

from __future__ import annotations

import pytest

from launch_helpers import preprocess_component
from pipeline.data import preprocess
from pipeline.data.schema import SPLITS
from tests.test_preprocess import dataset_tables, make_lines, stable_meta, write


@pytest.mark.multirank
def test_torchx_two_ranks_equal_one_process(tmp_path):
    # three inputs with a bad row each: chunks split over both ranks, rejects merged
    inputs = []
    for i in range(3):
        lines = make_lines(700, seed=i)
        lines[10 * i + 5] = "1\tnot a row"
        inputs.append(write(tmp_path / f"part{i}.txt", lines))
    preprocess.main(["--output", str(tmp_path / "one"), "--dataset", "synthetic", "--min-count", "2",
                     "--no-progress", *inputs])
    preprocess_component(tmp_path / "two", inputs, dataset="synthetic", min_count=2)
    one, two = tmp_path / "one", tmp_path / "two"
    assert stable_meta(one) == stable_meta(two)
    assert preprocess.DatasetMeta.load(one).files == preprocess.DatasetMeta.load(two).files
    a, b = dataset_tables(one), dataset_tables(two)
    assert all(a[s].equals(b[s]) for s in SPLITS)
    assert (one / "rejects.tsv").read_text() == (two / "rejects.tsv").read_text()
    assert preprocess.DatasetMeta.load(two).rows["rejected"] == 3
