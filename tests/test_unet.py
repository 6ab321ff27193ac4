"""Tests of the DCNv4 U-Net and its conv baseline: shapes and gradients, which convs were swapped, exact
save/load round trips, torch.compile, autocast, the size registry, the report and configuration errors."""

import json
import math

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from unet_dcnv4.modules import DCNv4Conv2d
from unet_dcnv4.unet import REPLACEABLE, UNET_SIZES, DCNv4UNet2DModel, build_unet, dcnv4_flops, main, model_report


def _inputs(model, n=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.config.in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    labels = torch.randint(0, model.config.num_class_embeds, (n,), generator=g) \
        if model.config.num_class_embeds else None
    return x, t, labels


def _3x3_convs(module):
    return {name for name, m in module.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)}


@pytest.mark.parametrize("model_type", ["dcnv4", "conv"])
def test_forward_backward_shapes_and_finite_gradients(model_type):
    torch.manual_seed(0)
    model = build_unet(model_type, "tiny", 8)
    x, t, _ = _inputs(model)
    y = model(x, t).sample
    assert y.shape == x.shape
    y.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if model_type == "dcnv4":
        assert isinstance(model, DCNv4UNet2DModel)
        assert model.down_blocks[1].resnets[0].conv1.value_proj.weight.grad.abs().sum() > 0
    else:
        assert type(model) is UNet2DModel


def test_dcnv4_and_conv_models_share_the_configuration():
    dcn, conv = build_unet("dcnv4", "tiny", 8, num_class_embeds=3), build_unet("conv", "tiny", 8, num_class_embeds=3)
    shared = {k: v for k, v in conv.config.items() if not k.startswith("_")}
    assert {k: dcn.config[k] for k in shared} == shared
    assert conv.config.block_out_channels == UNET_SIZES["tiny"]["block_out_channels"]


@pytest.mark.parametrize("replace", [("resnet",), REPLACEABLE, ("conv_in", "downsample")])
def test_no_3x3_conv_remains_where_dcnv4_was_asked_for(replace):
    conv_names = _3x3_convs(build_unet("conv", "tiny", 8))
    model = build_unet("dcnv4", "tiny", 8, replace=list(replace), group_channels=8, levels=None)
    left = _3x3_convs(model)

    def asked(name):
        is_resnet = isinstance(model.get_submodule(name.rsplit(".", 1)[0]), ResnetBlock2D) if "." in name else False
        return (("resnet" in replace and is_resnet) or ("conv_in" in replace and name == "conv_in")
                or ("conv_out" in replace and name == "conv_out")
                or ("downsample" in replace and ".downsamplers." in name)
                or ("upsample" in replace and ".upsamplers." in name))

    swapped = {n for n in conv_names if asked(n)}
    assert swapped and not (left & swapped)
    assert left == conv_names - swapped
    assert all(isinstance(model.get_submodule(n), DCNv4Conv2d) for n in swapped)


