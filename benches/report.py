#!/usr/bin/env python3
"""Summarise a benches/run.sh results folder: summary.csv, summary.md and chart.png.

Usage: report.py RESULTS_DIR

Reads raw.csv (one line per measured run) and machine.txt. Values are medians over rounds;
ratios are the median of the per-round ratios (targets of one round ran back to back), so
slow drifts of a shared machine cancel out. The chart needs matplotlib; without it only the
tables are written.
"""

import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

MB = 1_000_000


def num(v):
    return float(v) if v not in ("", None) else None


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def extra(row):
    out = {}
    for kv in (row.get("extra") or "").split(";"):
        if "=" in kv:
            k, v = kv.split("=", 1)
            out[k] = float(v)
    return out


def fmt(v, spec=".2f"):
    return "" if v is None else format(v, spec)


class Runs:
    def __init__(self, rows):
        self.by = defaultdict(list)
        self.order = []
        for r in rows:
            key = (r["scenario"], r["target"], r["mode"], r["clients"])
            if key not in self.by:
                self.order.append(key)
            self.by[key].append(r)

    def rows(self, scenario, target, mode, clients):
        return self.by.get((scenario, target, mode, clients), [])

    def ratio(self, key, base_target, field="tps"):
        """Median over rounds of key's field / base's field in the same round."""
        base = {r["round"]: num(r[field]) for r in self.rows(key[0], base_target, key[2], key[3])}
        rs = []
        for r in self.by[key]:
            b, v = base.get(r["round"]), num(r[field])
            if b and v is not None:
                rs.append(v / b)
        return med(rs)


def cpu_per_1k(rows):
    if not rows or any(r["proxy_cpu_s"] == "" for r in rows):
        return None
    stmts = sum(float(r["statements"]) for r in rows)
    return sum(float(r["proxy_cpu_s"]) for r in rows) * 1000 / (stmts / 1000) if stmts else None


# The orm scenario's workloads: targets in order with their letters, the target the others are
# compared with (ratio_1) and a second one (ratio_2), the ratios asked of it, and the target
# running the look-up's own statement alone, directly.
ORM = {
    "orm-update-by-key": dict(
        title="UPDATE t SET a, b WHERE id = $ (tenant column org_id)",
        targets={"direct": "(a)", "pgenvelope-tenant-in-where": "(b)", "pgenvelope-lookup": "(c)",
                 "pgenvelope-session-tenant": "(d)", "direct-lookup-alone": "look-up alone"},
        base="pgenvelope-tenant-in-where", base_2="direct",
        ratios=[("pgenvelope-lookup", "pgenvelope-tenant-in-where", "(c)/(b)"),
                ("pgenvelope-session-tenant", "pgenvelope-tenant-in-where", "(d)/(b)")],
        alone="direct-lookup-alone"),
    "orm-insert-drawn-key": dict(
        title="INSERT INTO t (org_id, a, b), id bigserial",
        targets={"direct": "(a)", "pgenvelope-encrypted": "(b)", "pgenvelope-bound-given": "(c)",
                 "pgenvelope-bound-drawn": "(d)", "direct-draw-alone": "key draw alone"},
        base="pgenvelope-encrypted", base_2="pgenvelope-bound-given",
        ratios=[("pgenvelope-bound-drawn", "pgenvelope-bound-given", "(d)/(c)"),
                ("pgenvelope-bound-drawn", "pgenvelope-encrypted", "(d)/(b)")],
        alone="direct-draw-alone"),
}


def per_round(runs, scenario, clients, num_t, den_t, get, op, keys=None):
    """Median over rounds of op(get(num_t's run), get(den_t's run)) within one round; keys
    narrows the runs looked at (e.g. to one protocol mode)."""
    def by_round(t):
        return {r["round"]: r for k in (keys if keys is not None else runs.order)
                if k[0] == scenario and k[1] == t and k[3] == clients for r in runs.by[k]}
    dens = by_round(den_t)
    out = []
    for rnd, r in by_round(num_t).items():
        if rnd in dens:
            a, b = get(r), get(dens[rnd])
            if a is not None and b is not None and (b or op is not ratio_of):
                out.append(op(a, b))
    return med(out)


