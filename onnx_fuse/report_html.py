"""The report as one self-contained HTML page (`--report-html`): per layer what fused into what
(attention with its mask class and window, RoPE, cache writes), the candidates left unfused with
their reasons, and the check's per-output errors. No scripts, fonts or images from anywhere: the
file alone is the page.

Layers are found by structure, never by names: every fusion and candidate carries its anchor's
position in the graph's topological order (`position`), each attention core ends a layer, and the
RoPE applications and cache writes between two attention cores are computed for the second (a
layer's Q/K rotation and cache write precede its attention). Candidates after the last attention
core (a classifier's softmax) are listed after the layers.
"""

from __future__ import annotations

import bisect
import html
import math

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d232b; background: #fafbfc; }
h1 { font-size: 22px; margin: 0 0 12px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border: 1px solid #d5dbe3; border-radius: 6px; padding: 8px 14px; }
.card b { display: block; font-size: 18px; }
table { border-collapse: collapse; background: #fff; width: 100%; }
th, td { border: 1px solid #d5dbe3; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #e8edf3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #116329; font-weight: 600; } .bad { color: #b3261e; font-weight: 600; }
.pass { background: #e6f4ea; } .fail { background: #fce8e6; }
.tag { display: inline-block; border-radius: 4px; padding: 0 6px; margin: 1px 4px 1px 0;
       background: #dde7f6; } .tag.rope { background: #efe3f7; } .tag.kv_cache { background: #fdf1d6; }
.reason { color: #6b3f00; } ul { margin: 0; padding-left: 18px; }
"""


def render(report: dict, title: str = "model") -> str:
    """The page for `report` (a fuse report, or the partial one of a failed check)."""
    groups = group_by_layer(report.get("fused", []), report.get("unfused", []))
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>onnx-fuse report: {_e(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>onnx-fuse report: {_e(title)}</h1>", _summary(report),
             "<h2>Layers</h2>", _layers_table(groups),
             "<h2>Unfused candidates</h2>", _unfused_table(groups),
             "<h2>Check</h2>", _check_section(report.get("check"))]
    if report.get("error"):
        parts.insert(3, f"<p class=\"bad\" id=\"error\">{_e(report['error'])}</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def group_by_layer(fused: list[dict], unfused: list[dict]) -> list[dict]:
    """[{"layer": k or None, "fused": [...], "unfused": [...]}] in graph order: one group per
    attention core, then what comes after the last one, then entries without a position."""
    def is_attention(entry: dict) -> bool:
        return (entry.get("rule") or entry.get("pattern")) == "attention"

    ends = sorted(e["position"] for e in fused if is_attention(e) and e.get("position") is not None)
    if not ends:  # nothing fused: the attention candidates still mark the layers
        ends = sorted(e["position"] for e in unfused
                      if is_attention(e) and e.get("position") is not None)
    groups = [{"layer": k, "fused": [], "unfused": []} for k in range(len(ends))]
    after = {"layer": "after", "fused": [], "unfused": []}
    unplaced = {"layer": None, "fused": [], "unfused": []}
    for kind, entries in (("fused", fused), ("unfused", unfused)):
        for entry in sorted(entries, key=lambda e: (e.get("position") is None, e.get("position") or 0)):
            where = entry.get("position")
            if where is None:
                unplaced[kind].append(entry)
                continue
            layer = _first_at_or_after(ends, where)
            (groups[layer] if layer is not None else after)[kind].append(entry)
    return groups + [g for g in (after, unplaced) if g["fused"] or g["unfused"]]


def _first_at_or_after(ends: list[int], position: int) -> int | None:
    """Index of the first layer end at or after `position`, None past the last."""
    index = bisect.bisect_left(ends, position)
    return index if index < len(ends) else None


def _summary(report: dict) -> str:
    counts = report.get("counts", {})
    opset = report.get("opset") or {}
    check = report.get("check")
    verdict = ("not run" if check is None else
               f"<span class=\"{'ok' if check['passed'] else 'bad'}\">"
               f"{'passed' if check['passed'] else 'FAILED'}</span>")
    cards = [("target", _e(report.get("target", "?"))),
             ("fused", _e(", ".join(f"{c} {n}" for n, c in sorted(counts.items())) or "nothing")),
             ("unfused candidates", str(len(report.get("unfused", [])))),
             ("opset", _e(f"{opset.get('from', '?')} → {opset.get('to', '?')}")),
             ("check", verdict)]
    if report.get("kept"):  # ops the model had that are already the target's own
        cards.insert(3, ("kept as written", str(len(report["kept"]))))
    if "seconds" in report:
        cards.append(("seconds", _e(report["seconds"])))
    return "<div class=\"cards\" id=\"summary\">" + "".join(
        f"<div class=\"card\">{name}<b>{value}</b></div>" for name, value in cards) + "</div>"


def _layers_table(groups: list[dict]) -> str:
    if not groups:
        return "<p id=\"layers\">No attention core, RoPE application or cache write was found.</p>"
    rows = []
    for group in groups:
        fused = "".join(f"<li>{_fused_cell(e)}</li>" for e in group["fused"]) or "—"
        unfused = "".join(f"<li><span class=\"tag\">{_e(e['pattern'])}</span>"
                          f"<span class=\"reason\">{_e(e['reason'])}</span></li>"
                          for e in group["unfused"]) or "—"
        layer = _layer_name(group["layer"])
        rows.append(f"<tr class=\"layer\" data-layer=\"{_e(group['layer'])}\"><th>{layer}</th>"
                    f"<td><ul>{fused}</ul></td><td><ul>{unfused}</ul></td></tr>")
    return ("<table id=\"layers\"><tr><th>layer</th><th>fused</th><th>left unfused (why)</th></tr>"
            + "".join(rows) + "</table>")


def _layer_name(layer) -> str:
    return {None: "elsewhere", "after": "after the last layer"}.get(layer, f"layer {layer}")


def _fused_cell(entry: dict) -> str:
    rule = entry["rule"]
    tag = f"<span class=\"tag {_e(rule)}\">{_e(rule)}</span>"
    if rule == "attention":
        window = "" if entry.get("window") is None else f", window {entry['window']}"
        heads = f"{entry.get('q_heads')}/{entry.get('kv_heads')} heads × {entry.get('head_size')}"
        what = (f"→ Attention: {heads}, mask <b>{_e(entry.get('mask_class') or 'none')}</b>"
                f"{_e(window)}{', is_causal' if entry.get('is_causal') else ''}, "
                f"scale {_e(entry.get('scale'))}{_softcap(entry)}, {_e(entry.get('dtype'))}")
    elif rule == "rope":
        what = (f"→ RotaryEmbedding: rotary_dim {_e(entry.get('rotary_dim'))} of "
                f"{_e(entry.get('head_size'))}, {'interleaved' if entry.get('interleaved') else 'halves'}, "
                f"{_e(entry.get('layout'))}, {_e(entry.get('max_positions'))} positions")
    elif rule == "kv_cache":
        what = (f"→ TensorScatter: {_e(entry.get('form'))}, cache {_e(entry.get('cache_len'))} slots, "
                f"at {_e(entry.get('write_index'))}, contiguous {_e(entry.get('contiguous'))}")
    else:
        what = _e(", ".join(f"{k}={v}" for k, v in entry.items() if k not in ("rule", "nodes")))
    problems = entry.get("tensorrt") or []
    trt = f" <span class=\"reason\">TensorRT: {_e('; '.join(problems))}</span>" if problems else ""
    return f"{tag}{what} <small>at {_e(entry.get('anchor'))}</small>{trt}"


def _softcap(entry: dict) -> str:
    return f", softcap {_e(entry['softcap'])}" if entry.get("softcap") else ""


def _unfused_table(groups: list[dict]) -> str:
    rows = [f"<tr class=\"unfused\"><td>{_layer_name(g['layer'])}</td><td>{_e(e['pattern'])}</td>"
            f"<td>{_e(e['anchor'])}</td><td class=\"reason\">{_e(e['reason'])}</td></tr>"
            for g in groups for e in g["unfused"]]
    if not rows:
        return "<p id=\"unfused\">Every candidate fused.</p>"
    return ("<table id=\"unfused\"><tr><th>layer</th><th>pattern</th><th>anchor</th><th>reason</th></tr>"
            + "".join(rows) + "</table>")


def _check_section(check: dict | None) -> str:
    if check is None:
        return "<p id=\"check\">The check did not run (--no-check, or nothing changed).</p>"
    header = ("<tr><th rowspan=\"2\">output</th><th rowspan=\"2\">verdict</th>"
              "<th colspan=\"4\">absolute error</th><th colspan=\"4\">relative error</th>"
              "<th rowspan=\"2\">atol</th><th rowspan=\"2\">rtol</th></tr><tr>"
              + "<th>max</th><th>mean</th><th>median</th><th>p99</th>" * 2 + "</tr>")
    rows = [_check_row(name, diff) for name, diff in check.get("outputs", {}).items()]
    verdict = "ok" if check["passed"] else "bad"
    return (f"<p id=\"check-message\" class=\"{verdict}\">{_e(check.get('message', ''))}</p>"
            f"<table id=\"check\">{header}{''.join(rows)}</table>")


def _check_row(name: str, diff: dict) -> str:
    stats = diff.get("stats") or {}
    cells = [_number((stats.get(kind) or {}).get(stat, diff.get(f"max_{kind}") if stat == "max" else None))
             for kind in ("abs", "rel") for stat in ("max", "mean", "median", "p99")]
    tolerance = diff.get("tolerance") or {}
    verdict = "passed" if diff["passed"] else "DIFFERS"
    if diff.get("only_padding_differs"):
        verdict += " (differs at padded tokens only)"
    return (f"<tr class=\"output {'pass' if diff['passed'] else 'fail'}\"><td>{_e(name)}</td>"
            f"<td>{verdict}</td>" + "".join(f"<td class=\"num\">{c}</td>" for c in cells)
            + f"<td class=\"num\">{_number(tolerance.get('atol'))}</td>"
            f"<td class=\"num\">{_number(tolerance.get('rtol'))}</td></tr>")


def _number(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.3g}" if isinstance(value, float) else _e(value)


def _e(value) -> str:
    return html.escape(str(value), quote=True)
