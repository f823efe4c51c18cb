"""Reliability (issue 8): artefacts survive SIGKILL, killed runs resume exactly, builds and trainings
are deterministic, a NaN loss stops training with its step / batch / checkpoint named, and a
notebook opened out of order (alone, on an empty data dir) builds what it needs.

Complements ``test_pretrain`` / ``test_vision`` / ``test_train_adapters`` (resume after a clean
stop) with real SIGKILLs of subprocesses; everything runs on one torch thread.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moshivis_lab.artefacts import read_json
from moshivis_lab.config import LabConfig
from moshivis_lab.train.guard import NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "moshivis_lab"
CHILD_ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "NO_TORCH_COMPILE": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MOSHIVIS_BLAS_THREADS": "1",
    "PYTHONPATH": str(ROOT),
}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# 1. Every artefact is written to a temporary file and renamed into place


# Calls that write a file, by the called function's name (``x.save(...)``, ``save_file(...)``).
_WRITERS = {
    "save_file",
    "save",
    "write_text",
    "write_bytes",
    "savefig",
    "write_image",
    "write_html",
    "to_csv",
    "tofile",
}
# Writes that need no temporary file, and why (file, the call's source).
_NOT_RENAMED = {
    ("train/adapters.py", 'open(metrics_path, "a", encoding="utf-8")'): "append-only log",
    ("train/pretrain.py", 'open(metrics_path, "a", encoding="utf-8")'): "append-only log",
    ("vision/pretrain.py", 'open(metrics_path, "a", encoding="utf-8")'): "append-only log",
    ("audio/codecs.py", "codec.save(cfg.codec_dir)"): "TinyCodec.save is atomic",
    ("vision/pretrain.py", "encoder.save(out)"): "ImageEncoder.save is atomic",
    ("figures/paper.py", 'Image.fromarray(rgb).save(buf, format="PNG")'): "in-memory buffer",
    ("widgets/_figure.py", 'sf.write(buf, a, int(sample_rate), format="WAV", subtype="PCM_16")'): (
        "in-memory buffer"
    ),
}


def _segmenter(src: str):
    """``ast.get_source_segment`` with the lines split once (it re-splits on every call)."""
    lines = src.splitlines(keepends=True)

    def seg(node: ast.AST) -> str:
        if node.lineno == node.end_lineno:
            return lines[node.lineno - 1].encode()[node.col_offset : node.end_col_offset].decode()
        first = lines[node.lineno - 1].encode()[node.col_offset :].decode()
        last = lines[node.end_lineno - 1].encode()[: node.end_col_offset].decode()
        return "".join([first, *lines[node.lineno : node.end_lineno - 1], last])

    return seg


def _writes(tree: ast.AST, src: str) -> list[tuple[int, str, bool]]:
    """(line, call source, safe) of every file-writing call; safe: it writes a temporary file
    (``atomic_path``'s ``tmp``) or a handle opened by ``atomic_open`` / on ``tmp``."""
    segment = _segmenter(src)
    safe_handles = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With):
            for item in node.items:
                ctx = segment(item.context_expr)
                if isinstance(item.optional_vars, ast.Name) and (
                    "atomic_open(" in ctx or "tmp" in ctx
                ):
                    safe_handles.add(item.optional_vars.id)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        qual = segment(f)
        seg = segment(node)
        if name == "open" and isinstance(f, ast.Name):
            mode = node.args[1] if len(node.args) > 1 else None
            mode = next((k.value for k in node.keywords if k.arg == "mode"), mode)
            if not (isinstance(mode, ast.Constant) and set(str(mode.value)) & set("wax")):
                continue
        elif name in _WRITERS or qual in {"sf.write", "soundfile.write", "np.save", "torch.save"}:
            pass
        else:
            continue
        args = [segment(a) for a in node.args]
        target = " ".join(args) + " " + qual
        safe = "tmp" in target or any(a in safe_handles for a in args)
        out.append((node.lineno, seg, safe))
    return out


def test_every_writer_in_the_package_writes_a_temporary_file_and_renames_it():
    unsafe, seen = [], set()
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        src = path.read_text(encoding="utf-8")
        for line, seg, safe in _writes(ast.parse(src), src):
            if (rel, seg) in _NOT_RENAMED:
                seen.add((rel, seg))
            elif not safe:
                unsafe.append(f"moshivis_lab/{rel}:{line}: {seg}")
    assert not unsafe, "writes straight to the final name (use artefacts.atomic_path):\n" + (
        "\n".join(unsafe)
    )
    assert seen == set(_NOT_RENAMED), f"stale exceptions: {set(_NOT_RENAMED) - seen}"