def ratio_of(a, b):
    return a / b


def cpu_per_stmt(r):
    return float(r["proxy_cpu_s"]) / float(r["statements"]) if r["proxy_cpu_s"] and float(r["statements"]) else None


def orm_section(runs, keys, summary):
    md = ["### ORM look-ups: the tenant look-up and key draws (64 B + 1 KiB in two encrypted columns, prepared)", "",
          "update-by-key: (a) directly, plain table; through pgenvelope (b) `WHERE id = $ AND org_id = $` "
          "(no look-up), (c) `WHERE id = $` with no tenant known (tenant look-up first), (d) `WHERE id = $` "
          "under a session tenant given at connect time (pinned, no look-up). insert-drawn-key: (a) directly, "
          "plain table, id left out; through pgenvelope (b) encrypted table, id left out; (c) row-bound "
          "table, client-given key; (d) row-bound bigserial table, id left out (keys drawn first). "
          "\"alone\": the look-up's own statement sent directly by pgbench (simple protocol).", "",
          "| workload | clients | target | TPS | mean ms | p99 ms | proxy CPU ms / 1k stmts | vs (b) |",
          "|---|---|---|---|---|---|---|---|"]
    for k in sorted(keys, key=lambda k: (list(ORM).index(k[0]), int(k[3]), list(ORM[k[0]]["targets"]).index(k[1]))):
        spec = ORM[k[0]]
        rs = runs.by[k]
        s = dict(scenario=k[0], target=k[1], mode=k[2], clients=k[3],
                 tps=med(num(r["tps"]) for r in rs), mean_ms=med(num(r["mean_ms"]) for r in rs),
                 p99_ms=med(num(r["p99_ms"]) for r in rs), cpu_ms_per_1k=cpu_per_1k(rs),
                 ratio_1=per_round(runs, k[0], k[3], k[1], spec["base"], lambda r: num(r["tps"]), ratio_of),
                 ratio_1_base=spec["base"],
                 ratio_2=per_round(runs, k[0], k[3], k[1], spec["base_2"], lambda r: num(r["tps"]), ratio_of),
                 ratio_2_base=spec["base_2"], cpu_ratio=None, value="", unit="", rounds=len(rs))
        summary.append(s)
        md.append(f"| {k[0].split('-', 1)[1]} | {k[3]} | {spec['targets'][k[1]]} {k[1]} | {s['tps']:,.0f} "
                  f"| {fmt(s['mean_ms'], '.3f')} | {fmt(s['p99_ms'], '.3f')} | {fmt(s['cpu_ms_per_1k'])} "
                  f"| {fmt(s['ratio_1'])} |")
    md += ["", "Ratios (median of the per-round ratios; \"added\" is the median per-round difference of "
           "the mean latency, next to the mean latency of the look-up's statement alone, directly):", "",
           "| workload | clients | ratio | TPS | mean latency | p99 latency | proxy CPU / stmt | mean ms added | look-up alone, direct: mean ms |",
           "|---|---|---|---|---|---|---|---|---|"]
    for scen, spec in ORM.items():
        clients = sorted({k[3] for k in keys if k[0] == scen}, key=int)
        for c in clients:
            alone = med(num(r["mean_ms"]) for k in keys if k[0] == scen and k[1] == spec["alone"] and k[3] == c
                        for r in runs.by[k])
            for num_t, den_t, label in spec["ratios"]:
                def rr(get, op=ratio_of):
                    return per_round(runs, scen, c, num_t, den_t, get, op)
                tps = rr(lambda r: num(r["tps"]))
                mean = rr(lambda r: num(r["mean_ms"]))
                p99 = rr(lambda r: num(r["p99_ms"]))
                cpu = rr(cpu_per_stmt)
                added = rr(lambda r: num(r["mean_ms"]), lambda a, b: a - b)
                md.append(f"| {scen.split('-', 1)[1]} | {c} | {label} | {fmt(tps)} | {fmt(mean)} | {fmt(p99)} "
                          f"| {fmt(cpu)} | {fmt(added, '+.3f')} | {fmt(alone, '.3f')} |")
    md.append("")
    return md


SEARCH_TARGETS = {"direct": "(a)", "pgenvelope-plain": "(b)", "pgenvelope-search": "(c)"}