def test_the_default_swaps_every_3x3_conv_below_the_full_resolution_and_saved_folders_keep_theirs(tmp_path):
    """The default (levels "coarse") swaps every 3x3 conv of the levels below the full resolution and names them in
    config.json; folders saved with another list, or before `levels` existed (every level swapped then), load as
    they were saved, with the fingerprint they had."""
    from types import SimpleNamespace

    from unet_dcnv4.data import module_fingerprint

    conv = _3x3_convs(build_unet("conv", "tiny", 8))
    model = build_unet("dcnv4", "tiny", 8)
    assert list(model.config.levels) == [1] and list(build_unet("dcnv4", "S", 32).config.levels) == [1, 2]
    assert _3x3_convs(model) == _3x3_convs(build_unet("dcnv4", "tiny", 8, levels=[1])) != set()
    assert _3x3_convs(model) == {n for n in conv if n.startswith(("conv_in", "conv_out", "down_blocks.0", "up_blocks.1"))
                                 or ".upsamplers." in n}  # the upsampler's conv runs on the full-resolution map
    assert list(DCNv4UNet2DModel.from_config(model.config).config.levels) == [1]
    model.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["levels"] == [1]
    old = build_unet("dcnv4", "tiny", 8, replace=["resnet"], levels=None)  # the default before the design study
    old.save_pretrained(tmp_path / "old")
    loaded = DCNv4UNet2DModel.from_pretrained(tmp_path / "old")
    assert list(loaded.config.replace) == ["resnet"] and loaded.config.levels is None
    assert _3x3_convs(loaded) == _3x3_convs(old) == conv - {n for n in conv if ".resnets." in n}
    # A folder from before `levels`: its config.json lacks the key.
    before = build_unet("dcnv4", "tiny", 8, levels=None)
    before.save_pretrained(tmp_path / "before")
    config = json.loads((tmp_path / "before" / "config.json").read_text())
    del config["levels"]
    (tmp_path / "before" / "config.json").write_text(json.dumps(config))
    loaded = DCNv4UNet2DModel.from_pretrained(tmp_path / "before")
    assert not _3x3_convs(loaded) and loaded.config.levels is None
    assert not _3x3_convs(DCNv4UNet2DModel.from_config(loaded.config))
    # As the class without the option hashed it: no levels in its config.
    unaware = SimpleNamespace(config={k: v for k, v in loaded.config.items() if k != "levels"},
                              state_dict=before.state_dict)
    assert module_fingerprint(loaded) == module_fingerprint(unaware)
    with pytest.raises(ValueError, match=r"replace \['conv_in'\] at levels \[1\] swaps no 3x3 conv"):
        build_unet("dcnv4", "tiny", 8, replace=["conv_in"])


@pytest.mark.parametrize("num_class_embeds,options", [(None, {}), (5, dict(replace=["resnet"], dw_kernel_size=3))])
def test_save_pretrained_from_pretrained_is_bit_identical(tmp_path, num_class_embeds, options):
    torch.manual_seed(0)
    model = build_unet("dcnv4", "tiny", 8, num_class_embeds=num_class_embeds, group_channels=8, **options).eval()
    with torch.no_grad():  # move the DCNv4 parameters off their initial values so a re-init would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path)
    loaded = DCNv4UNet2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.group_channels == 8 and list(loaded.config.replace) == list(model.config.replace)
    x, t, labels = _inputs(model)
    with torch.no_grad():
        assert torch.equal(model(x, t, class_labels=labels).sample, loaded(x, t, class_labels=labels).sample)


def test_every_dcnv4_option_reaches_the_saved_config_and_the_layers(tmp_path):
    """Each design knob of the U-Net (all of DCNV4_OPTIONS but `match`, which resolves into the widths) is saved
    in config.json with its non-default value, reloads, and changes the layers it names."""

    from unet_dcnv4.unet import DCNV4_OPTIONS

    options = dict(replace=["resnet", "upsample"], group_channels=8, offset_scale=0.5, dw_kernel_size=3,
                   remove_center=True, official_init=True, offset_lr_scale=0.1, time_offsets=True, time_rank=4,
                   levels=[0, 1])
    assert set(options) == set(DCNV4_OPTIONS) - {"match"}
    model = build_unet("dcnv4", "tiny", 8, **options)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in options} == options
    loaded = DCNv4UNet2DModel.from_pretrained(tmp_path)
    layers = [m for m in loaded.modules() if isinstance(m, DCNv4Conv2d)]
    assert layers and all((m.offset_scale, m.remove_center, m.group_channels) == (0.5, True, 8) for m in layers)
    fresh = [m for m in model.modules() if isinstance(m, DCNv4Conv2d)]
    assert all(torch.count_nonzero(m.offset_mask.bias) == 0 for m in fresh)  # official: every mask starts at 0
    box = [m for m in build_unet("dcnv4", "tiny", 8).modules() if isinstance(m, DCNv4Conv2d)]
    assert all(torch.count_nonzero(m.offset_mask.bias) > 0 for m in box)  # default: masks start at 1/K
    # The offset/mask branches (Linear and depthwise conv) learn at 0.1x in a group of their own.
    groups = loaded.parameter_groups(1e-3)
    branch = {id(p) for m in layers for p in [*m.offset_mask.parameters(), *m.offset_mask_dw.parameters(),
                                              *(m.offset_time_proj.parameters() if m.time_channels else [])]}
    assert any(m.time_channels for m in layers)  # time_offsets: the blocks' first convs
    assert all(m.time_rank == 4 for m in layers if m.time_channels)
    assert [(g["lr"], g["lr_scale"]) for g in groups] == [(1e-3, 1.0), (pytest.approx(1e-4), 0.1)]
    assert {id(p) for p in groups[1]["params"]} == branch
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(loaded.parameters()))
    with pytest.raises(ValueError, match="offset_lr_scale must be a number >= 0"):
        build_unet("dcnv4", "tiny", 8, offset_lr_scale=-1)


