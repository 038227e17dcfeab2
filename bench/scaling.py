"""Benchmark how the pseudomask job scales on Ray, and whether the driver's memory grows with the dataset.

Two measurements, both on synthetic scenes (``omnilabel.data.synthetic.make_dataset``) labelled from boxes
(``--weak boxes``, no detector) by a SAM of the official architecture with small random weights
(``omnilabel.models.tiny.build_tiny_sam``):

- throughput: images/s of ``run_pseudomask`` in this process (one torch thread) and on a local Ray with 1 and
  with 2 workers (``ray_executor(JobOptions(num_workers=N), ...)``, what ``executor_for`` builds, with
  ``TimedWorker``, which keeps each worker to one torch thread: ``PseudomaskWorker`` stamping each image with
  its process id and start/end
  time). The steady rate counts the images labelled while every worker was up (from the moment the last
  worker started its first image to the moment the first worker ended its last), so Ray start-up, actor
  start-up, model loading and the uneven tail are left out; the end-to-end rate (all images over the whole
  call) is shown too.
- driver memory: peak resident memory (``VmHWM``) of a fresh Python process that runs one whole job on a
  small and on a large dataset, in-process and on Ray. Only the driver process is measured; Ray's daemons
  and the actors are other processes. (``ru_maxrss`` would not do: Linux carries the parent's peak into a
  child across ``exec``.)

Before each throughput run the script waits (up to ``--max-wait-s``) until fewer than ``--max-busy`` cores
are busy (CPU use over 3 s, from ``/proc/stat``), and records the CPU other programs took during the run;
the 1-minute load average at the start and at the end goes in the report too. Memory runs do not wait
(a peak RSS does not depend on the load).

Usage::

    python bench/scaling.py --quick            # a minute or two, nothing written
    python bench/scaling.py --write            # the real run, stored in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import command_line, machine_line, markdown_table, today, usable_cores, write_section

from omnilabel.jobs.pseudomask import ImageTask, PseudomaskWorker

SECTION = "scaling"
#: The issue's goals.
GOAL_SPEEDUP = 1.7
GOAL_MEMORY_RATIO = 1.15


class TimedWorker(PseudomaskWorker):
    """``PseudomaskWorker`` that stamps each image record with its process id and wall-clock start and end.

    The stamps ride in the shard files (``bench`` key; the merge ignores it), so the actors' busy intervals
    can be read back after the job. Each worker runs one torch thread, whatever its share of the cores.
    """

    def __init__(self, *args: Any) -> None:
        import torch

        torch.set_num_threads(1)
        super().__init__(*args)

    def __call__(self, tasks: Sequence[ImageTask]) -> list[dict[str, Any]]:
        records = []
        for task in tasks:
            start = time.time()
            rec = super().__call__([task])[0]
            rec["bench"] = {"pid": os.getpid(), "start": start, "end": time.time()}
            records.append(rec)
        return records


def _overlap(a: float, b: float, lo: float, hi: float) -> float:
    return max(0.0, min(b, hi) - max(a, lo))


@dataclass
class Throughput:
    """One timed job.

    Attributes:
        label: how it ran (``in-process``, ``ray``).
        workers: workers asked for.
        images: images labelled.
        wall_s: the whole ``run_pseudomask`` call.
        spans: per image ``(pid, start, end)``, wall-clock seconds, from the shard files.
        busy_before: cores the machine kept busy right before the run.
        busy_during: cores the machine kept busy during the run (every process, this one included).
        cores: mean cores per group of processes from the start until the last shard came back (until
            the end for plain processes, which count in the driver's group).
        machine_cores: mean busy cores of the whole machine over the same interval.
    """

    label: str
    workers: int
    images: int
    wall_s: float
    spans: list[tuple[int, float, float]] = field(default_factory=list)
    busy_before: float = 0.0
    busy_during: float = float("nan")
    cores: dict[str, float] = field(default_factory=dict)
    machine_cores: float = float("nan")

    @property
    def pids(self) -> list[int]:
        return sorted({p for p, _, _ in self.spans})

    @property
    def window(self) -> tuple[float, float]:
        """From the moment the last worker starts its first image to the moment the first worker ends its last."""
        firsts = [min(s for p, s, _ in self.spans if p == pid) for pid in self.pids]
        lasts = [max(e for p, _, e in self.spans if p == pid) for pid in self.pids]
        return max(firsts), min(lasts)

    @property
    def steady_ips(self) -> float:
        """Images labelled inside ``window`` (partial images pro rata) per second of it."""
        lo, hi = self.window
        if hi <= lo:
            return float("nan")
        done = sum(_overlap(s, e, lo, hi) / max(e - s, 1e-9) for _, s, e in self.spans)
        return done / (hi - lo)

    @property
    def busy_fraction(self) -> float:
        """Share of ``window`` × workers the workers spent labelling (the rest: waiting for a shard)."""
        lo, hi = self.window
        busy = sum(_overlap(s, e, lo, hi) for _, s, e in self.spans)
        return busy / max((hi - lo) * len(self.pids), 1e-9)

    @property
    def other_cores(self) -> float:
        """Cores the machine spent on anything but this job and Ray (processes that came and went included)."""
        ours = ("driver (this script)", "Ray workers", "Ray: ", "ray::")
        return max(self.machine_cores - sum(c for g, c in self.cores.items() if g.startswith(ours)), 0.0)

    @property
    def end_to_end_ips(self) -> float:
        return self.images / self.wall_s

    @property
    def busy_per_image_s(self) -> float:
        return sum(e - s for _, s, e in self.spans) / max(len(self.spans), 1)


def cpu_jiffies() -> tuple[int, int]:
    """Busy and total CPU time of the whole machine so far, in jiffies summed over cores (``/proc/stat``)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(fields) - fields[3] - fields[4], sum(fields)  # idle and iowait are not busy


def busy_between(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Mean busy cores of the machine between two ``cpu_jiffies`` readings."""
    return (after[0] - before[0]) / max(after[1] - before[1], 1) * usable_cores()


def busy_cores(sample_s: float = 3.0) -> float:
    """Cores the whole machine kept busy over the next ``sample_s`` seconds (NaN without ``/proc/stat``)."""
    try:
        before = cpu_jiffies()
        time.sleep(sample_s)
        return busy_between(before, cpu_jiffies())
    except (OSError, ValueError, IndexError):
        return float("nan")


def process_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds used so far by every process: pid → (group name, seconds). Empty without ``/proc``."""
    me, tick = os.getpid(), os.sysconf("SC_CLK_TCK")
    out = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children = 0.0
        if int(d.name) == me:
            name, children = "driver (this script)", int(stat[13]) + int(stat[14])  # + finished children
        elif cmd[0].startswith("ray::"):
            name = "Ray workers" if "MapWorker" in cmd[0] else cmd[0].split()[0].split(".")[0]
        elif any("site-packages/ray/" in c for c in cmd):
            name = "Ray: " + Path(cmd[0]).name + (f" {Path(cmd[1]).name}" if len(cmd) > 1 and cmd[1].endswith(".py")
                                                  else "")
        elif Path(cmd[0]).name.startswith("python"):
            name = "python " + next((Path(c).name for c in cmd[1:] if c and not c.startswith("-")), "")
        else:
            name = Path(cmd[0]).name or "kernel threads"
        out[int(d.name)] = (name, (int(stat[11]) + int(stat[12]) + children) / tick)  # utime + stime
    return out


def cores_by_group(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                   seconds: float) -> dict[str, float]:
    """Mean cores each group of processes used between two ``process_cpu`` snapshots ``seconds`` apart."""
    groups: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        groups[name] = groups.get(name, 0.0) + (cpu - before.get(pid, (name, 0.0))[1]) / max(seconds, 1e-9)
    return groups


def wait_for_quiet(max_busy: float, max_wait_s: float) -> float:
    """Wait until the machine is nearly idle (under ``max_busy`` busy cores) or ``max_wait_s`` passed.

    The 1-minute load average lags by a minute and counts this script's own previous run, so the CPU
    use of the last few seconds is what is checked.

    Returns:
        The busy cores measured last.
    """
    deadline = time.monotonic() + max_wait_s
    busy = busy_cores()
    while busy > max_busy and time.monotonic() < deadline:
        print(f"  {busy:.2f} cores busy (> {max_busy}); waiting", flush=True)
        time.sleep(min(20.0, max(deadline - time.monotonic(), 0.0)))
        busy = busy_cores()
    return busy


def make_inputs(work: Path, *, n_images: int, image_px: int, sam_kwargs: dict[str, Any], seed: int) -> dict[str, Path]:
    """A synthetic dataset, its boxes-only weak file and a random SAM checkpoint, under ``work``."""
    import torch

    from omnilabel.data.coco import load_coco, write_coco
    from omnilabel.data.synthetic import make_dataset
    from omnilabel.data.weak import split_coco
    from omnilabel.models.tiny import build_tiny_sam, save_sam_checkpoint

    coco = make_dataset(work / "data", n_images=n_images, seed=seed, size_hw=(image_px, image_px))
    weak = work / "weak_boxes.json"
    write_coco(split_coco(load_coco(coco), fully=0.0, weak="boxes", seed=seed), weak)
    with torch.random.fork_rng(devices=[]):
        sam = build_tiny_sam(seed=seed, **sam_kwargs)
    return {"coco": weak, "images": work / "data" / "images", "sam": save_sam_checkpoint(sam, work / "sam.pth")}


def run_job(inputs: dict[str, Path], out_dir: Path, *, workers: int, batch_size: int, timed: bool = False,
            at_end: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[tuple[int, float, float]]]:
    """One pseudomask job; ``workers=0`` in this process.

    Args:
        at_end: when given, gets ``process_cpu()`` and ``time`` (perf counter) as the last shard comes back
            (before the Ray workers exit).

    Returns:
        The job's summary, and with ``timed`` per image ``(pid, start, end)`` (else an empty list).
    """
    from omnilabel.jobs.options import Dataset, JobOptions
    from omnilabel.jobs.pseudomask import PseudomaskConfig, PseudomaskWorker, run_pseudomask, task_from_dict
    from omnilabel.jobs.runner import executor_for
    from omnilabel.teachers.loading import TeacherSpec
    from omnilabel.teachers.pipeline import PipelineConfig

    job_dir = out_dir / "pseudo.job"
    job = JobOptions(num_workers=workers, batch_size=batch_size, job_dir=job_dir)
    executor = executor_for(job, TimedWorker if timed else PseudomaskWorker, task_from_dict)

    def on_event(ev: dict[str, Any]) -> None:
        if at_end is not None and ev["event"] == "progress" and ev["done"] == ev["total"]:
            at_end.update(cpu=process_cpu(), time=time.perf_counter(), jiffies=cpu_jiffies())

    config = PseudomaskConfig(TeacherSpec(sam=str(inputs["sam"]), detector="none"), PipelineConfig(weak="boxes"))
    summary = run_pseudomask(Dataset(inputs["coco"], inputs["images"]), out_dir / "pseudo.json", job, config,
                             on_event=on_event, executor=executor)
    spans = []
    if timed:
        for shard in sorted((job_dir / "shards").glob("*.jsonl")):
            for line in shard.read_text().splitlines():
                stamp = json.loads(line)["bench"]
                spans.append((int(stamp["pid"]), float(stamp["start"]), float(stamp["end"])))
    return summary, spans


def measure_throughput(args: argparse.Namespace, work: Path) -> tuple[list[Throughput], float]:
    """Time the job in-process and on Ray with each worker count; also returns Ray's start-up seconds."""
    import torch

    from omnilabel.jobs.options import JobOptions
    from omnilabel.jobs.ray_runner import init_ray

    torch.set_num_threads(1)
    sam_kwargs = {"embed_dim": args.sam_embed_dim, "depth": args.sam_depth, "num_heads": 4,
                  "global_attn_indexes": tuple(range(1, args.sam_depth, 2)), "image_size": args.sam_image_px}
    inputs = make_inputs(work / "tp", n_images=args.images, image_px=args.image_px, sam_kwargs=sam_kwargs,
                         seed=args.seed)
    t0 = time.perf_counter()
    init_ray(JobOptions(num_workers=1))
    ray_start_s = time.perf_counter() - t0
    plan = [("in-process", 0)] if args.in_process else []
    for _ in range(args.repeats):
        plan += [("ray", n) for n in args.workers]
        plan += [("processes, no Ray", n) for n in args.control_workers]
    results = []
    for i, (label, n) in enumerate(plan):
        busy = wait_for_quiet(args.max_busy, args.max_wait_s)
        before, procs, t, end = cpu_jiffies(), process_cpu(), time.perf_counter(), {}
        if label == "processes, no Ray":
            images, spans = run_plain_processes(inputs, n)
        else:
            summary, spans = run_job(inputs, work / "tp" / f"run{i}", workers=n, batch_size=args.batch_size,
                                     timed=True, at_end=end)
            images = summary["images"]
        if not end:
            end.update(cpu=process_cpu(), time=time.perf_counter(), jiffies=cpu_jiffies())
        r = Throughput(label, max(n, 1), images, time.perf_counter() - t, spans, busy_before=busy,
                       busy_during=busy_between(before, cpu_jiffies()),
                       cores=cores_by_group(procs, end["cpu"], end["time"] - t),
                       machine_cores=busy_between(before, end["jiffies"]))
        results.append(r)
        print(f"  {label} x{r.workers}: steady {r.steady_ips:.2f} img/s over {r.window[1] - r.window[0]:.1f} s "
              f"({len(r.pids)} processes, busy {r.busy_fraction:.0%}), end-to-end {r.end_to_end_ips:.2f} img/s, "
              f"{r.busy_per_image_s:.3f} s/img; machine busy cores before {busy:.2f}, during "
              f"{r.busy_during:.2f}, other processes {r.other_cores:.2f}", flush=True)
    import ray

    ray.shutdown()
    return results, ray_start_s


def run_plain_processes(inputs: dict[str, Path], n: int) -> tuple[int, list[tuple[int, float, float]]]:
    """The machine's own ceiling: ``n`` Python processes, no Ray, each labelling every n-th image at once.

    Returns:
        Images labelled, and per image ``(pid, start, end)``.
    """
    procs = [subprocess.Popen([sys.executable, __file__, "--plain-child",
                               json.dumps({"inputs": {k: str(v) for k, v in inputs.items()}, "part": i,
                                           "parts": n})], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    spans = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"plain worker process failed:\n{err[-4000:]}")
        spans += [(int(p), float(a), float(b)) for p, a, b in json.loads(out.strip().splitlines()[-1])]
    return len(spans), spans


def plain_child(spec_json: str) -> None:
    """One plain worker process: load the models, label every ``parts``-th task, print the stamps as JSON."""
    import torch

    from omnilabel.data.coco import category_names, load_coco
    from omnilabel.data.weak import plan_weak
    from omnilabel.jobs.pseudomask import plan_tasks
    from omnilabel.teachers.loading import TeacherSpec, resolve_paths
    from omnilabel.teachers.pipeline import PipelineConfig

    torch.set_num_threads(1)
    spec = json.loads(spec_json)
    coco, images = Path(spec["inputs"]["coco"]), Path(spec["inputs"]["images"])
    data = load_coco(coco, images_dir=images)
    plans = plan_weak(data, "boxes", has_detector=False).images
    tasks = plan_tasks(data, images, plans, allow_outside_images=False)[spec["part"]::spec["parts"]]
    teacher = TeacherSpec(sam=spec["inputs"]["sam"], detector="none")
    worker = TimedWorker(teacher, resolve_paths(teacher, load_detector=False), category_names(data),
                         PipelineConfig(weak="boxes"))
    stamps = [r["bench"] for r in worker(tasks)]
    print(json.dumps([[b["pid"], b["start"], b["end"]] for b in stamps]))


# -- driver memory ---------------------------------------------------------------------------------


def _vm_hwm_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def memory_child(spec_json: str) -> None:
    """Run one job in this (fresh) process and print its peak memory as JSON on the last line."""
    from omnilabel.jobs.pseudomask import run_pseudomask  # noqa: F401  (imports counted in the baseline)

    spec = json.loads(spec_json)
    inputs = {k: Path(v) for k, v in spec["inputs"].items()}
    if spec["workers"]:
        from omnilabel.jobs.options import JobOptions
        from omnilabel.jobs.ray_runner import init_ray

        init_ray(JobOptions(num_workers=1))
    import torch

    torch.set_num_threads(1)
    before_mib = _vm_hwm_mib()
    t = time.perf_counter()
    summary, _ = run_job(inputs, Path(spec["out"]), workers=spec["workers"], batch_size=spec["batch_size"])
    wall_s = time.perf_counter() - t
    print(json.dumps({"images": summary["images"], "errors": summary["errors"], "wall_s": wall_s,
                      "peak_before_job_mib": before_mib, "vmhwm_mib": _vm_hwm_mib()}))
    if spec["workers"]:
        import ray

        ray.shutdown()


def measure_memory(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Peak driver memory of one job per (mode, dataset size), each in a fresh subprocess."""
    rows = []
    for n in (args.mem_small, args.mem_large):
        inputs = make_inputs(work / f"mem{n}", n_images=n, image_px=args.mem_image_px, sam_kwargs={}, seed=args.seed)
        for mode in args.mem_modes:
            busy = busy_cores()
            spec = {"inputs": {k: str(v) for k, v in inputs.items()}, "out": str(work / f"mem{n}" / mode),
                    "workers": 1 if mode == "ray" else 0, "batch_size": args.batch_size}
            proc = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(spec)],
                                  capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"memory child ({mode}, {n} images) failed:\n{proc.stderr[-4000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res.update(mode=mode, n=n, busy_before=busy, json_kib=inputs["coco"].stat().st_size / 1024)
            rows.append(res)
            print(f"  memory {mode} {n} images: peak {res['vmhwm_mib']:.0f} MiB "
                  f"(before the job {res['peak_before_job_mib']:.0f} MiB), {res['wall_s']:.1f} s", flush=True)
    return rows


# -- report ----------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def throughput_section(tp: list[Throughput], ray_start_s: float, args: argparse.Namespace) -> list[str]:
    """The throughput table, the goal, and where the time goes."""
    def runs(label: str, n: int) -> list[Throughput]:
        return [r for r in tp if r.label == label and r.workers == n]

    ray1 = runs("ray", 1)
    base = _median([r.steady_ips for r in ray1])
    rows = []
    for r in tp:
        lo, hi = r.window
        rows.append([r.label, r.workers, len(r.pids), f"{r.steady_ips:.2f}", f"×{r.steady_ips / base:.2f}",
                     f"{hi - lo:.1f}", f"{r.busy_fraction:.0%}", f"{r.busy_per_image_s:.3f}",
                     f"{r.end_to_end_ips:.2f}", f"{r.wall_s:.1f}", f"{r.busy_before:.2f}", f"{r.busy_during:.2f}",
                     f"{r.other_cores:.2f}"])
    lines = [
        "### Throughput", "",
        f"{args.images} synthetic {args.image_px}×{args.image_px} images, weak boxes, no detector, "
        f"`--batch-size {args.batch_size}`; random SAM (ViT embed_dim {args.sam_embed_dim}, depth "
        f"{args.sam_depth}, input {args.sam_image_px} px); one torch thread per worker; runs in the order "
        f"listed. Each worker stamps every image with its process and start/end time. Local Ray start-up "
        f"({ray_start_s:.1f} s, once) is in no number.", "",
        "- steady img/s: images labelled (partial ones pro rata) while every worker was up — from the "
        "moment the last worker started its first image to the moment the first worker ended its last — "
        "per second of that window; actor start-up, model loading, the uneven tail and the merge are "
        "outside it;",
        "- busy: share of that window the workers spent labelling (the rest: waiting between shards);",
        "- s/img: mean seconds one image took inside a worker (read, SAM encode/decode, RLE);",
        "- end-to-end img/s: all images over the whole call (actor start-up and model loading included);",
        "- machine busy cores: CPU use of the whole machine (`/proc/stat`) before and during the run; other "
        "processes' cores: the part of it taken by processes that are neither this job nor Ray "
        "(`/proc/PID/stat`; another program running at the same time shows here);",
        "- `processes, no Ray`: plain Python processes, each loading the model and labelling every N-th "
        "image — what the machine gives N workers without Ray.", "",
        markdown_table(["executor", "workers", "processes seen", "steady img/s", "vs median 1 Ray worker",
                        "window s", "busy", "s/img", "end-to-end img/s", "wall s", "machine busy cores before",
                        "machine busy cores during", "other processes' cores during"], rows), ""]
    ray2 = runs("ray", 2)
    if not (ray1 and ray2):
        return lines
    med = _median([r.steady_ips for r in ray2]) / base
    best = max(r.steady_ips for r in ray2) / max(r.steady_ips for r in ray1)
    verdict = "met" if med >= GOAL_SPEEDUP else "**missed**"
    pairs = ", ".join(f"×{b.steady_ips / a.steady_ips:.2f}" for a, b in zip(ray1, ray2, strict=False))
    s1, s2 = _median([r.busy_per_image_s for r in ray1]), _median([r.busy_per_image_s for r in ray2])
    b1, b2 = _median([r.busy_fraction for r in ray1]), _median([r.busy_fraction for r in ray2])
    lines += [
        f"Goal: 2 Ray workers ≥ {GOAL_SPEEDUP}× one (steady rate, median of {len(ray2)} and {len(ray1)} runs): "
        f"×{med:.2f} — {verdict}. Best run against best run: ×{best:.2f}; each repeat's 2-worker run against "
        f"its 1-worker run: {pairs}.", "",
        f"Where the time goes: steady img/s ≈ workers × busy / (s/img). With 2 Ray workers the workers were "
        f"labelling {b2:.0%} of the window (Ray's hand-off between shards is the rest), and one image took "
        f"{s2:.3f} s against {s1:.3f} s with one worker (medians; {s2 / s1 - 1:+.0%}). The time per image alone "
        f"would give ×{2 * s1 / s2:.2f}, the idle time alone ×{2 * b2 / b1:.2f}."]
    singles = [r.busy_per_image_s for r in tp if r.workers == 1]
    lines[-1] += (f" One worker took {min(singles):.3f}–{max(singles):.3f} s per image over the {len(singles)} "
                  "one-worker runs: the ratio of two single runs moves with the machine's speed from run to run.")
    plain2, inproc = runs("processes, no Ray", 2), runs("in-process", 1)
    if plain2 and inproc:
        lines[-1] += (f" Without Ray, two plain processes reach {_median([r.steady_ips for r in plain2]):.2f} img/s "
                      f"at {_median([r.busy_per_image_s for r in plain2]):.3f} s/img, "
                      f"×{_median([r.steady_ips for r in plain2]) / inproc[0].steady_ips:.2f} one in-process worker "
                      f"({inproc[0].steady_ips:.2f} img/s at {inproc[0].busy_per_image_s:.3f} s/img).")
    groups = sorted({g for r in ray1 + ray2 for g in r.cores},
                    key=lambda g: -_median([r.cores.get(g, 0.0) for r in ray2]))
    cpu_rows = [[g, *(f"{_median([r.cores.get(g, 0.0) for r in rs]):.2f}" for rs in (ray1, ray2))]
                for g in groups if max(_median([r.cores.get(g, 0.0) for r in rs]) for rs in (ray1, ray2)) >= 0.01]
    return lines + ["", "CPU by process from the start of the call until the last shard came back (mean cores, "
                    "median over runs; `/proc/PID/stat`):", "",
                    markdown_table(["processes", "1 Ray worker", "2 Ray workers"], cpu_rows), ""]


def report(tp: list[Throughput], ray_start_s: float, mem: list[dict[str, Any]], args: argparse.Namespace, *,
           loads: tuple[float, float]) -> str:
    """The markdown section (``loads``: 1-minute load average at the start and at the end)."""
    lines = ["## Scaling: Ray workers and driver memory (`bench/scaling.py`)", "",
             f"- date: {today()}", f"- machine: {machine_line(threads=1, device='cpu')}",
             f"- command: `{command_line()}`",
             f"- 1-minute load average: {loads[0]:.2f} at the start, {loads[1]:.2f} at the end (this script's "
             f"own runs included); before each throughput run the script waited (at most {args.max_wait_s:.0f} s) "
             f"until under {args.max_busy} cores were busy (column \"machine busy cores before\")", ""]
    if tp:
        lines += throughput_section(tp, ray_start_s, args)
    if mem:
        rows = [[m["mode"], m["n"], f"{m['json_kib']:.0f}", f"{m['peak_before_job_mib']:.0f}",
                 f"{m['vmhwm_mib']:.0f}", f"{m['vmhwm_mib'] - m['peak_before_job_mib']:.0f}", f"{m['wall_s']:.1f}",
                 f"{m['busy_before']:.2f}"] for m in mem]
        lines += [
            "### Driver memory", "",
            f"One fresh process per row runs a whole job on {args.mem_image_px}×{args.mem_image_px} synthetic "
            f"images, weak boxes, the default tiny random SAM, `--batch-size {args.batch_size}` (`ray`: one "
            "local worker). Peak RSS is the process's `VmHWM`; \"before the job\" is `VmHWM` after the imports "
            "(and Ray start-up), right before `run_pseudomask`. (`ru_maxrss` is not used: Linux carries the "
            "parent's peak into a child across `exec`, so it reads the benchmark's own peak.)", "",
            markdown_table(["executor", "images", "input JSON KiB", "peak before job MiB", "peak RSS MiB",
                            "job adds MiB", "wall s", "busy cores before"], rows), ""]
        for mode in args.mem_modes:
            small = [m for m in mem if m["mode"] == mode and m["n"] == args.mem_small]
            large = [m for m in mem if m["mode"] == mode and m["n"] == args.mem_large]
            if small and large:
                ratio = large[0]["vmhwm_mib"] / small[0]["vmhwm_mib"]
                verdict = "met" if ratio <= GOAL_MEMORY_RATIO else "**missed**"
                lines.append(f"- {mode}: peak at {args.mem_large} images is ×{ratio:.3f} the peak at "
                             f"{args.mem_small} (goal ≤ ×{GOAL_MEMORY_RATIO}) — {verdict}.")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=128, help="images for the throughput runs")
    p.add_argument("--image-px", type=int, default=256, help="side of the throughput images")
    p.add_argument("--sam-embed-dim", type=int, default=128)
    p.add_argument("--sam-depth", type=int, default=4)
    p.add_argument("--sam-image-px", type=int, default=512, help="SAM input side (images are resized to it)")
    p.add_argument("--batch-size", type=int, default=4, help="images per shard (the CLI's --batch-size)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts to time")
    p.add_argument("--repeats", type=int, default=3, help="times each Ray worker count is timed")
    p.add_argument("--control-workers", type=int, nargs="*", default=[2],
                   help="also time this many plain processes without Ray (the machine's ceiling)")
    p.add_argument("--no-in-process", dest="in_process", action="store_false",
                   help="skip the in-process reference run")
    p.add_argument("--mem-small", type=int, default=100)
    p.add_argument("--mem-large", type=int, default=1000)
    p.add_argument("--mem-image-px", type=int, default=64)
    p.add_argument("--mem-modes", nargs="+", default=["in-process", "ray"], choices=["in-process", "ray"])
    p.add_argument("--skip", choices=["throughput", "memory"], action="append", default=[])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-busy", type=float, default=0.3,
                   help="before each measurement, wait while more than this many cores are busy")
    p.add_argument("--max-wait-s", type=float, default=600.0, help="longest wait for a quiet machine")
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat: a check that it runs")
    p.add_argument("--write", action="store_true", help="store the result in BENCHMARKS.md")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--plain-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.repeats, args.sam_image_px = 24, 1, 256
        args.mem_small, args.mem_large, args.max_wait_s = 20, 100, 0.0
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child)
        return
    if args.plain_child:
        plain_child(args.plain_child)
        return
    load_start = os.getloadavg()[0]
    print(f"{usable_cores()} usable cores; load average {load_start:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="omnilabel-scaling-") as tmp:
        work = Path(tmp)
        tp, ray_start_s = measure_throughput(args, work) if "throughput" not in args.skip else ([], 0.0)
        mem = measure_memory(args, work) if "memory" not in args.skip else []
    text = report(tp, ray_start_s, mem, args, loads=(load_start, os.getloadavg()[0]))
    print(text)
    if args.write:
        print(f"wrote {write_section(SECTION, text)}")


if __name__ == "__main__":
    main()
