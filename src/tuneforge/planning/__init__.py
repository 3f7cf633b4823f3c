"""Plan and compare: predict a run's memory and time before it starts (`tuneforge plan`), and measure the
methods' trade-offs on real runs (`tuneforge compare`).

- estimate.py: parameters, bytes and FLOPs from the config alone (meta device, no weights)
- probe.py: the calibration micro-benchmark (real steps of model cuts; activations, heap growth, time)
- calibrate.py: the process baseline (what a training process costs before its model)
- plan.py: per method x strategy predictions, what fits, the cheapest that does
- measure.py: real runs in fresh processes (peak RSS, step times)
- compare.py: the source document's trade-off table, measured (compare.md + charts)
"""
