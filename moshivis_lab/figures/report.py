"""``REPORT.md``: the headline numbers of a preset beside the paper's, the figures, the timings.

Every "ours" number is read from the preset's artefacts when the report is written; a missing
artefact gives a line saying what to run. The paper's numbers are the constants below, each with
its source (DESIGN.md quotes the paper, its released config and Table 5).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from moshivis_lab.figures.latency import PAPER_BASE_MS, PAPER_RATIO, PAPER_TOKENS, PAPER_VISION_MS
from moshivis_lab.figures.paper import (
    FIGURES,
    PAPER_ADAPTER_PARAMETERS,
    MissingArtefact,
    Sources,
    _cmd,
)
from moshivis_lab.train.ablate import GRID, PAPER_P_AUDIO_NOTE, ablation_markdown

# Paper numbers (sources in the comments; nothing here is measured).
PAPER_OCR_VQA_DEFAULT = next(p for name, *_, p in GRID if "(default)" in name)  # Table 5
PAPER_P_AUDIO = 0.25  # DESIGN.md / paper Fig. 4: the chosen share of speech samples
PAPER_GATE_LAYERS = 10  # DESIGN.md: the reported gate is the mean over the last 10 layers

Row = tuple[str, str, str, str]  # measure, ours, paper, note


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * float(x):.1f} %"


def _f(x: Any, nd: int = 3) -> str:
    return "-" if x is None else f"{float(x):.{nd}f}"


def _get(d: Any, *keys: Any) -> Any:
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    return d


def _table(rows: list[Row]) -> list[str]:
    out = ["| measure | ours | paper | note |", "|---|---:|---:|---|"]
    out += [f"| {m} | {o} | {p} | {n} |" for m, o, p, n in rows]
    return out + [""]


# ---------------------------------------------------------------------- sections


def _speech_lm(src: Sources) -> list[Row]:
    ev = src.json("speech_lm/eval_val.json", "speech_eval")
    nll, qa, f0 = ev.get("nll", {}), ev.get("qa", {}), ev.get("f0", {})
    return [
        (
            "text NLL (val, nats/token)",
            _f(nll.get("text_nll")),
            "-",
            f"unigram {_f(nll.get('text_unigram_nll'))}",
        ),
        (
            "audio NLL, mean over codebooks",
            _f(nll.get("audio_nll_mean")),
            "-",
            f"unigram {_f(nll.get('audio_unigram_nll_mean'))}",
        ),
        (
            "spoken QA accuracy (chit-chat)",
            _pct(qa.get("accuracy")),
            "-",
            f"n={qa.get('n', '-')}, shuffled control {_pct(qa.get('shuffled_control_accuracy'))}",
        ),
        (
            "generated / reference F0 median",
            _f(f0.get("ratio")),
            "-",
            f"codec round trip {_f(f0.get('codec_roundtrip_ratio'))}",
        ),
    ]


def _codec(src: Sources) -> list[Row]:
    rep = src.json("codec/report.json", "data")
    h, ph = rep.get("heldout_voices", {}), _get(rep, "phone_accuracy", "heldout_voices") or {}
    return [
        ("F0 correlation, held-out voices", _f(h.get("f0_corr")), "-", "decoded vs original"),
        ("mel cepstral distortion (dB)", _f(h.get("mcd_db"), 2), "-", "held-out voices"),
        (
            "codebook 0 names the phone",
            _pct(ph.get("code0")),
            "-",
            f"chance {_pct(ph.get('chance'))} (Mimi's codebook 0 is semantic)",
        ),
    ]


def _vision(src: Sources) -> list[Row]:
    rep = src.json("vision/report.json", "vision")
    rows: list[Row] = []
    for split in ("val", "heldout"):
        c = _get(rep, "retrieval", split, "caption") or {}
        if c:
            rows.append(
                (
                    f"image-to-caption top-1, {split}",
                    _pct(c.get("top1")),
                    "-",
                    f"chance {_pct(c.get('chance_top1'))}, {c.get('n_images')} images",
                )
            )
    if src.has("vision/probes.json"):  # linear probes of the frozen tokens (vision.probe)
        probes = src.json("vision/probes.json", "vision").get("probes", {})
        for attr, p in probes.items():
            if p.get("accuracy") is not None:
                rows.append(
                    (
                        f"linear probe of the tokens: object {attr}",
                        _pct(p["accuracy"]),
                        "-",
                        f"majority {_pct(p.get('majority'))}, {p.get('classes')} classes, "
                        f"{p.get('n_test')} held-out",
                    )
                )
    enc = rep.get("encoder", {})
    rows.append(
        (
            "image tokens x width",
            f"{enc.get('tokens', '-')} x {enc.get('hidden_size', '-')}",
            "1024 x 1152",
            "SigLIP-So400m at 448 px (DESIGN.md)",
        )
    )
    return rows


def _adapters(src: Sources) -> list[Row]:
    rows: list[Row] = []
    if src.has(f"{src.run_dir}/train_report.json"):
        p = src.json(f"{src.run_dir}/train_report.json", "train").get("parameters", {})
        rows.append(
            (
                "adapter parameters",
                f"{p.get('total', 0):,}",
                f"{PAPER_ADAPTER_PARAMETERS:,}",
                f"frozen LM {p.get('frozen', 0):,} (ours) vs Moshi 7B",
            )
        )
    ev = src.json(f"{src.run_dir}/eval.json", "eval")
    t = ev.get("test", {})
    text, spoken = t.get("text_prompts", {}), t.get("spoken_prompts", {})
    ch = ev.get("chance", {})
    ocr_paper = f"{PAPER_OCR_VQA_DEFAULT[0]} % / {PAPER_OCR_VQA_DEFAULT[1]} %"
    rows += [
        (
            "VQA accuracy, text / spoken prompt (test)",
            f"{_pct(_get(text, 'vqa_all', 'accuracy'))} / {_pct(_get(spoken, 'vqa_all', 'accuracy'))}",
            "-",
            f"n={_get(text, 'vqa_all', 'n')} / {_get(spoken, 'vqa_all', 'n')}; spoken in held-out voices",
        ),
        (
            "OCR accuracy, text / spoken prompt (test)",
            f"{_pct(_get(text, 'ocr/word', 'accuracy'))} / {_pct(_get(spoken, 'ocr/word', 'accuracy'))}",
            ocr_paper,
            f"paper: OCR-VQA, Table 5 default; chance {_pct(_get(ch, 'ocr/word', 'majority'))}",
        ),
        (
            "counting accuracy, text prompt (test)",
            _pct(_get(text, "count/count", "accuracy")),
            "-",
            f"majority {_pct(_get(ch, 'count/count', 'majority'))}",
        ),
        ("caption attribute F1 (test)", _f(t.get("caption_attribute_f1")), "-", ""),
    ]
    blind = t.get("referent_blind", {})
    for kind in sorted(k for k in text if k.startswith("vqa/")):
        rows.append(
            (
                f"... {kind[4:]} questions, text prompt (test)",
                _pct(_get(text, kind, "accuracy")),
                "-",
                f"referent-blind {_pct(_get(blind, kind, 'accuracy'))} "
                f"({_get(blind, kind, 'rule') or '-'}); majority {_pct(_get(ch, kind, 'majority'))}",
            )
        )
    h = ev.get("heldout", {})
    if h:
        rows.append(
            (
                "VQA accuracy, text prompt, held-out colour-shape pairs",
                _pct(_get(h, "text_prompts", "vqa_all", "accuracy")),
                "-",
                "unseen combinations",
            )
        )
    sk = ev.get("speech_kept", {})
    if sk:
        rows.append(
            (
                "assistant audio NLL: base / adapted no image / unrelated image",
                f"{_f(sk.get('base_audio_nll'))} / {_f(sk.get('adapted_no_image_audio_nll'))} / "
                f"{_f(sk.get('adapted_unrelated_image_audio_nll'))}",
                "-",
                "lower = speech better kept",
            )
        )
    return rows


def _gates(src: Sources) -> list[Row]:
    rep = src.json(src.interp_rel, "interp")
    a = _get(rep, "gates", "relevance_auroc") or {}
    seg = _get(rep, "gates", "segments_by_topic") or {}
    chk = rep.get("checks", {})
    rows: list[Row] = [
        (
            f"gate AUROC for image talk per assistant turn (last {a.get('last_layers', '-')} layers)",
            _f(_get(a, "assistant_turns", "auroc")),
            "> 0.5 (qualitative)",
            "paper: gates act as an unsupervised image-relevance score",
        ),
        (
            "... per assistant position (where the loss trains the gate)",
            _f(_get(a, "assistant_positions", "auroc")),
            "-",
            "speech / speechless: "
            f"{_f(_get(a, 'speech', 'assistant_positions', 'auroc'))} / "
            f"{_f(_get(a, 'speechless', 'assistant_positions', 'auroc'))}",
        ),
        (
            "... all positions (user turns, pads and marks included)",
            _f(a.get("auroc")),
            "-",
            f"speech / speechless: {_f(_get(a, 'speech', 'auroc'))} / "
            f"{_f(_get(a, 'speechless', 'auroc'))}; 0.5 = no signal",
        ),
        (
            "mean gate on image / unrelated turns",
            f"{_f(_get(seg, 'image', 'mean'), 4)} / {_f(_get(seg, 'unrelated', 'mean'), 4)}",
            "higher on image",
            f"paper: mean over the last {PAPER_GATE_LAYERS} layers",
        ),
        (
            "g = 0 gives the base LM exactly",
            str(chk.get("gate0_equals_base", "-")),
            "yes",
            "DESIGN.md; bitwise equal logits",
        ),
        (
            "eager vs fused attention, max abs diff",
            _f(chk.get("eager_max_abs_diff"), 7),
            "-",
            "the maps are read from the eager path",
        ),
    ]
    pg = rep.get("pointing_game", {})
    if pg:
        rows.append(
            (
                "pointing game, attention (all layers)",
                _pct(pg.get("all_layers")),
                "-",
                f"random peak {_pct(pg.get('baseline_box_area'))}, n={pg.get('n')}",
            )
        )
    at = rep.get("attribution", {})
    for kind in ("image_tokens", "pixels"):
        k = at.get(kind)
        if k:
            rows.append(
                (
                    f"IG ({kind.replace('_', ' ')}) vs attention, Spearman",
                    _f(k.get("spearman_vs_attention_all_layers")),
                    "-",
                    f"IG completeness gap median {_pct(k.get('completeness_gap_median'))}, "
                    f"IG pointing game {_pct(k.get('pointing_game'))}",
                )
            )
    return rows


def _prosody(src: Sources) -> list[Row]:
    rep = src.json("interp/prosody.json", "prosody")
    summary = rep.get("summary") or {}
    if not summary:
        return [("prosody comparisons", "none", "-", "the model said nothing after the questions")]
    rows: list[Row] = []
    for cond, per in summary.items():
        m = next(iter(per))
        s = per[m]
        rows.append(
            (
                f"{cond}: F0 ratio / contour r / F0 vs before ({m})",
                f"{_f(s.get('f0_median_ratio'))} / {_f(s.get('contour_correlation'))} / "
                f"{_f(s.get('f0_vs_before'))}",
                "~1 / - / ~1",
                "paper: the voice survives adaptation (with speech in the mix)",
            )
        )
    return rows


def _latency(src: Sources) -> list[Row]:
    from moshivis_lab.figures.latency import latency_path

    p = latency_path(src.cfg)
    if not p.exists():
        raise MissingArtefact(f"{p} is missing; run `make_figures(cfg, ...)` (it measures it)")
    lat = src.json(str(p.relative_to(src.root)), "data")
    rows: list[Row] = []
    for r in lat.get("rows", []):
        if r["image_tokens"]:
            rows.append(
                (
                    f"step time ratio, {r['image_tokens']} image tokens (K/V cached)",
                    f"x{r.get('ratio', r['ratio_median']):.3f}",
                    f"x{PAPER_RATIO:.2f}" if r["image_tokens"] == PAPER_TOKENS else "-",
                    f"ours {r['step_ms_min']:.2f} ms/step tiny CPU; paper {PAPER_BASE_MS:.0f} + "
                    f"{PAPER_VISION_MS:.0f} ms, Moshi 7B GPU"
                    if r["image_tokens"] == PAPER_TOKENS
                    else "",
                )
            )
    return rows


SECTIONS: tuple[tuple[str, Callable[[Sources], list[Row]]], ...] = (
    ("Speech LM (validation)", _speech_lm),
    ("Codec", _codec),
    ("Image encoder", _vision),
    ("Adapters: evaluation", _adapters),
    ("Gates, attention, attribution", _gates),
    ("Prosody", _prosody),
    ("Vision latency", _latency),
)


def _ablations(src: Sources) -> list[str]:
    try:
        res = src.json("ablations/ablations.json", "ablations")
    except MissingArtefact as e:
        return [f"_Not built: {e}_", ""]
    md = ablation_markdown(res).replace("### ", "#### ")
    extra = (
        f"Paper's choice: p_audio = {PAPER_P_AUDIO:.0%}." if PAPER_P_AUDIO_NOTE not in md else ""
    )
    return [md, extra, ""] if extra else [md, ""]


# ---------------------------------------------------------------------- figures, timings


def _rel(path: str | None, out: Path) -> str | None:
    if not path:
        return None
    p = Path(path)
    if not p.is_absolute():
        p = out / p
    if not p.exists():
        return None
    return os.path.relpath(p, out).replace(os.sep, "/")


def _figures_md(figures: Mapping[str, Any], out: Path) -> list[str]:
    lines = []
    for name, rec in figures.items():
        rec = rec or {}
        png, html = _rel(rec.get("png"), out), _rel(rec.get("html"), out)
        lines.append(f"### {name.replace('_', ' ')}")
        lines.append("")
        if png:
            lines.append(f"![{name}]({png})")
            if html:
                lines.append(f"\n[interactive]({html})")
        elif html:
            lines.append(f"[{name} (interactive HTML)]({html})")
        if rec.get("error"):
            lines.append(f"\n_{'not made' if not (png or html) else 'note'}: {rec['error']}_")
        lines.append("")
    return lines


def _timings_md(timings: Mapping[str, Any]) -> list[str]:
    stages = timings.get("stages") if isinstance(timings.get("stages"), Mapping) else None
    lines = ["| stage | seconds | note |", "|---|---:|---|"]
    if stages is not None:  # the reproduce pipeline's record
        for name, rec in stages.items():
            if isinstance(rec, Mapping):
                built = rec.get("built")
                note = (
                    "built" if built else f"already there (built in {rec.get('build_seconds')} s)"
                )
                if built is None:
                    note = ""
                lines.append(f"| {name} | {_f(rec.get('seconds'), 1)} | {note} |")
            else:
                lines.append(f"| {name} | {_f(rec, 1)} | |")
        for key in ("this_run_seconds", "build_seconds_total", "budget_seconds"):
            if timings.get(key) is not None:
                lines.append(f"| **{key.replace('_', ' ')}** | {_f(timings[key], 1)} | |")
    else:
        for name, v in timings.items():
            sec = v.get("seconds") if isinstance(v, Mapping) else v
            try:
                lines.append(f"| {name} | {_f(sec, 1)} | |")
            except (TypeError, ValueError):
                lines.append(f"| {name} | {sec} | |")
    return lines + [""]


def write_report(
    cfg: Any,
    out_dir: str | Path,
    figures: Mapping[str, Any] | None = None,
    timings: Mapping[str, Any] | None = None,
    *,
    run: str = "main",
) -> Path:
    """Write ``out_dir/REPORT.md``: per area a table of our numbers (from the artefacts of
    ``cfg``) beside the paper's, the ablation tables, the figures (``make_figures``'s result, or
    ``out_dir/figures.json`` when None) inline, and ``timings`` (stage -> seconds, or the
    reproduce pipeline's record) when given. Returns the path."""
    from moshivis_lab.artefacts import atomic_open, read_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if figures is None and (out / "figures.json").exists():
        figures = read_json(out / "figures.json")
    src = Sources(cfg, run)
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        f"# MoshiVis lab: results at `{cfg.name}` scale",
        "",
        f"Preset **{cfg.name}** (artefacts in `{src.root}`), adapter run `{run}`; written {now}.",
        "Ours: read from the artefacts when this file was written. Paper: MoshiVis (Royer et al., "
        "Kyutai 2025) as quoted in DESIGN.md (Moshi 7B, real data); at tiny scale compare the "
        "direction of an effect, not its size. `-`: no paper number for this measure.",
        "",
    ]
    for title, fn in SECTIONS:
        lines += [f"## {title}", ""]
        try:
            rows = fn(src)
        except MissingArtefact as e:
            lines += [f"_Not built: {e}_", ""]
            continue
        except (KeyError, TypeError, ValueError) as e:
            lines += [f"_Could not read: {type(e).__name__}: {e}_", ""]
            continue
        lines += _table(rows)
    lines += ["## Ablations (equal compute)", ""]
    lines += _ablations(src)
    lines += ["## Figures", ""]
    if figures:
        lines += _figures_md(figures, out)
    else:
        names = ", ".join(FIGURES)
        lines += [f"_No figures yet: run `make_figures(cfg, {str(out)!r})` ({names})._", ""]
    if timings:
        lines += ["## Timings", ""]
        lines += _timings_md(timings)
    path = out / "REPORT.md"
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path


__all__ = ["PAPER_OCR_VQA_DEFAULT", "PAPER_P_AUDIO", "SECTIONS", "write_report", "_cmd"]
