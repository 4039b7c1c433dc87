"""Pre-flight estimate of a training run: peak memory per device and optimizer steps.

estimator (the model of memory and steps), shape (what it reads: `TrainShape`), activations
(per-layer saved tensors), knobs (its constants), sources (inputs from a config file, for
scripts/estimate.py), measure (a measured peak on a CUDA GPU). It imports no training code: the
trainer, the scripts and the reports all call it."""
