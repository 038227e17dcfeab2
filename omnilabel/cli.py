"""The ``omnilabel`` command line: parses, validates flags, calls one library function per command.

No logic lives here. Library errors (``OmnilabelError``) become one readable line on stderr and a
non-zero exit code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from omnilabel import __version__
from omnilabel.errors import InputError, OmnilabelError

app = typer.Typer(
    name="omnilabel",
    help=(
        "Turn weak annotations (image-level tags, one point per object, boxes) into COCO instance "
        "pseudomasks, and train and evaluate the model that learns from them.\n\n"
        "Input and output are COCO JSON. Run `omnilabel COMMAND --help` for each command."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
console = Console(stderr=True)
out = Console()

_state: dict[str, Any] = {"debug": False}


class SplitWeakOpt(str, Enum):
    tags = "tags"
    points = "points"
    boxes = "boxes"
    mixed = "mixed"


def _version(value: bool) -> None:
    if value:
        out.print(f"omnilabel {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug


def _default_output(path: Path, suffix: str) -> Path:
    return path.with_name(path.name.removesuffix(".json") + suffix)


# -- data ------------------------------------------------------------------------------------------


@app.command()
def split(
    coco: Annotated[Path, typer.Argument(help="A fully annotated COCO JSON (instance masks).")],
    fully: Annotated[float, typer.Option(help="Fraction of images that keep their full masks (0..1).")] = 0.1,
    weak: Annotated[SplitWeakOpt, typer.Option(
        help="Weak type for every other annotation: `tags` (class only), `points` (one click inside the "
             "mask), `boxes` (the mask's box), `mixed` (a random type per annotation).")] = SplitWeakOpt.points,
    seed: Annotated[int, typer.Option(help="Random seed: same input and seed give the same bytes.")] = 0,
    output: Annotated[Path | None, typer.Option("-o", "--output",
                                                help="Output COCO JSON [default: COCO.weak.json beside it].")]
    = None,
) -> None:
    """Simulate a weakly annotated dataset from a fully annotated one.

    Keeps masks on a seeded fraction of the images and turns every other annotation into the weak type.
    Image and annotation ids are kept, so pseudomasks made later can be scored against the masks they
    came from (`omnilabel evaluate`).
    """
    from omnilabel.data.coco import load_coco, write_coco
    from omnilabel.data.weak import split_coco, summarize_weak

    data = load_coco(coco, allow_outside_images=True)
    result = split_coco(data, fully=fully, weak=weak.value, seed=seed)
    target = output or _default_output(coco, ".weak.json")
    write_coco(result, target)
    counts = summarize_weak(result)
    out.print(f"wrote {target}")
    table = Table(title="annotations by weak type")
    table.add_column("weak type")
    table.add_column("count", justify="right")
    for key, value in counts.items():
        table.add_row(key, str(value))
    out.print(table)


@app.command()
def validate(
    coco: Annotated[Path, typer.Argument(help="A COCO JSON (full or weak annotations).")],
    images: Annotated[Path | None, typer.Option(
        help="Folder the images' `file_name`s are relative to [default: the JSON's folder].")] = None,
    allow_outside_images: Annotated[bool, typer.Option(
        help="Accept absolute `file_name`s and ones that climb out of --images.")] = False,
) -> None:
    """Check a COCO file and open every image it names.

    Reports every problem at once, each naming the file, the record and the field. Jobs do not open
    images up front (a missing image is recorded and the job goes on); run this to check them first.
    """
    from omnilabel.data.coco import check_image_files, load_coco
    from omnilabel.data.weak import summarize_weak

    images_dir = images or coco.parent
    data = load_coco(coco, images_dir=images_dir, allow_outside_images=allow_outside_images)
    problems = check_image_files(data, images_dir, allow_outside_images=allow_outside_images)
    if problems:
        raise InputError(f"{coco}: {len(problems)} image problem(s)", problems)
    counts = ", ".join(f"{k} {v}" for k, v in summarize_weak(data).items())
    out.print(f"{coco}: OK — {len(data['images'])} images, {len(data['annotations'])} annotations ({counts})")


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write `images/` and `coco.json` into.")],
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 40,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    max_objects: Annotated[int, typer.Option(help="Most shapes per image.")] = 5,
) -> None:
    """Write a synthetic, fully annotated dataset of textured shapes (for trying omnilabel out)."""
    from omnilabel.data.synthetic import make_dataset

    if n < 1 or size < 16:
        raise InputError(f"synth: --n must be ≥ 1 and --size ≥ 16 (got {n}, {size})")
    path = make_dataset(out_dir, n_images=n, seed=seed, size_hw=(size, size), max_objects=max_objects)
    out.print(f"wrote {n} images and {path}")


# -- teacher ---------------------------------------------------------------------------------------


class WeakOpt(str, Enum):
    auto = "auto"
    none = "none"
    tags = "tags"
    points = "points"
    boxes = "boxes"


@app.command()
def pseudomask(
    coco: Annotated[Path, typer.Argument(help="Weak COCO JSON (tags, points, boxes; full masks pass through).")],
    weak: Annotated[WeakOpt, typer.Option(
        help="Which weak labels to use: `auto` (each annotation by what it carries), `points`, `boxes`, "
             "`tags` (classes only), or `none` (ignore labels; detect every dataset class).")] = WeakOpt.auto,
    images: Annotated[Path | None, typer.Option(help="Image folder [default: the JSON's folder].")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Pseudomask COCO JSON [default: COCO.pseudo.json beside the input].")] = None,
    sam: Annotated[str, typer.Option(help="SAM checkpoint: vit_b, vit_l, vit_h or a path.")] = "vit_h",
    detector: Annotated[str, typer.Option(
        help="Grounding DINO: grounding-dino-tiny, grounding-dino-base, a local folder, or `none` (points then "
             "use SAM's own box; tags/none need a detector).")] = "grounding-dino-tiny",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, …")] = "cpu",
    box_threshold: Annotated[float, typer.Option(help="GDino confidence kept for tags/none (paper: 0.3).")] = 0.3,
    nms_iou: Annotated[float, typer.Option(help="GDino NMS IoU threshold (paper: 0.9).")] = 0.9,
    job_dir: Annotated[Path | None, typer.Option(
        help="Resumable job state [default: OUTPUT.job]; a rerun skips finished shards.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Restart a job directory that holds a different job.")] = False,
    batch_size: Annotated[int, typer.Option(
        help="Images per batch: the unit a worker takes at a time, and of resume.")] = 16,
    num_workers: Annotated[int | None, typer.Option(
        help="Ray workers, each loading the models once [default: one per GPU with --device cuda, else 1]; "
             "0 runs in this process without Ray.")] = None,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster to join (`auto`, `ray://host:10001`) [default: a local Ray started here].")] = None,
    allow_outside_images: Annotated[bool, typer.Option(
        help="Accept absolute `file_name`s and ones that climb out of --images.")] = False,
) -> None:
    """Turn weak annotations into COCO pseudomasks with SAM and Grounding DINO.

    Boxes prompt SAM directly; points go SAM → Grounding DINO refinement (Algorithm 1) → SAM with box and
    point; tags (and unlabelled images) go Grounding DINO with the image's classes → SAM. Annotations with
    a `segmentation` pass through untouched. Each image is encoded by SAM once.
    """
    from omnilabel.jobs.progress import progress_bar, summary_tables
    from omnilabel.jobs.pseudomask import run_pseudomask
    from omnilabel.teachers.loading import TeacherSpec
    from omnilabel.teachers.pipeline import PipelineConfig

    target = output or _default_output(coco, ".pseudo.json")
    spec = TeacherSpec(sam=sam, detector=detector, device=device, box_threshold=box_threshold, nms_iou=nms_iou)
    config = PipelineConfig(weak=weak.value, box_threshold=box_threshold)
    run_shards = _ray_executor(num_workers, address, device, "pseudomask")
    with progress_bar("pseudomask", console) as on_progress:
        summary = run_pseudomask(coco, output=target, images_dir=images, spec=spec, config=config, job_dir=job_dir,
                                 overwrite=overwrite, shard_size=batch_size, allow_outside_images=allow_outside_images,
                                 on_progress=on_progress, run_shards=run_shards)
    for table in summary_tables(summary):
        out.print(table)


def _ray_executor(num_workers: int | None, address: str | None, device: str, job: str) -> Any:
    """None (in-process) for ``--num-workers 0``, else the job's Ray executor."""
    if num_workers == 0:
        if address is not None:
            raise InputError("--num-workers 0 runs in this process; it cannot be combined with --address")
        return None
    if num_workers is not None and num_workers < 0:
        raise InputError(f"--num-workers must be ≥ 0, got {num_workers}")
    import os

    from omnilabel.jobs.ray_runner import RayOptions

    if num_workers is None:
        import torch

        num_workers = max(torch.cuda.device_count(), 1) if device.startswith("cuda") else 1
    threads = max((os.cpu_count() or 1) // num_workers, 1)
    options = RayOptions(address=address, num_workers=num_workers, device=device, threads_per_worker=threads)
    if job == "pseudomask":
        from omnilabel.jobs.pseudomask import ray_shards

        return ray_shards(options)
    raise InputError(f"no Ray executor for {job}")


@app.command()
def weights(
    action: Annotated[str, typer.Argument(help="`list`, `download NAME` or `path NAME`.")],
    name: Annotated[str | None, typer.Argument(help="A weight name from `omnilabel weights list`.")] = None,
    force: Annotated[bool, typer.Option(help="With download: fetch again even if cached.")] = False,
) -> None:
    """List, download or locate the model weights omnilabel uses.

    Weights live in `$OMNILABEL_CACHE` (default `~/.cache/omnilabel`). Set `OMNILABEL_OFFLINE=1` to forbid
    downloads; a missing file then fails with the path to put it at.
    """
    from omnilabel.models.registry import REGISTRY, cache_dir, download, is_cached, list_weights, weight_path

    if action == "list":
        table = Table(title=f"weights (cache: {cache_dir()})")
        for col in ("name", "kind", "cached", "description"):
            table.add_column(col)
        for spec in list_weights():
            table.add_row(spec.name, spec.kind, "yes" if is_cached(spec.name) else "no", spec.description)
        out.print(table)
        return
    if action not in ("download", "path"):
        raise InputError(f"weights: unknown action {action!r}; use list, download NAME or path NAME")
    if name is None or name not in REGISTRY:
        raise InputError(f"weights {action}: give one of: {', '.join(REGISTRY)}")
    if action == "download":
        out.print(str(download(name, force=force)))
    else:
        out.print(str(weight_path(name)))


# -- evaluation ------------------------------------------------------------------------------------


@app.command()
def evaluate(
    predictions: Annotated[Path, typer.Argument(
        help="COCO results list, or a complete COCO file such as a pseudomask output.")],
    gt: Annotated[Path, typer.Option(help="Ground-truth COCO JSON with instance masks.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the numbers as JSON here.")] = None,
) -> None:
    """COCO mask AP of predictions; for pseudomasks, also teacher mIoU per weak type.

    Prints segm AP, AP50, AP75, APs/m/l (pycocotools). When the predictions are an omnilabel pseudomask
    file whose annotations carry `omnilabel.weak_id`, it also prints the mean mask IoU and mean boundary
    IoU of the pseudomasks against the GT masks of those ids, per weak type.
    """
    from omnilabel.data.coco import load_coco, read_json, write_json_atomic
    from omnilabel.eval.coco_eval import evaluate_segm
    from omnilabel.eval.miou import has_weak_ids, teacher_miou

    gt_data = load_coco(gt, allow_outside_images=True)
    pred = read_json(predictions)
    if isinstance(pred, dict):
        pred = load_coco(predictions, allow_outside_images=True)
    elif not isinstance(pred, list):
        raise InputError(f"{predictions}: expected a COCO results list or a COCO file, got {type(pred).__name__}")
    metrics = evaluate_segm(pred, gt_data)
    table = Table(title=f"COCO segm AP — {predictions.name}")
    for key in metrics:
        table.add_column(key, justify="right")
    table.add_row(*(f"{v:.3f}" for v in metrics.values()))
    out.print(table)
    result: dict[str, Any] = {"segm": metrics}
    if isinstance(pred, dict) and has_weak_ids(pred):
        per_weak = teacher_miou(pred, gt_data)
        t = Table(title="pseudomask quality against GT (by weak type)")
        for col in ("weak", "count", "mIoU", "boundary IoU"):
            t.add_column(col, justify="right" if col != "weak" else "left")
        for weak, row in per_weak.items():
            t.add_row(weak, str(row["count"]), f"{row['miou']:.3f}", f"{row['boundary_iou']:.3f}")
        out.print(t)
        result["teacher"] = per_weak
    if json_out is not None:
        write_json_atomic(result, json_out)


# -- entry point -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turn library errors into one line and exit code 1."""
    try:
        app(args=argv, standalone_mode=False)
    except OmnilabelError as exc:
        if _state["debug"]:
            raise
        console.print(Text("error: ", style="bold red") + Text(str(exc)), soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:
        # Usage errors (typer's bundled click): show the usage line and the problem, exit 2.
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
