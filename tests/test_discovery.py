"""Discovery as a readable snapshot: a subset of families, rebuilt as bench/discovery.py builds them, must give
the rows docs/discovery.md holds for them; when discovery changes, the failure is a diff of those rows."""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import discovery  # noqa: E402

from garage.plan.snapshot import lines_of, render  # noqa: E402

# Each layout discovery knows, once: GPT-2's Conv1D, Llama's names, BERT's and BART's layouts, OPT's flat MLP,
# GPT-NeoX, Gemma 2's table row, MoE routers, hybrids (Jamba, Bamba), an SSM, and encoder–decoder stacks.
SUBSET = ("gpt2", "llama", "bert", "opt", "gpt_neox", "gemma2", "mixtral", "qwen2_moe", "deepseek_v3", "jamba",
          "bamba", "mamba", "bart", "t5", "marian", "whisper")


def test_discovery_finds_what_the_snapshot_says():
    heads = {family: [head for name, head in discovery.families() if name == family] for family in SUBSET}
    text = discovery.DOC.read_text()
    want = [line for family in SUBSET for line in lines_of(text, family)]
    got = [line for family in SUBSET for head in heads[family] for line in render(discovery.described(family, head))[2:]]
    diff = "\n".join(difflib.unified_diff(want, got, "docs/discovery.md", "discovery now", lineterm="", n=0))
    assert not diff, ("discovery finds something else than docs/discovery.md records (run `python bench/discovery.py` "
                      "if the change is meant):\n" + diff)
