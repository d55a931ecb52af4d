"""Stage 3, the graphs: model → exported base graphs (scoring, unpadded scoring, the generation step), each site's
fx node found in them, and op modules inserted there by a graph rewrite. All graph surgery lives here.
The kinds of graph are types (`kinds.py`); one store owns them all (`store.py`): memory, garage's sealed
disk cache, and what stands in when a graph cannot be traced.

May import: garage._version, garage._compat, garage._graph_format, garage._guards, garage._cache, garage.lang, garage.ops,
garage.plan.
"""
