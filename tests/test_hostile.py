"""The loader against a corpus of hostile GGUF files (tests/hostile.py).

Every file is opened with `dsv4_ggml.Model` in a child process (batches of cases per child), so
that a crash (a signal, an abort in ggml) or a hang is reported as a failure of that case
instead of killing pytest. Each child runs under memory limits (RLIMIT_DATA for what it
allocates, RLIMIT_AS for its address space; a mapped model file counts only against the
latter), so an unbounded allocation fails inside the child rather than exhausting the machine,
and each case has a time limit. Every malformed file must raise the expected `Dsv4Error` subclass
with a non-empty message; valid variants (and files whose outcome is unspecified, if they open)
must open and evaluate tokens.

Environment:
  DSV4_HOSTILE_TIMEOUT   seconds per file (default 20)
  DSV4_HOSTILE_MEM_MB    RLIMIT_DATA of a child in MiB (default 4096; 0: none)
  DSV4_HOSTILE_AS_MB     RLIMIT_AS of a child in MiB (default 65536; 0: none). Set both to 0
                         under ASan, whose shadow memory needs terabytes of address space.
  DSV4_HOSTILE_WORKERS   children run in parallel (default: CPU count, at most 4)
  DSV4_HOSTILE_FILTER    a regex: run only the cases whose name matches
  DSV4_HOSTILE_MUTANTS   random header mutants in the corpus (default 300)
  DSV4_FUZZ_SECONDS      how long test_fuzz_loader_bounded fuzzes (default 20; 0 skips it)

Run by hand: `python tests/test_hostile.py [REGEX]` prints a summary and every failure.
"""
from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import hostile  # noqa: E402

TIMEOUT = float(os.environ.get("DSV4_HOSTILE_TIMEOUT", "20"))
MEM_LIMIT_MB = int(os.environ.get("DSV4_HOSTILE_MEM_MB", "4096"))
AS_LIMIT_MB = int(os.environ.get("DSV4_HOSTILE_AS_MB", "65536"))
WORKERS = int(os.environ.get("DSV4_HOSTILE_WORKERS", str(min(4, os.cpu_count() or 1))))
BATCH = 250
EVAL_TOKENS = [0, 5, 9, 200, 17, 3, 3, 120, 250, 2]   # crosses the first ratio-4 emissions


# --- the child: opens cases first..last-1, one JSON line per event on stdout ---------------------

def _limit_memory() -> None:
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for which, mb in ((resource.RLIMIT_DATA, MEM_LIMIT_MB), (resource.RLIMIT_AS, AS_LIMIT_MB)):
        if mb > 0:
            resource.setrlimit(which, (mb * 2**20, mb * 2**20))


def _run_case(case, path: Path) -> dict:
    import dsv4_ggml
    from dsv4_ggml import errors

    hostile.write_file(case.data, path)
    try:
        m = dsv4_ggml.Model(path, n_ctx=hostile.N_CTX, n_threads=1)
    except errors.Dsv4Error as e:
        return {"outcome": "raised", "exc": type(e).__name__, "msg": str(e)}
    except BaseException as e:  # noqa: BLE001 - any other exception is a bug
        return {"outcome": "wrong-exception", "exc": type(e).__name__, "msg": repr(e)}
    try:   # whatever opens is evaluated: a crash there counts too
        n = m.n_vocab
        m.eval([t % n for t in EVAL_TOKENS], logits="last")
        m.eval([1 % n], logits="all")    # one decode step
        return {"outcome": "loaded"}
    except errors.Dsv4Error as e:
        return {"outcome": "loaded-eval-raised", "exc": type(e).__name__, "msg": str(e)}
    except BaseException as e:  # noqa: BLE001
        return {"outcome": "wrong-exception", "exc": type(e).__name__, "msg": "in eval: " + repr(e)}
    finally:
        m.close()
        path.unlink(missing_ok=True)


