"""Exported graphs kept on disk, so that a new process does not export the same model again.

An entry is keyed by everything the graph depends on: the torch, transformers and garage versions, the
model's class and config, its module tree, every parameter's and buffer's name, shape and dtype, the
source files of the classes in its tree, the graph kind, mode, device and dtype. The weights stay out: a
loaded graph is bound to the live model's own parameters. An entry holds JSON and safetensors only
(`garage._graph_format`): nothing is unpickled or executed. A model whose forward was replaced on an
instance (its code is not in a file) is never cached, and an entry that cannot be read is exported again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import shutil
import sys
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.fx import GraphModule

from .. import _cache, _graph_format
from .._compat import attn_implementation
from .._version import __version__
from ..plan.archs import model_config

log = logging.getLogger("garage")
FILE = "graph"  # graph.json and graph.safetensors


def _source_hash(classes: set[type]) -> str:
    """The source files that define these classes: a changed modeling file is a different graph.
    An OSError or TypeError (a class without a readable file) means: do not cache."""
    digest = hashlib.sha256()
    for path in sorted({inspect.getsourcefile(cls) or "" for cls in classes} - {""}):
        digest.update(path.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def fingerprint(model: nn.Module, kind: str) -> str | None:
    """The cache key of this model's graph of this kind, or None when it must not (or cannot) be cached."""
    try:
        return _fingerprint(model, kind)
    except Exception as err:  # an unusual model (unreadable source, a config that will not serialise)
        log.debug("not caching graphs of %s: %s: %s", type(model).__name__, type(err).__name__, err)
        return None


def _fingerprint(model: nn.Module, kind: str) -> str | None:
    modules = list(model.named_modules(remove_duplicate=False))
    if any("forward" in vars(m) for _, m in modules):  # a forward set on an instance: its code has no file
        return None
    classes = {type(m) for _, m in modules}
    if any(cls.__module__ == "__main__" for cls in classes):  # a script's own classes change unseen
        return None
    config = model_config(model)
    param = next(model.parameters())
    tensors = [(name, list(t.shape), str(t.dtype), t.requires_grad)
               for name, t in [*model.named_parameters(remove_duplicate=False),
                               *model.named_buffers(remove_duplicate=False)]]
    description = {
        "format": _graph_format.FORMAT, "garage": __version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": sys.version_info[:2],
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config),
        "attn": attn_implementation(config), "tree": [(name, f"{type(m).__module__}.{type(m).__qualname__}")
                                                       for name, m in modules],
        "tensors": tensors, "sources": _source_hash(classes), "kind": kind, "training": model.training,
        "device": str(param.device), "dtype": str(param.dtype),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:32]


def entry(model: nn.Module, kind: str) -> Path | None:
    """The cache folder of this model's graph of this kind (it may not exist yet); None: not cached."""
    key = fingerprint(model, kind)
    return _cache.entry("graphs", key) if key else None


def load(folder: Path | None, model: nn.Module, kind: str) -> GraphModule | None:
    """The graph cached in `folder`, bound to `model`'s parameters; None when there is none, or it is unreadable."""
    if folder is None or not folder.is_dir():
        return None
    try:
        desc, tensors = _graph_format.read(str(folder / FILE), device=str(next(model.parameters()).device))
        return _graph_format.load(desc, tensors, model)
    except Exception as err:  # a damaged or foreign entry costs an export, never a wrong graph
        log.warning("ignoring the cached %s graph in %s (%s: %s); exporting again", kind, folder,
                    type(err).__name__, err)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def store(folder: Path | None, model: nn.Module, kind: str, graph: GraphModule) -> None:
    """Keep the graph in `folder` for later processes; a graph the format cannot hold safely is not kept."""
    if folder is None or folder.exists():
        return
    try:
        desc, tensors = _graph_format.dump(graph, model)
        with _cache.writing(folder) as tmp:
            _graph_format.save(str(tmp / FILE), desc, tensors)
    except _graph_format.Unsupported as err:  # something the format does not hold: export it each time
        log.debug("not caching the %s graph of %s: %s", kind, type(model).__name__, err)
    except Exception as err:  # a full disk, a read-only cache, a graph the format trips on: never fatal
        log.warning("could not cache the %s graph in %s: %s: %s", kind, folder, type(err).__name__, err)
