"""The markdown report of the quality benchmark (``quality.md``), generated from the JSON
result of every source in the results folder (``<out>/<source>/quality.json``) and of every
run its index lists (``<out>/runs.json``: the committed report shows the latest run of each
level, wherever it was written).

It states issue 14's targets and, per source, level and training budget, whether each is met
and by how much; then per source the tables (one per level), figures, uncertainty,
training budgets and set-up.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from quality_plan import budget_label

SOURCE_ORDER = ("synthetic", "flyem")
SOURCE_TITLES = {"synthetic": "Synthetic EM (held out)",
                 "flyem": "Real EM: FlyEM FIB-SEM (trained on sample 1, scored on sample 2)"}  # fmt: skip
TASK_TITLES = {
    "denoise": "Denoising (emdiffuse-n)",
    "super-resolve": "Super-resolution (emdiffuse-r)",
    "isotropic": "Isotropic reconstruction (vemdiffuse-i, vemdiffuse-a)",
}
BIAS_LIMIT = 1.0  # % of the truth's range
ISO_GAIN = 2.0  # dB over cubic z, FlyEM isotropic k = 4
SPEARMAN_TARGET = 0.5  # issue 14, per voxel; shown per 16² block too
READING = Path(__file__).with_name("READING.md")
# READING.md's relative links are written from here (the committed report's folder)
READING_BASE = Path(__file__).resolve().parents[1] / "results" / "quality"
# a report folder's list of further run folders (relative): {"runs": ["run/flyem", …]}
RUNS_INDEX = "runs.json"
_LINK = re.compile(r"\]\((?![a-z]+:|#|/)([^)\s#]+)(#[^)\s]*)?\)")

TARGETS_TEXT = """Issue 14's targets, checked in this benchmark (not as timed tests), at equal
wall-clock training budget on the same cores:

1. **Fidelity**: emdiffuse's best output (the posterior mean, or the mean of N samples) ≥
   CAREamics CARE in PSNR **and** SSIM, in every task and level, on synthetic data and on
   FlyEM.
2. **Texture**: a single emdiffuse sample's FRC resolution against the truth at least as fine
   as CARE's, **and** its power-spectrum error (upper half of frequencies) lower.
3. **Isotropic ×4 on FlyEM**: ≥ +2 dB over cubic interpolation in z.
4. **No intensity bias**: |mean(output − truth)| ≤ 1 % of the truth's range for every
   emdiffuse output (issue 14 part 1).
5. **Calibrated uncertainty**: for the rows that write an uncertainty map (the mean of N, and
   the mean alone of a model with an error head), empirical coverage of the written
   interval within 90 % ± 3 %, and Spearman(uncertainty, |error|) ≥ 0.5.

Where a run has CARE reading neighbouring slices too (``care-z1``, ``care-z2``, beside our models reading
them), targets 1 and 2 compare with the better CARE on each measure, so a model reading z
is never held against a CARE that cannot.