def search_section(runs, keys, summary):
    md = ["### Equality search: look-up by value on an indexed column", "",
          "(a) `SELECT id, email_plain FROM search_t WHERE email_plain = $` directly; through pgenvelope, "
          "under a session tenant given at connect time, (b) the same (plaintext column, no rules on it) and "
          "(c) `SELECT id, email FROM search_t WHERE email = $` on the searchable column (the value replaced "
          "by its search term, `left(email, 31)` compared and its index used, the returned value decrypted). "
          "Each returns one row; simple: the value is a literal instead of a parameter.", "",
          "| mode | clients | target | TPS | mean ms | p99 ms | proxy CPU ms / 1k stmts | vs (b) | vs (a) |",
          "|---|---|---|---|---|---|---|---|---|"]
    modes = ["prepared", "simple"]
    for k in sorted(keys, key=lambda k: (modes.index(k[2]) if k[2] in modes else 9, int(k[3]),
                                         list(SEARCH_TARGETS).index(k[1]))):
        rs = runs.by[k]
        s = dict(scenario=k[0], target=k[1], mode=k[2], clients=k[3],
                 tps=med(num(r["tps"]) for r in rs), mean_ms=med(num(r["mean_ms"]) for r in rs),
                 p99_ms=med(num(r["p99_ms"]) for r in rs), cpu_ms_per_1k=cpu_per_1k(rs),
                 ratio_1=runs.ratio(k, "pgenvelope-plain"), ratio_1_base="pgenvelope-plain",
                 ratio_2=runs.ratio(k, "direct"), ratio_2_base="direct", cpu_ratio=None,
                 value="", unit="", rounds=len(rs))
        summary.append(s)
        md.append(f"| {k[2]} | {k[3]} | {SEARCH_TARGETS[k[1]]} {k[1]} | {s['tps']:,.0f} | {fmt(s['mean_ms'], '.3f')} "
                  f"| {fmt(s['p99_ms'], '.3f')} | {fmt(s['cpu_ms_per_1k'])} | {fmt(s['ratio_1'])} | {fmt(s['ratio_2'])} |")
    md += ["", "Ratios (median of the per-round ratios; target: (c)/(b) TPS >= 0.8; \"added\" is the median "
           "per-round difference of the mean latency):", "",
           "| mode | clients | ratio | TPS | mean latency | p99 latency | proxy CPU / stmt | mean ms added | TPS per round |",
           "|---|---|---|---|---|---|---|---|---|"]
    for mode in sorted({k[2] for k in keys}, key=lambda m: modes.index(m) if m in modes else 9):
        for c in sorted({k[3] for k in keys if k[2] == mode}, key=int):
            mk = [k for k in keys if k[2] == mode]
            for den_t, label in (("pgenvelope-plain", "(c)/(b)"), ("direct", "(c)/(a)")):
                def rr(get, op=ratio_of):
                    return per_round(runs, "search", c, "pgenvelope-search", den_t, get, op, mk)
                rounds = per_round_list(runs, c, "pgenvelope-search", den_t, mk)
                md.append(f"| {mode} | {c} | {label} | {fmt(rr(lambda r: num(r['tps'])))} "
                          f"| {fmt(rr(lambda r: num(r['mean_ms'])))} | {fmt(rr(lambda r: num(r['p99_ms'])))} "
                          f"| {fmt(rr(cpu_per_stmt)) if den_t != 'direct' else ''} "
                          f"| {fmt(rr(lambda r: num(r['mean_ms']), lambda a, b: a - b), '+.3f')} "
                          f"| {', '.join(fmt(x) for x in rounds)} |")
    md.append("")
    explain = [r for k in runs.order if k[0] == "search-explain" for r in runs.by[k]]
    scans = [r for k in runs.order if k[0] == "search-index" for r in runs.by[k]]
    if explain:
        e = extra(explain[0])
        kind = {1: "an Index Scan", 2: "a Bitmap Index Scan"}.get(int(e.get("index_scan", 0)), "no index scan")
        md.append(f"EXPLAIN of (c) sent through the proxy ({int(e['rows']):,} rows, {int(e['orgs'])} organisations): "
                  f"{kind} of the term index `(left(email, 31))` (plans in search_explain.txt).")
    if scans:
        e, n = extra(scans[0]), num(scans[0]["statements"])
        if n:
            md.append(f"Scans of the term index during the timed runs: {int(e['index_scans']):,} for {int(n):,} "
                      f"look-ups of (c), {e['index_scans'] / n:.2f} per look-up.")
    md.append("")
    return md