def test_impl_and_cuda_backward_are_saved_and_run(tmp_path, monkeypatch):
    """The saved config says which implementation ran; with impl="reference" the compiled op is never called."""

    from unet_dcnv4 import ops

    model = build_unet("dcnv4", "tiny", 8, impl="reference", cuda_backward="tiled").eval()
    assert all((m.impl, m.cuda_backward) == ("reference", "tiled")
               for m in model.modules() if isinstance(m, DCNv4Conv2d))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["impl"], saved["cuda_backward"]) == ("reference", "tiled")
    loaded = DCNv4UNet2DModel.from_pretrained(tmp_path).eval()

    def no_kernel():
        raise AssertionError("the compiled op was called")

    monkeypatch.setattr(ops, "load_extension", no_kernel)
    x, t, _ = _inputs(model)
    with torch.no_grad():
        assert torch.isfinite(loaded(x, t).sample).all()
    monkeypatch.undo()  # a layer with the default impl loads the kernels when made
    # A config saved before these fields existed loads with the defaults.
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in saved.items()
                                                      if k not in ("impl", "cuda_backward")}))
    old = DCNv4UNet2DModel.from_pretrained(tmp_path)
    assert (old.config.impl, old.config.cuda_backward) == ("auto", "atomic")
    assert old.down_blocks[1].resnets[0].conv1.impl == "auto"


def test_pipeline_folder_with_the_dcnv4_unet_loads(tmp_path):
    model = build_unet("dcnv4", "tiny", 8).eval()
    DDPMPipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(tmp_path)
    pipe = DDPMPipeline.from_pretrained(tmp_path)
    assert isinstance(pipe.unet, DCNv4UNet2DModel)
    x, t, _ = _inputs(model)
    with torch.no_grad():
        assert torch.equal(model(x, t).sample, pipe.unet(x, t).sample)


@pytest.mark.parametrize("recompute_value", [False, True], ids=["default", "recompute_value"])
def test_torch_compile_matches_eager(recompute_value):
    # One graph, no breaks, forward and backward through AOTAutograd and the layer op's fake kernels. The
    # aot_eager backend skips inductor's C++ code generation, which takes minutes for a whole U-Net on
    # two CPU cores; the graph it runs is the one inductor would compile. With recompute_value the
    # backward graph recomputes each layer's value.
    torch.manual_seed(0)
    model = build_unet("dcnv4", "tiny", 8)
    model.enable_value_recompute(recompute_value)
    x, t, _ = _inputs(model, n=1)
    weight = model.down_blocks[1].resnets[0].conv1.offset_mask.weight
    eager = model(x, t).sample
    eager.square().mean().backward()
    eager_grad, weight.grad = weight.grad.clone(), None
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x, t).sample
    compiled.square().mean().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad, eager_grad, rtol=1e-4, atol=1e-6)


