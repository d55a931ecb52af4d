"""Scale a layer's activations while generating: the seed guide's first example, on garage.

    python examples/scaling.py [MODEL]        # MODEL defaults to the built-in tiny:gpt2
"""

import sys

import torch

from garage.core.loader import quick_load
from garage.inject.layer import LayerInjector

model, tokenizer, info = quick_load(sys.argv[1] if len(sys.argv) > 1 else "tiny:gpt2")
input_ids = tokenizer("The meaning of life is", return_tensors="pt").input_ids

# Scale activations at layer 6 by 90%
with LayerInjector(model) as injector:
    injector.inject_scaling("transformer.h.6", scale=0.9)
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=20)
    print(tokenizer.decode(output[0]))
    print("as a spec:", injector.to_spec().strip())

# The same intervention, compiled into the graph instead of hooked:
import garage  # noqa: E402

compiled = garage.compile(model, "at transformer.h.6 scale 0.9")
assert torch.equal(compiled.generate(input_ids, max_new_tokens=20), output)
print("compiled graph gives the same tokens")
