"""ONNX in and out (mixbct_jax.onnx_io), checked with onnxruntime against the Flax model.

Import is tested on graphs made the way insightface made its model packs: the PyTorch IResNet exported by
``torch.onnx.export`` in eval mode with constant folding (BatchNorms folded into the convolutions, PReLU slopes
reshaped, the Linear as Gemm). Export is tested by running the written file in onnxruntime.
"""

import io
import pathlib
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from test_convert import (  # noqa: E402
    STAGES,
    TorchIResNet,
    assert_parity,
    flax_embed,
    images,
    random_flax_variables,
    randomize_torch,
    torch_embed,
)

from mixbct_jax import checkpoint, convert, models, onnx_io  # noqa: E402


def run_onnx(model, x_nchw: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x_nchw})[0]


def torch_onnx(model: torch.nn.Module, size: int = 112) -> "onnx.ModelProto":
    """The PyTorch model exported as insightface did (legacy exporter, eval mode, constant folding)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            model.eval(),
            torch.zeros(1, 3, size, size),
            buf,
            input_names=["input.1"],
            dynamo=False,
            do_constant_folding=True,
            opset_version=13,
            dynamic_axes={"input.1": {0: "N"}},
        )
    return onnx.load_from_string(buf.getvalue())


@pytest.fixture(scope="module")
def r18_pack(tmp_path_factory):
    """A randomised PyTorch r18 (D=128) and its ONNX file in insightface's layout."""
    net = randomize_torch(TorchIResNet(STAGES["r18"], 128), seed=3)
    path = tmp_path_factory.mktemp("onnx") / "r18.onnx"
    onnx.save(torch_onnx(net), str(path))
    return path, net


def test_pack_layout_has_folded_batchnorms(r18_pack):
    path, _ = r18_pack
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    # Folded: 21 convolutions but only the BatchNorms that do not follow a convolution remain (8 block bn1, bn2,
    # features).
    assert ops.count("Conv") == 21 and ops.count("BatchNormalization") == 10 and "Gemm" in ops


def test_import_matches_onnxruntime_and_pytorch(r18_pack, tmp_path, capsys):
    path, net = r18_pack
    info = onnx_io.import_onnx(path, tmp_path / "run")
    assert info == dict(arch="r18", embedding_size=128, input_size=112, width=1.0)
    assert "converted" in capsys.readouterr().out
    config, variables = checkpoint.load_params(tmp_path / "run")
    assert config.model.arch == "r18" and config.data.input_scale == "clean"
    x, xt = images(seed=5, n=3)
    jax_emb = flax_embed(models.build("r18", embedding_size=128), variables, x)
    assert_parity(jax_emb, run_onnx(onnx.load(str(path)), xt.numpy()), "onnx r18 import vs onnxruntime")
    assert_parity(jax_emb, torch_embed(net, xt), "onnx r18 import vs pytorch")


def test_export_runs_in_onnxruntime_and_round_trips(tmp_path):
    net = models.build("r18", embedding_size=64)
    variables = random_flax_variables(net, seed=7)
    config = convert.converted_config("r18", 64, 112, "test")
    checkpoint.save_model_only(tmp_path / "run", config, variables)
    model = onnx_io.export_onnx(tmp_path / "run", tmp_path / "r18.onnx")
    assert (tmp_path / "r18.onnx").is_file()
    x, xt = images(seed=2, n=3)
    jax_emb = flax_embed(net, variables, x)
    assert_parity(run_onnx(model, xt.numpy()), jax_emb, "onnx r18 export vs flax")
    # Back in: the same variables exactly (export keeps every BatchNorm as a node).
    back, info = onnx_io.onnx_to_flax(onnx.load(str(tmp_path / "r18.onnx")))
    assert info["arch"] == "r18"
    flat_a = dict(convert.traverse_util.flatten_dict(variables))
    flat_b = dict(convert.traverse_util.flatten_dict(back))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_allclose(flat_b[key], flat_a[key], rtol=0, atol=1e-7, err_msg="/".join(key))