def test_torch_compile_in_a_fresh_process():
    """A process that compiles a DCNv4 layer before any eager call: the layer loads the kernels when made,
    so tracing finds the ops (building them is not something torch.compile can trace)."""
    import subprocess
    import sys

    script = ("import torch\n"
              "from unet_dcnv4.modules import DCNv4Conv2d\n"
              "m = DCNv4Conv2d(16, 16)\n"
              "x = torch.randn(1, 16, 5, 5, requires_grad=True)\n"
              "y = torch.compile(m, backend='aot_eager', fullgraph=True)(x)\n"
              "y.sum().backward()\n"
              "assert torch.allclose(y, m(x), atol=1e-6) and x.grad is not None\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_backward(dtype):
    torch.manual_seed(0)
    model = build_unet("dcnv4", "tiny", 8, num_class_embeds=3, replace=list(REPLACEABLE), group_channels=8)
    x, t, labels = _inputs(model)
    with torch.autocast("cpu", dtype=dtype):
        y = model(x, t, class_labels=labels).sample
    y.float().square().mean().backward()
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(y.float(), model(x, t, class_labels=labels).sample, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("call,match", [
    (lambda: build_unet("transformer", "tiny", 8), r"model_type must be one of \['dcnv4', 'conv'\]"),
    (lambda: build_unet("dcnv4", "huge", 8), r"size must be one of \['tiny'"),
    (lambda: build_unet("dcnv4", "tiny", 8, kernel=5), r"unknown DCNv4 options \['kernel'\]; allowed"),
    (lambda: build_unet("dcnv4", "tiny", 8, replace=["attention"]), r"unknown conv names \['attention'\]; allowed"),
    (lambda: build_unet("dcnv4", "tiny", 8, replace="resnet"), "replace must be a list of conv names"),
    (lambda: build_unet("dcnv4", "tiny", 8, group_channels=24), r"group_channels \(24\) must divide.*allowed"),
    (lambda: model_report("dcnv4"), "size is required"),
    (lambda: build_unet("dcnv4", "tiny", 8, impl="cuda"), r"impl must be one of .*got 'cuda'"),
])
def test_bad_configuration_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_model_report_counts_parameters_and_the_dcnv4_op():
    dcn, conv = model_report("dcnv4", "tiny", 8), model_report("conv", "tiny", 8)
    assert dcn["parameters"] == sum(p.numel() for p in build_unet("dcnv4", "tiny", 8).parameters())
    assert conv["dcnv4_gflops"] == 0 and conv["gflops"] > 0
    assert 0 < dcn["dcnv4_gflops"] < dcn["gflops"]
    # The conv baseline's GFLOPs are exactly its convs, linears and attention products (2 FLOPs a multiply-add).
    from diffusers.models.attention_processor import Attention

    model, counted = build_unet("conv", "tiny", 8), []

    def count(module, args, out):
        if isinstance(module, nn.Conv2d):
            counted.append(2 * module.in_channels // module.groups * math.prod(module.kernel_size) * out.numel())
        elif isinstance(module, nn.Linear):
            counted.append(2 * module.in_features * out.numel())
        else:  # QK^T and AV over the T = h * w tokens: 2 * 2 * T * T * inner_dim
            tokens = math.prod(out.shape[2:])
            counted.append(4 * out.shape[0] * tokens * tokens * module.inner_dim)

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, Attention)):
            m.register_forward_hook(count)
    model(torch.zeros(1, 4, 8, 8), torch.tensor([1]))
    expected = sum(counted)
    assert model_report(model)["gflops"] * 1e9 == pytest.approx(expected, abs=0.5)
    layer = DCNv4Conv2d(32, 32)
    assert dcnv4_flops(layer, torch.empty(2, 8, 8, 32)) == 2 * 5 * 2 * 8 * 8 * 32 * 9


def test_report_counts_the_dcnv4_layers_in_a_fresh_process():
    """The CLI's report, in a process that has not loaded the kernels yet, counts every DCNv4 layer's three
    projections (one op, counted by its FLOP formula) and its sampling, besides the other modules' FLOPs."""
    import subprocess
    import sys

    from diffusers.models.attention_processor import Attention

    run = subprocess.run([sys.executable, "-m", "unet_dcnv4.unet", "--size", "tiny", "--sample_size", "8", "--report",
                          "--json"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    fresh = {r["model_type"]: r for r in json.loads(run.stdout)}["dcnv4"]
    model, counted = build_unet("dcnv4", "tiny", 8), []

    def count(module, args, out):
        if isinstance(module, DCNv4Conv2d):
            x, out = args[0], out.permute(0, 2, 3, 1)
            pixels_in, pixels_out = x.numel() // x.shape[1], out.numel() // out.shape[-1]
            counted.append(2 * (pixels_in * module.value_proj.weight.numel()
                                + pixels_out * module.offset_mask.weight.numel()
                                + pixels_out * module.output_proj.weight.numel()) + dcnv4_flops(module, out))
        elif isinstance(module, nn.Conv2d):
            counted.append(2 * module.in_channels // module.groups * math.prod(module.kernel_size) * out.numel())
        elif isinstance(module, nn.Linear):
            counted.append(2 * module.in_features * out.numel())
        else:
            tokens = math.prod(out.shape[2:])
            counted.append(4 * out.shape[0] * tokens * tokens * module.inner_dim)

    # Not on the DCNv4 layers' own Linears: a hook there would make the layer call them one by one.
    inside = {id(p) for layer in model.modules() if isinstance(layer, DCNv4Conv2d) for p in layer.children()}
    for m in model.modules():
        if isinstance(m, (DCNv4Conv2d, nn.Conv2d, nn.Linear, Attention)) and id(m) not in inside:
            m.register_forward_hook(count)
    with torch.no_grad():
        model(torch.zeros(1, 4, 8, 8), torch.tensor([1]))
    assert fresh["gflops"] * 1e9 == pytest.approx(sum(counted), abs=0.5)
    assert fresh["gflops"] == pytest.approx(model_report("dcnv4", "tiny", 8)["gflops"], abs=1e-9)


def test_cli_report_and_user_errors(capsys):
    assert main(["--size", "tiny", "--sample_size", "8", "--report"]) == 0
    out = capsys.readouterr().out
    assert "dcnv4" in out and "conv" in out and "GFLOPs" in out
    assert main(["--size", "tiny", "--sample_size", "8", "--report", "--levels", "1", "--match", "params"]) == 0
    from unet_dcnv4.unet import matched_widths

    widths = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("widths"))
    assert widths.split()[1:] == str(matched_widths("tiny", 8, levels=[1])).split() + ["(32,", "64)"]
    assert main(["--size", "tiny", "--sample_size", "8", "--levels", "all"]) == 0
    assert json.loads(capsys.readouterr().out)["levels"] is None
    assert main(["--size", "tiny", "--sample_size", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["levels"] == [1]
    with pytest.raises(SystemExit):
        main(["--size", "tiny", "--levels", "fine"])
    assert "--levels takes level numbers, 'coarse' or 'all', got fine" in capsys.readouterr().err
    assert main(["--size", "tiny", "--group_channels", "24"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: group_channels (24)") and err.count("\n") == 1


@pytest.mark.parametrize("size, sample_size, options", [
    ("tiny", 8, {}),
    ("tiny", 8, {"group_channels": 8}),
    ("tiny", 8, {"levels": None}),
    ("tiny", 8, {"time_offsets": True, "time_rank": 16}),
    ("S", 32, {}),
])
def test_matched_parameters_are_within_five_percent_of_the_conv_baseline(size, sample_size, options):
    from unet_dcnv4.unet import COARSE, matched_widths, sampled_levels

    with torch.device("meta"):
        conv = build_unet("conv", size, sample_size)
        dcnv4 = build_unet("dcnv4", size, sample_size, match="params", **options)
        equal = build_unet("dcnv4", size, sample_size, **options)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(equal) < 0.8 * count(conv)
    assert abs(count(dcnv4) / count(conv) - 1) <= 0.05
    widths = dcnv4.config.block_out_channels
    assert tuple(widths) == matched_widths(size, sample_size, match="params", **options)
    assert tuple(widths) != tuple(UNET_SIZES[size]["block_out_channels"])
    step = options.get("group_channels", 16)
    assert all(w % UNET_SIZES[size]["norm_num_groups"] == 0 for w in widths)
    assert all(widths[i] % step == 0 for i in sampled_levels(len(widths), levels=options.get("levels", COARSE)))


def test_group_channels_divide_only_the_widths_dcnv4_layers_sample_at():
    """A level without DCNv4 layers keeps the GroupNorm grid: levels [1] of the tiny U-Net builds at (40, 80), whose
    40 is no multiple of group_channels (16), and matching widens its conv level in steps of the 8 GroupNorm
    groups; swapping the upsampler's conv at level 0 makes it sample at level 1's width."""
    from unet_dcnv4.unet import REPLACEABLE, matched_widths, sampled_levels

    assert sampled_levels(2) == (1,) == sampled_levels(2, levels=[1]) and sampled_levels(2, levels=None) == (0, 1)
    assert sampled_levels(2, levels=[0]) == (0, 1) and sampled_levels(2, ("resnet",), [0]) == (0,)
    assert sampled_levels(3, ("downsample",), [2]) == () and sampled_levels(3, ("upsample",), [0, 1]) == (1, 2)
    assert sampled_levels(2, ("conv_in",), [1]) == () and sampled_levels(2, REPLACEABLE, None) == (0, 1)
    config = dict(UNET_SIZES["tiny"], sample_size=8, in_channels=4, out_channels=4, block_out_channels=(40, 80))
    with torch.device("meta"):
        model = DCNv4UNet2DModel(**config, levels=[1])
    assert model.down_blocks[1].resnets[0].conv1.group_channels == 16
    with pytest.raises(ValueError, match=r"group_channels \(16\) must divide .* \(40, 80\) at a level with DCNv4 "
                                         r"layers \(\[40, 80\]\); allowed: \[1, 2, 4, 5, 8, 10, 20, 40\]"):
        DCNv4UNet2DModel(**config, levels=None)
    widths = matched_widths("tiny", 8, levels=[1])
    assert widths[0] % 16 and widths[0] % 8 == 0 and widths[1] % 16 == 0


@pytest.mark.parametrize("replace", [(name,) for name in REPLACEABLE] + [REPLACEABLE])
def test_sampled_levels_are_the_widths_the_built_model_samples_at(replace):
    """matched_widths and the group check read sampled_levels before any model exists; it must name exactly the
    levels whose widths the built model's DCNv4 layers sample at, for each conv kind and all of them together."""
    from unet_dcnv4.modules import DCNv4
    from unet_dcnv4.unet import sampled_levels

    widths = (16, 32, 48)  # one width a level, so a layer's width names its level
    config = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=widths, layers_per_block=1,
                  down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, norm_num_groups=8)
    for levels in (None, [1], [0, 2], "coarse"):  # between them, every conv kind's level rule
        if not sampled_levels(3, replace, levels):  # nothing to swap there: the model refuses to build
            with pytest.raises(ValueError, match="swaps no 3x3 conv"):
                DCNv4UNet2DModel(**config, replace=list(replace), levels=levels)
            continue
        with torch.device("meta"):
            model = DCNv4UNet2DModel(**config, replace=list(replace), levels=levels)
        built = {widths.index(m.channels) for m in model.modules() if isinstance(m, DCNv4)}
        assert tuple(sorted(built)) == sampled_levels(3, replace, levels), (replace, levels)


def test_time_rank_factorises_the_time_projection(tmp_path):
    """time_rank r makes each time projection Linear(time, r) then Linear(r, C_in), the second zero at the start (the
    model starts time-blind there) and learning from the first step; it needs time_offsets and reloads."""
    torch.manual_seed(0)
    # Every level: the first block's input (conv_in's output) does not depend on the time.
    model = build_unet("dcnv4", "tiny", 8, time_offsets=True, time_rank=4, levels=None)
    conv1 = model.down_blocks[0].resnets[0].conv1
    down, up = conv1.offset_time_proj
    assert (down.in_features, down.out_features, down.bias, up.out_features) == (conv1.time_channels, 4, None,
                                                                               conv1.in_channels)
    assert down.weight.abs().sum() > 0 and not up.weight.any() and not up.bias.any()
    full = build_unet("dcnv4", "tiny", 8, time_offsets=True, levels=None)
    count = lambda m: sum(p.numel() for p in m.offset_time_proj.parameters())  # noqa: E731
    assert count(conv1) == (conv1.time_channels + conv1.in_channels) * 4 + conv1.in_channels
    assert count(full.down_blocks[0].resnets[0].conv1) == (conv1.time_channels + 1) * conv1.in_channels
    x = torch.randn(1, 4, 8, 8)
    captured = []
    conv1.offset_mask.register_forward_hook(lambda m, a, out: captured.append(out.detach()))

    def offsets_at(t):
        captured.clear()
        with torch.no_grad():
            model(x, torch.tensor([t]))
        return captured[0]

    with torch.no_grad():
        conv1.offset_mask.weight.normal_(std=0.1)
    assert torch.equal(offsets_at(10), offsets_at(900))
    with torch.no_grad():
        up.weight.normal_(std=0.1)
    assert not torch.allclose(offsets_at(10), offsets_at(900))
    with torch.no_grad():
        up.weight.zero_()
    model(x.expand(2, -1, -1, -1), torch.tensor([10, 900])).sample.square().sum().backward()
    assert up.weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path)
    assert DCNv4UNet2DModel.from_pretrained(tmp_path).config.time_rank == 4
    with pytest.raises(ValueError, match=r"time_rank \(4\) is the rank of the time projections of time_offsets"):
        build_unet("dcnv4", "tiny", 8, time_rank=4)
    with pytest.raises(ValueError, match="time_rank must be a positive int"):
        build_unet("dcnv4", "tiny", 8, time_offsets=True, time_rank=0)


def test_matched_flops_and_the_saved_widths_reload(tmp_path):
    conv = model_report("conv", "tiny", 8)
    matched = build_unet("dcnv4", "tiny", 8, match="flops")
    assert abs(model_report(matched)["gflops"] / conv["gflops"] - 1) <= 0.05
    matched.save_pretrained(tmp_path)
    reloaded = DCNv4UNet2DModel.from_pretrained(tmp_path)
    assert tuple(reloaded.config.block_out_channels) == tuple(matched.config.block_out_channels)
    assert "match" not in reloaded.config


@pytest.mark.parametrize("kwargs, message", [
    (dict(match="memory"), "match must be one of"),
    (dict(match="params", tolerance=0.0001), "no block_out_channels"),
])
def test_matching_errors_name_the_argument(kwargs, message):
    from unet_dcnv4.unet import matched_widths

    with pytest.raises(ValueError, match=message):
        matched_widths("tiny", 8, **kwargs)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_time_offsets_let_the_first_conv_of_a_block_see_the_time(tmp_path, impl):
    """With time_offsets, the offsets and masks of a ResnetBlock2D's conv1 depend on the timestep (through a
    projection that starts at zero, so a fresh model is time-blind there), the projection learns through both
    paths of the layer, the hooks leave no embedding behind, and the option reloads."""
    torch.manual_seed(0)
    model = build_unet("dcnv4", "tiny", 8, time_offsets=True, impl=impl, levels=None).eval()
    block = model.down_blocks[0].resnets[0]
    captured = []
    handle = block.conv1.offset_mask.register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    x = torch.randn(1, 4, 8, 8)

    def offsets_at(t):
        captured.clear()
        with torch.no_grad():
            model(x, torch.tensor([t]))
        return captured[0]

    assert torch.equal(offsets_at(10), offsets_at(900))  # the block's input does not depend on t; the start is blind
    with torch.no_grad():
        block.conv1.offset_mask.weight.normal_(std=0.1)
        block.conv1.offset_time_proj.weight.normal_(std=0.1)
    assert not torch.allclose(offsets_at(10), offsets_at(900))
    handle.remove()
    assert block.conv1._time is None
    model.train()
    model(x, torch.tensor([500])).sample.square().sum().backward()
    assert block.conv1.offset_time_proj.weight.grad.abs().sum() > 0
    assert block.conv2.time_channels is None and model.conv_in.time_channels is None
    assert {id(p) for p in block.conv1.offset_time_proj.parameters()} <= {id(p) for p in model.offset_mask_parameters()}
    model.save_pretrained(tmp_path)
    loaded = DCNv4UNet2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.time_offsets is True
    saved, reloaded = model.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys() and all(torch.equal(saved[k], reloaded[k]) for k in saved)
    with torch.no_grad():  # equal weights; the matrix products may round differently in reloaded memory
        assert torch.allclose(model.eval()(x, torch.tensor([7])).sample, loaded(x, torch.tensor([7])).sample,
                              atol=1e-5)
    with pytest.raises(ValueError, match="call set_time"):
        block.conv1(torch.randn(1, block.conv1.in_channels, 8, 8))


def test_an_option_added_later_keeps_the_fingerprint_of_folders_saved_before_it(tmp_path):
    """A folder saved before the class gained an option (time_rank) loads with the option's default, which diffusers
    lists in `_use_default_values`; the fingerprint leaves such keys out, so it stays what it was when the folder
    was saved, and the samples made from it (whose manifests record it) stay reusable."""

    from unet_dcnv4.data import module_fingerprint

    build_unet("dcnv4", "tiny", 8).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["time_rank"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    old = DCNv4UNet2DModel.from_pretrained(tmp_path)
    assert "time_rank" in old.config["_use_default_values"]

    class Before(nn.Module):  # the model as the class without the option hashed it: no time_rank in its config
        def __init__(self):
            super().__init__()
            self.config = {k: v for k, v in old.config.items() if k != "time_rank"}

        def state_dict(self):
            return old.state_dict()

    assert module_fingerprint(old) == module_fingerprint(Before())
    explicit = build_unet("dcnv4", "tiny", 8, time_offsets=True, time_rank=4)
    assert module_fingerprint(explicit) != module_fingerprint(build_unet("dcnv4", "tiny", 8, time_offsets=True,
                                                                         time_rank=8))


def test_levels_swap_the_convs_of_the_levels_named(tmp_path):
    """levels: [1] in the two-level tiny U-Net swaps the convs that read the half-resolution maps (the second down
    block, the mid block, the first up block) and keeps the full-resolution ones (conv_in, conv_out, the first down
    block and its downsampler, the last up block, the upsampler's conv after upsampling) plain."""
    from diffusers.models.resnet import ResnetBlock2D

    model = build_unet("dcnv4", "tiny", 8, levels=[1])
    swapped = {name for name, m in model.named_modules() if isinstance(m, DCNv4Conv2d)}
    resnets = [name for name, m in model.named_modules() if isinstance(m, ResnetBlock2D)]
    coarse = [n for n in resnets if n.startswith(("down_blocks.1", "mid_block", "up_blocks.0"))]
    assert coarse and swapped == {f"{n}.{c}" for n in coarse for c in ("conv1", "conv2")}
    assert isinstance(model.conv_in, torch.nn.Conv2d) and isinstance(model.down_blocks[0].downsamplers[0].conv,
                                                                      torch.nn.Conv2d)
    assert isinstance(model.up_blocks[0].upsamplers[0].conv, torch.nn.Conv2d)
    full = {name for name, m in build_unet("dcnv4", "tiny", 8, levels=[0]).named_modules()
            if isinstance(m, DCNv4Conv2d)}
    assert {"conv_in", "conv_out", "down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv"} <= full
    assert not full & swapped
    model.save_pretrained(tmp_path)
    assert list(DCNv4UNet2DModel.from_pretrained(tmp_path).config.levels) == [1]
    with pytest.raises(ValueError, match=r"levels must be 'coarse', null or a list of resolution levels in \[0, 2\)"):
        build_unet("dcnv4", "tiny", 8, levels=[2])
