//! The benchmark harness: runs ours and the baseline alternately in one run and writes ratios
//! to `bench/results/latest.json`. Scenarios arrive with the features they measure.
