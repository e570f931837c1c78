"""Head-level interventions: specs as data, applied on both capture paths, with an evaluation
loop (metric with and without, bootstrap confidence interval, matched random-head control)."""