_WRITER_CHILD = r"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from moshivis_lab.artefacts import atomic_path, save_run_checkpoint, write_json

out, k = Path(sys.argv[1]), int(sys.argv[2])
n = 1 << 22  # a 16 MiB tensor: writing it takes long enough to be killed in the middle


class Opt:  # what save_run_checkpoint needs of an optimizer: its state, here version k
    def state_dict(self):
        return {"k": torch.tensor(k), "pad": torch.full((1 << 20,), float(k))}


opt = Opt()
while True:
    k += 1

    def write(path, k=k):
        with atomic_path(path) as tmp:
            save_file({"w": torch.full((n,), float(k)), "k": torch.tensor([k])}, str(tmp))

    save_run_checkpoint(out, step=k, elapsed=0.0, key="kill", optimizer=opt, write_weights=write)
    write_json(out / "big.json", {"version": k, "payload": [k] * 200_000})
    print(k, flush=True)
"""


def _check_complete(out: Path) -> int:
    """The run dir's artefacts load and each is one complete version; returns the step."""
    st = read_json(out / "state.json")
    k = int(st["step"])
    w = load_file(out / "ckpt" / st["model"])
    assert int(w["k"]) == k and bool((w["w"] == float(k)).all())
    blob = torch.load(out / "ckpt" / st["optim"], weights_only=True)
    assert int(blob["optimizer"]["k"]) == k and bool((blob["optimizer"]["pad"] == k).all())
    big = read_json(out / "big.json")
    assert big["version"] in (k - 1, k) and big["payload"] == [big["version"]] * 200_000
    # loaders never look at temporary files: the visible files are complete checkpoints
    for p in (out / "ckpt").glob("*.safetensors"):
        if not p.name.startswith("."):
            assert int(load_file(p)["k"]) in (k - 1, k, k + 1), p
    return k


