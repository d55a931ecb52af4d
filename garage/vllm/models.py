"""The classes vLLM's registry imports by name (`garage.vllm.models:GarageLlamaForCausalLM`, …): each is vLLM's
own class for a family, with the served specs' ops installed (`worker.served_class`). Imported in vLLM's
processes only, since it imports vLLM."""

from .worker import served_classes

globals().update(served_classes())
