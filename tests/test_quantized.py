"""Quantized weights: stored int8/int4 projections load into spans of every family, compute what their
stored values say, keep a fraction of the fp32 bytes, and serve through real daemons; perplexity through
the cluster equals transformers' own computation.

The exactness reference for a quantized span is the same model with every projection replaced by its
dequantized matrix: with the dequantizing product the span equals it within fp32 tolerance; with the
packed kernels (bfloat16 activations) it predicts the same tokens at nearly every position.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dllmctl.inference.perplexity import PerplexityRequest, Window, score, windows
from dllmctl.inference.generation import GenerationError
from dllmctl.models.importer import ModelImportError, import_model
from dllmd.models import quantized
from dllmd.models.quantization import Quantization, QuantizationError, choose_quantization, parse_quantization
from dllmd.models.quantized import QuantizedLinear, QuantizedWeight, check_device, pack_nibbles, quantize_weight, \
    unpack_nibbles
from dllmd.models.slicing import SliceError, slice_tensor
from dllmd.models.span import LayerSpan, projection_weight_names
from dllmd.models.store import Manifest, ModelStore, ModelStoreError
from dllmd.net.identity import Identity
from dllmd.net.messages.tensor import TensorSlice
from tests.conftest import run_cli
from tests.tiny_models import FAMILIES, make_tiny_model

INT8, INT4 = Quantization("int8"), Quantization("int4", 32)


def _weight(rows=64, columns=128, seed=0):
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)) * 0.05


def _stored(w: torch.Tensor, q: Quantization) -> QuantizedWeight:
    return QuantizedWeight.from_parts(q, "w", {f"w.{k}": v for k, v in quantize_weight(w, q).items()})


# --- the codec ----------------------------------------------------------------------------------


def test_int8_rounds_each_value_to_within_half_its_rows_step():
    w = _weight()
    stored = _stored(w, INT8)
    assert stored.qdata.dtype == torch.int8 and stored.scale.shape == (64,)
    error = (stored.dequantize() - w).abs()
    assert (error <= stored.scale[:, None] / 2 + 1e-7).all()


def test_int4_rounds_each_value_to_within_half_its_groups_step():
    w = _weight()
    stored = _stored(w, INT4)
    assert stored.qdata.dtype == torch.uint8 and stored.qdata.shape == (64, 64) and stored.scale.shape == (64, 4)
    step = stored.scale.to(torch.float32).repeat_interleave(32, dim=1)
    assert ((stored.dequantize() - w).abs() <= step / 2 + 2e-3).all()  # bf16 scales and zeros round a little


def test_nibbles_pack_two_values_per_byte_and_back():
    values = torch.randint(0, 16, (16, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    packed = pack_nibbles(values)
    assert packed.shape == (16, 32) and torch.equal(unpack_nibbles(packed), values)
    assert torch.equal(packed[:, 0] & 0x0F, values[:, 0].to(torch.uint8))  # the even column in the low nibble


@pytest.mark.parametrize("q", [INT8, INT4], ids=["int8", "int4"])
def test_the_packed_kernel_computes_the_stored_matrix(q):
    w, x = _weight(), torch.randn(3, 5, 128)
    stored = _stored(w, q)
    exact = x @ stored.dequantize().T
    fast = QuantizedLinear(stored, None, torch.device("cpu"))
    assert fast.kernel != "dequantize"  # this machine's build has the CPU kernels
    slow = QuantizedLinear(stored, None, torch.device("cpu"), kernel="dequantize")
    assert torch.allclose(slow(x), exact, atol=1e-5)
    assert torch.allclose(fast(x), exact, atol=0.02 * exact.abs().max().item())  # bfloat16 activations
    assert fast(x).dtype == torch.float32


def test_a_matrix_the_kernel_cannot_take_falls_back_to_dequantizing():
    stored = _stored(_weight(rows=24), INT4)  # the int4 CPU kernel wants rows in multiples of 16
    layer = QuantizedLinear(stored, torch.ones(24), torch.device("cpu"))
    assert layer.kernel == "dequantize"
    x = torch.randn(2, 128)
    assert torch.allclose(layer(x), x @ stored.dequantize().T + 1, atol=1e-5)


def test_int4_group_size_is_the_largest_that_divides_every_width():
    assert choose_quantization("int4", [576, 1536]) == Quantization("int4", 64)
    assert choose_quantization("int4", [256, 1024]) == Quantization("int4", 128)
    assert choose_quantization("int8", [7]) == INT8
    with pytest.raises(QuantizationError, match="multiple of 32"):
        choose_quantization("int4", [576, 100])
    with pytest.raises(QuantizationError, match="unknown quantization"):
        choose_quantization("int3", [64])
    # A source quantized in 32-column blocks (GGUF) keeps its blocks, where they divide the widths.
    assert choose_quantization("int4", [576, 1536], source_block=32) == Quantization("int4", 32)
    assert choose_quantization("int4", [256, 1024], source_block=16) == Quantization("int4", 128)
    for bad in ({"method": "int4", "group_size": 48}, {"method": 4}, "int8", {"method": "int8", "group_size": True}):
        with pytest.raises(QuantizationError):
            parse_quantization(bad)


def test_a_gguf_whose_layers_are_in_32_column_blocks_says_so(smollm2_gguf):
    from dllmctl.models.importer import _gguf_block_columns

    assert _gguf_block_columns(smollm2_gguf) == 32  # SmolLM2's Q4_1 layers


def test_damaged_parts_are_refused_by_name():
    parts = {f"w.{k}": v for k, v in quantize_weight(_weight(), INT4).items()}
    parts["w.scale"] = parts["w.scale"][:, :3]
    with pytest.raises(QuantizationError, match="w: the stored int4 parts do not fit"):
        QuantizedWeight.from_parts(INT4, "w", parts)


def test_a_device_without_kernels_or_fallback_is_refused():
    with pytest.raises(QuantizationError, match="CPU or CUDA"):
        check_device(INT8, torch.device("meta"))
    check_device(INT4, torch.device("cpu"))


# --- tensor-parallel slices of stored weights ----------------------------------------------------


def test_slices_of_stored_weights_are_the_slices_of_their_matrices():
    config = AutoConfig.for_model("phi3", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, num_hidden_layers=1, vocab_size=320)
    member = TensorSlice(group="g", rank=1, size=2, kv_lo=1, kv_hi=2, mlp_lo=64, mlp_hi=128)
    fused_qkv, fused_mlp = _weight(rows=128, columns=64), _weight(rows=256, columns=64, seed=1)
    down = _weight(rows=64, columns=128, seed=2)
    for q in (INT8, INT4):
        for name, w in (("model.layers.0.self_attn.qkv_proj.weight", fused_qkv),
                        ("model.layers.0.mlp.gate_up_proj.weight", fused_mlp), ("model.layers.0.mlp.down_proj.weight", down)):
            stored = _stored(w, q)
            got = slice_tensor(config, member, name, stored)
            assert isinstance(got, QuantizedWeight)
            assert torch.equal(got.dequantize(), slice_tensor(config, member, name, stored.dequantize())), (q, name)


def test_an_int4_column_slice_that_splits_a_group_is_refused():
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                  num_key_value_heads=2, num_hidden_layers=1, vocab_size=320)
    member = TensorSlice(group="g", rank=0, size=2, kv_lo=0, kv_hi=1, mlp_lo=0, mlp_hi=48)
    with pytest.raises(SliceError, match="split int4 groups of 32"):
        slice_tensor(config, member, "model.layers.0.mlp.down_proj.weight", _stored(_weight(64, 96), INT4))


# --- import and spans of every family ------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return ModelStore(tmp_path_factory.mktemp("qstore"))


@pytest.fixture(scope="module")
def importer():
    return Identity.generate()


def _family(family, store, importer, root, method):
    source = make_tiny_model(family, root / family)
    name = f"{family}-{method}"
    if not store.exists(name):
        import_model(source, store, importer, name=name, quantize=method)
    return source, name


def _dequantized_reference(source, store, name):
    """The full model with every projection's weight replaced by what the store's parts stand for."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    projections = projection_weight_names(model.config, 0, model.config.num_hidden_layers)
    stored = store.read_tensors(name, projections)
    state = model.state_dict()
    for tensor_name, weight in stored.items():
        state[tensor_name] = weight.dequantize()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_spans_compute_their_stored_weights(family, method, store, importer, tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp(f"q-{family}-{method}")
    source, name = _family(family, store, importer, root, method)
    manifest = store.verify(name)
    assert manifest.quantization.method == method
    config = AutoConfig.from_pretrained(source)
    n = config.num_hidden_layers
    ids = torch.randint(5, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(24)[None]
    reference = _dequantized_reference(source, store, name)
    with torch.no_grad():
        want = reference(ids).logits
        original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()(ids).logits

    def two_spans():
        front = LayerSpan(config, 0, 2, embed=True, head=False, tensors=store.tensor_source(name))
        back = LayerSpan(config, 2, n, embed=False, head=True, tensors=store.tensor_source(name))
        assert any(isinstance(m, QuantizedLinear) for m in back.modules())
        return back(front(ids, positions, front.new_cache()), positions, back.new_cache())

    fast = two_spans()
    with monkeypatch.context() as patch:
        patch.setattr(quantized, "_kernel_for", lambda weight, device: "dequantize")
        exact = two_spans()
    assert (exact - want).abs().max().item() < 1e-4
    top = want.argmax(-1)
    assert (fast.argmax(-1) == top).float().mean().item() >= 0.85
    if method == "int8":  # int4 on random weights (the worst case for 4 bits) loses about half the argmaxes
        assert (fast.argmax(-1) == original.argmax(-1)).float().mean().item() >= 0.85


def test_a_middle_span_holds_a_fraction_of_its_fp32_bytes(store, importer, tmp_path_factory):
    root = tmp_path_factory.mktemp("q-bytes")
    source = make_tiny_model("llama", root / "src", hidden_size=128, intermediate_size=512, num_attention_heads=4,
                             num_key_value_heads=2)
    config = AutoConfig.from_pretrained(source)
    sizes = {}
    for method in (None, "int8", "int4"):
        name = f"bytes-{method or 'fp32'}"
        manifest = import_model(source, store, importer, name=name, quantize=method)
        span = LayerSpan(config, 1, 4, embed=False, head=False, tensors=store.tensor_source(name))
        sizes[method] = (span.weight_bytes, sum(manifest.layers[i].bytes for i in range(1, 4)))
    for method, limit in (("int8", 0.35), ("int4", 0.2)):
        held, stored = sizes[method]
        assert held <= limit * sizes[None][0] and stored <= limit * sizes[None][1], (method, sizes)


def test_manifests_record_the_quantization_and_old_ones_still_verify(store, importer, tmp_path_factory):
    root = tmp_path_factory.mktemp("q-manifest")
    source = make_tiny_model("llama", root / "src")
    plain = import_model(source, store, importer, name="plain")
    assert "quantization" not in plain.to_dict()  # the signed form of an unquantized model is unchanged
    store.verify("plain")
    packed = import_model(source, store, importer, name="packed", quantize="int4")
    assert packed.to_dict()["quantization"] == {"method": "int4", "group_size": 64}
    assert Manifest.from_bytes(packed.canonical_bytes()) == packed
    bad = {**packed.to_dict(), "quantization": {"method": "int2"}}
    with pytest.raises(ModelStoreError, match="unknown quantization"):
        Manifest.from_dict(bad)
    with pytest.raises(ModelImportError, match="unknown quantization"):
        import_model(source, store, importer, name="nope", quantize="int2")


# --- perplexity ----------------------------------------------------------------------------------


def test_windows_score_every_token_but_the_first_once():
    for tokens, window, stride in ((10, 4, 2), (300, 256, 128), (5, 8, 3), (257, 256, 255)):
        plan = windows(tokens, window, stride)
        scored = [i for w in plan for i in range(w.scored_from, w.end)]
        assert scored == list(range(1, tokens)), (tokens, window, stride)
        assert all(w.end - w.begin <= window and w.scored_from > w.begin for w in plan)
    for bad in ((10, 1, 1), (10, 4, 4), (1, 4, 2), (10, 513, 2)):
        with pytest.raises(GenerationError):
            windows(*bad)


def test_score_is_the_targets_cross_entropy():
    logits = torch.randn(6, 11)
    ids = [3, 1, 4, 1, 5, 9, 2]
    w = Window(begin=1, end=7, scored_from=3)
    nll, top = score(logits, ids, w)
    want = -sum(torch.log_softmax(logits[i - 2], -1)[ids[i]].item() for i in range(3, 7))
    assert abs(nll - want) < 1e-5 and top == logits[1:5].argmax(-1).tolist()


# --- through real daemons ------------------------------------------------------------------------

TEXT = ("Distributed inference splits the layers of a model across the machines you already own. " * 6
        + "The quick brown fox jumps over the lazy dog. Beautiful is better than ugly.")


def _ok(done):
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("q-cluster")
    env = {"DLLM_CONFIG_DIR": str(root / "config"), "DLLM_DATA_DIR": str(root / "data"),
           "DLLM_CACHE_DIR": str(root / "cache")}
    _ok(run_cli("dllmctl", "init", "--json", env=env))
    _ok(run_cli("dllmctl", "cluster", "up", "--local", "2", "--dir", str(root / "c"), "--json", env=env))
    source = make_tiny_model("llama", root / "src", num_hidden_layers=6)
    for method in (None, "int8", "int4"):
        name = f"tiny-{method or 'fp32'}"
        _ok(run_cli("dllmctl", "model", "import", str(source), "--name", name, "--json",
                    *(["--quantize", method] if method else []), env=env))
        _ok(run_cli("dllmctl", "deploy", name, "--json", env=env))
    yield {"env": env, "source": source, "store": ModelStore(root / "data" / "models"), "root": root}
    run_cli("dllmctl", "cluster", "down", "--dir", str(root / "c"), env=env)


def _local_greedy(store, name, config, prompt, new_tokens):
    """The whole quantized model as one span in this process, prompt then one token per step."""
    span = LayerSpan(config, 0, config.num_hidden_layers, embed=True, head=True, tensors=store.tensor_source(name))
    cache, feed, out = span.new_cache(), list(prompt), []
    for _ in range(new_tokens):
        positions = torch.arange(cache.length, cache.length + len(feed))[None]
        token = int(span(torch.tensor([feed]), positions, cache)[0, -1].argmax())
        out.append(token)
        feed = [token]
    return out


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_models_generate_through_daemons_as_they_do_locally(cluster, method):
    name = f"tiny-{method}"
    rows = _ok(run_cli("dllmctl", "nodes", "list", "--json", env=cluster["env"]))
    spans = [s for r in rows for s in r["serving"] if s["model"] == name]
    assert len(spans) == 2 and sorted((s["start"], s["end"]) for s in spans)[0][0] == 0
    got = _ok(run_cli("dllmctl", "infer", "The quick brown fox", "-m", name, "--raw", "--max-new-tokens", "10",
                      "--temperature", "0", "--parallelism", "model", "--json", env=cluster["env"]))
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(cluster["source"])("The quick brown fox")["input_ids"]
    config = AutoConfig.from_pretrained(cluster["source"])
    want = _local_greedy(cluster["store"], name, config, prompt, len(got["token_ids"]))
    assert got["token_ids"] == want


def test_plans_count_the_quantized_bytes(cluster):
    sizes = {}
    for label in ("fp32", "int8", "int4"):
        plan = _ok(run_cli("dllmctl", "plan", f"tiny-{label}", "--json", env=cluster["env"]))
        sizes[label] = sum(s["bytes"] for s in plan["spans"])
    # Embeddings (tied to the head) stay fp32, so whole-model ratios are above the per-layer ones.
    assert sizes["int4"] < sizes["int8"] < 0.8 * sizes["fp32"], sizes


def test_perplexity_through_the_cluster_equals_transformers(cluster, tmp_path):
    text = tmp_path / "held-out.txt"
    text.write_text(TEXT)
    got = _ok(run_cli("dllmctl", "eval", "perplexity", "-m", "tiny-fp32", "--text", str(text), "--window", "32",
                      "--stride", "16", "--json", env=cluster["env"]))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cluster["source"])
    model = AutoModelForCausalLM.from_pretrained(cluster["source"], dtype=torch.float32).eval()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    total = 0.0
    for w in windows(len(ids), 32, 16):
        labels = torch.tensor([ids[w.begin:w.end]])
        labels[0, :w.scored_from - w.begin] = -100  # context only
        with torch.no_grad():
            out = model(torch.tensor([ids[w.begin:w.end]]), labels=labels)
        total += out.loss.item() * (w.end - w.scored_from)
    want = total / (len(ids) - 1)
    assert got["tokens"] == len(ids) and got["scored"] == len(ids) - 1
    assert abs(got["nll"] - want) < 1e-4 * max(1.0, want)

    compared = _ok(run_cli("dllmctl", "eval", "perplexity", "-m", "tiny-int8", "--reference", "tiny-fp32", "--text",
                           str(text), "--window", "32", "--stride", "16", "--json", env=cluster["env"]))
    assert compared["reference"]["nll"] == got["nll"]
    assert 0.9 <= compared["perplexity_ratio"] <= 1.1 and compared["top1_agreement"] >= 0.85


def test_perplexity_refuses_bad_requests_with_a_message(cluster, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hi")
    done = run_cli("dllmctl", "eval", "perplexity", "-m", "tiny-fp32", "--text", str(text), "--window", "8",
                   "--stride", "8", env=cluster["env"])
    assert done.returncode != 0 and "stride" in done.stderr
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    done = run_cli("dllmctl", "eval", "perplexity", "-m", "tiny-fp32", "--text", str(binary), env=cluster["env"])
    assert done.returncode != 0 and "UTF-8" in done.stderr
    done = run_cli("dllmctl", "eval", "perplexity", "-m", "nope", "--text", str(text), env=cluster["env"])
    assert done.returncode != 0 and "nope" in done.stderr
    assert PerplexityRequest("m", "x").window == 256
