"""Insert your own nn.Module between layers (the seed guide's ActivationNoise), by hook and by spec.

    python examples/custom_module.py
"""

import torch
import torch.nn as nn

import garage
from garage.core.loader import quick_load
from garage.inject.layer import LayerInjector


class ActivationNoise(nn.Module):
    def __init__(self, std=0.01):
        super().__init__()
        self.std = std

    def forward(self, x):
        if self.training:
            return x + torch.randn_like(x) * self.std
        return x


model, tokenizer, info = quick_load("tiny:gpt2")
input_ids = tokenizer("The meaning of life is", return_tensors="pt").input_ids

with LayerInjector(model) as injector:
    injector.inject_custom_layer("transformer.h.6", ActivationNoise(std=0.02))
    output = model(input_ids)  # eval mode: the module follows the model and adds no noise
print("logits:", tuple(output.logits.shape))

# The spec way: register the class once, then name it with its arguments.
garage.register("activation_noise", ActivationNoise)
injected = garage.compile(model, "at h.6 module activation_noise(std=0.02)")
assert torch.equal(injected(input_ids=input_ids).logits, output.logits)
injected.train()
torch.manual_seed(0)
noisy = injected(input_ids=input_ids).logits
print("in training mode the noise is on:", not torch.equal(noisy, output.logits))