def per_round_list(runs, clients, num_t, den_t, keys):
    """The per-round TPS ratios num_t / den_t, in round order."""
    def by_round(t):
        return {r["round"]: num(r["tps"]) for k in keys if k[1] == t and k[3] == clients for r in runs.by[k]}
    nums, dens = by_round(num_t), by_round(den_t)
    return [nums[r] / dens[r] for r in sorted(nums, key=int) if dens.get(r)]


def main():
    folder = Path(sys.argv[1])
    rows = list(csv.DictReader(open(folder / "raw.csv")))
    machine = {}
    if (folder / "machine.txt").exists():
        for line in open(folder / "machine.txt"):
            if "=" in line:
                k, v = line.rstrip("\n").split("=", 1)
                machine[k] = v
    runs = Runs(rows)
    summary = []  # dicts with a fixed set of columns
    md = []

    # 1. pass-through
    pt = [k for k in runs.order if k[0] == "passthrough"]
    if pt:
        md += ["### Pass-through: pgbench -S (select-only)", "",
               "| mode | clients | target | TPS | mean ms | p99 ms | proxy CPU ms / 1k stmts | vs direct | vs pgbouncer | CPU vs pgbouncer |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for k in sorted(pt, key=lambda k: (k[2], int(k[3]), ["direct", "pgbouncer", "pgenvelope", "pgenvelope-rules"].index(k[1]))):
            rs = runs.by[k]
            cpu = cpu_per_1k(rs)
            bcpu = cpu_per_1k(runs.rows("passthrough", "pgbouncer", k[2], k[3]))
            s = dict(scenario="passthrough", target=k[1], mode=k[2], clients=k[3],
                     tps=med(num(r["tps"]) for r in rs), mean_ms=med(num(r["mean_ms"]) for r in rs),
                     p99_ms=med(num(r["p99_ms"]) for r in rs), cpu_ms_per_1k=cpu,
                     ratio_1=runs.ratio(k, "direct"), ratio_1_base="direct",
                     ratio_2=runs.ratio(k, "pgbouncer"), ratio_2_base="pgbouncer",
                     cpu_ratio=(cpu / bcpu if cpu and bcpu and k[1] != "pgbouncer" else None),
                     value="", unit="", rounds=len(rs))
            summary.append(s)
            md.append(f"| {k[2]} | {k[3]} | {k[1]} | {s['tps']:,.0f} | {fmt(s['mean_ms'], '.3f')} | {fmt(s['p99_ms'], '.3f')} "
                      f"| {fmt(cpu)} | {fmt(s['ratio_1'])} | {fmt(s['ratio_2'])} | {fmt(s['cpu_ratio'])} |")
        md.append("")

    # 2. encrypted workload
    enc = [k for k in runs.order if k[0].startswith("encrypted-")]
    if enc:
        md += ["### Encrypted workload: two encrypted columns (64 B + 1 KiB), prepared", "",
               "| workload | clients | target | TPS | mean ms | p99 ms | proxy CPU ms / 1k stmts | vs pgenvelope-plain | vs direct |",
               "|---|---|---|---|---|---|---|---|---|"]
        tord = ["direct", "pgenvelope-plain", "pgenvelope-encrypted", "pgenvelope-bound"]
        for k in sorted(enc, key=lambda k: (k[0], int(k[3]), tord.index(k[1]))):
            rs = runs.by[k]
            s = dict(scenario=k[0], target=k[1], mode=k[2], clients=k[3],
                     tps=med(num(r["tps"]) for r in rs), mean_ms=med(num(r["mean_ms"]) for r in rs),
                     p99_ms=med(num(r["p99_ms"]) for r in rs), cpu_ms_per_1k=cpu_per_1k(rs),
                     ratio_1=runs.ratio(k, "pgenvelope-plain"), ratio_1_base="pgenvelope-plain",
                     ratio_2=runs.ratio(k, "direct"), ratio_2_base="direct", cpu_ratio=None,
                     value="", unit="", rounds=len(rs))
            summary.append(s)
            md.append(f"| {k[0].split('-', 1)[1]} | {k[3]} | {k[1]} | {s['tps']:,.0f} | {fmt(s['mean_ms'], '.3f')} "
                      f"| {fmt(s['p99_ms'], '.3f')} | {fmt(s['cpu_ms_per_1k'])} | {fmt(s['ratio_1'])} | {fmt(s['ratio_2'])} |")
        md.append("")

    # 2b. ORM look-ups: the tenant look-up and key draws
    orm = [k for k in runs.order if k[0].startswith("orm-")]
    if orm:
        md += orm_section(runs, orm, summary)

    # 2c. equality search on an encrypted column
    search = [k for k in runs.order if k[0] == "search"]
    if search:
        md += search_section(runs, search, summary)

    # 3. bulk read
    bulk = [k for k in runs.order if k[0].startswith("bulk")]
    if bulk:
        md += ["### Bulk read: one SELECT of all rows, one column encrypted", "",
               "| target | rows | value B | wall s | plaintext MB/s (wall) | proxy CPU s | plaintext MB/s per proxy CPU s | wall vs pgenvelope-plain | wall vs direct |",
               "|---|---|---|---|---|---|---|---|---|"]
        for k in sorted(bulk, key=lambda k: (int(k[0].split("-")[1]) if "-" in k[0] else 0,
                                             ["direct", "pgenvelope-plain", "pgenvelope-encrypted"].index(k[1]))):
            rs = runs.by[k]
            e = extra(rs[0])
            mb = e["rows"] * e["value_bytes"] / MB
            wall = med(num(r["wall_s"]) for r in rs)
            cpu = med(num(r["proxy_cpu_s"]) for r in rs)
            per_cpu = mb / cpu if cpu else None
            inv = lambda base: runs.ratio(k, base, "wall_s")
            r1, r2 = inv("pgenvelope-plain"), inv("direct")
            s = dict(scenario=k[0], target=k[1], mode=k[2], clients=k[3], tps=None,
                     mean_ms=wall * 1000, p99_ms=None,
                     cpu_ms_per_1k=(cpu * 1000 / (e["rows"] / 1000) if cpu else None),
                     ratio_1=(1 / r1 if r1 else None), ratio_1_base="pgenvelope-plain (throughput)",
                     ratio_2=(1 / r2 if r2 else None), ratio_2_base="direct (throughput)",
                     cpu_ratio=None, value=per_cpu, unit="plaintext MB per proxy CPU second",
                     rounds=len(rs), _mb=mb)
            summary.append(s)
            md.append(f"| {k[1]} | {int(e['rows']):,} | {int(e['value_bytes'])} | {wall:.2f} | {mb / wall:,.0f} "
                      f"| {fmt(cpu)} | {fmt(per_cpu, ',.0f')} | {fmt(s['ratio_1'])} | {fmt(s['ratio_2'])} |")
        md.append("")

    # 4. cold start
    cold = [k for k in runs.order if k[0] == "coldstart"]
    if cold:
        md += ["### Cold start: each organisation writes one row (8 clients)", "",
               "| pass | organisations | wall s | orgs/s | p99 ms | KEK generate / org | KEK unwrap / org | DEK cache misses / org | key-store statements / org |",
               "|---|---|---|---|---|---|---|---|---|"]
        for k in cold:
            r = runs.by[k][0]
            e = extra(r)
            n = e["orgs"]
            wall = num(r["wall_s"])
            s = dict(scenario="coldstart", target=k[1], mode=k[2], clients=k[3], tps=num(r["tps"]),
                     mean_ms=num(r["mean_ms"]), p99_ms=num(r["p99_ms"]),
                     cpu_ms_per_1k=cpu_per_1k([r]), ratio_1=None, ratio_1_base="", ratio_2=None,
                     ratio_2_base="", cpu_ratio=None, value=e["kek_unwrap"] / n,
                     unit=f"KEK unwraps per org; generate/org={e['kek_generate'] / n:.3f}; "
                          f"keystore stmts/org={e['keystore_statements'] / n:.3f}; wall_s={wall}",
                     rounds=1)
            summary.append(s)
            md.append(f"| {k[1]} | {int(n):,} | {wall:.2f} | {n / wall:,.0f} | {fmt(s['p99_ms'], '.2f')} "
                      f"| {e['kek_generate'] / n:.3f} | {e['kek_unwrap'] / n:.3f} | {e['dek_cache_misses'] / n:.3f} "
                      f"| {e['keystore_statements'] / n:.2f} |")
        md.append("")

    # 5. memory
    mem = [k for k in runs.order if k[0] == "memory"]
    if mem:
        md += ["### Memory: idle client connections", "",
               "| target | connections | RSS idle MiB | RSS with connections MiB | KiB per connection | RSS after closing MiB |",
               "|---|---|---|---|---|---|"]
        for k in mem:
            r = runs.by[k][0]
            e = extra(r)
            n = int(r["clients"])
            per = (e["rss_n_kib"] - e["rss0_kib"]) / n
            s = dict(scenario="memory", target=k[1], mode="", clients=n, tps=None, mean_ms=None,
                     p99_ms=None, cpu_ms_per_1k=None, ratio_1=None, ratio_1_base="", ratio_2=None,
                     ratio_2_base="", cpu_ratio=None, value=per, unit="KiB RSS per idle connection",
                     rounds=1)
            summary.append(s)
            md.append(f"| {k[1]} | {n:,} | {e['rss0_kib'] / 1024:.1f} | {e['rss_n_kib'] / 1024:.1f} | {per:.1f} "
                      f"| {e['rss_closed_kib'] / 1024:.1f} |")
        md.append("")

    cols = ["scenario", "target", "mode", "clients", "tps", "mean_ms", "p99_ms", "cpu_ms_per_1k",
            "ratio_1", "ratio_1_base", "ratio_2", "ratio_2_base", "cpu_ratio", "value", "unit", "rounds"]
    with open(folder / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scenario", "target", "mode", "clients", "tps", "mean_ms", "p99_ms",
                    "proxy_cpu_ms_per_1k_stmts", "ratio_1", "ratio_1_vs", "ratio_2", "ratio_2_vs",
                    "cpu_ratio_vs_pgbouncer", "value", "value_unit", "rounds"])
        for s in summary:
            w.writerow([fmt(s.get(c), ".4g") if isinstance(s.get(c), float) else s.get(c, "") for c in cols])
    head = [f"Machine: {machine.get('nproc', '?')} CPUs ({machine.get('cpu', '?')}), "
            f"{machine.get('ram_gib', '?')} GiB RAM; {machine.get('postgres', '')}; {machine.get('pgbouncer', '')}; "
            f"load average before/after: {machine.get('load_before', '?')} / {machine.get('load_after', '?')}",
            f"Command: `{machine.get('command', 'benches/run.sh')}` at {machine.get('commit', '?')}", ""]
    (folder / "summary.md").write_text("\n".join(head + md) + "\n")
    print("\n".join(head + md))

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not available: no chart", file=sys.stderr)
        return
    chart(folder, summary, machine, plt)


