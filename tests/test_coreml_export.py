"""The export's structure (manifest against packages, fixed shapes, TDTM functions, shared weights),
its compression, and its answers to bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("coremltools")

from mlx_sora.conversion.loading import load_model  # noqa: E402
from mlx_sora.conversion.registry import DEMO_MODEL_DIR  # noqa: E402
from mlx_sora.coreml import stdit3 as coreml_stdit3  # noqa: E402
from mlx_sora.coreml import t5 as coreml_t5  # noqa: E402
from mlx_sora.coreml.export import unit_weights  # noqa: E402
from mlx_sora.coreml.manifest import read_manifest  # noqa: E402
from mlx_sora.coreml.package import build_function, convert_unit, parse_compression, save_model  # noqa: E402
from mlx_sora.coreml.replay import PackageReplay, load_program, replay_function  # noqa: E402
from mlx_sora.coreml.toolkit import coremltools  # noqa: E402
from mlx_sora.errors import UserError  # noqa: E402
from mlx_sora.export_coreml import main  # noqa: E402
from mlx_sora.prompts.tokenizer import T5Tokenizer  # noqa: E402

# Measured on the demo model's T5 block_00 (hidden 64) / STDiT3 block_00 (hidden 128) against MLX float32,
# float16 compute: int8 5.6e-3 / 2.2e-3, palette8 5.3e-3 / 2.2e-3, palette6 2.1e-2 / 9.6e-3, int4 8.9e-2 /
# 3.5e-2 (README "Export to Core ML"); asserted with a margin.
COMPRESSION_TOLERANCE = {"int8": 3e-2, "palette8": 3e-2, "palette6": 8e-2, "int4": 0.25}
COMPRESSION_OPS = {"int8": "constexpr_blockwise_shift_scale", "int4": "constexpr_blockwise_shift_scale",
                   "palette8": "constexpr_lut_to_dense", "palette6": "constexpr_lut_to_dense"}


def spec_features(package: Path) -> dict:
    spec = coremltools().models.MLModel(str(package), skip_model_load=True).get_spec()
    return {f.name: f for f in spec.description.functions}


def test_manifest_names_every_input_and_output_of_every_package(demo_export_fp32):
    manifest = read_manifest(demo_export_fp32)
    decoding = manifest.data["phases"]["decoding"]
    units = [*manifest.units("text_encoding"), *manifest.units("denoising"), *decoding["temporal"], *decoding["spatial"]]
    assert len(units) == 4 + 6 + 12
    for unit in units:
        functions = spec_features(manifest.package(unit))
        assert set(functions) == set(unit["functions"]), unit["name"]
        for name, described in unit["functions"].items():
            spec = functions[name]
            assert [i.name for i in spec.input] == [i["name"] for i in described["inputs"]]
            assert [o.name for o in spec.output] == [o["name"] for o in described["outputs"]]
            for feature, entry in zip(spec.input, described["inputs"]):
                array = feature.type.multiArrayType
                assert list(array.shape) == entry["shape"]  # a fixed shape: neither ranges nor enumerations
                assert array.WhichOneof("ShapeFlexibility") is None
    blocks = [u for u in manifest.units("denoising") if u["name"].startswith("block_")]
    assert all(set(u["functions"]) == {"latent5x8x8", "latent5x8x8_tdtm"} for u in blocks)
    size = manifest.sizes[0]
    assert size["functions"]["stdit3"]["blocks_tdtm"] == "latent5x8x8_tdtm"
    assert len(size["timesteps"]) == manifest.data["sampler"]["num_steps"] == 30
    assert size["ci_dl"]["fits"] and set(size["ci_dl"]["phases"]) == {"text_encoding", "denoising", "decoding"}


def test_the_tdtm_function_shares_the_weights_of_its_block(demo_export_fp32):
    """Both functions of a block package read one weight file, as big as one function's weights."""
    manifest = read_manifest(demo_export_fp32)
    block = next(u for u in manifest.units("denoising") if u["name"] == "block_00")
    model = load_model(DEMO_MODEL_DIR / "stdit3", dtype="float32")
    weights = unit_weights(DEMO_MODEL_DIR / "stdit3", model, model.units[1])
    float32_bytes = sum(v.nbytes for v in weights.values())
    assert float32_bytes <= block["weight_bytes"] < 1.1 * float32_bytes


