"""Stage 3, the graphs: model → exported base graphs (scoring, unpadded scoring, prefill, decode), each site's
fx node found in them, and op modules inserted there by a graph rewrite. All graph surgery lives here.

May import: garage._compat, garage.lang, garage.ops, garage.plan.
"""
