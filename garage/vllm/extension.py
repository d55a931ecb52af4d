"""garage's vLLM worker extension: importing it registers garage's model classes in a worker process.

vLLM imports `worker_extension_cls` in each worker before it builds the model, so a garage run from a
source checkout (no installed `vllm.general_plugins` entry point) still serves its specs. Its methods are
callable from the driver with `llm.collective_rpc(...)`; `garage.vllm.set_value` calls `garage_set`."""

from __future__ import annotations

from typing import Any

from .plugin import register
from .worker import set_value

register()


class GarageExtension:
    def garage_specs(self: Any) -> list[str]:
        """The names of the specs this worker's model serves, in table order (row 1 first)."""
        table = getattr(self.model_runner.get_model(), "garage_tokens", None)
        return [] if table is None else table.plan.names

    def garage_set(self: Any, spec: str, step: int, name: str, value: Any) -> None:
        """Set one op's value (a strength, a vector) in this worker's model, in place."""
        set_value(self.model_runner.get_model().garage_tokens, spec, step, name, value)
