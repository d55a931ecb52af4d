"""Stage 2, the plan: Spec + model → Plan → op modules. Architecture discovery, the resolver (every site made
concrete for this model), safe file loading, and op building; `prepare` runs all of it for both backends.

Reads the model's structure, never traces or runs it. May import: garage._compat, garage.lang, garage.ops, garage.models
(a live blade source named by its path), garage.sae (SAE folders).
"""
