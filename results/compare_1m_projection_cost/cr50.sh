#!/usr/bin/env bash
# The same as rerun.sh at CR 50 (into the same runs/cmp1m/out_projcost, from the same
# searches): the shipped method's CR 50 cells, beside ../compare_1m_cr50/'s baselines.
CRS=50 exec bash "$(dirname "$0")/../compare_1m_thin_slabs/merge.sh" out_projcost