A ✓ / ✗ cell gives the margin: emdiffuse minus the reference (dB, SSIM), the two
resolutions (nm) or spectrum errors, the largest |bias|, the coverage and Spearman. "—" marks
a target with nothing to compare at that budget (e.g. no CARE row)."""


def _f(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, fmt)


def _nm(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "—"
    freq = row.get(key.replace("_nm", "_freq"), 0.0)
    return f"≤ {value:.0f} (Nyquist)" if freq >= 0.5 else f"{value:.1f}"


def _ok(flag: bool | None) -> str:
    return "—" if flag is None else ("✓" if flag else "✗")


# --------------------------------------------------------------------------------------
# rows by budget
# --------------------------------------------------------------------------------------
def budgets_of(lv: dict) -> list[float]:
    return sorted({r["budget_s"] for r in lv["rows"] if r.get("budget_s") is not None})


def at_budget(lv: dict, budget: float) -> dict[str, list[dict]]:
    """The level's rows that compete at ``budget``: emdiffuse and learned peers trained for
    it, every input/classical row, and the CARE rows among them (one slice or more)."""
    rows = lv["rows"]
    ours = [r for r in rows if r["group"] == "emdiffuse" and r.get("budget_s") == budget]
    peers = [r for r in rows if r["group"] == "classical"
             or (r["group"] == "learned" and r.get("budget_s") == budget)]  # fmt: skip
    care = [r for r in peers if r["family"].partition("-")[0] == "care"]  # any z context
    return {"ours": ours, "peers": peers, "care": care}


def _short(row: dict) -> str:
    """A compact name for a target cell: the kind and output of an emdiffuse row."""
    kind = row["family"] + ("-a" if row["method"].startswith("vemdiffuse-a") else "")
    return f"{kind} {row['mode']}".strip()


def target_cells(source: str, key: str, lv: dict, budget: float) -> dict[str, str]:
    """Every target's cell for one level and budget."""
    g = at_budget(lv, budget)
    ours, peers, cares = g["ours"], g["peers"], g["care"]
    cells: dict[str, str] = {}
    means = [r for r in ours if r["mode"] != "1 sample"]
    best = {m: max(means, key=lambda r: r[m]) if means else None for m in ("psnr", "ssim")}
    for m, unit, fmt in (("psnr", " dB", "+.2f"), ("ssim", "", "+.3f")):
        b = best[m]
        care = max(cares, key=lambda r: r[m]) if cares else None
        if b is None or care is None:
            cells[f"{m}_care"] = "—"
        else:
            d = b[m] - care[m]
            cells[f"{m}_care"] = f"{_ok(d >= 0)} {d:{fmt}}{unit} ({_short(b)})"
    for m, unit, fmt in (("psnr", " dB", "+.2f"), ("ssim", "", "+.3f")):
        top = max(peers, key=lambda r: r[m]) if peers else None
        if best[m] is not None and top is not None:
            d = best[m][m] - top[m]
            cells[f"{m}_peer"] = f"{_ok(d >= 0)} {d:{fmt}}{unit} vs {top['method']}"
        else:
            cells[f"{m}_peer"] = "—"
    singles = [r for r in ours if r["mode"] == "1 sample"]
    if singles and cares:
        s = max(singles, key=lambda r: r["frc_truth_freq"])
        care = max(cares, key=lambda r: r["frc_truth_freq"])
        cells["frc_care"] = (f"{_ok(s['frc_truth_freq'] >= care['frc_truth_freq'])} "
                             f"{_nm(s, 'frc_truth_nm')} vs {_nm(care, 'frc_truth_nm')} nm "
                             f"({_short(s)})")  # fmt: skip
        s = min(singles, key=lambda r: r["spectrum_error"])
        care = min(cares, key=lambda r: r["spectrum_error"])
        cells["spectrum_care"] = (f"{_ok(s['spectrum_error'] < care['spectrum_error'])} "
                                  f"{s['spectrum_error']:.3f} vs {care['spectrum_error']:.3f} "
                                  f"({_short(s)})")  # fmt: skip
    else:
        cells["frc_care"] = cells["spectrum_care"] = "—"
    if ours:
        worst = max(ours, key=lambda r: abs(r["bias_pct"]))
        cells["bias"] = (f"{_ok(abs(worst['bias_pct']) <= BIAS_LIMIT)} max "
                         f"{worst['bias_pct']:+.2f} % ({_short(worst)})")  # fmt: skip
    else:
        cells["bias"] = "—"
    unc = [r for r in ours if r.get("uncertainty")]
    if unc:
        cov = min(unc, key=lambda r: abs(r["uncertainty"]["coverage"] - 0.9))
        u = cov["uncertainty"]
        cells["coverage"] = (f"{_ok(u['coverage_met'])} {u['coverage']:.1%} "
                             f"({'calibrated' if u['map'] == 'half-width' else '±1.645σ'}, "
                             f"{_short(cov)})")  # fmt: skip
        sp = max(unc, key=lambda r: r["uncertainty"]["spearman"]
                 if math.isfinite(r["uncertainty"]["spearman"]) else -2)  # fmt: skip
        cells["spearman"] = (f"{_ok(sp['uncertainty']['spearman_met'])} voxel "
                             f"{sp['uncertainty']['spearman']:.2f} ({_short(sp)}; perfect map "
                             f"{_f(sp['uncertainty'].get('spearman_ceiling'), '.2f')})")  # fmt: skip
        blocks = [
            r for r in unc if math.isfinite(r["uncertainty"].get("spearman_window", math.nan))
        ]
        if blocks:  # what the map says about regions (a voxel's error is one noisy draw)
            bl = max(blocks, key=lambda r: r["uncertainty"]["spearman_window"])
            value = bl["uncertainty"]["spearman_window"]
            cells["spearman"] += (f"; {_ok(value >= SPEARMAN_TARGET)} 16² block {value:.2f} "
                                  f"({_short(bl)})")  # fmt: skip
    else:
        cells["coverage"] = cells["spearman"] = "—"
    if source == "flyem" and key == "isotropic-k4":
        cubic = next((r for r in peers if r["family"] == "cubic z"), None)
        if best["psnr"] is not None and cubic is not None:
            d = best["psnr"]["psnr"] - cubic["psnr"]
            cells["iso"] = f"{_ok(d >= ISO_GAIN)} {d:+.2f} dB over cubic z (target +{ISO_GAIN:g})"
    return cells


