#!/usr/bin/env bash
# dnis_shared_half_pca after the knapsack prices learned projections per step
# (pipeline/prune/knapsack.py, greedy_rungs): the same float32 1M searches as
# ../compare_1m_thin_slabs/final_code/, both worlds, 3 seeds, CR 10 and 20, into runs/cmp1m/out_projcost.
exec bash "$(dirname "$0")/../compare_1m_thin_slabs/merge.sh" out_projcost
