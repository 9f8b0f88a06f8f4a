"""Register a new LLaMA-like family: one line of data, no change to the kernel.

Ministral (transformers' `ministral`) lays out its blocks like LLaMA, with per-layer `layer_types`; flatten
does not ship it. Built here as a tiny random model, since no such checkpoint is on this machine.
"""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from flatten import Architecture, Flattener, register_architecture, verify_architecture

register_architecture(Architecture("ministral"))  # paths and config fields default to LLaMA's names

config = AutoConfig.for_model("ministral", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              intermediate_size=128, num_hidden_layers=6, vocab_size=100)
model = AutoModelForCausalLM.from_config(config).eval()
verify_architecture(model)  # the kernel's identities on a tiny random ministral: paths, layout, norm form
calibration = torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(0))
model, plan = Flattener(model, calibration, progress=False).compress(remove=2)
print(f"ministral: {config.num_hidden_layers} layers, layer_types {model.config.layer_types}, spans {plan.spans}")
