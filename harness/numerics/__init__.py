"""The numbers every rank must agree on.

grad_scale.py  THE loss-scale and clipping module: one global non-finite check, one global norm,
               one decision per step, identical on every rank and on every backend
spikes.py      the loss-spike check, decided on the device with the step
precision.py   compute dtypes, and which GPUs can run them
optim.py       AdamW, its parameter groups, the learning-rate schedule and its step count
diagnose.py    naming the tensor or layer behind a skipped step
"""
