"""The nightly refresh at scale: does a night cost what changed, or the whole corpus? (issue 28)

    python bench/nightly.py [--videos 100000] [--small 10000] [--nights 10] [--work bench/out/nightly]
    python bench/nightly.py --videos 2000 --small 500 --nights 3          # a quick run

Corpus: copies (each its own inode) of ~20 real demo videos (mvrec.devtools.demo_data, 1-2 s clips
of 5-80 KB), 1,000 per folder; a copy holds its template's bytes plus a short unique trailer, so
every file has its own content hash, as in a real corpus. mtimes are set 5 s in the past: the
change check trusts no file modified within 2 s of hashing. Model: the accelerator stand-in at 0 s per video (--model, 4 layer rows x 16),
so model time is zero; caption vectors come from the configured text model (real work).

Night 1 (the seed) writes the store with the code a refresh runs: a real `mvrec refresh` over the
templates gives every row (videos, extractor, captions with vectors, hidden states of every layer);
the corpus is hashed by flows.plan.check_changes (which records the file index with each file's
stat signature) and each file gets its template's rows under its own video_id, uri, size and hash,
written by FeatureStore.write_batch. Then real `mvrec refresh` processes: an unchanged night at
--small and at --videos, a night with --new x videos new at --small (same count as at --videos),
--nights nights each adding --new and changing --changed of the corpus (another template's bytes
written over a file), and a last unchanged night.

Each night runs `python bench/nightly.py --child OUT -- refresh SRC`: the CLI's own main() in a
process of its own, with timers on the functions whose time a phase is (pending_work, start_api,
the data plane's hand-over, write_batch, embed-captions, embed_texts, maintain); they only observe.
Control plane = wall - the time the flow waited on the data plane - the text model's time.
After each night: each table's version, files, size on disk and what its commits wrote and
replaced (its Delta log), and the fixed query. `--again` runs one unchanged night on each store
left in --work; `--strace` attributes a night's reads to video files, store tables and the rest.
Bytes read are the child's /proc/self/io at exit, which includes its reaped children (the Prefect
API); they count every file read (Python modules, the store, videos). Peak RSS: the process tree
polled every 0.1 s. Works against older code (PYTHONPATH=<worktree>): the phases it lacks are None.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve()
QUERY = "SELECT count(*), avg(list_extract(embedding, 1)) FROM hidden_states WHERE layer = 2"
PER_FOLDER = 1000


# ---------------------------------------------------------------------------------------------
# The child: one `mvrec refresh`, observed


def child(out: str, argv: list[str]) -> None:
    events: dict = {"t0": time.time(), "write_batch_s": 0.0, "commits": 0, "plane_wait_s": 0.0, "embed_texts_s": 0.0}

    def timed(record, fn):
        def wrapper(*a, **k):
            start = time.time()
            try:
                return fn(*a, **k)
            finally:
                record(start, time.time())
        wrapper.__wrapped__ = fn
        wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        return wrapper

    def span(name):
        return lambda s, e: events.setdefault(name, []).append([s, e])

    def add(name):
        def record(s, e):
            events[name] += e - s
        return record

    import flows.plan
    import flows.runtime
    import storage.maintenance
    from storage import FeatureStore

    pending = flows.plan.pending_work

    def pending_work(*a, **k):
        start = time.time()
        summary = pending(*a, **k)
        events.setdefault("pending_work", []).append({"start": start, "end": time.time(), "summary": summary})
        return summary
    flows.plan.pending_work = pending_work
    storage.maintenance.maintain = timed(span("maintain"), storage.maintenance.maintain)
    FeatureStore.write_batch = timed(lambda s, e: (add("write_batch_s")(s, e), events.update(commits=events["commits"] + 1)),
                                     FeatureStore.write_batch)
    start_api = flows.runtime.start_api

    def start_api_observed():
        t = time.time()
        proc = start_api()
        events["start_api"] = [t, time.time()]
        import flows.refresh  # now that Prefect may be imported: observe its tasks
        import tasks.dataplane
        import tasks.text_embed

        flows.refresh.embed_captions.fn = timed(span("embed_captions"), flows.refresh.embed_captions.fn)
        tasks.text_embed.embed_texts = timed(add("embed_texts_s"), tasks.text_embed.embed_texts)
        inner = tasks.dataplane.in_background

        def in_background(*a, **k):  # time the flow waits for the data plane (decode + model)
            it = inner(*a, **k)
            while True:
                t = time.time()
                try:
                    item = next(it)
                except StopIteration:
                    add("plane_wait_s")(t, time.time())
                    return
                add("plane_wait_s")(t, time.time())
                yield item
        import flows.extract
        flows.extract.in_background = in_background
        return proc
    flows.runtime.start_api = start_api_observed
    import flows.report
    markdown = flows.report.refresh_markdown

    def refresh_markdown(result):
        events["result"] = result
        return markdown(result)
    flows.report.refresh_markdown = refresh_markdown

    def dump():
        io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        events.update(t_exit=time.time(), rchar=int(io["rchar"]), read_bytes=int(io["read_bytes"]),
                      maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      children_maxrss_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
        Path(out).write_text(json.dumps(events, default=str))
    atexit.register(dump)  # registered first: runs after the CLI's own exit handlers (the API's stop)
    from mvrec.cli import main
    main(argv)


# ---------------------------------------------------------------------------------------------
# The corpus


def templates(work: Path) -> list[Path]:
    folder = work / "demo" / "videos"
    if not folder.is_dir():
        from mvrec.devtools.demo_data import make_demo_corpus
        make_demo_corpus(work / "demo", videos=20, users=50, seed=0, workers=1, min_duration_s=1.0, max_duration_s=2.0)
    return sorted(folder.iterdir())


def settle(paths: list[Path]) -> None:
    past = time.time_ns() - 5_000_000_000  # older than the change check's 2 s racily-clean window
    for p in paths:
        os.utime(p, ns=(past, past))


def add_videos(root: Path, start: int, count: int, tpl: list[Path]) -> list[Path]:
    made = []
    for i in range(start, start + count):
        src = tpl[i % len(tpl)]
        dst = root / f"{i // PER_FOLDER:04d}" / f"{i:07d}{src.suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        unique_copy(src, dst, f"new {i}")
        made.append(dst)
    settle(made)
    return made


def unique_copy(src: Path, dst: Path, tag: str) -> None:
    """The template's bytes plus a short trailer after the container's last atom (decoders skip it,
    tasks/decode.py reads all frames): every file its own content hash, as in a real corpus. Copies
    sharing one hash would make each commit's key predicate match changed videos' old rows."""
    with dst.open("wb") as fh:
        fh.write(src.read_bytes() + f"\nmvrec-bench {tag}\n".encode())


def change_videos(files: list[Path], count: int, tpl: list[Path], rng: random.Random) -> list[Path]:
    """Write another template's bytes over `count` files (same inode, new size and mtime)."""
    changed = rng.sample(files, count)
    for f in changed:
        now = f.read_bytes()
        other = next(t for t in rng.sample(tpl, len(tpl)) if not now.startswith(t.read_bytes()))
        with f.open("wb") as fh:  # the same inode, as an editor's in-place save
            fh.write(other.read_bytes() + f"\nmvrec-bench changed {rng.random()}\n".encode())
    settle(changed)
    return changed