TARGET_COLUMNS = (
    ("psnr_care", "1. PSNR vs CARE"),
    ("ssim_care", "1. SSIM vs CARE"),
    ("frc_care", "2. FRC 1 sample vs CARE"),
    ("spectrum_care", "2. spectrum 1 sample vs CARE"),
    ("bias", "4. bias ≤ 1 %"),
    ("coverage", "5. coverage (90 ± 3 %)"),
    ("spearman", "5. Spearman (≥ 0.5)"),
    ("psnr_peer", "PSNR vs best peer (info)"),
    ("ssim_peer", "SSIM vs best peer (info)"),
)


def targets_table(result: dict) -> list[str]:
    """One row per level and budget, one column per target; then the count of ✓ and ✗."""
    head = ["level", "budget", *(title for _, title in TARGET_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    iso: list[str] = []
    tally: dict[str, list[int]] = {k: [0, 0] for k, _ in TARGET_COLUMNS}
    for key, lv in result["levels"].items():
        for b in budgets_of(lv):
            c = target_cells(result["source"], key, lv, b)
            train_b = b * result.get("budget_scale", 1.0)
            cols = [c[k] for k, _ in TARGET_COLUMNS]
            lines.append(f"| {key} | {budget_label(train_b)} | " + " | ".join(cols) + " |")
            for k, _ in TARGET_COLUMNS:
                if c[k].startswith(("✓", "✗")):
                    tally[k][c[k].startswith("✗")] += 1
            if "iso" in c:
                iso.append(f"- 3. isotropic ×4 on FlyEM [{budget_label(train_b)}]: {c['iso']}.")
    met = [f"{title.split(' ', 1)[1] if title[0].isdigit() else title}: {t[0]} of {sum(t)}"
           for (k, title), t in zip(TARGET_COLUMNS, tally.values(), strict=True) if sum(t)]  # fmt: skip
    lines += ["", "Met (level × budget cells): " + "; ".join(met) + "." if met else ""]
    if iso:
        lines += ["", *iso]
    return lines


# --------------------------------------------------------------------------------------
# per-source sections
# --------------------------------------------------------------------------------------
def level_table(lv: dict) -> list[str]:
    head = ["method", "output", "budget", "trained s / steps", "PSNR dB", "SSIM",
            "FRC vs truth nm", "FRC two recon. nm", "spectrum err", "bias %", "eval s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in lv["rows"]:
        t = r.get("train") or {}
        trained = "—" if not t else f"{_f(t.get('seconds'), '.0f')} / {t.get('steps', '—')}"
        budget = "—" if r.get("train_budget_s") is None else budget_label(r["train_budget_s"])
        lines.append("| " + " | ".join([
            r["method"], r.get("mode") or "—", budget, trained, _f(r["psnr"], ".2f"),
            _f(r["ssim"], ".3f"), _nm(r, "frc_truth_nm"), _nm(r, "frc_pair_nm"),
            _f(r.get("spectrum_error"), ".3f"), _f(r.get("bias_pct"), "+.2f"),
            _f(r.get("seconds"), ".1f")]) + " |")  # fmt: skip
    return lines


def pair_notes(lv: dict) -> list[str]:
    seen: dict[str, str] = {}
    for r in lv["rows"]:
        if r.get("pair_what"):
            seen.setdefault(r["pair_what"], r["method"])
    if not seen:
        return []
    return ["FRC two recon.: " + "; ".join(seen) + ". Deterministic outputs of one input have "
            "none (—)."]  # fmt: skip


def uncertainty_table(result: dict) -> list[str]:
    lines = ["| level | model, budget | map | interval | coverage | Spearman | Pearson | "
             "Spearman per 16² block | perfect map: voxel / block | "
             "±2σ coverage (old) | mean map | RMSE of mean |", "|" + "---|" * 12]  # fmt: skip
    n = 0
    for key, lv in result["levels"].items():
        for r in lv["rows"]:
            u = r.get("uncertainty")
            if not u:
                continue
            n += 1
            budget = budget_label(r["train_budget_s"]) if r.get("train_budget_s") else "—"
            lines.append(f"| {key} | {r['method']} ({r['mode']}), {budget} | {u['map']} | "
                         f"{u['interval']} | {_ok(u['coverage_met'])} {u['coverage']:.3f} | "
                         f"{_ok(u['spearman_met'])} {_f(u['spearman'], '.3f')} | "
                         f"{_f(u['pearson'], '.3f')} | {_f(u.get('spearman_window'), '.3f')} | "
                         f"{_f(u.get('spearman_ceiling'), '.2f')} / "
                         f"{_f(u.get('spearman_window_ceiling'), '.2f')} | "
                         f"{_f(u.get('coverage_2sigma'), '.3f')} | "
                         f"{_f(u['mean_map'], '.4f')} | {_f(u['rmse'], '.4f')} |")  # fmt: skip
    return lines if n else ["No mean-of-N row wrote an uncertainty map."]


def budget_table(result: dict) -> list[str]:
    lines = ["| level | model | budget s | train() s | loop s | steps (of planned) | steps/s "
             "(probe) | parameters |", "|" + "---|" * 8]  # fmt: skip
    for key, lv in result["levels"].items():
        seen = set()
        for r in lv["rows"]:
            t = r.get("train")
            if not t or r.get("plan") in seen:
                continue
            seen.add(r.get("plan"))
            lines.append(f"| {key} | {r['method']} | {_f(r['train_budget_s'], 'g')} | "
                         f"{_f(t.get('seconds'), '.0f')} | {_f(t.get('loop_seconds'), '.0f')} | "
                         f"{t.get('steps', '—')} ({t.get('horizon', '—')}) | "
                         f"{_f(t.get('rate'), '.2f')} | {t.get('params', '—')} |")  # fmt: skip
    return lines



def _enhance_set(result: dict) -> str:
    """The ``--enhance-set`` settings the diffusion rows were sampled with, if any."""
    chosen = result.get("enhance_set") or {}
    if not chosen:
        return ""
    return " — here with " + ", ".join(f"`{k}={v}`" for k, v in chosen.items())


def _default_steps(result: dict) -> str:
    """The run default's steps as the report's set-up states them."""
    steps = result["enhance_defaults"]["steps"]
    if steps is not None:  # reports made before the model chose its own
        return f"{steps} steps"
    return ("the model's default steps (4 on the schedule a residual model fitted at the end "
            "of training, `--spacing fitted`; else 8 on logsnr spacing)")

def setup_lines(result: dict) -> list[str]:
    env = result["environment"]
    versions = ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "emdiffuse", "numpy",
                         "scipy", "scikit-image", "careamics", "torch (peers venv)") if k in env)  # fmt: skip
    feats = result.get("features", {})
    plan = ", ".join(f"{p['method']}@{p['train_s']:g}s" for p in result["plan"])
    return [
        f"- Command: `{result['command']}` ({result['mode']} mode); wall time "
        f"{result['wall_seconds'] / 60:.1f} min for the whole source (training included unless "
        "cached).",
        f"- Machine: {env['machine']}; shared with other work during the run, so wall times "
        f"are upper bounds. {versions}; commit {env['commit']}; {env['date']}.",
        f"- Library features found: residual objective {feats.get('residual')}, mean mode "
        f"(`samples=0`) {feats.get('mean_mode')}; objectives {feats.get('objectives')}.",
        f"- Data: {result['data']['text']}",
        f"- Plan (method@training seconds): {plan}. Every learned method trains for its "
        "budget in wall-clock time on the same cores: the project's models through "
        "`trainer.train(time_limit=…)` with `steps` = a margin × a probe-measured rate × "
        "budget: 1.5 where the cosine learning rate follows the clock to the limit "
        "(`lr_follows_time`, since the thirtieth session), 1.1 (the cosine's horizon) "
        "before; CAREamics with its epochs sized from a probe-measured "
        "rate and a Lightning `Timer` at the budget. `train() s` includes the set-up "
        "(normalisation statistics, dataset); `loop s` is the optimisation loop alone.",
        f"- Inference: `emdiffuse.enhance` on OME-Zarr with its default sampler "
        f"`{result['enhance_defaults']['sampler']}` at {_default_steps(result)}"
        f"{_enhance_set(result)}: the posterior mean (`samples=0`, one network evaluation), 1 sample and the "
        f"mean of {result['samples']}; the regression UNet through the same call with "
        "`steps=1` (one network evaluation).",
        "- Degradations (`emdiffuse.training.degrade`): Poisson(-Gaussian) noise at a dose, "
        "keyed on seed and voxel position; Gaussian blur (FWHM k) + k×k block mean for "
        "super-resolution; for isotropic reconstruction every k-th slice of the isotropic "
        "volume (vemdiffuse-i trains on the isotropic volume; vemdiffuse-a only on the "
        "k-subsampled one).",
        "- Scores on the clean [0, 1] scale (data range 1), outputs unclipped; isotropic: only "
        "the slices between input slices. FRC: Fourier ring correlation summed over the "
        "scored slices, resolution = voxel / first frequency below 1/7. Spectrum error: mean "
        "|log10 P_out − log10 P_truth| of the radial power spectrum over 0.25–0.5 cycles/voxel. "
        "Bias: mean(output − truth) / (99.5th − 0.5th percentile of the truth).",
        f"- Project training: `emdiffuse.training.trainer.train`, the demo's tiny-CPU recipe "
        f"{result['train_settings']}; objective per kind (`residual`, `diffusion` = SR3, "
        "`regression` = x0 with L1).",
        "- CAREamics (`benchmarks/quality/careamics_runner.py`, own venv): library defaults "
        "(UNet depth 2, 32 channels, batch norm, Adam, ReduceLROnPlateau, MAE for CARE), same "
        "patch and batch, no early stopping. Super-resolution: CARE maps the bicubic-upsampled "
        "input to the truth; isotropic: CARE maps the cubic-spline-in-z slice to the true slice "
        "at every in-between position of the k-subsampled training volume.",
    ]


def source_section(
    result: dict, folder: str | None = None, *, name_levels: bool = False
) -> list[str]:
    """One source's section; its figures are linked from ``folder`` (relative to the report;
    default: the source's name), and with ``name_levels`` the title lists the run's levels
    (a source shown from more than one run)."""
    src = folder or result["source"]
    title = SOURCE_TITLES.get(result["source"], result["source"])
    if name_levels:
        title += " — " + ", ".join(result["levels"])
    md = [f"## {title}", ""]
    if result["mode"] != "full":
        md += [f"**{result['mode']} run: a smoke test of the pipeline, not a result** "
               f"(budgets × {result.get('budget_scale', 1):g}).", ""]  # fmt: skip
    md += ["### Targets", "", *targets_table(result), ""]
    for task, title in TASK_TITLES.items():
        levels = [(k, v) for k, v in result["levels"].items() if v["task"] == task]
        if not levels:
            continue
        md += [f"### {title}", ""]
        for key, lv in levels:
            md += [f"**{key}: {lv['label']}** (truth {lv['test_shape_truth']}, input "
                   f"{lv['test_input_shape']}, {len(lv['eval_slices'])} scored slices)", "",
                   *level_table(lv), "", *pair_notes(lv), ""]  # fmt: skip
            if lv.get("skipped"):
                md += ["Skipped: " + "; ".join(f"{s['what']} ({s['why'][:160]})"
                                               for s in lv["skipped"]) + ".", ""]  # fmt: skip
            fig = result["figures"].get(f"{key}_panel")
            if fig:
                md += [f"![{key} panel]({src}/{fig})", ""]
        for name in (f"{task}_metrics", f"{task}_frc"):
            if name in result["figures"]:
                md += [f"![{name}]({src}/{result['figures'][name]})", ""]
    md += ["### Uncertainty", "",
           "The `uncertainty/` image of `enhance --samples N` against the actual error "
           "|mean − truth| over the scored voxels. A calibrated checkpoint writes per-voxel "
           "half-widths of an interval at a stated level (its zarr attributes say so); an "
           "uncalibrated one the sample std, scored here as the Gaussian 90 % interval "
           "mean ± 1.645σ. ±2σ coverage (0.954 for a calibrated Gaussian) is kept for "
           "comparison with the earlier runs. One voxel's error is a single noisy draw, so "
           "even a perfect map ranks it loosely: 'perfect map' is what a map of the same "
           "values would score if the error were Gaussian with exactly that σ, per voxel and "
           "per 16×16-voxel block; 'Spearman per 16² block' compares the block RMS of the "
           "map with the block RMS error (does the map mark the error-prone regions).",
           "", *uncertainty_table(result), ""]  # fmt: skip
    if "calibration" in result["figures"]:
        md += [f"![calibration]({src}/{result['figures']['calibration']})", ""]
    md += ["### Training budgets", "", *budget_table(result), ""]
    tuning = [(k, lv["classical_tuning"]) for k, lv in result["levels"].items()
              if lv["classical_tuning"]]  # fmt: skip
    if tuning:
        md += ["Classical parameters chosen by PSNR on training slices: " + "; ".join(
            f"{k}: Gaussian σ = {t['gaussian']['sigma']}, NLM h = {t['nlm']['h_over_sigma']}σ, "
            f"patch {t['nlm']['patch_size']}, distance {t['nlm']['patch_distance']}"
            for k, t in tuning) + ".", ""]  # fmt: skip
    real = result.get("real_em", {})
    if "figure" in real:
        md += ["### Real EM patches without ground truth", "",
               f"The synthetic-trained denoiser ({real['model']}) applied through "
               f"`emdiffuse.enhance` (4 samples) to {len(real['patches'])} of the "
               f"{real['n_patch_set']} real noisy patches in `../shared/data/real_em_noisy` "
               f"({', '.join(real['patches'])}), normalised with the global 0.5/99.5 "
               "percentiles of the whole patch set. No clean counterpart: this shows that the "
               "model and pipeline run on real EM, not how accurate they are.", "",
               f"![real EM]({src}/{real['figure']})", ""]  # fmt: skip
    md += ["### Set-up", "", *setup_lines(result), ""]
    timing = ["| level | classical | scoring | level total |", "|---|---|---|---|"]
    for key, lv in result["levels"].items():
        t = lv["timings"]
        timing.append(f"| {key} | {t['classical (tuning + apply)']:.0f} s | {t['scoring']:.0f} s "
                      f"| {t['level total']:.0f} s |")  # fmt: skip
    md += ["Wall time per level (training, CAREamics and enhancement included):", "", *timing, ""]
    return md


def load_results(out: Path) -> list[tuple[dict, str]]:
    """Every ``<out>/<source>/quality.json`` and every run folder ``<out>/runs.json`` lists
    (:data:`RUNS_INDEX`), synthetic first, each with its folder relative to ``out``; a listed
    folder without one raises ``ValueError``."""
    folders = [p.parent.name for p in sorted(out.glob("*/quality.json"))]
    index = out / RUNS_INDEX
    if index.exists():
        listed = json.loads(index.read_text()).get("runs", [])
        missing = [f for f in listed if not (out / f / "quality.json").is_file()]
        if missing:
            raise ValueError(f"{index}: no quality.json in {', '.join(missing)}; fix the list")
        folders += [f for f in listed if f not in folders]
    found = [(json.loads((out / f / "quality.json").read_text()), f) for f in folders]
    rank = {s: i for i, s in enumerate(SOURCE_ORDER)}
    return sorted(found, key=lambda pair: rank.get(pair[0]["source"], len(rank)))


def split_reading(text: str) -> tuple[str, str]:
    """READING.md's first ``## `` section (how to read the report) and the rest."""
    cut = text.find("\n## ", text.find("## ") + 1)
    return (text, "") if cut < 0 else (text[:cut].strip(), text[cut:].strip())


def rebase_links(text: str, base: Path, out: Path) -> str:
    """``text`` with its relative markdown links, written from folder ``base``, rewritten to
    point at the same files from folder ``out`` (a report written one folder deeper)."""

    def rebase(match: re.Match) -> str:
        target = os.path.relpath(base / match.group(1), out.resolve())
        return f"]({Path(target).as_posix()}{match.group(2) or ''})"

    return _LINK.sub(rebase, text)


def write_markdown(out: Path) -> Path:
    """``<out>/quality.md`` from every source's JSON in ``out``: READING.md's first section
    (how to read), the targets, the results per source, then the rest of READING.md (what
    each session measured, newest first)."""
    results = load_results(out)
    md = ["# Quality benchmark: emdiffuse vs baselines and CAREamics, on synthetic and real EM", ""]
    guide, notes = split_reading(
        rebase_links(READING.read_text().strip(), READING_BASE, out) if READING.exists() else ""
    )
    if guide:
        md += [guide, ""]
    md += ["## Targets (issue 14)", "", TARGETS_TEXT, ""]
    if not results:
        md += [f"No results in {out} yet.", ""]
    runs_per_source = Counter(result["source"] for result, _ in results)
    for result, folder in results:
        md += source_section(result, folder, name_levels=runs_per_source[result["source"]] > 1)
    if notes:
        md += ["# What each session measured (READING.md, newest first)", "", notes, ""]
    path = out / "quality.md"
    path.write_text("\n".join(md) + "\n")
    return path
