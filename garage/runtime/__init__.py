"""Stage 5, running: the InjectedModel (scoring and generation through injected graphs, torch.compile,
`.pt2` artefacts, files of learned parameters) and the hook backend, which runs the same op modules
through forward hooks.

May import: every earlier stage (garage._compat, lang, ops, plan, fx, check).
"""
