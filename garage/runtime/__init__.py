"""Stage 5, running: the InjectedModel, which calls and generates through a Backend (`backend.py`): the graph
backend (injected graphs, torch.compile) and the hook backend (the same op modules through forward hooks),
one sampler for both, and the small modules an InjectedModel answers from: explain, `.pt2` artefacts
(loaded without pickle), files of learned parameters.

May import: every earlier stage (garage._compat, lang, ops, plan, fx, check).
"""
