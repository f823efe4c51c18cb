"""The shipped tiny bases: their recipe is the code's, they install, load, and round-trip."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open

from moshivis_lab import bases
from moshivis_lab.artefacts import Stage, read_json
from moshivis_lab.config import LMConfig, preset
from moshivis_lab.model.checkpoint import read_config
from moshivis_lab.world.tokenizer import TextTokenizer


@pytest.fixture
def tiny(tmp_path):
    return preset("tiny", tmp_path / "data")


def test_shipped_recipe_is_the_codes(tiny) -> None:
    status = bases.check_bases(tiny)
    assert status["shipped"], f"no bases shipped under {status['dir']}"
    assert status["problems"] == []
    assert status["stale"] == [], (
        f"the recipe of {status['stale']} changed since bases/tiny was shipped: run "
        "`make pretrain-bases` and commit bases/tiny (or revert the recipe change)"
    )


def test_shipped_files_fit_and_are_fp16_where_said() -> None:
    recipe = bases.read_recipe("tiny")
    assert recipe is not None
    d = bases.bases_dir("tiny")
    sizes = [p.stat().st_size for p in d.rglob("*") if p.is_file()]
    assert sum(sizes) <= 60e6  # the cap for all of them
    for part in bases.PARTS:
        assert set(recipe["parts"][part.name]["files"]) == set(part.files)
        for rel in part.fp16:
            with safe_open(str(d / part.subdir / rel), framework="pt") as f:
                dtypes = {f.get_tensor(k).dtype for k in f.keys()}
            assert torch.float32 not in dtypes and torch.float16 in dtypes, rel
    # the speech LM is the architecture the code builds for the tiny world
    cfg = preset("tiny")
    vocab = TextTokenizer.load(d / "tokenizer" / "spm.model").vocab_size
    want = LMConfig.tiny(text_card=vocab, card=cfg.codec.cardinality)
    assert read_config(d / "speech_lm" / "model.safetensors") == want
    # what fp16 storage changed was measured when they were shipped
    val = recipe["checks"]["speech_lm_val_loss"]
    assert abs(val["fp16"] - val["fp32"]) < 1e-3
    assert recipe["checks"]["encoder_tokens_max_abs_diff"] < 0.05


def test_install_finishes_every_base_stage_and_loads(tiny) -> None:
    from moshivis_lab.audio.tiny_codec import TinyCodec
    from moshivis_lab.train.pretrain import load_speech_lm
    from moshivis_lab.vision.pretrain import load_siglip, load_vision_encoder

    lines: list[str] = []
    out = bases.install_bases(tiny, log=lines.append)
    assert out["parts"] == dict.fromkeys(bases.PART_NAMES, "installed")
    recipe = bases.read_recipe("tiny")
    for part in bases.PARTS:
        stage = Stage(tiny.data_dir / "tiny" / part.subdir, part.stamp, recipe["keys"][part.name])
        assert stage.done, part.name
        assert stage.info()["installed_from"] == str(bases.bases_dir("tiny"))
    lm = load_speech_lm(tiny)
    assert next(lm.parameters()).dtype == torch.float32
    assert lm.cfg.num_layers == LMConfig.tiny().num_layers
    enc = load_vision_encoder(tiny)
    s = enc.config.image_size
    assert enc.encode(torch.rand(1, 3, s, s)).shape[:2] == (1, enc.config.num_tokens)
    load_siglip(tiny)
    TinyCodec.load(tiny.codec_dir, tiny.codec)
    assert TextTokenizer.load(tiny.tokenizer_path).vocab_size == tiny.tokenizer.vocab_size
    # a second install leaves them alone
    again = bases.install_bases(tiny, log=lines.append)
    assert again["parts"] == dict.fromkeys(bases.PART_NAMES, "already there")
    assert lines == []


def test_a_changed_recipe_is_not_installed(tiny, monkeypatch) -> None:
    configs = bases.base_configs("tiny")
    changed = {**configs, "speech": configs["speech"].replace(steps=configs["speech"].steps + 1)}
    monkeypatch.setattr(bases, "base_configs", lambda name: changed)
    lines: list[str] = []
    out = bases.install_bases(tiny, log=lines.append)
    assert out["parts"]["speech_lm"] == "stale"
    assert out["parts"]["vision"] == "installed"
    assert not (tiny.data_dir / "tiny" / "speech_lm").exists()
    assert any("speech_lm" in m and "make pretrain-bases" in m for m in lines)


def test_a_run_in_progress_is_left_to_finish(tiny) -> None:
    d = tiny.data_dir / "tiny" / "speech_lm"
    d.mkdir(parents=True)
    (d / "state.json").write_text('{"key": "x", "step": 3}')
    out = bases.install_bases(tiny, log=lambda _m: None)
    assert out["parts"]["speech_lm"] == "in progress"
    assert not (d / "model.safetensors").exists()


def test_an_altered_shipped_file_is_refused(tiny, tmp_path) -> None:
    root = tmp_path / "bases"
    shutil.copytree(bases.bases_dir("tiny"), root / "tiny")
    (root / "tiny" / "codec" / "report.json").write_text("{}")
    with pytest.raises(RuntimeError, match="differs from the file the recipe recorded"):
        bases.install_bases(tiny, root)
    assert not (tiny.data_dir / "tiny").exists()
    assert bases.install_bases(preset("smoke", tmp_path), root) == {
        "shipped": False,
        "dir": str(root / "smoke"),
    }


def test_export_then_install_round_trips(smoke_pretrained, tmp_path) -> None:
    from moshivis_lab.train.pretrain import load_speech_lm

    root = tmp_path / "bases"
    dest = bases.export_bases(smoke_pretrained, root)
    recipe = read_json(dest / bases.RECIPE_FILE)
    assert recipe["preset"] == "smoke" and recipe["recipe_key"]
    fresh = smoke_pretrained.replace(data_dir=tmp_path / "fresh")
    assert bases.check_bases(fresh, root)["stale"] == []
    out = bases.install_bases(fresh, root, log=lambda _m: None)
    assert set(out["parts"].values()) == {"installed"}
    built, shipped = load_speech_lm(smoke_pretrained), load_speech_lm(fresh)
    for (name, a), (_, b) in zip(
        built.state_dict().items(), shipped.state_dict().items(), strict=True
    ):
        assert torch.equal(a.half().float(), b), name  # fp16-rounded, nothing else
    # a base that is not finished cannot be exported
    with pytest.raises(RuntimeError, match="not finished"):
        bases.export_bases(preset("smoke", tmp_path / "empty"), root)


def test_reproduce_starts_from_the_shipped_bases_unless_asked(tiny, tmp_path) -> None:
    from moshivis_lab.reproduce import STAGES, Reproduction

    assert STAGES[0] == "bases"
    quiet = {"progress": False, "log": lambda _m: None}
    rebuilt = Reproduction(tiny, rebuild_bases=True, **quiet).bases()
    assert rebuilt == {"rebuild": True} and not (tiny.data_dir / "tiny").exists()
    out = Reproduction(tiny, **quiet).bases()
    assert out["parts"] == dict.fromkeys(bases.PART_NAMES, "installed")
    smoke = Reproduction(preset("smoke", tmp_path / "s"), **quiet).bases()
    assert smoke["shipped"] is False


def test_the_build_plan_counts_shipped_bases_as_installed(tiny) -> None:
    from moshivis_lab.widgets.quickstart import SHIPPED_SECONDS, build_plan

    plan = build_plan(tiny)
    shipped = {a.name for a in plan.artefacts if a.shipped}
    assert shipped == set(bases.PART_NAMES)
    assert all(a.seconds == SHIPPED_SECONDS for a in plan.artefacts if a.shipped)
    assert "shipped in bases/" in str(plan)
    assert plan.seconds is not None and plan.seconds < 20 * 60