def child_main(indices: list[int]) -> None:
    # the protocol goes to the original stdout; anything the library prints goes to stderr
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _limit_memory()
    cases = hostile.case_list()
    tmp = Path(tempfile.mkdtemp(prefix="dsv4-hostile-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
    try:
        for i in indices:
            print(json.dumps({"start": i}), file=proto, flush=True)
            res = _run_case(cases[i], tmp / f"case{i}.gguf")
            res["i"] = i
            print(json.dumps(res), file=proto, flush=True)
    finally:
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()


# --- the parent: runs batches in children, restarting after a crash or a hang --------------------

def _child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("GGML_NO_BACKTRACE", "1")   # ggml's abort handler would run gdb on the child
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_indices(indices: list[int], timeout: float = TIMEOUT, child_args: list[str] | None = None) -> dict[int, dict]:
    """Runs the cases `indices` in children, BATCH at a time, and returns i -> result. A case whose
    child dies gets outcome "crash" (with the signal and stderr's tail); one that does not finish in
    `timeout` seconds gets "hang"; a new child goes on with the cases after it."""
    results: dict[int, dict] = {}
    todo = list(indices)
    while todo:
        batch = todo[:BATCH]
        args = child_args or [sys.executable, str(Path(__file__).resolve()), "--child", ",".join(map(str, batch))]
        current, dead = None, None
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, env=_child_env(), cwd=REPO,
                                    start_new_session=True)
            fd = proc.stdout.fileno()
            buf, deadline = b"", time.monotonic() + timeout + 60   # + the child's start-up
            while dead is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    dead = "hang"
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                if not select.select([fd], [], [], left)[0]:
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    dead = "exit"
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.startswith(b"{"):
                        continue
                    msg = json.loads(line)
                    if "start" in msg:
                        current = msg["start"]
                    else:
                        results[msg["i"]] = msg
                        current = None
                    deadline = time.monotonic() + timeout
            rc = proc.wait()
            proc.stdout.close()
            err.seek(0)
            tail = err.read()[-4000:].decode("utf-8", "replace")
        status = f"exit status {rc}" + (f" ({signal.Signals(-rc).name})" if rc < 0 else "")
        if current is not None:
            results[current] = {"i": current, "outcome": "hang" if dead == "hang" else "crash", "exc": status,
                                "msg": tail}
        elif not any(i in results for i in batch):
            # the child died before its first case (a broken environment): fail the whole batch
            for i in batch:
                results[i] = {"i": i, "outcome": "crash", "exc": status + " (before the first case)", "msg": tail}
        elif any(i not in results for i in batch):
            # died between cases: charge the next unreported case
            nxt = next(i for i in batch if i not in results)
            results[nxt] = {"i": nxt, "outcome": "crash", "exc": status + " (between cases)", "msg": tail}
        todo = [i for i in todo if i not in results]
    return results


def check(case, res: dict) -> str | None:
    """None when the result is what the case expects, else why not."""
    from dsv4_ggml import errors

    out = res["outcome"]
    exp = case.expected
    if out in ("crash", "hang", "wrong-exception"):
        return f"{out}: {res.get('exc')}: {res.get('msg', '')[-1500:]}"
    if exp is hostile.LOADS:
        return None if out == "loaded" else f"expected to load and evaluate, got {res.get('exc')}: {res.get('msg')}"
    if exp is hostile.MAY_LOAD:
        return None
    if out != "raised":
        return f"expected {getattr(exp, '__name__', 'a Dsv4Error')}, but the file {out}"
    cls = getattr(errors, res["exc"], None)
    if cls is None or not issubclass(cls, errors.Dsv4Error):
        return f"raised {res['exc']}, not a Dsv4Error"
    if not res.get("msg", "").strip():
        return f"{res['exc']} with an empty message"
    if exp is not None and not issubclass(cls, exp):
        return f"expected {exp.__name__}, got {res['exc']}: {res['msg']}"
    return None


def run_corpus(pattern: str | None = None, workers: int = WORKERS,
               timeout: float = TIMEOUT) -> tuple[list, dict[int, dict], list[str]]:
    """Runs the cases whose name matches `pattern`."""
    cases = hostile.case_list()
    idx = [i for i, c in enumerate(cases) if pattern is None or re.search(pattern, c.name)]
    chunks = [idx[k:k + BATCH] for k in range(0, len(idx), BATCH)]
    results: dict[int, dict] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        for r in ex.map(lambda c: run_indices(c, timeout), chunks):
            results.update(r)
    failures = []
    for i in idx:
        why = check(cases[i], results[i])
        if why is not None:
            failures.append(f"{cases[i].name}: {why}")
    return [cases[i] for i in idx], results, failures


def summary(cases, results: dict[int, dict]) -> str:
    cats: dict[str, dict[str, int]] = {}
    all_cases = hostile.case_list()
    index = {c.name: i for i, c in enumerate(all_cases)}
    for c in cases:
        r = results[index[c.name]]
        d = cats.setdefault(c.category, {})
        key = r["outcome"] if r["outcome"] != "raised" else r["exc"]
        d[key] = d.get(key, 0) + 1
    lines = [f"{len(cases)} files tried"]
    for cat, d in cats.items():
        lines.append(f"  {cat:12s} {sum(d.values()):5d}  " + ", ".join(f"{k} {v}" for k, v in sorted(d.items())))
    return "\n".join(lines)


# --- tests --------------------------------------------------------------------------------------

def test_corpus_is_deterministic_and_named_uniquely():
    a = hostile.case_list()
    names = [c.name for c in a]
    assert len(names) == len(set(names))
    for c in a[::97]:
        assert c.data == c.data, c.name
    assert hostile.base_layout()[0] == hostile.base_bytes()


def test_runner_reports_crashes_and_hangs(tmp_path):
    """The harness itself: a child that aborts or stalls is reported, not fatal."""
    crash = run_indices([0], timeout=5, child_args=[sys.executable, "-c",
                        "import json,os; print(json.dumps({'start': 0}), flush=True); os.abort()"])
    assert crash[0]["outcome"] == "crash" and "SIGABRT" in crash[0]["exc"]
    hang = run_indices([0], timeout=1, child_args=[sys.executable, "-c",
                       "import json,time; print(json.dumps({'start': 0}), flush=True); time.sleep(60)"])
    assert hang[0]["outcome"] == "hang"


def test_hostile_corpus():
    pattern = os.environ.get("DSV4_HOSTILE_FILTER")
    t0 = time.time()
    cases, results, failures = run_corpus(pattern)
    print(summary(cases, results))
    print(f"{len(cases)} malformed or edited files tried in {time.time() - t0:.1f} s")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:60])


