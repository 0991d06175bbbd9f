#!/usr/bin/env bash
# dnis_shared_half_pca on the final code of session 14 (thin-slab merge reverted): merge.sh into out_final.
exec bash "$(dirname "$0")/../merge.sh" out_final
