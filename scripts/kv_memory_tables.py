"""Markdown tables of tools/memory_bench.py's JSON files (docs/results/kv-memory/README.md), and
issue 26's targets read from them.

    python scripts/kv_memory_tables.py docs/results/kv-memory/after-random.json ... [--before B.json ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fgdilp_cpp import methods

DEFAULT = methods.UNIVERSAL


def _name(m: str) -> str:
    """The method's name now (a "before" run names it as it was then: fgdilp-universal)."""
    return methods.canonical(m, warn=False)


def after_table(shape: str, r: dict) -> list[str]:
    out = [f"### {shape}: {r['model']} ({r['n_params'] / 1e9:.2f}B params), -c {r['ctx_size']}, {r['turns']} turns "
           f"of {r['reply_tokens']}-token replies, {r['threads']} threads, universal directions: {r['universal']}",
           "", f"`{r.get('command', '')}` ({r.get('wall_s', '?')} s)", "",
           "| method | contrast | chat peak RSS MiB | x none | KV MiB | x none | decode tok/s | x none "
           "| TTFT s (turn 2 on) | x none |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, x in r["methods"].items():
        out.append(f"| {_name(m)} | {r['contrast'].get(m, '')} | {x['peak_rss_mib']} | {x['rss_ratio_vs_none']} "
                   f"| {x['kv_mib']} | {x['kv_ratio_vs_none']} | {x['decode_tokens_per_s']} "
                   f"| {x['decode_ratio_vs_none']} | {x['ttft_s']} | {x['ttft_ratio_vs_none']} |")
    s = r["serve"]
    out += ["", f"serve with {', '.join(_name(m) for m in s['methods'])} after one request each: peak RSS "
                f"{s['peak_rss_mib']} MiB, x{s['rss_ratio_vs_none']} serve with none alone "
                f"({s['none_peak_rss_mib']} MiB); KV {s['kv_mib']} MiB of a {s['kv_budget_mib']} MiB budget "
                f"(within: {s['within_budget']})", ""]
    return out


def before_table(shape: str, b: dict, after: dict | None) -> list[str]:
    out = [f"before ({shape}, checkout {b['tree']}, same chat and serve runs, memory only):", "",
           "| method | chat peak RSS MiB before | after | KV MiB before | after |", "|---|---:|---:|---:|---:|"]
    am = {_name(m): x for m, x in (after or {}).get("methods", {}).items()}
    for m, x in b["methods"].items():
        a = am.get(_name(m), {})
        out.append(f"| {_name(m)} | {x.get('peak_rss_mib', x.get('error'))} | {a.get('peak_rss_mib', '')} "
                   f"| {x.get('kv_mib', '')} | {a.get('kv_mib', '')} |")
    s = b["serve"]
    aserve = (after or {}).get("serve", {})
    out.append(f"| serve, all | {s['all'].get('peak_rss_mib')} | {aserve.get('peak_rss_mib', '')} "
               f"| {s['all'].get('kv_mib')} | {aserve.get('kv_mib', '')} |")
    out.append(f"| serve, none | {s['none'].get('peak_rss_mib')} | {aserve.get('none_peak_rss_mib', '')} "
               f"| {s['none'].get('kv_mib')} | |")
    return out + [""]


SIZED = ("1b", "3b")       # the decode targets are set on the 1B and 3B shapes only


def targets(results: dict[str, dict]) -> list[str]:
    """Issue 26's targets per shape: met or not, with the figure (decode: on the 1B / 3B shapes)."""
    rows = [("default chat peak RSS <= 1.15 x none", lambda r: r["methods"][_key(r, DEFAULT)]["rss_ratio_vs_none"],
             lambda v: v <= 1.15),
            ("serve, every method, peak RSS <= 2 x none's", lambda r: r["serve"]["rss_ratio_vs_none"], lambda v: v <= 2),
            ("default decode >= 0.95 x none", lambda r: r["methods"][_key(r, DEFAULT)]["decode_ratio_vs_none"],
             lambda v: v >= 0.95),
            ("TR decode >= 0.8 x none", lambda r: r["methods"]["tr"]["decode_ratio_vs_none"], lambda v: v >= 0.8),
            ("FGDILP exact decode >= 0.5 x none", lambda r: r["methods"]["fgdilp"]["decode_ratio_vs_none"],
             lambda v: v >= 0.5),
            ("default TTFT (turn 2 on) <= 1.1 x none", lambda r: r["methods"][_key(r, DEFAULT)]["ttft_ratio_vs_none"],
             lambda v: v <= 1.1)]
    shapes = list(results)
    out = ["| target | " + " | ".join(shapes) + " |", "|---|" + "---|" * len(shapes)]
    for name, get, ok in rows:
        cells = []
        for s in shapes:
            try:
                v = get(results[s])
            except KeyError:
                cells.append("")
                continue
            if "decode" in name and s not in SIZED:
                cells.append(f"{v} (no target here)")
            else:
                cells.append(f"{v} {'met' if ok(v) else '**not met**'}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out + [""]


def _key(r: dict, name: str) -> str:
    return next(m for m in r["methods"] if _name(m) == name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("after", nargs="+", type=Path)
    ap.add_argument("--before", nargs="*", type=Path, default=[])
    args = ap.parse_args()
    after = {k: v for p in args.after for k, v in json.loads(p.read_text()).items() if "methods" in v}
    before = {k: v["before"] for p in args.before for k, v in json.loads(p.read_text()).items() if "before" in v}
    lines = ["#### Targets", ""] + targets(after)
    for shape, r in after.items():
        lines += after_table(shape, r)
        if shape in before:
            lines += before_table(shape, before[shape], r)
    for shape, b in before.items():
        if shape not in after:
            lines += before_table(shape, b, None)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