# ---------------------------------------------------------------------------------------------
# Nights


def tree_rss_mb(root: int) -> float:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
        todo += kids.get(pid, [])
    return total / 2**20


def reads_by_file(trace: Path, source: Path, store: Path) -> dict:
    """Bytes that strace saw read, by what was read: video files, each store table, the rest."""
    out: dict[str, int] = {}
    for line in trace.read_text(errors="replace").splitlines():
        m = re.match(r"^\d+\s+\w+\(\d+<([^>]*)>.*\)\s+=\s+(\d+)$", line)
        if m:
            path = m.group(1)
            what = ("video files" if path.startswith(str(source)) else
                    "store " + path[len(str(store)):].split("/")[1] if path.startswith(str(store)) else "Python, libraries, other")
            out[what] = out.get(what, 0) + int(m.group(2))
    return out


def refresh(work: Path, source: Path, store: Path, env: dict, label: str, strace: bool = False) -> dict:
    out, trace = work / "night.json", work / "strace.txt"
    out.unlink(missing_ok=True)
    t = time.time()
    wrap = ["strace", "-f", "-qq", "-y", "-e", "trace=read,pread64,readv,preadv,preadv2", "-o", str(trace)] if strace else []
    proc = subprocess.Popen(wrap + [sys.executable, str(HERE), "--child", str(out), "--", "refresh", str(source)],
                            env={**env, "MVREC_STORE__PATH": str(store)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak, done = [0.0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))
            done.wait(0.1)
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    text = proc.communicate()[0]
    wall = time.time() - t
    done.set()
    poller.join()
    if proc.returncode:
        raise SystemExit(f"{label}: mvrec refresh exited {proc.returncode}:\n{text[-3000:]}")
    ev = json.loads(out.read_text())
    night = phases(ev, wall, t, peak[0], text, label)
    if strace:
        night["reads_by_file"] = reads_by_file(trace, source, store)
    return night


def phases(ev: dict, wall: float, launched: float, peak_mb: float, text: str, label: str) -> dict:
    def length(name):
        return sum(e - s for s, e in ev[name]) if name in ev else 0.0
    pw = ev.get("pending_work") or [{}]
    summary = pw[0].get("summary") or {}
    secs = summary.get("seconds") or {}
    result = ev.get("result") or {}
    extract = result.get("extract") or {}
    p = {"startup": (pw[0].get("start", ev["t0"]) - launched),
         "discover": secs.get("discover"), "check": secs.get("check"), "plan": secs.get("plan"),
         "pending_work": sum(x["end"] - x["start"] for x in pw if "end" in x),
         "prefect_api": (ev["start_api"][1] - ev["start_api"][0]) if "start_api" in ev else 0.0,
         "data_plane_wait": ev["plane_wait_s"], "commits": ev["write_batch_s"],
         "extract_flow": extract.get("seconds", 0.0),
         "captions": length("embed_captions"), "text_model": ev["embed_texts_s"], "maintenance": length("maintain")}
    p["extract_other"] = max(p["extract_flow"] - p["data_plane_wait"] - p["commits"], 0.0)
    known = (p["startup"] + p["pending_work"] + p["prefect_api"] + p["extract_flow"] + p["captions"] + p["maintenance"])
    p["other"] = wall - known  # Prefect's flow and task engine, the nightly flow's own steps, exit
    p["control_plane"] = wall - p["data_plane_wait"] - p["text_model"]  # all but decode and models
    line = next((x for x in text.splitlines() if x.startswith("change check:")), "")
    return {"night": label, "wall_s": wall, "phases": p, "prefect_started": "start_api" in ev,
            "new_videos": extract.get("processed", 0), "commits": ev["commits"],
            "captions_embedded": result.get("captions_embedded", 0), "maintenance": result.get("maintenance"),
            "hash_reused": summary.get("hash_reused"), "hash_read": summary.get("hash_read"),
            "video_bytes_read_by_check": summary.get("read_bytes"), "change_check_line": line,
            "rchar": ev["rchar"], "read_bytes": ev["read_bytes"], "peak_tree_rss_mb": peak_mb,
            "maxrss_mb": ev["maxrss_mb"]}


def log_totals(table: Path) -> dict:
    """What the table's commits wrote and removed, from its Delta log: a commit that removes files
    rewrote them (copy-on-write)."""
    tot = {"commits": 0, "rewrites": 0, "added_mb": 0.0, "removed_mb": 0.0, "delta_s": 0.0}
    for f in (table / "_delta_log").glob("*.json"):
        actions = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        removed = sum(a["remove"].get("size") or 0 for a in actions if "remove" in a)
        info = next((a["commitInfo"] for a in actions if "commitInfo" in a), {})
        tot["commits"] += 1
        tot["rewrites"] += bool(removed) and info.get("operation") == "WRITE"
        tot["added_mb"] += sum(a["add"]["size"] for a in actions if "add" in a) / 2**20
        tot["removed_mb"] += removed / 2**20
        tot["delta_s"] += ((info.get("operationMetrics") or {}).get("execution_time_ms") or 0) / 1000
    return tot


def store_facts(store: Path) -> dict:
    from storage import FeatureStore, connect
    from storage.maintenance import table_health

    fs = FeatureStore(store, create=False)
    tables = {}
    for name in ("videos", "captions", "hidden_states", "file_index"):
        try:
            h = table_health(fs, name)
        except Exception:  # noqa: BLE001 - a table older code does not have
            continue
        disk = sum(f.stat().st_size for f in (store / name).rglob("*") if f.is_file())  # live and not yet vacuumed
        tables[name] = {"version": h["version"], "files": h["files"], "disk_mb": disk / 2**20, "log": log_totals(store / name)}
    con = connect(fs)
    best = []
    for _ in range(3):
        t = time.perf_counter()
        con.sql(QUERY).fetchall()
        best.append(time.perf_counter() - t)
    rows = con.sql("SELECT count(*), count(DISTINCT video_id) FROM videos").fetchall()[0]
    return {"tables": tables, "query_s": min(best), "videos_rows": rows[0], "videos_distinct": rows[1]}


def seed(store: Path, source: Path, template_store: Path) -> float:
    """Night 1: every file's template rows under its own id, written as a refresh writes them."""
    import numpy as np
    import pyarrow as pa
    from storage import ALL_TABLES, ExtractionBatch, FeatureStore
    from tasks.discover import discover_videos, hash_videos

    t = time.perf_counter()
    tpl, fs = FeatureStore(template_store, create=False), FeatureStore(store)
    refs = discover_videos(str(source))
    try:
        from flows.plan import check_changes  # records the file index, as a refresh's change check does
        hashed = check_changes(fs, refs).hashed
    except ImportError:  # code from before the file index
        hashed = hash_videos(refs)[0]
    fs.upsert(ALL_TABLES["extractors"], tpl.read("extractors"))
    videos = tpl.read("videos").drop_columns(["first_seen", "last_seen"])
    caps, hs = tpl.read("captions"), tpl.read("hidden_states")
    shas = videos.column("content_sha256").to_pylist()
    # Each file is template (its number mod the templates) plus a trailer: that template's rows,
    # under the file's own id, uri, size and content hash.
    by_uri = dict(zip(videos.column("uri").to_pylist(), shas, strict=True))
    tpl_files = templates(Path(template_store).parent)
    tpl_sha = [by_uri[str(p.resolve())] for p in tpl_files]
    template_of = {r.uri: tpl_sha[int(Path(r.uri).stem) % len(tpl_files)] for r in hashed}
    cap_row = {s: i for i, s in enumerate(caps.column("content_sha256").to_pylist())}
    hs_rows: dict[str, list[int]] = {}
    for i, s in enumerate(hs.column("content_sha256").to_pylist()):
        hs_rows.setdefault(s, []).append(i)

    def own(table, idx, part):
        n = len(idx) // len(part)
        out = table.take(pa.array(idx, pa.int64()))
        ids = np.repeat(np.array([r.video_id for r in part], dtype=object), n)
        out = out.set_column(out.schema.get_field_index("video_id"), "video_id", pa.array(ids, pa.string()))
        out = out.set_column(out.schema.get_field_index("content_sha256"), "content_sha256",
                             pa.array(np.repeat(np.array([r.content_sha256 for r in part], dtype=object), n), pa.string()))
        if "uri" in out.column_names:
            out = out.set_column(out.schema.get_field_index("uri"), "uri", pa.array([r.uri for r in part], pa.string()))
            out = out.set_column(out.schema.get_field_index("bytes"), "bytes", pa.array([r.bytes for r in part], pa.int64()))
        return out

    for start in range(0, len(hashed), 8192):
        part = hashed[start:start + 8192]
        fs.write_batch(ExtractionBatch(
            videos=own(videos, [shas.index(template_of[r.uri]) for r in part], part),
            captions=own(caps, [cap_row[template_of[r.uri]] for r in part], part),
            hidden_states=own(hs, [i for r in part for i in hs_rows[template_of[r.uri]]], part)))
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------
# The run


def show(n: dict, facts: dict, prev: dict | None) -> None:
    p = {k: v for k, v in n["phases"].items() if v is not None}
    print(f"\n{n['night']}: {n['wall_s']:.1f} s wall, {n['new_videos']} extracted, Prefect "
          f"{'started' if n['prefect_started'] else 'not started'}, load {os.getloadavg()[0]:.1f}")
    print("  phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in p.items()))
    print(f"  change check: {n['hash_reused']} reused, {n['hash_read']} read, {n['video_bytes_read_by_check']} video bytes"
          f" | tree read {n['rchar'] / 1e6:.1f} MB (rchar), {n['read_bytes'] / 1e6:.1f} MB from disk"
          f" | peak tree RSS {n['peak_tree_rss_mb']:.0f} MB | {n['commits']} write_batch calls")
    print("  store: " + ", ".join(f"{k} v{v['version']}/{v['files']} files/{v.get('disk_mb', 0):.0f} MB"
                                  for k, v in facts["tables"].items())
          + f" | query {facts['query_s'] * 1000:.0f} ms | {facts['videos_rows']} video rows, "
          f"{facts['videos_distinct']} distinct")
    for name, t in facts["tables"].items():
        was = (prev or {}).get("tables", {}).get(name, {}).get("log", {})
        d = {k: t["log"][k] - was.get(k, 0) for k in t["log"]}
        if d["commits"]:
            print(f"  {name} commits: {d['commits']}, {d['rewrites']} rewriting files: +{d['added_mb']:.0f} MB "
                  f"written, {d['removed_mb']:.0f} MB of files replaced, {d['delta_s']:.1f} s in delta-rs")
    if "reads_by_file" in n:
        print("  read (strace): " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(n["reads_by_file"].items())))


def project(results: dict, small: int, large: int) -> None:
    for label, n in results.items():
        videos = n["store"]["videos_rows"]
        print(f"per video, {label}: {n['wall_s'] / videos * 1e6:.0f} us wall per corpus video"
              + (f", {n['phases']['control_plane'] / n['new_videos'] * 1e3:.1f} ms control plane per extracted video"
                 if n["new_videos"] else ""))
    print("\nPROJECTIONS (linear in the corpus size, from the two measured sizes; not measurements):")
    for what, a, b in (("unchanged night wall s", "unchanged@small", "unchanged@large"),
                       ("1,000-new night control plane s", "new@small", "night 2")):
        if a in results and b in results and large > small:
            ya = results[a]["wall_s"] if "wall" in what else results[a]["phases"]["control_plane"]
            yb = results[b]["wall_s"] if "wall" in what else results[b]["phases"]["control_plane"]
            slope = (yb - ya) / (large - small)
            print(f"  {what}: {slope * 1e6:.2f} us per corpus video; 1M -> {yb + slope * (1e6 - large):.1f} s, "
                  f"10M -> {yb + slope * (1e7 - large):.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=100_000)
    ap.add_argument("--small", type=int, default=10_000, help="the smaller corpus (0: none)")
    ap.add_argument("--nights", type=int, default=10, help="nights with new and changed videos (0: unchanged only)")
    ap.add_argument("--new", type=float, default=0.01, help="new videos a night, share of --videos")
    ap.add_argument("--changed", type=float, default=0.001, help="changed videos a night, share of the corpus")
    ap.add_argument("--model", default="standin:0:4x16")
    ap.add_argument("--work", default=str(HERE.parent / "out" / "nightly"))
    ap.add_argument("--json", default="", help="write every night's figures here")
    ap.add_argument("--again", action="store_true", help="only an unchanged night on each store left in --work")
    ap.add_argument("--strace", action="store_true", help="attribute each night's reads to files (slows it)")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rng, tpl = random.Random(0), templates(work)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "MVREC_EXTRACT__BACKEND": "standin", "MVREC_EXTRACT__MODEL": args.model,
           "MVREC_PREFECT__HOME": str(work / "prefect"), "PREFECT_HOME": str(work / "prefect"),
           "PYTHONPATH": os.environ.get("PYTHONPATH") or str(HERE.parent.parent)}
    print(f"code: {env['PYTHONPATH']}; model {args.model} (stand-in, 0 s); threads OMP_NUM_THREADS="
          f"{env['OMP_NUM_THREADS']}; cores {os.cpu_count()}; load {open('/proc/loadavg').read().split()[:3]}")
    for d in () if args.again else ("store-small", "store-large", "corpus-small", "corpus-large"):
        shutil.rmtree(work / d, ignore_errors=True)
    if not (work / "store-template").is_dir():  # the rows every copy gets: one real refresh of the templates
        refresh(work, tpl[0].parent, work / "store-template", env, "template")
    results: dict = {}
    new_count = max(1, round(args.new * args.videos))

    last: dict = {}

    def night(source, store, label):
        n = refresh(work, source, store, env, label, strace=args.strace)
        facts = store_facts(store)
        n["store"], n["load"] = facts, os.getloadavg()
        results[label] = n
        show(n, facts, last.get(store))
        last[store] = facts

    def grow(root, files, label):
        files += add_videos(root, len(files), new_count, tpl)
        change_videos(files[:-new_count], max(1, round(args.changed * len(files))), tpl, rng)
        time.sleep(2.5)  # the changed files' mtimes are in the past; wait out the racy window anyway
        night(root, store, label)

    for size, name in ((args.small, "small"), (args.videos, "large")):
        root, store = work / f"corpus-{name}", work / f"store-{name}"
        if args.again and store.is_dir():
            night(root, store, f"again: unchanged@{name}")
        if args.again or not size:
            continue
        files = add_videos(root, 0, size, tpl)
        corpus_bytes = sum(f.stat().st_size for f in files)
        print(f"\n{name}: {size} videos, {corpus_bytes / 1e6:.1f} MB; seeding (night 1) ...")
        seconds = seed(store, root, work / "store-template")
        print(f"  seeded in {seconds:.1f} s")
        night(root, store, f"unchanged@{name}")
        results[f"unchanged@{name}"]["corpus_bytes"] = corpus_bytes
        if args.nights and name == "small":
            grow(root, files, "new@small")
        for i in range(args.nights if name == "large" else 0):
            grow(root, files, f"night {i + 2}")
        if args.nights and name == "large":
            night(root, store, "unchanged@large, last")
    project(results, args.small, args.videos)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[4:])
    else:
        main()
