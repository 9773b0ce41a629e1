"""The PyTorch front end: ``spa.torch.prune`` slices a module in place from the ONNX plan.

For every reference model: the pruned module's outputs equal the pruned ONNX model's (checked
here independently of the front end's own check, with onnxruntime on the written file), the
module trains (gradients reach every parameter, an optimizer step changes the loss), and its
``state_dict`` loads into a freshly built module on which the saved plan was replayed.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import spa.torch as st  # noqa: E402
from models import ALL_MODELS, TRANSFORMER_MODELS, build  # noqa: E402
from spa import validate as val  # noqa: E402
from spa.errors import OptionError  # noqa: E402

# The fast suite runs a CNN and a transformer of each kind; the slow set runs every model.
FAST = ("resnet_bottleneck", "mobilenetv2", "densenet", "bert", "gpt")


def _outputs(module, inputs) -> list[np.ndarray]:
    module.eval()
    with torch.no_grad():
        out = module(*inputs)
    return [out.numpy()] if isinstance(out, torch.Tensor) else [o.numpy() for o in out]


def _train_step(module, inputs, every_parameter: bool = True) -> tuple[float, float]:
    """Optimizer steps toward a fixed random target: the loss before and after them."""
    module.train()
    target = [torch.randn_like(torch.as_tensor(o)) for o in _outputs(module, inputs)]
    module.train()
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        out = module(*inputs)
        out = [out] if isinstance(out, torch.Tensor) else list(out)
        loss = sum(torch.nn.functional.mse_loss(o, t) for o, t in zip(out, target))
        loss.backward()
        missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
        assert not (every_parameter and missing), f"no gradient reached {missing[:3]}"
        opt.step()
        losses.append(loss.item())
    module.eval()
    return losses[0], losses[-1]


def _options(name: str) -> dict:
    if name in TRANSFORMER_MODELS:
        return {"heads_ratio": 0.5, "mlp_ratio": 0.5}
    return {"ratio": 0.4}


def _check_model(name: str, tmp_path) -> None:
    module, inputs = build(name)
    dense = _outputs(module, inputs)
    params = {n: p for n, p in module.named_parameters()}
    pruned_onnx = tmp_path / "pruned.onnx"
    out, report = st.prune(module, inputs, output=pruned_onnx, **_options(name))
    assert out is module
    assert all(p is params[n] for n, p in module.named_parameters()), "parameters replaced"
    assert report.params_after < report.params_before
    assert report.params_after == sum(p.numel() for p in module.parameters())
    assert report.flops_after < report.flops_before

    # Independently of the front end's own check: the written ONNX model vs the module.
    sess = val.session(pruned_onnx.read_bytes())
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    expected = list(val.run(sess, feeds).values())
    got = _outputs(module, inputs)
    assert [g.shape for g in got] == [d.shape for d in dense]
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-4 * float(np.abs(e).max()))

    # The state_dict of the pruned module loads into a fresh module with the plan replayed.
    plan_path = tmp_path / "plan.json"
    report.plan.save(plan_path)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    fresh, _ = build(name)
    st.apply(fresh, inputs, plan_path)
    fresh.load_state_dict(state)
    for a, b in zip(_outputs(fresh, inputs), got):
        np.testing.assert_array_equal(a, b)

    before, after = _train_step(module, inputs)
    assert after < before


@pytest.mark.parametrize("name", FAST)
def test_reference_model_torch_equals_onnx_trains_and_round_trips(name, tmp_path):
    _check_model(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL_MODELS if n not in FAST])
def test_every_reference_model(name, tmp_path):
    _check_model(name, tmp_path)


def test_heads_are_kept_when_the_forward_hard_codes_the_width():
    """The reference ViT reshapes its attention output to ``(B, N, C)`` with ``C`` the input
    width: pruning heads there cannot work in PyTorch. The front end notices (the copy's forward
    fails), keeps the heads, prunes the MLPs, and says so."""
    module, inputs = build("vit")
    heads = [m.heads for m in module.modules() if hasattr(m, "head_dim")]
    _, report = st.prune(module, inputs, heads_ratio=0.5, mlp_ratio=0.5)
    assert [m.heads for m in module.modules() if hasattr(m, "head_dim")] == heads
    assert any("attention heads kept" in n for n in report.notes)
    assert report.params_after < report.params_before
    assert report.relative_diff < 1e-4


def test_grouped_conv_groups_follow_the_plan():
    """A grouped conv loses whole groups; ``groups`` and the channel counts follow."""
    from torch import nn

    module = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                           nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(),
                           nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 36, 4)).eval()
    x = torch.randn(1, 3, 6, 6)
    # Exact counts: by default the 16 channels a g=1 conv reads keep whole kernel blocks of 16.
    _, report = st.prune(module, (x,), ratio=0.5, round_to=1)
    conv = module[2]
    assert conv.groups == 2 and conv.in_channels == 8 and conv.out_channels == 8
    assert module[0].out_channels == 8 and module[4].in_channels == 8
    assert report.relative_diff < 1e-4


def test_unknown_option_is_a_typed_error():
    module, inputs = build("resnet_bottleneck")
    with pytest.raises(OptionError):
        st.prune(module, inputs, not_an_option=1)


def _third_party(name: str):
    if name.startswith("tv_"):
        from models.torchvision_compat import import_torchvision

        tv = import_torchvision()
        torch.manual_seed(0)
        module = getattr(tv.models, name[3:])().eval()
        return module, (torch.randn(1, 3, 64, 64),)
    from models.thirdparty import HF_MODELS, VISION_TRANSFORMERS

    pytest.importorskip("timm" if name.startswith("timm") else "transformers")
    return {**HF_MODELS, **VISION_TRANSFORMERS}[name]()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tv_resnet18", "tv_mobilenet_v2", "timm_vit_tiny", "hf_bert",
                                  "hf_llama", "hf_gpt2"])
def test_third_party_models(name, tmp_path):
    """Real model code: torchvision CNNs, a timm ViT and HuggingFace transformers (random
    init). Heads are pruned in the transformers (their forward reads the head counts SPA fixes)
    and the module equals its pruned ONNX model."""
    module, inputs = _third_party(name)
    options = {"ratio": 0.4} if name.startswith("tv_") else {"heads_ratio": 0.5, "mlp_ratio": 0.5}
    _, report = st.prune(module, inputs, **options)
    assert report.params_after < 0.8 * report.params_before
    assert report.relative_diff < 1e-4
    assert not report.notes, report.notes  # heads were pruned, not kept
    before, after = _train_step(module, inputs, every_parameter=False)  # HF: pooler unused
    assert after < before
