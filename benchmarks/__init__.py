"""Speed harness: our train/eval steps, BatchNorm options and input pipeline, side by side
with the anchors in ../shared/anchors (see benchmarks/RESULTS.md and run_side_by_side.sh)."""
