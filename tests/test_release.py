"""The released directory as downloaded: found, sized, refused when it cannot fit, loaded whole;
checked on a tiny random directory in exactly the released file set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moshivis_lab.bases import bases_root
from moshivis_lab.config import MoshiVisConfig
from moshivis_lab.model import release as rel
from moshivis_lab.model.release import (
    RELEASE_FILES,
    check_fits,
    find_release,
    load_release,
    memory_needed,
    write_tiny_release,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moshika-vis-tiny")
    return write_tiny_release(out, bases_root() / "tiny" / "tokenizer" / "spm.model")


def test_the_tiny_directory_is_the_released_file_set(tiny_release: Path) -> None:
    assert sorted(p.name for p in tiny_release.iterdir()) == sorted(RELEASE_FILES.values())
    from safetensors import safe_open

    with safe_open(str(tiny_release / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in names}
    assert dtypes == {"BF16"}
    assert any(k.startswith("image_prefix.enc.model.") for k in names)
    assert "llm.transformer.layers.0.cross_attention.mha.in_proj_weight" in names


def test_load_release_runs_the_model_on_an_image(tiny_release: Path) -> None:
    logs: list[str] = []
    r = load_release(tiny_release, dtype=torch.float32, log=logs.append)
    assert "needs" in logs[0] and " MB on cpu" in logs[0]
    cfg = r.model.cfg
    release = MoshiVisConfig.moshika_vis()
    assert (cfg.xa.norm_xa, cfg.xa.gate_readout, cfg.lm.depformer_norm) == (
        release.xa.norm_xa,
        release.xa.gate_readout,
        release.lm.depformer_norm,
    )
    assert r.encoder.num_tokens == 16 and r.codec.num_codebooks == cfg.lm.dep_q
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8))
    tokens = r.encoder.encode(image)
    wav = np.sin(np.arange(24000) / 24000 * 2 * np.pi * 220).astype(np.float32) * 0.3
    user = torch.from_numpy(r.codec.encode(wav))
    k = cfg.lm.num_codebooks
    codes = torch.zeros(1, k, user.shape[1], dtype=torch.long)
    codes[0, 1 + cfg.lm.dep_q :] = user
    codes[0, 0] = torch.from_numpy(np.array(r.tokenizer.encode("a test")[:1] * user.shape[1]))
    with torch.no_grad():
        seeing = r.model(codes, image_tokens=tokens)
        blind = r.model(codes)
    assert float(seeing.gate_score().mean()) > 0.0 == float(blind.gate_score().abs().max())
    assert not torch.allclose(seeing.text_logits, blind.text_logits)
    assert r.needed_gb["total"] > 0 and r.arch.read and r.arch.assumed


def test_it_refuses_before_loading_when_memory_is_short(tiny_release: Path, monkeypatch) -> None:
    needed = memory_needed(tiny_release)
    assert 0 < needed["total"] < 0.1
    monkeypatch.setattr(rel, "free_memory", lambda device: needed["total"] / 2)
    with pytest.raises(MemoryError, match=r"needs 0\.\d GB on cpu .* GB is free"):
        load_release(tiny_release, log=lambda *a: None)
    # the real release's figure, from kyuteye's list of its tensors (bf16) and Mimi's (float32)
    import json

    from transformers import MimiConfig, MimiModel

    listing = json.loads(
        (Path(__file__).parent / "data/kyuteye/moshika_vis_tensors.json").read_text()
    )
    numel = lambda d: sum(int(np.prod(v["shape"])) for v in d.values())  # noqa: E731
    with torch.device("meta"):
        mimi = sum(p.numel() for p in MimiModel(MimiConfig()).parameters())
    real = {
        "lm_and_adapters": numel(listing["tensors"]) * 2 / 1e9,
        "encoder": numel(listing["encoder_tensors"]) * 2 / 1e9,
        "mimi": mimi * 4 / 1e9,
    }
    real["total"] = sum(real.values())
    assert 16 < real["total"] < 18
    monkeypatch.setattr(rel, "free_memory", lambda device: 8.0)
    with pytest.raises(MemoryError, match=f"needs {real['total']:.1f} GB on cuda:0"):
        check_fits(real, "cuda:0")
    monkeypatch.setattr(rel, "free_memory", lambda device: 139.0)
    check_fits(real, "cuda:0")  # an H200 holds it


def test_find_release_says_what_is_missing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(rel.CHECKPOINT_ENV, raising=False)
    with pytest.raises(ValueError, match="MOSHIVIS_CHECKPOINT"):
        find_release(None)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="missing.*tokenizer-e351c8d8"):
        find_release(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="local Hugging Face cache"):
        find_release("kyutai/not-a-cached-model")


def test_one_switch_runs_a_conversation_on_the_release(tiny_release: Path, monkeypatch) -> None:
    """``MOSHIVIS_PRESET=moshika-vis MOSHIVIS_CHECKPOINT=DIR``: the engine behind every widget
    loads the released directory and talks about a shipped photograph."""
    from moshivis_lab.config import preset
    from moshivis_lab.interp.conversation import ConversationEngine, GateIntervention
    from moshivis_lab.world.photos import PHOTOS, photo_names

    monkeypatch.setenv(rel.CHECKPOINT_ENV, str(tiny_release))
    cfg = preset("moshika-vis")
    assert cfg.released and cfg.checkpoint == tiny_release
    assert preset("moshika-vis", checkpoint=tiny_release) == cfg
    engine = ConversationEngine.load(cfg, device="cpu")
    assert engine.world_images() == photo_names()
    question = PHOTOS["chelsea"]
    seeing = engine.run("chelsea", question, seed=0, extra_seconds=1.0)
    closed = engine.run("chelsea", question, seed=0, extra_seconds=1.0,
                        intervention=GateIntervention(value=0.0))  # fmt: skip
    assert seeing.layers == engine.layers and seeing.gates.shape[1] == seeing.n_steps > 10
    assert seeing.gate_score().max() > 0 and np.all(closed.gate_score() == 0)
    assert seeing.info["gate_readout"] == "kyuteye"
    monkeypatch.delenv(rel.CHECKPOINT_ENV)
    with pytest.raises(ValueError, match="MOSHIVIS_CHECKPOINT=DIR"):
        preset("moshika-vis")
    with pytest.raises(ValueError, match="checkpoint= is for the moshika-vis preset"):
        preset("tiny", checkpoint=tiny_release)


def test_the_widgets_run_on_the_release(tiny_release: Path) -> None:
    """ConversationExplorer and GateLab over the released model: rendered, run, a control moved,
    the figure changed (in the kernel; tests/test_browser.py drives JupyterLab)."""
    from moshivis_lab.interp.conversation import ConversationEngine
    from moshivis_lab.widgets import ConversationExplorer, GateLab
    from moshivis_lab.world.photos import PHOTOS

    engine = ConversationEngine.from_release(load_release(tiny_release, log=lambda *a: None))
    fast = {"extra_seconds": 0.8}
    ex = ConversationExplorer(engine, image="coffee", prompt=PHOTOS["coffee"], **fast)
    assert [o for o in ex.image_select.options][:1]
    ex.run_button.click()
    assert ex.conversation is not None, ex.status.value
    lab = GateLab(engine, image="coffee", prompt=PHOTOS["coffee"], **fast)
    lab.amount.value = 1.0
    lab.run_button.click()
    assert lab.after is not None, lab.status.value
    z = np.asarray(lab.after_gate_figure.data[0].z, dtype=float)
    start = engine.model.cfg.xa.xa_start  # 16: the release skips cross-attention before it
    assert start == 16 and np.all(z[:, :start] == 0) and np.allclose(z[:, start:], 1.0)
    before = np.asarray(lab.before_gate_figure.data[0].z, dtype=float)
    assert not np.allclose(before[:, start:], 1.0)


def test_the_cli_converses_with_the_release(tiny_release: Path, tmp_path: Path) -> None:
    import json as _json

    from typer.testing import CliRunner

    from moshivis_lab.cli import app

    out = tmp_path / "conv"
    args = ["converse", "--preset", "moshika-vis", "--checkpoint", str(tiny_release),
            "--image", "rocket", "--seconds", "0.8", "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "rocket" in res.output and (out / "conversation.wav").stat().st_size > 1000
    gates = _json.loads((out / "gates.json").read_text())
    assert gates["gate_readout"] == "kyuteye" and len(gates["per_layer"]) == 4
    assert max(gates["reported"]) > 0
    res = CliRunner().invoke(
        app, ["converse", "--preset", "tiny", "--checkpoint", str(tiny_release)]
    )
    assert res.exit_code == 2 and "moshika-vis" in res.output


def test_load_lab_takes_the_switch(tiny_release: Path) -> None:
    """The notebooks' one setup call: on moshika-vis it loads the release, trains nothing."""
    from moshivis_lab.config import preset
    from moshivis_lab.lab import load_lab, trained_run

    cfg = preset("moshika-vis", checkpoint=tiny_release)
    lab = load_lab(cfg, device="cpu")
    assert lab.released and lab.run is None and not lab.small
    assert "Kyutai's released model" in lab.describe()
    assert lab.engine is lab.engine and lab.engine.world_images()[0] == "astronaut"
    with pytest.raises(ValueError, match="nothing to train"):
        trained_run(cfg)