def test_sigkill_mid_write_leaves_the_last_good_artefacts(tmp_path):
    rng = random.Random(8)
    out = tmp_path / "run"
    last, kills, mid_write, cleaned = 0, 0, 0, 0
    stale: list[Path] = []
    for _ in range(10):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER_CHILD, str(out), str(last)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=CHILD_ENV,
        )
        first = proc.stdout.readline()  # a full round written: old leftovers are swept by now
        assert first.strip(), proc.stderr.read()
        cleaned += sum(not p.exists() for p in stale)
        assert not any(p.exists() for p in stale), "a killed writer's .tmp file was not swept"
        time.sleep(rng.uniform(0.0, 0.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        stale = list(out.rglob("*.tmp"))
        mid_write += bool(stale)
        k = _check_complete(out)
        assert k > last
        last = k
    print(f"SIGKILL: {kills} kills, {mid_write} mid-write, all readable; {cleaned} .tmp swept")
    assert mid_write >= 2  # the kills did land inside writes


# ---------------------------------------------------------------------------------------------
# 2. A run killed (SIGKILL) and resumed ends with exactly the uninterrupted run's parameters

_TRAIN_CHILD = r"""
import pickle, sys
fn, args, kw = pickle.load(open(sys.argv[1], "rb"))
fn(*args, **kw)
"""


def _kill_mid_run(tmp_path: Path, fn, args: tuple, kw: dict, state: Path, at: int) -> int:
    """Run ``fn(*args, **kw)`` in a subprocess, SIGKILL it once ``state`` says step >= ``at``;
    return the checkpointed step it died after."""
    job = tmp_path / f"job_{state.parent.name}.pkl"
    job.write_bytes(pickle.dumps((fn, args, kw)))
    proc = subprocess.Popen(
        [sys.executable, "-c", _TRAIN_CHILD, str(job)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    deadline = time.time() + 150
    step = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            step = int(json.loads(state.read_text())["step"])
        except (OSError, ValueError, KeyError):
            step = 0
        if step >= at:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return int(read_json(state)["step"])


def _linked(cfg: LabConfig, tmp: Path) -> LabConfig:
    """``cfg`` in a new data dir that shares its world, codec, shards and tokenizer (links)."""
    d = tmp / cfg.name
    d.mkdir(parents=True)
    for part in ("world", "codec", "shards", "tokenizer"):
        (d / part).symlink_to(cfg.data_dir / cfg.name / part, target_is_directory=True)
    return cfg.replace(data_dir=tmp)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = {
        k: float((a[k].float() - b[k].float()).abs().max())
        for k in a
        if not torch.equal(a[k], b[k])
    }
    assert not diff, f"max |diff| per tensor: {diff}"


def test_adapter_training_killed_and_resumed_equals_straight_and_is_deterministic(
    smoke_pretrained, tmp_path
):
    from moshivis_lab.train.adapters import TrainConfig, adapters_dir, train_adapters

    cfg = smoke_pretrained
    tcfg = TrainConfig.smoke().replace(steps=8, ckpt_interval=1, threads=1)
    quiet = {"progress": False, "log": print}
    a = train_adapters(cfg, tcfg, run="rel_a", **quiet)
    b = train_adapters(cfg, tcfg, run="rel_b", **quiet)  # same seed, again
    assert a["finished"] and b["finished"]
    wa = load_file(adapters_dir(cfg, "rel_a") / "adapters.safetensors")
    _assert_same(wa, load_file(adapters_dir(cfg, "rel_b") / "adapters.safetensors"))

    state = adapters_dir(cfg, "rel_killed") / "state.json"
    died = _kill_mid_run(
        tmp_path, train_adapters, (cfg, tcfg), {"run": "rel_killed", **quiet}, state, 3
    )
    assert 3 <= died < tcfg.steps
    done = train_adapters(cfg, tcfg, run="rel_killed", **quiet)
    assert done["finished"] and done["step"] == tcfg.steps
    _assert_same(wa, load_file(adapters_dir(cfg, "rel_killed") / "adapters.safetensors"))
    lines = [json.loads(x) for x in (state.parent / "metrics.jsonl").open()]
    train = [r["step"] for r in lines if r["split"] == "train"]
    assert train == list(range(1, tcfg.steps + 1))  # the log was cut back to the checkpoint


def _small_lm(cfg: LabConfig):
    from moshivis_lab.train.pretrain import lm_config_for

    return dataclasses.replace(
        lm_config_for(cfg), dim=64, num_layers=2, num_heads=4, depformer_dim=32,
        depformer_num_layers=1, depformer_num_heads=2,
    )  # fmt: skip


def test_speech_lm_pretraining_killed_and_resumed_equals_straight(smoke_world, tmp_path):
    from moshivis_lab.train.pretrain import PretrainConfig, pretrain_speech, speech_lm_dir

    t = PretrainConfig.smoke().replace(steps=12, ckpt_interval=1, threads=1)
    straight = _linked(smoke_world, tmp_path / "a")
    killed = _linked(smoke_world, tmp_path / "b")
    lm = _small_lm(smoke_world)
    assert pretrain_speech(straight, t, progress=False, lm_cfg=lm)["finished"]
    state = speech_lm_dir(killed) / "state.json"
    died = _kill_mid_run(
        tmp_path, pretrain_speech, (killed, t), {"progress": False, "lm_cfg": lm}, state, 3
    )
    assert 3 <= died < t.steps
    assert pretrain_speech(killed, t, progress=False, lm_cfg=lm)["finished"]
    _assert_same(
        load_file(speech_lm_dir(straight) / "model.safetensors"),
        load_file(speech_lm_dir(killed) / "model.safetensors"),
    )


def _vision_setup():
    from moshivis_lab.vision.config import VisionConfig
    from moshivis_lab.vision.pretrain import VisionPretrainConfig

    vc = VisionConfig(name="r", image_size=32, patch_size=8, hidden_size=32, num_layers=1,
                      num_heads=2, intermediate_size=64)  # fmt: skip
    tcfg = VisionPretrainConfig.smoke().replace(
        steps=16, batch_size=8, warmup_steps=1, eval_interval=16, ckpt_interval=1, text_hidden=32,
        text_intermediate=64, text_layers=1, threads=1,
    )  # fmt: skip
    return vc, tcfg


def test_vision_pretraining_killed_and_resumed_equals_straight(smoke_world, tmp_path):
    from moshivis_lab.vision.pretrain import pretrain_vision

    vc, tcfg = _vision_setup()
    kw = {"progress": False}
    pretrain_vision(smoke_world, tcfg, vc, out_dir=tmp_path / "a", **kw)
    state = tmp_path / "b" / "state.json"
    died = _kill_mid_run(
        tmp_path,
        pretrain_vision,
        (smoke_world, tcfg, vc),
        {"out_dir": tmp_path / "b", **kw},
        state,
        3,
    )
    assert 3 <= died < tcfg.steps
    assert pretrain_vision(smoke_world, tcfg, vc, out_dir=tmp_path / "b", **kw)["finished"]
    for f in ("vision_tower.safetensors", "siglip/model.safetensors"):
        _assert_same(load_file(tmp_path / "a" / f), load_file(tmp_path / "b" / f))


# ---------------------------------------------------------------------------------------------
# 3. NaN / inf in a loss stops training: the step, the batch's sample ids, the last checkpoint


def _nan_like(x: torch.Tensor) -> torch.Tensor:
    return x * float("nan")


def _assert_stop(err: NonFiniteLossError, step: int, ckpt: str, n_ids: int) -> None:
    msg = str(err)
    print(msg)
    assert err.step == step and f"at step {step}" in msg
    assert err.checkpoint is not None and err.checkpoint.name == ckpt and err.checkpoint.exists()
    assert ckpt in msg and "optimizer step was not taken" in msg
    assert len(err.batch_ids) == n_ids and all(err.batch_ids)
    assert all(i in msg for i in err.batch_ids[:3])


def test_nan_loss_stops_adapter_training(smoke_pretrained, monkeypatch):
    from moshivis_lab.train import adapters as A

    cfg = smoke_pretrained
    tcfg = A.TrainConfig.smoke().replace(steps=6, ckpt_interval=1, threads=1)
    real, calls = A.batch_loss, []

    def poisoned(model, batch, table, **kw):
        parts = real(model, batch, table, **kw)
        if "forward" in kw:  # a training step (evaluation calls it without ``forward``)
            calls.append(1)
            if len(calls) == 3:
                parts = {**parts, "loss": _nan_like(parts["loss"])}
        return parts

    monkeypatch.setattr(A, "batch_loss", poisoned)
    with pytest.raises(NonFiniteLossError) as e:
        A.train_adapters(cfg, tcfg, run="rel_nan", progress=False, log=lambda *_: None)
    _assert_stop(e.value, 3, "adapters_000002.safetensors", tcfg.batch_size)
    ids = {m.get("id") for m in A.MixedData(cfg, "train", tcfg.mix).speech.meta}
    assert any(i in ids or i.startswith("text[") for i in e.value.batch_ids)


def test_nan_loss_stops_speech_lm_pretraining(smoke_world, tmp_path, monkeypatch):
    from moshivis_lab.model.lm import MoshiLM
    from moshivis_lab.train import pretrain as P

    cfg = _linked(smoke_world, tmp_path)
    t = P.PretrainConfig.smoke().replace(steps=6, ckpt_interval=1, threads=1)
    now = {"step": -1}
    real_batch, real_loss = P.batch_for_step, MoshiLM.loss

    def batch(reader, tcfg, step, qa=None):
        now["step"] = step
        return real_batch(reader, tcfg, step, qa)

    def loss(self, *a, **kw):
        parts = real_loss(self, *a, **kw)
        if self.training and now["step"] == 2:
            parts = {**parts, "loss": _nan_like(parts["loss"])}
        return parts

    monkeypatch.setattr(P, "batch_for_step", batch)
    monkeypatch.setattr(MoshiLM, "loss", loss)
    with pytest.raises(NonFiniteLossError) as e:
        P.pretrain_speech(cfg, t, progress=False, lm_cfg=_small_lm(cfg))
    _assert_stop(e.value, 3, "model_000002.safetensors", t.batch_size + t.text_batch_size)
    speech_ids = {m.get("id") for m in P.load_split(cfg, "train")["speech"].meta}
    assert set(e.value.batch_ids[: t.batch_size]) <= speech_ids


def test_nan_loss_stops_vision_pretraining(smoke_world, tmp_path, monkeypatch):
    from moshivis_lab.vision import pretrain as V

    vc, tcfg = _vision_setup()
    real, real_batch, steps = V.sigmoid_loss, V.batch_for_step, []

    def counted(*a, **kw):
        steps.append(1)
        return real_batch(*a, **kw)

    def poisoned(*a, **kw):  # every loss of the third step (caption and region losses)
        loss = real(*a, **kw)
        return _nan_like(loss) if len(steps) == 3 else loss

    monkeypatch.setattr(V, "batch_for_step", counted)
    monkeypatch.setattr(V, "sigmoid_loss", poisoned)
    with pytest.raises(NonFiniteLossError) as e:
        V.pretrain_vision(smoke_world, tcfg, vc, out_dir=tmp_path, progress=False)
    _assert_stop(e.value, 3, "model_000002.safetensors", tcfg.batch_size)


# ---------------------------------------------------------------------------------------------
# 4. A notebook opened out of order (alone, on an empty data dir) builds what it needs, and the
#    world it built is bit-identical to a second build of the same preset


OUT_OF_ORDER_NOTEBOOK = "06_cross_attention_and_attribution.ipynb"


@pytest.fixture(scope="module")
def out_of_order_notebook(tmp_path_factory):
    """Execute notebook 06 alone at the smoke preset against an EMPTY data dir (nbclient)."""
    import nbformat
    from nbclient import NotebookClient

    data = tmp_path_factory.mktemp("empty_data")
    assert not any(data.iterdir())
    nb = nbformat.read(ROOT / "notebooks" / OUT_OF_ORDER_NOTEBOOK, as_version=4)
    t0 = time.time()
    with pytest.MonkeyPatch.context() as mp:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MOSHIVIS_BLAS_THREADS"):
            mp.setenv(k, "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("MOSHIVIS_PRESET", "smoke")
        mp.setenv("MOSHIVIS_DATA", str(data))
        client = NotebookClient(
            nb,
            kernel_name="python3",
            timeout=600,
            resources={"metadata": {"path": str(ROOT / "notebooks")}},
        )
        client.execute()
    return data, nb, time.time() - t0


@pytest.mark.slow
def test_out_of_order_notebook_builds_what_it_needs(out_of_order_notebook):
    data, nb, seconds = out_of_order_notebook
    print(f"{OUT_OF_ORDER_NOTEBOOK} alone on an empty data dir: {seconds:.0f} s")
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    built = data / "smoke"
    for part in ("world", "shards/manifest.json", "speech_lm/model.safetensors",
                 "vision/vision_tower.safetensors", "adapters/main/adapters.safetensors"):  # fmt: skip
        assert (built / part).exists(), part


def _sums(path: Path) -> dict[str, str]:
    return {
        line.split("  ", 1)[1]: line.split("  ", 1)[0]
        for line in path.read_text(encoding="utf-8").splitlines()
    }


@pytest.mark.slow
def test_world_build_is_bit_identical(out_of_order_notebook, tmp_path):
    """The notebook kernel's smoke world and a second build here, in another process after
    other speech was synthesized: the same world files, shards and manifest hashes."""
    from moshivis_lab.pipeline import build_data
    from moshivis_lab.world.speech import USER_VOICES, synthesize

    synthesize("some speech first, so that the synthesizer has a history", USER_VOICES[3])
    data, _, _ = out_of_order_notebook
    a = LabConfig.smoke(data)
    b = LabConfig.smoke(tmp_path)
    t0 = time.time()
    build_data(b, progress=False)
    speech_s = read_json(b.world_dir / ".speech.done.json")["seconds"]
    print(f"second smoke build: {time.time() - t0:.0f} s (speech stage {speech_s} s)")
    wa, wb = _sums(a.shards_dir / "world.sha256"), _sums(b.shards_dir / "world.sha256")
    assert wa.keys() == wb.keys()
    differ = sorted(k for k in wa if wa[k] != wb[k])
    assert not differ, f"{len(differ)} world files differ, e.g. {differ[:5]}"
    ma, mb = read_json(a.shards_dir / "manifest.json"), read_json(b.shards_dir / "manifest.json")
    differ = sorted(k for k in ma["files"] if ma["files"][k] != mb["files"].get(k))
    assert not differ, f"shards differ: {differ}"
    assert ma == mb


def test_nonfinite_check_passes_finite_values(tmp_path):
    from moshivis_lab.train.guard import check_finite

    check_finite("t", 1, {"loss": 1.0, "grad_norm": torch.tensor(2.0)}, ["x"], tmp_path)
    with pytest.raises(NonFiniteLossError, match="There is no checkpoint yet"):
        check_finite("t", 1, {"loss": math.inf}, ["x"], tmp_path)
