"""effnet.importers.tf_bundle against checkpoints TensorFlow writes itself, crafted bundles and fuzzed bytes.

TensorFlow is only imported here, as the reference writer; the reader under test never imports it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effnet.errors import CheckpointFormatError
from effnet.importers.tf_bundle import OBJECT_GRAPH_KEY, list_bundle, list_variables, read_bundle, read_variables

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
SRC = Path(__file__).resolve().parents[1] / "src"
RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def tf():
    import tensorflow

    return tensorflow


def _randomize(variables) -> None:
    for variable in variables:
        variable.assign(RNG.normal(size=variable.shape).astype(np.dtype(variable.dtype)))


def _files(prefix: Path) -> list[Path]:
    return sorted(prefix.parent.glob(prefix.name + ".*"))


@pytest.fixture(scope="module")
def keras_checkpoint(tf, tmp_path_factory):
    """A TF2 object-based checkpoint: Keras layers, slash-named tf.Variables, and optimizer state to be dropped.

    Returns (prefix, {expected name: array}). Names are what the object graph records (`full_name`): the
    tf.Variable's name without `:0`, which for Keras 3 is `variable.path`.
    """
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.DepthwiseConv2D(3, name="block1a_dwconv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(5, name="predictions")(x))
    _randomize(model.variables)
    optimizer = keras.optimizers.Adam()  # holds model variables too: they must still come back under their names
    optimizer.build(model.trainable_variables)

    extra = tf.Module()
    with tf.name_scope("stack_0/block_0/depthwise_conv2d"):
        extra.kernel = tf.Variable(RNG.normal(size=(3, 3, 4, 1)).astype(np.float32), name="depthwise_kernel")
    with tf.name_scope("stack_0/block_0/se"):
        extra.half = tf.Variable(RNG.normal(size=(2, 3)).astype(np.float16), name="half")
        extra.counts = tf.Variable(np.arange(-3, 3, dtype=np.int64) * 2**40, name="counts")
    slot_optimizer = tf.compat.v1.train.AdamOptimizer(0.1)  # makes `.OPTIMIZER_SLOT` keys
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(extra.kernel**2)
    slot_optimizer.apply_gradients([(tape.gradient(loss, extra.kernel), extra.kernel)])

    prefix = tmp_path_factory.mktemp("keras") / "ckpt"
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, extra=extra, slots=slot_optimizer)
    checkpoint.write(str(prefix))
    expected = {v.path: v.numpy() for v in model.variables}
    expected.update({v.name.removesuffix(":0"): v.numpy() for v in (extra.kernel, extra.half, extra.counts)})
    return prefix, expected


def _assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    for name, array in expected.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array, err_msg=name)


def test_tf2_checkpoint_variables_by_name(tf, keras_checkpoint):
    prefix, expected = keras_checkpoint
    variables = read_variables(prefix)
    _assert_same(variables, expected)
    assert "stack_0/block_0/depthwise_conv2d/depthwise_kernel" in variables
    assert "stem_bn/moving_variance" in variables
    assert list_variables(prefix) == {name: (str(a.dtype), a.shape) for name, a in expected.items()}

    # The raw view agrees with TensorFlow's own reader, key by key.
    reference = tf.train.load_checkpoint(str(prefix))
    raw = read_bundle(prefix)
    assert sorted(raw) == sorted(name for name, _ in tf.train.list_variables(str(prefix)))
    assert any("/.OPTIMIZER_SLOT/" in key for key in raw) and any(key.startswith("optimizer/") for key in raw)
    for key, array in raw.items():
        if key == OBJECT_GRAPH_KEY:
            assert array.shape == () and array.item() == reference.get_tensor(key)
        else:
            np.testing.assert_array_equal(array, reference.get_tensor(key), err_msg=key)
    assert list_bundle(prefix)[OBJECT_GRAPH_KEY] == ("string", ())


def test_saved_model_directory(tf, tmp_path):
    module = tf.Module()
    with tf.name_scope("stem"):
        module.kernel = tf.Variable(RNG.normal(size=(3, 3, 3, 8)).astype(np.float32), name="conv2d/kernel")
    module.scale = tf.Variable(np.float32(0.5), name="scale")
    module.preprocess = tf.function(
        lambda x: (x * 255.0 - 128.0) / 128.0 * module.scale,
        input_signature=[tf.TensorSpec([None, 4, 4, 3], tf.float32)])
    tf.saved_model.save(module, str(tmp_path))
    expected = {"stem/conv2d/kernel": module.kernel.numpy(), "scale": module.scale.numpy()}
    _assert_same(read_variables(tmp_path), expected)
    _assert_same(read_variables(tmp_path / "variables"), expected)
    _assert_same(read_variables(tmp_path / "variables" / "variables.index"), expected)


@pytest.fixture(scope="module")
def tf1_checkpoint(tf, tmp_path_factory):
    """A TF1 name-based checkpoint (tf.compat.v1.train.Saver), as the TF1 hub modules carry."""
    values = {
        "efficientnet-b2/stem/conv2d/kernel": RNG.normal(size=(3, 3, 3, 32)).astype(np.float32),
        "efficientnet-b2/stem/tpu_batch_normalization/gamma": RNG.normal(size=32).astype(np.float32),
        "efficientnet-b2/head/dense/kernel": RNG.normal(size=(64, 40)).astype(np.float32),  # the largest tensor
        "efficientnet-b2/head/dense/bias": RNG.normal(size=40).astype(np.float64),
        "efficientnet-b2/blocks_0/se/conv2d/kernel": RNG.normal(size=(1, 1, 4, 2)).astype(np.float16),
        "global_step": np.int64(123456789012),
        "counts": np.arange(5, dtype=np.int32),
        "pixels": np.arange(250, 256, dtype=np.uint8),
        "flags": np.array([True, False, True]),
    }
    bfloat16_value = np.array([1.5, -2.25, 2.0**100, -2.0**-7], dtype=np.float32)  # all exact in bfloat16
    graph = tf.compat.v1.Graph()
    with graph.as_default():
        variables = [tf.compat.v1.get_variable(name, initializer=value) for name, value in values.items()]
        variables.append(tf.compat.v1.get_variable("bf16", initializer=tf.cast(bfloat16_value, tf.bfloat16)))
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            prefix = tmp_path_factory.mktemp("tf1") / "model.ckpt"
            saver.save(session, str(prefix), write_meta_graph=False, write_state=False)
    return prefix, {**{k: np.asarray(v) for k, v in values.items()}, "bf16": bfloat16_value}


def test_tf1_checkpoint_keys_preserved(tf1_checkpoint):
    prefix, expected = tf1_checkpoint
    _assert_same(read_variables(prefix), expected)
    _assert_same(read_bundle(prefix), expected)
    assert list_variables(prefix)["bf16"] == ("bfloat16", (4,))


def test_multi_shard_data_files(tf, tmp_path):
    module = tf.Module()
    module.a = tf.Variable(RNG.normal(size=(4, 4)).astype(np.float32), name="a")
    module.b = tf.Variable(RNG.normal(size=(8, 4)).astype(np.float16), name="block/b")
    module.c = tf.Variable(np.arange(16, dtype=np.int64), name="c")
    policy = tf.train.experimental.MaxShardSizePolicy(max_shard_size=128)  # each tensor fits; they do not share
    options = tf.train.CheckpointOptions(experimental_sharding_callback=policy)
    prefix = tmp_path / "ckpt"
    tf.train.Checkpoint(m=module).write(str(prefix), options=options)
    assert len([f for f in _files(prefix) if ".data-" in f.name]) > 1
    _assert_same(read_variables(prefix), {v.name[:-2]: v.numpy() for v in (module.a, module.b, module.c)})


def test_sliced_variable_is_refused_clearly(tf, tmp_path):
    module = tf.Module()
    module.big = tf.Variable(np.zeros((16, 16), np.float32), name="big")
    options = tf.train.CheckpointOptions(
        experimental_sharding_callback=tf.train.experimental.MaxShardSizePolicy(max_shard_size=256))
    tf.train.Checkpoint(m=module).write(str(tmp_path / "ckpt"), options=options)
    assert list_variables(tmp_path / "ckpt") == {"big": ("float32", (16, 16))}
    with pytest.raises(CheckpointFormatError, match="'m/big/.ATTRIBUTES/VARIABLE_VALUE'.*sliced"):
        read_variables(tmp_path / "ckpt")


def test_corrupt_tensor_bytes_fail_the_crc(tf1_checkpoint, tmp_path):
    source, expected = tf1_checkpoint
    for file in _files(source):
        (tmp_path / file.name).write_bytes(file.read_bytes())
    prefix, name = tmp_path / source.name, "efficientnet-b2/head/dense/kernel"
    data_file = tmp_path / f"{source.name}.data-00000-of-00001"
    data = bytearray(data_file.read_bytes())
    position = data.find(expected[name].tobytes()) + 101
    data[position] ^= 0x40
    data_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match=rf"data-00000-of-00001: tensor '{name}': CRC32C mismatch"):
        read_variables(prefix)
    corrupt = read_variables(prefix, verify=False)[name]
    assert np.count_nonzero(corrupt != expected[name]) == 1


def test_reader_never_imports_tensorflow(keras_checkpoint):
    prefix, expected = keras_checkpoint
    code = (
        "import sys; from effnet.importers.tf_bundle import read_variables; "
        f"names = read_variables({str(prefix)!r}); "
        "assert 'tensorflow' not in sys.modules and 'google.protobuf' not in sys.modules, 'imported'; "
        "print(len(names))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(len(expected))


# --- crafted bundles: a minimal writer of our own, following the same spec -------------------------------------

def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    return _varint(number << 3) + _varint(value & (1 << 64) - 1)


def _mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _entry(dtype: int, shape: tuple[int, ...], offset: int, size: int, data: bytes = b"",
           slices: bool = False) -> bytes:
    shape_proto = b"".join(_field(2, _field(1, dim)) for dim in shape)
    crc = _mask(google_crc32c.value(data[offset:offset + size]))
    return (_field(1, dtype) + _field(2, shape_proto) + _field(4, offset) + _field(5, size)
            + _varint(6 << 3 | 5) + crc.to_bytes(4, "little") + (_field(7, b"") if slices else b""))


def _block(records: list[tuple[bytes, bytes]], block_type: int = 0) -> bytes:
    contents = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in records)
    contents += (0).to_bytes(4, "little") + (1).to_bytes(4, "little")  # one restart point, at 0
    stored = contents + bytes([block_type])
    return stored + _mask(google_crc32c.value(stored)).to_bytes(4, "little")


def _write_bundle(prefix: Path, entries: list[tuple[bytes, bytes]], data: bytes | None, *,
                  header: bytes = _field(1, 1), block_type: int = 0) -> Path:
    data_block = _block([(b"", header), *entries], block_type)
    index_block = _block([(b"\xff", _varint(0) + _varint(len(data_block) - 5))])
    meta_block = _block([])
    table = data_block + index_block + meta_block
    footer = (_varint(len(data_block) + len(index_block)) + _varint(len(meta_block) - 5)
              + _varint(len(data_block)) + _varint(len(index_block) - 5))
    Path(f"{prefix}.index").write_bytes(table + footer.ljust(40, b"\0") + (0xDB4775248B80FB57).to_bytes(8, "little"))
    if data is not None:
        Path(f"{prefix}.data-00000-of-00001").write_bytes(data)
    return prefix


def test_crafted_bundle_round_trip_and_big_endian(tmp_path):
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    little = values.astype("<f4").tobytes()
    _write_bundle(tmp_path / "le", [(b"w", _entry(1, (2, 3), 0, 24, little))], little)
    np.testing.assert_array_equal(read_bundle(tmp_path / "le")["w"], values)
    big = values.astype(">f4").tobytes()
    _write_bundle(tmp_path / "be", [(b"w", _entry(1, (2, 3), 0, 24, big))], big, header=_field(1, 1) + _field(2, 1))
    got = read_bundle(tmp_path / "be")["w"]
    np.testing.assert_array_equal(got, values)
    assert got.dtype == np.float32 and got.dtype.isnative


@pytest.mark.parametrize("dtype, shape, size", [
    (1, (2**20, 2**20, 2**20), 2**62),  # 2**60 float32: consistent with its size, far past the data file
    (1, (2**40, 2**40), 16),  # a shape that does not match the size
    (7, (2**40,), 16),  # 2**40 strings in 16 bytes
    (9, (2**28,), 2**31),  # size just past the data file
])
def test_enormous_claims_are_refused_without_allocating(tmp_path, dtype, shape, size):
    _write_bundle(tmp_path / "huge", [(b"w", _entry(dtype, shape, 0, size))], bytes(16))
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(CheckpointFormatError, match=r"huge\.index \(entry 'w'\)"):
            read_bundle(tmp_path / "huge")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20 and time.perf_counter() - started < 1.0


@pytest.mark.parametrize("entries, data, options, message", [
    ([(b"w", _entry(1, (4,), 0, 16, bytes(16)))], bytes(16), {"block_type": 1}, "Snappy-compressed"),
    ([(b"w", _entry(1, (4,), 0, 16, bytes(16)))], bytes(16), {"block_type": 7}, "compression type 7"),
    ([(b"w", _entry(1, (4,), 0, 16, bytes(16)))], None, {}, "data file .* is missing"),
    ([(b"w", _entry(21, (), 0, 4, bytes(4)))], bytes(4), {}, "tensor 'w': unsupported dtype variant"),
    ([(b"w", _entry(1, (4,), 0, 0, slices=True))], b"", {}, "tensor 'w': a sliced"),
    ([(b"b", _entry(1, (), 0, 4, bytes(4))), (b"a", _entry(1, (), 0, 4, bytes(4)))], bytes(4), {}, "out of order"),
    ([(b"w", _entry(7, (), 0, 14, b"\xff" * 9 + b"\x7f" + bytes(4)))], b"\xff" * 9 + b"\x7f" + bytes(4), {},
     "tensor 'w': a string length of 1180591620717411303423"),
    ([], b"", {"header": _field(1, 0)}, "claims 0 data shards"),
    ([], b"", {"header": _field(2, 5)}, "unknown endianness"),
    ([], b"", {"header": _field(1, 1) + _field(3, _field(2, 9))}, "newer format version"),
])
def test_crafted_malformed_bundles(tmp_path, entries, data, options, message):
    _write_bundle(tmp_path / "bad", entries, data, **options)
    with pytest.raises(CheckpointFormatError, match=message):
        read_bundle(tmp_path / "bad")


def test_missing_checkpoint_and_non_saved_model_dir(tmp_path):
    with pytest.raises(CheckpointFormatError, match="cannot read the checkpoint index"):
        read_bundle(tmp_path / "nothing")
    with pytest.raises(CheckpointFormatError, match="not a SavedModel"):
        read_variables(tmp_path)


# --- fuzzing: anything but a clean read or CheckpointFormatError is a bug ----------------------------------------

FUZZ = settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow], database=None)


def _read_everything(prefix: Path, verify: bool) -> None:
    for read in (lambda: read_bundle(prefix, verify=verify), lambda: read_variables(prefix, verify=verify),
                 lambda: list_variables(prefix)):
        try:
            read()
        except CheckpointFormatError:
            pass


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(data=st.data(), verify=st.booleans(), target=st.sampled_from(["index", "data"]))
def test_fuzz_truncations_and_flips(keras_checkpoint, scratch, data, verify, target):
    source, _ = keras_checkpoint
    prefix = scratch / "ckpt"
    for file in _files(source):
        contents = bytearray(file.read_bytes())
        if (target == "index") == file.name.endswith(".index"):
            if data.draw(st.booleans(), "truncate"):
                del contents[data.draw(st.integers(0, len(contents)), "length"):]
            else:
                flips = data.draw(st.lists(st.tuples(st.integers(0, len(contents) - 1), st.integers(1, 255)),
                                           min_size=1, max_size=4), "flips")
                for position, bits in flips:
                    contents[position] ^= bits
        (scratch / file.name.replace(source.name, "ckpt", 1)).write_bytes(bytes(contents))
    _read_everything(prefix, verify)


@FUZZ
@given(index=st.binary(max_size=300), with_magic=st.booleans(), data=st.binary(max_size=64))
def test_fuzz_garbage_files(scratch, index, with_magic, data):
    prefix = scratch / "garbage"
    if with_magic:
        index += (0xDB4775248B80FB57).to_bytes(8, "little")
    Path(f"{prefix}.index").write_bytes(index)
    Path(f"{prefix}.data-00000-of-00001").write_bytes(data)
    _read_everything(prefix, verify=False)


@FUZZ
@given(header=st.binary(max_size=16), entries=st.lists(st.binary(max_size=48), max_size=3),
       graph=st.binary(max_size=64), data=st.binary(max_size=64))
def test_fuzz_crafted_protos(scratch, header, entries, graph, data):
    """Valid tables holding random header, entry and object-graph protos: the proto decoding is what is fuzzed."""
    graph_entry = _entry(7, (), len(data), len(graph) + 5, b"")  # a string tensor, lengths and CRCs unchecked
    records = [(OBJECT_GRAPH_KEY.encode(), graph_entry)] + [(b"k%d" % i, e) for i, e in enumerate(entries)]
    prefix = _write_bundle(scratch / "protos", records, data + _varint(len(graph)) + bytes(4) + graph,
                           header=header or _field(1, 1))
    _read_everything(prefix, verify=False)


# --- effnet.importers.saved_model: Const nodes of saved_model.pb ---------------------------------------------------

@pytest.fixture(scope="module")
def constants_saved_model(tf, tmp_path_factory):
    module = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def preprocess(x):
        y = (x * 255.0 - 128.0) / 128.0
        y = (y - tf.constant([0.485, 0.456, 0.406])) / tf.constant([0.229, 0.224, 0.225])
        for value, dtype in [([-3, 2**40, 7], tf.int64), ([-5, 3, 9], tf.int32), ([200, 3, 9], tf.uint8),
                             ([1.5, -2.0, 0.25], tf.float16), ([1.5, -2.0, 0.25], tf.bfloat16),
                             ([True, False, True], tf.bool), ([2.0, 2.0, 2.0], tf.float64)]:
            y += tf.cast(tf.constant(value, dtype), tf.float32)
        return y + tf.cast(tf.constant(np.arange(30.0).reshape(10, 3)), tf.float32)[:1]

    module.preprocess = preprocess
    path = tmp_path_factory.mktemp("constants")
    tf.saved_model.save(module, str(path))
    return path


def test_saved_model_constants(tf, constants_saved_model):
    from tensorflow.core.protobuf import saved_model_pb2

    from effnet.importers.saved_model import graph_constants

    constants = graph_constants(constants_saved_model)
    scalars = {float(c.values) for c in constants if c.dtype == "float32" and c.shape == ()}
    assert {255.0, 128.0} <= scalars
    vectors = [c.values for c in constants if c.dtype == "float32" and c.shape == (3,)]
    assert any(np.array_equal(v, np.float32([0.485, 0.456, 0.406])) for v in vectors)

    # Every constant agrees with TensorFlow's own decoding of the same file.
    saved_model = saved_model_pb2.SavedModel.FromString((constants_saved_model / "saved_model.pb").read_bytes())
    graph = saved_model.meta_graphs[0].graph_def
    reference = [(None, n) for n in graph.node] + [(f.signature.name, n) for f in graph.library.function
                                                   for n in f.node_def]
    reference = [(function, n.name, n.attr["value"].tensor) for function, n in reference if n.op == "Const"]
    assert [(c.function, c.name) for c in constants] == [(function, name) for function, name, _ in reference]
    seen_dtypes = set()
    for constant, (_, _, tensor) in zip(constants, reference):
        assert constant.dtype == tf.dtypes.as_dtype(tensor.dtype).name and constant.shape == tuple(
            d.size for d in tensor.tensor_shape.dim)
        if constant.values is not None:
            expected = tf.make_ndarray(tensor)
            expected = expected.astype(np.float32) if constant.dtype == "bfloat16" else expected
            assert constant.values.dtype == expected.dtype, constant
            np.testing.assert_array_equal(constant.values, expected, err_msg=constant.name)
            seen_dtypes.add(constant.dtype)
    assert {"float32", "float64", "float16", "bfloat16", "int32", "int64", "uint8", "bool"} <= seen_dtypes


@FUZZ
@given(data=st.data())
def test_fuzz_saved_model(constants_saved_model, scratch, data):
    from effnet.importers.saved_model import graph_constants

    contents = bytearray((constants_saved_model / "saved_model.pb").read_bytes())
    if data.draw(st.booleans(), "truncate"):
        del contents[data.draw(st.integers(0, len(contents)), "length"):]
    for position, bits in data.draw(st.lists(st.tuples(st.integers(0, max(len(contents) - 1, 0)),
                                                       st.integers(1, 255)), max_size=4), "flips"):
        if position < len(contents):
            contents[position] ^= bits
    (scratch / "saved_model.pb").write_bytes(bytes(contents))
    try:
        graph_constants(scratch / "saved_model.pb")
    except CheckpointFormatError:
        pass