def _t5_unit_functions(unit: str):
    model = load_model(DEMO_MODEL_DIR / "text_encoder", dtype="float32")
    index = [u.name for u in model.units].index(unit)
    weights = unit_weights(DEMO_MODEL_DIR / "text_encoder", model, model.units[index])
    return model, index, coreml_t5.unit_functions(model.config, unit, weights, 20)


@pytest.mark.parametrize("kind", ["int8", "palette8", "palette6", "int4"])
def test_compressed_blocks_stay_within_their_tolerance(kind, tmp_path):
    model, _, functions = _t5_unit_functions("block_00")
    stdit = load_model(DEMO_MODEL_DIR / "stdit3", dtype="float32")
    stdit_weights = unit_weights(DEMO_MODEL_DIR / "stdit3", stdit, stdit.units[1])
    stdit_functions = coreml_stdit3.unit_functions(stdit.config, "block_00", stdit_weights, [((3, 4, 4), (32, 32))],
                                                   tdtm=False)
    rng = np.random.default_rng(0)
    tokens = T5Tokenizer.from_folder(DEMO_MODEL_DIR / "text_encoder")(["a red circle moving left"], max_length=20)
    x, bias = model.units[0].run(model.check_inputs(tokens.input_ids, tokens.attention_mask))
    t5_inputs = {"hidden": np.array(x), "bias": np.where(np.array(bias) < -1e30, -4096.0, np.array(bias))}
    t5_want = np.array(model.blocks[0](x, bias))
    d = stdit.config.hidden_size
    st_inputs = {"tokens": rng.standard_normal((2, 3, 4, d)).astype(np.float32),
                 "y": rng.standard_normal((2, 20, d)).astype(np.float32),
                 "t_mlp": rng.standard_normal((2, 6 * d)).astype(np.float32) * 0.1,
                 "caption_bias": np.zeros((2, 1, 1, 20), np.float32)}
    # the float32 program of the block (equal to the MLX block: tests/test_coreml_units.py)
    st_want = replay_function(build_function(stdit_functions[0])[0], st_inputs)["tokens_out"]
    units = [("t5", functions, t5_inputs, t5_want), ("stdit3", stdit_functions, st_inputs, st_want)]
    if kind.startswith("palette"):  # k-means over the demo T5's small weights runs scikit-learn (slow): STDiT3's
        units = units[1:]
    for name, fns, inputs, want in units:
        model_, _ = convert_unit(fns, "float16", kind)
        save_model(model_, tmp_path / f"{name}.mlpackage")
        replay = PackageReplay(tmp_path / f"{name}.mlpackage")
        ops = {op.op_type for op in replay.program.functions[fns[0].name].operations}
        assert COMPRESSION_OPS[kind] in ops, (name, ops)
        (got,) = replay(inputs, fns[0].name).values()
        error = float(np.abs(got - want).max() / np.abs(want).max())
        assert error <= COMPRESSION_TOLERANCE[kind], (name, kind, error)


def test_lookup_tables_are_never_compressed(tmp_path):
    _, _, functions = _t5_unit_functions("embed")
    model, _ = convert_unit(functions, "float16", "int8")
    save_model(model, tmp_path / "embed.mlpackage")
    ops = [op for op in load_program(tmp_path / "embed.mlpackage").functions["main"].operations]
    assert not any(op.op_type.startswith("constexpr_") for op in ops)
    gather = next(op for op in ops if op.op_type == "gather")
    assert gather.x.val is not None and gather.x.val.dtype == np.float16  # the table, as a plain constant


def test_float16_calibration_keeps_overflowing_ops_in_float32():
    """An op whose output, input or accumulated sum exceeds float16's safe range on calibration inputs
    stays float32; the others are cast."""
    from coremltools.converters.mil import Builder as mb

    from mlx_sora.coreml.mil import Net, f32
    from mlx_sora.coreml.package import ActivationStats, calibrate
    from mlx_sora.coreml.spec import TensorSpec, UnitFunction

    def build(net: Net, inputs: dict) -> dict:
        big = net.mul(inputs["x"], f32(3000.0), "big")  # 3000 * |x| > 65504 / 8: its output
        zero = net.sub(big, big, "zero")  # its input
        small = net.mul(zero, f32(2.0), "small")
        mean = mb().reduce_mean(x=inputs["y"], axes=[-1], keep_dims=True, name=net.name("mean"))  # sums 2000 x 10
        return {"out": net.add(net.mul(mean, f32(0.5), "half"), small, "sum")}

    fn = UnitFunction("main", (TensorSpec("x", (4,)), TensorSpec("y", (1, 2000))), build)
    stats = ActivationStats()
    calibrate(fn, {"x": np.array([1.0, -5.0, 2.0, 0.5], np.float32), "y": np.full((1, 2000), 10.0, np.float32)}, stats)
    assert stats.unsafe_in_fp16() == {"big", "zero", "mean"}
    model, built = convert_unit([fn], "float16", "none", stats.unsafe_in_fp16())
    assert built.fp32_ops == ["big", "mean", "zero"]


