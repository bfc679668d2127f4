"""``tower`` is honoured by every registered adapter (issue #23): on CLIP, ``tower=text`` adapts only the
text tower -- no visual-tower tensor trains -- or the adapter refuses with one clear line."""
from __future__ import annotations

import pytest
import torch

import zoo
from tests.clip_helpers import IMG, tiny_clip
from tests.test_clip_adapters import NAMES, SMALL
from zoo.zeroshot import CLIPClassifier


@pytest.mark.parametrize("name", zoo.list_adapters())
def test_every_adapter_honours_tower_text(name):
    torch.manual_seed(0)
    model = CLIPClassifier(tiny_clip(), NAMES, head="text")
    try:
        zoo.apply_adapter(model, name, **SMALL.get(name, {}), tower="text")
    except (zoo.SiteError, ValueError, TypeError) as e:  # a clear refusal
        assert "\n" not in str(e).strip(), str(e)
        assert not zoo.adapters_of(model)
        return
    if name == "colora":  # its trainable factors are built from the data
        x, y = torch.randn(4, 3, IMG, IMG), torch.tensor([0, 1, 2, 0])
        zoo.prepare_adapters(model, [(x, y)])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    visual = sorted(n for n in trainable if n.startswith("backbone.model.visual."))
    assert not visual, f"{name} with tower=text trains visual-tower tensors: {visual[:4]}"
    assert any(n.startswith("backbone.model.") for n in trainable) or name == "linear", \
        f"{name} with tower=text adapts nothing in the text tower: {sorted(trainable)[:6]}"