def test_scaled_down_model_round_trips_through_onnx():
    """A width-0.25 IResNet at 32 px (the demo's size) exports and imports with its width and input size."""
    net = models.build("r_tiny", embedding_size=16, input_size=32, width=0.25)
    import jax
    import jax.numpy as jnp

    variables = jax.tree.map(np.asarray, net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    model = onnx_io.flax_to_onnx(variables, "r_tiny", 16, 32, 0.25)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(
        run_onnx(model, x.transpose(0, 3, 1, 2).copy()), flax_embed(net, variables, x), rtol=0, atol=1e-4
    )
    _, info = onnx_io.onnx_to_flax(model, "r_tiny")
    assert info == dict(arch="r_tiny", embedding_size=16, input_size=32, width=0.25)


def test_wrong_depth_is_named(r18_pack):
    path, _ = r18_pack
    with pytest.raises(ValueError, match=r"layer1\.2\.conv1\.weight needs .*fit --arch r18"):
        onnx_io.onnx_to_flax(onnx.load(str(path)), "r34", where=str(path))
    with pytest.raises(ValueError, match="layer2.0.conv1.weight needs .*fit --arch r18"):
        onnx_io.onnx_to_flax(onnx.load(str(path)), "r_tiny", where=str(path))


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all \x00\xff")
    with pytest.raises(ValueError, match=f"--onnx {bad} is not a readable ONNX model"):
        onnx_io.import_onnx(bad, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no such file"):
        onnx_io.import_onnx(tmp_path / "missing.onnx", tmp_path / "out")


def test_input_scaling_inside_the_graph_is_refused():
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Sub", ["data", "mean"], ["x0"]), helper.make_node("Conv", ["x0", "w"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "mx",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            onnx.numpy_helper.from_array(np.float32([127.5]), "mean"),
            onnx.numpy_helper.from_array(np.zeros((64, 3, 3, 3), np.float32), "w"),
        ],
    )
    with pytest.raises(ValueError, match="scales the input inside the graph"):
        onnx_io._param_ops(helper.make_model(graph), "mx.onnx")


def test_export_refuses_a_directory(tmp_path):
    net = models.build("r_tiny", embedding_size=8, input_size=32, width=0.25)
    import jax
    import jax.numpy as jnp

    variables = jax.tree.map(np.asarray, net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    config = convert.converted_config("r_tiny", 8, 32, "test")
    with config.unlocked():
        config.model.width = 0.25
    checkpoint.save_model_only(tmp_path / "run", config, variables)
    (tmp_path / "dir").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        onnx_io.export_onnx(tmp_path / "run", tmp_path / "dir")


def test_package_onnx_module_imports_without_onnx_runtime_use():
    """Importing the module does not import onnx (only reading/writing does)."""
    import subprocess
    import sys

    code = "import sys, mixbct_jax.onnx_io; assert 'onnx' not in sys.modules, 'onnx imported at module load'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parents[1])


def test_convert_command_line_imports_and_exports_onnx(r18_pack, tmp_path):
    """`convert --onnx` makes a run directory; `convert --export RUN --out x.onnx` writes ONNX back."""
    path, net = r18_pack
    convert.main(["--onnx", str(path), "--out", str(tmp_path / "run")])
    convert.main(["--export", str(tmp_path / "run"), "--out", str(tmp_path / "again.onnx")])
    x, xt = images(seed=9, n=2)
    np.testing.assert_allclose(
        run_onnx(onnx.load(str(tmp_path / "again.onnx")), xt.numpy()), torch_embed(net, xt), rtol=0, atol=1e-4
    )
    with pytest.raises(SystemExit):  # argparse usage error: the graph says what these are
        convert.main(["--onnx", str(path), "--embedding_size", "128", "--out", str(tmp_path / "x")])


def test_convert_width_imports_a_scaled_down_torch_iresnet(tmp_path):
    """`--width 0.25` round trip of a scaled-down IResNet through a PyTorch file."""
    import jax
    import jax.numpy as jnp

    net = models.build("r_tiny", embedding_size=16, input_size=32, width=0.25)
    variables = jax.tree.map(np.asarray, net.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), train=False))
    state = convert.flax_to_torch(variables, "r_tiny", 16, 32, 0.25)
    for value in state.values():
        value.flags.writeable = False  # as arrays restored from a checkpoint can be
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no foreign warning (torch's read-only-array one) reaches the user
        convert.save_torch_state_dict(state, tmp_path / "tiny.pt")
    convert.main(
        [
            "--torch",
            str(tmp_path / "tiny.pt"),
            "--arch",
            "r_tiny",
            "--input-size",
            "32",
            "--width",
            "0.25",
            "--out",
            str(tmp_path / "run"),
        ]
    )  # the hyphenated spelling still works
    config, back = checkpoint.load_params(tmp_path / "run")
    assert config.model.width == 0.25
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b)
