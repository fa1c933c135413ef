"""The machinery of a training run, which `smptrain.train` drives top to bottom: `prepare` (everything before the
first step), `runs` (opening a run directory: new, or resumed), `layout` (the names inside a run directory),
`checkpoint` (the format, atomic saves, top-k), `tracking` (metrics.jsonl and the trackers), `schedule` (the learning
rate of a step), `divergence` (non-finite guards), `signals` (Ctrl-C and SIGTERM)."""
