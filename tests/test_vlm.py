"""Vision–language models: the language model is the stack users steer. Discovery finds its blocks (not the
vision tower's, even with as many layers), text-only calls run in the injected graph, and calls with an image
run the same ops by hooks; each is held to hooks written here on the language model's own modules."""

from __future__ import annotations

import warnings

import pytest
import torch

import garage
from garage.lang.diagnostics import GarageWarning

SPEC = "at h.1 scale 0.5\nat h.2[last] scale 3\n"


def _llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=16, patch_size=4, projection_dim=32)
    text = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=127, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")  # 16 patches, CLS dropped: 16 image tokens
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval(), "model.language_model.layers.{}", 16


def _gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=16, patch_size=4)
    text = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                            pad_token_id=0, bos_token_id=2, eos_token_id=1)
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=4, image_token_id=299,
                          boi_token_id=297, eoi_token_id=298)
    torch.manual_seed(0)
    return Gemma3ForConditionalGeneration(config).eval(), "model.language_model.layers.{}", 4


FAMILIES = {"llava": _llava, "gemma3": _gemma3}


class Reference:
    """SPEC as hooks on the language model's blocks (their paths written out), last position by the mask."""

    def __init__(self, model, blocks: str, mask: torch.Tensor) -> None:
        self.model, self.blocks, self.mask, self.handles = model, blocks, mask, []

    def __enter__(self):
        def half(_m, _a, out):
            return (out[0] * 0.5, *out[1:]) if isinstance(out, tuple) else out * 0.5

        def last_times_three(_m, _a, out):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            h[:, -1] *= 3
            return (h, *out[1:]) if isinstance(out, tuple) else h

        self.handles.append(self.model.get_submodule(self.blocks.format(1)).register_forward_hook(half))
        self.handles.append(self.model.get_submodule(self.blocks.format(2)).register_forward_hook(last_times_three))
        return self

    def __exit__(self, *exc):
        while self.handles:
            self.handles.pop().remove()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_text_only_calls_steer_the_language_model_in_the_graph(family):
    model, blocks, _tokens = FAMILIES[family]()
    info = garage.compile(model, "").plan.info
    assert info.blocks == blocks.rpartition(".")[0]  # not the vision tower's, which has as many layers
    inj = garage.compile(model, SPEC)
    for seed in (1, 2):
        ids = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad(), Reference(model, blocks, torch.ones_like(ids)):
            want = model(input_ids=ids).logits
        assert torch.allclose(inj(input_ids=ids).logits, want, atol=1e-5)
    assert not inj.fallbacks
    with torch.no_grad(), Reference(model, blocks, torch.ones_like(ids)):
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(inj.generate(ids, max_new_tokens=4), generated)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_image_call_runs_the_same_ops_and_text_calls_keep_the_graph(family):
    model, blocks, image_tokens = FAMILIES[family]()
    config = model.config
    image = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ids = torch.cat([torch.full((1, image_tokens), config.image_token_id), torch.randint(3, 120, (1, 5))], 1)
    inj = garage.compile(model, SPEC)
    with torch.no_grad(), Reference(model, blocks, torch.ones_like(ids)):
        want = model(input_ids=ids, pixel_values=image).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GarageWarning)  # the image call runs by hooks, and says why
        got = inj(input_ids=ids, pixel_values=image).logits
    assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():
        plain = model(input_ids=ids, pixel_values=image).logits
    assert (plain - want).abs().max() > 1e-3
    text = torch.randint(3, 120, (1, 6), generator=torch.Generator().manual_seed(4))
    inj(input_ids=text)
    assert inj.backend._runner("scoring", garage.fx.kinds.Scoring()) is not None  # text calls: still the graph