def test_fuzz_loader_bounded(tmp_path):
    """tests/fuzz_loader.py for a bounded time (DSV4_FUZZ_SECONDS, default 20; 0 skips)."""
    seconds = int(os.environ.get("DSV4_FUZZ_SECONDS", "20"))
    if seconds <= 0:
        pytest.skip("DSV4_FUZZ_SECONDS=0")
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    art = tmp_path / "artifacts"
    art.mkdir()
    cmd = [sys.executable, str(HERE / "fuzz_loader.py"), f"-max_total_time={seconds}", f"-artifact_prefix={art}/",
           "-print_final_stats=1", str(corpus)]
    proc = subprocess.run(cmd, env=_child_env(), cwd=REPO, capture_output=True, text=True, timeout=seconds + 300)
    tail = (proc.stdout + proc.stderr)[-6000:]
    print(tail)
    crashes = sorted(p.name for p in art.iterdir())
    assert proc.returncode == 0 and not crashes, f"fuzzer found {crashes} (status {proc.returncode}):\n{tail}"
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", tail)
    assert m and int(m.group(1)) > 0, tail


def test_weights_too_big_to_copy_are_read_in_place(tmp_path):
    """With repack, the non-expert weights no layout takes are copied as they are (huge pages),
    but only while they fit in a quarter of the machine's memory: a file whose F32 matrices are
    GiBs each (sparse on disk) must not be copied (regression: a 20 GiB copy of zeros at load).
    The child's address space is capped, so a copy attempt fails fast with the copy's message
    instead of the session state's."""
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("ASan's shadow memory does not fit an address-space cap (the corpus covers the case there)")
    case = next(c for c in hostile.case_list() if c.name == "huge/head-dim-2^30-loads")
    path = tmp_path / "big.gguf"
    hostile.write_file(case.data, path)
    import gguf
    copied = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors
                 if "_exps" not in t.name and t.name != "token_embd.weight")
    if copied <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4:
        pytest.skip(f"this machine's memory would take the {copied / 2**30:.0f} GiB copy")
    code = (
        "import resource, sys, dsv4_ggml\n"
        "resource.setrlimit(resource.RLIMIT_AS, (16 * 2**30, 16 * 2**30))\n"
        "try:\n"
        "    dsv4_ggml.Model(sys.argv[1], n_ctx=256, n_threads=1, repack='auto')\n"
        "except dsv4_ggml.errors.OutOfMemoryError as e:\n"
        "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(path)], env=_child_env(), cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "session state" in r.stdout, r.stdout + r.stderr[-2000:]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main([int(i) for i in sys.argv[2].split(",")])
        sys.exit(0)
    args = sys.argv[1:]
    pattern = args[0] if args else None
    t0 = time.time()
    cases, results, failures = run_corpus(pattern)
    print(summary(cases, results))
    for f in failures:
        print("FAIL", f[:3000])
    print(f"{len(cases)} files, {len(failures)} failures, {time.time() - t0:.1f} s")
    sys.exit(1 if failures else 0)
