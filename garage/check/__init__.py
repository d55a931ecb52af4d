"""Stage 4, the checker: what `garage.check` adds once the model is traced. User modules run on fake tensors,
the rewritten graph is checked with networkx, and the lints (blade rules, dead ops) add warnings.

May import: garage._compat, garage.lang, garage.ops, garage.plan, garage.fx.
"""
