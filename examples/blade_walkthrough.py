"""The README's blade walkthrough: extract a blade from a source, inject it from the file and live,
explain, compile, save. Runs on the built-in tiny models (tiny:llama as the source, tiny:gpt2 as the
target: the same character tokenizer, hidden size 128)."""

import tempfile
from pathlib import Path

import torch

import garage

math_prompts = ["2 + 2 = 4", "3 * 7 = 21", "the square root of 81 is 9", "10 - 4 = 6"]
folder = Path(tempfile.mkdtemp())

source, tokenizer = garage.models.load_model_and_tokenizer("tiny:llama")  # 8 blocks, hidden 128
target = garage.models.load_model("tiny:gpt2")                            # 12 blocks, the same tokenizer

# 1. extract: the source's mean state over domain prompts, with its provenance, at h.5 of 8 blocks: the
#    depth of the target's N-4 (h.8 of 12), where it will be added
garage.blades.extract(source, tokenizer, math_prompts, site="h.5", domain="math", path=folder / "math.blade.safetensors")
print(garage.blades.info(folder / "math.blade.safetensors"))

# 2. inject it from the file, or live: the source runs on the same tokens, its blocks 0..K in the target's graph
from_file = garage.compile(target, f'at N-4 blade gated from "{folder / "math.blade.safetensors"}"')
live = garage.compile(target, "at N-4 blade gated from model src alpha 0.2", bind={"src": source})

# 3. explain: where it lands, and which of the source's blocks run (0..5 of 8: the depth of h.8 of 12)
print(live.explain())

# 4. compile: one torch.compile(fullgraph=True) graph for both models; generation keeps a cache for each
fast = garage.compile(target, "at N-4 blade gated from model src alpha 0.2", bind={"src": source}, compile=True)
ids = tokenizer("2 + 2 =", return_tensors="pt").input_ids
with torch.no_grad():
    assert torch.allclose(fast(input_ids=ids).logits, live(input_ids=ids).logits, atol=1e-4)
print(tokenizer.decode(live.generate(ids, max_new_tokens=8)[0]))

# 5. save: one .pt2 holding both models' parts (it runs with plain torch)
print(live.save(folder / "blade.pt2"))