def test_compression_option_parsing():
    components = ("text_encoder", "stdit3", "vae")
    assert parse_compression(["text_encoder=int8"], components) == {"text_encoder": "int8", "stdit3": "none", "vae": "none"}
    assert parse_compression(["palette6", "vae=none"], components) == {"text_encoder": "palette6", "stdit3": "palette6",
                                                                      "vae": "none"}
    with pytest.raises(UserError, match="choose one of"):
        parse_compression(["int3"], components)
    with pytest.raises(UserError, match="unknown component"):
        parse_compression(["unet=int8"], components)


# ---------------------------------------------------------------------------- bad input


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def test_unknown_model_folder(capsys, tmp_path):
    code, err = run_cli(capsys, "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_size_the_vae_cannot_decode(capsys, tmp_path):
    code, err = run_cli(capsys, "--out", str(tmp_path / "out"), "--sizes", "60x64x17")
    assert code == 2 and "multiples of 8" in err and "60x64x17" in err
    code, err = run_cli(capsys, "--out", str(tmp_path / "out"), "--sizes", "64by64")
    assert code == 2 and "HEIGHTxWIDTHxFRAMES" in err


def test_out_inside_the_source_or_over_a_folder_we_did_not_write(capsys, tmp_path):
    code, err = run_cli(capsys, "--out", str(DEMO_MODEL_DIR / "vae" / "coreml"))
    assert code == 2 and "--out" in err and "source folder" in err
    assert not (DEMO_MODEL_DIR / "vae" / "coreml").exists()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        code, err = run_cli(capsys, "--out", str(theirs), *extra)
        assert code == 2 and str(theirs) in err
    assert (theirs / "notes.txt").read_text() == "mine" and len(list(theirs.iterdir())) == 1


def test_overwrite_replaces_only_a_previous_export(capsys, demo_export_fp32):
    code, err = run_cli(capsys, "--out", str(demo_export_fp32))
    assert code == 2 and "--overwrite" in err
    manifest = json.loads((demo_export_fp32 / "manifest.json").read_text())
    assert manifest["format"] == "mlx_sora.coreml"  # untouched


def test_coremltools_missing_says_how_to_install(tmp_path):
    code = ("import sys; sys.modules['coremltools'] = None\n"
            "from mlx_sora.export_coreml import main\n"
            f"sys.exit(main(['--out', {str(tmp_path / 'out')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "coremltools" in done.stderr and '.[coreml]' in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_tampered_manifest_is_refused(tmp_path, demo_export_fp32):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(demo_export_fp32, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["phases"]["denoising"]["units"][0]["file"] = "../../etc/passwd.mlpackage"
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="inside the folder"):
        read_manifest(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_manifest(copy)


def test_the_faster_float16_overflow_check_answers_as_coremltools():
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    from mlx_sora.coreml.toolkit import faster_conversion

    values = {"small": [1.0, -2.0], "large": [7e4, 1.0], "huge_negative": [-65505.0], "infinite": [-np.inf, 3.0],
              "beyond_1e38": [2e38], "nan": [np.nan, 1.0], "edge": [65504.0]}
    for name, value in values.items():
        @mb.program(input_specs=[mb.TensorSpec(shape=(len(value),), dtype=types.fp32)])
        def prog(x):
            return mb.add(x=x, y=np.array(value, np.float32))

        op = next(op for op in prog.functions["main"].operations if op.op_type == "add")
        want = FP16ComputePrecision().fp16_overflow(op)
        with faster_conversion():
            got = FP16ComputePrecision().fp16_overflow(op)
        assert FP16ComputePrecision().fp16_overflow(op) == want  # restored
        assert got == want, name