def chart(folder, summary, machine, plt):
    colors = {"direct": "#9e9e9e", "pgbouncer": "#4c72b0", "pgenvelope": "#dd8452",
              "pgenvelope-plain": "#dd8452", "pgenvelope-encrypted": "#c44e52",
              "pgenvelope-bound": "#8172b3",
              "pgenvelope-rules": "#55a868"}
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))

    def grouped(ax, groups, targets, get, title, ylabel):
        width = 0.8 / len(targets)
        for i, t in enumerate(targets):
            vals = [get(g, t) for g in groups]
            xs = [j + i * width for j in range(len(groups))]
            ax.bar(xs, [v or 0 for v in vals], width, label=t, color=colors.get(t))
        ax.set_xticks([j + width * (len(targets) - 1) / 2 for j in range(len(groups))])
        ax.set_xticklabels([str(g) for g in groups])
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)

    def pick(scenario, target, mode=None, clients=None):
        for s in summary:
            if s["scenario"] == scenario and s["target"] == target and \
                    (mode is None or s["mode"] == mode) and (clients is None or str(s["clients"]) == str(clients)):
                return s
        return None

    pt = [s for s in summary if s["scenario"] == "passthrough"]
    groups = sorted({(s["mode"], int(s["clients"])) for s in pt})
    labels = [f"{m[:4]}\n{c} cl" for m, c in groups]
    if pt:
        grouped(axes[0][0], labels, ["direct", "pgbouncer", "pgenvelope"],
                lambda g, t: (pick("passthrough", t, *groups[labels.index(g)]) or {}).get("tps"),
                "Pass-through pgbench -S: TPS", "transactions/s")
        grouped(axes[0][1], labels, ["pgbouncer", "pgenvelope"],
                lambda g, t: (pick("passthrough", t, *groups[labels.index(g)]) or {}).get("cpu_ms_per_1k"),
                "Pass-through: proxy CPU per 1,000 statements", "CPU ms")
    enc = [s for s in summary if s["scenario"].startswith("encrypted-")]
    if enc:
        eg = sorted({(s["scenario"].split("-", 1)[1], int(s["clients"])) for s in enc})
        el = [f"{w}\n{c} cl" for w, c in eg]
        grouped(axes[0][2], el, ["direct", "pgenvelope-plain", "pgenvelope-encrypted", "pgenvelope-bound"],
                lambda g, t: (pick("encrypted-" + eg[el.index(g)][0], t, None, eg[el.index(g)][1]) or {}).get("tps"),
                "Encrypted columns (64 B + 1 KiB), prepared: TPS", "transactions/s")
    bulk = [s for s in summary if s["scenario"].startswith("bulk")]
    if bulk:
        sizes = sorted({int(s["scenario"].split("-")[1]) for s in bulk})
        sl = [f"{v} B values" for v in sizes]

        def mbps(g, t):
            s = pick(f"bulk-{sizes[sl.index(g)]}", t)
            if not s or not s["mean_ms"]:
                return None
            e = s["mean_ms"] / 1000
            return s["_mb"] / e if s.get("_mb") else None
        grouped(axes[1][0], sl, ["direct", "pgenvelope-plain", "pgenvelope-encrypted"], mbps,
                "Bulk read, all rows in one SELECT: plaintext MB/s (wall)", "MB/s")
        for i, v in enumerate(sizes):
            s = pick(f"bulk-{v}", "pgenvelope-encrypted")
            if s and s["value"]:
                axes[1][0].text(i + 0.53, 0, f"{s['value']:,.0f} MB/s\nper proxy\nCPU second",
                                ha="center", va="bottom", fontsize=7, color="white")
    mem = [s for s in summary if s["scenario"] == "memory"]
    if mem:
        ax = axes[1][1]
        names = [s["target"] for s in mem]
        ax.bar(names, [s["value"] for s in mem], color=[colors.get(n) for n in names])
        ax.axhline(64, color="black", linestyle="--", linewidth=1, label="target 64 KiB")
        ax.set_title(f"RSS per idle client connection ({mem[0]['clients']} connections)", fontsize=10)
        ax.set_ylabel("KiB")
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    cold = [s for s in summary if s["scenario"] == "coldstart"]
    ax = axes[1][2]
    if cold:
        names = [s["target"] for s in cold]
        walls = [float(s["unit"].rsplit("wall_s=", 1)[1]) for s in cold]
        ax.bar(names, walls, color=["#c44e52", "#dd8452", "#55a868"][: len(names)])
        for i, s in enumerate(cold):
            gen = s["unit"].split("generate/org=")[1].split(";")[0]
            ax.text(i, walls[i], f"unwrap/org {s['value']:.2f}\ngenerate/org {gen}", ha="center", va="bottom", fontsize=8)
        ax.set_title("Cold start: every organisation writes once", fontsize=10)
        ax.set_ylabel("seconds")
    else:
        ax.axis("off")
    fig.suptitle(f"pgenvelope benchmarks — {machine.get('nproc', '?')} × {machine.get('cpu', '?')}, "
                 f"{machine.get('date', '')}", fontsize=11)
    fig.tight_layout()
    fig.savefig(folder / "chart.png", dpi=90)


if __name__ == "__main__":
    main()
