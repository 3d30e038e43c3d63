"""Markdown report of :mod:`benchmarks.cost` (one row per backbone × dtype × measurement)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List


def _fmt_ratio(r: Dict[str, Any], key: str = "ratio") -> str:
    if "result" not in r:
        return f"not measured ({r.get('reason')})"
    return f"{r['result'][key]:.3f}"


def table(results: List[Dict[str, Any]]) -> str:
    """Markdown table: one row per backbone × dtype × measurement."""
    rows = ["| backbone | dtype | what | atoms | path | plain | e2ip | e2ip / plain |", "|---|---|---|---|---|---|---|---|"]
    for res in results:
        bb = res["backbone"]
        for r in res["inference"]:
            ok = "result" in r
            pl = f"{r['result']['median_s']['plain']:.3f} s" if ok else "—"
            e2 = f"{r['result']['median_s']['e2ip']:.3f} s" if ok else "—"
            n = r["result"]["atoms"] if ok else r["atoms_requested"]
            rows.append(f"| {bb} | {r['dtype']} | inference (median) | {n} | {r['path']} | {pl} | {e2} | {_fmt_ratio(r)} |")
        for r in res["training"]:
            ok = "result" in r
            pl = f"{r['result']['median_s']['plain']:.3f} s" if ok else "—"
            e2 = f"{r['result']['median_s']['e2ip']:.3f} s" if ok else "—"
            n = r["result"]["atoms"] if ok else "—"
            rows.append(f"| {bb} | {r['dtype']} | training step (median) | {n} | eager | {pl} | {e2} | {_fmt_ratio(r)} |")
        for r in res.get("modules", []):
            if "result" not in r:
                rows.append(f"| {bb} | {r['dtype']} | e²IP modules in one calculate | {r['atoms_requested']} | eager "
                            f"| — | — | {_fmt_ratio(r)} |")
                continue
            q = r["result"]
            rows.append(f"| {bb} | {r['dtype']} | e²IP modules in one calculate (timed inside the call; ratio = "
                        f"call / (call − e²IP)) | {q['atoms']} | eager | {q['calculate_s'] - q['e2ip_s']:.3f} s | "
                        f"{q['calculate_s']:.3f} s | {q['ratio']:.4f} |")
        for r in res.get("epoch", []):
            if "result" not in r:
                rows.append(f"| {bb} | {r['dtype']} | epoch (train + val + fit) | — | eager | — | — | {_fmt_ratio(r)} |")
                continue
            q = r["result"]
            med = q["median_s"]
            plain = med["plain_train"] + med["plain_val"]
            frames = f"{q['n_train']}+{q['n_val']} frames"
            for when in ("before", "after"):
                e2 = med["e2ip_train"] + med["e2ip_val"] + med[f"fit_{when}"]
                label = "three validation passes (before)" if when == "before" else "one validation pass (now)"
                rows.append(f"| {bb} | {r['dtype']} | epoch with the fit callback, {label} | {frames} | eager | "
                            f"{plain:.3f} s | {e2:.3f} s | {q[f'ratio_{when}']:.3f} |")
            rows.append(f"| {bb} | {r['dtype']} | epoch without the fit (train + val) | {frames} | eager | {plain:.3f} s "
                        f"| {med['e2ip_train'] + med['e2ip_val']:.3f} s | {q['ratio_no_fit']:.3f} |")
        for r in res["memory"]:
            p, e = r["plain"], r["e2ip"]
            what = "peak RSS increment"
            if "result" in p and "result" in e:
                key = "increment_mb"
                if "cuda_max_allocated_mb" in p["result"]:  # on a GPU the device memory is what limits
                    key, what = "cuda_max_allocated_mb", "peak CUDA memory allocated"
                pm, em = p["result"][key], e["result"][key]
                cells = f"{pm:.0f} MB | {em:.0f} MB | {em / pm:.3f}"
                n = p["result"]["atoms"]
            else:
                cells = f"— | — | not measured ({p.get('reason') or e.get('reason')})"
                n = r["atoms_requested"]
            rows.append(f"| {bb} | {r['dtype']} | {what} | {n} | {r['path']} | {cells} |")
    return "\n".join(rows)


def write_report(paths: List[str], out: Path, command: str) -> Path:
    results = [json.loads(Path(p).read_text()) for p in paths]
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.json").write_text(json.dumps(results, indent=1))
    md = [f"# Cost of the e²IP head ({results[0]['profile']} profile, "
          f"{results[0].get('device_name') or results[0]['device']})", "",
          f"Command: `{command}`", "", f"Threads per process: {results[0]['threads']}.", "", table(results), ""]
    (out / "report.md").write_text("\n".join(md))
    return out / "report.md"
