"""results.json and the self-contained report.html built from it (and only from it)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from ..errors import MedlatentInputError
from ..io import atomic_write_json, atomic_write_text
from . import plots


def write_results(path: str | Path, results: dict) -> Path:
    return atomic_write_json(path, results)


def read_results(run: str | Path) -> dict:
    path = Path(run)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise MedlatentInputError(f"{path}: no results.json here; give a run folder written by `medlatent gap`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MedlatentInputError(f"{path}: not valid JSON ({err}); rerun the audit") from err


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _fmt(entry: dict) -> str:
    lo, hi = entry["ci95"]
    return f"{entry['value']:.3f} <span class=ci>[{lo:.3f}, {hi:.3f}]</span>"


def _gap(entry: dict) -> str:
    mark = " *" if entry["excludes_zero"] else ""
    lo, hi = entry["ci95"]
    return f"{entry['value']:+.3f}{mark} <span class=ci>[{lo:+.3f}, {hi:+.3f}]</span>"


def render_report(results: dict) -> str:
    metric = results.get("primary_metric", "auroc")
    ds = results["dataset"]
    rows = results["rows"]
    table = ["<tr><th>autoencoder</th><th>model</th><th>image</th><th>reconstruction</th><th>latent</th><th>fidelity gap</th><th>learnability gap</th><th>paired test (latent vs recon)</th></tr>"]
    for r in rows:
        test = r.get("paired_test_latent_vs_reconstruction")
        test_text = f"Δ={test['mean_difference']:+.3f}, t p={test['t_test_p']}" if test else "one split: see interval"
        table.append(
            f"<tr><td>{html.escape(r['autoencoder'])}</td><td>{r['model']}</td>"
            + "".join(f"<td>{_fmt(r['scores'][s][metric])}</td>" for s in ("image", "reconstruction", "latent"))
            + f"<td>{_gap(r['gaps']['fidelity'][metric])}</td><td>{_gap(r['gaps']['learnability'][metric])}</td><td>{html.escape(test_text)}</td></tr>"
        )
    variants = []
    for r in rows:
        for name, v in r.get("variants", {}).items():
            share = v["share_of_gap_closed"][metric]
            share_text = f"{share['value']:+.2f} <span class=ci>[{share['ci95'][0]:+.2f}, {share['ci95'][1]:+.2f}]</span>" if share else "undefined (gap interval contains 0)"
            variants.append(f"<tr><td>{html.escape(r['autoencoder'])}</td><td>latent ({name})</td><td>{_fmt(v['scores'][metric])}</td><td>{_fmt(r['scores']['latent'][metric])}</td><td>{_fmt(r['scores']['reconstruction'][metric])}</td><td>{share_text}</td></tr>")
    variant_html = ""
    if variants:
        sweeps = "".join(_img(plots.sigma_sweep_plot(r), "sigma sweep " + r["autoencoder"]) for r in rows if r.get("variants"))
        variant_html = (
            "<h2>Noise-conditioned and distilled latent classifiers</h2><p>Share of the gap closed = (score − latent) / (reconstruction − latent); "
            f"evaluated on clean latents at the minimum sigma; trained for {results.get('provenance', {}).get('config', {}).get('variant_epoch_factor', 1)}× the epochs and patience of the plain classifiers.</p><table><tr><th>autoencoder</th><th>classifier</th><th>score</th><th>plain latent</th><th>reconstruction</th><th>share of gap closed</th></tr>"
            + "".join(variants) + "</table><h3>Sigma sweep (test split)</h3>" + sweeps
        )
    other = []
    for m in ("balanced_accuracy", "mcc"):
        other.append(f"<h3>{m.replace('_', ' ')}</h3><table><tr><th>autoencoder</th><th>model</th><th>image</th><th>reconstruction</th><th>latent</th><th>fidelity gap</th><th>learnability gap</th></tr>")
        for r in rows:
            other.append(
                f"<tr><td>{html.escape(r['autoencoder'])}</td><td>{r['model']}</td>"
                + "".join(f"<td>{_fmt(r['scores'][s][m])}</td>" for s in ("image", "reconstruction", "latent"))
                + f"<td>{_gap(r['gaps']['fidelity'][m])}</td><td>{_gap(r['gaps']['learnability'][m])}</td></tr>"
            )
        other.append("</table>")
    ae_rows = "".join(
        f"<tr><td>{html.escape(a['spec'])}</td><td>{a['class']}</td><td>{a['latent_channels']}×{a['latent_shape'][1]}×{a['latent_shape'][2]} (f{a['downsampling_factor']})</td>"
        f"<td>{a['reconstruction_quality']['psnr']:.2f}</td><td>{a['reconstruction_quality']['ssim']:.3f}</td><td><code>{html.escape(a['content_hash'])}</code></td></tr>"
        for a in results["autoencoders"]
    )
    figures = [_img(plots.scores_plot(rows, metric), "scores per space")]
    rocs = "".join(_img(plots.roc_plot(r), "ROC " + r["autoencoder"]) for r in rows if r.get("roc"))
    grid = _img(plots.sample_grid(results["samples"]), "originals and reconstructions") if results.get("samples") else ""
    prov = results.get("provenance", {})
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>medlatent gap: {html.escape(ds['name'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}}table{{border-collapse:collapse;margin:1em 0;font-size:14px}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}th{{background:#f3f3f3}}.ci{{color:#777;font-size:12px}}img{{max-width:100%;margin:4px}}
details pre{{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}}</style></head><body>
<h1>Learnability gap: {html.escape(ds['name'])}</h1>
<p>{ds['num_samples']} images at {ds['size']}×{ds['size']}, task <b>{ds['task']}</b>, classes {html.escape(', '.join(map(str, ds['class_names'])))}; splits: {html.escape(', '.join(f"{s['name']} ({s['train']}/{s['val']}/{s['test']})" for s in results['splits']))}.</p>
<p>Classifiers: {html.escape(_protocol(prov.get("config", {})))}.</p>
<p>Fidelity gap = score(image) − score(reconstruction); learnability gap = score(reconstruction) − score(latent).
Brackets are paired bootstrap 95% intervals over test samples; * marks a gap whose interval excludes zero.</p>
<h2>{metric.upper()}</h2><table>{''.join(table)}</table>
{figures[0]}
{variant_html}
<h2>ROC curves</h2>{rocs or '<p>(shown for single-seed, single-label runs)</p>'}
<h2>Other metrics</h2>{''.join(other)}
<h2>Autoencoders</h2><table><tr><th>spec</th><th>class</th><th>latent</th><th>PSNR (dB)</th><th>SSIM</th><th>content hash</th></tr>{ae_rows}</table>
<h2>Originals and reconstructions</h2>{grid}
<h2>Provenance</h2><details><summary>configuration, versions, timings</summary><pre>{html.escape(json.dumps({"provenance": prov, "timings_seconds": results.get("timings_seconds")}, indent=2))}</pre></details>
</body></html>"""


def _protocol(config: dict) -> str:
    if not config:
        return "see provenance"
    init = "ImageNet-pretrained" if config.get("pretrained") else "random init"
    return (
        f"{config.get('backbone')} ({init}), loss {config.get('loss')}, up to {config.get('epochs')} epochs with early stopping "
        f"(patience {config.get('patience')}) on validation balanced accuracy; latents standardised to std {config.get('latent_std')} "
        f"with {config.get('latent_mask')} masking; seeds {config.get('seeds')}; linear probe {'on' if config.get('linear_probe') else 'off'}"
    )


def write_report(path: str | Path, results: dict) -> Path:
    return atomic_write_text(path, render_report(results))
