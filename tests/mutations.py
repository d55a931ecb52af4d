"""Deliberate mutations of garage's maths: the test suite must fail for every one of them.

    python tests/mutations.py            # every mutation (49 mutations, about an hour on 2 cores)
    python tests/mutations.py ablate     # the mutations whose name contains "ablate"

Each mutation changes one expression in a copy of the tracked tree (the working tree is never touched),
runs the tests that hold garage's maths to independent references, and reports whether they failed. The
exit status is 1 if any mutation survives. It is kept out of the default test run because it is slow.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_patching.py", "tests/test_patching_sweeps.py", "tests/test_conditions.py", "tests/test_sae.py",
         "tests/test_generate.py", "tests/test_reference.py", "tests/test_compile.py", "tests/test_resolve.py", "tests/test_heads_and_routers.py",
         "tests/test_blades.py", "tests/test_live_blades.py", "tests/test_train.py",
         "tests/test_seed.py", "tests/test_architectures.py", "tests/test_seq2seq.py", "tests/test_unusual_layouts.py"]

# name → (file, the exact text to change, what to change it to)
MUTATIONS: dict[str, tuple[str, str, str]] = {
    "bert attention takes the residual": ("garage/plan/discover.py", '(("attention.output.dense",), dict(attn="attention.output.dense",',
                                          '(("attention.output.dense",), dict(attn="attention",'),
    "decoder positions read the source mask": ("garage/fx/rewrite.py",
                                               'return f"decoder_{name}" if stack == "decoder" and name else name',
                                               "return name"),
    "decoder hooks count positions without the cache": ("garage/runtime/hooks.py",
                                                        "mask = torch.ones(ids.shape[0], past + ids.shape[1],",
                                                        "mask = torch.ones(ids.shape[0], ids.shape[1],"),
    "T5's decoder MLP is its encoder's slot": ("garage/plan/discover.py", '(("layer.2.DenseReluDense",), dict(mlp="layer.2.DenseReluDense"',
                                               '(("layer.2.DenseReluDense",), dict(mlp="layer.1.EncDecAttention"'),
    "transposed states reach ops unpermuted": ("garage/fx/rewrite.py",
                                               "if loc.permutation is not None:  # ops see [batch, seq, hidden]",
                                               "if False:  # ops see [batch, seq, hidden]"),
    "a module's earlier calls are left out": ("garage/fx/rewrite.py", "for loc in locations[ops[0]].calls]",
                                              "for loc in (locations[ops[0]],)]"),
    "the decoder step reads an empty cross-attention cache": ("garage/fx/seq2seq.py",
                                                              "cache = both_caches(past[:-2], self.layers, slots, cross_ready=not self.first)",
                                                              "cache = both_caches(past[:-2], self.layers, slots, cross_ready=True)"),
    "final norm on the embeddings": ("garage/plan/discover.py", 'and "embed" not in name]', "]"),
    "hook fallback drops the ops": ("garage/runtime/hook_backend.py",
                                    "with attach(self.model, self.sites, self.ops), scoring_config(self.model):",
                                    "with attach(self.model, [], []), scoring_config(self.model):"),
    "generation config ignored": ("garage/runtime/decode.py", "request.choose(processors(tokens, logits.float()))",
                                  "request.choose(logits.float())"),
    "scale formula": ("garage/ops/scale.py", "return h * self.factor", "return h * self.factor * 1.01"),
    "add formula": ("garage/ops/add.py", "return h + self.factor * self.vector",
                    "return h + self.factor * self.vector * 0.9"),
    "ablate removes half": ("garage/ops/ablate.py", "return h - (h @ self.unit).unsqueeze(-1) * self.unit",
                            "return h - 0.5 * (h @ self.unit).unsqueeze(-1) * self.unit"),
    "zero leaks": ("garage/ops/zero.py", "return torch.zeros_like(h)", "return h * 1e-3"),
    "clamp bound": ("garage/ops/clamp.py", "self.high.to(h.dtype))", "2 * self.high.to(h.dtype))"),
    "noise std": ("garage/ops/noise.py", "return h + self.std * torch.randn_like(h)",
                  "return h + 2 * self.std * torch.randn_like(h)"),
    "blade alpha": ("garage/ops/blade.py", "return h + self.alpha * b", "return h + b"),
    "blade gate": ("garage/ops/blade.py", "b = torch.sigmoid(self.gate(h)) * b", "b = torch.sigmoid(self.gate(h) + 1) * b"),
    "blade topk order": ("garage/ops/blade.py", "blade = blade[..., keep]", "blade = blade[..., keep.flip(0)]"),
    "live blade reads the target": ("garage/ops/blade.py", "b = self.source(inputs[0], h)", "b = self.source(h, h)"),
    "live projection skipped": ("garage/ops/blade.py", "return state if self.linear is None else self.linear(state)",
                                "return state[..., : h.shape[-1]]"),
    "live source shares the target's cache": ("garage/fx/fuse.py", "STEP_ARGS if isinstance(kind, Step) else None", "None"),
    "ffn topk picks the least active": ("garage/blades.py", "(total / tokens).topk(keep)", "(-total / tokens).topk(keep)"),
    "add learn is frozen": ("garage/ops/add.py", "        if learn:", "        if False:"),
    "params not loaded": ("garage/runtime/params.py", "param.copy_(tensors[key].to(param.device, param.dtype))",
                          "param.copy_(param)"),
    "debate views do not differ in eval": ("garage/inject/debate.py",
                                           "return h * (self._random(h) < keep).to(h.dtype) / keep", "return h"),
    "the prompt carries loss": ("garage/training.py", "labels = ([IGNORE] * len(prompt) + completion)[:max_length]",
                                "labels = list(ids)"),
    "debate average": ("garage/ops/debate.py", "return (a + b) / 2", "return (a + b) / 2.5"),
    "debate gate": ("garage/ops/debate.py", "return g * a + (1 - g) * b", "return g * a + (1 - g) * b * 0.9"),
    "capture copy": ("garage/ops/capture.py", "self.store[self.key] = h.detach()",
                     "self.store[self.key] = h.detach() * 1.01"),
    "layer off by one": ("garage/plan/resolve.py", "value = expr.value + n if expr.value < 0 else expr.value",
                         "value = expr.value + n if expr.value < 0 else min(expr.value + 1, n - 1)"),
    "position start": ("garage/ops/positions.py", "sel = real & (pos >= start)", "sel = real & (pos > start)"),
    "last position": ("garage/ops/positions.py", "expand(batch, seq) == seq - 1", "expand(batch, seq) >= seq - 2"),
    "block input order": ("garage/fx/rewrite.py", "2 * order[node.name] + (site.kind == \"in\")",
                          "2 * order[node.name] - (site.kind == \"in\")"),
    "heads put back": ("garage/ops/heads.py", "index_copy(-2, self.index, out.to(h.dtype))",
                       "index_copy(-2, self.index.flip(0), out.to(h.dtype))"),
    "heads chosen": ("garage/ops/heads.py", "split.index_select(-2, self.index)",
                     "split.index_select(-2, (self.index + 1) % self.count)"),
    "router mask value": ("garage/ops/experts.py", "torch.finfo(logits.dtype).min", "-10.0"),
    "router bias on one": ("garage/plan/build_ops.py", "profile[list(named)] = 1.0", "profile[list(named)[:1]] = 1.0"),
    "sequence blade row": ("garage/ops/blade.py", "positions.clamp(0, length - 1)", "(positions + 1).clamp(0, length - 1)"),
    "router logits": ("garage/fx/locate.py", "in_scope(n, path) and shape.matches(n)][:1]",
                      "in_scope(n, path) and shape.matches(n)][-1:]"),
    "patch pairs the wrong last token": ("garage/ops/patch.py", "(pos == base_len - 1)", "(pos == base_len - 2)"),
    "patch ignores mix": ("garage/ops/patch.py", "* weight * self.units * self.mix", "* weight * self.units"),
    "patch ignores the sweep's weight": ("garage/ops/patch.py", "* weight * self.units * self.mix", "* self.units * self.mix"),
    "patch reads past the source's end": ("garage/ops/patch.py", "sel = real & (pos < source_len)", "sel = real"),
    "condition gate ignored": ("garage/ops/condition.py", "return torch.lerp(h, inner, weight.to(h.dtype))",
                               "return inner"),
    "condition forgets the prompt's gate": ("garage/ops/condition.py", "g = torch.where(runs_prompt, g, self.kept[:rows])",
                                            "g = g"),
    "sae clamp drops the error": ("garage/ops/sae.py", "change = self.amount - acts", "change = self.amount + 0 * acts"),
    "the step graph keeps the wrong position's logits": ("garage/fx/steps.py",
                                                          "return torch.arange(length - 1, length, device=input_ids.device)",
                                                          "return torch.arange(length - 2, length - 1, device=input_ids.device)"),
    "position masks read the mask's first columns": ("garage/ops/positions.py",
                                                     "return t.narrow(1, t.shape[1] - count, count)",
                                                     "return t.narrow(1, 0, count)"),
}


def tracked_copy(into: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        source = ROOT / name
        if source.is_file() and not source.is_symlink():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    return into


def survives(name: str, tree: Path) -> tuple[bool, float]:
    """Whether the tests still pass with this mutation applied (True is bad), and how long they took."""
    path, old, new = MUTATIONS[name]
    target = tree / path
    original = target.read_text(encoding="utf-8")
    if original.count(old) != 1:
        raise SystemExit(f"mutation {name!r}: {old!r} is not found exactly once in {path}; update this script")
    target.write_text(original.replace(old, new), encoding="utf-8")
    start = time.perf_counter()
    try:
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow",
                              *TESTS], cwd=tree, capture_output=True, text=True)
    finally:
        target.write_text(original, encoding="utf-8")
    return run.returncode == 0, time.perf_counter() - start


def main(argv: list[str]) -> int:
    chosen = [n for n in MUTATIONS if not argv or any(word in n for word in argv)]
    with tempfile.TemporaryDirectory() as folder:
        tree = tracked_copy(Path(folder))
        alive = []
        for name in chosen:
            survived, seconds = survives(name, tree)
            print(f"{'SURVIVED' if survived else 'caught  '}  {name:20}  {seconds:5.1f} s", flush=True)
            if survived:
                alive.append(name)
    print(f"{len(chosen) - len(alive)} of {len(chosen)} mutations caught")
    return 1 if alive else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
