"""The markdown report of the quality benchmark, generated from its JSON result."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

TASK_TITLES = {
    "denoise": "Denoising (emdiffuse-n)",
    "super-resolve": "Super-resolution (emdiffuse-r)",
    "isotropic": "Isotropic reconstruction (vemdiffuse-i, vemdiffuse-a)",
}


def _f(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, fmt)


def _nm(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "—"
    freq = row.get(key.replace("_nm", "_freq"), 0.0)
    return "≤ 16 (Nyquist)" if freq >= 0.5 else f"{value:.1f}"


def _levels_of(result: dict, task: str) -> list[tuple[str, dict]]:
    return [(k, v) for k, v in result["levels"].items() if v["task"] == task]


def summary_lines(result: dict) -> list[str]:
    """Generated, per level: who wins each metric, and where emdiffuse stands."""
    lines = []
    for lv in result["levels"].values():
        rows = lv["rows"]
        best = {m: max(rows, key=lambda r: r[m]) for m in ("psnr", "ssim")}
        best["frc"] = max(rows, key=lambda r: r["frc_truth_freq"])
        ours = [r for r in rows if r["group"] == "emdiffuse"]
        others = [r for r in rows if r["group"] != "emdiffuse"]
        top_other = max(others, key=lambda r: r["psnr"])
        top_ours = max(ours, key=lambda r: r["psnr"]) if ours else None
        text = (f"- **{lv['task']} {lv['label']}**: best PSNR {best['psnr']['method']} "
                f"({best['psnr']['psnr']:.2f} dB), best SSIM {best['ssim']['method']} "
                f"({best['ssim']['ssim']:.3f}), finest FRC vs truth {best['frc']['method']} "
                f"({_nm(best['frc'], 'frc_truth_nm')} nm).")  # fmt: skip
        if top_ours is not None:
            delta = top_ours["psnr"] - top_other["psnr"]
            text += (f" Best emdiffuse row ({top_ours['method']}) vs best other "
                     f"({top_other['method']}): {delta:+.2f} dB PSNR, "
                     f"{top_ours['ssim'] - top_other['ssim']:+.3f} SSIM.")  # fmt: skip
        lines.append(text)
    return lines


def task_table(levels: list[tuple[str, dict]]) -> list[str]:
    """Rows = methods; per level PSNR, SSIM, FRC vs truth and between two reconstructions."""
    methods: list[str] = []
    for _, lv in levels:
        methods += [r["method"] for r in lv["rows"] if r["method"] not in methods]
    head = ["method"]
    for _, lv in levels:
        tag = lv["label"].split(" (")[0]
        head += [f"PSNR dB [{tag}]", "SSIM", "FRC vs truth nm", "FRC two recon. nm"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        cells = [method]
        for _, lv in levels:
            row = next((r for r in lv["rows"] if r["method"] == method), None)
            if row is None:
                cells += ["n/a"] * 4
                continue
            cells += [_f(row["psnr"], ".2f"), _f(row["ssim"], ".3f"), _nm(row, "frc_truth_nm"),
                      _nm(row, "frc_pair_nm")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pair_notes(levels: list[tuple[str, dict]]) -> list[str]:
    """What the 'two reconstructions' FRC compares, per method."""
    seen: dict[str, str] = {}
    for _, lv in levels:
        for r in lv["rows"]:
            if r.get("pair_what"):
                seen.setdefault(r["method"], r["pair_what"])
    if not seen:
        return []
    text = "; ".join(f"{m}: {w}" for m, w in seen.items())
    return [f"FRC two recon. compares two independent reconstructions — {text}. "
            "Deterministic methods on one input have none (—)."]  # fmt: skip


def calibration_table(result: dict) -> list[str]:
    lines = ["| task | level | model (mean of 4) | Pearson | Spearman | coverage of ±2σ | "
             "mean σ | RMSE of mean |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for _, lv in result["levels"].items():
        for name, c in lv["calibration"].items():
            lines.append(f"| {lv['task']} | {lv['label'].split(' (')[0]} | {name} | "
                         f"{_f(c['pearson'], '.3f')} | {_f(c['spearman'], '.3f')} | "
                         f"{_f(c['coverage'], '.3f')} | {_f(c['mean_std'], '.4f')} | "
                         f"{_f(c['rmse'], '.4f')} |")  # fmt: skip
    return lines


def budget_table(result: dict) -> list[str]:
    lines = ["| level | model | steps | batch × patch | training s | parameters |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for key, lv in result["levels"].items():
        for kind, m in lv["models"].items():
            s = m["settings"]
            name = {"diffusion": "emdiffuse (diffusion)", "regression": "regression UNet",
                    "diffusion-a": "vemdiffuse-a (diffusion)"}[kind]  # fmt: skip
            lines.append(f"| {key} | {name} | {m['steps']} | {s['batch_size']} × {s['patch']}² | "
                         f"{m['seconds']:.0f} | {m.get('params', '—')} |")  # fmt: skip
        for algo, p in lv["peers"].items():
            if not isinstance(p, dict) or "error" in p:
                reason = p.get("error", "")[:120] if isinstance(p, dict) else str(p)
                lines.append(f"| {key} | CAREamics {algo} | — | — | failed: {reason} | — |")
                continue
            cfg = p.get("config") or {}
            patch = (cfg.get("data_config") or {}).get("patching", {}).get("patch_size", ["?"])[0]
            batch = (cfg.get("data_config") or {}).get("batch_size", "?")
            lines.append(f"| {key} | CAREamics {algo.upper()} | {p['steps']} ({p['epochs'] + 1} "
                         f"epochs) | {batch} × {patch}² | {p['train_seconds']:.0f} | "
                         f"{p['params']} |")  # fmt: skip
    return lines


def write_markdown(result: dict, path: Path, *, reading: Path | None = None) -> Path:
    """``quality.md``: reading, generated summary, tables per task, calibration, budgets,
    real EM, set-up."""
    env = result["environment"]
    md = ["# Quality benchmark: emdiffuse vs baselines on held-out synthetic EM", ""]
    if reading is not None and reading.exists():
        md += [reading.read_text().strip(), ""]
    md += ["## Generated summary", "", *summary_lines(result), ""]
    for task, title in TASK_TITLES.items():
        levels = [(k, v) for k, v in result["levels"].items() if v["task"] == task]
        if not levels:
            continue
        md += [f"## {title}", "", *task_table(levels), "", *pair_notes(levels), ""]
        for name in (f"{task}_panel", f"{task}_metrics"):
            if name in result["figures"]:
                md += [f"![{name}]({result['figures'][name]})", ""]
    md += ["## Calibration of the uncertainty map", "",
           "Per-voxel standard deviation of 4 samples (the `uncertainty/` image of `enhance "
           "--samples 4`) against the actual error |mean − truth| over the scored voxels; "
           "coverage is the fraction of voxels whose truth lies within mean ± 2σ (0.954 for a "
           "calibrated Gaussian). The std is the population std of the 4 samples (as the "
           "pipeline writes it), which underestimates the spread by √(3/4) on average.", "",
           *calibration_table(result), ""]  # fmt: skip
    if "calibration" in result["figures"]:
        md += [f"![calibration]({result['figures']['calibration']})", ""]
    md += ["## Training budgets", "", *budget_table(result), ""]
    tuning = [(k, lv["classical_tuning"]) for k, lv in result["levels"].items()
              if lv["classical_tuning"]]  # fmt: skip
    if tuning:
        md += ["Classical parameters chosen by PSNR on training slices: " + "; ".join(
            f"{k}: Gaussian σ = {t['gaussian']['sigma']}, NLM h = {t['nlm']['h_over_sigma']}σ, "
            f"patch {t['nlm']['patch_size']}, distance {t['nlm']['patch_distance']}"
            for k, t in tuning) + ".", ""]  # fmt: skip
    real = result["real_em"]
    md += ["## Real EM", ""]
    if "figure" in real:
        md += [f"The denoiser **trained on synthetic data only** ({real['model']}) applied "
               f"through `emdiffuse.enhance` (4 samples) to {len(real['patches'])} of the "
               f"{real['n_patch_set']} real noisy patches in `../shared/data/real_em_noisy` "
               f"({', '.join(real['patches'])}), normalised with the global 0.5/99.5 "
               "percentiles of the whole patch set (never per tile). There is no clean "
               "counterpart: this shows that the model and pipeline run on real EM, not how "
               "accurate they are.", "", f"![real EM]({real['figure']})", ""]  # fmt: skip
    else:
        md += [f"Skipped: {real.get('skipped', 'unknown reason')}.", ""]
    md += ["## Set-up", "",
           f"- Command: `{result['command']}` ({result['mode']} mode); wall time "
           f"{result['wall_seconds'] / 60:.1f} min for the whole run (training included unless "
           "cached: see the budget table).",
           f"- Machine: {env['machine']}; shared with other work during the run, so wall times "
           "are upper bounds. " + ", ".join(f"{k} {env[k]}" for k in
           ("python", "torch", "emdiffuse", "numpy", "scipy", "scikit-image", "careamics",
            "torch (peers venv)") if k in env) + f"; commit {env['commit']}; {env['date']}.",
           f"- Inference: `emdiffuse.enhance` on OME-Zarr with its default sampler "
           f"`{result['enhance_defaults']['sampler']}` at {result['enhance_defaults']['steps']} "
           "steps, 1 sample and mean of 4; the regression UNet through the same call with "
           "`steps=1` (one network evaluation).",
           f"- Data: synthetic EM (`emdiffuse.training.synthetic`, seed {result['seeds']['world']}, "
           f"{result['voxel_nm']:g} nm voxels). Training volume {result['sizes']['train_shape']} "
           f"at origin {result['origins']['train']}; test volumes at origin "
           f"{result['origins']['test']} (never seen in training), noise seeds train "
           f"{result['seeds']['train_noise']}, test {result['seeds']['test_noise']}; training "
           f"seed {result['seeds']['training']}, sampler seeds {result['seeds']['sampler']}.",
           "- Degradations (`emdiffuse.training.degrade`): Poisson-Gaussian noise at a dose; "
           "Gaussian blur (FWHM k) + k×k block mean for super-resolution; for isotropic "
           "reconstruction every k-th thin slice of the isotropic volume (what vemdiffuse-i is "
           "trained on: slices z and z+k → the slices between), not slab averaging, whose "
           "slab centres fall between ground-truth slices for even k.",
           "- Scores on the clean [0, 1] scale (data range 1), outputs unclipped; isotropic: "
           "only the slices between input slices. FRC: Fourier ring correlation summed over "
           "the scored slices, resolution = voxel / first frequency below 1/7.",
           f"- Project training: `emdiffuse.training.trainer.train`, the demo's tiny-CPU "
           f"recipe {result['train_settings']}; the regression UNet is the same call with "
           "`objective=\"regression\"` (same network, data, steps; x0 prediction, L1 loss).",
           "- CAREamics runs in its own venv (`.venv-peers`) as a subprocess "
           "(`benchmarks/quality/careamics_runner.py`), library defaults (UNet depth 2, 32 "
           "channels, batch norm, Adam, ReduceLROnPlateau, MAE for CARE; prediction from the "
           "best-validation checkpoint for CARE and the last for N2V), same patch, batch and "
           "number of steps as the project's models, no early stopping. Super-resolution: "
           "CARE maps the bicubic-upsampled input to the truth; isotropic: CARE maps the "
           "cubic-spline-in-z slice to the true slice at every in-between position.", ""]  # fmt: skip
    timing = ["| level | " + " | ".join(("classical", "scoring", "level total")) + " |",
              "|---|---|---|---|"]  # fmt: skip
    for key, lv in result["levels"].items():
        t = lv["timings"]
        timing.append(f"| {key} | {t['classical (tuning + apply)']:.0f} s | {t['scoring']:.0f} s | "
                      f"{t['level total']:.0f} s |")  # fmt: skip
    md += ["Wall time per level (training, CAREamics and enhancement included):", "", *timing, ""]
    path.write_text("\n".join(md) + "\n")
    return path
