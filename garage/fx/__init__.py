"""Stage 3, the graphs: model → exported base graphs (scoring, unpadded scoring, the generation step), each site's
fx node found in them, and op modules inserted there by a graph rewrite. All graph surgery lives here.
Exported graphs are kept in garage's cache folder between processes (`disk.py`).

May import: garage._version, garage._compat, garage._graph_format, garage._cache, garage.lang, garage.ops,
garage.plan.
"""
