"""Stack several injections: the seed's way (LayerInjector) and the spec way give the same logits.

    python examples/stacked.py
"""

from pathlib import Path

import torch
import torch.nn as nn

import garage
from garage.core.loader import quick_load
from garage.inject.layer import LayerInjector

HERE = Path(__file__).parent
model, tokenizer, info = quick_load("tiny:gpt2")
input_ids = tokenizer("The meaning of life is", return_tensors="pt").input_ids
hidden = info["hidden_size"]
torch.manual_seed(0)
my_adapter = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())

with LayerInjector(model) as injector:
    injector.inject_scaling("transformer.h.4", scale=1.1)
    injector.inject_scaling("transformer.h.8", scale=0.85)
    injector.inject_custom_layer("transformer.h.6", my_adapter, name="adapter")
    output = model(input_ids)
    print(injector.list_injections())
    print(injector.to_spec())

injected = garage.compile(model, HERE / "stacked.garage", bind={"adapter": my_adapter})
print(injected.explain())
assert torch.allclose(injected(input_ids=input_ids).logits, output.logits, atol=1e-5)
print("hooks and graph agree")
